#if Hummingbird
import Crypto
import Foundation
import Hummingbird
import Memcached
import MemcachedSessions
import NIOCore

/// Hummingbird's `PersistDriver` on memcached, for applications that keep hummingbird-auth's own
/// `SessionMiddleware` (or use the persist API directly) and want the data in memcached.
///
/// - Keys: the memcached key is `keyPrefix` plus a SHA-256 digest of the persist key (128 bits,
///   hex), as the session manager does for its sessions: a dump of memcached's keys does not
///   reveal the session cookies hummingbird-auth uses as keys, and any key, hostile ones
///   included, is a valid memcached key that can never inject a command.
/// - Values: a small envelope (`HBP1`, the absolute expiry in Unix seconds or 0, then the JSON of
///   the value), so that `set` without an expiry keeps the item's current TTL, as the protocol
///   requires, in both protocol modes (the classic text protocol cannot read a TTL). Values
///   written by earlier versions (bare JSON) are still read.
///
/// - Sealing: given a key ring, values are sealed as the session manager seals sessions
///   (AES-256-GCM, bound to their memcached key: a value copied under another key does not open),
///   and a value that does not open, or is not sealed, reads as missing. Given a storage key
///   secret, the memcached key is an HMAC of the persist key under it instead of a SHA-256.
///
/// The driver runs the client: add the driver (not the client) to the application's services.
public struct MemcachedPersistDriver: PersistDriver {
    public let client: MemcachedClient
    public let keyPrefix: String
    private let sealer: SessionSealer?
    private let secret: StorageKeySecret?

    public init(
        client: MemcachedClient, keyPrefix: String = "hbp:", keyRing: SessionKeyRing? = nil, storageKeySecret: StorageKeySecret? = nil
    ) {
        self.client = client
        self.keyPrefix = keyPrefix
        self.sealer = keyRing.map { SessionSealer(ring: $0) }
        self.secret = storageKeySecret
    }

    public func run() async throws {
        try await client.run()
    }

    /// The memcached key of a persist key: the prefix and the first 128 bits of its SHA-256 (its
    /// HMAC under the storage key secret, when there is one), in hex.
    public func memcachedKey(_ key: String) -> String {
        let digest = secret.map { $0.digest(Array(key.utf8)) } ?? Array(SHA256.hash(data: Array(key.utf8)))
        var hex = keyPrefix
        hex.reserveCapacity(keyPrefix.utf8.count + 32)
        for byte in digest.prefix(16) {
            hex.append(Self.hexDigits[Int(byte >> 4)])
            hex.append(Self.hexDigits[Int(byte & 0xF)])
        }
        return hex
    }

    private static let hexDigits: [Character] = Array("0123456789abcdef")
    private static let magic: [UInt8] = Array("HBP1".utf8)

    /// Unix seconds now.
    private static func now() -> Int64 { Int64(Date().timeIntervalSince1970) }

    /// The stored bytes of a value at a memcached key: the envelope, sealed with a key ring.
    private func encode(_ value: some Encodable, expiresAt: Int64, key: String) throws -> ByteBuffer {
        let envelope = try Self.encode(value, expiresAt: expiresAt)
        guard let sealer else { return envelope }
        return try sealer.seal(envelope, associatedData: Array(key.utf8), allocator: ByteBufferAllocator())
    }

    /// The envelope of stored bytes; nil when a key ring is set and they do not open (or are not
    /// sealed): a tampered, copied or foreign value reads as missing.
    private func envelope(_ stored: ByteBuffer, key: String) -> ByteBuffer? {
        guard let sealer else { return stored }
        guard SessionSealer.isSealed(stored) else { return nil }
        return try? sealer.open(stored, associatedData: Array(key.utf8)).plaintext
    }

    private static func encode(_ value: some Encodable, expiresAt: Int64) throws -> ByteBuffer {
        let json = try JSONEncoder().encode(value)
        var buffer = ByteBuffer()
        buffer.reserveCapacity(12 + json.count)
        buffer.writeBytes(magic)
        buffer.writeInteger(expiresAt)
        buffer.writeBytes(json)
        return buffer
    }

    /// The value and its absolute expiry (nil: never, or unknown for a value of an earlier version).
    private static func decode<Object: Decodable>(_ type: Object.Type, _ buffer: ByteBuffer) throws -> (Object, expiresAt: Int64?) {
        var buffer = buffer
        var expiresAt: Int64? = nil
        if buffer.readableBytesView.starts(with: magic) {
            buffer.moveReaderIndex(forwardBy: magic.count)
            guard let expiry = buffer.readInteger(as: Int64.self) else { throw PersistError.invalidConversion }
            expiresAt = expiry > 0 ? expiry : nil
        }
        do {
            return (try JSONDecoder().decode(type, from: Data(buffer.readableBytesView)), expiresAt)
        } catch {
            throw PersistError.invalidConversion
        }
    }

    /// The absolute expiry of `expires` from now, 0 for none (as for memcached, a zero duration
    /// never expires); at most ten years out.
    private static func expiry(_ expires: Duration?) -> Int64 {
        guard let expires else { return 0 }
        let (seconds, attoseconds) = expires.components
        if seconds < 0 || (seconds == 0 && attoseconds < 0) { return now() - 1 }
        if seconds == 0 && attoseconds == 0 { return 0 }
        let rounded = min(seconds + (attoseconds > 0 ? 1 : 0), 10 * 366 * 24 * 3600)
        return now() + rounded
    }

    private static func ttl(expiresAt: Int64) -> MemcachedTTL {
        if expiresAt == 0 { return .never }
        return expiresAt <= now() ? .expired : .at(unixTime: Int(expiresAt))
    }

    public func create<Object: Codable & Sendable>(key: String, value: Object, expires: Duration?) async throws {
        let expiresAt = Self.expiry(expires)
        let key = memcachedKey(key)
        let stored = try await client.add(
            key, value: try encode(value, expiresAt: expiresAt, key: key), ttl: Self.ttl(expiresAt: expiresAt))
        if !stored { throw PersistError.duplicate }
    }

    public func set<Object: Codable & Sendable>(key: String, value: Object, expires: Duration?) async throws {
        let key = memcachedKey(key)
        var expiresAt = Self.expiry(expires)
        if expires == nil {
            // Keep the current expiry: it is in the stored envelope (values of earlier versions:
            // the meta protocol can read the remaining TTL).
            let meta = client.configuration.protocolMode == .meta
            if case .item(let item?) = try await client.execute(meta ? .get(key, withTimeToLive: true) : .get(key)) {
                if let envelope = envelope(item.value, key: key), let (_, stored) = try? Self.decode(Raw.self, envelope), let stored {
                    expiresAt = stored
                } else if let remaining = item.timeToLive, remaining > 0 {
                    expiresAt = Self.now() + Int64(remaining)
                }
            }
        }
        try await client.set(key, value: try encode(value, expiresAt: expiresAt, key: key), ttl: Self.ttl(expiresAt: expiresAt))
    }

    /// Any JSON: to read an envelope's expiry without knowing the value's type.
    private struct Raw: Decodable {
        init(from decoder: any Decoder) throws {}
    }

    public func get<Object: Codable & Sendable>(key: String, as type: Object.Type) async throws -> Object? {
        let key = memcachedKey(key)
        guard let item = try await client.get(key), let envelope = envelope(item.value, key: key) else { return nil }
        return try Self.decode(type, envelope).0
    }

    public func getWithTTL<Object: Codable & Sendable>(key: String, as type: Object.Type) async throws -> (
        object: Object, ttl: Duration?
    )? {
        let meta = client.configuration.protocolMode == .meta
        let key = memcachedKey(key)
        guard case .item(let item?) = try await client.execute(meta ? .get(key, withTimeToLive: true) : .get(key)),
            let envelope = envelope(item.value, key: key)
        else { return nil }
        let (object, expiresAt) = try Self.decode(type, envelope)
        if let expiresAt { return (object, .seconds(max(0, expiresAt - Self.now()))) }
        let ttl: Duration? = item.timeToLive.flatMap { $0 >= 0 ? .seconds($0) : nil }
        return (object, ttl)
    }

    public func remove(key: String) async throws {
        try await client.delete(memcachedKey(key))
    }
}
#endif

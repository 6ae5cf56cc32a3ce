import Foundation
import Hummingbird
import Memcached
import NIOCore

/// Hummingbird's `PersistDriver` on memcached, for applications that keep hummingbird-auth's own
/// `SessionMiddleware` (or use the persist API directly) and want the data in memcached.
///
/// Values are JSON. Keys get `keyPrefix` and are checked before anything is sent: a key that is
/// not a valid memcached key (it comes from a cookie, after all) reads as missing and cannot be
/// written. `set` without an expiry keeps the item's current TTL, as the protocol requires (one
/// extra round trip to read it, meta protocol).
///
/// The driver runs the client: add the driver (not the client) to the application's services.
public struct MemcachedPersistDriver: PersistDriver {
    public let client: MemcachedClient
    public let keyPrefix: String

    public init(client: MemcachedClient, keyPrefix: String = "hbp:") {
        self.client = client
        self.keyPrefix = keyPrefix
    }

    public func run() async throws {
        try await client.run()
    }

    private func key(_ key: String) -> String { keyPrefix + key }

    private static func encode(_ value: some Encodable) throws -> ByteBuffer {
        ByteBuffer(bytes: try JSONEncoder().encode(value))
    }

    private static func decode<Object: Decodable>(_ type: Object.Type, _ buffer: ByteBuffer) throws -> Object {
        do {
            return try JSONDecoder().decode(type, from: Data(buffer.readableBytesView))
        } catch {
            throw PersistError.invalidConversion
        }
    }

    private static func ttl(_ expires: Duration?) -> MemcachedTTL {
        expires.map { MemcachedTTL.duration($0) } ?? .never
    }

    public func create<Object: Codable & Sendable>(key: String, value: Object, expires: Duration?) async throws {
        let stored = try await client.add(self.key(key), value: try Self.encode(value), ttl: Self.ttl(expires))
        if !stored { throw PersistError.duplicate }
    }

    public func set<Object: Codable & Sendable>(key: String, value: Object, expires: Duration?) async throws {
        let key = self.key(key)
        var ttl = Self.ttl(expires)
        if expires == nil, client.configuration.protocolMode == .meta {
            // Keep the current TTL: read it, then write with it.
            if case .item(let item?) = try await client.execute(.get(key, withTimeToLive: true)), let remaining = item.timeToLive,
                remaining > 0
            {
                ttl = .seconds(remaining)
            }
        }
        try await client.set(key, value: try Self.encode(value), ttl: ttl)
    }

    public func get<Object: Codable & Sendable>(key: String, as type: Object.Type) async throws -> Object? {
        do {
            guard let item = try await client.get(self.key(key)) else { return nil }
            return try Self.decode(type, item.value)
        } catch let error as MemcachedError where error.code == .invalidKey {
            return nil
        }
    }

    public func getWithTTL<Object: Codable & Sendable>(key: String, as type: Object.Type) async throws -> (object: Object, ttl: Duration?)?
    {
        do {
            guard case .item(let item?) = try await client.execute(.get(self.key(key), withTimeToLive: true)) else { return nil }
            let ttl: Duration? = item.timeToLive.flatMap { $0 >= 0 ? .seconds($0) : nil }
            return (try Self.decode(type, item.value), ttl)
        } catch let error as MemcachedError where error.code == .invalidKey {
            return nil
        }
    }

    public func remove(key: String) async throws {
        do {
            try await client.delete(self.key(key))
        } catch  where error.code == .invalidKey {
            return
        }
    }
}

import Atomics
import CoreMetrics
import Crypto
import Foundation
import NIOCore

/// One key of a ``SessionKeyRing``: 256 bits for AES-256-GCM, named by a key id derived from
/// the key (the first 4 bytes of an HMAC-SHA256 of a fixed label under it), so that the id in a
/// sealed envelope names the key without numbering by hand and without revealing it.
public struct SessionSealingKey: Sendable, CustomStringConvertible {
    /// The id written into every envelope this key seals.
    public let id: UInt32
    let key: SymmetricKey

    /// A key of exactly 32 bytes.
    public init(_ key: SymmetricKey) throws(SessionError) {
        guard key.bitCount == 256 else {
            throw .configuration("a session sealing key must be 256 bits (32 bytes), not \(key.bitCount) bits")
        }
        self.key = key
        let mac = HMAC<SHA256>.authenticationCode(for: Array("msm session key id".utf8), using: key)
        id = mac.withUnsafeBytes { bytes in bytes.prefix(4).reduce(UInt32(0)) { $0 << 8 | UInt32($1) } }
    }

    /// A key from its base64 text (as `msm keygen` prints it).
    public init(base64 text: String) throws(SessionError) {
        guard let data = Data(base64Encoded: text.trimmingCharacters(in: .whitespaces)) else {
            throw .configuration("a session sealing key is not base64")
        }
        try self.init(SymmetricKey(data: data))
    }

    /// A new random key.
    public static func generate() -> SessionSealingKey {
        // A 256-bit key is always accepted.
        try! SessionSealingKey(SymmetricKey(size: .bits256))
    }

    /// The key in base64, for a key file. A secret: never log it.
    public var base64: String { key.withUnsafeBytes { Data($0).base64EncodedString() } }

    /// The key id in hex, for statistics and logs (never the key).
    public var idText: String { String(format: "%08x", id) }

    public var description: String { "SessionSealingKey(id: \(idText))" }
}

/// The keys sessions are sealed with: the current key seals, every key of the ring opens.
/// Rotation without logging anyone out: give every instance the new key as an older key first
/// (it can then open what the new key seals), then make it current everywhere; sessions sealed
/// with an older key are sealed again with the current one on their next read or write, and
/// ``SessionStatistics/Snapshot/sealedOpensByKey`` shows when an old key reads zero and can be retired.
public struct SessionKeyRing: Sendable, CustomStringConvertible {
    /// Seals every write.
    public var current: SessionSealingKey
    /// Open what they sealed; never seal.
    public var previous: [SessionSealingKey]

    public init(current: SessionSealingKey, previous: [SessionSealingKey] = []) throws(SessionError) {
        var seen: Set<UInt32> = [current.id]
        for key in previous where !seen.insert(key.id).inserted {
            throw .configuration("the session key ring holds a key twice (key id \(key.idText))")
        }
        self.current = current
        self.previous = previous
    }

    /// A key file: base64 keys, one per line, the first current; blank lines and lines starting
    /// with `#` are skipped.
    public init(keyFile contents: String) throws(SessionError) {
        var keys: [SessionSealingKey] = []
        for line in contents.split(whereSeparator: \.isNewline) {
            let text = line.trimmingCharacters(in: .whitespaces)
            if text.isEmpty || text.hasPrefix("#") { continue }
            keys.append(try SessionSealingKey(base64: text))
        }
        guard let first = keys.first else { throw .configuration("the session key file holds no key") }
        try self.init(current: first, previous: Array(keys.dropFirst()))
    }

    /// Every key, the current one first.
    public var keys: [SessionSealingKey] { [current] + previous }

    public var description: String { "SessionKeyRing(current: \(current.idText), previous: \(previous.map(\.idText)))" }
}

/// Seals stored session envelopes with AES-256-GCM and opens them.
///
/// Sealed envelope: `"MX"`, format version `2` (version `1`, whose message key was an HKDF, is
/// still opened and sealed again on its next read), flags `0`, key id (UInt32, big-endian), a 16-byte
/// random salt, a 12-byte random nonce, the ciphertext of the codec's envelope, the 16-byte tag.
/// The message key is an HMAC-SHA256 of a label and the salt under the ring's key, so the random-nonce limit of
/// AES-GCM (2^32 messages per key) applies per salt, not per ring key: a busy cluster can seal
/// billions of writes under one key. The associated data is the key prefix and the session's
/// token digest (the part of its memcached key after `s:`/`b:`): the primary and backup copies
/// (byte copies) open under either key, a blob copied under another session, another prefix or
/// another application's keys does not.
package struct SessionSealer: Sendable {
    static let magic: (UInt8, UInt8) = (0x4D, 0x58)
    /// What ``seal(_:associatedData:allocator:)`` writes: the message key one HMAC of the label and
    /// the salt.
    static let formatVersion: UInt8 = 2
    /// Opened, never written: the message key HKDF-SHA256 of the ring key and the salt (the first
    /// sealing code); such a copy is sealed again like one under an older key.
    static let hkdfFormatVersion: UInt8 = 1
    static let hkdfInfo = Array("msm session seal v1".utf8)
    static let headerLength = 8
    static let saltLength = 16
    static let nonceLength = 12
    static let tagLength = 16
    /// Bytes a sealed envelope adds to the codec's.
    static let overhead = headerLength + saltLength + nonceLength + tagLength
    static let info = Array("msm session seal v1|".utf8)

    let ring: SessionKeyRing
    /// Per key of the ring (in ``SessionKeyRing/keys`` order): opens.
    private let opens: [ManagedAtomic<Int>]
    private let openCounters: [CoreMetrics.Counter]

    package init(ring: SessionKeyRing, metrics: any MetricsFactory = NOOPMetricsHandler.instance) {
        self.ring = ring
        opens = ring.keys.map { _ in ManagedAtomic(0) }
        openCounters = ring.keys.map {
            CoreMetrics.Counter(label: "msm_sealed_opens_total", dimensions: [("key_id", $0.idText)], factory: metrics)
        }
    }

    /// Whether bytes are a sealed envelope (by their first four bytes; a codec's own envelope
    /// that happened to start the same way fails to open, and is then read as unsealed when
    /// unsealed copies are accepted).
    package static func isSealed(_ bytes: ByteBuffer) -> Bool {
        guard let header = bytes.getBytes(at: bytes.readerIndex, length: 4) else { return false }
        return header[0] == magic.0 && header[1] == magic.1 && (header[2] == formatVersion || header[2] == hkdfFormatVersion)
            && header[3] == 0
    }

    /// The format version of a sealed envelope.
    static func version(of bytes: ByteBuffer) -> UInt8? {
        guard isSealed(bytes) else { return nil }
        return bytes.getInteger(at: bytes.readerIndex + 2, as: UInt8.self)
    }

    static func keyID(of bytes: ByteBuffer) -> UInt32? {
        guard isSealed(bytes) else { return nil }
        return bytes.getInteger(at: bytes.readerIndex + 4, as: UInt32.self)
    }

    /// The associated data of a memcached key (`<prefix>s:<digest>` or `<prefix>b:<digest>`):
    /// the prefix and the 32-character digest, without the two-byte kind between them.
    static func associatedData(forKey key: String) -> [UInt8] {
        let utf8 = Array(key.utf8)
        guard utf8.count >= 34 else { return utf8 }
        return Array(utf8[..<(utf8.count - 34)]) + [0] + Array(utf8[(utf8.count - 32)...])
    }

    /// Seals an envelope under the current key for the session stored at `key`.
    package func seal(_ plaintext: ByteBuffer, forKey key: String, allocator: ByteBufferAllocator) throws(SessionError) -> ByteBuffer {
        try seal(plaintext, associatedData: Self.associatedData(forKey: key), allocator: allocator)
    }

    /// Seals bytes under the current key, bound to `associatedData`.
    package func seal(_ plaintext: ByteBuffer, associatedData: [UInt8], allocator: ByteBufferAllocator) throws(SessionError) -> ByteBuffer {
        let sealingKey = ring.current
        var generator = SystemRandomNumberGenerator()
        let salt = (generator.next() as UInt64, generator.next() as UInt64)
        var out = allocator.buffer(capacity: Self.overhead + plaintext.readableBytes)
        out.writeInteger(Self.magic.0)
        out.writeInteger(Self.magic.1)
        out.writeInteger(Self.formatVersion)
        out.writeInteger(UInt8(0))
        out.writeInteger(sealingKey.id)
        out.writeInteger(salt.0)
        out.writeInteger(salt.1)
        let messageKey = out.withUnsafeReadableBytes { header in
            Self.messageKey(sealingKey.key, salt: UnsafeRawBufferPointer(rebasing: header[Self.headerLength...]))
        }
        do {
            let box = try plaintext.withUnsafeReadableBytes { bytes in
                try AES.GCM.seal(bytes, using: messageKey, nonce: AES.GCM.Nonce(), authenticating: associatedData)
            }
            // nonce, ciphertext, tag: always present for the standard 12-byte nonce.
            guard let combined = box.combined else { throw CryptoKitError.incorrectParameterSize }
            combined.withUnsafeBytes { _ = out.writeBytes($0) }
        } catch {
            throw SessionError(code: .encodingFailed, message: "the session could not be sealed")
        }
        return out
    }

    /// The message key of one envelope: HMAC-SHA256 under the ring's key of a fixed label and the
    /// envelope's random salt. The ring's key is uniformly random, so HMAC (a PRF) is a sound key
    /// derivation on its own (HKDF's extract step adds nothing for such a key; one HMAC instead
    /// of HKDF's two halves the derivation's cost).
    static func messageKey(_ key: SymmetricKey, salt: UnsafeRawBufferPointer) -> SymmetricKey {
        var mac = HMAC<SHA256>(key: key)
        mac.update(data: info)
        mac.update(data: salt)
        return SymmetricKey(data: mac.finalize())
    }

    package enum OpenFailure: Error {
        /// Sealed with a key this ring does not hold (retired, or not yet distributed here).
        case unknownKey(UInt32)
        /// Truncated, tampered, copied under another session or sealed for another prefix.
        case notAuthentic
    }

    /// Opens a sealed envelope stored at `key`: the codec's envelope, and whether it was sealed
    /// with an older key (to be sealed again with the current one).
    package func open(_ sealed: ByteBuffer, forKey key: String) throws(OpenFailure) -> (plaintext: ByteBuffer, olderKey: Bool) {
        try open(sealed, associatedData: Self.associatedData(forKey: key))
    }

    /// Opens bytes sealed for `associatedData`.
    package func open(_ sealed: ByteBuffer, associatedData: [UInt8]) throws(OpenFailure) -> (plaintext: ByteBuffer, olderKey: Bool) {
        guard let id = Self.keyID(of: sealed) else { throw .notAuthentic }
        guard let index = ring.keys.firstIndex(where: { $0.id == id }) else { throw .unknownKey(id) }
        guard sealed.readableBytes >= Self.overhead else { throw .notAuthentic }
        let key = ring.keys[index].key
        let version = Self.version(of: sealed)
        let plaintext: Data? = sealed.withUnsafeReadableBytes { bytes in
            let saltEnd = Self.headerLength + Self.saltLength
            let salt = UnsafeRawBufferPointer(rebasing: bytes[Self.headerLength..<saltEnd])
            let messageKey =
                version == Self.hkdfFormatVersion
                ? HKDF<SHA256>.deriveKey(inputKeyMaterial: key, salt: salt, info: Self.hkdfInfo, outputByteCount: 32)
                : Self.messageKey(key, salt: salt)
            return try? AES.GCM.open(
                AES.GCM.SealedBox(combined: UnsafeRawBufferPointer(rebasing: bytes[saltEnd...])), using: messageKey,
                authenticating: associatedData)
        }
        guard let plaintext else { throw .notAuthentic }
        opens[index].wrappingIncrement(ordering: .relaxed)
        openCounters[index].increment()
        var buffer = ByteBufferAllocator().buffer(capacity: plaintext.count)
        plaintext.withUnsafeBytes { _ = buffer.writeBytes($0) }
        return (buffer, index != 0 || version != Self.formatVersion)
    }

    /// Opens per key id (hex) since this manager started.
    func opensByKey() -> [String: Int] {
        var result: [String: Int] = [:]
        for (index, key) in ring.keys.enumerated() { result[key.idText] = opens[index].load(ordering: .relaxed) }
        return result
    }
}

/// Storage keys keyed by a secret: the memcached key of a session is an HMAC-SHA256 of its token
/// under this secret, so a dump of memcached's keys cannot be matched to cookies (or checked
/// against a guessed token) without it. Stable: changing it moves every session to keys no
/// instance reads, i.e. logs everyone out.
public struct StorageKeySecret: Sendable, CustomStringConvertible {
    let key: SymmetricKey

    /// At least 16 bytes.
    public init(_ key: SymmetricKey) throws(SessionError) {
        guard key.bitCount >= 128 else { throw .configuration("the storage key secret must be at least 16 bytes") }
        self.key = key
    }

    /// A secret from a file's contents: base64 (as `msm keygen` prints it), surrounding
    /// whitespace ignored.
    public init(secretFile contents: String) throws(SessionError) {
        let text = contents.trimmingCharacters(in: .whitespacesAndNewlines)
        guard let data = Data(base64Encoded: text) else { throw .configuration("the storage key secret is not base64") }
        try self.init(SymmetricKey(data: data))
    }

    public var description: String { "StorageKeySecret(redacted)" }

    /// HMAC-SHA256 of `bytes` under the secret.
    package func digest(_ bytes: [UInt8]) -> [UInt8] {
        Array(HMAC<SHA256>.authenticationCode(for: bytes, using: key))
    }
}

import Crypto

/// The memcached keys of one session. They derive from a digest of the session's token, not the
/// token itself, so a dump of memcached's keys does not reveal live cookies; and not from the node
/// or route, so a session keeps its keys when it moves. Without a ``StorageKeySecret`` the digest
/// is the token's SHA-256 (its first 16 bytes); with one, an HMAC-SHA256 of that under the secret
/// (a dump cannot be matched to a cookie without the secret). Keyed digests derive from unkeyed
/// ones, so that the principal index's entries written before a secret was added still name the
/// sessions they did.
public struct SessionKeys: Sendable, Hashable {
    /// The session itself, on its node.
    public let primary: String
    /// The non-sticky backup copy, on the next node.
    public let backup: String
    /// The non-sticky lock, on the session's node.
    public let lock: String
    /// The token these keys belong to; nil for keys made from a digest alone (the principal
    /// index holds digests, never tokens).
    public let token: MemcachedSessionID.Token?
    /// The 32 lower-case hex digits after `s:`, `b:` and `l:`.
    public let digest: String
    /// Whether the digest is keyed (an HMAC under a ``StorageKeySecret``).
    public let isKeyed: Bool

    public init(token: MemcachedSessionID.Token, prefix: String, secret: StorageKeySecret? = nil) {
        self.init(digest: Self.digest(of: token, secret: secret), prefix: prefix, token: token, isKeyed: secret != nil)
    }

    /// The keys of the session whose token has `digest` (``digest``'s form, checked by the caller).
    init(digest: String, prefix: String, token: MemcachedSessionID.Token? = nil, isKeyed: Bool = false) {
        self.token = token
        self.digest = digest
        self.isKeyed = isKeyed
        primary = prefix + "s:" + digest
        backup = prefix + "b:" + digest
        lock = prefix + "l:" + digest
    }

    /// The digest of a token in lower-case hex: the first 16 bytes of its SHA-256, and with a
    /// secret the first 16 bytes of an HMAC-SHA256 of those under it.
    static func digest(of token: MemcachedSessionID.Token, secret: StorageKeySecret?) -> String {
        let unkeyed = Array(SHA256.hash(data: token.bytes).prefix(16))
        guard let secret else { return hex(unkeyed) }
        return hex(Array(HMAC<SHA256>.authenticationCode(for: unkeyed, using: secret.key)).prefix(16))
    }

    /// The keyed digest of the session whose unkeyed digest is `digest` (nil if `digest` is not
    /// in ``isDigest(_:)``'s form).
    static func keyedDigest(ofUnkeyed digest: String, secret: StorageKeySecret) -> String? {
        guard isDigest(Substring(digest)) else { return nil }
        var bytes = [UInt8]()
        bytes.reserveCapacity(16)
        var utf8 = digest.utf8.makeIterator()
        while let high = utf8.next(), let low = utf8.next() {
            bytes.append(nibble(high) << 4 | nibble(low))
        }
        return hex(Array(HMAC<SHA256>.authenticationCode(for: bytes, using: secret.key)).prefix(16))
    }

    private static func nibble(_ digit: UInt8) -> UInt8 { digit <= 0x39 ? digit - 0x30 : digit - 0x61 + 10 }

    static func hex(_ bytes: some Collection<UInt8>) -> String {
        var hex = [UInt8]()
        hex.reserveCapacity(bytes.count * 2)
        let digits = MemcachedSessionID.Token.hexDigits
        for byte in bytes {
            hex.append(digits[Int(byte >> 4)] | 0x20)  // lower case: letters get the 0x20 bit, digits have it
            hex.append(digits[Int(byte & 0xF)] | 0x20)
        }
        return String(decoding: hex, as: UTF8.self)
    }

    /// Whether `text` has a digest's form (32 lower-case hex digits).
    static func isDigest(_ text: Substring) -> Bool {
        text.utf8.count == 32 && text.utf8.allSatisfy { (0x30...0x39).contains($0) || (0x61...0x66).contains($0) }
    }
}

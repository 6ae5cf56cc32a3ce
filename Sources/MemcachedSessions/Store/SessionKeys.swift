import Crypto

/// The memcached keys of one session. They derive from a digest of the session's token, not the
/// token itself, so a dump of memcached's keys does not reveal live cookies; and not from the node
/// or route, so a session keeps its keys when it moves. With a ``StorageKeySecret`` the digest is
/// an HMAC-SHA256 under it (a dump cannot be matched to a cookie without the secret); without,
/// a SHA-256.
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

    public init(token: MemcachedSessionID.Token, prefix: String, secret: StorageKeySecret? = nil) {
        self.init(digest: Self.digest(of: token, secret: secret), prefix: prefix, token: token)
    }

    /// The keys of the session whose token has `digest` (``digest``'s form, checked by the caller).
    init(digest: String, prefix: String, token: MemcachedSessionID.Token? = nil) {
        self.token = token
        self.digest = digest
        primary = prefix + "s:" + digest
        backup = prefix + "b:" + digest
        lock = prefix + "l:" + digest
    }

    /// The digest of a token: HMAC-SHA256 under the secret when there is one, else SHA-256; the
    /// first 16 bytes in lower-case hex.
    static func digest(of token: MemcachedSessionID.Token, secret: StorageKeySecret?) -> String {
        let digest: [UInt8] =
            if let secret {
                Array(HMAC<SHA256>.authenticationCode(for: token.bytes, using: secret.key))
            } else {
                Array(SHA256.hash(data: token.bytes))
            }
        return hex(digest.prefix(16))
    }

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

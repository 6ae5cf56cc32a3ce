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
    /// The token these keys belong to.
    public let token: MemcachedSessionID.Token

    public init(token: MemcachedSessionID.Token, prefix: String, secret: StorageKeySecret? = nil) {
        self.token = token
        let digest: [UInt8] =
            if let secret {
                Array(HMAC<SHA256>.authenticationCode(for: token.bytes, using: secret.key))
            } else {
                Array(SHA256.hash(data: token.bytes))
            }
        var hex = [UInt8]()
        hex.reserveCapacity(32)
        let digits = MemcachedSessionID.Token.hexDigits
        for byte in digest.prefix(16) {
            hex.append(digits[Int(byte >> 4)] | 0x20)  // lower case: letters get the 0x20 bit, digits have it
            hex.append(digits[Int(byte & 0xF)] | 0x20)
        }
        let digestText = String(decoding: hex, as: UTF8.self)
        primary = prefix + "s:" + digestText
        backup = prefix + "b:" + digestText
        lock = prefix + "l:" + digestText
    }
}

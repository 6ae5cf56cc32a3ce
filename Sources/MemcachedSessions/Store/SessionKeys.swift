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
        primary = Self.key(prefix, tag: UInt8(ascii: "s"), digest)
        backup = Self.key(prefix, tag: UInt8(ascii: "b"), digest)
        lock = Self.key(prefix, tag: UInt8(ascii: "l"), digest)
    }

    /// `prefix`, `tag`, `:`, `digest`, written into one string of the right size: by `+`, two
    /// appends and a reallocation each, three keys a non-sticky request
    /// (docs/benchmarks/instructions.md).
    private static func key(_ prefix: String, tag: UInt8, _ digest: String) -> String {
        var prefix = prefix
        var digest = digest
        return prefix.withUTF8 { prefix in
            digest.withUTF8 { digest in
                String(unsafeUninitializedCapacity: prefix.count + 2 + digest.count) { buffer in
                    var index = buffer.initialize(fromContentsOf: prefix)
                    buffer[index] = tag
                    buffer[index + 1] = UInt8(ascii: ":")
                    index += 2
                    index = buffer[index...].initialize(fromContentsOf: digest)
                    return index
                }
            }
        }
    }

    /// The digest of a token in lower-case hex: the first 16 bytes of its SHA-256, and with a
    /// secret the first 16 bytes of an HMAC-SHA256 of those under it.
    static func digest(of token: MemcachedSessionID.Token, secret: StorageKeySecret?) -> String {
        let hash = SHA256.hash(data: token.bytes)
        guard let secret else {
            // Read in place: no array of the digest's bytes first.
            return hash.withUnsafeBytes { hex(UnsafeRawBufferPointer(rebasing: $0.prefix(16))) }
        }
        let unkeyed = Array(hash.prefix(16))
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
        let digits = MemcachedSessionID.Token.hexDigits
        return String(unsafeUninitializedCapacity: bytes.count * 2) { buffer in
            var index = 0
            for byte in bytes {
                buffer[index] = digits[Int(byte >> 4)] | 0x20  // lower case: letters get the 0x20 bit, digits have it
                buffer[index + 1] = digits[Int(byte & 0xF)] | 0x20
                index += 2
            }
            return index
        }
    }

    /// Whether `text` has a digest's form (32 lower-case hex digits).
    static func isDigest(_ text: Substring) -> Bool {
        text.utf8.count == 32 && text.utf8.allSatisfy { (0x30...0x39).contains($0) || (0x61...0x66).contains($0) }
    }
}

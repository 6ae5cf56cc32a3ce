#if Operations
import Crypto

/// A secret that requests present as `Authorization: Bearer <token>` (the management endpoints,
/// the metrics page): the one place that checks it. Compared in constant time, over digests so
/// that not even the length leaks; the token itself is never shown (its description is redacted).
public struct BearerToken: Sendable, CustomStringConvertible {
    private let digest: [UInt8]

    public init(_ token: String) {
        digest = Array(SHA256.hash(data: Array(token.utf8)))
    }

    /// Whether an `Authorization` header value carries this token.
    public func isPresented(in authorization: String?) -> Bool {
        // The scheme is case-insensitive (RFC 9110 §11.1); the token is not.
        guard let authorization, authorization.utf8.count > 7,
            authorization.utf8.prefix(6).map({ $0 | 0x20 }) == Array("bearer".utf8),
            authorization.utf8.dropFirst(6).first == UInt8(ascii: " ")
        else { return false }
        let presented = Array(SHA256.hash(data: Array(authorization.utf8.dropFirst(7))))
        var difference: UInt8 = 0
        for (a, b) in zip(presented, digest) { difference |= a ^ b }
        return difference == 0
    }

    public var description: String { "BearerToken(redacted)" }
}
#endif

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
        guard let authorization, authorization.hasPrefix("Bearer ") else { return false }
        let presented = Array(SHA256.hash(data: Array(authorization.utf8.dropFirst(7))))
        var difference: UInt8 = 0
        for (a, b) in zip(presented, digest) { difference |= a ^ b }
        return difference == 0
    }

    public var description: String { "BearerToken(redacted)" }
}

/// How the session id travels in a cookie: the settings, the `Set-Cookie` value (formatted once,
/// no date formatting per response), and a parser for the request's `Cookie` header that
/// allocates nothing.
///
/// Defaults: `SESSION_ID`, `Path=/`, `Secure`, `HttpOnly`, `SameSite=Lax`, no `Max-Age` (a
/// browser-session cookie: the session's lifetime is memcached's TTL, which slides with every
/// request, while a `Max-Age` would not slide without a `Set-Cookie` on every response).
///
/// `Secure` by default: a session id is a credential and must not travel over plain HTTP. Turn it
/// off (`secure: false`) only for plain-HTTP development (`msm demo` does, and says so). The
/// recommended name in production is `__Host-SESSION_ID` (`Secure`, `Path=/`, no `Domain`: the
/// browser refuses it from plain HTTP and from another subdomain). Every response that sets or
/// clears the cookie also carries `Cache-Control: no-store` (``cacheControl``), so no shared
/// cache keeps a response with someone's session id.
public struct SessionCookie: Sendable, Hashable {
    public enum SameSite: String, Sendable, Hashable {
        case strict = "Strict"
        case lax = "Lax"
        case none = "None"
    }

    public let name: String
    public let path: String
    public let domain: String?
    public let secure: Bool
    public let httpOnly: Bool
    public let sameSite: SameSite?
    /// A fixed `Max-Age`, if wanted.
    public let maxAge: Duration?

    private let attributes: String
    private let nameEquals: [UInt8]

    /// - Throws: ``SessionError/Code/invalidConfiguration`` for a name or value a browser would
    ///   reject, a `__Host-` cookie that is not `Secure` with `Path=/` and no domain, a `__Secure-`
    ///   cookie that is not `Secure`, or `SameSite=None` without `Secure`.
    public init(
        name: String = "SESSION_ID", path: String = "/", domain: String? = nil, secure: Bool = true, httpOnly: Bool = true,
        sameSite: SameSite? = .lax, maxAge: Duration? = nil
    ) throws(SessionError) {
        func isToken(_ text: String) -> Bool {
            !text.isEmpty
                && text.utf8.allSatisfy { byte in
                    byte > 0x20 && byte < 0x7F && !"()<>@,;:\\\"/[]?={}".utf8.contains(byte)
                }
        }
        func isAttributeValue(_ text: String) -> Bool {
            text.utf8.allSatisfy { $0 >= 0x20 && $0 < 0x7F && $0 != UInt8(ascii: ";") }
        }
        guard isToken(name) else { throw .configuration("cookie name '\(name)' is not a valid cookie name") }
        guard path.hasPrefix("/"), isAttributeValue(path) else { throw .configuration("cookie path '\(path)' must start with '/'") }
        if let domain, domain.isEmpty || !isAttributeValue(domain) {
            throw .configuration("cookie domain '\(domain)' is not valid")
        }
        if name.hasPrefix("__Host-"), !secure || path != "/" || domain != nil {
            throw .configuration("a __Host- cookie must be Secure, with Path=/ and no Domain")
        }
        if name.hasPrefix("__Secure-"), !secure {
            throw .configuration("a __Secure- cookie must be Secure")
        }
        if sameSite == SameSite.none, !secure {
            throw .configuration("SameSite=None needs Secure (browsers reject it otherwise)")
        }
        if let maxAge, maxAge <= .zero { throw .configuration("cookie maxAge must be positive") }
        self.name = name
        self.path = path
        self.domain = domain
        self.secure = secure
        self.httpOnly = httpOnly
        self.sameSite = sameSite
        self.maxAge = maxAge
        var attributes = "; Path=\(path)"
        if let domain { attributes += "; Domain=\(domain)" }
        if let maxAge { attributes += "; Max-Age=\(maxAge.components.seconds)" }
        if secure { attributes += "; Secure" }
        if httpOnly { attributes += "; HttpOnly" }
        if let sameSite { attributes += "; SameSite=\(sameSite.rawValue)" }
        self.attributes = attributes
        self.nameEquals = Array((name + "=").utf8)
    }

    /// The `Cache-Control` value of every response that sets or clears the session cookie.
    public static let cacheControl = "no-store"

    /// The default cookie (`SESSION_ID`, `Path=/`, `Secure`, `HttpOnly`, `SameSite=Lax`).
    public static let `default`: SessionCookie = {
        do {
            return try SessionCookie()
        } catch {
            fatalError("the default cookie settings are valid")  // constant input, checked by the tests
        }
    }()

    /// The `Set-Cookie` header value the response needs, or nil when it needs none.
    public func setCookieHeader(for action: SessionResponseAction) -> String? {
        switch action.cookie {
        case .unchanged:
            return nil
        case .set(let id):
            return name + "=" + id.description + attributes
        case .clear:
            return name + "=; Max-Age=0" + attributes
        }
    }

    /// The value of this cookie in a `Cookie` header (`a=1; SESSION_ID=...; b=2`), if present.
    /// The first occurrence wins (browsers send the most specific path first). Judged on the
    /// header's bytes, as RFC 6265 defines cookies (octets): trailing spaces are dropped, then one
    /// pair of surrounding `"` bytes, whatever follows them (a combining mark after a quote does
    /// not make it another character here).
    public func value(inCookieHeader header: String) -> Substring? {
        // A native string's bytes are scanned in place (every request does this); a bridged one
        // (no contiguous UTF-8) through a copy of its bytes, the same rule.
        let found: Range<Int>? =
            header.utf8.withContiguousStorageIfAvailable { Self.valueRange(in: $0, nameEquals: nameEquals) }
            ?? Array(header.utf8).withUnsafeBufferPointer { Self.valueRange(in: $0, nameEquals: nameEquals) }
        guard let range = found else { return nil }
        let utf8 = header.utf8
        let lower = utf8.index(utf8.startIndex, offsetBy: range.lowerBound)
        return header[lower..<utf8.index(lower, offsetBy: range.count)]
    }

    /// The value of this cookie in the first of several `Cookie` headers that has it (HTTP/2 may
    /// split cookies over several fields): the value ``value(inCookieHeader:)`` finds in them
    /// joined with `"; "`, without joining them into a new string first.
    @inlinable
    public func value(inCookieHeaders headers: some Sequence<String>) -> Substring? {
        for header in headers {
            if let value = value(inCookieHeader: header) { return value }
        }
        return nil
    }

    /// The byte offsets of the cookie's value in a `Cookie` header: after `name=`, up to the next
    /// `;`, trailing spaces dropped, one pair of surrounding double quotes dropped.
    static func valueRange(in bytes: UnsafeBufferPointer<UInt8>, nameEquals pattern: [UInt8]) -> Range<Int>? {
        let count = bytes.count
        var index = 0
        while index < count {
            // Skip separators and whitespace before a cookie pair.
            while index < count, bytes[index] == UInt8(ascii: " ") || bytes[index] == UInt8(ascii: ";") || bytes[index] == UInt8(ascii: ",") {
                index += 1
            }
            guard index < count else { break }
            var probe = index
            var matched = 0
            while matched < pattern.count, probe < count, bytes[probe] == pattern[matched] {
                probe += 1
                matched += 1
            }
            var end = index
            while end < count, bytes[end] != UInt8(ascii: ";") { end += 1 }
            if matched == pattern.count {
                var upper = end
                while upper > probe, bytes[upper - 1] == UInt8(ascii: " ") { upper -= 1 }
                var lower = probe
                if upper - lower >= 2, bytes[lower] == UInt8(ascii: "\""), bytes[upper - 1] == UInt8(ascii: "\"") {
                    lower += 1
                    upper -= 1
                }
                return lower..<upper
            }
            index = end
        }
        return nil
    }
}

import Testing

@testable import MemcachedSessions

@Suite struct SessionCookieParsingTests {
    let cookie = SessionCookie.default

    @Test(arguments: [
        ("SESSION_ID=abc", "abc"),
        ("a=1; SESSION_ID=abc; b=2", "abc"),
        ("a=1;SESSION_ID=abc", "abc"),
        ("SESSION_ID=first; SESSION_ID=second", "first"),
        ("SESSION_ID=\"quoted\"", "quoted"),
        ("SESSION_ID=\"", "\""),
        ("SESSION_ID=abc   ; b=2", "abc"),
        ("SESSION_ID=", ""),
        ("  ,; SESSION_ID=x", "x"),
        ("XSESSION_ID=no; SESSION_ID=yes", "yes"),
        ("a=SESSION_ID=no; SESSION_ID=yes", "yes"),
        ("é=ü; SESSION_ID=v", "v"),
        // Bytes, not characters: a combining mark or a prepended character next to a quote or a
        // space does not shield it (the rule on the string's characters kept these).
        ("SESSION_ID=\"\u{301}x\"", "\u{301}x"),
        ("SESSION_ID=\"x\u{600}\"", "x\u{600}"),
        ("SESSION_ID=a\u{600} ", "a\u{600}"),
    ])
    func findsTheValue(header: String, expected: String) {
        #expect(cookie.value(inCookieHeader: header).map(String.init) == expected)
    }

    @Test(arguments: ["", "a=1; b=2", "SESSION_I=x", "SESSION_ID", "session_id=x", "; ; ,"])
    func findsNothing(header: String) {
        #expect(cookie.value(inCookieHeader: header) == nil)
    }

    /// The byte scan against the rule as first written on the string's UTF-8 view and characters
    /// (kept here as the oracle), over every header of up to four pieces built from the bytes that
    /// matter. The two agree wherever no character joins a quote or a space to its neighbour (the
    /// cases above where they differ).
    @Test func agreesWithTheViewBasedRuleOnEveryShortHeader() {
        let pieces = ["SESSION_ID", "=", ";", " ", ",", "\"", "a", "é", "SESSION_ID=", "x1", "\"v\""]
        var headers = [""]
        var last = [""]
        for _ in 0..<4 {
            last = last.flatMap { prefix in pieces.map { prefix + $0 } }
            headers += last
        }
        #expect(headers.count == 1 + 11 + 121 + 1331 + 14641)
        for header in headers {
            let expected = Self.reference(header, name: "SESSION_ID")
            let found = cookie.value(inCookieHeader: header)
            #expect(found.map(String.init) == expected.map(String.init), "header \(header.debugDescription)")
            if let found, let expected { #expect(found.startIndex == expected.startIndex && found.endIndex == expected.endIndex) }
        }
    }

    /// Several `Cookie` headers give the value their join with `"; "` gives: every pair of
    /// headers of up to two pieces, every triple of up to one.
    @Test func severalHeadersAgreeWithTheirJoin() {
        let pieces = ["SESSION_ID", "=", ";", " ", ",", "\"", "a", "é", "SESSION_ID=", "x1", "\"v\""]
        let one = [""] + pieces
        let upToTwo = one + pieces.flatMap { first in pieces.map { first + $0 } }
        var lists = upToTwo.flatMap { first in upToTwo.map { [first, $0] } }
        lists += one.flatMap { first in one.flatMap { second in one.map { [first, second, $0] } } }
        #expect(lists.count == 133 * 133 + 12 * 12 * 12)
        for headers in lists {
            let joined = cookie.value(inCookieHeader: headers.joined(separator: "; "))
            #expect(cookie.value(inCookieHeaders: headers).map(String.init) == joined.map(String.init), "headers \(headers)")
        }
        #expect(cookie.value(inCookieHeaders: [String]()) == nil)
    }

    static func reference(_ header: String, name: String) -> Substring? {
        let utf8 = header.utf8
        let pattern = Array((name + "=").utf8)
        var index = utf8.startIndex
        while index < utf8.endIndex {
            while index < utf8.endIndex,
                utf8[index] == UInt8(ascii: " ") || utf8[index] == UInt8(ascii: ";") || utf8[index] == UInt8(ascii: ",")
            {
                index = utf8.index(after: index)
            }
            guard index < utf8.endIndex else { break }
            var probe = index
            var matched = 0
            while matched < pattern.count, probe < utf8.endIndex, utf8[probe] == pattern[matched] {
                probe = utf8.index(after: probe)
                matched += 1
            }
            var end = index
            while end < utf8.endIndex, utf8[end] != UInt8(ascii: ";") {
                end = utf8.index(after: end)
            }
            if matched == pattern.count {
                var value = header[probe..<end]
                while value.last == " " { value = value.dropLast() }
                if value.hasPrefix("\""), value.hasSuffix("\""), value.count >= 2 { value = value.dropFirst().dropLast() }
                return value
            }
            index = end
        }
        return nil
    }
}

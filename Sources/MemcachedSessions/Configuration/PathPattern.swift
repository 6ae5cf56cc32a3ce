import Foundation

/// A regular expression matched against request paths or attribute names.
struct PathPattern: Sendable {
    let source: String
    private let expression: NSRegularExpression

    init(_ source: String, setting: String) throws(SessionError) {
        do {
            expression = try NSRegularExpression(pattern: source)
        } catch {
            throw .configuration("\(setting) '\(source)' is not a valid regular expression")
        }
        self.source = source
    }

    /// The longest path matched: longer ones never match (a bound on the regex engine's work
    /// per request, whatever the pattern).
    static let maximumPathLength = 2_048
    /// The longest pattern accepted at run time.
    static let maximumSafePatternLength = 256

    /// Checks that a pattern (one that may come over HTTP, in a run-time change) is in the safe
    /// subset: at most 256 characters, no backreferences (`\1`, `\k<name>`), no lookaround
    /// (`(?=`, `(?!`, `(?<=`, `(?<!`), and no nested quantifiers (a quantified group that itself
    /// contains a quantifier, like `(a+)+` or `(a|b*){2,}`): the constructs that make a regular
    /// expression's matching time explode on some inputs.
    static func checkSafe(_ source: String) throws(SessionError) {
        func refuse(_ why: String) -> SessionError {
            .configuration("locking uriPattern is outside the safe subset for run-time changes: \(why)")
        }
        let characters = Array(source.unicodeScalars)
        guard characters.count <= maximumSafePatternLength else {
            throw refuse("longer than \(maximumSafePatternLength) characters")
        }
        /// Per open group: whether it contains a quantifier.
        var groups: [Bool] = []
        var index = 0
        var lastWasGroup: Bool? = nil  // the construct just closed: a group (and whether it held a quantifier)
        func isQuantifier(_ c: Unicode.Scalar) -> Bool { c == "*" || c == "+" || c == "?" || c == "{" }
        while index < characters.count {
            let c = characters[index]
            switch c {
            case "\\":
                guard index + 1 < characters.count else { throw refuse("a trailing backslash") }
                let next = characters[index + 1]
                if ("1"..."9").contains(next) || next == "k" { throw refuse("a backreference") }
                index += 2
                lastWasGroup = nil
                continue
            case "[":
                // A character class: skip to its end (escapes included).
                index += 1
                if index < characters.count, characters[index] == "^" { index += 1 }
                if index < characters.count, characters[index] == "]" { index += 1 }
                while index < characters.count, characters[index] != "]" {
                    index += characters[index] == "\\" ? 2 : 1
                }
                guard index < characters.count else { throw refuse("an unterminated character class") }
                index += 1
                lastWasGroup = nil
                continue
            case "(":
                if index + 2 < characters.count, characters[index + 1] == "?" {
                    let kind = characters[index + 2]
                    if kind == "=" || kind == "!" { throw refuse("a lookahead") }
                    if kind == "<", index + 3 < characters.count, characters[index + 3] == "=" || characters[index + 3] == "!" {
                        throw refuse("a lookbehind")
                    }
                }
                groups.append(false)
                lastWasGroup = nil
                index += 1
                if index < characters.count, characters[index] == "?" {
                    // A group modifier, not a quantifier: `(?:`, `(?i)`, `(?i:`, `(?<name>`.
                    index += 1
                    if index < characters.count, characters[index] == "<" || characters[index] == "P" {
                        while index < characters.count, characters[index] != ">" { index += 1 }
                        index += 1
                    } else {
                        while index < characters.count, characters[index].properties.isAlphabetic || characters[index] == "-" {
                            index += 1
                        }
                        if index < characters.count, characters[index] == ":" { index += 1 }
                    }
                }
                continue
            case ")":
                guard let inner = groups.popLast() else { throw refuse("an unbalanced parenthesis") }
                lastWasGroup = inner
                // The enclosing group contains whatever this one did.
                if inner, !groups.isEmpty { groups[groups.count - 1] = true }
                index += 1
                continue
            default:
                if isQuantifier(c) {
                    // `?` right after `(` is a group modifier, after a quantifier a lazy marker.
                    if let quantifiedGroup = lastWasGroup, quantifiedGroup {
                        throw refuse("a nested quantifier")
                    }
                    if !groups.isEmpty { groups[groups.count - 1] = true }
                    if c == "{" {
                        while index < characters.count, characters[index] != "}" { index += 1 }
                    }
                    index += 1
                    // A lazy or possessive marker after a quantifier.
                    if index < characters.count, characters[index] == "?" || characters[index] == "+" { index += 1 }
                    lastWasGroup = nil
                    continue
                }
                lastWasGroup = nil
            }
            index += 1
        }
        guard groups.isEmpty else { throw refuse("an unbalanced parenthesis") }
    }

    /// Whether the whole of `text` matches (as MSM's `Pattern.matcher(...).matches()`). Paths
    /// over ``maximumPathLength`` bytes never match.
    func matches(_ text: String) -> Bool {
        guard text.utf8.count <= Self.maximumPathLength else { return false }
        let range = NSRange(text.startIndex..., in: text)
        guard let match = expression.firstMatch(in: text, options: [.anchored], range: range) else { return false }
        return match.range == range
    }
}

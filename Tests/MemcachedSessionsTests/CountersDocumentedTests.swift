import Foundation
import Testing

@testable import MemcachedSessions

/// Operators read what each counter counts in `docs/operations.md`; the table there is made from
/// the counters' doc comments. This keeps the two from drifting apart: a new counter without a doc
/// comment, or without its row, or a comment changed without its row, fails here with the table
/// to paste.
@Suite struct CountersDocumentedTests {
    static let root = URL(fileURLWithPath: #filePath)
        .deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()

    /// Each counter's doc comment, by case name, from the source: the `///` lines right above
    /// its `case`, joined with spaces.
    static func docComments() throws -> [String: String] {
        let source = try String(
            contentsOf: root.appendingPathComponent("Sources/MemcachedSessions/Statistics/SessionStatistics.swift"),
            encoding: .utf8
        )
        var comments: [String: String] = [:]
        var inCounter = false
        var pending: [String] = []
        for rawLine in source.split(separator: "\n", omittingEmptySubsequences: false) {
            let line = rawLine.trimmingCharacters(in: .whitespaces)
            if line.hasPrefix("public enum Counter") {
                inCounter = true
                continue
            }
            guard inCounter else { continue }
            if line.hasPrefix("///") {
                pending.append(line.dropFirst(3).trimmingCharacters(in: .whitespaces))
            } else if line.hasPrefix("case ") {
                let name = String(line.dropFirst(5).prefix { $0.isLetter || $0.isNumber })
                comments[name] = pending.joined(separator: " ")
                pending = []
            } else if line.hasPrefix("public var name") {
                break
            } else {
                pending = []
            }
        }
        return comments
    }

    /// The rows of the table under "### Counters" in docs/operations.md, in order.
    static func documentedRows() throws -> [String] {
        let operations = try String(contentsOf: root.appendingPathComponent("docs/operations.md"), encoding: .utf8)
        let lines = operations.split(separator: "\n").map(String.init)
        let start = try #require(lines.firstIndex(of: "### Counters"), "docs/operations.md has a Counters section")
        let section = lines[(start + 1)...].prefix { !$0.hasPrefix("#") }
        return section.filter { $0.hasPrefix("| `msm_") }
    }

    /// A doc comment as the table shows it: a symbol link (``SessionManager/x``) as code (`x`).
    static func asMarkdown(_ comment: String) -> String {
        comment.components(separatedBy: "``").enumerated().map { index, part in
            index % 2 == 1 ? "`\(part.split(separator: "/").last.map(String.init) ?? part)`" : part
        }.joined()
    }

    @Test func everyCounterHasADocCommentAndItsRowInOperations() throws {
        let comments = try Self.docComments()
        var expected: [String] = []
        for counter in SessionStatistics.Counter.allCases {
            let comment = comments[String(describing: counter)] ?? ""
            #expect(!comment.isEmpty, "\(counter) has no doc comment")
            expected.append("| `msm_\(counter.name)_total` | \(Self.asMarkdown(comment)) |")
        }
        #expect(comments.count == SessionStatistics.Counter.allCases.count, "every case read from the source")
        let rows = try Self.documentedRows()
        #expect(
            rows == expected,
            "docs/operations.md's counters table differs from the doc comments; the table should read:\n\(expected.joined(separator: "\n"))"
        )
    }
}

import Foundation
import Testing

@_spi(Fuzzing) import MemcachedSessions

/// The committed fuzzing corpora (`Fuzz/Corpus/cookie`, `Fuzz/Corpus/envelope`, grown by
/// `scripts/fuzz`) through the cookie and session id parsers and the session codec.
@Suite("Fuzzing corpus")
struct SessionFuzzCorpusTests {
    @Test func cookieCorpusReplays() throws {
        let inputs = try corpus("cookie")
        #expect(inputs.count >= 5)
        for (_, data) in inputs {
            data.withUnsafeBytes { SessionsFuzzing.cookieHeader($0) }
        }
    }

    @Test func envelopeCorpusReplays() throws {
        let inputs = try corpus("envelope")
        #expect(inputs.count >= 5)
        for (_, data) in inputs {
            data.withUnsafeBytes { SessionsFuzzing.sessionEnvelope($0) }
        }
    }

    func corpus(_ name: String, filePath: String = #filePath) throws -> [(String, Data)] {
        let root = URL(fileURLWithPath: filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
        let folder = root.appendingPathComponent("Fuzz/Corpus/\(name)")
        let names = try FileManager.default.contentsOfDirectory(atPath: folder.path).sorted()
        return try names.map { ($0, try Data(contentsOf: folder.appendingPathComponent($0))) }
    }
}

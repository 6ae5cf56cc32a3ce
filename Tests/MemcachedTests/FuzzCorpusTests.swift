import Foundation
import Testing

@_spi(Fuzzing) import Memcached

/// The committed fuzzing corpus (`Fuzz/Corpus/replies`, grown by `scripts/fuzz`) through the reply
/// decoder and the connection state machine: every input that ever found a problem, or new
/// coverage, keeps being tried.
@Suite("Fuzzing corpus")
struct FuzzCorpusTests {
    @Test func replyCorpusReplays() throws {
        let inputs = try corpus("replies")
        #expect(inputs.count >= 8)
        for (_, data) in inputs {
            data.withUnsafeBytes { MemcachedFuzzing.replies($0) }
        }
    }
}

/// The files of one corpus folder, by name.
func corpus(_ name: String, filePath: String = #filePath) throws -> [(String, Data)] {
    let root = URL(fileURLWithPath: filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent()
    let folder = root.appendingPathComponent("Fuzz/Corpus/\(name)")
    let names = try FileManager.default.contentsOfDirectory(atPath: folder.path).sorted()
    return try names.map { ($0, try Data(contentsOf: folder.appendingPathComponent($0))) }
}

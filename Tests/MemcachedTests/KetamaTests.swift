import Foundation
import Testing

@testable import Memcached

@Suite("Ketama consistent hashing")
struct KetamaTests {
    @Test func md5MatchesRFC1321() {
        let vectors = [
            "": "d41d8cd98f00b204e9800998ecf8427e",
            "a": "0cc175b9c0f1b6a831c399e269772661",
            "abc": "900150983cd24fb0d6963f7d28e17f72",
            "message digest": "f96b697d7cb7938d525a2f31aaf161d0",
            String(repeating: "1234567890", count: 8): "57edf4a22be3c955ac49da2e2107b67a",
        ]
        for (input, hex) in vectors {
            let digest = MD5.digest(Array(input.utf8)).map { String(format: "%02x", $0) }.joined()
            #expect(digest == hex, "MD5(\(input))")
        }
    }

    /// Tests/MemcachedTests/Fixtures/ketama-libmemcached.txt holds the server libmemcached 1.1
    /// (weighted ketama) picks for 2,000 keys, over 3 and over 4 servers; scripts/ketama has the
    /// C program that wrote it.
    @Test func agreesWithLibmemcached() throws {
        let url = try #require(Bundle.module.url(forResource: "ketama-libmemcached", withExtension: "txt", subdirectory: "Fixtures"))
        let lines = try String(contentsOf: url, encoding: .utf8).split(separator: "\n")
        let three = KetamaContinuum(nodes: [("127.0.0.1", 21211), ("127.0.0.1", 21212), ("127.0.0.1", 21213)])
        let four = KetamaContinuum(nodes: [("127.0.0.1", 21211), ("127.0.0.1", 21212), ("127.0.0.1", 21213), ("10.0.0.4", 11211)])
        var checked = 0
        for line in lines {
            let fields = line.split(separator: " ")
            let ring = fields[0] == "3" ? three : four
            #expect(ring.node(forKey: Array(fields[1].utf8)) == Int(fields[2]), "\(line)")
            checked += 1
        }
        #expect(checked == 4_000)
    }

    @Test func addingAFourthNodeMovesAtMostThirtyPercentOfKeys() {
        let three = KetamaContinuum(nodes: [("10.0.0.1", 11211), ("10.0.0.2", 11211), ("10.0.0.3", 11211)])
        let four = KetamaContinuum(nodes: [("10.0.0.1", 11211), ("10.0.0.2", 11211), ("10.0.0.3", 11211), ("10.0.0.4", 11211)])
        var moved = 0
        var perNode = [0, 0, 0, 0]
        for index in 0..<10_000 {
            let key = Array("session-\(index)".utf8)
            let before = three.node(forKey: key)
            let after = four.node(forKey: key)
            perNode[after] += 1
            if before != after {
                moved += 1
                // Consistent hashing: a key only ever moves to the new node.
                #expect(after == 3)
            }
        }
        #expect(moved <= 3_000, "\(moved) of 10,000 keys moved")
        #expect(moved >= 1_500, "the new node took too few keys: \(moved)")
        #expect(perNode.allSatisfy { $0 > 1_500 }, "\(perNode)")
    }

    @Test func skippingUnavailableNodesIsBounded() {
        let ring = KetamaContinuum(nodes: [("a", 1), ("b", 2), ("c", 3)])
        let key = Array("k".utf8)
        let home = ring.node(forKey: key)
        let moved = ring.node(forKey: key) { $0 != home }
        #expect(moved != nil && moved != home)
        #expect(ring.node(forKey: key) { _ in false } == nil)
        #expect(ring.node(forKey: key) { _ in true } == home)
    }
}

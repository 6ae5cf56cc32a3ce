import Crypto
import Testing

@testable import MemcachedSessions

@Suite("Session ids")
struct SessionIDTests {
    @Test func parsesWellFormedIDs() throws {
        let plain = try #require(MemcachedSessionID(parsing: "602F7397FBE4D9932E59A9D0E52FE178-n1"))
        #expect(plain.nodeID == "n1")
        #expect(plain.route == nil)
        #expect(plain.token.description == "602F7397FBE4D9932E59A9D0E52FE178")
        #expect(plain.description == "602F7397FBE4D9932E59A9D0E52FE178-n1")

        let routed = try #require(MemcachedSessionID(parsing: "602F7397FBE4D9932E59A9D0E52FE178-node_2.app-1"))
        #expect(routed.nodeID == "node_2")
        #expect(routed.route == "app-1")
        #expect(routed.description == "602F7397FBE4D9932E59A9D0E52FE178-node_2.app-1")

        let dashed = try #require(MemcachedSessionID(parsing: "602F7397FBE4D9932E59A9D0E52FE178-n-1"))
        #expect(dashed.nodeID == "n-1")
    }

    @Test(arguments: [
        "",
        "602F7397FBE4D9932E59A9D0E52FE178",
        "602F7397FBE4D9932E59A9D0E52FE178-",
        "602f7397fbe4d9932e59a9d0e52fe178-n1",  // lower case: we never issue it
        "602F7397FBE4D9932E59A9D0E52FE17-n1",  // 31 digits
        "602F7397FBE4D9932E59A9D0E52FE1789-n1",  // 33 digits
        "602F7397FBE4D9932E59A9D0E52FE17G-n1",
        "602F7397FBE4D9932E59A9D0E52FE178_n1",
        "602F7397FBE4D9932E59A9D0E52FE178-n1.",
        "602F7397FBE4D9932E59A9D0E52FE178-.r",
        "602F7397FBE4D9932E59A9D0E52FE178-n1.r.s",
        "602F7397FBE4D9932E59A9D0E52FE178-n1 ",
        " 602F7397FBE4D9932E59A9D0E52FE178-n1",
        "602F7397FBE4D9932E59A9D0E52FE178-n1\r\nflush_all",
        "602F7397FBE4D9932E59A9D0E52FE178-n1\u{0}",
        "602F7397FBE4D9932E59A9D0E52FE178-n\u{e9}",
        "602F7397FBE4D9932E59A9D0E52FE178-" + String(repeating: "n", count: 33),
        "602F7397FBE4D9932E59A9D0E52FE178-n1." + String(repeating: "r", count: 33),
        String(repeating: "A", count: 10_000),
        "../../etc/passwd",
        "602F7397FBE4D9932E59A9D0E52FE178-n1;jsessionid=x",
    ])
    func rejectsAnythingElse(_ text: String) {
        #expect(MemcachedSessionID(parsing: text) == nil)
    }

    @Test func generatedIDsAreUniqueAndRoundTrip() throws {
        var seen = Set<String>()
        for _ in 0..<10_000 {
            let id = MemcachedSessionID.generate(nodeID: "n2", route: "a")
            #expect(seen.insert(id.token.description).inserted)
            let parsed = try #require(MemcachedSessionID(parsing: id.description))
            #expect(parsed == id)
        }
    }

    @Test func relocationKeepsTheTokenAndTheKeys() {
        let id = MemcachedSessionID.generate(nodeID: "n1", route: "a")
        let moved = id.relocated(to: "n3").routed(to: "b")
        #expect(moved.token == id.token)
        #expect(moved.nodeID == "n3")
        #expect(moved.route == "b")
        let keys = SessionKeys(token: id.token, prefix: "app:")
        #expect(keys == SessionKeys(token: moved.token, prefix: "app:"))
    }

    /// The keys are what stored sessions are found by: a change of their bytes would lose every
    /// session stored before it. Known answers, computed apart (Python's hashlib and hmac): the
    /// first 16 bytes of SHA-256 of the token's 16 bytes, and of HMAC-SHA256 of those under a key.
    @Test func storageKeysAreStable() throws {
        let token = MemcachedSessionID.Token(high: 0x602F_7397_FBE4_D993, low: 0x2E59_A9D0_E52F_E178)
        let keys = SessionKeys(token: token, prefix: "app:")
        #expect(keys.digest == "d899b130e2c8cacaca2e92aca39a968b")
        #expect(keys.primary == "app:s:d899b130e2c8cacaca2e92aca39a968b")
        #expect(keys.backup == "app:b:d899b130e2c8cacaca2e92aca39a968b")
        #expect(keys.lock == "app:l:d899b130e2c8cacaca2e92aca39a968b")
        #expect(SessionKeys(token: token, prefix: "").primary == "s:d899b130e2c8cacaca2e92aca39a968b")
        #expect(SessionKeys(token: token, prefix: "é:").backup == "é:b:d899b130e2c8cacaca2e92aca39a968b")
        let secret = try StorageKeySecret(SymmetricKey(data: Array(0..<32) as [UInt8]))
        let keyed = SessionKeys(token: token, prefix: "app:", secret: secret)
        #expect(keyed.digest == "74db969e5f11934c485e5692f7b2b175")
        #expect(keyed.lock == "app:l:74db969e5f11934c485e5692f7b2b175")
        #expect(SessionKeys.keyedDigest(ofUnkeyed: keys.digest, secret: secret) == keyed.digest)
    }

    @Test func storageKeysDoNotRevealTheToken() {
        let id = MemcachedSessionID.generate(nodeID: "n1", route: nil)
        let keys = SessionKeys(token: id.token, prefix: "p:")
        #expect(keys.primary.hasPrefix("p:s:"))
        #expect(keys.backup.hasPrefix("p:b:"))
        #expect(keys.lock.hasPrefix("p:l:"))
        #expect(keys.primary.utf8.count == 4 + 32)
        #expect(!keys.primary.lowercased().contains(id.token.description.lowercased().prefix(12)))
        #expect(keys.primary.utf8.allSatisfy { $0 > 0x20 && $0 < 0x7F })
    }
}

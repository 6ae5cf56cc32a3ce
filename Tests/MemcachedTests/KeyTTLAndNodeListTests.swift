import Testing

@testable import Memcached

@Suite("Keys, TTLs and node lists")
struct KeyTTLAndNodeListTests {
    @Test(arguments: [
        "a\r\nb", "a\nb", "a b", "a\tb", "a\u{0}b", "a\u{7F}b", "", String(repeating: "x", count: 251),
        "été x", "ü\r", String(repeating: "é", count: 126),  // a bad byte after multi-byte characters; 252 bytes
    ])
    func invalidKeysAreRefused(key: String) {
        #expect(throws: MemcachedError.self) { try MemcachedKey.validate(key) }
    }

    /// The error names the offending byte and its offset in bytes (never the key itself).
    @Test func anInvalidKeysErrorSaysWhichByteAndWhere() {
        #expect {
            try MemcachedKey.validate("été x")
        } throws: { error in
            let message = (error as? MemcachedError)?.message ?? ""
            return message.contains("byte 0x20") && message.contains("offset 5") && !message.contains("été")
        }
    }

    /// The scan reads eight bytes at a time: every byte value at every offset of a word (and in
    /// the tail after the last whole word) is judged as memcached's rule says, among allowed bytes
    /// at the edges of the ranges the word arithmetic tests (0x21, 0x7E, 0x80, 0xFF).
    @Test func everyByteValueAtEveryOffsetIsJudgedAsTheByteRuleSays() {
        for length in [8, 16, 13] {
            for offset in 0..<length {
                for neighbour: UInt8 in [0x21, 0x7E, 0x80, 0xFF] {
                    for value in 0...255 {
                        var bytes = [UInt8](repeating: neighbour, count: length)
                        bytes[offset] = UInt8(value)
                        let expected = MemcachedKey.isForbidden(UInt8(value)) ? offset : nil
                        let found = bytes.withUnsafeBytes { MemcachedKey.firstForbiddenByte(in: $0) }
                        if found != expected {
                            Issue.record("length \(length), byte 0x\(String(value, radix: 16)) at \(offset) among 0x\(String(neighbour, radix: 16)): \(String(describing: found))")
                            return
                        }
                    }
                }
            }
        }
        // The first of several offenders is the one reported.
        let bytes = Array("abcdefgh ijk\u{7F}lmnopq\r".utf8)
        #expect(bytes.withUnsafeBytes { MemcachedKey.firstForbiddenByte(in: $0) } == 8)
    }

    @Test(arguments: ["a", "user:42/session", String(repeating: "x", count: 250), "clé-ünïcode"])
    func validKeysPass(key: String) throws {
        try MemcachedKey.validate(key)
    }

    @Test func base64MatchesTheRFCVectors() {
        let vectors = ["": "", "f": "Zg==", "fo": "Zm8=", "foo": "Zm9v", "foob": "Zm9vYg==", "fooba": "Zm9vYmE=", "foobar": "Zm9vYmFy"]
        for (input, output) in vectors { #expect(Base64.encode(Array(input.utf8)) == output) }
    }

    @Test func ttlConstructors() {
        #expect(MemcachedTTL.seconds(0) == .never)
        #expect(MemcachedTTL.seconds(-3) == .expired)
        #expect(MemcachedTTL.seconds(10).wireValue(now: 0) == 10)
        #expect(MemcachedTTL.duration(.zero) == .never)
        #expect(MemcachedTTL.duration(.seconds(-1)) == .expired)
        #expect(MemcachedTTL.seconds(2_592_001).wireValue(now: 100) == 2_592_101)
    }

    @Test func parsesNodeListsWithSpacesAndCommas() throws {
        let nodes = try MemcachedNodeAddress.parseList("n1:127.0.0.1:21211,n2:localhost:21212  n3:[::1]:21213 ,\tn4:10.0.0.1:11211")
        #expect(nodes.map(\.id) == ["n1", "n2", "n3", "n4"])
        #expect(nodes[0] == MemcachedNodeAddress(id: "n1", host: "127.0.0.1", port: 21211))
        #expect(nodes[2].host == "::1")
        #expect(nodes[2].hostAndPort == "[::1]:21213")
        let single = try MemcachedNodeAddress.parseList("127.0.0.1:11211")
        #expect(single == [MemcachedNodeAddress(id: "127.0.0.1:11211", host: "127.0.0.1", port: 11211)])
    }

    @Test(arguments: [
        "n1:127.0.0.1", "n1:127.0.0.1:0", "n1:127.0.0.1:65536", "n1:127.0.0.1:port", "n1::11211", "a:b:c:d",
        "n.1:127.0.0.1:11211", "n1:127.0.0.1:11211,n1:127.0.0.2:11211", "n1:[::1:11211", "n1:host name:11211",
    ])
    func rejectsMalformedNodeLists(list: String) {
        #expect(throws: MemcachedError.self) { _ = try MemcachedNodeAddress.parseList(list) }
    }

    @Test func configurationIsValidated() throws {
        #expect(throws: MemcachedError.self) { _ = try MemcachedClient(configuration: .init(nodes: [])) }
        var configuration = try MemcachedClient.Configuration(nodes: "n1:127.0.0.1:1")
        configuration.connectionsPerNode = 0
        #expect(throws: MemcachedError.self) { _ = try MemcachedClient(configuration: configuration) }
    }
}

@Suite("Reconnect backoff")
struct BackoffTests {
    @Test func doublesFromTheMinimumUpToTheMaximum() {
        let delays = (0..<8).map {
            ConnectionPool.backoffDelay(attempts: $0, minimum: .milliseconds(50), maximum: .seconds(2)).nanoseconds / 1_000_000
        }
        #expect(delays == [50, 100, 200, 400, 800, 1600, 2000, 2000])
        #expect(ConnectionPool.backoffDelay(attempts: 10_000, minimum: .seconds(1), maximum: .seconds(30)) == .seconds(30))
    }
}

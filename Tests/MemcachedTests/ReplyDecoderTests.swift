import NIOCore
import NIOTestUtils
import Testing

@testable import Memcached

@Suite("Reply decoder")
struct ReplyDecoderTests {
    static func reply(_ status: MemcachedReply.Status, _ configure: (inout MemcachedReply) -> Void = { _ in }) -> MemcachedReply {
        var reply = MemcachedReply(status)
        configure(&reply)
        return reply
    }

    /// Every reply memcached sends, with what it must decode to.
    static let cases: [(String, [MemcachedReply])] = [
        (
            "VA 3 f5 c17 t-1 O12\r\nabc\r\n",
            [
                reply(.metaValue) {
                    $0.flags = 5; $0.cas = 17; $0.opaque = 12; $0.timeToLive = -1; $0.value = ByteBuffer(string: "abc")
                }
            ]
        ),
        (
            "VA 0 O1\r\n\r\n",
            [
                reply(.metaValue) {
                    $0.opaque = 1; $0.value = ByteBuffer()
                }
            ]
        ),
        (
            "VA 4 O2\r\n\r\n\r\n\r\n",
            [
                reply(.metaValue) {
                    $0.opaque = 2; $0.value = ByteBuffer(string: "\r\n\r\n")
                }
            ]
        ),
        (
            "HD c99 O3\r\n",
            [
                reply(.metaHeader) {
                    $0.cas = 99; $0.opaque = 3
                }
            ]
        ),
        ("HD\r\n", [reply(.metaHeader)]),
        ("HD t3600\r\n", [reply(.metaHeader) { $0.timeToLive = 3600 }]),
        ("EN O4\r\n", [reply(.metaMiss) { $0.opaque = 4 }]),
        ("NF O5\r\n", [reply(.metaNotFound) { $0.opaque = 5 }]),
        ("NS O6\r\n", [reply(.metaNotStored) { $0.opaque = 6 }]),
        ("EX O7\r\n", [reply(.metaExists) { $0.opaque = 7 }]),
        ("MN\r\n", [reply(.metaNoop)]),
        (
            "VALUE key 42 5 1234\r\nhello\r\n",
            [
                reply(.textValue) {
                    $0.key = "key"; $0.flags = 42; $0.cas = 1234; $0.value = ByteBuffer(string: "hello")
                }
            ]
        ),
        (
            "VALUE key 0 2\r\nhi\r\nEND\r\n",
            [
                reply(.textValue) {
                    $0.key = "key"; $0.flags = 0; $0.value = ByteBuffer(string: "hi")
                }, reply(.end),
            ]
        ),
        (
            "STORED\r\nNOT_STORED\r\nEXISTS\r\nNOT_FOUND\r\nDELETED\r\nTOUCHED\r\nOK\r\n",
            [reply(.stored), reply(.notStored), reply(.exists), reply(.notFound), reply(.deleted), reply(.touched), reply(.ok)]
        ),
        ("15\r\n", [reply(.number) { $0.number = 15 }]),
        ("VERSION 1.6.18\r\n", [reply(.version) { $0.text = "1.6.18" }]),
        (
            "STAT pid 123\r\nSTAT version 1.6.18 extra\r\nEND\r\n",
            [
                reply(.stat) {
                    $0.text = "pid"; $0.statValue = "123"
                },
                reply(.stat) {
                    $0.text = "version"; $0.statValue = "1.6.18 extra"
                }, reply(.end),
            ]
        ),
        ("ERROR\r\n", [reply(.error) { $0.text = "ERROR" }]),
        ("CLIENT_ERROR bad command line format\r\n", [reply(.clientError) { $0.text = "bad command line format" }]),
        ("SERVER_ERROR object too large for cache\r\n", [reply(.serverError) { $0.text = "object too large for cache" }]),
    ]

    @Test func decodesEveryReplyTypeSplitAtEveryByteAndCoalesced() throws {
        let pairs = Self.cases.map { (ByteBuffer(string: $0.0), $0.1) }
        try ByteToMessageDecoderVerifier.verifyDecoder(inputOutputPairs: pairs) {
            MemcachedReplyDecoder()
        }
    }

    @Test func decodesAReplyStreamFedOneByteAtATime() throws {
        let all = Self.cases.map(\.0).joined()
        let expected = Self.cases.flatMap(\.1)
        var decoder = MemcachedReplyDecoder()
        var buffer = ByteBuffer()
        var decoded: [MemcachedReply] = []
        for byte in all.utf8 {
            buffer.writeInteger(byte)
            while let reply = try decoder.decode(buffer: &buffer) { decoded.append(reply) }
        }
        #expect(decoded == expected)
        #expect(buffer.readableBytes == 0)
    }

    static let garbage: [(String, String)] = [
        ("unknown word", "FOO BAR\r\n"),
        ("LF without CR", "HD\n"),
        ("VA without size", "VA\r\n"),
        ("VA with a non-number size", "VA abc O1\r\n"),
        ("data without CRLF", "VA 3 O1\r\nabcXY"),
        ("foreign opaque", "HD Oabc\r\n"),
        ("malformed CAS", "HD cx1 O1\r\n"),
        ("VALUE without size", "VALUE k 0\r\n"),
        ("VALUE with extra fields", "VALUE k 0 1 2 3\r\nx\r\n"),
        ("negative number", "-5\r\n"),
        ("number overflow", "99999999999999999999999\r\n"),
        ("binary noise", "\u{01}\u{02}\u{03}\r\n"),
        ("empty line", "\r\n"),
        ("flags over 32 bits", "VALUE k 4294967296 1\r\nx\r\n"),
    ]

    @Test(arguments: garbage)
    func garbageIsAProtocolError(name: String, input: String) {
        var decoder = MemcachedReplyDecoder()
        var buffer = ByteBuffer(string: input)
        #expect(throws: MemcachedError.self, "\(name)") {
            while try decoder.decode(buffer: &buffer) != nil {}
        }
        var again = MemcachedReplyDecoder()
        var buffer2 = ByteBuffer(string: input)
        do {
            while try again.decode(buffer: &buffer2) != nil {}
        } catch let error as MemcachedError {
            #expect(error.code == .protocolError)
        } catch {
            Issue.record("not a MemcachedError: \(error)")
        }
    }

    @Test func anEndlessLineIsAnErrorNotUnboundedBuffering() {
        var decoder = MemcachedReplyDecoder()
        var buffer = ByteBuffer(repeating: UInt8(ascii: "A"), count: MemcachedReplyDecoder.maximumLineLength + 10)
        #expect(throws: MemcachedError.self) { _ = try decoder.decode(buffer: &buffer) }
    }

    @Test func anAbsurdValueSizeIsAnErrorNotAnAllocation() {
        var decoder = MemcachedReplyDecoder(maximumValueSize: 1024)
        var buffer = ByteBuffer(string: "VA 999999999 O1\r\n")
        #expect(throws: MemcachedError.self) { _ = try decoder.decode(buffer: &buffer) }
    }

    @Test func waitsForTheWholeDataBlock() throws {
        var decoder = MemcachedReplyDecoder()
        var buffer = ByteBuffer(string: "VA 10 O1\r\n01234")
        #expect(try decoder.decode(buffer: &buffer) == nil)
        buffer.writeString("56789\r")
        #expect(try decoder.decode(buffer: &buffer) == nil)
        buffer.writeString("\n")
        let reply = try #require(try decoder.decode(buffer: &buffer))
        #expect(reply.value == ByteBuffer(string: "0123456789"))
    }
}

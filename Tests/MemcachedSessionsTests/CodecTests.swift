import Foundation
import NIOCore
import Testing

@testable import MemcachedSessions

@Suite("Session codec")
struct CodecTests {
    static func sampleRecord() throws -> SessionRecord {
        let codec = BinarySessionCodec()
        return SessionRecord(
            metadata: SessionMetadata(
                createdAt: 1_700_000_000_123, lastAccessedAt: 1_700_000_100_456, idleTimeoutSeconds: 1800, absoluteTimeoutSeconds: 0,
                version: 42),
            attributes: [
                "count": try codec.encodeValue(7),
                "profile": try codec.encodeValue(String(repeating: "p", count: 1024)),
                "cart": try codec.encodeValue(["apple": 2, "pear": 1]),
                "": ByteBuffer(),
                "ünïcödé": try codec.encodeValue("snow ☃ \"quoted\"\n"),
            ])
    }

    @Test func envelopeRoundTrips() throws {
        let codec = BinarySessionCodec()
        let record = try Self.sampleRecord()
        var buffer = ByteBuffer()
        try codec.encodeSession(record, into: &buffer)
        #expect(try codec.decodeSession(from: buffer) == record)
        // Equal sessions encode to equal bytes (attributes are written in name order).
        var again = ByteBuffer()
        try codec.encodeSession(record, into: &again)
        #expect(again == buffer)
    }

    @Test func everyTruncationAndRandomBytesAreErrorsNotCrashes() throws {
        let codec = BinarySessionCodec()
        var buffer = ByteBuffer()
        try codec.encodeSession(try Self.sampleRecord(), into: &buffer)
        for length in 0..<buffer.readableBytes {
            #expect(throws: SessionCodecError.self) { _ = try codec.decodeSession(from: buffer.getSlice(at: 0, length: length)!) }
        }
        var generator = SystemRandomNumberGenerator()
        for _ in 0..<5_000 {
            var random = ByteBuffer()
            let count = Int.random(in: 0..<200, using: &generator)
            for _ in 0..<count { random.writeInteger(UInt8.random(in: 0...255, using: &generator)) }
            _ = try? codec.decodeSession(from: random)
        }
        // Bit flips in a valid envelope: decoded or refused, never a crash.
        let bytes = Array(buffer.readableBytesView)
        for index in 0..<min(bytes.count, 64) {
            var flipped = bytes
            flipped[index] ^= 0xFF
            _ = try? codec.decodeSession(from: ByteBuffer(bytes: flipped))
        }
    }

    /// Attribute names: ASCII ones take a fast path, the rest `String(validating:as:)`; both
    /// against that validation on every name of up to two bytes and on some longer ones, and an
    /// envelope with a name that is not UTF-8 is refused.
    @Test func attributeNamesAreValidatedAsUTF8() throws {
        var names: [[UInt8]] = [[], Array("café".utf8), Array("名前".utf8), [0x61, 0xC3], [0xED, 0xA0, 0x80], [0xF4, 0x90, 0x80, 0x80]]
        for first in 0...255 {
            names.append([UInt8(first)])
            for second in 0...255 { names.append([UInt8(first), UInt8(second)]) }
        }
        for name in names {
            #expect(BinarySessionCodec.attributeName(ByteBuffer(bytes: name)) == String(validating: name, as: UTF8.self), "\(name)")
        }
        let codec = BinarySessionCodec()
        var envelope = ByteBuffer()
        try codec.encodeSession(SessionRecord(metadata: SessionMetadata(createdAt: 1, lastAccessedAt: 1, idleTimeoutSeconds: 60, absoluteTimeoutSeconds: 0, version: 1), attributes: ["ab": ByteBuffer(string: "1")]), into: &envelope)
        // The header (4 + 8 + 8 + 4 + 4 + 8 + 4 bytes), the name's length (2), then the name.
        var bytes = Array(envelope.readableBytesView)
        #expect(bytes[42...43] == [UInt8(ascii: "a"), UInt8(ascii: "b")])
        bytes[42] = 0xFF
        #expect(throws: SessionCodecError("attribute name is not UTF-8")) { _ = try codec.decodeSession(from: ByteBuffer(bytes: bytes)) }
    }

    @Test func foreignBytesAreRefused() {
        let codec = BinarySessionCodec()
        for text in ["", "hello", "{\"count\":1}", "MS", "MS\u{2}\u{0}", "\r\nflush_all\r\n"] {
            #expect(throws: SessionCodecError.self) { _ = try codec.decodeSession(from: ByteBuffer(string: text)) }
        }
        // A count that promises more attributes than the bytes hold.
        var lying = ByteBuffer()
        lying.writeBytes([0x4D, 0x53, 1, 0])
        lying.writeInteger(Int64(0))
        lying.writeInteger(Int64(0))
        lying.writeInteger(UInt32(0))
        lying.writeInteger(UInt32(0))
        lying.writeInteger(UInt64(0))
        lying.writeInteger(UInt32.max)
        #expect(throws: SessionCodecError.self) { _ = try codec.decodeSession(from: lying) }
    }

    @Test func fastPathsWriteTheSameJSONAsFoundation() throws {
        let ints = [0, 1, -1, 42, Int.max, Int.min, 1_000_000]
        for value in ints {
            let fast = try JSONValueCoding.encode(value)
            #expect(String(buffer: fast) == String(decoding: try JSONEncoder().encode(value), as: UTF8.self))
            #expect(try JSONValueCoding.decode(Int.self, from: fast) == value)
            #expect(try JSONDecoder().decode(Int.self, from: Data(fast.readableBytesView)) == value)
        }
        let strings = ["", "plain", "with \"quotes\"", "back\\slash", "new\nline\r\t", "\u{1}\u{1F}", "ünïcödé ☃ 🎉", "a/b"]
        for value in strings {
            let fast = try JSONValueCoding.encode(value)
            #expect(try JSONDecoder().decode(String.self, from: Data(fast.readableBytesView)) == value)
            #expect(try JSONValueCoding.decode(String.self, from: fast) == value)
        }
        for value in [true, false] {
            let fast = try JSONValueCoding.encode(value)
            #expect(try JSONValueCoding.decode(Bool.self, from: fast) == value)
        }
        struct Cart: Codable, Equatable { var items: [String: Int]; var note: String? }
        let cart = Cart(items: ["a": 1], note: nil)
        #expect(try JSONValueCoding.decode(Cart.self, from: try JSONValueCoding.encode(cart)) == cart)
    }

    @Test func wrongTypesAreDecodingErrors() throws {
        #expect(throws: SessionCodecError.self) { _ = try JSONValueCoding.decode(Int.self, from: ByteBuffer(string: "\"x\"")) }
        #expect(throws: SessionCodecError.self) {
            _ = try JSONValueCoding.decode(Int.self, from: ByteBuffer(string: "99999999999999999999999"))
        }
        #expect(throws: SessionCodecError.self) { _ = try JSONValueCoding.decode(String.self, from: ByteBuffer(string: "12")) }
        #expect(throws: SessionCodecError.self) { _ = try JSONValueCoding.decode(Int.self, from: ByteBuffer(string: "")) }
    }
}

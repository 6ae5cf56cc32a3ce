import NIOCore
import Testing

@testable import Memcached

@Suite("Request encoder")
struct EncoderTests {
    static let now: Int64 = 1_800_000_000

    func encode(_ request: MemcachedRequest, _ mode: MemcachedProtocolMode, opaque: UInt32 = 7) -> (String, ReplyExpectation) {
        var buffer = ByteBuffer()
        let expectation = MemcachedRequestEncoder(mode: mode).encode(request, opaque: opaque, into: &buffer, now: Self.now)
        return (String(buffer: buffer), expectation)
    }

    @Test func metaCommands() {
        #expect(encode(.get("k"), .meta).0 == "mg k v f c O7\r\n")
        #expect(encode(.get("k", touch: .seconds(60)), .meta).0 == "mg k v f c T60\r\n".replacingOccurrences(of: "\r\n", with: " O7\r\n"))
        #expect(encode(.store("k", value: ByteBuffer(string: "abc")), .meta).0 == "ms k 3 c O7\r\nabc\r\n")
        #expect(
            encode(.store("k", value: ByteBuffer(string: "abc"), mode: .add, ttl: .seconds(5), flags: 9, cas: 77, quiet: true), .meta).0
                == "ms k 3 c F9 T5 C77 ME q O7\r\nabc\r\n")
        #expect(encode(.store("k", value: ByteBuffer(), mode: .replace), .meta).0 == "ms k 0 c MR O7\r\n\r\n")
        #expect(encode(.store("k", value: ByteBuffer(), mode: .append), .meta).0 == "ms k 0 c MA O7\r\n\r\n")
        #expect(encode(.store("k", value: ByteBuffer(), mode: .prepend), .meta).0 == "ms k 0 c MP O7\r\n\r\n")
        #expect(encode(.delete("k"), .meta).0 == "md k O7\r\n")
        #expect(encode(.delete("k", cas: 5, quiet: true), .meta).0 == "md k C5 q O7\r\n")
        #expect(encode(.touch("k", ttl: .seconds(30)), .meta).0 == "mg k T30 O7\r\n")
        #expect(encode(.arithmetic("k", delta: 3), .meta).0 == "ma k v D3 O7\r\n")
        #expect(
            encode(.arithmetic("k", delta: 3, increment: false, initial: 10, ttl: .seconds(9)), .meta).0 == "ma k v MD D3 N9 J10 O7\r\n")
        #expect(encode(.noop, .meta) == ("mn\r\n", .metaNoop))
        #expect(encode(.version, .meta) == ("version\r\n", .version))
        #expect(encode(.stats(), .meta) == ("stats\r\n", .stats))
        #expect(encode(.stats(.slabs), .meta) == ("stats slabs\r\n", .stats))
    }

    @Test func textCommands() {
        #expect(encode(.get("k"), .text) == ("gets k\r\n", .textGet(key: "k")))
        #expect(encode(.get("k", touch: .seconds(60)), .text).0 == "gats 60 k\r\n")
        // A metadata read is a gets in text mode, never a touch (which would set the TTL).
        #expect(encode(.getMetadata("k"), .text) == ("gets k\r\n", .textGet(key: "k")))
        #expect(encode(.store("k", value: ByteBuffer(string: "abc"), flags: 3), .text) == ("set k 3 0 3\r\nabc\r\n", .textStore))
        #expect(encode(.store("k", value: ByteBuffer(string: "a"), mode: .add, ttl: .seconds(5)), .text).0 == "add k 0 5 1\r\na\r\n")
        #expect(encode(.store("k", value: ByteBuffer(string: "a"), cas: 99), .text).0 == "cas k 0 0 1 99\r\na\r\n")
        #expect(encode(.delete("k"), .text) == ("delete k\r\n", .textDelete))
        #expect(encode(.touch("k", ttl: .seconds(3)), .text) == ("touch k 3\r\n", .textTouch))
        #expect(encode(.arithmetic("k", delta: 2), .text) == ("incr k 2\r\n", .textArithmetic))
        #expect(encode(.arithmetic("k", delta: 2, increment: false), .text).0 == "decr k 2\r\n")
        #expect(encode(.noop, .text) == ("version\r\n", .textNoop))
    }

    @Test func ttlsOverThirtyDaysBecomeAbsoluteTimes() {
        let thirtyDays = 60 * 60 * 24 * 30
        #expect(encode(.touch("k", ttl: .seconds(thirtyDays)), .meta).0 == "mg k T\(thirtyDays) O7\r\n")
        #expect(encode(.touch("k", ttl: .seconds(thirtyDays + 1)), .meta).0 == "mg k T\(Self.now + Int64(thirtyDays) + 1) O7\r\n")
        #expect(encode(.touch("k", ttl: .seconds(thirtyDays + 1)), .text).0 == "touch k \(Self.now + Int64(thirtyDays) + 1)\r\n")
        #expect(encode(.touch("k", ttl: .seconds(0)), .text).0 == "touch k 0\r\n")
        #expect(encode(.touch("k", ttl: .seconds(-5)), .text).0 == "touch k -1\r\n")
        #expect(encode(.touch("k", ttl: .at(unixTime: 1_900_000_000)), .text).0 == "touch k 1900000000\r\n")
        #expect(encode(.touch("k", ttl: .at(unixTime: 1000)), .text).0 == "touch k -1\r\n")
        #expect(encode(.touch("k", ttl: .duration(.milliseconds(1500))), .text).0 == "touch k 2\r\n")
    }

    /// Every digit count at both its ends and beside them (each power of ten, less one, plus one),
    /// every two-digit tail, and the extremes: the writer's digit count and its two-digits-a-step
    /// loop against `String(_:)`.
    static let decimalEdges: [UInt64] = {
        var values: [UInt64] = Array(0...1_000) + [12345, UInt64(UInt32.max), UInt64.max, UInt64.max - 1]
        var power: UInt64 = 1
        for _ in 0..<19 {
            power *= 10
            values += [power - 1, power, power + 1, power + 99, power / 10 * 9 + 5]
        }
        return values
    }()

    @Test func decimalWriterCoversTheRange() {
        for value in Self.decimalEdges {
            var buffer = ByteBuffer()
            buffer.writeDecimal(value)
            #expect(String(buffer: buffer) == String(value))
            if value <= UInt64(Int64.max) {
                var negative = ByteBuffer()
                negative.writeDecimal(-Int64(value))
                #expect(String(buffer: negative) == String(-Int64(value)))
            }
        }
        var minimum = ByteBuffer()
        minimum.writeDecimal(Int64.min)
        #expect(String(buffer: minimum) == String(Int64.min))
    }

    @Test func commandWriterCoversTheRange() {
        for value in Self.decimalEdges {
            var buffer = ByteBuffer(string: "x")
            buffer.writeLine(reserving: 20) { $0.appendDecimal(value) }
            #expect(String(buffer: buffer) == "x" + String(value))
        }
        var negative = ByteBuffer()
        negative.writeLine(reserving: 20) { $0.appendDecimal(Int64.min) }
        #expect(String(buffer: negative) == String(Int64.min))
        // After what is already in the buffer, not over it.
        var after = ByteBuffer(string: "xy")
        after.writeLine(reserving: 4) { $0.append("ab") }
        #expect(String(buffer: after) == "xyab")
        after.writeLine(reserving: 3) { $0.append(string: "cde") }
        #expect(String(buffer: after) == "xyabcde")
    }

    /// The longest meta commands we send (a 250-byte key, every number at its widest) fit the
    /// room the encoder reserves beside the key.
    @Test func theLongestMetaCommandsFit() {
        let key = String(repeating: "k", count: 250)
        let value = ByteBuffer(string: "v")
        let store = encode(
            .store(key, value: value, mode: .prepend, ttl: .at(unixTime: Int.max), flags: .max, cas: .max, quiet: true), .meta,
            opaque: .max)
        #expect(store.0 == "ms \(key) 1 c F\(UInt32.max) T\(Int64.max) C\(UInt64.max) MP q O\(UInt32.max)\r\nv\r\n")
        let counter = encode(
            .arithmetic(key, delta: .max, increment: false, initial: .max, ttl: .at(unixTime: Int.max)), .meta, opaque: .max)
        #expect(counter.0 == "ma \(key) v MD D\(UInt64.max) N\(Int64.max) J\(UInt64.max) O\(UInt32.max)\r\n")
        let read = encode(.get(key, touch: .at(unixTime: Int.max), withTimeToLive: true), .meta, opaque: .max)
        #expect(read.0 == "mg \(key) v f c t T\(Int64.max) O\(UInt32.max)\r\n")
    }

    @Test func preparedRequestsAreValidatedForTheMode() throws {
        let tooBig = MemcachedRequest.store("k", value: ByteBuffer(repeating: 0, count: 2000))
        #expect(throws: MemcachedError.self) {
            _ = try tooBig.prepared(mode: .meta, keyEncoding: .plain, itemSizeLimit: 1024)
        }
        // Text mode has no quiet writes: they become ordinary acknowledged ones.
        let quiet = try MemcachedRequest.store("k", value: ByteBuffer(), quiet: true)
            .prepared(mode: .text, keyEncoding: .plain, itemSizeLimit: 1 << 20)
        #expect(quiet.quiet == false)
        let base64 = try MemcachedRequest.get("a b").prepared(mode: .meta, keyEncoding: .base64, itemSizeLimit: 1 << 20)
        #expect(base64.key == "YSBi")
    }
}

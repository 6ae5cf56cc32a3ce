import NIOCore

/// What reply a request on the wire waits for; decides how replies are matched and read.
enum ReplyExpectation: Sendable, Hashable {
    case metaGet
    case metaStore
    case metaDelete
    case metaTouch
    case metaArithmetic
    case metaNoop
    /// A text `get`/`gets`/`gats`: `VALUE` lines for this key, then `END`.
    case textGet(key: String)
    case textStore
    case textDelete
    case textTouch
    case textArithmetic
    /// Text mode has no no-op: `version` stands in for it.
    case textNoop
    case version
    case stats

    /// Whether replies to this request carry the opaque token we sent.
    var carriesOpaque: Bool {
        switch self {
        case .metaGet, .metaStore, .metaDelete, .metaTouch, .metaArithmetic: return true
        default: return false
        }
    }

    /// The result a quiet request has when the server said nothing (meta quiet mode suppresses `HD`).
    var impliedQuietResponse: MemcachedResponse? {
        switch self {
        case .metaStore: return .stored(.stored(cas: nil))
        case .metaDelete: return .deleted(.deleted)
        default: return nil
        }
    }
}

/// Writes requests in the meta or text protocol. Keys have been validated by
/// ``MemcachedRequest/prepared(mode:keyEncoding:itemSizeLimit:)``; the encoder trusts them.
struct MemcachedRequestEncoder: Sendable {
    let mode: MemcachedProtocolMode

    func encode(
        _ request: borrowing MemcachedRequest, opaque: UInt32, into buffer: inout ByteBuffer,
        now: @autoclosure () -> Int64 = MemcachedTTL.currentUnixTime()
    ) -> ReplyExpectation {
        switch mode {
        case .meta: return encodeMeta(request, opaque: opaque, into: &buffer, now: now())
        case .text: return encodeText(request, into: &buffer, now: now())
        }
    }

    /// Room for a meta command line's fixed parts and numbers (`ms`, five numbers of up to 20
    /// digits, the flags, the opaque token, CRLF) beside its key.
    private static let metaLineAllowance = 160

    /// Each meta command is written with one reservation and one copy into the buffer (not a
    /// `ByteBuffer` write per token): a request costs a single bounds, uniqueness and exclusivity
    /// check instead of a dozen.
    private func encodeMeta(
        _ request: borrowing MemcachedRequest, opaque: UInt32, into buffer: inout ByteBuffer, now: @autoclosure () -> Int64
    ) -> ReplyExpectation {
        // The command alone is matched: a match on the request's command binds its payload from
        // a copy of the whole request (an outlined copy, its key and value retained), one more a
        // request on the client's hot path.
        encodeMeta(
            request.command, quiet: request.quiet, returnsTimeToLive: request.returnsTimeToLive, opaque: opaque, into: &buffer,
            now: now())
    }

    private func encodeMeta(
        _ command: borrowing MemcachedRequest.Command, quiet: Bool, returnsTimeToLive: Bool, opaque: UInt32,
        into buffer: inout ByteBuffer, now: @autoclosure () -> Int64
    ) -> ReplyExpectation {
        switch command {
        case .get(let key, let wantValue, let touch):
            buffer.writeLine(reserving: key.utf8.count + Self.metaLineAllowance) { line in
                line.append("mg ")
                line.append(string: key)
                line.append(wantValue ? " v f c" : " f c")
                if returnsTimeToLive { line.append(" t") }
                if let touch {
                    line.append(" T")
                    line.appendDecimal(touch.wireValue(now: now()))
                }
                line.appendOpaqueAndEnd(opaque, quiet: false)
            }
            return .metaGet

        case .store(let key, let value, let flags, let ttl, let mode, let cas):
            buffer.writeLine(reserving: key.utf8.count + Self.metaLineAllowance + value.readableBytes + 2) { line in
                line.append("ms ")
                line.append(string: key)
                line.append(" ")
                line.appendDecimal(UInt64(value.readableBytes))
                line.append(" c")
                if flags != 0 {
                    line.append(" F")
                    line.appendDecimal(UInt64(flags))
                }
                let wire = ttl.wireValue(now: now())
                if wire != 0 {
                    line.append(" T")
                    line.appendDecimal(wire)
                }
                if let cas {
                    line.append(" C")
                    line.appendDecimal(cas)
                }
                switch mode {
                case .set: break
                case .add: line.append(" ME")
                case .replace: line.append(" MR")
                case .append: line.append(" MA")
                case .prepend: line.append(" MP")
                }
                line.appendOpaqueAndEnd(opaque, quiet: quiet)
                value.withUnsafeReadableBytes { line.append($0) }
                line.append("\r\n")
            }
            return .metaStore

        case .delete(let key, let cas):
            buffer.writeLine(reserving: key.utf8.count + Self.metaLineAllowance) { line in
                line.append("md ")
                line.append(string: key)
                if let cas {
                    line.append(" C")
                    line.appendDecimal(cas)
                }
                line.appendOpaqueAndEnd(opaque, quiet: quiet)
            }
            return .metaDelete

        case .touch(let key, let ttl):
            // memcached has no meta touch: a get without `v` that sets T is one.
            buffer.writeLine(reserving: key.utf8.count + Self.metaLineAllowance) { line in
                line.append("mg ")
                line.append(string: key)
                line.append(" T")
                line.appendDecimal(ttl.wireValue(now: now()))
                line.appendOpaqueAndEnd(opaque, quiet: false)
            }
            return .metaTouch

        case .arithmetic(let key, let delta, let increment, let initial, let ttl):
            buffer.writeLine(reserving: key.utf8.count + Self.metaLineAllowance) { line in
                line.append("ma ")
                line.append(string: key)
                line.append(increment ? " v D" : " v MD D")
                line.appendDecimal(delta)
                if let initial {
                    // Autovivify: a miss creates the counter with J<initial> and TTL N<ttl>.
                    line.append(" N")
                    line.appendDecimal(ttl.wireValue(now: now()))
                    line.append(" J")
                    line.appendDecimal(initial)
                }
                line.appendOpaqueAndEnd(opaque, quiet: false)
            }
            return .metaArithmetic

        case .noop:
            buffer.writeStaticString("mn\r\n")
            return .metaNoop
        case .version:
            buffer.writeStaticString("version\r\n")
            return .version
        case .stats(let group):
            Self.writeStats(group, into: &buffer)
            return .stats
        }
    }

    private func encodeText(
        _ request: MemcachedRequest, into buffer: inout ByteBuffer, now: @autoclosure () -> Int64
    ) -> ReplyExpectation {
        switch request.command {
        case .get(let key, let wantValue, let touch):
            // A metadata read (flags, CAS unique): the text protocol cannot leave the value out, so
            // the whole item comes (and no TTL). Never a `touch`, which would set the item's TTL.
            _ = wantValue
            if let touch {
                buffer.writeStaticString("gats ")
                buffer.writeDecimal(touch.wireValue(now: now()))
                buffer.writeStaticString(" ")
            } else {
                buffer.writeStaticString("gets ")
            }
            buffer.writeString(key)
            buffer.writeStaticString("\r\n")
            return .textGet(key: key)

        case .store(let key, let value, let flags, let ttl, let mode, let cas):
            if cas != nil {
                buffer.writeStaticString("cas ")
            } else {
                switch mode {
                case .set: buffer.writeStaticString("set ")
                case .add: buffer.writeStaticString("add ")
                case .replace: buffer.writeStaticString("replace ")
                case .append: buffer.writeStaticString("append ")
                case .prepend: buffer.writeStaticString("prepend ")
                }
            }
            buffer.writeString(key)
            buffer.writeStaticString(" ")
            buffer.writeDecimal(UInt64(flags))
            buffer.writeStaticString(" ")
            buffer.writeDecimal(ttl.wireValue(now: now()))
            buffer.writeStaticString(" ")
            buffer.writeDecimal(Int64(value.readableBytes))
            if let cas {
                buffer.writeStaticString(" ")
                buffer.writeDecimal(cas)
            }
            buffer.writeStaticString("\r\n")
            var value = value
            buffer.writeBuffer(&value)
            buffer.writeStaticString("\r\n")
            return .textStore

        case .delete(let key, _):
            buffer.writeStaticString("delete ")
            buffer.writeString(key)
            buffer.writeStaticString("\r\n")
            return .textDelete

        case .touch(let key, let ttl):
            buffer.writeStaticString("touch ")
            buffer.writeString(key)
            buffer.writeStaticString(" ")
            buffer.writeDecimal(ttl.wireValue(now: now()))
            buffer.writeStaticString("\r\n")
            return .textTouch

        case .arithmetic(let key, let delta, let increment, _, _):
            buffer.writeStaticString(increment ? "incr " : "decr ")
            buffer.writeString(key)
            buffer.writeStaticString(" ")
            buffer.writeDecimal(delta)
            buffer.writeStaticString("\r\n")
            return .textArithmetic

        case .noop:
            buffer.writeStaticString("version\r\n")
            return .textNoop
        case .version:
            buffer.writeStaticString("version\r\n")
            return .version
        case .stats(let group):
            Self.writeStats(group, into: &buffer)
            return .stats
        }
    }

    private static func writeStats(_ group: MemcachedStatsGroup, into buffer: inout ByteBuffer) {
        if let argument = group.argument {
            buffer.writeStaticString("stats ")
            buffer.writeString(argument)
            buffer.writeStaticString("\r\n")
        } else {
            buffer.writeStaticString("stats\r\n")
        }
    }
}

/// Writes a command into memory a ``ByteBuffer`` reserved for it (see
/// ``NIOCore/ByteBuffer/writeLine(reserving:_:)``). Every write is bounds-checked: a command that
/// would outgrow its reservation traps instead of writing past it (the reservations leave room to
/// spare, so that would be a bug here, never input).
struct CommandLineWriter: ~Copyable {
    private let base: UnsafeMutableRawBufferPointer
    private(set) var count = 0

    init(_ base: UnsafeMutableRawBufferPointer) { self.base = base }

    @inline(__always)
    mutating func append(_ bytes: UnsafeRawBufferPointer) {
        guard bytes.count > 0 else { return }
        precondition(bytes.count <= base.count - count, "memcached command larger than its reservation")
        (base.baseAddress! + count).copyMemory(from: bytes.baseAddress!, byteCount: bytes.count)
        count += bytes.count
    }

    @inline(__always)
    mutating func append(_ text: StaticString) {
        append(UnsafeRawBufferPointer(start: text.utf8Start, count: text.utf8CodeUnitCount))
    }

    /// A `String` (the overload a literal does not pick: literals go through `StaticString`).
    @inline(__always)
    mutating func append(string text: String) {
        var text = text
        text.withUTF8 { append(UnsafeRawBufferPointer($0)) }
    }

    @inline(__always)
    mutating func appendByte(_ byte: UInt8) {
        precondition(count < base.count, "memcached command larger than its reservation")
        base[count] = byte
        count += 1
    }

    mutating func appendDecimal(_ value: Int64) {
        if value < 0 {
            appendByte(UInt8(ascii: "-"))
            appendDecimal(UInt64(bitPattern: 0 &- value))
        } else {
            appendDecimal(UInt64(value))
        }
    }

    mutating func appendDecimal(_ value: UInt64) {
        if value < 10 {
            appendByte(UInt8(truncatingIfNeeded: value) &+ 48)
            return
        }
        let digits = Self.decimalDigits(value)
        precondition(digits <= base.count - count, "memcached command larger than its reservation")
        // Two digits a division, from the end (values here are lengths, TTLs, opaques and CAS
        // uniques: up to 20 digits).
        var rest = value
        var index = count + digits
        let pairs = Self.digitPairs.utf8Start
        while rest >= 100 {
            let pair = Int(truncatingIfNeeded: rest % 100) &* 2  // within the 200 bytes
            rest /= 100
            index -= 2
            base[index] = pairs[pair]
            base[index + 1] = pairs[pair + 1]
        }
        if rest >= 10 {
            let pair = Int(truncatingIfNeeded: rest) &* 2
            index -= 2
            base[index] = pairs[pair]
            base[index + 1] = pairs[pair + 1]
        } else {
            index -= 1
            base[index] = UInt8(truncatingIfNeeded: rest) &+ 48
        }
        count += digits
    }

    /// How many decimal digits `value` has (1 to 20).
    @inline(__always)
    static func decimalDigits(_ value: UInt64) -> Int {
        var digits = 1
        var threshold: UInt64 = 10
        while digits < 20, value >= threshold {
            digits += 1
            threshold &*= 10
        }
        return digits
    }

    /// "00", "01", ... "99": the two ASCII digits of every number below 100 (a literal in the
    /// binary: no lazy global, no array).
    private static var digitPairs: StaticString {
        "00010203040506070809101112131415161718192021222324252627282930313233343536373839404142434445464748495051525354555657585960616263646566676869707172737475767778798081828384858687888990919293949596979899"
    }

    /// ` [q] O<opaque>\r\n`, the tail of every meta command line we send.
    @inline(__always)
    mutating func appendOpaqueAndEnd(_ opaque: UInt32, quiet: Bool) {
        append(quiet ? " q O" : " O")
        appendDecimal(UInt64(opaque))
        append("\r\n")
    }
}

extension ByteBuffer {
    /// Writes one command through a ``CommandLineWriter`` over `reserving` bytes of this buffer's
    /// writable memory: one capacity check and one writer-index move for the whole command.
    @inline(__always)
    mutating func writeLine(reserving capacity: Int, _ body: (inout CommandLineWriter) -> Void) {
        writeWithUnsafeMutableBytes(minimumWritableBytes: capacity) { memory in
            // Only the reservation, not all the writable memory (often much more): a command that
            // outgrows what was reserved for it traps in tests, whatever the buffer's capacity.
            var writer = CommandLineWriter(UnsafeMutableRawBufferPointer(rebasing: memory[..<capacity]))
            body(&writer)
            return writer.count
        }
    }

    /// Writes a decimal number without going through `String`: the same writer as the meta
    /// commands' (`CommandLineWriter.appendDecimal`), for the text commands and the
    /// session codec.
    @inline(__always)
    package mutating func writeDecimal(_ value: Int64) {
        writeLine(reserving: 21) { $0.appendDecimal(value) }
    }

    @inline(__always)
    package mutating func writeDecimal(_ value: UInt64) {
        writeLine(reserving: 20) { $0.appendDecimal(value) }
    }
}

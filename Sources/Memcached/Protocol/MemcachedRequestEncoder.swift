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
        _ request: MemcachedRequest, opaque: UInt32, into buffer: inout ByteBuffer,
        now: @autoclosure () -> Int64 = MemcachedTTL.currentUnixTime()
    ) -> ReplyExpectation {
        switch mode {
        case .meta: return encodeMeta(request, opaque: opaque, into: &buffer, now: now())
        case .text: return encodeText(request, into: &buffer, now: now())
        }
    }

    private func encodeMeta(
        _ request: MemcachedRequest, opaque: UInt32, into buffer: inout ByteBuffer, now: @autoclosure () -> Int64
    ) -> ReplyExpectation {
        switch request.command {
        case .get(let key, let wantValue, let touch):
            buffer.writeStaticString("mg ")
            buffer.writeString(key)
            buffer.writeStaticString(wantValue ? " v f c" : " f c")
            if request.returnsTimeToLive { buffer.writeStaticString(" t") }
            if let touch {
                buffer.writeStaticString(" T")
                buffer.writeDecimal(touch.wireValue(now: now()))
            }
            buffer.writeOpaqueAndEnd(opaque, quiet: false)
            return .metaGet

        case .store(let key, let value, let flags, let ttl, let mode, let cas):
            buffer.writeStaticString("ms ")
            buffer.writeString(key)
            buffer.writeStaticString(" ")
            buffer.writeDecimal(Int64(value.readableBytes))
            buffer.writeStaticString(" c")
            if flags != 0 {
                buffer.writeStaticString(" F")
                buffer.writeDecimal(UInt64(flags))
            }
            let wire = ttl.wireValue(now: now())
            if wire != 0 {
                buffer.writeStaticString(" T")
                buffer.writeDecimal(wire)
            }
            if let cas {
                buffer.writeStaticString(" C")
                buffer.writeDecimal(cas)
            }
            switch mode {
            case .set: break
            case .add: buffer.writeStaticString(" ME")
            case .replace: buffer.writeStaticString(" MR")
            case .append: buffer.writeStaticString(" MA")
            case .prepend: buffer.writeStaticString(" MP")
            }
            buffer.writeOpaqueAndEnd(opaque, quiet: request.quiet)
            var value = value
            buffer.writeBuffer(&value)
            buffer.writeStaticString("\r\n")
            return .metaStore

        case .delete(let key, let cas):
            buffer.writeStaticString("md ")
            buffer.writeString(key)
            if let cas {
                buffer.writeStaticString(" C")
                buffer.writeDecimal(cas)
            }
            buffer.writeOpaqueAndEnd(opaque, quiet: request.quiet)
            return .metaDelete

        case .touch(let key, let ttl):
            // memcached has no meta touch: a get without `v` that sets T is one.
            buffer.writeStaticString("mg ")
            buffer.writeString(key)
            buffer.writeStaticString(" T")
            buffer.writeDecimal(ttl.wireValue(now: now()))
            buffer.writeOpaqueAndEnd(opaque, quiet: false)
            return .metaTouch

        case .arithmetic(let key, let delta, let increment, let initial, let ttl):
            buffer.writeStaticString("ma ")
            buffer.writeString(key)
            buffer.writeStaticString(increment ? " v D" : " v MD D")
            buffer.writeDecimal(delta)
            if let initial {
                // Autovivify: a miss creates the counter with J<initial> and TTL N<ttl>.
                buffer.writeStaticString(" N")
                buffer.writeDecimal(ttl.wireValue(now: now()))
                buffer.writeStaticString(" J")
                buffer.writeDecimal(initial)
            }
            buffer.writeOpaqueAndEnd(opaque, quiet: false)
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

extension ByteBuffer {
    /// Writes ` [q] O<opaque>\r\n`, the tail of every meta command line we send.
    @inline(__always)
    mutating func writeOpaqueAndEnd(_ opaque: UInt32, quiet: Bool) {
        writeStaticString(quiet ? " q O" : " O")
        writeDecimal(UInt64(opaque))
        writeStaticString("\r\n")
    }

    /// Writes a decimal number without going through `String` (this runs for every request).
    @inline(__always)
    mutating func writeDecimal(_ value: Int64) {
        if value < 0 {
            writeInteger(UInt8(ascii: "-"))
            writeDecimal(UInt64(bitPattern: 0 &- value))
        } else {
            writeDecimal(UInt64(value))
        }
    }

    @inline(__always)
    mutating func writeDecimal(_ value: UInt64) {
        if value < 10 {
            writeInteger(UInt8(truncatingIfNeeded: value) &+ 48)
            return
        }
        // UInt64.max has 20 digits: fill a stack buffer from the end, then copy once.
        withUnsafeTemporaryAllocation(of: UInt8.self, capacity: 20) { digits in
            var index = 20
            var rest = value
            while rest > 0 {
                index -= 1
                digits[index] = UInt8(truncatingIfNeeded: rest % 10) &+ 48
                rest /= 10
            }
            writeBytes(UnsafeRawBufferPointer(rebasing: UnsafeMutableRawBufferPointer(digits)[index..<20]))
        }
    }
}

import NIOCore

/// Decodes memcached replies. Anything that is not a well-formed reply is a ``MemcachedError`` with
/// code ``MemcachedError/Code/protocolError``: the caller closes the connection, since framing is lost.
struct MemcachedReplyDecoder: NIOSingleStepByteToMessageDecoder {
    typealias InboundOut = MemcachedReply

    /// The longest reply line we accept (memcached's own lines are far shorter; a longer one is garbage).
    static let maximumLineLength = 8192

    /// The largest data block we accept; a larger size in a reply line is garbage, not a reason to
    /// buffer unbounded memory.
    let maximumValueSize: Int

    init(maximumValueSize: Int = 64 * 1024 * 1024) {
        self.maximumValueSize = maximumValueSize
    }

    mutating func decode(buffer: inout ByteBuffer) throws -> MemcachedReply? {
        let newline: Int? = buffer.withUnsafeReadableBytes { bytes in
            let limit = min(bytes.count, Self.maximumLineLength + 2)
            var index = 0
            while index < limit {
                if bytes[index] == UInt8(ascii: "\n") { return index }
                index += 1
            }
            return nil
        }
        guard let newline else {
            if buffer.readableBytes > Self.maximumLineLength + 1 {
                throw MemcachedError.protocolError("reply line longer than \(Self.maximumLineLength) bytes")
            }
            return nil
        }
        guard newline >= 1, buffer.getInteger(at: buffer.readerIndex + newline - 1, as: UInt8.self) == UInt8(ascii: "\r")
        else {
            throw MemcachedError.protocolError("reply line not terminated by CRLF")
        }
        let lineLength = newline - 1
        var reply = try buffer.withUnsafeReadableBytes { bytes throws(MemcachedError) in
            try Self.parseLine(UnsafeRawBufferPointer(rebasing: bytes[0..<lineLength]))
        }
        let dataSize: Int
        switch reply.status {
        case .metaValue, .textValue:
            dataSize = Int(reply.number ?? 0)
            reply.number = nil
        default:
            buffer.moveReaderIndex(forwardBy: newline + 1)
            return reply
        }
        if dataSize > maximumValueSize {
            throw MemcachedError.protocolError("reply announces \(dataSize) bytes, more than the \(maximumValueSize) accepted")
        }
        let total = newline + 1 + dataSize + 2
        guard buffer.readableBytes >= total else { return nil }
        let dataEnd = buffer.readerIndex + newline + 1 + dataSize
        guard buffer.getInteger(at: dataEnd, as: UInt8.self) == UInt8(ascii: "\r"),
            buffer.getInteger(at: dataEnd + 1, as: UInt8.self) == UInt8(ascii: "\n")
        else {
            throw MemcachedError.protocolError("data block not terminated by CRLF")
        }
        buffer.moveReaderIndex(forwardBy: newline + 1)
        reply.value = buffer.readSlice(length: dataSize)
        buffer.moveReaderIndex(forwardBy: 2)
        return reply
    }

    mutating func decodeLast(buffer: inout ByteBuffer, seenEOF: Bool) throws -> MemcachedReply? {
        try decode(buffer: &buffer)
    }

    // MARK: - line parsing

    /// Parses a reply line (without CRLF). For `VA` and `VALUE` the data size is returned in `number`.
    static func parseLine(_ line: UnsafeRawBufferPointer) throws(MemcachedError) -> MemcachedReply {
        var tokens = Tokenizer(line)
        guard let first = tokens.next() else {
            throw MemcachedError.protocolError("empty reply line")
        }
        if first.count == 2 {
            let a = first[0]
            let b = first[1]
            var status: MemcachedReply.Status?
            switch (a, b) {
            case (UInt8(ascii: "V"), UInt8(ascii: "A")): status = .metaValue
            case (UInt8(ascii: "H"), UInt8(ascii: "D")): status = .metaHeader
            case (UInt8(ascii: "E"), UInt8(ascii: "N")): status = .metaMiss
            case (UInt8(ascii: "N"), UInt8(ascii: "F")): status = .metaNotFound
            case (UInt8(ascii: "N"), UInt8(ascii: "S")): status = .metaNotStored
            case (UInt8(ascii: "E"), UInt8(ascii: "X")): status = .metaExists
            case (UInt8(ascii: "M"), UInt8(ascii: "N")): status = .metaNoop
            default: status = nil
            }
            if let status {
                var reply = MemcachedReply(status)
                if status == .metaValue {
                    guard let size = tokens.next(), let parsed = parseUInt64(size), parsed <= UInt64(Int.max) else {
                        throw MemcachedError.protocolError("VA reply without a valid size")
                    }
                    reply.number = parsed
                }
                while let flag = tokens.next() {
                    try parseMetaFlag(flag, into: &reply)
                }
                return reply
            }
        }
        let word = String(decoding: first, as: UTF8.self)
        switch word {
        case "VALUE":
            guard let key = tokens.next(), let flags = tokens.next(), let size = tokens.next(),
                let parsedFlags = parseUInt64(flags), parsedFlags <= UInt64(UInt32.max),
                let parsedSize = parseUInt64(size), parsedSize <= UInt64(Int.max)
            else {
                throw MemcachedError.protocolError("malformed VALUE line")
            }
            var reply = MemcachedReply(.textValue)
            reply.key = String(decoding: key, as: UTF8.self)
            reply.flags = UInt32(parsedFlags)
            reply.number = parsedSize
            if let cas = tokens.next() {
                guard let parsed = parseUInt64(cas) else { throw MemcachedError.protocolError("malformed CAS in VALUE line") }
                reply.cas = parsed
            }
            if tokens.next() != nil { throw MemcachedError.protocolError("malformed VALUE line") }
            return reply
        case "END": return MemcachedReply(.end)
        case "STORED": return MemcachedReply(.stored)
        case "NOT_STORED": return MemcachedReply(.notStored)
        case "EXISTS": return MemcachedReply(.exists)
        case "NOT_FOUND": return MemcachedReply(.notFound)
        case "DELETED": return MemcachedReply(.deleted)
        case "TOUCHED": return MemcachedReply(.touched)
        case "OK": return MemcachedReply(.ok)
        case "ERROR":
            var reply = MemcachedReply(.error)
            reply.text = tokens.rest().map { String(decoding: $0, as: UTF8.self) } ?? "ERROR"
            return reply
        case "CLIENT_ERROR":
            var reply = MemcachedReply(.clientError)
            reply.text = tokens.rest().map { String(decoding: $0, as: UTF8.self) } ?? ""
            return reply
        case "SERVER_ERROR":
            var reply = MemcachedReply(.serverError)
            reply.text = tokens.rest().map { String(decoding: $0, as: UTF8.self) } ?? ""
            return reply
        case "VERSION":
            var reply = MemcachedReply(.version)
            reply.text = tokens.rest().map { String(decoding: $0, as: UTF8.self) } ?? ""
            return reply
        case "STAT":
            guard let name = tokens.next() else { throw MemcachedError.protocolError("STAT line without a name") }
            var reply = MemcachedReply(.stat)
            reply.text = String(decoding: name, as: UTF8.self)
            reply.statValue = tokens.rest().map { String(decoding: $0, as: UTF8.self) } ?? ""
            return reply
        default:
            if let number = parseUInt64(first), tokens.next() == nil {
                var reply = MemcachedReply(.number)
                reply.number = number
                return reply
            }
            throw MemcachedError.protocolError("unrecognised reply line starting with \(printable(first))")
        }
    }

    private static func parseMetaFlag(_ flag: UnsafeRawBufferPointer, into reply: inout MemcachedReply) throws(MemcachedError) {
        let value = UnsafeRawBufferPointer(rebasing: flag[1...])
        switch flag[0] {
        case UInt8(ascii: "O"):
            guard let opaque = parseUInt64(value), opaque <= UInt64(UInt32.max) else {
                throw MemcachedError.protocolError("reply with a foreign opaque token \(printable(flag))")
            }
            reply.opaque = UInt32(opaque)
        case UInt8(ascii: "c"):
            guard let cas = parseUInt64(value) else { throw MemcachedError.protocolError("malformed CAS flag") }
            reply.cas = cas
        case UInt8(ascii: "f"):
            guard let flags = parseUInt64(value), flags <= UInt64(UInt32.max) else {
                throw MemcachedError.protocolError("malformed client flags")
            }
            reply.flags = UInt32(flags)
        case UInt8(ascii: "t"):
            if value.count == 2, value[0] == UInt8(ascii: "-"), value[1] == UInt8(ascii: "1") {
                reply.timeToLive = -1
            } else {
                guard let ttl = parseUInt64(value), ttl <= UInt64(Int32.max) else {
                    throw MemcachedError.protocolError("malformed TTL flag")
                }
                reply.timeToLive = Int(ttl)
            }
        default:
            // s, k, b, h, l, W, X, Z...: information we did not ask for or do not use.
            break
        }
    }

    /// A decimal UInt64, or nil for anything else (empty, non-digits, overflow).
    static func parseUInt64(_ bytes: UnsafeRawBufferPointer) -> UInt64? {
        if bytes.isEmpty || bytes.count > 20 { return nil }
        var result: UInt64 = 0
        for byte in bytes {
            guard byte >= UInt8(ascii: "0"), byte <= UInt8(ascii: "9") else { return nil }
            let (times10, overflow1) = result.multipliedReportingOverflow(by: 10)
            let (sum, overflow2) = times10.addingReportingOverflow(UInt64(byte - UInt8(ascii: "0")))
            if overflow1 || overflow2 { return nil }
            result = sum
        }
        return result
    }

    private static func printable(_ bytes: UnsafeRawBufferPointer) -> String {
        let shown = bytes.prefix(32).map { byte -> String in
            (0x21...0x7E).contains(byte) ? String(UnicodeScalar(byte)) : "\\x" + String(byte, radix: 16)
        }
        return "'" + shown.joined() + (bytes.count > 32 ? "...'" : "'")
    }
}

/// Splits a reply line on single spaces without allocating.
private struct Tokenizer {
    private let line: UnsafeRawBufferPointer
    private var position = 0

    init(_ line: UnsafeRawBufferPointer) { self.line = line }

    mutating func next() -> UnsafeRawBufferPointer? {
        while position < line.count, line[position] == UInt8(ascii: " ") { position += 1 }
        guard position < line.count else { return nil }
        let start = position
        while position < line.count, line[position] != UInt8(ascii: " ") { position += 1 }
        return UnsafeRawBufferPointer(rebasing: line[start..<position])
    }

    /// Everything after the current token (for messages and version strings that contain spaces).
    mutating func rest() -> UnsafeRawBufferPointer? {
        while position < line.count, line[position] == UInt8(ascii: " ") { position += 1 }
        guard position < line.count else { return nil }
        defer { position = line.count }
        return UnsafeRawBufferPointer(rebasing: line[position...])
    }
}

import Foundation
import Memcached
import NIOCore

/// Why bytes could not be turned into a session or a value (or back).
public struct SessionCodecError: Error, Sendable, Hashable, CustomStringConvertible {
    /// A human-readable reason; never contains attribute values.
    public var reason: String

    public init(_ reason: String) {
        self.reason = reason
    }

    public var description: String { "SessionCodecError: \(reason)" }
}

/// Turns sessions and attribute values into bytes and back: plug in your own through
/// ``SessionManager/Configuration/codec``.
///
/// A codec must never instantiate a type named by the bytes it reads (the caller says which type
/// it expects), and must reject bytes it did not write with a ``SessionCodecError`` (never a
/// crash): the manager then treats the session as missing, deletes the key and counts it.
public protocol SessionCodec: Sendable {
    /// Appends the encoded session to `buffer`.
    func encodeSession(_ record: SessionRecord, into buffer: inout ByteBuffer) throws(SessionCodecError)
    /// Decodes a session written by ``encodeSession(_:into:)``.
    func decodeSession(from buffer: ByteBuffer) throws(SessionCodecError) -> SessionRecord
    /// Encodes one attribute value.
    func encodeValue<Value: Encodable>(_ value: Value) throws(SessionCodecError) -> ByteBuffer
    /// Decodes one attribute value as `type`.
    func decodeValue<Value: Decodable>(_ type: Value.Type, from bytes: ByteBuffer) throws(SessionCodecError) -> Value
}

/// The default codec: a compact, versioned binary envelope holding the metadata and each
/// attribute's JSON encoding.
///
/// Envelope (big-endian): `"MS"`, format version `1`, flags `0`; created-at and last-accessed-at
/// (Int64 ms since 1970); idle and absolute timeouts (UInt32 seconds, 0 = none); version (UInt64);
/// attribute count (UInt32); per attribute, name length (UInt16), UTF-8 name, value length (UInt32),
/// value bytes. Every length is checked against what remains: truncated or foreign bytes are an
/// error, never a crash or an over-read.
///
/// Values are JSON. `Int`, `String` and `Bool` take a fast path that writes and reads the same
/// JSON without `JSONEncoder`/`JSONDecoder` (the session-counter workload's hot path); everything
/// else goes through Foundation's coders.
public struct BinarySessionCodec: SessionCodec {
    static let magic: (UInt8, UInt8) = (0x4D, 0x53)
    static let formatVersion: UInt8 = 1
    /// The largest attribute count and name length accepted when decoding.
    static let maximumAttributes = 65_535
    /// 10000-01-01T00:00:00Z in milliseconds since 1970.
    static let latestTimestamp: Int64 = 253_402_300_800_000

    public init() {}

    public func encodeSession(_ record: SessionRecord, into buffer: inout ByteBuffer) throws(SessionCodecError) {
        let metadata = record.metadata
        guard record.attributes.count <= Self.maximumAttributes else {
            throw SessionCodecError("more than \(Self.maximumAttributes) attributes")
        }
        buffer.writeInteger(Self.magic.0)
        buffer.writeInteger(Self.magic.1)
        buffer.writeInteger(Self.formatVersion)
        buffer.writeInteger(UInt8(0))
        buffer.writeInteger(metadata.createdAt)
        buffer.writeInteger(metadata.lastAccessedAt)
        buffer.writeInteger(UInt32(clamping: metadata.idleTimeoutSeconds))
        buffer.writeInteger(UInt32(clamping: metadata.absoluteTimeoutSeconds))
        buffer.writeInteger(metadata.version)
        buffer.writeInteger(UInt32(record.attributes.count))
        // Sorted so that equal sessions encode to equal bytes.
        for (name, value) in record.attributes.sorted(by: { $0.key < $1.key }) {
            let nameLength = name.utf8.count
            guard nameLength <= Int(UInt16.max) else { throw SessionCodecError("an attribute name is longer than 65,535 bytes") }
            guard value.readableBytes <= Int(UInt32.max) else { throw SessionCodecError("an attribute value is too large") }
            buffer.writeInteger(UInt16(nameLength))
            buffer.writeString(name)
            buffer.writeInteger(UInt32(value.readableBytes))
            var value = value
            buffer.writeBuffer(&value)
        }
    }

    public func decodeSession(from buffer: ByteBuffer) throws(SessionCodecError) -> SessionRecord {
        var buffer = buffer
        guard let m0 = buffer.readInteger(as: UInt8.self), let m1 = buffer.readInteger(as: UInt8.self),
            m0 == Self.magic.0, m1 == Self.magic.1
        else { throw SessionCodecError("not a session envelope (bad magic)") }
        guard let format = buffer.readInteger(as: UInt8.self), format == Self.formatVersion else {
            throw SessionCodecError("unknown envelope format version")
        }
        guard buffer.readInteger(as: UInt8.self) != nil,
            let created = buffer.readInteger(as: Int64.self),
            let accessed = buffer.readInteger(as: Int64.self),
            let idle = buffer.readInteger(as: UInt32.self),
            let absolute = buffer.readInteger(as: UInt32.self),
            let version = buffer.readInteger(as: UInt64.self),
            let count = buffer.readInteger(as: UInt32.self)
        else { throw SessionCodecError("truncated envelope header") }
        // Each attribute takes at least 6 bytes: a count larger than that allows is a lie.
        guard Int(count) <= Self.maximumAttributes, Int(count) * 6 <= buffer.readableBytes else {
            throw SessionCodecError("attribute count exceeds the envelope")
        }
        var attributes: [String: ByteBuffer] = [:]
        attributes.reserveCapacity(Int(count))
        for _ in 0..<count {
            guard let nameLength = buffer.readInteger(as: UInt16.self),
                let nameBytes = buffer.readSlice(length: Int(nameLength)),
                let valueLength = buffer.readInteger(as: UInt32.self),
                Int(valueLength) <= buffer.readableBytes,
                let value = buffer.readSlice(length: Int(valueLength))
            else { throw SessionCodecError("truncated attribute") }
            guard let name = Self.attributeName(nameBytes) else {
                throw SessionCodecError("attribute name is not UTF-8")
            }
            guard attributes.updateValue(value, forKey: name) == nil else {
                throw SessionCodecError("attribute name appears twice")
            }
        }
        guard buffer.readableBytes == 0 else { throw SessionCodecError("trailing bytes after the envelope") }
        guard created >= 0, accessed >= 0 else { throw SessionCodecError("negative timestamps") }
        // Milliseconds since 1970 before the year 10000: anything later is garbage, and would
        // overflow expiry arithmetic.
        guard created < Self.latestTimestamp, accessed < Self.latestTimestamp else {
            throw SessionCodecError("timestamps past the year 10000")
        }
        return SessionRecord(
            metadata: SessionMetadata(
                createdAt: created, lastAccessedAt: accessed, idleTimeoutSeconds: Int64(idle),
                absoluteTimeoutSeconds: Int64(absolute), version: version),
            attributes: attributes)
    }

    /// An attribute name's bytes as a string, nil if they are not UTF-8. ASCII names (the usual
    /// ones) are decoded without the generic validation `String(validating:as:)` runs (about 1,000
    /// instructions a name; callgrind): ASCII bytes are always valid UTF-8.
    static func attributeName(_ bytes: ByteBuffer) -> String? {
        bytes.withUnsafeReadableBytes { raw in
            if raw.allSatisfy({ $0 < 0x80 }) { return String(decoding: raw, as: UTF8.self) }
            return String(validating: raw, as: UTF8.self)
        }
    }

    public func encodeValue<Value: Encodable>(_ value: Value) throws(SessionCodecError) -> ByteBuffer {
        try JSONValueCoding.encode(value)
    }

    public func decodeValue<Value: Decodable>(_ type: Value.Type, from bytes: ByteBuffer) throws(SessionCodecError) -> Value {
        try JSONValueCoding.decode(type, from: bytes)
    }
}

/// JSON for attribute values, with allocation-light fast paths for the common scalar types.
public enum JSONValueCoding {
    public static func encode<Value: Encodable>(_ value: Value) throws(SessionCodecError) -> ByteBuffer {
        if let int = value as? Int {
            var buffer = ByteBuffer()
            buffer.reserveCapacity(21)  // Int.min: 20 digits and a sign
            buffer.writeDecimal(Int64(int))  // the memcached encoder's writer
            return buffer
        }
        if let string = value as? String {
            return encodeString(string)
        }
        if let bool = value as? Bool {
            return ByteBuffer(string: bool ? "true" : "false")
        }
        do {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.sortedKeys, .withoutEscapingSlashes]
            return ByteBuffer(bytes: try encoder.encode(value))
        } catch {
            throw SessionCodecError("JSON encoding failed: \(error)")
        }
    }

    public static func decode<Value: Decodable>(_ type: Value.Type, from bytes: ByteBuffer) throws(SessionCodecError) -> Value {
        if type == Int.self, let int = parseDecimal(bytes) {
            return int as! Value  // the type check above makes the cast certain
        }
        if type == String.self, let string = parsePlainString(bytes) {
            return string as! Value  // as above
        }
        do {
            return try JSONDecoder().decode(type, from: Data(bytes.readableBytesView))
        } catch {
            throw SessionCodecError("JSON decoding as \(Value.self) failed")
        }
    }

    /// A plain JSON integer (`-?[0-9]+`, no leading `+`, fits in Int).
    static func parseDecimal(_ bytes: ByteBuffer) -> Int? {
        bytes.withUnsafeReadableBytes { raw -> Int? in
            guard !raw.isEmpty, raw.count <= 20 else { return nil }
            var index = 0
            let negative = raw[0] == UInt8(ascii: "-")
            if negative { index = 1 }
            guard index < raw.count else { return nil }
            var value: Int = 0
            while index < raw.count {
                let byte = raw[index]
                guard byte >= UInt8(ascii: "0"), byte <= UInt8(ascii: "9") else { return nil }
                let digit = Int(byte - UInt8(ascii: "0"))
                let (times10, o1) = value.multipliedReportingOverflow(by: 10)
                let (next, o2) = negative ? times10.subtractingReportingOverflow(digit) : times10.addingReportingOverflow(digit)
                if o1 || o2 { return nil }
                value = next
                index += 1
            }
            return value
        }
    }

    static func encodeString(_ string: String) -> ByteBuffer {
        var buffer = ByteBuffer()
        buffer.reserveCapacity(string.utf8.count + 2)
        buffer.writeInteger(UInt8(ascii: "\""))
        var needsEscaping = false
        for byte in string.utf8 where byte < 0x20 || byte == UInt8(ascii: "\"") || byte == UInt8(ascii: "\\") {
            needsEscaping = true
            break
        }
        if !needsEscaping {
            buffer.writeString(string)
        } else {
            for byte in string.utf8 {
                switch byte {
                case UInt8(ascii: "\""): buffer.writeStaticString("\\\"")
                case UInt8(ascii: "\\"): buffer.writeStaticString("\\\\")
                case UInt8(ascii: "\n"): buffer.writeStaticString("\\n")
                case UInt8(ascii: "\r"): buffer.writeStaticString("\\r")
                case UInt8(ascii: "\t"): buffer.writeStaticString("\\t")
                case 0..<0x20:
                    buffer.writeStaticString("\\u00")
                    let hex = MemcachedSessionID.Token.hexDigits
                    buffer.writeInteger(hex[Int(byte >> 4)])
                    buffer.writeInteger(hex[Int(byte & 0xF)])
                default:
                    buffer.writeInteger(byte)
                }
            }
        }
        buffer.writeInteger(UInt8(ascii: "\""))
        return buffer
    }

    /// A JSON string without escapes: its contents; nil when it has escapes (the slow path decodes it).
    static func parsePlainString(_ bytes: ByteBuffer) -> String? {
        let count = bytes.readableBytes
        guard count >= 2, bytes.getInteger(at: bytes.readerIndex, as: UInt8.self) == UInt8(ascii: "\""),
            bytes.getInteger(at: bytes.readerIndex + count - 1, as: UInt8.self) == UInt8(ascii: "\"")
        else { return nil }
        let inner = bytes.readableBytesView.dropFirst().dropLast()
        for byte in inner where byte == UInt8(ascii: "\\") || byte < 0x20 || byte == UInt8(ascii: "\"") {
            return nil
        }
        return String(validating: inner, as: UTF8.self)
    }
}

import NIOCore

/// How keys given to the client become keys on the wire.
public struct MemcachedKeyEncoding: Sendable, Hashable {
    fileprivate enum Base: Hashable, Sendable { case plain, base64 }
    fileprivate let base: Base

    /// Keys are sent as they are, after validation: 1 to 250 bytes of UTF-8, no space, no control
    /// character (memcached's rule). Anything else is refused with ``MemcachedError/Code/invalidKey``
    /// before a byte is sent.
    public static let plain = MemcachedKeyEncoding(base: .plain)
    /// Every key is base64-encoded on the client, so arbitrary bytes (spaces, CR/LF, NUL) are allowed.
    /// The encoded key must still fit memcached's 250 bytes: at most 187 bytes before encoding.
    /// The stored key is the base64 text in both protocol modes, so text and meta clients agree.
    public static let base64 = MemcachedKeyEncoding(base: .base64)

    var isBase64: Bool { base == .base64 }
}

enum MemcachedKey {
    /// memcached's limit on a key's length (`KEY_MAX_LENGTH`).
    static let maximumLength = 250

    /// Checks that `key` may be put on the wire as it is. Memcached splits command lines on spaces and
    /// ends them at `\n`, so a key with a space, CR, LF or any other control byte would let the caller
    /// inject commands (or make a storage command's *value* run as a command).
    static func validate(_ key: String) throws(MemcachedError) {
        // A native string's bytes are scanned in place (one pass over a buffer, no iterator state);
        // a bridged one, if ever, byte by byte.
        let offender: Int? =
            key.utf8.withContiguousStorageIfAvailable { bytes in firstForbiddenByte(in: UnsafeRawBufferPointer(bytes)) }
            ?? key.utf8.enumerated().first { isForbidden($0.element) }?.offset
        if let offender {
            let byte = Array(key.utf8)[offender]
            throw MemcachedError.invalidKey(
                "key contains a space or control character (byte 0x\(String(byte, radix: 16))) at offset \(offender)")
        }
        let count = key.utf8.count
        if count == 0 {
            throw MemcachedError.invalidKey("key is empty")
        }
        if count > maximumLength {
            throw MemcachedError.invalidKey("key is \(count) bytes, memcached allows at most \(maximumLength)")
        }
    }

    @inline(__always)
    static func isForbidden(_ byte: UInt8) -> Bool { byte <= 0x20 || byte == 0x7F }

    /// The offset of the first space, control byte or DEL, eight bytes at a time: every key of every
    /// request is scanned, and a byte-by-byte loop cost about nine instructions a byte.
    static func firstForbiddenByte(in bytes: UnsafeRawBufferPointer) -> Int? {
        let ones: UInt64 = 0x0101_0101_0101_0101
        let highs: UInt64 = 0x8080_8080_8080_8080
        var index = 0
        while index &+ 8 <= bytes.count {
            let word = bytes.loadUnaligned(fromByteOffset: index, as: UInt64.self)
            // A byte below 0x21 (exact for the question "is there one", for any byte values), or
            // one equal to 0x7F (a zero byte after the XOR).
            let below = (word &- ones &* 0x21) & ~word & highs
            let deleted = word ^ (ones &* 0x7F)
            let del = (deleted &- ones) & ~deleted & highs
            if below | del != 0 { break }  // the byte loop below finds which
            index &+= 8
        }
        while index < bytes.count {
            if isForbidden(bytes[index]) { return index }
            index &+= 1
        }
        return nil
    }

    /// The key as it goes on the wire under `encoding`, validated.
    static func wireKey(_ key: String, encoding: MemcachedKeyEncoding) throws(MemcachedError) -> String {
        if encoding.isBase64 {
            let bytes = Array(key.utf8)
            if bytes.isEmpty { throw MemcachedError.invalidKey("key is empty") }
            let encoded = Base64.encode(bytes)
            if encoded.utf8.count > maximumLength {
                throw MemcachedError.invalidKey(
                    "key is \(bytes.count) bytes, at most 187 fit in 250 bytes of base64")
            }
            return encoded
        }
        try validate(key)
        return key
    }
}

/// Standard base64 (RFC 4648, with padding). Small and local so that the client needs no Foundation.
enum Base64 {
    private static let alphabet = Array("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/".utf8)

    static func encode(_ bytes: [UInt8]) -> String {
        var out = [UInt8]()
        out.reserveCapacity((bytes.count + 2) / 3 * 4)
        var index = 0
        while index + 2 < bytes.count {
            let n = UInt32(bytes[index]) << 16 | UInt32(bytes[index + 1]) << 8 | UInt32(bytes[index + 2])
            out.append(alphabet[Int(n >> 18 & 63)])
            out.append(alphabet[Int(n >> 12 & 63)])
            out.append(alphabet[Int(n >> 6 & 63)])
            out.append(alphabet[Int(n & 63)])
            index += 3
        }
        let rest = bytes.count - index
        if rest == 1 {
            let n = UInt32(bytes[index]) << 16
            out.append(alphabet[Int(n >> 18 & 63)])
            out.append(alphabet[Int(n >> 12 & 63)])
            out.append(UInt8(ascii: "="))
            out.append(UInt8(ascii: "="))
        } else if rest == 2 {
            let n = UInt32(bytes[index]) << 16 | UInt32(bytes[index + 1]) << 8
            out.append(alphabet[Int(n >> 18 & 63)])
            out.append(alphabet[Int(n >> 12 & 63)])
            out.append(alphabet[Int(n >> 6 & 63)])
            out.append(UInt8(ascii: "="))
        }
        return String(decoding: out, as: UTF8.self)
    }
}

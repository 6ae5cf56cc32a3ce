import NIOCore

/// Entry points for fuzzing (issue 8 §5): the libFuzzer targets in `Fuzz/` call them with
/// arbitrary bytes, and an ordinary test replays the committed corpus through them. Each returns
/// for any input; a broken round trip traps, so that the fuzzer reports it.
@_spi(Fuzzing)
public enum SessionsFuzzing {
    static let cookie = try! SessionCookie()

    /// `bytes` as a request's `Cookie` header, then the session id in it, then the id's text
    /// parsed again (it must name the same session).
    public static func cookieHeader(_ bytes: UnsafeRawBufferPointer) {
        let header = String(decoding: bytes, as: UTF8.self)
        let value = cookie.value(inCookieHeader: header)
        for text in [value.map(String.init), header].compactMap({ $0 }) {
            guard let id = MemcachedSessionID(parsing: text) else { continue }
            guard let again = MemcachedSessionID(parsing: id.description), again == id else {
                preconditionFailure("a parsed session id does not survive its own text")
            }
        }
    }

    /// `bytes` as a stored session envelope: decoded, and when it decodes, encoded and decoded
    /// again to the same record.
    public static func sessionEnvelope(_ bytes: UnsafeRawBufferPointer) {
        let codec = BinarySessionCodec()
        var buffer = ByteBuffer()
        buffer.writeBytes(bytes)
        guard let record = try? codec.decodeSession(from: buffer) else { return }
        var encoded = ByteBuffer()
        do {
            try codec.encodeSession(record, into: &encoded)
        } catch {
            // A record the decoder accepts must encode.
            preconditionFailure("a decoded session does not encode: \(error)")
        }
        guard let again = try? codec.decodeSession(from: encoded), again == record else {
            preconditionFailure("a decoded session does not survive its own encoding")
        }
    }
}

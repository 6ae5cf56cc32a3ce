import NIOCore

/// Entry points for fuzzing (issue 8 §5): the libFuzzer targets in `Fuzz/` call them with
/// arbitrary bytes, and an ordinary test replays the committed corpus through them. Each must
/// return for any input, neither trapping nor looping; errors are the expected outcome of garbage.
@_spi(Fuzzing)
public enum MemcachedFuzzing {
    /// Decodes `bytes` as a server's reply stream (split where the first byte says, so that
    /// partial reads are exercised) and feeds every reply to a connection state machine waiting
    /// for a mix of requests, the way a connection does.
    public static func replies(_ bytes: UnsafeRawBufferPointer) {
        guard let selector = bytes.first else { return }
        let data = UnsafeRawBufferPointer(rebasing: bytes.dropFirst())
        var machine = ConnectionStateMachine<Int>()
        let expectations: [ReplyExpectation] = [
            .metaGet, .metaStore, .metaDelete, .metaTouch, .metaArithmetic, .metaNoop, .textGet(key: "k"), .textStore,
            .textDelete, .textTouch, .textArithmetic, .textNoop, .version, .stats,
        ]
        let far = NIODeadline.now() + .hours(1)
        for index in 0..<16 {
            let expectation = expectations[(Int(selector) &+ index &* 7) % expectations.count]
            let quiet = expectation.carriesOpaque && (Int(selector) >> (index % 8)) & 1 == 1
            _ = machine.enqueue(
                id: UInt64(index), opaque: UInt32(index), expectation: expectation, quiet: quiet, deadline: far, context: index)
        }
        var decoder = MemcachedReplyDecoder(maximumValueSize: 1 << 16)
        var buffer = ByteBuffer()
        let chunk = max(1, Int(selector & 0x3F))
        var offset = 0
        var completions = 0
        while offset < data.count {
            let end = min(data.count, offset + chunk)
            buffer.writeBytes(UnsafeRawBufferPointer(rebasing: data[offset..<end]))
            offset = end
            while true {
                let reply: MemcachedReply?
                do {
                    reply = try decoder.decode(buffer: &buffer)
                } catch {
                    return  // the connection would close
                }
                guard let reply else { break }
                if machine.receive(reply, complete: { _, _ in completions += 1 }) == .close { return }
            }
            buffer.discardReadBytes()
        }
        _ = try? decoder.decodeLast(buffer: &buffer, seenEOF: true)
        machine.channelClosed(MemcachedError(code: .connectionClosed, message: "end of input"), complete: { _, _ in completions += 1 })
    }
}

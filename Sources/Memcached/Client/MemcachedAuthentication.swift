import NIOCore

extension MemcachedClient.Configuration {
    /// memcached's authentication of the text and meta protocols (`memcached -Y authfile`): the first
    /// command on every connection, reconnections included, is a `set` whose value is the user and
    /// the password; memcached answers `CLIENT_ERROR unauthenticated` to anything before it.
    ///
    /// Wrong credentials are an ``MemcachedError/Code/authenticationFailed`` error that marks the
    /// node down (reconnections back off), not a retry loop. The password is never logged, never in
    /// an error message or a description (``description`` and the mirror show it redacted). SASL,
    /// which needs the binary protocol, is not supported.
    public struct Authentication: Sendable, CustomStringConvertible, CustomReflectable {
        public var username: String
        public var password: String

        public init(username: String, password: String) {
            self.username = username
            self.password = password
        }

        public var description: String { "Authentication(username: \(username), password: <redacted>)" }
        public var customMirror: Mirror { Mirror(self, children: ["username": username, "password": "<redacted>"]) }

        func validate() throws(MemcachedError) {
            func invalid(_ message: String) -> MemcachedError { MemcachedError(code: .invalidConfiguration, message: message) }
            if username.isEmpty || username.utf8.contains(where: { $0 <= 0x20 || $0 == 0x7F || $0 == UInt8(ascii: ":") }) {
                throw invalid("authentication: the username must be non-empty, without spaces, colons or control characters")
            }
            // memcached's auth file ends a password at a space: one with spaces could never match.
            if password.isEmpty || password.utf8.contains(where: { $0 <= 0x20 || $0 == 0x7F }) {
                throw invalid("authentication: the password must be non-empty, without spaces or control characters")
            }
        }

        /// `set auth 0 0 <n>\r\n<username> <password>\r\n` (memcached ignores the key).
        func request(allocator: ByteBufferAllocator) -> ByteBuffer {
            let value = username + " " + password
            var buffer = allocator.buffer(capacity: value.utf8.count + 32)
            buffer.writeString("set auth 0 0 \(value.utf8.count)\r\n")
            buffer.writeString(value)
            buffer.writeString("\r\n")
            return buffer
        }
    }
}

/// Authenticates a new connection before anything else is sent on it: writes the credentials,
/// reads memcached's one-line answer, then leaves the pipeline. `done` succeeds on `STORED`, fails
/// with ``MemcachedError/Code/authenticationFailed`` otherwise (the channel is closed then).
final class AuthenticationHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer
    typealias OutboundOut = ByteBuffer

    let done: EventLoopPromise<Void>
    private let authentication: MemcachedClient.Configuration.Authentication
    private let target: String
    private var received = ByteBuffer()
    private var finished = false

    init(authentication: MemcachedClient.Configuration.Authentication, target: String, done: EventLoopPromise<Void>) {
        self.authentication = authentication
        self.target = target
        self.done = done
    }

    /// Sends the credentials (after the TLS handshake, when there is one).
    func start(context: ChannelHandlerContext) {
        context.writeAndFlush(wrapOutboundOut(authentication.request(allocator: context.channel.allocator)), promise: nil)
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !finished else { return context.fireChannelRead(data) }
        var bytes = unwrapInboundIn(data)
        received.writeBuffer(&bytes)
        guard let newline = received.readableBytesView.firstIndex(of: UInt8(ascii: "\n")) else {
            if received.readableBytes > 1024 { fail(context: context, "an answer longer than any memcached line") }
            return
        }
        let length = newline - received.readerIndex + 1
        var line = Substring(received.readString(length: length) ?? "")
        while let last = line.last, last == "\n" || last == "\r" || last == "\r\n" { line = line.dropLast() }
        guard line == "STORED" else {
            // memcached's own words (`CLIENT_ERROR authentication failure`), never the credentials.
            let answer = line.prefix(80).filter { $0.isASCII && !$0.isNewline }
            return fail(context: context, "the server refused the credentials (\(answer))")
        }
        finished = true
        // Nothing follows a lone `set`'s answer; whatever did is the next handler's to judge.
        if received.readableBytes > 0 { context.fireChannelRead(NIOAny(received)) }
        context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
        done.succeed(())
    }

    func channelInactive(context: ChannelHandlerContext) {
        if !finished { fail(context: context, "the server closed the connection") }
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if !finished { return fail(context: context, "\(error)") }
        context.fireErrorCaught(error)
    }

    func timedOut(channel: any Channel) {
        guard !finished else { return }
        finished = true
        done.fail(MemcachedError(code: .authenticationFailed, message: "authentication with \(target): no answer within the connect timeout"))
        channel.close(promise: nil)
    }

    private func fail(context: ChannelHandlerContext, _ reason: String) {
        guard !finished else { return }
        finished = true
        done.fail(MemcachedError(code: .authenticationFailed, message: "authentication with \(target) as \(authentication.username): \(reason)"))
        context.close(promise: nil)
    }
}

import NIOCore

/// Where a request's outcome goes.
enum RequestContext {
    /// An `async` caller suspended on a continuation.
    case continuation(UnsafeContinuation<Result<MemcachedResponse, MemcachedError>, Never>)
    /// A caller that does not wait (for example a quiet backup write); called on the event loop,
    /// while the connection's state machine is being updated: it must not submit to or close the
    /// connection synchronously (from a task it may).
    case callback(@Sendable (Result<MemcachedResponse, MemcachedError>) -> Void)
    /// One request of a batch sent in one go (get-many).
    case batch(BatchCollector, index: Int)

    func complete(_ result: Result<MemcachedResponse, MemcachedError>) {
        switch self {
        case .continuation(let continuation): continuation.resume(returning: result)
        case .callback(let callback): callback(result)
        case .batch(let collector, let index): collector.complete(index, result)
        }
    }
}

/// Collects the replies of a batch and resumes its caller once, when the last one is in.
/// Lives on the connection's event loop only.
final class BatchCollector {
    private var results: [Result<MemcachedResponse, MemcachedError>]
    private var remaining: Int
    private let continuation: UnsafeContinuation<[Result<MemcachedResponse, MemcachedError>], Never>

    init(count: Int, continuation: UnsafeContinuation<[Result<MemcachedResponse, MemcachedError>], Never>) {
        self.results = Array(repeating: .failure(.connectionClosed()), count: count)
        self.remaining = count
        self.continuation = continuation
        if count == 0 { continuation.resume(returning: []) }
    }

    func complete(_ index: Int, _ result: Result<MemcachedResponse, MemcachedError>) {
        results[index] = result
        remaining -= 1
        if remaining == 0 { continuation.resume(returning: results) }
    }
}

/// Performs what the ``ConnectionStateMachine`` decides: encodes requests into one outbound buffer,
/// flushes it once per event-loop tick (so requests issued together leave in one write), decodes
/// replies and feeds them to the state machine, and keeps a single timer for deadlines.
///
/// The decoder runs inside this handler (`NIOSingleStepByteToMessageProcessor`, as valkey-swift and
/// postgres-nio do), not in a `ByteToMessageHandler` ahead of it: a reply then goes straight to the
/// state machine, without a pipeline step and without being boxed into a `NIOAny` and cast back.
final class MemcachedChannelHandler: ChannelInboundHandler {
    typealias InboundIn = ByteBuffer
    typealias OutboundOut = ByteBuffer

    private var stateMachine = ConnectionStateMachine<RequestContext>()
    private let decoder: NIOSingleStepByteToMessageProcessor<MemcachedReplyDecoder>
    /// The bytes stopped making sense: whatever else arrives before the close is not read.
    private var decodingFailed = false
    private var context: ChannelHandlerContext?
    private var outbound: ByteBuffer
    private var flushScheduled = false
    /// A flush scheduled for requests that may wait for company (``MemcachedRequest/coalesces``).
    private var coalescedFlush: Scheduled<Void>?
    private let coalescingWindow: TimeAmount
    private var nextOpaque: UInt32 = 0
    private let encoder: MemcachedRequestEncoder
    private let stallGrace: TimeAmount
    private var timer: Scheduled<Void>?
    private var timerDeadline: NIODeadline?
    private var closePromise: EventLoopPromise<Void>?
    /// Over TLS: a write that carries a value ends with a no-op in a TLS record of its own (see
    /// ``flush()``).
    private let recordTrailer: Bool
    /// The outbound buffer holds a storage command (its value may be read past memcached's read
    /// buffer).
    private var outboundCarriesValue = false

    init(
        mode: MemcachedProtocolMode, stallGrace: TimeAmount, coalescingWindow: TimeAmount = .zero, recordTrailer: Bool = false,
        maximumValueSize: Int = 64 * 1024 * 1024
    ) {
        self.decoder = NIOSingleStepByteToMessageProcessor(MemcachedReplyDecoder(maximumValueSize: maximumValueSize))
        self.encoder = MemcachedRequestEncoder(mode: mode)
        self.stallGrace = stallGrace
        self.coalescingWindow = coalescingWindow
        self.recordTrailer = recordTrailer
        self.outbound = ByteBuffer()
    }

    // MARK: - requests (on the event loop)

    func submit(_ request: borrowing MemcachedRequest, id: UInt64, deadline: NIODeadline, context requestContext: RequestContext) {
        guard let context, stateMachine.canEnqueue else {
            requestContext.complete(.failure(stateMachine.state == .draining ? MemcachedError.shutdownError : .notSent))
            return
        }
        nextOpaque &+= 1
        let expectation = encoder.encode(request, opaque: nextOpaque, into: &outbound)
        if recordTrailer, case .store = request.command { outboundCarriesValue = true }
        _ = stateMachine.enqueue(
            id: id, opaque: nextOpaque, expectation: expectation, quiet: request.quiet, deadline: deadline,
            context: requestContext)
        armTimer(for: deadline)
        if flushScheduled { return }
        if request.coalesces, coalescingWindow > .zero {
            // It may wait for company; any request that cannot wait sends it along.
            if coalescedFlush == nil {
                coalescedFlush = context.eventLoop.assumeIsolated().scheduleTask(in: coalescingWindow) {
                    self.coalescedFlush = nil
                    self.flush()
                }
            }
            return
        }
        flushScheduled = true
        context.eventLoop.assumeIsolated().execute { self.flush() }
    }

    func cancel(id: UInt64) {
        stateMachine.cancel(id: id) { context, result in context.complete(result) }
    }

    /// Stops taking requests and closes once those in flight are answered (or have timed out).
    func closeGracefully(promise: EventLoopPromise<Void>?) {
        guard let context else {
            promise?.succeed()
            return
        }
        if let promise {
            context.channel.closeFuture.cascade(to: promise)
        }
        perform(stateMachine.drain())
    }

    /// Writes what was encoded since the last flush, in one write.
    ///
    /// Over TLS, a write that carries a value ends with a no-op (`mn`, or `version` in text mode)
    /// in a TLS record of its own. memcached before 1.6.39 reads a value that runs past its 16 KiB
    /// read buffer straight from OpenSSL, which leaves the rest of that TLS record decrypted inside
    /// OpenSSL, where no socket event announces it: the last commands of a large pipelined batch
    /// are never answered. A record after it keeps the socket readable until everything before it
    /// is consumed, and a few bytes with no value are always read whole.
    private func flush() {
        flushScheduled = false
        if let coalescedFlush {
            coalescedFlush.cancel()
            self.coalescedFlush = nil
        }
        guard let context else { return }
        let trailer = outboundCarriesValue
        outboundCarriesValue = false
        if trailer, let lastDeadline = stateMachine.lastDeadline {
            // The trailer answers as a barrier would: quiet requests before it are done.
            var noop = context.channel.allocator.buffer(capacity: 16)
            let expectation = encoder.encode(.noop, opaque: 0, into: &noop)
            _ = stateMachine.enqueue(id: 0, opaque: nil, expectation: expectation, quiet: false, deadline: lastDeadline, context: nil)
            // Two writes: the TLS handler seals each in records of its own.
            context.write(wrapOutboundOut(outbound), promise: nil)
            context.writeAndFlush(wrapOutboundOut(noop), promise: nil)
            outbound.clear()
            return
        }
        if stateMachine.needsBarrier, let lastDeadline = stateMachine.lastDeadline {
            // Quiet requests get no reply on success: an `mn` after them tells us they are done.
            _ = encoder.encode(.noop, opaque: 0, into: &outbound)
            _ = stateMachine.enqueue(
                id: 0, opaque: nil, expectation: .metaNoop, quiet: false, deadline: lastDeadline, context: nil)
        }
        guard outbound.readableBytes > 0 else { return }
        context.writeAndFlush(wrapOutboundOut(outbound), promise: nil)
        // Reuses the storage when the write completed synchronously (the usual case on loopback).
        outbound.clear()
    }

    // MARK: - channel events

    func handlerAdded(context: ChannelHandlerContext) {
        self.context = context
        self.outbound = context.channel.allocator.buffer(capacity: 4096)
    }

    func handlerRemoved(context: ChannelHandlerContext) {
        self.context = nil
    }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        guard !decodingFailed else { return }
        let bytes = unwrapInboundIn(data)
        do {
            try decoder.process(buffer: bytes) { reply in
                perform(stateMachine.receive(reply) { context, result in context.complete(result) })
            }
        } catch {
            // Framing is lost: everything in flight fails and the connection closes (once: a
            // closed state machine takes no more replies and fails nothing twice).
            decodingFailed = true
            let memcachedError = (error as? MemcachedError) ?? .protocolError("undecodable reply: \(error)")
            perform(stateMachine.fail(memcachedError) { context, result in context.complete(result) })
            context.close(promise: nil)
        }
    }

    func channelInactive(context: ChannelHandlerContext) {
        timer?.cancel()
        timer = nil
        coalescedFlush?.cancel()
        coalescedFlush = nil
        stateMachine.channelClosed(.connectionClosed()) { context, result in context.complete(result) }
        context.fireChannelInactive()
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        // A TLS error after the handshake (a corrupt record, an alert) ends the connection like a
        // close: the requests in flight may or may not have been executed.
        let memcachedError = (error as? MemcachedError) ?? .connectionClosed("connection error: \(error)")
        perform(stateMachine.fail(memcachedError) { context, result in context.complete(result) })
        context.close(promise: nil)
    }

    // MARK: - helpers

    private func perform(_ action: ConnectionStateMachine<RequestContext>.Action) {
        switch action {
        case .none: break
        case .close:
            timer?.cancel()
            timer = nil
            context?.close(promise: nil)
        }
    }

    private func armTimer(for deadline: NIODeadline) {
        if let timerDeadline, timerDeadline <= deadline { return }
        timer?.cancel()
        schedule(at: deadline)
    }

    private func schedule(at deadline: NIODeadline) {
        guard let context else { return }
        timerDeadline = deadline
        timer = context.eventLoop.assumeIsolated().scheduleTask(deadline: deadline) { self.timerFired() }
    }

    private func timerFired() {
        timer = nil
        timerDeadline = nil
        let action = stateMachine.expire(now: .now(), stallGrace: stallGrace) { context, result in
            context.complete(result)
        }
        perform(action)
        if action == .none, let next = stateMachine.nextCheck(stallGrace: stallGrace) {
            schedule(at: next)
        }
    }
}

import Atomics
import NIOCore
import NIOPosix
import NIOSSL
import Synchronization

/// One TCP connection to a memcached node, with any number of requests in flight.
///
/// Thread-safe: requests may come from any task. A request from a task that already runs on the
/// connection's event loop (for example under an event-loop task executor) is queued without a
/// thread hop. Requests from other threads go into a submission queue that the event loop drains:
/// only the one that finds it empty wakes the loop, so many requests issued at once cost one
/// wake-up (an `eventfd` write and a loop iteration), not one each.
final class MemcachedConnection: Sendable {
    let channel: any Channel
    private let handler: NIOLoopBound<MemcachedChannelHandler>
    private let requestIDs = ManagedAtomic<UInt64>(1)
    private let generationValue = ManagedAtomic<UInt64>(.max)

    /// When its pool opened it (``ConnectionPool/generation``); `UInt64.max` outside a pool.
    var generation: UInt64 { generationValue.load(ordering: .relaxed) }

    func assignGeneration(_ generation: UInt64) {
        generationValue.store(generation, ordering: .relaxed)
    }
    private let submissions = Mutex(Submissions())

    /// Requests waiting for the event loop, in the order they came.
    private struct Submissions: ~Copyable {
        var queue: [Submission] = []
        /// A drain is scheduled on the event loop (it takes whatever is queued when it runs).
        var drainScheduled = false
    }

    private struct Submission: Sendable {
        var request: MemcachedRequest
        var id: UInt64
        var deadline: NIODeadline
        var waiter: Waiter

        /// Who waits for the reply (a batch's collector lives on the event loop and is never queued).
        enum Waiter: Sendable {
            case continuation(UnsafeContinuation<Result<MemcachedResponse, MemcachedError>, Never>)
            case callback(@Sendable (Result<MemcachedResponse, MemcachedError>) -> Void)

            var context: RequestContext {
                switch self {
                case .continuation(let continuation): .continuation(continuation)
                case .callback(let callback): .callback(callback)
                }
            }
        }

        var context: RequestContext { waiter.context }
    }

    var eventLoop: any EventLoop { channel.eventLoop }
    var closeFuture: EventLoopFuture<Void> { channel.closeFuture }

    private init(channel: any Channel, handler: MemcachedChannelHandler) {
        self.channel = channel
        self.handler = NIOLoopBound(handler, eventLoop: channel.eventLoop)
    }

    struct Settings: Sendable {
        var mode: MemcachedProtocolMode
        var connectTimeout: TimeAmount
        /// How long past a request's deadline a connection may stay silent before it is closed.
        var stallGrace: TimeAmount
        var maximumValueSize: Int
        var coalescingWindow: TimeAmount = .milliseconds(1)
        var tls: MemcachedClient.Configuration.TLS = .disable
        var authentication: MemcachedClient.Configuration.Authentication? = nil
    }

    /// Opens a connection.
    static func connect(
        host: String, port: Int, settings: Settings, eventLoop: any EventLoop
    ) -> EventLoopFuture<MemcachedConnection> {
        let target = "\(host):\(port)"
        // One deadline for the whole setup (TCP connect, TLS handshake, authentication, the TLS
        // confirmation round trip): a server slow at each step cannot stretch it to several
        // connect timeouts.
        let setupDeadline = NIODeadline.now() + settings.connectTimeout
        // The handshake's outcome, held here and not only by its handler: a handshake that fails
        // at once closes the channel, which takes the handler out of the pipeline before the
        // connect's continuation below looks for it (seen under load: the expired certificate
        // then read as "cannot connect: notFound" instead of a `tlsFailed` error).
        var usesTLS = false
        if case .enable = settings.tls.base { usesTLS = true }
        let handshake: EventLoopPromise<Void>? = usesTLS ? eventLoop.makePromise() : nil
        let connected = ClientBootstrap(group: eventLoop)
            .connectTimeout(settings.connectTimeout)
            .channelOption(.socketOption(.tcp_nodelay), value: 1)
            .channelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    if case .enable(let context, let serverName) = settings.tls.base {
                        // SNI and the name checked: the configured one, else the host's name; an
                        // IP address is checked against the certificate's IP entries (no SNI).
                        let isAddress = (try? SocketAddress(ipAddress: host, port: 0)) != nil
                        try channel.pipeline.syncOperations.addHandler(
                            try NIOSSLClientHandler(context: context, serverHostname: serverName ?? (isAddress ? nil : host)))
                        try channel.pipeline.syncOperations.addHandler(
                            TLSHandshakeHandler(handshake: handshake ?? channel.eventLoop.makePromise(), target: target))
                    }
                    if let authentication = settings.authentication {
                        try channel.pipeline.syncOperations.addHandler(
                            AuthenticationHandler(authentication: authentication, target: target, done: channel.eventLoop.makePromise()))
                    }
                    let handler = MemcachedChannelHandler(
                        mode: settings.mode, stallGrace: settings.stallGrace, coalescingWindow: settings.coalescingWindow,
                        recordTrailer: settings.tls.isEnabled, maximumValueSize: settings.maximumValueSize)
                    try channel.pipeline.syncOperations.addHandler(handler)
                }
            }
            .connect(host: host, port: port)
        // The connection is handed out only once its TLS handshake and its authentication are
        // done, within the connect timeout from the start of the connect (a server that accepts
        // and then says nothing is a failure too).
        // No channel came up (the connect failed): the handshake never started.
        connected.whenFailure { error in handshake?.fail(error) }
        return connected.flatMap { channel in
            guard let handshake else { return channel.eventLoop.makeSucceededFuture(channel) }
            guard let tls = try? channel.pipeline.syncOperations.handler(type: TLSHandshakeHandler.self) else {
                // Out of the pipeline already: the handshake is over, either way (the handler
                // leaves once it succeeded; a failure closed the channel).
                return handshake.futureResult.map { channel }
            }
            let bound = NIOLoopBound(tls, eventLoop: channel.eventLoop)
            let timeout = channel.eventLoop.scheduleTask(deadline: setupDeadline) {
                bound.value.timedOut(channel: channel)
            }
            return handshake.futureResult.always { _ in timeout.cancel() }.map { channel }
        }.flatMap { channel in
            guard let context = try? channel.pipeline.syncOperations.context(handlerType: AuthenticationHandler.self),
                let authentication = context.handler as? AuthenticationHandler
            else {
                return channel.eventLoop.makeSucceededFuture(channel)
            }
            let bound = NIOLoopBound(authentication, eventLoop: channel.eventLoop)
            let timeout = channel.eventLoop.scheduleTask(deadline: setupDeadline) {
                bound.value.timedOut(channel: channel)
            }
            authentication.start(context: context)
            return authentication.done.futureResult.always { _ in timeout.cancel() }.map { channel }
        }.flatMapThrowing { channel in
            let handler = try channel.pipeline.syncOperations.handler(type: MemcachedChannelHandler.self)
            return MemcachedConnection(channel: channel, handler: handler)
        }.flatMap { connection in
            // An authenticated connection has had its first round trip already.
            guard settings.tls.isEnabled, settings.authentication == nil else {
                return connection.eventLoop.makeSucceededFuture(connection)
            }
            // TLS 1.3: a server that refuses this client's certificate says so after the handshake
            // completed on this side. A first round trip (`version`) settles it before the
            // connection carries anyone's request.
            let confirmed = connection.eventLoop.makePromise(of: MemcachedConnection.self)
            confirmed.completeWithTask {
                switch await connection.execute(.version, deadline: setupDeadline) {
                case .success:
                    return connection
                case .failure(let error) where error.code == .timeout:
                    connection.close()
                    throw MemcachedError(
                        code: .timeout, message: "\(target): the connection's setup (TLS, then a first round trip) exceeded the connect timeout")
                case .failure(let error):
                    connection.close()
                    throw MemcachedError(
                        code: .tlsFailed,
                        message: "TLS with \(target): the server ended the connection after the handshake (client certificate refused?): \(error.message)")
                }
            }
            return confirmed.futureResult
        }
    }

    /// Hands a request to the channel handler: at once on the event loop (after whatever is queued,
    /// to keep the order), else through the submission queue.
    private func enqueue(_ request: MemcachedRequest, id: UInt64, deadline: NIODeadline, waiter: Submission.Waiter) {
        if eventLoop.inEventLoop {
            // Straight to the handler: no submission built (a copy of the request fewer).
            drain()
            handler.value.submit(request, id: id, deadline: deadline, context: waiter.context)
            return
        }
        let submission = Submission(request: request, id: id, deadline: deadline, waiter: waiter)
        let wake = submissions.withLock { submissions in
            submissions.queue.append(submission)
            guard !submissions.drainScheduled else { return false }
            submissions.drainScheduled = true
            return true
        }
        if wake { eventLoop.execute { self.drain() } }
    }

    /// Submits every queued request (on the event loop).
    private func drain() {
        let queued = submissions.withLock { submissions in
            submissions.drainScheduled = false
            return submissions.queue.isEmpty ? [] : Self.take(&submissions.queue)
        }
        guard !queued.isEmpty else { return }
        let handler = self.handler.value
        for submission in queued {
            handler.submit(submission.request, id: submission.id, deadline: submission.deadline, context: submission.context)
        }
    }

    private static func take(_ queue: inout [Submission]) -> [Submission] {
        let taken = queue
        queue.removeAll(keepingCapacity: true)
        return taken
    }

    /// Sends one request and waits for its reply, its deadline or the task's cancellation.
    func execute(_ request: MemcachedRequest, deadline: NIODeadline) async -> Result<MemcachedResponse, MemcachedError> {
        let id = requestIDs.loadThenWrappingIncrement(ordering: .relaxed)
        let eventLoop = self.eventLoop
        let handler = self.handler
        guard request.honorsCancellation else {
            return await withUnsafeContinuation { continuation in
                enqueue(request, id: id, deadline: deadline, waiter: .continuation(continuation))
            }
        }
        return await withTaskCancellationHandler {
            if Task.isCancelled { return .failure(MemcachedError.cancelledError) }
            return await withUnsafeContinuation { continuation in
                enqueue(request, id: id, deadline: deadline, waiter: .continuation(continuation))
            }
        } onCancel: {
            // Whatever is queued is submitted first, so the cancellation finds the request (unless
            // it overtook the submission itself: the request then ends at its deadline).
            eventLoop.execute {
                self.drain()
                handler.value.cancel(id: id)
            }
        }
    }

    /// Sends several requests in one write and waits for all replies. Results are in request order.
    func executeBatch(_ requests: [MemcachedRequest], deadline: NIODeadline) async -> [Result<MemcachedResponse, MemcachedError>] {
        let firstID = requestIDs.loadThenWrappingIncrement(by: UInt64(requests.count), ordering: .relaxed)
        let eventLoop = self.eventLoop
        let handler = self.handler
        // (Each request looked at in place: a copy retains its key and value.)
        let cancellable = requests.withUnsafeBufferPointer { requests in requests.indices.contains { requests[$0].honorsCancellation } }
        return await withTaskCancellationHandler {
            if cancellable, Task.isCancelled { return requests.map { _ in .failure(MemcachedError.cancelledError) } }
            return await withUnsafeContinuation { continuation in
                let submit: @Sendable () -> Void = {
                    let collector = BatchCollector(count: requests.count, continuation: continuation)
                    requests.withUnsafeBufferPointer { requests in
                        for index in requests.indices {
                            handler.value.submit(
                                requests[index], id: firstID &+ UInt64(index), deadline: deadline,
                                context: .batch(collector, index: index))
                        }
                    }
                }
                // What was queued before goes first.
                if eventLoop.inEventLoop {
                    self.drain()
                    submit()
                } else {
                    eventLoop.execute {
                        self.drain()
                        submit()
                    }
                }
            }
        } onCancel: {
            guard cancellable else { return }
            eventLoop.execute {
                self.drain()
                for index in 0..<requests.count where requests[index].honorsCancellation {
                    handler.value.cancel(id: firstID &+ UInt64(index))
                }
            }
        }
    }

    /// Sends a request without waiting; `completion` runs on the event loop with the outcome.
    func submit(
        _ request: MemcachedRequest, deadline: NIODeadline,
        completion: @escaping @Sendable (Result<MemcachedResponse, MemcachedError>) -> Void
    ) {
        let id = requestIDs.loadThenWrappingIncrement(ordering: .relaxed)
        enqueue(request, id: id, deadline: deadline, waiter: .callback(completion))
    }

    /// Closes after the requests in flight are answered or time out.
    func closeGracefully() -> EventLoopFuture<Void> {
        let promise = eventLoop.makePromise(of: Void.self)
        let handler = self.handler
        eventLoop.execute {
            self.drain()  // queued requests go before the drain's close
            handler.value.closeGracefully(promise: promise)
        }
        return promise.futureResult
    }

    /// Closes now; requests in flight fail with ``MemcachedError/Code/connectionClosed``.
    func close() {
        channel.close(promise: nil)
    }
}

import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

/// A fault-injecting TCP proxy in front of a server, for what `SIGSTOP` and `SIGKILL` cannot do to
/// a real process: a slow node (every chunk delayed), a stalled one (nothing forwarded until
/// resumed, then everything in order), a flapping one (every connection dropped), a reply cut off
/// after a number of bytes (the command applied, its reply lost), a black hole (requests swallowed),
/// a request dropped with its connection (never applied, its outcome unknown to the client).
///
/// Listens on a free loopback port; each accepted connection gets its own connection to the target.
/// Faults apply to connections open now and to later ones. ``stop()`` closes everything.
public final class FaultProxy: Sendable {
    /// The faults in force.
    public struct Faults: Sendable {
        /// Added to every chunk, in both directions (order is kept).
        public var delay: Duration = .zero
        /// Nothing is forwarded while stalled; ``FaultProxy/resume()`` forwards what was held.
        public var stalled = false
        /// Client bytes are read and dropped (the server never sees them).
        public var blackhole = false
        /// The next this many replies (server-to-client chunks) are cut: `cutAfterBytes` of the
        /// chunk are forwarded, then both connections are closed.
        public var repliesToCut = 0
        public var cutAfterBytes = 0
        /// When set, only replies to requests containing these bytes are cut (on the connection
        /// that sent them), not whatever reply comes next (a probe's, a stats poll's).
        public var cutOnlyAfter: [UInt8]? = nil
        /// While stalled, what a client sent before it closed its connection (a timeout) is still
        /// delivered at the resume, as bytes in flight in a network are; the server's side closes
        /// after. (Otherwise a client's close drops what is held.)
        public var deliversAfterClientCloses = false
        /// The next this many requests (client-to-server chunks) that contain `dropContaining` are
        /// dropped, and their connection closed: the server never sees them, and the client's
        /// requests on that connection fail with their outcome unknown.
        public var requestsToDrop = 0
        public var dropContaining: [UInt8] = []
        public init() {}
    }

    private struct State {
        var faults = Faults()
        var connections: [ObjectIdentifier: Pair] = [:]
        var repliesCut = 0
        var requestsDropped = 0
        var accepted = 0
    }

    private let state = NIOLockedValueBox(State())
    private let channel: any Channel
    public let targetHost: String
    public let targetPort: Int

    /// The proxy's own port (point clients here).
    public var port: Int { channel.localAddress?.port ?? 0 }
    public var hostAndPort: String { "127.0.0.1:\(port)" }
    /// Replies cut so far.
    public var repliesCut: Int { state.withLockedValue { $0.repliesCut } }
    /// Requests dropped so far (``dropNextRequests(_:containing:)``).
    public var requestsDropped: Int { state.withLockedValue { $0.requestsDropped } }
    /// Chunks held (stalled, or waiting out a delay) on every open connection.
    public var heldChunks: Int {
        state.withLockedValue { Array($0.connections.values) }.reduce(0) { $0 + $1.heldCount }
    }
    /// Connections accepted so far.
    public var connectionsAccepted: Int { state.withLockedValue { $0.accepted } }

    private init(channel: any Channel, targetHost: String, targetPort: Int) {
        self.channel = channel
        self.targetHost = targetHost
        self.targetPort = targetPort
    }

    /// Starts a proxy to `host:port`.
    public static func start(to host: String = "127.0.0.1", port: Int) async throws -> FaultProxy {
        let box = NIOLockedValueBox<FaultProxy?>(nil)
        let channel = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelOption(.autoRead, value: false)
            .childChannelInitializer { inbound in
                guard let proxy = box.withLockedValue({ $0 }) else {
                    return inbound.eventLoop.makeFailedFuture(RigError("proxy not ready"))
                }
                return proxy.accept(inbound)
            }
            .bind(host: "127.0.0.1", port: 0)
            .get()
        let proxy = FaultProxy(channel: channel, targetHost: host, targetPort: port)
        box.withLockedValue { $0 = proxy }
        return proxy
    }

    /// Changes the faults in force.
    public func update(_ change: (inout Faults) -> Void) {
        let (resumed, pairs) = state.withLockedValue { state -> (Bool, [Pair]) in
            let wasStalled = state.faults.stalled
            change(&state.faults)
            return (wasStalled && !state.faults.stalled, Array(state.connections.values))
        }
        if resumed { for pair in pairs { pair.flush() } }
    }

    public func stall() { update { $0.stalled = true } }
    public func resume() { update { $0.stalled = false } }
    /// Cuts the next `count` replies after `afterBytes` bytes each; with `containing`, the replies
    /// to the next `count` requests whose bytes contain it.
    public func cutNextReplies(_ count: Int = 1, afterBytes: Int = 0, toRequestsContaining pattern: String? = nil) {
        update {
            $0.repliesToCut = count
            $0.cutAfterBytes = afterBytes
            $0.cutOnlyAfter = pattern.map { Array($0.utf8) }
        }
    }
    /// Drops the next `count` requests that contain `pattern`, each with its connection.
    public func dropNextRequests(_ count: Int = 1, containing pattern: String) {
        update {
            $0.requestsToDrop = count
            $0.dropContaining = Array(pattern.utf8)
        }
    }
    public func clearFaults() { update { $0 = Faults() } }

    /// Closes every open connection (a flap); new ones are accepted.
    public func dropConnections() {
        let pairs = state.withLockedValue { Array($0.connections.values) }
        for pair in pairs { pair.close() }
    }

    public func stop() {
        dropConnections()
        channel.close(promise: nil)
    }

    var faults: Faults { state.withLockedValue { $0.faults } }

    /// Takes one reply cut, if one is due (and not only for marked requests): the bytes to
    /// forward first.
    func takeCut(armed: Bool) -> Int? {
        state.withLockedValue { state in
            if state.faults.cutOnlyAfter != nil, !armed { return nil }
            guard armed || state.faults.repliesToCut > 0 else { return nil }
            if !armed { state.faults.repliesToCut -= 1 }
            state.repliesCut += 1
            return state.faults.cutAfterBytes
        }
    }

    /// Whether a request chunk is to be dropped (and its connection closed).
    func drops(_ chunk: ByteBuffer) -> Bool {
        state.withLockedValue { state in
            guard state.faults.requestsToDrop > 0, chunk.readableBytesView.firstRange(of: state.faults.dropContaining) != nil
            else { return false }
            state.faults.requestsToDrop -= 1
            state.requestsDropped += 1
            return true
        }
    }

    /// Whether a request chunk arms a cut of its connection's next reply.
    func arms(_ chunk: ByteBuffer) -> Bool {
        state.withLockedValue { state in
            guard let pattern = state.faults.cutOnlyAfter, state.faults.repliesToCut > 0,
                chunk.readableBytesView.firstRange(of: pattern) != nil
            else { return false }
            state.faults.repliesToCut -= 1
            return true
        }
    }

    private func accept(_ inbound: any Channel) -> EventLoopFuture<Void> {
        state.withLockedValue { $0.accepted += 1 }
        return ClientBootstrap(group: inbound.eventLoop)
            .channelOption(.autoRead, value: false)
            .connect(host: targetHost, port: targetPort)
            .flatMapThrowing { outbound in
                let pair = Pair(proxy: self, inbound: inbound, outbound: outbound)
                self.state.withLockedValue { $0.connections[ObjectIdentifier(pair)] = pair }
                try inbound.pipeline.syncOperations.addHandler(Forwarder(pair: pair, towardServer: true))
                try outbound.pipeline.syncOperations.addHandler(Forwarder(pair: pair, towardServer: false))
                inbound.closeFuture.whenComplete { _ in pair.clientClosed() }
                outbound.closeFuture.whenComplete { _ in pair.close() }
                // The client side reads once it is active (it registers after this initializer);
                // the server side is active already.
                outbound.read()
            }
    }

    func forget(_ pair: Pair) {
        _ = state.withLockedValue { $0.connections.removeValue(forKey: ObjectIdentifier(pair)) }
    }

    /// One proxied connection: client side and server side, on one event loop.
    final class Pair: Sendable {
        let proxy: FaultProxy
        let inbound: any Channel
        let outbound: any Channel
        private struct Held {
            var chunks: [(ByteBuffer, towardServer: Bool)] = []
            var lastRelease = NIODeadline.distantPast
            /// Replies to cut on this connection (armed by marked requests).
            var armedCuts = 0
            /// The client closed; what it sent goes to the server at the resume, then the server's side closes.
            var clientGone = false
        }
        // Touched on the pair's event loop only; the box makes that checkable, not racy.
        private let held = NIOLockedValueBox(Held())

        init(proxy: FaultProxy, inbound: any Channel, outbound: any Channel) {
            self.proxy = proxy
            self.inbound = inbound
            self.outbound = outbound
        }

        var eventLoop: any EventLoop { inbound.eventLoop }
        var heldCount: Int { held.withLockedValue { $0.chunks.count } }

        /// The client side closed: both sides close, unless what it sent is held for the server
        /// (``Faults/deliversAfterClientCloses``).
        func clientClosed() {
            let faults = proxy.faults
            let keep = faults.stalled && faults.deliversAfterClientCloses && held.withLockedValue { held in
                guard held.chunks.contains(where: { $0.towardServer }) else { return false }
                held.clientGone = true
                return true
            }
            if !keep { close() }
        }

        func close() {
            proxy.forget(self)
            inbound.close(promise: nil)
            outbound.close(promise: nil)
        }

        /// A chunk read from one side.
        func received(_ buffer: ByteBuffer, towardServer: Bool) {
            let faults = proxy.faults
            if towardServer, faults.blackhole { return }
            if towardServer, proxy.drops(buffer) {
                close()
                return
            }
            var buffer = buffer
            if towardServer, proxy.arms(buffer) { held.withLockedValue { $0.armedCuts += 1 } }
            let armed = !towardServer && held.withLockedValue { held in
                guard held.armedCuts > 0 else { return false }
                held.armedCuts -= 1
                return true
            }
            if !towardServer, let keep = proxy.takeCut(armed: armed) {
                let head = buffer.readSlice(length: min(keep, buffer.readableBytes)) ?? ByteBuffer()
                if head.readableBytes > 0 { inbound.writeAndFlush(head, promise: nil) }
                close()
                return
            }
            held.withLockedValue { $0.chunks.append((buffer, towardServer)) }
            if faults.stalled { return }
            if faults.delay == .zero {
                flushNow()
            } else {
                let release = held.withLockedValue { held -> NIODeadline in
                    let at = max(NIODeadline.now() + TimeAmount(faults.delay), held.lastRelease)
                    held.lastRelease = at
                    return at
                }
                eventLoop.scheduleTask(deadline: release) { self.flushOne() }
            }
        }

        /// Forwards everything held (after a resume).
        func flush() {
            eventLoop.execute { self.flushNow() }
        }

        private func flushNow() {
            guard !proxy.faults.stalled else { return }
            let (chunks, clientGone) = held.withLockedValue { held in
                defer { held.chunks = [] }
                return (held.chunks, held.clientGone)
            }
            for (chunk, towardServer) in chunks where towardServer || !clientGone { write(chunk, towardServer: towardServer) }
            if clientGone {
                // What the server answers goes nowhere; give it a moment to read what was sent.
                eventLoop.scheduleTask(in: .milliseconds(200)) { self.close() }
            }
        }

        private func flushOne() {
            guard !proxy.faults.stalled else { return }
            let chunk = held.withLockedValue { held in held.chunks.isEmpty ? nil : held.chunks.removeFirst() }
            if let (chunk, towardServer) = chunk { write(chunk, towardServer: towardServer) }
        }

        private func write(_ chunk: ByteBuffer, towardServer: Bool) {
            (towardServer ? outbound : inbound).writeAndFlush(chunk, promise: nil)
        }
    }

    private final class Forwarder: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        let pair: Pair
        let towardServer: Bool
        init(pair: Pair, towardServer: Bool) {
            self.pair = pair
            self.towardServer = towardServer
        }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            pair.received(unwrapInboundIn(data), towardServer: towardServer)
        }
        func channelActive(context: ChannelHandlerContext) {
            context.read()
            context.fireChannelActive()
        }
        func channelReadComplete(context: ChannelHandlerContext) {
            context.read()
        }
        func errorCaught(context: ChannelHandlerContext, error: any Error) {
            pair.close()
        }
    }
}

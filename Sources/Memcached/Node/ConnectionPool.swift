import Atomics
import NIOConcurrencyHelpers
import NIOCore
import NIOPosix

/// A small fixed set of pipelined connections to one node, opened on demand, reopened with
/// exponential backoff after a failure.
final class ConnectionPool: Sendable {
    fileprivate enum SlotState {
        case idle
        case connecting(EventLoopFuture<MemcachedConnection>)
        case connected(MemcachedConnection)
        /// The last attempt failed: requests fail fast until `until`, then the next one reconnects.
        case backingOff(until: NIODeadline, attempts: Int, error: MemcachedError)
        case shutDown
    }

    fileprivate final class Slot: Sendable {
        let eventLoop: any EventLoop
        let state = NIOLockedValueBox(SlotState.idle)
        init(eventLoop: any EventLoop) { self.eventLoop = eventLoop }
    }

    private let slots: [Slot]
    /// The first slot on each event loop: where requests with a ``MemcachedRequest/connectionAffinity``
    /// go. Requests from an event loop take its first slot (``pickSlot()``); keeping the affine ones
    /// there too means that with fewer loops than connections (one loop, two connections a node: the
    /// default of a server pinned to one core) a loop's requests to a node leave in one write per
    /// tick instead of being split over two sockets (measured, the change alone in one A/B run: 2.27
    /// to 2.15 memcached writes and 2.52 to 2.17 reads a non-sticky `/counter` request,
    /// docs/benchmarks/analysis.md).
    private let loopSlots: [Slot]
    private let nextSlot = ManagedAtomic<Int>(0)
    /// Numbers every connection any pool of the process opens, in order, once it is up and
    /// before any request uses it. Process-wide, not per pool: a client rebuilt by a
    /// reconfiguration must not hand out numbers an earlier client's connections had.
    private static let generationCounter = ManagedAtomic<UInt64>(0)

    /// The number of the newest connection opened so far (by any pool): a connection numbered at
    /// most this was open already when it was read.
    var generation: UInt64 { Self.generationCounter.load(ordering: .sequentiallyConsistent) }
    /// Connections this pool has opened so far (for tests).
    var opened: Int { openedCount.load(ordering: .relaxed) }
    private let openedCount = ManagedAtomic<Int>(0)
    private let host: String
    private let port: Int
    private let settings: MemcachedConnection.Settings
    private let backoff: (minimum: TimeAmount, maximum: TimeAmount)

    init(
        host: String, port: Int, count: Int, eventLoopGroup: any EventLoopGroup,
        settings: MemcachedConnection.Settings, backoff: (minimum: TimeAmount, maximum: TimeAmount)
    ) {
        self.host = host
        self.port = port
        self.settings = settings
        self.backoff = backoff
        let slots = (0..<max(1, count)).map { _ in Slot(eventLoop: eventLoopGroup.next()) }
        self.slots = slots
        var loopSlots: [Slot] = []
        for slot in slots where !loopSlots.contains(where: { $0.eventLoop === slot.eventLoop }) { loopSlots.append(slot) }
        self.loopSlots = loopSlots
    }

    /// A connection, opening one if needed. Prefers a connection on the caller's own event loop.
    ///
    /// A connection that is closing (or `replacing`, one that just refused a request because it was
    /// closing) is not handed out: a new one is opened in its place.
    ///
    /// Inlined into its callers: the usual case (an open connection in the chosen slot, no stale
    /// one to replace) is answered without an async call of its own.
    @inline(__always)
    func connection(affinity: Int? = nil, replacing stale: MemcachedConnection? = nil) async throws(MemcachedError)
        -> MemcachedConnection
    {
        let choice = choose(affinity: affinity)
        if stale == nil, let ready = readyConnection(choice) { return ready }
        return try await connection(choice, replacing: stale)
    }

    /// Where one request goes: chosen once (round robin moves on once a request), then looked at
    /// with ``readyConnection(_:)`` and, when that has nothing, ``connection(_:replacing:)``.
    struct Choice: Sendable {
        fileprivate let slot: Slot
    }

    func choose(affinity: Int?) -> Choice {
        Choice(slot: slot(affinity: affinity))
    }

    /// The chosen slot's open connection, if it has one: the usual case, answered without an async
    /// call.
    func readyConnection(_ choice: Choice) -> MemcachedConnection? {
        choice.slot.state.withLockedValue { state in
            guard case .connected(let connection) = state, connection.channel.isActive else { return nil }
            return connection
        }
    }

    /// The chosen slot's connection, opening one if needed (see ``connection(affinity:replacing:)``).
    func connection(_ choice: Choice, replacing stale: MemcachedConnection? = nil) async throws(MemcachedError)
        -> MemcachedConnection
    {
        let slot = choice.slot
        enum Next {
            case ready(MemcachedConnection)
            case wait(EventLoopFuture<MemcachedConnection>)
            case connect(EventLoopPromise<MemcachedConnection>, attempts: Int)
            case fail(MemcachedError)
        }
        var displaced: MemcachedConnection?
        let next: Next = slot.state.withLockedValue { state in
            switch state {
            case .connected(let connection):
                if connection !== stale, connection.channel.isActive { return .ready(connection) }
                // Closing: its close callback will find another connection in the slot and leave it.
                displaced = connection
                let promise = slot.eventLoop.makePromise(of: MemcachedConnection.self)
                state = .connecting(promise.futureResult)
                return .connect(promise, attempts: 0)
            case .connecting(let future):
                return .wait(future)
            case .shutDown:
                return .fail(MemcachedError.shutdownError)
            case .backingOff(let until, let attempts, let error):
                if NIODeadline.now() < until { return .fail(error) }
                let promise = slot.eventLoop.makePromise(of: MemcachedConnection.self)
                state = .connecting(promise.futureResult)
                return .connect(promise, attempts: attempts)
            case .idle:
                let promise = slot.eventLoop.makePromise(of: MemcachedConnection.self)
                state = .connecting(promise.futureResult)
                return .connect(promise, attempts: 0)
            }
        }
        // No longer tracked by the slot: it must not stay open (its requests in flight finish).
        if let displaced, displaced.channel.isActive { _ = displaced.closeGracefully() }
        let future: EventLoopFuture<MemcachedConnection>
        switch next {
        case .ready(let connection):
            return connection
        case .fail(let error):
            throw error
        case .wait(let waiting):
            future = waiting
        case .connect(let promise, let attempts):
            // Outside the lock: a connect can fail synchronously and run the callbacks at once.
            startConnect(slot, attempts: attempts, promise: promise)
            future = promise.futureResult
        }
        do {
            return try await future.get()
        } catch let error as MemcachedError {
            throw error
        } catch {
            throw MemcachedError(code: .connectFailed, message: "\(error)")
        }
    }

    /// A connection of its own, outside the pool (a capability probe a proxy may answer by
    /// closing it: no request of the pool's must share it). The caller closes it.
    func detachedConnection() async throws(MemcachedError) -> MemcachedConnection {
        let target = "\(host):\(port)"
        do {
            return try await MemcachedConnection.connect(host: host, port: port, settings: settings, eventLoop: slots[0].eventLoop).get()
        } catch let error as MemcachedError {
            throw error
        } catch {
            throw MemcachedError(code: .connectFailed, message: "cannot connect to \(target): \(error)")
        }
    }

    private func slot(affinity: Int?) -> Slot {
        guard let affinity else { return pickSlot() }
        return loopSlots[Int(UInt(bitPattern: affinity) % UInt(loopSlots.count))]
    }

    private func pickSlot() -> Slot {
        if slots.count == 1 { return slots[0] }
        // On an event-loop thread (a thread-local read), the connection on this loop if there is
        // one; a task on the cooperative pool (the usual caller) goes straight to round robin.
        if MultiThreadedEventLoopGroup.currentEventLoop != nil {
            for slot in slots where slot.eventLoop.inEventLoop { return slot }
        }
        let index = nextSlot.loadThenWrappingIncrement(ordering: .relaxed)
        return slots[index % slots.count]
    }

    private func startConnect(_ slot: Slot, attempts: Int, promise: EventLoopPromise<MemcachedConnection>) {
        let backoff = self.backoff
        let target = "\(host):\(port)"
        let generation = Self.generationCounter
        let opened = openedCount
        let future = MemcachedConnection.connect(host: host, port: port, settings: settings, eventLoop: slot.eventLoop)
            .map { (connection: MemcachedConnection) -> MemcachedConnection in
                opened.wrappingIncrement(ordering: .relaxed)
                connection.assignGeneration(generation.wrappingIncrementThenLoad(ordering: .sequentiallyConsistent))
                return connection
            }
            .flatMapErrorThrowing { error in
                if let error = error as? MemcachedError { throw error }  // a failed TLS handshake: its own code
                throw MemcachedError(code: .connectFailed, message: "cannot connect to \(target): \(error)")
            }
        future.cascade(to: promise)
        promise.futureResult.whenComplete { result in
            slot.state.withLockedValue { state in
                guard case .connecting = state else {
                    // Shut down while connecting: do not keep the connection.
                    if case .success(let connection) = result { connection.close() }
                    return
                }
                switch result {
                case .success(let connection):
                    state = .connected(connection)
                    connection.closeFuture.whenComplete { _ in
                        slot.state.withLockedValue { state in
                            if case .connected(let current) = state, current === connection { state = .idle }
                        }
                    }
                case .failure(let error):
                    let delay = Self.backoffDelay(attempts: attempts, minimum: backoff.minimum, maximum: backoff.maximum)
                    state = .backingOff(
                        until: .now() + delay, attempts: attempts + 1,
                        error: (error as? MemcachedError) ?? MemcachedError(code: .connectFailed, message: "\(error)"))
                }
            }
        }
    }

    static func backoffDelay(attempts: Int, minimum: TimeAmount, maximum: TimeAmount) -> TimeAmount {
        let factor = Int64(1) << Int64(min(attempts, 16))
        let (product, overflow) = minimum.nanoseconds.multipliedReportingOverflow(by: factor)
        if overflow { return maximum }
        return .nanoseconds(min(product, maximum.nanoseconds))
    }

    /// Forgets backoff state so that the next request reconnects at once (the node answered a probe).
    func resetBackoff() {
        for slot in slots {
            slot.state.withLockedValue { state in
                if case .backingOff = state { state = .idle }
            }
        }
    }

    /// Closes every connection now; requests in flight fail with `connectionClosed`.
    func closeAll() {
        for slot in slots {
            let connection: MemcachedConnection? = slot.state.withLockedValue { state in
                defer { if case .shutDown = state {} else { state = .idle } }
                if case .connected(let connection) = state { return connection }
                return nil
            }
            connection?.close()
        }
    }

    /// Stops opening connections and closes the open ones after their requests are answered.
    func shutdown() async {
        var closing: [EventLoopFuture<Void>] = []
        for slot in slots {
            let previous = slot.state.withLockedValue { state in
                defer { state = .shutDown }
                return state
            }
            switch previous {
            case .connected(let connection):
                closing.append(connection.closeGracefully())
            case .connecting(let future):
                closing.append(future.flatMap { $0.closeGracefully() }.recover { _ in })
            default:
                break
            }
        }
        for future in closing {
            try? await future.get()
        }
    }
}

import DequeModule
import NIOCore
import Synchronization

/// Sticky mode's asynchronous saving: a bounded queue of changed sessions, coalesced per session
/// (a session changed by ten requests before the writer gets to it is written once, with its
/// latest state), written in pipelined batches, and flushed when the manager shuts down
/// gracefully.
///
/// A change waits up to `delay` before it is written, so that a session changed by a burst of
/// requests is written once per window (the crash trade: at most the last window's changes, plus
/// the queue, are lost if the app server dies; graceful shutdown loses nothing).
///
/// When the queue is full, ``enqueue(_:)`` refuses and the request saves synchronously: back
/// pressure instead of unbounded memory.
final class AsynchronousWriter: Sendable {
    private struct Entry {
        var session: MemcachedSession
        var due: NIODeadline
    }

    private struct State {
        var queue: Deque<Entry> = []
        var queued: Set<ObjectIdentifier> = []
        /// Sessions whose save failed because no node answered: queued again periodically.
        var retry: [ObjectIdentifier: MemcachedSession] = [:]
        var waiter: CheckedContinuation<Void, Never>?
        /// The batch being written now (taken from the queue, not yet acknowledged).
        var writing: Set<ObjectIdentifier> = []
        /// Waiting until the batch being written now is done (``awaitWrites(of:)``).
        var writingWaiters: [CheckedContinuation<Void, Never>] = []
        var stopping = false
        var stopped = false
    }

    private let state = Mutex(State())
    private let limit: Int
    private let delay: TimeAmount
    private let clock: any SessionClock
    static let batchSize = 256
    /// How often saves that failed are queued again.
    static let retryInterval = Duration.seconds(1)

    init(limit: Int, delay: TimeAmount = .zero, clock: any SessionClock = SystemSessionClock()) {
        self.limit = limit
        self.delay = delay
        self.clock = clock
    }

    /// Queues a session for saving; false when the queue is full or the writer has stopped (the
    /// caller then saves synchronously).
    func enqueue(_ session: MemcachedSession) -> Bool {
        let now = clock.now()
        let (accepted, waiter) = state.withLock { state -> (Bool, CheckedContinuation<Void, Never>?) in
            guard !state.stopped else { return (false, nil) }
            if state.queued.contains(ObjectIdentifier(session)) { return (true, nil) }
            guard state.queue.count < limit else { return (false, nil) }
            state.queue.append(Entry(session: session, due: now + delay))
            state.queued.insert(ObjectIdentifier(session))
            defer { state.waiter = nil }
            return (true, state.waiter)
        }
        waiter?.resume()
        return accepted
    }

    /// Sessions waiting to be written.
    var pendingCount: Int { state.withLock { $0.queue.count } }

    /// Keeps a session whose save failed (no node answered) for another try; bounded like the queue.
    func retryLater(_ session: MemcachedSession) {
        state.withLock { state in
            guard state.retry.count < limit || state.retry[ObjectIdentifier(session)] != nil else { return }
            state.retry[ObjectIdentifier(session)] = session
        }
    }

    var retryCount: Int { state.withLock { $0.retry.count } }

    /// Queues the sessions waiting for another try.
    func requeueRetries() {
        let sessions = state.withLock { state -> [MemcachedSession] in
            defer { state.retry = [:] }
            return Array(state.retry.values)
        }
        for session in sessions where !session.isInvalidated && !session.isTakenOver && session.hasUnsavedChanges {
            if !enqueue(session) { retryLater(session) }
        }
    }

    /// Writes queued sessions with `write` (one batch at a time) until cancelled, then flushes
    /// what is left, with the `unsaved` sessions its owner holds, and stops taking more.
    func run(write: @escaping @Sendable ([MemcachedSession]) async -> Void, unsaved: () -> [MemcachedSession]) async {
        while true {
            let batch = await nextBatch()
            if batch.isEmpty {
                if state.withLock({ $0.stopping }) { break }
                continue
            }
            await self.write(batch, with: write)
        }
        // Flush: what failed before, and whatever this instance holds unsaved, goes too (sessions
        // stay in memcached for the other instances); requests still ending during shutdown may
        // add more, so take until empty.
        requeueRetries()
        for session in unsaved() { _ = enqueue(session) }
        while true {
            let batch = state.withLock { state -> [MemcachedSession] in
                let batch = takeBatch(&state, all: true)
                if batch.isEmpty { state.stopped = true }
                return batch
            }
            if batch.isEmpty { break }
            await self.write(batch, with: write)
        }
    }

    private func write(_ batch: [MemcachedSession], with write: @escaping @Sendable ([MemcachedSession]) async -> Void) async {
        // Detached: the writer is cancelled to make it flush, and a cancelled task's memcached
        // requests fail at once; the batch's writes must not inherit that. On the event loop the
        // manager's background work runs on (a detached task does not inherit the preference).
        await Task.detached(executorPreference: SessionManager.backgroundExecutor) {
            await SessionManager.$isBackgroundWork.withValue(true) {
                await write(batch)
            }
        }.value
        let waiters = state.withLock { state in
            state.writing = []
            defer { state.writingWaiters = [] }
            return state.writingWaiters
        }
        for waiter in waiters { waiter.resume() }
    }

    /// Returns once none of `sessions` is being written: a write taken from the queue before they
    /// were taken over has landed (or failed) by then. (Queued ones are dropped when written: a
    /// taken-over session's write goes no further.)
    func awaitWrites(of sessions: [MemcachedSession]) async {
        let ids = Set(sessions.map(ObjectIdentifier.init))
        while !state.withLock({ $0.writing.isDisjoint(with: ids) }) {
            await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                let writing = state.withLock { state -> Bool in
                    guard !state.writing.isDisjoint(with: ids) else { return false }
                    state.writingWaiters.append(continuation)
                    return true
                }
                if !writing { continuation.resume() }
            }
        }
    }

    /// Takes up to a batch of sessions that are due (all of them when `all`).
    private func takeBatch(_ state: inout State, all: Bool = false) -> [MemcachedSession] {
        var batch: [MemcachedSession] = []
        let now = clock.now()
        while batch.count < Self.batchSize, let first = state.queue.first, all || state.stopping || first.due <= now {
            state.queue.removeFirst()
            state.queued.remove(ObjectIdentifier(first.session))
            state.writing.insert(ObjectIdentifier(first.session))
            batch.append(first.session)
        }
        return batch
    }

    /// The next batch; empty when the task is cancelled (graceful shutdown) with nothing queued.
    private func nextBatch() async -> [MemcachedSession] {
        while true {
            let (ready, firstDue) = state.withLock { state -> ([MemcachedSession], NIODeadline?) in
                (takeBatch(&state), state.queue.first?.due)
            }
            if !ready.isEmpty { return ready }
            if let firstDue {
                // Not due yet: wait out its coalescing window (cancellation ends the wait and the
                // stop flag then makes everything due).
                do {
                    try await clock.sleep(for: .nanoseconds(max(0, (firstDue - clock.now()).nanoseconds)))
                } catch {
                    state.withLock { $0.stopping = true }
                }
                continue
            }
            await withTaskCancellationHandler {
                await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                    let resumeNow = state.withLock { state -> Bool in
                        if state.stopping || !state.queue.isEmpty { return true }
                        state.waiter = continuation
                        return false
                    }
                    if resumeNow { continuation.resume() }
                }
            } onCancel: {
                let waiter = state.withLock { state -> CheckedContinuation<Void, Never>? in
                    state.stopping = true
                    defer { state.waiter = nil }
                    return state.waiter
                }
                waiter?.resume()
            }
            if Task.isCancelled { state.withLock { $0.stopping = true } }
            let (batch, stopping) = state.withLock { state in (takeBatch(&state), state.stopping) }
            if !batch.isEmpty || stopping { return batch }
        }
    }
}

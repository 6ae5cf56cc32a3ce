import Atomics
import NIOCore

/// Whether a node takes requests: up until `failureThreshold` consecutive failures, then down
/// (requests fail fast) until a background probe gets an answer.
///
/// Lock-free, since it is read on every request.
final class NodeHealth: Sendable {
    private let consecutiveFailures = ManagedAtomic<Int>(0)
    private let down = ManagedAtomic<Bool>(false)
    private let markedDownAt = ManagedAtomic<UInt64>(0)
    let failureThreshold: Int

    init(failureThreshold: Int) {
        self.failureThreshold = max(1, failureThreshold)
    }

    var isUp: Bool { !down.load(ordering: .relaxed) }

    /// Uptime nanoseconds when the node was last marked down.
    var downSince: NIODeadline? {
        isUp ? nil : NIODeadline.uptimeNanoseconds(markedDownAt.load(ordering: .relaxed))
    }

    /// Records a success. Cheap when there is nothing to reset (the common case).
    @inline(__always)
    func recordSuccess() {
        if consecutiveFailures.load(ordering: .relaxed) != 0 {
            consecutiveFailures.store(0, ordering: .relaxed)
        }
    }

    /// Records a failure; returns true when this failure marked the node down.
    func recordFailure() -> Bool {
        let failures = consecutiveFailures.wrappingIncrementThenLoad(ordering: .relaxed)
        guard failures >= failureThreshold else { return false }
        return markDown()
    }

    /// Marks the node down at once (e.g. a probe failed). Returns true if it was up.
    @discardableResult
    func markDown() -> Bool {
        let (exchanged, _) = down.compareExchange(expected: false, desired: true, ordering: .relaxed)
        if exchanged { markedDownAt.store(NIODeadline.now().uptimeNanoseconds, ordering: .relaxed) }
        return exchanged
    }

    /// Marks the node up (a probe got an answer). Returns true if it was down.
    @discardableResult
    func markUp() -> Bool {
        consecutiveFailures.store(0, ordering: .relaxed)
        let (exchanged, _) = down.compareExchange(expected: true, desired: false, ordering: .relaxed)
        return exchanged
    }
}

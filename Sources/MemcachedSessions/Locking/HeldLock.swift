import NIOCore
import Synchronization

/// A lock this instance holds: the key, the node, the random token stored as the lock's value,
/// and the CAS unique that proves ownership (release and renewal are CAS-checked: only the owner
/// can do either).
final class HeldLock: Sendable {
    let key: String
    let nodeID: String
    let token: String
    let acquiredAt: NIODeadline
    private struct State {
        var casUnique: UInt64?
        var renewedAt: NIODeadline
        var lost = false
        var releasing = false
        /// A renewal is on the wire: its reply brings the lock's next CAS unique.
        var renewing = false
        /// Releases waiting for that reply.
        var waitingForRenewal: [CheckedContinuation<Void, Never>] = []
    }

    private let state: Mutex<State>

    /// Acquisition order, for a stable order of renewals.
    let sequence: UInt64

    init(key: String, nodeID: String, token: String, casUnique: UInt64?, now: NIODeadline, sequence: UInt64) {
        self.key = key
        self.nodeID = nodeID
        self.token = token
        self.sequence = sequence
        self.acquiredAt = now
        self.state = Mutex(State(casUnique: casUnique, renewedAt: now))
    }

    var casUnique: UInt64? { state.withLock { $0.casUnique } }
    var renewedAt: NIODeadline { state.withLock { $0.renewedAt } }
    /// Whether a renewal found the lock gone or owned by someone else.
    var isLost: Bool { state.withLock { $0.lost } }
    var isReleasing: Bool { state.withLock { $0.releasing } }

    /// Starts a renewal: the CAS unique it must use, or nil when the lock is being released (a
    /// release is never raced by a renewal of the same lock).
    func beginRenewal() -> UInt64?? {
        state.withLock { state in
            guard !state.releasing, !state.renewing else { return nil }
            state.renewing = true
            return .some(state.casUnique)
        }
    }

    /// Ends a renewal; `casUnique` is the lock's new CAS unique when it was renewed, nil when the
    /// outcome is unknown (no reply) or the lock is lost. Wakes a release waiting for it.
    func endRenewal(renewed: Bool, casUnique: UInt64?, lost: Bool = false, now: NIODeadline) {
        let waiting = state.withLock { state in
            state.renewing = false
            if renewed {
                state.casUnique = casUnique
                state.renewedAt = now
            }
            if lost { state.lost = true }
            defer { state.waitingForRenewal = [] }
            return state.waitingForRenewal
        }
        for continuation in waiting { continuation.resume() }
    }

    /// Stops renewals and waits for one in flight (its reply changes the CAS unique a release
    /// must use: without the wait, the release would find `EX` and leave the lock behind).
    /// Returns the CAS unique the release must use. The wait is bounded by the renewal's own
    /// request timeout.
    func beginRelease() async -> UInt64? {
        let mustWait = state.withLock { state in
            state.releasing = true
            return state.renewing
        }
        if mustWait {
            await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
                let resumeNow = state.withLock { state in
                    guard state.renewing else { return true }
                    state.waitingForRenewal.append(continuation)
                    return false
                }
                if resumeNow { continuation.resume() }
            }
        }
        return state.withLock { $0.casUnique }
    }
}

/// Locks held by this instance, for lease renewal.
final class HeldLocks: Sendable {
    private let locks = Mutex<[ObjectIdentifier: HeldLock]>([:])

    func add(_ lock: HeldLock) { locks.withLock { $0[ObjectIdentifier(lock)] = lock } }
    func remove(_ lock: HeldLock) { _ = locks.withLock { $0.removeValue(forKey: ObjectIdentifier(lock)) } }
    private let sequence = Mutex<UInt64>(0)

    /// The next acquisition number.
    func nextSequence() -> UInt64 { sequence.withLock { $0 &+= 1; return $0 } }
    /// Every lock held, in acquisition order.
    var all: [HeldLock] { locks.withLock { $0.values.sorted { $0.sequence < $1.sequence } } }
}

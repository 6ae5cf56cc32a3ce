@_spi(Simulation) import MemcachedSessions
import NIOCore
import Synchronization

/// The session manager's clock in a simulation: virtual time of the ``DeterministicScheduler``.
/// Wall-clock time starts at a fixed date, so stored timestamps are the same in every run.
public struct SimulatedClock: SessionClock {
    /// 2026-12-01T00:00:00Z in milliseconds.
    public static let epochMilliseconds: Int64 = 1_796_083_200_000

    public init() {}

    public func now() -> NIODeadline {
        // Offset by a second, so that "now minus an interval" never underflows.
        .uptimeNanoseconds(DeterministicScheduler.shared.nanoseconds + 1_000_000_000)
    }

    public func wallMilliseconds() -> Int64 {
        Self.epochMilliseconds + Int64(DeterministicScheduler.shared.nanoseconds / 1_000_000)
    }

    /// Unix seconds of the simulated wall clock.
    public var unixSeconds: Int64 { wallMilliseconds() / 1000 }

    public func sleep(for duration: Duration) async throws {
        try Task.checkCancellation()
        let nanoseconds = max(0, duration.components.seconds * 1_000_000_000 + duration.components.attoseconds / 1_000_000_000)
        let scheduler = DeterministicScheduler.shared
        let deadline = scheduler.nanoseconds + UInt64(nanoseconds)
        let sleeper = Sleeper()
        try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Void, any Error>) in
                sleeper.start(continuation, deadline: deadline)
            }
        } onCancel: {
            sleeper.cancel()
        }
    }

    /// One sleep: resumed once, by its timer or by cancellation, whichever comes first.
    private final class Sleeper: Sendable {
        private struct State {
            var continuation: CheckedContinuation<Void, any Error>?
            var timer: UInt64?
            var cancelled = false
        }
        private let state = Mutex(State())

        func start(_ continuation: CheckedContinuation<Void, any Error>, deadline: UInt64) {
            let cancelled = state.withLock { state -> Bool in
                if state.cancelled { return true }
                state.continuation = continuation
                return false
            }
            if cancelled {
                continuation.resume(throwing: CancellationError())
                return
            }
            let timer = DeterministicScheduler.shared.schedule(at: deadline) { [self] in
                let waiting = state.withLock { state -> CheckedContinuation<Void, any Error>? in
                    defer { state.continuation = nil }
                    return state.continuation
                }
                waiting?.resume()
            }
            state.withLock { $0.timer = timer }
        }

        func cancel() {
            let (waiting, timer) = state.withLock { state -> (CheckedContinuation<Void, any Error>?, UInt64?) in
                state.cancelled = true
                defer { state.continuation = nil }
                return (state.continuation, state.timer)
            }
            if let timer { DeterministicScheduler.shared.cancelTimer(timer) }
            waiting?.resume(throwing: CancellationError())
        }
    }
}

/// The manager's random numbers in a simulation: the scheduler's seeded generator.
@_spi(Simulation)
public struct SimulatedEntropy: SessionEntropy {
    public init() {}
    public func next() -> UInt64 { DeterministicScheduler.shared.randomUInt64() }
}

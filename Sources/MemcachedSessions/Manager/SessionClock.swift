import Memcached
import NIOCore

#if canImport(Glibc)
import Glibc
#elseif canImport(Musl)
import Musl
#elseif canImport(Darwin)
import Darwin
#endif

/// The manager's time: monotonic instants for deadlines and intervals (lock leases, check
/// intervals, drain deadlines), wall-clock milliseconds for what sessions store (creation, last
/// access, absolute expiry), and sleeping for its timers.
///
/// ``SystemSessionClock`` in production. A simulation passes a clock it drives itself, so that
/// lock expiry, idle and absolute timeouts and every timer of the manager run on simulated time,
/// and a run with the same seed replays the same history.
public protocol SessionClock: Sendable {
    /// Monotonic time.
    func now() -> NIODeadline
    /// Wall-clock time, milliseconds since 1970.
    func wallMilliseconds() -> Int64
    /// Suspends for `duration` of this clock's time; throws `CancellationError` when the task is
    /// cancelled.
    func sleep(for duration: Duration) async throws
}

/// The system's clocks: `NIODeadline.now()` (monotonic), `CLOCK_REALTIME`, and `Task.sleep`.
public struct SystemSessionClock: SessionClock {
    public init() {}

    @inlinable
    public func now() -> NIODeadline { .now() }

    public func wallMilliseconds() -> Int64 {
        var spec = timespec()
        clock_gettime(CLOCK_REALTIME, &spec)
        return Int64(spec.tv_sec) * 1000 + Int64(spec.tv_nsec) / 1_000_000
    }

    public func sleep(for duration: Duration) async throws {
        try await Task.sleep(for: duration)
    }
}

/// Where the manager's random numbers come from: session tokens, lock tokens, backoff jitter.
/// The system's CSPRNG in production (tokens are credentials); a simulation replaces it with a
/// seeded generator so that a seed replays the same history. Not for production use.
@_spi(Simulation)
public protocol SessionEntropy: Sendable {
    func next() -> UInt64
}

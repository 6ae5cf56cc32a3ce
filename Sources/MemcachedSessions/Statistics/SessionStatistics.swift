import Atomics
import CoreMetrics
import NIOCore

/// The session manager's counters and timers (MSM's statistics): kept as atomics for
/// ``SessionManager/statistics`` snapshots and the status page, and reported through swift-metrics
/// (labels never carry a session id or an attribute value).
public final class SessionStatistics: Sendable {
    /// A counter's identity.
    public enum Counter: String, CaseIterable, Sendable, Codable {
        case requestsWithSession = "requests_with_session"
        case requestsWithoutSession = "requests_without_session"
        case requestsIgnored = "requests_ignored"
        case sessionsCreated = "sessions_created"
        case sessionsLoaded = "sessions_loaded"
        case sessionsLoadedLocally = "sessions_loaded_locally"
        /// Sticky: a local copy found older than memcached's (changed by another instance).
        case localCopiesReplaced = "local_copies_replaced"
        case sessionsNotFound = "sessions_not_found"
        case sessionsExpired = "sessions_expired"
        case sessionsInvalidated = "sessions_invalidated"
        case sessionsRegenerated = "sessions_regenerated"
        case writes = "writes"
        case writesSkipped = "writes_skipped"
        case writeConflicts = "write_conflicts"
        case writeFailures = "write_failures"
        case writesAsynchronous = "writes_asynchronous"
        case touches = "touches"
        case backupWrites = "backup_writes"
        case backupTouches = "backup_touches"
        case backupRepairs = "backup_repairs"
        case backupFailures = "backup_failures"
        case memcachedFailovers = "memcached_failovers"
        case appServerFailovers = "app_server_failovers"
        case takeovers = "takeovers"
        case relocations = "relocations"
        /// Non-sticky: a session missing from a node that restarted, restored from its backup.
        case sessionsRestored = "sessions_restored"
        case locksAcquired = "locks_acquired"
        case lockWaits = "lock_waits"
        case lockFailures = "lock_failures"
        case lockRenewals = "lock_renewals"
        case lockReleaseFailures = "lock_release_failures"
        case requestsUnlockedReadOnly = "requests_unlocked_read_only"
        case corruptSessions = "corrupt_sessions"
        case oversizedSessions = "oversized_sessions"
        case unavailable = "unavailable"
        case bytesWritten = "bytes_written"
        case bytesRead = "bytes_read"
        /// Memcached round trips a request waited for (writes it does not wait for are not counted).
        case memcachedRoundTrips = "memcached_round_trips"
    }

    /// A timer's identity.
    public enum Timer: String, CaseIterable, Sendable, Codable {
        /// Reading a session from memcached (including lock acquisition).
        case load = "load"
        /// Writing a session to memcached, as the request waits for it.
        case write = "write"
        /// Waiting for a lock held by another request.
        case lockWait = "lock_wait"
        /// The manager's own time at the end of a request.
        case end = "end"
    }

    /// The counters and timers at one moment.
    public struct Snapshot: Sendable, Codable, Hashable {
        public var counters: [String: Int]
        /// Per timer: count, total and maximum in microseconds.
        public var timers: [String: TimerSnapshot]
    }

    public struct TimerSnapshot: Sendable, Codable, Hashable {
        public var count: Int
        public var totalMicroseconds: Int
        public var maximumMicroseconds: Int

        /// Mean duration in microseconds (0 when nothing was timed).
        public var meanMicroseconds: Double {
            count == 0 ? 0 : Double(totalMicroseconds) / Double(count)
        }
    }

    let enabled: Bool
    private let counters: [ManagedAtomic<Int>]
    private let metricCounters: [CoreMetrics.Counter]
    private let timerCounts: [ManagedAtomic<Int>]
    private let timerTotals: [ManagedAtomic<Int>]
    private let timerMaxima: [ManagedAtomic<Int>]
    private let metricTimers: [CoreMetrics.Timer]

    init(enabled: Bool, factory: any MetricsFactory) {
        self.enabled = enabled
        counters = Counter.allCases.map { _ in ManagedAtomic(0) }
        metricCounters = Counter.allCases.map {
            CoreMetrics.Counter(label: "msm_\($0.rawValue)_total", dimensions: [], factory: factory)
        }
        timerCounts = Timer.allCases.map { _ in ManagedAtomic(0) }
        timerTotals = Timer.allCases.map { _ in ManagedAtomic(0) }
        timerMaxima = Timer.allCases.map { _ in ManagedAtomic(0) }
        metricTimers = Timer.allCases.map {
            CoreMetrics.Timer(label: "msm_\($0.rawValue)_duration_seconds", dimensions: [], factory: factory)
        }
    }

    private static let counterIndex: [Counter: Int] = Dictionary(
        uniqueKeysWithValues: Counter.allCases.enumerated().map { ($1, $0) })
    private static let timerIndex: [Timer: Int] = Dictionary(uniqueKeysWithValues: Timer.allCases.enumerated().map { ($1, $0) })

    /// Adds to a counter.
    func count(_ counter: Counter, _ amount: Int = 1) {
        guard enabled, amount != 0 else { return }
        let index = Self.counterIndex[counter]!  // every case is in the table
        counters[index].wrappingIncrement(by: amount, ordering: .relaxed)
        metricCounters[index].increment(by: Int64(amount))
    }

    /// Records a duration.
    func time(_ timer: Timer, since start: NIODeadline) {
        guard enabled else { return }
        let nanoseconds = (NIODeadline.now() - start).nanoseconds
        let index = Self.timerIndex[timer]!  // every case is in the table
        let micros = Int(nanoseconds / 1000)
        timerCounts[index].wrappingIncrement(ordering: .relaxed)
        timerTotals[index].wrappingIncrement(by: micros, ordering: .relaxed)
        var current = timerMaxima[index].load(ordering: .relaxed)
        while micros > current {
            let (exchanged, original) = timerMaxima[index].weakCompareExchange(
                expected: current, desired: micros, ordering: .relaxed)
            if exchanged { break }
            current = original
        }
        metricTimers[index].recordNanoseconds(nanoseconds)
    }

    /// The current value of one counter.
    public func value(of counter: Counter) -> Int {
        counters[Self.counterIndex[counter]!].load(ordering: .relaxed)
    }

    /// Every counter and timer now.
    public func snapshot() -> Snapshot {
        var counterValues: [String: Int] = [:]
        for (index, counter) in Counter.allCases.enumerated() {
            counterValues[counter.rawValue] = counters[index].load(ordering: .relaxed)
        }
        var timers: [String: TimerSnapshot] = [:]
        for (index, timer) in Timer.allCases.enumerated() {
            timers[timer.rawValue] = TimerSnapshot(
                count: timerCounts[index].load(ordering: .relaxed), totalMicroseconds: timerTotals[index].load(ordering: .relaxed),
                maximumMicroseconds: timerMaxima[index].load(ordering: .relaxed))
        }
        return Snapshot(counters: counterValues, timers: timers)
    }
}

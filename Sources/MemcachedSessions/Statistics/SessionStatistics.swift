import Atomics
import CoreMetrics
import NIOCore

/// The session manager's counters and timers (MSM's statistics): kept as atomics for
/// ``SessionManager/statistics`` snapshots and the status page, and reported through swift-metrics
/// (labels never carry a session id or an attribute value).
public final class SessionStatistics: Sendable {
    /// A counter's identity.
    public enum Counter: Int, CaseIterable, Sendable {
        /// A request whose session cookie is a well-formed session id.
        case requestsWithSession
        /// A request with no session cookie, or one that is not a well-formed session id.
        case requestsWithoutSession
        /// A request on a path the ignore pattern matches: no session work at all.
        case requestsIgnored
        /// A new session created (`loadOrCreate()` found none, or `create()`).
        case sessionsCreated
        /// A session read from memcached and served.
        case sessionsLoaded
        /// Sticky: a session served from this instance's memory.
        case sessionsLoadedLocally
        /// Sticky: a local copy found older than memcached's (changed by another instance).
        case localCopiesReplaced
        /// A session id whose session was not found (ended, expired, evicted, never there), or that ended
        /// while the request ran.
        case sessionsNotFound
        /// A session found past its idle or absolute timeout (sticky: also local copies swept once expired).
        case sessionsExpired
        /// A session ended by its own request (a logout).
        case sessionsInvalidated
        /// A session given a new id (a login's `regenerateID()`).
        case sessionsRegenerated
        /// A session's primary copy written to memcached.
        case writes
        /// A request that opened its session and changed nothing: no write.
        case writesSkipped
        /// A CAS write that found the stored copy changed by another request: merged and written again, or
        /// refused.
        case writeConflicts
        /// A session write that failed: no answer, refused by the server (an error such as out of memory), no
        /// node to make it on, a failed read or lock after a conflict, or the CAS race lost too many times.
        case writeFailures
        /// Sticky with asynchronous saves: a changed session queued for the writer.
        case writesAsynchronous
        /// A session's TTL slid without a write (a request that did not change it).
        case touches
        /// A session's backup copy written (or sent to be) on the next node.
        case backupWrites
        /// A backup copy's TTL slid along with its primary's.
        case backupTouches
        /// A missing or older backup copy written again from the primary.
        case backupRepairs
        /// A backup write that failed (left for later when the node did not answer).
        case backupFailures
        /// A backup write found the copy there as new or newer (written by a later save), or a
        /// tombstone: it left it alone.
        case backupsOutdated
        /// Non-sticky: two copies of the session, each with changes the other lacks, met and
        /// merged (the primary written again): a save's backup write found a copy of the same
        /// version with other bytes there (two writes gave the session one version, one of them
        /// after its copy was lost); or a session moved off a node this instance could not reach
        /// met a change another request saved there meanwhile (in the backup it was moved from,
        /// read again after the move's write, or in the old copy, once the node answers again).
        case backupForks
        /// A session moved off a memcached node that did not answer (or was removed).
        case memcachedFailovers
        /// Sticky: a session loaded from memcached on the instance its route names (or with no routes): it
        /// was not in that instance's memory (restarted, or evicted from memory).
        case appServerFailovers
        /// Sticky: a session loaded from memcached on an instance its route does not name: taken over from
        /// that instance (told to drop its copy, when the id names a route).
        case takeovers
        /// A session given a new node and id (a failover, a drained or removed node).
        case relocations
        /// Non-sticky: a session missing from a node that restarted, restored from its backup.
        case sessionsRestored
        /// Sticky: a takeover that missed on a node restarted a moment ago, and waited for the
        /// previous owner to write its copy back.
        case restoreWaits
        /// A session lock taken (non-sticky locking).
        case locksAcquired
        /// A lock attempt that could not take the lock at once (held by another request, or its write failed
        /// with a server error) and waited (a lock taken again may count twice in one request).
        case lockWaits
        /// A request that did not get its lock within the lock wait budget, or whose lock ran out while its
        /// node did not answer (failure policy `.fail`).
        case lockFailures
        /// A held lock's lease extended for a long request.
        case lockRenewals
        /// A lock release acknowledged by memcached.
        case locksReleased
        /// A lock release that failed (the lock expires with its TTL).
        case lockReleaseFailures
        /// A release found the lock's CAS unique changed (a renewal raced it) and read the lock
        /// back: deleted if it still held the request's token, left alone if not.
        case lockReleaseRaces
        /// A locked request's lock was lost (expired, or taken) before its write: re-taken when
        /// the session had not changed meanwhile, else the write refused.
        case locksLost
        /// Non-sticky: a read that failed on a node still marked up, tried once more.
        case readRetries
        /// Non-sticky: an unlocked write whose outcome was unknown (no reply), tried once more.
        case writeRetries
        /// A locked request's write refused: a change its lock did not keep out came first.
        case lockConflicts
        /// Non-sticky, auto locking: a request with a session run unlocked (a path learned to only read, or
        /// an adapter that opts out of locking).
        case requestsUnlockedReadOnly
        /// A stored copy that could not be decoded: read as missing.
        case corruptSessions
        /// Sealing: a sealed copy that did not open (tampered, truncated, copied under another
        /// session or prefix): read as missing and deleted.
        case sealedOpenFailures
        /// Sealing: a copy sealed with a key this instance does not hold (retired too early, or
        /// not yet given to it): read as missing, left in place.
        case sealedUnknownKeys
        /// Sealing: a copy that is not sealed, outside a rolling upgrade's window: read as missing.
        case unsealedRefused
        /// Sealing: a session opened with an older key (or unsealed, in a rolling upgrade) and
        /// sealed again with the current key although the request did not change it.
        case sessionsResealed
        /// A storage-key transition's window: a session found under its earlier (SHA-256) key
        /// and moved to its keyed one.
        case sessionsMovedToKeyedKeys
        /// A session too large for the memcached item size limit: not written (the stored copy is unchanged).
        case oversizedSessions
        /// A request whose session could not be served or saved as it should: its nodes did not answer (the
        /// unavailable policy applied), its write's outcome is unknown, its lock was lost before its write
        /// landed, a newer copy it should merge onto was lost, a merge with another copy of the same version
        /// could not be written, or the session kept moving while it ran.
        case unavailable
        /// A copy left on a node that did not answer (an old primary after a move, a logout's
        /// tombstone), remembered to be dealt with when it answers again.
        case leftoversQueued
        /// Such a copy dealt with.
        case leftoversCleaned
        /// Such a copy forgotten for room (bounded memory; it expires with its TTL); a move's
        /// pending merge given up at its deadline (logged as a warning); a merge floor forgotten
        /// for room (a later merge may then merge a change twice); the correction of a backup touch
        /// that may have landed late given up once the end it meant has passed while its primary's
        /// node does not answer (a late backup write whose end has passed is dropped uncounted: its
        /// copy has expired).
        case leftoversDropped
        /// Sticky: a new session refused because memory is full of unsaved sessions.
        case localStoreRefusals
        /// Sticky: notices sent to a session's previous owner (a takeover, or an ending).
        case noticesSent
        /// Sticky: local copies dropped on a notice (another instance took the session over).
        case noticesRead
        /// Sticky: an ending whose notice the previous owner, alive, did not read within a second.
        case noticesUnread
        /// Sticky: an ending that did not wait for the previous owner: it had not read an earlier
        /// notice in time, and its heartbeat has not been refreshed since (crashed, or frozen).
        case noticeWaitsSkipped
        /// Sticky: this instance did not run for a while (frozen): every local copy is checked
        /// against memcached before it is served again.
        case noticeGaps
        /// Principal index: an entry added or removed (a login, a logout, a new id).
        case principalIndexUpdates
        /// Principal index: a CAS write that found the index changed meanwhile (tried again).
        case principalIndexConflicts
        /// Principal index: an update that could not be made (neither node answered).
        case principalIndexFailures
        /// Sessions ended by ``SessionManager/invalidateAll(principal:)``.
        case sessionsRevoked
        /// Sessions logged out to keep a principal within its index bound or its concurrent
        /// session limit.
        case principalLimitLogouts
        /// Logins refused at the concurrent session limit.
        case principalLoginsRefused
        /// Bytes of primary session copies written.
        case bytesWritten
        /// Bytes of session copies read.
        case bytesRead
        /// Memcached round trips a request waited for (writes it does not wait for are not counted).
        case memcachedRoundTrips
        /// Sticky: a logout of a session this instance did not find whose owner was not told
        /// (over the budget of such notices a second; the owner finds the tombstones itself).
        case unfoundNoticesSkipped
        // New cases go last: the raw values of the cases before stay as they were. Each needs a
        // doc comment, and its row in docs/operations.md's table (CountersDocumentedTests).
        /// Meta mode: a backup written over this instance's own last write of it with that write's
        /// CAS unique, in one round trip, without reading the backup's version first.
        case backupsWrittenWithoutRead

        /// The name in snapshots and metrics (`msm_<name>_total`): snake case.
        public var name: String { SessionStatistics.counterNames[rawValue] }
    }

    /// A timer's identity.
    public enum Timer: Int, CaseIterable, Sendable {
        /// Reading a session from memcached (including lock acquisition).
        case load
        /// Writing a session to memcached, as the request waits for it.
        case write
        /// Waiting for a lock held by another request.
        case lockWait
        /// The manager's own time at the end of a request.
        case end

        public var name: String { SessionStatistics.timerNames[rawValue] }
    }

    /// The counters and timers at one moment.
    public struct Snapshot: Sendable, Codable, Hashable {
        public var counters: [String: Int]
        /// Per timer: count, total and maximum in microseconds.
        public var timers: [String: TimerSnapshot]
        /// Sealing: sessions opened per key id (hex) of the key ring; nil without sealing. A key
        /// that stays at zero while its successor is current can be retired.
        public var sealedOpensByKey: [String: Int]? = nil
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

    static func snakeCase(_ name: String) -> String {
        var result = ""
        for character in name {
            if character.isUppercase {
                result += "_" + character.lowercased()
            } else {
                result.append(character)
            }
        }
        return result
    }

    static let counterNames: [String] = Counter.allCases.map { snakeCase(String(describing: $0)) }
    static let timerNames: [String] = Timer.allCases.map { snakeCase(String(describing: $0)) }

    let enabled: Bool
    private let counters: [ManagedAtomic<Int>]
    private let metricCounters: [CoreMetrics.Counter]
    private let timerCounts: [ManagedAtomic<Int>]
    private let timerTotals: [ManagedAtomic<Int>]
    private let timerMaxima: [ManagedAtomic<Int>]
    private let metricTimers: [CoreMetrics.Timer]

    let sealer: SessionSealer?

    init(enabled: Bool, factory: any MetricsFactory, sealer: SessionSealer? = nil) {
        self.enabled = enabled
        self.sealer = sealer
        counters = Counter.allCases.map { _ in ManagedAtomic(0) }
        metricCounters = Counter.allCases.map {
            CoreMetrics.Counter(label: "msm_\($0.name)_total", dimensions: [], factory: factory)
        }
        timerCounts = Timer.allCases.map { _ in ManagedAtomic(0) }
        timerTotals = Timer.allCases.map { _ in ManagedAtomic(0) }
        timerMaxima = Timer.allCases.map { _ in ManagedAtomic(0) }
        metricTimers = Timer.allCases.map {
            CoreMetrics.Timer(label: "msm_\($0.name)_duration_seconds", dimensions: [], factory: factory)
        }
    }

    /// Adds to a counter.
    func count(_ counter: Counter, _ amount: Int = 1) {
        guard enabled, amount != 0 else { return }
        let index = counter.rawValue
        counters[index].wrappingIncrement(by: amount, ordering: .relaxed)
        metricCounters[index].increment(by: Int64(amount))
    }

    /// Records a duration.
    func time(_ timer: Timer, since start: NIODeadline) {
        guard enabled else { return }
        let nanoseconds = (NIODeadline.now() - start).nanoseconds
        let index = timer.rawValue
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
        counters[counter.rawValue].load(ordering: .relaxed)
    }

    /// Every counter and timer now.
    public func snapshot() -> Snapshot {
        var counterValues: [String: Int] = [:]
        for (index, counter) in Counter.allCases.enumerated() {
            counterValues[counter.name] = counters[index].load(ordering: .relaxed)
        }
        var timers: [String: TimerSnapshot] = [:]
        for (index, timer) in Timer.allCases.enumerated() {
            timers[timer.name] = TimerSnapshot(
                count: timerCounts[index].load(ordering: .relaxed), totalMicroseconds: timerTotals[index].load(ordering: .relaxed),
                maximumMicroseconds: timerMaxima[index].load(ordering: .relaxed))
        }
        return Snapshot(counters: counterValues, timers: timers, sealedOpensByKey: sealer?.opensByKey())
    }
}

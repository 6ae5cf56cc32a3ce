import Memcached

/// How long a session's copies may be around, in one place: the backup's refresh window and TTL
/// margin, how often a sticky instance slides memcached's TTL, a tombstone's TTL, how long a
/// removed node is still read, and how long after a node's restart a miss may be that restart's
/// loss all derive from it.
enum CopyLifetimes {
    /// The idle timeout assumed, where a bound is needed, for sessions that have none (their
    /// copies never expire from inactivity; a tombstone, a drain or a restart window must end).
    static let unboundedIdleSeconds: Int64 = 24 * 3600
    /// memcached's longest relative TTL (longer ones are absolute times): a tombstone's ceiling.
    static let longestRelativeTTLSeconds: Int64 = 30 * 24 * 3600

    /// How often a copy is refreshed (a read-only session's backup; a sticky session's TTL): a
    /// quarter of the idle timeout, between 1 second and 5 minutes (5 minutes without one).
    static func refreshWindowSeconds(idle: Int64) -> Int64 {
        idle > 0 ? min(max(idle / 4, 1), longestRefreshWindowSeconds) : longestRefreshWindowSeconds
    }

    /// The longest refresh window, whatever the idle timeout.
    static let longestRefreshWindowSeconds: Int64 = 300

    /// How long after its last refresh a copy of a session idle for `idle` seconds at most may
    /// still be stored: the idle timeout plus two refresh windows (a backup's TTL margin).
    static func horizonSeconds(idle: Int64) -> Int64 {
        let idle = idle > 0 ? idle : unboundedIdleSeconds
        return idle + 2 * refreshWindowSeconds(idle: idle)
    }

    /// How long a tombstone stays: longer than any copy of the session could still be around,
    /// under the default idle timeout or the session's own when it is known (a "remember me"
    /// session's copies outlive the default's horizon), plus a minute; at most 30 days.
    static func tombstoneSeconds(defaultIdle: Int64, sessionIdle: Int64?) -> Int64 {
        let horizon = max(horizonSeconds(idle: defaultIdle), sessionIdle.map { horizonSeconds(idle: $0) } ?? 0)
        return min(horizon + 60, longestRelativeTTLSeconds)
    }
}

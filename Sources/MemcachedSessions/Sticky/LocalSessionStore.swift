import NIOCore
import Synchronization

/// A sticky instance's sessions in memory: bounded (the least recently used go first when it is
/// full; they remain in memcached) and expiring (idle sessions are swept).
///
/// Sharded by token so that concurrent requests rarely contend on one lock.
final class LocalSessionStore: Sendable {
    struct Entry: Sendable {
        let session: MemcachedSession
        /// Milliseconds since 1970 of the last request.
        var lastAccess: Int64
        /// When memcached's TTL was last slid or the session written (monotonic).
        var lastStoreRefresh: NIODeadline
    }

    private static let shardCount = 16
    private let shards: [LockedBox<[MemcachedSessionID.Token: Entry]>]
    private let capacityPerShard: Int

    init(capacity: Int) {
        shards = (0..<Self.shardCount).map { _ in LockedBox([:]) }
        capacityPerShard = max(1, (capacity + Self.shardCount - 1) / Self.shardCount)
    }

    private func shard(_ token: MemcachedSessionID.Token) -> LockedBox<[MemcachedSessionID.Token: Entry]> {
        shards[Int(token.low % UInt64(Self.shardCount))]
    }

    /// The session, if held and not idle-expired at `now`; marks it accessed.
    func access(_ token: MemcachedSessionID.Token, now: Int64) -> (session: MemcachedSession, lastStoreRefresh: NIODeadline)? {
        shard(token).withLock { entries -> (MemcachedSession, NIODeadline)? in
            guard var entry = entries[token] else { return nil }
            let idle = entry.session.metadata.idleTimeoutSeconds
            if idle > 0, now - entry.lastAccess >= idle * 1000 {
                entries[token] = nil
                return nil
            }
            entry.lastAccess = now
            entries[token] = entry
            return (entry.session, entry.lastStoreRefresh)
        }
    }

    /// The held sessions whose id names `nodeID`, with their last access (milliseconds since 1970).
    func sessions(on nodeID: String) -> [(session: MemcachedSession, lastAccess: Int64)] {
        shards.flatMap { shard in
            shard.withLock { entries in
                entries.values.filter { $0.session.id.nodeID == nodeID }.map { ($0.session, $0.lastAccess) }
            }
        }
    }

    /// Adds or replaces a session. Evicts the least recently used sixteenth of the shard when full.
    /// Sessions with unsaved changes are never evicted: when the shard holds nothing else, a new
    /// token is refused (returns false), unless `force` (a session moving to a new token, which
    /// adds nothing overall).
    @discardableResult
    func put(_ session: MemcachedSession, token: MemcachedSessionID.Token, now: Int64, refreshed: NIODeadline, force: Bool = false) -> Bool {
        shard(token).withLock { entries in
            if entries[token] == nil, entries.count >= capacityPerShard {
                Self.evictOldest(&entries, count: max(1, capacityPerShard / 16))
                if entries.count >= capacityPerShard, !force { return false }
            }
            entries[token] = Entry(session: session, lastAccess: now, lastStoreRefresh: refreshed)
            return true
        }
    }

    /// The session held for `token` if it was loaded or saved at `since` or later (by a request
    /// running concurrently with the one asking).
    func held(_ token: MemcachedSessionID.Token, refreshedSince since: NIODeadline) -> MemcachedSession? {
        shard(token).withLock { entries in
            guard let entry = entries[token], entry.lastStoreRefresh >= since else { return nil }
            return entry.session
        }
    }

    /// Adds a session just loaded from memcached, unless a concurrent request (one that began
    /// after `since`... or at it) already put one: then that one is returned, so that concurrent
    /// requests of one session on this instance share one copy. Nil when full (see ``put``).
    func adopt(_ session: MemcachedSession, token: MemcachedSessionID.Token, now: Int64, refreshed: NIODeadline, since: NIODeadline) -> MemcachedSession? {
        shard(token).withLock { entries in
            if let entry = entries[token], entry.lastStoreRefresh >= since { return entry.session }
            if wasEnded(token) { return session.endedHere() }
            if entries[token] == nil, entries.count >= capacityPerShard {
                Self.evictOldest(&entries, count: max(1, capacityPerShard / 16))
                if entries.count >= capacityPerShard { return nil }
            }
            entries[token] = Entry(session: session, lastAccess: now, lastStoreRefresh: refreshed)
            return session
        }
    }

    /// Whether the session is held and memcached saw it within `interval` (no revalidation due).
    func holdsFresh(_ token: MemcachedSessionID.Token, within interval: TimeAmount, now: NIODeadline) -> Bool {
        shard(token).withLock { entries in
            guard let entry = entries[token] else { return false }
            return now - entry.lastStoreRefresh < interval
        }
    }

    func markRefreshed(_ token: MemcachedSessionID.Token, at deadline: NIODeadline) {
        shard(token).withLock { entries in
            entries[token]?.lastStoreRefresh = deadline
        }
    }

    /// Every session is to be checked against memcached before it is served again (this
    /// instance missed its ownership notices for a while: it was frozen, or cut off).
    func markAllStale() {
        for shard in shards {
            shard.withLock { entries in
                for token in entries.keys { entries[token]?.lastStoreRefresh = .distantPast }
            }
        }
    }

    /// Tokens this instance ended (a logout, a login's old id), and when: a copy read from
    /// memcached before the end's tombstones landed must not be adopted after it (the ended
    /// session would live on in memory). Tokens are random and never reused, so no live copy of
    /// an ended token exists. Kept a minute, at most 10,000.
    private let ended = Mutex<[MemcachedSessionID.Token: NIODeadline]>([:])

    func end(_ token: MemcachedSessionID.Token, at deadline: NIODeadline) {
        remove(token)
        ended.withLock { ended in
            if ended.count >= 10_000 {
                let cutoff = deadline - .seconds(60)
                ended = ended.filter { $0.value >= cutoff }
                if ended.count >= 10_000 { ended.removeAll() }
            }
            ended[token] = deadline
        }
    }

    private func wasEnded(_ token: MemcachedSessionID.Token) -> Bool {
        ended.withLock { ended in ended[token] != nil }
    }

    func remove(_ token: MemcachedSessionID.Token) {
        _ = shard(token).withLock { $0.removeValue(forKey: token) }
    }

    /// Removes `session` only if it is still the one held for `token`.
    func remove(_ token: MemcachedSessionID.Token, ifSame session: MemcachedSession) {
        shard(token).withLock { entries in
            if entries[token]?.session === session { entries[token] = nil }
        }
    }

    var count: Int { shards.reduce(0) { $0 + $1.withLock { $0.count } } }

    /// Whether some shard would take a new session now: it has room, or holds a session without
    /// unsaved changes to evict (see ``put(_:token:now:refreshed:force:)``). A new token lands in
    /// one shard by its hash, so near the bound some new sessions are refused while others fit.
    var acceptsNewSessions: Bool {
        shards.contains { shard in
            shard.withLock { entries in
                entries.count < capacityPerShard || entries.values.contains { !$0.session.hasUnsavedChanges }
            }
        }
    }

    /// Every held session (for flushing on shutdown).
    var allSessions: [MemcachedSession] {
        shards.flatMap { $0.withLock { $0.values.map(\.session) } }
    }

    /// Drops idle-expired sessions; returns how many.
    func sweep(now: Int64) -> Int {
        var removed = 0
        for shard in shards {
            shard.withLock { entries in
                let before = entries.count
                entries = entries.filter { _, entry in
                    let idle = entry.session.metadata.idleTimeoutSeconds
                    return idle <= 0 || now - entry.lastAccess < idle * 1000
                }
                removed += before - entries.count
            }
        }
        return removed
    }

    private static func evictOldest(_ entries: inout [MemcachedSessionID.Token: Entry], count: Int) {
        // O(n log n) once per capacityPerShard/16 insertions: amortised, and only when full.
        // Sessions with unsaved changes stay: memory is their only copy until the writer is done.
        let oldest = entries.filter { !$0.value.session.hasUnsavedChanges }
            .sorted { $0.value.lastAccess < $1.value.lastAccess }.prefix(count).map(\.key)
        for token in oldest { entries[token] = nil }
    }
}

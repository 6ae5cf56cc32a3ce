import NIOCore
import Synchronization

/// When this instance last wrote or refreshed each session's backup copy, and on which node.
///
/// A non-sticky read slides the primary's TTL; the backup, written with a TTL two refresh windows
/// longer, is refreshed (a touch the request does not wait for) only when this instance has not
/// done so within a window on the node that is the backup node *now*. So a read-only session's
/// backup always outlives its primary, at the cost of one quiet touch per session, instance and
/// window instead of one per request. Bounded: when full, half of it is forgotten (which costs at
/// most an early refresh).
final class BackupMemo: Sendable {
    private struct Entry {
        var node: String
        var at: NIODeadline
        /// This instance's last backup write of the session there, while it is recent enough to
        /// be trusted: its CAS unique and its flags (the session's version).
        var written: Written?
    }

    /// A backup write this instance made, as memcached acknowledged it.
    struct Written: Equatable {
        var cas: UInt64
        var flags: UInt32
        /// The node's connection generation before the write was sent: the next write with this
        /// CAS unique goes only over a connection at least as old (one that reaches the same run
        /// of memcached: see ``Memcached/MemcachedRequest/connectionGenerationLimit``).
        var generation: UInt64
        var at: NIODeadline
    }

    /// How long a write's CAS unique is used for the next write without reading first (a session
    /// busy enough to gain from it comes back sooner).
    static let writtenLifetime: TimeAmount = .seconds(30)

    private static let shardCount = 8
    private let shards: [LockedBox<[String: Entry]>]
    private let limitPerShard: Int
    private let clock: any SessionClock

    init(limit: Int, clock: any SessionClock = SystemSessionClock()) {
        self.clock = clock
        shards = (0..<Self.shardCount).map { _ in LockedBox([:]) }
        limitPerShard = max(16, limit / Self.shardCount)
    }

    private func shard(_ key: String) -> LockedBox<[String: Entry]> {
        // The key ends in hex digest characters: the last byte is uniformly distributed.
        shards[Int(key.utf8.last ?? 0) % Self.shardCount]
    }

    /// Records a backup write or refresh of `key` on `node` now, and returns this instance's last
    /// acknowledged write of it there if recent (``writtenLifetime``), in the same lookup.
    @discardableResult
    func record(_ key: String, node: String) -> Written? {
        let now = clock.now()
        return shard(key).withLock { entries in
            // One hash of the key for a session seen before (the usual case), not three.
            guard let index = entries.index(forKey: key) else {
                Self.makeRoom(in: &entries, limit: limitPerShard)
                entries[key] = Entry(node: node, at: now, written: nil)
                return nil
            }
            let entry = entries.values[index]
            let written = entry.node == node ? entry.written : nil
            entries.values[index] = Entry(node: node, at: now, written: written)
            guard let written, now - written.at < Self.writtenLifetime else { return nil }
            return written
        }
    }

    /// Before a new key goes in: when the shard is full, half of it goes (the oldest inserted are
    /// not tracked: any half will do for a memo whose misses cost a read).
    private static func makeRoom(in entries: inout [String: Entry], limit: Int) {
        guard entries.count >= limit else { return }
        for stale in entries.keys.prefix(limit / 2) { entries[stale] = nil }
    }

    /// Remembers an acknowledged backup write on `node` (its CAS unique and flags).
    func wrote(_ key: String, node: String, cas: UInt64, flags: UInt32, generation: UInt64) {
        let now = clock.now()
        let written = Written(cas: cas, flags: flags, generation: generation, at: now)
        shard(key).withLock { entries in
            guard let index = entries.index(forKey: key) else {
                Self.makeRoom(in: &entries, limit: limitPerShard)
                entries[key] = Entry(node: node, at: now, written: written)
                return
            }
            let entry = entries.values[index]
            entries.values[index] = Entry(node: node, at: entry.node == node ? entry.at : now, written: written)
        }
    }

    /// Forgets what was written on a node seen to restart (its connections, closed by the restart,
    /// keep the CAS uniques from being used anyway).
    func forgetWrites(on node: String) {
        for shard in shards {
            shard.withLock { entries in
                for (key, entry) in entries where entry.node == node && entry.written != nil {
                    entries[key]?.written = nil
                }
            }
        }
    }

    /// Whether the backup on `node` needs a refresh (not refreshed here within `window`).
    func needsRefresh(_ key: String, node: String, window: Duration) -> Bool {
        let now = clock.now()
        return shard(key).withLock { entries in
            guard let entry = entries[key], entry.node == node else { return true }
            return now - entry.at >= TimeAmount(window)
        }
    }

    func forget(_ key: String) {
        _ = shard(key).withLock { $0.removeValue(forKey: key) }
    }
}

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
    }

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

    func record(_ key: String, node: String) {
        let now = clock.now()
        shard(key).withLock { entries in
            if entries.count >= limitPerShard, entries[key] == nil {
                for stale in entries.keys.prefix(limitPerShard / 2) { entries[stale] = nil }
            }
            entries[key] = Entry(node: node, at: now)
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

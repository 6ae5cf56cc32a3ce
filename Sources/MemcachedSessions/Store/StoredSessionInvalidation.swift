import Memcached
import NIOCore

/// What ``SessionManager/invalidateStored(keys:on:)`` did.
public struct StoredSessionInvalidation: Sendable, Hashable {
    /// Live copies (primary or backup, not tombstones) found and ended.
    public var copiesEnded: Int
    /// Nodes that did not answer: copies there may still be alive.
    public var unreachableNodes: [String]
}

extension SessionManager {
    /// Ends a stored session from outside any instance (`msm session delete`), the way a logout
    /// does: on every node, the primary and backup keys get a tombstone and the lock is deleted.
    /// A sticky instance still holding the session in memory then learns at its next check that
    /// it was invalidated (a bare delete would look like a copy lost by a restart, which the
    /// instance restores from memory), and no backup can bring it back.
    ///
    /// The tombstones outlive every copy found (their remaining TTL, plus the longest sticky check
    /// interval and backup refresh windows), at most 30 days.
    public static func invalidateStored(keys: SessionKeys, on client: MemcachedClient) async -> StoredSessionInvalidation {
        var ended = 0
        var unreachable: [String] = []
        var longest: Int64 = 0
        var neverExpires = false
        let nodes = client.allNodes
        // First look: which copies are alive, and how long they would live.
        for node in nodes {
            var primary = MemcachedRequest.getMetadata(keys.primary)
            var backup = MemcachedRequest.getMetadata(keys.backup)
            primary.honorsCancellation = false
            backup.honorsCancellation = false
            let results = await node.executeBatch([primary, backup])
            for result in results {
                switch result {
                case .success(.item(let item?)) where item.flags != tombstoneFlags:
                    ended += 1
                    if let ttl = item.timeToLive, ttl >= 0 { longest = max(longest, Int64(ttl)) } else { neverExpires = true }
                case .success:
                    break
                case .failure:
                    if !unreachable.contains(node.id) { unreachable.append(node.id) }
                }
            }
        }
        let month = CopyLifetimes.longestRelativeTTLSeconds
        let seconds = neverExpires ? month : min(longest + 2 * CopyLifetimes.longestRefreshWindowSeconds + 60, month)
        let ttl = MemcachedTTL.seconds(Int(seconds))
        for node in nodes where !unreachable.contains(node.id) {
            var batch = [
                MemcachedRequest.store(keys.primary, value: ByteBuffer(), ttl: ttl, flags: tombstoneFlags),
                MemcachedRequest.store(keys.backup, value: ByteBuffer(), ttl: ttl, flags: tombstoneFlags),
                MemcachedRequest.delete(keys.lock),
            ]
            for index in batch.indices { batch[index].honorsCancellation = false }
            let results = await node.executeBatch(batch)
            if results.prefix(2).contains(where: { if case .failure = $0 { true } else { false } }) {
                if !unreachable.contains(node.id) { unreachable.append(node.id) }
            }
        }
        return StoredSessionInvalidation(copiesEnded: ended, unreachableNodes: unreachable)
    }
}

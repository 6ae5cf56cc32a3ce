import Logging
import Memcached
import NIOCore

extension SessionStore {
    /// What the other nodes hold of a session: the newest copy (a primary left by an earlier
    /// relocation, or a backup), and whether any node holds a tombstone (logged out).
    struct CopySearch {
        var newest: (stored: StoredSession, nodeID: String, isPrimary: Bool)?
        /// The newest copy's remaining TTL in seconds, when it is a backup read in meta mode.
        var newestTimeToLive: Int?
        var tombstone = false
        /// Whether a node searched did not answer.
        var unreachable = false
        /// Whether the copies are under the session's earlier (unkeyed) keys, in a storage-key
        /// transition's window.
        var underEarlierKeys = false
    }

    /// Whether the newest copy found is a backup whose session has been idle past its timeout.
    /// A backup lives `idle + 2 windows` from its last refresh, and every request refreshes it
    /// within a window; so the session was last used at most a window after that refresh, and
    /// when less than a window (and memcached's one-second tick) of the backup's TTL remains, it
    /// has been idle longer than its timeout: it must not come back.
    func isIdleExpired(_ search: CopySearch) -> Bool {
        guard let newest = search.newest, !newest.isPrimary, let remaining = search.newestTimeToLive, remaining >= 0 else {
            return false
        }
        let metadata = newest.stored.record.metadata
        guard metadata.idleTimeoutSeconds > 0 else { return false }
        return Int64(remaining) < Self.backupRefreshWindow(metadata).components.seconds + 1
    }

    /// Reads the session's primary and backup keys on each of `nodes`: one round trip per node,
    /// all nodes in parallel. Bounded by the number of nodes.
    func searchCopies(keys: SessionKeys, on nodes: [String]) async -> CopySearch {
        let meta = configuration.memcached.protocolMode == .meta
        let reads = await withTaskGroup(of: [(String, Bool, StoredRead, Int?)].self) { group in
            for nodeID in nodes {
                guard let node = topology.node(nodeID) else { continue }
                group.addTask {
                    // A backup write or touch left for later there goes first: one that landed
                    // late must not be read with the end it got from its landing.
                    if self.leftovers.count > 0 { await self.cleanLeftovers(on: nodeID, key: keys.backup) }
                    self.countRoundTrip()
                    let results = await node.executeBatch([
                        self.prepared(.get(keys.primary)), self.prepared(.get(keys.backup, withTimeToLive: meta)),
                    ])
                    var reads: [(String, Bool, StoredRead, Int?)] = []
                    for (index, (isPrimary, key)) in [(true, keys.primary), (false, keys.backup)].enumerated() {
                        switch results[index] {
                        case .success(.item(let item?)):
                            if item.flags == Self.tombstoneFlags {
                                reads.append((nodeID, isPrimary, .tombstone, nil))
                            } else {
                                reads.append(
                                    (
                                        nodeID, isPrimary, self.decodeStored(item, key: key, node: node).map { .found($0) } ?? .missing,
                                        item.timeToLive
                                    ))
                            }
                        case .success: reads.append((nodeID, isPrimary, .missing, nil))
                        case .failure(let error): reads.append((nodeID, isPrimary, .unreachable(error), nil))
                        }
                    }
                    return reads
                }
            }
            var all: [(String, Bool, StoredRead, Int?)] = []
            for await part in group { all += part }
            return all
        }
        var search = CopySearch()
        for (nodeID, isPrimary, read, timeToLive) in reads {
            switch read {
            case .found(let stored):
                if let current = search.newest {
                    guard
                        stored.record.metadata.supersedes(
                            current.stored.record.metadata, asPrimary: isPrimary, otherIsPrimary: current.isPrimary)
                    else { continue }
                }
                search.newest = (stored, nodeID, isPrimary)
                search.newestTimeToLive = timeToLive
            case .tombstone: search.tombstone = true
            case .unreachable: search.unreachable = true
            case .missing: break
            }
        }
        return search
    }
}

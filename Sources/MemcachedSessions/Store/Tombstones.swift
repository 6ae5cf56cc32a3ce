import Logging
import Memcached
import NIOCore

extension SessionStore {
    /// Ends a session's stored copies: its primary and backup keys get a tombstone on every node
    /// (after a move, the old primary may be on any node; the backup follows availability), and
    /// its lock is released. A node that does not answer gets its tombstones as soon as it
    /// answers again (``LeftoverCopies``). A tombstone, not a delete: another instance still
    /// holding the session in memory learns it was invalidated (a missing copy would look like
    /// one lost by a restart), and no recovery, backup repair or racing write can bring it back.
    ///
    /// The primary's tombstone on the session's own node is tried once more when its outcome is
    /// unknown and the node is still marked up (the simulation, seed 14016: a logout answered while
    /// its node had dropped the tombstone, and another instance served the session there).
    ///
    /// `cookieNodeID`: the node the request's cookie named, when the session has moved since.
    ///
    /// `sessionIdle` is the session's own idle timeout when it is known: its tombstones outlive
    /// its copies (``CopyLifetimes/tombstoneSeconds(defaultIdle:sessionIdle:)``).
    func deleteCopies(
        keys: SessionKeys, nodeID: String, lock: HeldLock?, wait: Bool, sessionIdle: Int64?, cookieNodeID: String? = nil
    ) async {
        if let lock { locks.forget(lock) }
        backupMemo.forget(keys.backup)
        let deadline = clock.now() + TimeAmount(configuration.memcached.requestTimeout)
        // The nodes where this call's primary tombstone did not land (left for later).
        let missedPrimary = LockedBox(Set<String>())
        let ttl = tombstoneTTL(sessionIdle: sessionIdle)
        let seconds = Int(ttl.wireValue(now: 0))
        func tombstone(_ key: String, quiet: Bool) -> MemcachedRequest {
            var request = tombstoneRequest(key: key, ttl: ttl, quiet: quiet)
            if key == keys.backup { request.connectionAffinity = Self.affinity(of: keys.backup) }
            return request
        }
        /// A tombstone that did not land: left for later, and noted when it is the primary's.
        @Sendable func leave(_ key: String, on node: String) {
            leaveForLater(.tombstone(ttlSeconds: seconds), key: key, on: node)
            if key == keys.primary { missedPrimary.withLock { _ = $0.insert(node) } }
        }
        // The session's own node first, with the lock release: a concurrent write that has not
        // landed yet then finds the tombstone and writes no backup.
        if let node = topology.node(nodeID) {
            var batch = [tombstone(keys.primary, quiet: false)]
            if keepsBackups { batch.append(tombstone(keys.backup, quiet: false)) }
            if let lock { batch.append(prepared(await locks.releaseRequest(lock))) }
            let requests = batch
            let backups = keepsBackups
            let primaryTombstone = requests[0]
            let home = { @Sendable () async in
                let results = await node.executeBatch(requests)
                if let lock { self.locks.releaseAnswered(results[requests.count - 1], lock: lock, node: node) }
                if case .failure(let error) = results[0] {
                    // Once more while the node is marked up (a lost reply, a dropped command).
                    var ended = false
                    if error.leavesOutcomeUnknown, self.topology.isReachable(nodeID),
                        case .success = await node.executeBatch([primaryTombstone])[0]
                    {
                        ended = true
                    }
                    if !ended { leave(keys.primary, on: nodeID) }
                }
                if backups, case .failure = results[1] { leave(keys.backup, on: nodeID) }
            }
            if wait {
                countRoundTrip()
                await home()
            } else {
                Task { await home() }
            }
        }
        // Every other node, the ones that answer now and the others when they answer again. When
        // the caller waits (a logout, a login's old id), it waits for these too, all nodes in
        // parallel: a copy an earlier failover left on another node must be ended before the
        // response, or an old tab's cookie sent right after it could still read it there.
        let keysThere = keepsBackups ? [keys.primary, keys.backup] : [keys.primary]
        var reachable: [(String, any MemcachedNodeCommandRunner)] = []
        for candidate in topology.order where candidate != nodeID {
            guard let other = topology.node(candidate) else { continue }
            guard other.isAvailable else {
                for key in keysThere { leave(key, on: candidate) }
                continue
            }
            reachable.append((candidate, other))
        }
        guard wait else {
            for (candidate, other) in reachable {
                for key in keysThere {
                    await other.submit(tombstone(key, quiet: true)) { result in
                        if case .failure = result { leave(key, on: candidate) }
                    }
                }
            }
            return
        }
        let requests = keysThere.map { tombstone($0, quiet: false) }
        await withTaskGroup(of: Void.self) { group in
            for (candidate, other) in reachable {
                group.addTask {
                    let results = await other.executeBatch(requests)
                    for (key, result) in zip(keysThere, results) {
                        if case .failure = result { leave(key, on: candidate) }
                    }
                }
            }
        }
        // The nodes a cookie of the session names (its own, and the one the request's cookie
        // named before a move) are the ones other instances read it on. One that did not take its
        // tombstone may be marked down here only (faults of other requests) while it answers
        // them, and they would serve the ended copy there: wait, within the request timeout, for
        // it to be probed up and take the tombstone before the response (the simulation,
        // sticky-sync seed 245). This request writes it itself (the periodic loop may hold it,
        // taken but not yet written). A node that stays silent past that gets it when it answers.
        let missed = missedPrimary.withLock { $0 }
        let waiting = Set([nodeID, cookieNodeID].compactMap { $0 }).filter { missed.contains($0) }
        await withDiscardingTaskGroup { group in
            for named in waiting {
                group.addTask { await self.settleTombstone(key: keys.primary, seconds: seconds, on: named, until: deadline) }
            }
        }
    }

    /// Whether some node that answers holds a tombstone for the session (a logout, a login's old
    /// id, `msm session delete`: they leave one on every node).
    func endedOnSomeNode(_ keys: SessionKeys) async -> Bool {
        await searchCopies(keys: keys, on: topology.order.filter { topology.isReachable($0) }).tombstone
    }
}

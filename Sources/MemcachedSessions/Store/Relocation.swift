import Logging
import Memcached
import NIOCore

extension SessionStore {
    /// Saves to `nodeID`; if that node does not answer, moves the session to the next available
    /// node under a new id and saves there. Bounded by the number of nodes.
    func saveWithRelocation(
        _ session: MemcachedSession, keys: SessionKeys, nodeID: String, lock: HeldLock?, forceAdd: Bool, restoreIfMissing: Bool = false
    ) async -> (SaveOutcome, MemcachedSessionID) {
        var nodeID = nodeID
        var lock = lock
        let locked = lock != nil
        var forceAdd = forceAdd
        var tried: Set<String> = []
        var outcome: SaveOutcome = .unreachable(MemcachedError(code: .nodeUnavailable, message: "no node available"))
        var outcomeUnknown = false
        var attempts = 0
        while attempts < max(1, topology.order.count) + 1 {
            attempts += 1
            tried.insert(nodeID)
            outcome = await save(
                session, keys: keys, on: nodeID, releasing: lock, forceAdd: forceAdd, restoreIfMissing: restoreIfMissing)
            if case .moved(let home) = outcome {
                // A concurrent request moved the session off this node while this one ran: its
                // changes go where the session is now, merged onto that copy (an add that finds
                // it, then a merge of this request's own changes only). A locked request's lock
                // did not keep that move out: its changes are refused, as any such conflict.
                lock = nil
                guard !locked, !tried.contains(home) else {
                    statistics.count(.lockConflicts)
                    outcome = .refused(SessionLocks.conflictError)
                    break
                }
                statistics.count(.relocations)
                nodeID = home
                session.setID(session.id.relocated(to: home))
                session.markAllChanged()
                forceAdd = true
                continue
            }
            // Only a node that does not answer is a reason to move; a refusal (a server error) is not.
            guard case .unreachable(let error, let afterConflict) = outcome, error.meansNodeUnreachable else { break }
            if !restoreIfMissing {
                // Non-sticky: the session moves only off a node nobody else can write to. A write
                // that met a concurrent write there first does not move (the node serves other
                // requests). A write whose outcome is unknown (no reply: it may have been applied,
                // and the node may still serve others) is tried once more there, unlocked (a
                // retry finds its own write, if it landed, as a conflict, and merges onto it);
                // after it, the session moves only off a node that refuses connections (dead:
                // what it held is gone). Otherwise the request fails: it may not have been saved.
                if afterConflict { break }
                if error.leavesOutcomeUnknown {
                    guard !outcomeUnknown, !locked, topology.isReachable(nodeID) else { break }
                    outcomeUnknown = true
                    statistics.count(.writeRetries)
                    continue
                }
                if outcomeUnknown, error.code != .connectFailed { break }
            }
            if let held = lock {
                locks.forget(held)
                lock = nil
            }
            guard let next = topology.nextAvailable(after: nodeID, excluding: tried) else { break }
            statistics.count(.relocations)
            statistics.count(.memcachedFailovers)
            logger.notice(
                "session relocated after a failed write",
                metadata: ["memcached.node.failed": "\(nodeID)", "memcached.node.target": "\(next)"])
            events.record(.failover, "sessions moved from \(nodeID) to \(next): a write to \(nodeID) failed")
            leaveOldPrimary(keys: keys, on: nodeID, version: session.metadata.version + 1)
            nodeID = next
            session.setID(session.id.relocated(to: next))
            session.markAllChanged()
            forceAdd = true
            if locked {
                // A locked request moves under the lock of the node it moves to, and only to a
                // node that holds no copy yet: a copy there was put by a request this request's
                // lock did not exclude (it recovered the session meanwhile).
                let relocked: (HeldLock?, StoredRead)
                do {
                    relocked = try await locks.lockAndRead(keys: keys, nodeID: next, touch: nil)
                } catch {
                    return (.refused(error), session.id)
                }
                switch relocked.1 {
                case .missing:
                    lock = relocked.0
                case .found:
                    if let newLock = relocked.0 { await locks.release(newLock) }
                    statistics.count(.lockConflicts)
                    return (.refused(SessionLocks.conflictError), session.id)
                case .tombstone:
                    if let newLock = relocked.0 { await locks.release(newLock) }
                    return (.gone, session.id)
                case .unreachable:
                    if let newLock = relocked.0 { await locks.release(newLock) }
                }
            }
        }
        return (outcome, session.id)
    }
}

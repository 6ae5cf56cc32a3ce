import Memcached
import NIOCore

extension StickyLifecycle {
    /// Sticky: how long after a node's restart its sessions' owners may still be writing them back
    /// from memory: an owner's probe marks the node up again, its restart watch sees the new boot
    /// time on its next round, and then it writes.
    var restoreWindow: Duration {
        NodeRestarts.watchInterval + configuration.memcached.probeInterval + .milliseconds(500)
    }

    /// Sticky, on a takeover's miss: whether the node restarted within ``restoreWindow``, so that
    /// the previous owner may not have written its copy back yet.
    func previousOwnerMayBeRestoring(on nodeID: String) async -> Bool {
        guard await store.missMayBeRestartChecking(on: nodeID) else { return false }
        let seconds = Int64((restoreWindow.components.seconds)) + 1
        return store.nodeRestarts.restarted(nodeID, within: seconds, now: currentTimeMillis() / 1000)
    }

    /// Reads `key` every 100 ms until it is there (or a tombstone, or the node stops answering),
    /// for at most ``restoreWindow``.
    func awaitRestoredCopy(key: String, on nodeID: String, touch: MemcachedTTL?) async -> StoredRead {
        statistics.count(.restoreWaits)
        let deadline = clock.now() + TimeAmount(restoreWindow)
        while true {
            do { try await clock.sleep(for: .milliseconds(100)) } catch { return .missing }
            let read = await store.readStored(key: key, on: nodeID, touch: touch)
            guard case .missing = read, clock.now() < deadline else { return read }
        }
    }

    /// Sticky: `nodeID` restarted empty. Every session this instance holds there is written back
    /// from memory as it is (with an add: never over a copy written meanwhile), for what is left
    /// of its idle timeout since its last use here (a restore is not a use), unless another node
    /// holds a tombstone for it: then it ended elsewhere (its own node lost the tombstone in the
    /// restart) and ends here too. Pipelined in batches of 100.
    func restoreLocalCopies(on nodeID: String) async {
        guard let node = topology.node(nodeID) else { return }
        // Not the new ones: their first save is still to come (queued, or in their request), and
        // a copy written here behind their back would outlive a logout that finds nothing stored
        // (the simulation, seed 950).
        let held = localStore.sessions(on: nodeID).filter {
            !$0.session.isInvalidated && !$0.session.isTakenOver && !$0.session.isNew
        }
        guard !held.isEmpty else { return }
        logger.notice("memcached node restarted: writing this instance's sessions there again", metadata: ["memcached.node": "\(nodeID)"])
        var start = 0
        while start < held.count {
            let chunk = Array(held[start..<min(start + 100, held.count)])
            start += 100
            var ended = Set<ObjectIdentifier>()
            for other in topology.order where other != nodeID && topology.isReachable(other) {
                guard let otherNode = topology.node(other) else { continue }
                let results = await otherNode.executeBatch(chunk.map { prepared(.getMetadata(keys(of: $0.session).primary)) })
                for (entry, result) in zip(chunk, results) {
                    if case .success(.item(let item?)) = result, item.flags == SessionStore.tombstoneFlags {
                        ended.insert(ObjectIdentifier(entry.session))
                    }
                }
            }
            let now = currentTimeMillis()
            var writes: [(MemcachedSession, UInt64, MemcachedRequest)] = []
            for (session, lastAccess) in chunk {
                if ended.contains(ObjectIdentifier(session)) {
                    session.invalidate(byAnotherRequest: true)
                    localStore.remove(session.id.token, ifSame: session)
                    statistics.count(.sessionsNotFound)
                    continue
                }
                let record = session.currentRecord
                var ttl = SessionStore.primaryTTL(record.metadata, now: now)
                let idle = record.metadata.idleTimeoutSeconds
                if idle > 0 {
                    let left = idle - (now - lastAccess) / 1000
                    guard left > 0 else { continue }  // idle-expired: it goes with the restart
                    ttl = .seconds(Int(min(left + 1, SessionStore.primaryTTLSeconds(record.metadata, now: now) ?? left + 1)))
                }
                let keys = self.keys(of: session)
                guard let bytes = try? store.encode(record, key: keys.primary) else { continue }
                let request = MemcachedRequest.store(
                    keys.primary, value: bytes, mode: .add, ttl: ttl, flags: SessionStore.primaryFlags(record.metadata))
                writes.append((session, record.metadata.version, prepared(request)))
            }
            guard !writes.isEmpty else { continue }
            let results = await node.executeBatch(writes.map(\.2))
            for ((session, version, _), result) in zip(writes, results) {
                if case .success(.stored(.stored(let cas))) = result {
                    statistics.count(.sessionsRestored)
                    session.setStoredCasUnique(cas, ifVersion: version)
                }
            }
        }
    }
}

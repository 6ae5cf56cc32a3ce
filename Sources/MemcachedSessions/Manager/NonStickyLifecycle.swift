import Logging
import Memcached
import NIOCore

/// Non-sticky mode: memcached is authoritative. A request reads the session (sliding its TTL in
/// the same round trip, taking the lock in that round trip too when it locks) and, only if it
/// changed, writes it back with CAS to its node, then the backup to the next node (a write the
/// request does not wait for).
///
/// Round trips a request waits for: read-only 1, modifying 2 (read; write with the lock release
/// riding along), new session 1.
extension SessionManager {
    func loadNonSticky(_ access: SessionAccess) async throws(SessionError) -> Session? {
        guard let id = access.requestedID else { return nil }
        // A well-formed id naming a node we do not have is "no session", not "unavailable".
        guard topology.contains(id.nodeID) else {
            statistics.count(.sessionsNotFound)
            return nil
        }
        let keys = self.keys(for: id.token)
        // A copy this instance left there to end (a move, a logout) goes before it can be read.
        if leftovers.count > 0 { await cleanLeftovers(on: id.nodeID, key: keys.primary) }
        let slide = slideTTL
        var read: StoredRead
        var lock: HeldLock? = nil
        var attempt = 0
        var lockToken: String? = nil
        while true {
            if access.locks {
                // The same token on the retry: if the lost reply was the lock's, the lock is ours.
                let token = lockToken ?? newLockToken()
                lockToken = token
                (lock, read) = try await lockAndRead(
                    keys: keys, nodeID: id.nodeID, touch: slide, token: token, mayAlreadyHold: attempt > 0)
            } else {
                read = await readStored(key: keys.primary, on: id.nodeID, touch: slide)
            }
            // A read that fails on a node still marked up (a lost reply, a cut connection) is
            // tried once more: moving the session off a node other requests still reach would
            // leave two copies, and two locks.
            guard case .unreachable(let error) = read, attempt == 0, error.leavesOutcomeUnknown, topology.isReachable(id.nodeID)
            else { break }
            attempt += 1
            statistics.count(.readRetries)
            if let held = lock {
                await release(held)
                lock = nil
            }
        }
        let now = currentTimeMillis()
        if case .missing = read, await missMayBeRestartChecking(on: id.nodeID) {
            // The node restarted (empty) recently: the backup may hold the session.
            return try await restoreAfterRestart(id: id, keys: keys, access: access, lock: lock)
        }
        switch read {
        case .found(let stored):
            if isExpired(stored.record, now: now) {
                statistics.count(.sessionsExpired)
                await deleteCopies(
                    keys: keys, nodeID: id.nodeID, lock: lock, wait: false, sessionIdle: stored.record.metadata.idleTimeoutSeconds)
                return nil
            }
            statistics.count(.sessionsLoaded)
            let session = makeSession(id: id, record: stored.record, casUnique: stored.casUnique, isNew: false)
            session.cacheKeys(keys)
            // Read from a node being drained (removed by a reconfiguration): it moves now.
            let drainTarget = topology.isDraining(id.nodeID) ? topology.nextAvailable(after: id.nodeID) : nil
            if let drainTarget {
                session.setID(id.relocated(to: drainTarget))
                session.markAllChanged()
                statistics.count(.relocations)
            }
            access.state.withLock { state in
                state.loaded.lock = lock
                state.loaded.raw = stored.raw
                if drainTarget != nil {
                    state.loaded.mustWriteAll = true
                    state.loaded.movedFrom = id.nodeID
                }
            }
            return session
        case .missing, .tombstone:
            statistics.count(.sessionsNotFound)
            if let lock { await release(lock) }
            return nil
        case .unreachable(let error):
            if let lock { await release(lock) }
            if let lockToken, let node = topology.node(id.nodeID) {
                // A lock a lost reply took is this request's: it goes, not waited out.
                Task { await self.releaseIfOwn(keys.lock, token: lockToken, on: node) }
            }
            guard !topology.isReachable(id.nodeID) || !error.leavesOutcomeUnknown else {
                // Twice no answer, yet not marked down: other requests may still reach it. (A
                // refused connection is an answer: the process is gone, nobody reaches it.)
                return try unavailable(id: id, cause: "its node did not answer twice (\(error.code)) but is not marked down")
            }
            return try await recoverNonSticky(id: id, keys: keys, access: access, cause: error)
        }
    }

    /// What the other nodes hold of a session: the newest copy (a primary left by an earlier
    /// relocation, or a backup), and whether any node holds a tombstone (logged out).
    struct CopySearch {
        var newest: (stored: StoredSession, nodeID: String, isPrimary: Bool)?
        /// The newest copy's remaining TTL in seconds, when it is a backup read in meta mode.
        var newestTimeToLive: Int?
        var tombstone = false
        /// Whether a node searched did not answer.
        var unreachable = false
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
        return Int64(remaining) < backupRefreshWindow(metadata).components.seconds + 1
    }

    /// Reads the session's primary and backup keys on each of `nodes`: one round trip per node,
    /// all nodes in parallel. Bounded by the number of nodes.
    func searchCopies(keys: SessionKeys, on nodes: [String]) async -> CopySearch {
        let meta = configuration.memcached.protocolMode == .meta
        let reads = await withTaskGroup(of: [(String, Bool, StoredRead, Int?)].self) { group in
            for nodeID in nodes {
                guard let node = topology.node(nodeID) else { continue }
                group.addTask {
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

    /// The session's node did not answer: find the newest copy on the other nodes (a primary a
    /// concurrent request or an earlier failure put there, or a backup) and move the session to
    /// the next available node under a new id, or to the node that already holds it.
    func recoverNonSticky(
        id: SessionID, keys: SessionKeys, access: SessionAccess, cause: MemcachedError
    ) async throws(SessionError) -> Session? {
        guard let target = topology.nextAvailable(after: id.nodeID) else {
            return try unavailable(id: id, cause: "no other memcached node is available (\(cause.code))")
        }
        var lock: HeldLock? = nil
        if access.locks {
            // The lock on the target: concurrent recoveries of this session take turns.
            (lock, _) = try await lockAndRead(keys: keys, nodeID: target, touch: nil)
        }
        let search = await searchCopies(keys: keys, on: topology.others(than: id.nodeID).filter { topology.isReachable($0) })
        if search.tombstone {
            // Logged out: a tombstone outranks any copy that survived somewhere.
            if let lock { await release(lock) }
            statistics.count(.sessionsNotFound)
            return nil
        }
        guard let newest = search.newest else {
            if let lock { await release(lock) }
            // The primary did not answer and no copy was found elsewhere: the session may well
            // exist on the silent node. Never read that as "no session".
            return try unavailable(id: id, cause: "its node did not answer (\(cause.code)) and no backup copy was found")
        }
        if isExpired(newest.stored.record, now: currentTimeMillis()) || isIdleExpired(search) {
            statistics.count(.sessionsExpired)
            if let lock { await release(lock) }
            return nil
        }
        statistics.count(.memcachedFailovers)
        statistics.count(.relocations)
        // Already living elsewhere as a primary: the session is there, under that node's id.
        let home = newest.isPrimary ? newest.nodeID : target
        logger.notice(
            "session recovered after a memcached node failure",
            metadata: ["memcached.node.failed": "\(id.nodeID)", "memcached.node.target": "\(home)"])
        events.record(.failover, "sessions moved from \(id.nodeID) to \(home): \(id.nodeID) did not answer")
        // The copy on the silent node goes once it answers again (a logout must not find it).
        leaveOldPrimary(keys: keys, on: id.nodeID, version: newest.stored.record.metadata.version + 1)
        return await adopt(newest, id: id.relocated(to: home), lock: lock, access: access)
    }

    /// Serves a copy found on another node: under `id` (whose node is where it lives now), with
    /// the lock only if it is on that node, and, when the copy was a backup, marked to be written
    /// in full at the end of the request.
    private func adopt(
        _ copy: (stored: StoredSession, nodeID: String, isPrimary: Bool), id: SessionID, lock: HeldLock?, access: SessionAccess
    ) async -> Session {
        var lock = lock
        if let held = lock, held.nodeID != id.nodeID {
            await release(held)
            lock = nil
        }
        let session = makeSession(
            id: id, record: copy.stored.record, casUnique: copy.isPrimary ? copy.stored.casUnique : nil, isNew: false)
        if !copy.isPrimary { session.markAllChanged() }
        access.state.withLock { state in
            state.loaded.lock = lock
            state.loaded.raw = copy.stored.raw
            state.loaded.mustWriteAll = !copy.isPrimary
        }
        return session
    }

    /// A miss on a node that restarted recently: the other nodes may hold the session (a backup,
    /// or a primary it was moved to). A backup is served and written back to the session's node
    /// at the end; a primary elsewhere is where the session lives now (new cookie).
    func restoreAfterRestart(id: SessionID, keys: SessionKeys, access: SessionAccess, lock: HeldLock?) async throws(SessionError)
        -> Session?
    {
        let others = topology.others(than: id.nodeID)
        let search = await searchCopies(keys: keys, on: others.filter { topology.isReachable($0) })
        // Where its backup usually is: the next node after its own in configuration order.
        let usualBackup = topology.order.firstIndex(of: id.nodeID).map { topology.order[($0 + 1) % topology.order.count] }
        if !search.tombstone, search.newest == nil, search.unreachable || usualBackup.map({ !topology.isReachable($0) }) == true {
            // The node lost everything, and a node that may hold the backup does not answer:
            // not "no session" (a second fault at once), but unavailable.
            if let lock { await release(lock) }
            return try unavailable(id: id, cause: "its node restarted empty and a node that may hold its backup did not answer")
        }
        guard !search.tombstone, let newest = search.newest, !isExpired(newest.stored.record, now: currentTimeMillis()),
            !isIdleExpired(search)
        else {
            if let lock { await release(lock) }
            statistics.count(.sessionsNotFound)
            return nil
        }
        statistics.count(.sessionsRestored)
        let home = newest.isPrimary ? newest.nodeID : id.nodeID
        return await adopt(newest, id: id.relocated(to: home), lock: lock, access: access)
    }

    func unavailable(id: SessionID, cause: String) throws(SessionError) -> Session? {
        statistics.count(.unavailable)
        logger.warning("session unavailable", metadata: ["memcached.node": "\(id.nodeID)", "cause": "\(cause)"])
        switch configuration.unavailablePolicy {
        case .fail:
            throw SessionError.unavailable("the session's memcached node did not answer: \(cause)")
        case .startNewSession:
            return nil
        }
    }

    func endNonSticky(_ access: SessionAccess) async throws(SessionError) -> SessionResponseAction {
        let (phase, session, loadedLock, raw, mustWriteAll, regenerate, movedFrom) = access.state.withLock { state in
            (state.phase, state.session, state.lock, state.loadedRaw, state.mustWriteAll, state.regenerate, state.movedFrom)
        }
        var lock = loadedLock
        let incoming = access.requestedID
        guard phase == .loaded, let session else {
            if phase == .idle, let incoming { await slideUnopened(incoming) }
            if let lock { await release(lock) }
            return .unchanged
        }
        var id = session.id
        var keys = self.keys(of: session)
        let now = currentTimeMillis()

        if session.isInvalidated {
            statistics.count(.sessionsInvalidated)
            if session.mayBeStored {
                await deleteCopies(keys: keys, nodeID: id.nodeID, lock: lock, wait: true, sessionIdle: session.metadata.idleTimeoutSeconds)
            } else if let lock {
                await release(lock)
            }
            return incoming == nil ? .unchanged : SessionResponseAction(cookie: .clear)
        }

        var oldCopies: (SessionKeys, String)? = nil
        if regenerate {
            oldCopies = (keys, id.nodeID)
            id = generateID(nodeID: placementNode(), route: configuration.route)
            keys = self.keys(for: id.token)
            session.setID(id)
            session.markAllChanged()
            statistics.count(.sessionsRegenerated)
        }

        if case .auto = lockingMode {
            // Learn which paths only read: they run unlocked until one of their requests writes.
            readOnlyPaths.record(access.path, modified: session.hasUnsavedChanges || mustWriteAll || regenerate)
        }

        if let held = lock, !regenerate, session.hasUnsavedChanges || mustWriteAll {
            // A locked request writes only under its lock.
            lock = try await confirmLock(held, keys: keys, session: session)
        }

        if session.hasUnsavedChanges || mustWriteAll || regenerate {
            let isFreshPlacement = mustWriteAll || regenerate
            // The lock rides with the write only when both are on the same node.
            let lockWithWrite = (regenerate || lock?.nodeID != id.nodeID) ? nil : lock
            let (outcome, finalID) = await saveWithRelocation(
                session, keys: keys, nodeID: id.nodeID, lock: lockWithWrite, forceAdd: isFreshPlacement)
            if lockWithWrite == nil, let lock { await release(lock) }
            switch outcome {
            case .saved(let record, let bytes):
                await writeBackup(keys: keys, primaryNode: finalID.nodeID, bytes: bytes, metadata: record.metadata, now: now)
                if let movedFrom, movedFrom != finalID.nodeID, let drained = topology.node(movedFrom) {
                    await drained.submit(prepared(.delete(keys.primary, quiet: true)))
                }
                if let (oldKeys, oldNode) = oldCopies {
                    // Waited for: the old id must be dead before the response (session fixation).
                    await deleteCopies(keys: oldKeys, nodeID: oldNode, lock: nil, wait: true, sessionIdle: record.metadata.idleTimeoutSeconds)
                } else if let incoming, finalID.token == incoming.token, finalID.nodeID != incoming.nodeID,
                    case .tombstone = await readStored(key: keys.primary, on: finalID.nodeID, touch: nil)
                {
                    // Moved, and ended meanwhile: a login racing this request gave the session a
                    // new id (or a logout ended it). The browser may hold the login's cookie by
                    // now, which this request's cookie would replace.
                    statistics.count(.sessionsNotFound)
                    return .unchanged
                }
                return finalID != incoming ? cookieAction(.set(finalID), record.metadata) : .unchanged
            case .gone:
                // Deleted meanwhile (a logout, or a login that gave it a new id, raced this
                // request): it stays deleted. The cookie is left alone: this request did not set
                // it, and the browser may hold a newer one by now (the login's).
                statistics.count(.sessionsNotFound)
                return .unchanged
            case .refused(let error):
                if let lockWithWrite { await release(lockWithWrite) }
                throw error
            case .unreachable(let error, let afterConflict):
                if let lockWithWrite { await release(lockWithWrite) }
                if error.leavesOutcomeUnknown || afterConflict {
                    // It may have been saved, or not: never a cleared cookie, never "saved".
                    statistics.count(.unavailable)
                    throw SessionError.unavailable("the session's write got no answer (\(error.code)): it may not have been saved")
                }
                _ = try unavailable(id: id, cause: "the session could be saved on no node (\(error.code))")
                return incoming == nil ? .unchanged : SessionResponseAction(cookie: .clear)
            }
        }

        // Unchanged: no write at all.
        statistics.count(.writesSkipped)
        if let lock { await release(lock) }
        let metadata = session.metadata
        refreshBackupIfDue(keys: keys, primaryNode: id.nodeID, raw: raw, metadata: metadata, now: now)
        if let expected = Self.primaryTTLSeconds(metadata, now: now), expected != defaultIdleSeconds + 1,
            let node = topology.node(id.nodeID)
        {
            // The load slid the TTL to the default; this session has its own timeout.
            await node.submit(.touch(keys.primary, ttl: .seconds(Int(expected))))
        }
        return id != incoming ? cookieAction(.set(id), metadata) : .unchanged
    }

    func cookieAction(_ cookie: SessionResponseAction.Cookie, _ metadata: SessionMetadata) -> SessionResponseAction {
        SessionResponseAction(cookie: cookie, idleTimeout: metadata.idleTimeout)
    }

    /// Saves to `nodeID`; if that node does not answer, moves the session to the next available
    /// node under a new id and saves there. Bounded by the number of nodes.
    func saveWithRelocation(
        _ session: Session, keys: SessionKeys, nodeID: String, lock: HeldLock?, forceAdd: Bool, restoreIfMissing: Bool = false
    ) async -> (SaveOutcome, SessionID) {
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
                heldLocks.remove(held)
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
                    relocked = try await lockAndRead(keys: keys, nodeID: next, touch: nil)
                } catch {
                    return (.refused(error), session.id)
                }
                switch relocked.1 {
                case .missing:
                    lock = relocked.0
                case .found:
                    if let newLock = relocked.0 { await release(newLock) }
                    statistics.count(.lockConflicts)
                    return (.refused(Self.lockConflictError), session.id)
                case .tombstone:
                    if let newLock = relocked.0 { await release(newLock) }
                    return (.gone, session.id)
                case .unreachable:
                    if let newLock = relocked.0 { await release(newLock) }
                }
            }
        }
        return (outcome, session.id)
    }

    /// A request that carried a session cookie but never opened the session: slide its TTL with
    /// requests it does not wait for. The session's own idle timeout is in the primary item's
    /// flags (a "remember me" session must not be shortened to the default), so the slide reads
    /// the item's metadata (`mg <key> f c t`, no value) and then touches primary and, when due,
    /// backup with the right TTLs.
    func slideUnopened(_ id: SessionID) async {
        guard topology.contains(id.nodeID), let node = topology.node(id.nodeID), node.isAvailable else { return }
        let keys = self.keys(for: id.token)
        statistics.count(.touches)
        guard configuration.memcached.protocolMode == .meta else {
            // The text protocol cannot read flags without the value: slide to the default.
            let slide = slideTTL
            await node.submit(prepared(.touch(keys.primary, ttl: slide)))
            return
        }
        await node.submit(prepared(.getMetadata(keys.primary))) { [weak self] result in
            guard let self, case .success(.item(let item?)) = result, item.flags != Self.tombstoneFlags else { return }
            let idle = Int64(item.flags)
            guard idle > 0 else { return }  // never expires from inactivity: nothing to slide
            let metadata = SessionMetadata(createdAt: 0, lastAccessedAt: 0, idleTimeoutSeconds: idle, absoluteTimeoutSeconds: 0, version: 0)
            let backupNode = self.topology.nextAvailable(after: id.nodeID)
            let backupDue =
                backupNode.map {
                    self.backupMemo.needsRefresh(keys.backup, node: $0, window: self.backupRefreshWindow(metadata))
                } ?? false
            if backupDue, let backupNode { self.backupMemo.record(keys.backup, node: backupNode) }
            let backupTTL = self.backupTTL(metadata, now: self.currentTimeMillis())
            _ = Task {
                await node.submit(.touch(keys.primary, ttl: .seconds(Int(idle) + 1)))
                if backupDue, let backupNode, let backup = self.topology.node(backupNode) {
                    self.statistics.count(.backupTouches)
                    await backup.submit(.touch(keys.backup, ttl: backupTTL))
                }
            }
        }
    }

    /// Refreshes a read-only session's backup at most once per window per instance, and repairs it
    /// (copies the bytes just read) when the backup node has no copy, e.g. after a restart.
    func refreshBackupIfDue(keys: SessionKeys, primaryNode: String, raw: ByteBuffer?, metadata: SessionMetadata, now: Int64) {
        guard let backupNode = topology.nextAvailable(after: primaryNode), let node = topology.node(backupNode) else { return }
        guard backupMemo.needsRefresh(keys.backup, node: backupNode, window: backupRefreshWindow(metadata)) else { return }
        backupMemo.record(keys.backup, node: backupNode)
        let ttl = backupTTL(metadata, now: now)
        let statistics = self.statistics
        let memo = self.backupMemo
        statistics.count(.backupTouches)
        let submit = {
            @Sendable (request: MemcachedRequest, completion: @escaping @Sendable (Result<MemcachedResponse, MemcachedError>) -> Void) in
            _ = Task { await node.submit(request, completion: completion) }
        }
        Task {
            await node.submit(.touch(keys.backup, ttl: ttl)) { result in
                switch result {
                case .success(.touched(false)):
                    // No backup there: write one from the bytes just read.
                    guard let raw else { return }
                    statistics.count(.backupRepairs)
                    // An add: it cannot overwrite a tombstone (a logout racing this read) or a
                    // newer backup written meanwhile.
                    var repair = MemcachedRequest.store(
                        keys.backup, value: raw, mode: .add, ttl: ttl, flags: SessionManager.backupFlags(metadata), quiet: true)
                    repair.connectionAffinity = SessionManager.affinity(of: keys.backup)
                    submit(repair) { result in
                        if case .failure = result { statistics.count(.backupFailures) }
                    }
                case .failure:
                    memo.forget(keys.backup)
                    statistics.count(.backupFailures)
                default:
                    break
                }
            }
        }
    }
}

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
        let slide: MemcachedTTL = defaultIdleSeconds > 0 ? .seconds(Int(defaultIdleSeconds)) : .never
        let read: StoredRead
        var lock: HeldLock? = nil
        if access.locks {
            (lock, read) = try await lockAndRead(keys: keys, nodeID: id.nodeID, touch: slide)
        } else {
            read = await readStored(key: keys.primary, on: id.nodeID, touch: slide)
        }
        let now = Self.currentTimeMillis()
        switch read {
        case .found(let stored):
            if isExpired(stored.record, now: now) {
                statistics.count(.sessionsExpired)
                await deleteCopies(keys: keys, nodeID: id.nodeID, lock: lock, wait: false)
                return nil
            }
            statistics.count(.sessionsLoaded)
            let session = makeSession(id: id, record: stored.record, casUnique: stored.casUnique, isNew: false)
            access.state.withLock { state in
                state.lock = lock
                state.loadedRaw = stored.raw
                state.slidTTL = defaultIdleSeconds
            }
            return session
        case .missing, .tombstone:
            statistics.count(.sessionsNotFound)
            if let lock { await release(lock) }
            return nil
        case .unreachable(let error):
            if let lock { await release(lock) }
            return try await recoverNonSticky(id: id, keys: keys, access: access, cause: error)
        }
    }

    /// The session's node did not answer: find the newest copy among the relocation target's
    /// primary (a concurrent request may have moved it already) and the backups on every other
    /// available node, read in parallel, and move the session to the target under a new id.
    /// Bounded: one read per node.
    func recoverNonSticky(
        id: SessionID, keys: SessionKeys, access: SessionAccess, cause: MemcachedError
    ) async throws(SessionError) -> Session? {
        guard let target = topology.nextAvailable(after: id.nodeID) else {
            return try unavailable(id: id, cause: "no other memcached node is available (\(cause.code))")
        }
        var lock: HeldLock? = nil
        let targetRead: StoredRead
        if access.locks {
            (lock, targetRead) = try await lockAndRead(keys: keys, nodeID: target, touch: nil)
        } else {
            targetRead = await readStored(key: keys.primary, on: target, touch: nil)
        }
        let backupNodes = topology.others(than: id.nodeID).filter { topology.isAvailable($0) }
        let backups = await withTaskGroup(of: (String, StoredRead).self) { group in
            for nodeID in backupNodes {
                group.addTask { (nodeID, await self.readStored(key: keys.backup, on: nodeID, touch: nil)) }
            }
            var reads: [(String, StoredRead)] = []
            for await read in group { reads.append(read) }
            return reads
        }
        var best: (stored: StoredSession, isTargetPrimary: Bool)? = nil
        var unanswered = 0
        for (read, isTargetPrimary) in [(targetRead, true)] + backups.map({ ($0.1, false) }) {
            switch read {
            case .found(let stored):
                if best == nil || stored.record.metadata.version > best!.stored.record.metadata.version {
                    best = (stored, isTargetPrimary)
                }
            case .missing, .tombstone: break
            case .unreachable: unanswered += 1
            }
        }
        guard let best else {
            if let lock { await release(lock) }
            // The primary did not answer and no copy was found elsewhere: the session may well
            // exist on the silent node. Never read that as "no session".
            return try unavailable(id: id, cause: "its node did not answer (\(cause.code)) and no backup copy was found")
        }
        let now = Self.currentTimeMillis()
        if isExpired(best.stored.record, now: now) {
            statistics.count(.sessionsExpired)
            if let lock { await release(lock) }
            return nil
        }
        statistics.count(.memcachedFailovers)
        statistics.count(.relocations)
        logger.notice(
            "session recovered after a memcached node failure",
            metadata: ["memcached.node.failed": "\(id.nodeID)", "memcached.node.target": "\(target)"])
        let newID = id.relocated(to: target)
        let session = makeSession(
            id: newID, record: best.stored.record, casUnique: best.isTargetPrimary ? best.stored.casUnique : nil, isNew: false)
        access.state.withLock { state in
            state.lock = lock
            state.loadedRaw = best.stored.raw
            state.mustWriteAll = !best.isTargetPrimary
        }
        return session
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
        let (phase, session, lock, raw, mustWriteAll, regenerate) = access.state.withLock { state in
            (state.phase, state.session, state.lock, state.loadedRaw, state.mustWriteAll, state.regenerate)
        }
        let incoming = access.requestedID
        guard phase == .loaded, let session else {
            if phase == .idle, let incoming { await slideUnopened(incoming) }
            if let lock { await release(lock) }
            return .unchanged
        }
        var id = session.id
        var keys = self.keys(for: id.token)
        let now = Self.currentTimeMillis()

        if session.isInvalidated {
            statistics.count(.sessionsInvalidated)
            if !session.isNew {
                await deleteCopies(keys: keys, nodeID: id.nodeID, lock: lock, wait: true)
            } else if let lock {
                await release(lock)
            }
            return incoming == nil ? .unchanged : SessionResponseAction(cookie: .clear)
        }

        var oldCopies: (SessionKeys, String)? = nil
        if regenerate {
            oldCopies = (keys, id.nodeID)
            id = SessionID.generate(nodeID: placementNode(), route: configuration.route)
            keys = self.keys(for: id.token)
            session.setID(id)
            session.markAllChanged()
            statistics.count(.sessionsRegenerated)
        }

        if case .auto = configuration.locking {
            // Learn which paths only read: they run unlocked until one of their requests writes.
            readOnlyPaths.record(access.path, modified: session.hasUnsavedChanges || mustWriteAll || regenerate)
        }

        if session.hasUnsavedChanges || mustWriteAll || regenerate {
            let isFreshPlacement = mustWriteAll || regenerate
            let (outcome, finalID) = await saveWithRelocation(
                session, keys: keys, nodeID: id.nodeID, lock: regenerate ? nil : lock, forceAdd: isFreshPlacement)
            if regenerate, let lock { await release(lock) }
            switch outcome {
            case .saved(let record, let bytes):
                await submitBackup(keys: keys, primaryNode: finalID.nodeID, bytes: bytes, metadata: record.metadata, now: now)
                if let (oldKeys, oldNode) = oldCopies {
                    // Waited for: the old id must be dead before the response (session fixation).
                    await deleteCopies(keys: oldKeys, nodeID: oldNode, lock: nil, wait: true)
                }
                return finalID != incoming ? cookieAction(.set(finalID), record.metadata) : .unchanged
            case .gone:
                // Deleted meanwhile (a logout raced this request): it stays deleted.
                statistics.count(.sessionsNotFound)
                return incoming == nil ? .unchanged : SessionResponseAction(cookie: .clear)
            case .tooLarge(let error):
                if let lock { await release(lock) }
                throw error
            case .unreachable(let error):
                if let lock { await release(lock) }
                _ = try unavailable(id: id, cause: "the session could be saved on no node (\(error.code))")
                return incoming == nil ? .unchanged : SessionResponseAction(cookie: .clear)
            }
        }

        // Unchanged: no write at all.
        statistics.count(.writesSkipped)
        if let lock { await release(lock) }
        let metadata = session.metadata
        refreshBackupIfDue(keys: keys, primaryNode: id.nodeID, raw: raw, metadata: metadata, now: now)
        if let expected = Self.primaryTTLSeconds(metadata, now: now), expected != defaultIdleSeconds,
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
        var forceAdd = forceAdd
        var tried: Set<String> = []
        var outcome: SaveOutcome = .unreachable(MemcachedError(code: .nodeUnavailable, message: "no node available"))
        for _ in 0..<max(1, topology.order.count) {
            tried.insert(nodeID)
            outcome = await save(
                session, keys: keys, on: nodeID, releasing: lock, forceAdd: forceAdd, restoreIfMissing: restoreIfMissing)
            guard case .unreachable = outcome else { break }
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
            nodeID = next
            session.setID(session.id.relocated(to: next))
            session.markAllChanged()
            forceAdd = true
        }
        return (outcome, session.id)
    }

    /// A request that carried a session cookie but never opened the session: slide the TTL with a
    /// touch it does not wait for.
    func slideUnopened(_ id: SessionID) async {
        guard topology.contains(id.nodeID), let node = topology.node(id.nodeID), node.isAvailable else { return }
        let keys = self.keys(for: id.token)
        let slide: MemcachedTTL = defaultIdleSeconds > 0 ? .seconds(Int(defaultIdleSeconds)) : .never
        statistics.count(.touches)
        await node.submit(.touch(keys.primary, ttl: slide))
        if let backupNode = topology.nextAvailable(after: id.nodeID), let backup = topology.node(backupNode) {
            let metadata = SessionMetadata(
                createdAt: 0, lastAccessedAt: 0, idleTimeoutSeconds: defaultIdleSeconds, absoluteTimeoutSeconds: 0, version: 0)
            if backupMemo.needsRefresh(keys.backup, node: backupNode, window: backupRefreshWindow(metadata)) {
                backupMemo.record(keys.backup, node: backupNode)
                statistics.count(.backupTouches)
                await backup.submit(.touch(keys.backup, ttl: backupTTL(metadata, now: Self.currentTimeMillis())))
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
        let submit = { @Sendable (request: MemcachedRequest, completion: @escaping @Sendable (Result<MemcachedResponse, MemcachedError>) -> Void) in
            _ = Task { await node.submit(request, completion: completion) }
        }
        Task {
            await node.submit(.touch(keys.backup, ttl: ttl)) { result in
                switch result {
                case .success(.touched(false)):
                    // No backup there: write one from the bytes just read.
                    guard let raw else { return }
                    statistics.count(.backupRepairs)
                    submit(.store(keys.backup, value: raw, ttl: ttl, quiet: true)) { result in
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

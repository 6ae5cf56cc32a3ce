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
final class NonStickyLifecycle: SessionLifecycle {
    let context: SessionContext
    let store: SessionStore
    var locks: SessionLocks { store.locks }

    init(context: SessionContext, store: SessionStore) {
        self.context = context
        self.store = store
    }

    /// Renews the leases of the locks requests hold.
    func run() async {
        await locks.renewPeriodically()
    }

    func mayWaitForMemcached(_ id: MemcachedSessionID?) -> Bool {
        isEnabled
    }

    /// A session replaced by ``SessionAccess/create()``: its stored copies go, with its lock (the
    /// task ends once the tombstones landed; the request's end waits for it).
    func retire(_ session: MemcachedSession, lock: HeldLock?) -> Task<Void, Never> {
        Task {
            await self.store.deleteCopies(
                keys: self.keys(for: session.id.token), nodeID: session.id.nodeID, lock: lock, wait: true,
                sessionIdle: session.metadata.idleTimeoutSeconds)
        }
    }

    func load(_ access: SessionAccess) async throws(SessionError) -> MemcachedSession? {
        guard let id = access.requestedID else { return nil }
        // A well-formed id naming a node we do not have is "no session", not "unavailable".
        guard topology.contains(id.nodeID) else {
            statistics.count(.sessionsNotFound)
            return nil
        }
        var keys = self.keys(for: id.token)
        // A copy this instance left there to end (a move, a logout) goes before it can be read.
        if store.leftovers.count > 0 { await store.cleanLeftovers(on: id.nodeID, key: keys.primary) }
        let slide = store.slideTTL
        var read: StoredRead
        var lock: HeldLock? = nil
        var attempt = 0
        var lockToken: String? = nil
        while true {
            if access.locks {
                // The same token on the retry: if the lost reply was the lock's, the lock is ours.
                let token = lockToken ?? locks.newToken()
                lockToken = token
                (lock, read) = try await locks.lockAndRead(
                    keys: keys, nodeID: id.nodeID, touch: slide, token: token, mayAlreadyHold: attempt > 0)
            } else {
                read = await store.readStored(key: keys.primary, on: id.nodeID, touch: slide)
            }
            // A read that fails on a node still marked up (a lost reply, a cut connection) is
            // tried once more: moving the session off a node other requests still reach would
            // leave two copies, and two locks.
            guard case .unreachable(let error) = read, attempt == 0, error.leavesOutcomeUnknown, topology.isReachable(id.nodeID)
            else { break }
            attempt += 1
            statistics.count(.readRetries)
            if let held = lock {
                await locks.release(held)
                lock = nil
            }
        }
        (keys, read) = await store.followingKeyTransition(keys: keys, read: read, token: id.token, on: id.nodeID, touch: slide)
        let now = currentTimeMillis()
        if case .missing = read, await store.missMayBeRestartChecking(on: id.nodeID) {
            // The node restarted (empty) recently: the backup may hold the session.
            return try await restoreAfterRestart(id: id, keys: keys, access: access, lock: lock)
        }
        switch read {
        case .found(let stored):
            if context.isExpired(stored.record, now: now) {
                statistics.count(.sessionsExpired)
                await store.deleteCopies(
                    keys: keys, nodeID: id.nodeID, lock: lock, wait: false, sessionIdle: stored.record.metadata.idleTimeoutSeconds)
                return nil
            }
            statistics.count(.sessionsLoaded)
            let session = context.makeSession(id: id, record: stored.record, casUnique: stored.casUnique, isNew: false)
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
            if let lock { await locks.release(lock) }
            return nil
        case .unreachable(let error):
            if let lockToken {
                await locks.abandon(lock, token: lockToken, read: read, keys: keys, on: id.nodeID)
            }
            guard !topology.isReachable(id.nodeID) || !error.leavesOutcomeUnknown else {
                // Twice no answer, yet not marked down: other requests may still reach it. (A
                // refused connection is an answer: the process is gone, nobody reaches it.)
                return try context.unavailable(id: id, cause: "its node did not answer twice (\(error.code)) but is not marked down")
            }
            return try await recover(id: id, keys: keys, access: access, cause: error)
        }
    }

    /// The session's node did not answer: find the newest copy on the other nodes (a primary a
    /// concurrent request or an earlier failure put there, or a backup) and move the session to
    /// the next available node under a new id, or to the node that already holds it.
    func recover(
        id: MemcachedSessionID, keys: SessionKeys, access: SessionAccess, cause: MemcachedError
    ) async throws(SessionError) -> MemcachedSession? {
        guard let target = topology.nextAvailable(after: id.nodeID) else {
            return try context.unavailable(id: id, cause: "no other memcached node is available (\(cause.code))")
        }
        var lock: HeldLock? = nil
        if access.locks {
            // The lock on the target: concurrent recoveries of this session take turns. A
            // tombstone there ended the session (it may come with no lock: another holds it).
            let token = locks.newToken()
            let (taken, read) = try await locks.lockAndRead(keys: keys, nodeID: target, touch: nil, token: token)
            // None came back: one a lost reply may have taken goes.
            if taken == nil { await locks.abandon(nil, token: token, read: read, keys: keys, on: target) }
            if case .tombstone = read {
                await locks.abandon(taken, token: token, read: read, keys: keys, on: target)
                statistics.count(.sessionsNotFound)
                return nil
            }
            lock = taken
        }
        let search = await searchCopies(keys: keys, from: id.nodeID, on: topology.others(than: id.nodeID).filter { topology.isReachable($0) })
        if search.tombstone {
            // Logged out: a tombstone outranks any copy that survived somewhere.
            if let lock { await locks.release(lock) }
            statistics.count(.sessionsNotFound)
            return nil
        }
        guard let newest = search.newest else {
            if let lock { await locks.release(lock) }
            // The primary did not answer and no copy was found elsewhere: the session may well
            // exist on the silent node. Never read that as "no session".
            return try context.unavailable(id: id, cause: "its node did not answer (\(cause.code)) and no backup copy was found")
        }
        if context.isExpired(newest.stored.record, now: currentTimeMillis()) || store.isIdleExpired(search) {
            statistics.count(.sessionsExpired)
            if let lock { await locks.release(lock) }
            return nil
        }
        var copy = newest
        if access.locks, newest.isPrimary, newest.nodeID != target {
            // Already living as a primary on another node: a locked request works under that
            // node's lock (the one its requests there take), and on the copy read under it.
            guard let (relocked, under) = try await lockWhereItLives(newest, holding: lock, keys: keys, id: id) else { return nil }
            (copy, lock) = (relocked, under)
        }
        statistics.count(.memcachedFailovers)
        statistics.count(.relocations)
        // Already living elsewhere as a primary: the session is there, under that node's id.
        let home = copy.isPrimary ? copy.nodeID : target
        logger.notice(
            "session recovered after a memcached node failure",
            metadata: ["memcached.node.failed": "\(id.nodeID)", "memcached.node.target": "\(home)"])
        events.record(.failover, "sessions moved from \(id.nodeID) to \(home): \(id.nodeID) did not answer")
        // The copy on the silent node goes once it answers again (a logout must not find it).
        // Moved from a backup, which the new placement does not write (its own backup node is
        // another): the old placement's writes this move missed are found in that backup, read
        // again after the move's write (``SessionAccess/AdoptedBackup``) and when the old copy
        // is cleaned up (``LeftoverCopies/StrayMerge``). (The backup is an older state of the old
        // copy, so what differs from it are that copy's changes; a primary found elsewhere is no
        // such ancestor.)
        let watched = !copy.isPrimary && !search.underEarlierKeys && copy.nodeID != topology.nextAvailable(after: home)
        store.leaveOldPrimary(
            keys: keys, on: id.nodeID, version: copy.stored.record.metadata.version + 1,
            merging: watched ? (home, copy.stored.record, copy.nodeID) : nil)
        return await adopt(copy, id: id.relocated(to: home), lock: lock, access: access, watched: watched ? id.nodeID : nil)
    }

    /// A locked request that found its session living as a primary on a node other than the one
    /// it holds `lock` on takes that node's lock instead (releasing the other first), and reads
    /// the copy again under it: a request with the session's current cookie holds that lock while
    /// it runs, and working beside it unlocked would break its exclusion.
    ///
    /// - Returns: the copy read under the new lock, and the lock (nil when the failure policy let
    ///   the request proceed without it); nil when the session ended or expired meanwhile, or
    ///   when that node no longer holds it or does not answer and the unavailable policy starts
    ///   a new session.
    /// - Throws: ``SessionError/Code/lockUnavailable`` when the lock is not had within the wait
    ///   budget under `.fail`; ``SessionError/Code/unavailable`` when that node no longer answers
    ///   or no longer holds the copy (it moved on meanwhile: the request may be tried again).
    private func lockWhereItLives(
        _ found: (stored: StoredSession, nodeID: String, isPrimary: Bool), holding lock: HeldLock?, keys: SessionKeys, id: MemcachedSessionID
    ) async throws(SessionError) -> ((stored: StoredSession, nodeID: String, isPrimary: Bool), HeldLock?)? {
        if let lock { await locks.release(lock) }
        let token = locks.newToken()
        let (taken, read) = try await locks.lockAndRead(keys: keys, nodeID: found.nodeID, touch: nil, token: token)
        switch read {
        case .found(let stored):
            if context.isExpired(stored.record, now: currentTimeMillis()) {
                await locks.abandon(taken, token: token, read: read, keys: keys, on: found.nodeID)
                statistics.count(.sessionsExpired)
                return nil
            }
            return ((stored, found.nodeID, true), taken)
        case .tombstone:
            await locks.abandon(taken, token: token, read: read, keys: keys, on: found.nodeID)
            statistics.count(.sessionsNotFound)
            return nil
        case .missing, .unreachable:
            await locks.abandon(taken, token: token, read: read, keys: keys, on: found.nodeID)
            _ = try context.unavailable(id: id, cause: "the node its session moved to no longer holds it, or did not answer")
            return nil
        }
    }

    /// Serves a copy found on another node: under `id` (whose node is where it lives now), with
    /// the lock only if it is on that node, and, when the copy was a backup, marked to be written
    /// in full at the end of the request.
    /// The session's copies on `nodes`; in a storage-key transition's window, when none is under
    /// its keyed keys, those under its unkeyed keys, each served as a backup is (written under the
    /// keyed keys at the request's end): a session not yet moved survives its node's failure.
    ///
    /// The unkeyed copies of a session served that way are ended (tombstones on every node, the
    /// silent `nodeID`'s when it answers again): if that node comes back with its data, its
    /// unkeyed copy must not be moved in as a second live copy.
    private func searchCopies(keys: SessionKeys, from nodeID: String, on nodes: [String]) async -> SessionStore.CopySearch {
        let search = await store.searchCopies(keys: keys, on: nodes)
        guard search.newest == nil, !search.tombstone, keys.isKeyed, let token = keys.token, let earlier = context.unkeyedKeys(for: token)
        else { return search }
        var found = await store.searchCopies(keys: earlier, on: nodes)
        if let newest = found.newest {
            if newest.isPrimary {
                found.newest = (newest.stored, newest.nodeID, false)
                found.newestTimeToLive = nil
            }
            await store.deleteCopies(
                keys: earlier, nodeID: nodeID, lock: nil, wait: false, sessionIdle: newest.stored.record.metadata.idleTimeoutSeconds)
        }
        found.unreachable = found.unreachable || search.unreachable
        found.underEarlierKeys = true
        return found
    }

    /// `watched`: the node the session moved off, when the backup copy served is read again
    /// after the request's write (``SessionAccess/AdoptedBackup``).
    private func adopt(
        _ copy: (stored: StoredSession, nodeID: String, isPrimary: Bool), id: MemcachedSessionID, lock: HeldLock?, access: SessionAccess,
        watched movedOff: String?
    ) async -> MemcachedSession {
        var lock = lock
        if let held = lock, held.nodeID != id.nodeID {
            await locks.release(held)
            lock = nil
        }
        let session = context.makeSession(
            id: id, record: copy.stored.record, casUnique: copy.isPrimary ? copy.stored.casUnique : nil, isNew: false)
        if !copy.isPrimary { session.markAllChanged() }
        access.state.withLock { state in
            state.loaded.lock = lock
            state.loaded.raw = copy.stored.raw
            state.loaded.mustWriteAll = !copy.isPrimary
            if let movedOff {
                state.loaded.adoptedBackup = .init(nodeID: copy.nodeID, record: copy.stored.record, movedOff: movedOff)
            }
        }
        return session
    }

    /// A miss on a node that restarted recently: the other nodes may hold the session (a backup,
    /// or a primary it was moved to). A backup is served and written back to the session's node
    /// at the end; a primary elsewhere is where the session lives now (new cookie).
    func restoreAfterRestart(id: MemcachedSessionID, keys: SessionKeys, access: SessionAccess, lock: HeldLock?) async throws(SessionError)
        -> MemcachedSession?
    {
        let others = topology.others(than: id.nodeID)
        let search = await searchCopies(keys: keys, from: id.nodeID, on: others.filter { topology.isReachable($0) })
        // Where its backup usually is: the next node after its own in configuration order.
        let usualBackup = topology.order.firstIndex(of: id.nodeID).map { topology.order[($0 + 1) % topology.order.count] }
        if !search.tombstone, search.newest == nil, search.unreachable || usualBackup.map({ !topology.isReachable($0) }) == true {
            // The node lost everything, and a node that may hold the backup does not answer:
            // not "no session" (a second fault at once), but unavailable.
            if let lock { await locks.release(lock) }
            return try context.unavailable(id: id, cause: "its node restarted empty and a node that may hold its backup did not answer")
        }
        guard !search.tombstone, let newest = search.newest, !context.isExpired(newest.stored.record, now: currentTimeMillis()),
            !store.isIdleExpired(search)
        else {
            if let lock { await locks.release(lock) }
            statistics.count(.sessionsNotFound)
            return nil
        }
        var (copy, lock) = (newest, lock)
        if access.locks, newest.isPrimary, newest.nodeID != id.nodeID {
            guard let (relocked, under) = try await lockWhereItLives(newest, holding: lock, keys: keys, id: id) else { return nil }
            (copy, lock) = (relocked, under)
        }
        statistics.count(.sessionsRestored)
        let home = copy.isPrimary ? copy.nodeID : id.nodeID
        return await adopt(copy, id: id.relocated(to: home), lock: lock, access: access, watched: nil)
    }

    func end(_ access: SessionAccess) async throws(SessionError) -> SessionResponseAction {
        let (phase, session, loadedLock, raw, mustWriteAll, regenerate, movedFrom, adoptedBackup) = access.state.withLock { state in
            (
                state.phase, state.session, state.lock, state.loadedRaw, state.mustWriteAll, state.regenerate, state.movedFrom,
                state.adoptedBackup
            )
        }
        var lock = loadedLock
        let incoming = access.requestedID
        guard phase == .loaded, let session else {
            if phase == .idle, let incoming { await slideUnopened(incoming) }
            if let lock { await locks.release(lock) }
            return .unchanged
        }
        var id = session.id
        var keys = self.keys(of: session)
        let now = currentTimeMillis()

        if session.isInvalidated {
            statistics.count(.sessionsInvalidated)
            if session.mayBeStored {
                await store.deleteCopies(
                    keys: keys, nodeID: id.nodeID, lock: lock, wait: true, sessionIdle: session.metadata.idleTimeoutSeconds,
                    cookieNodeID: incoming?.nodeID)
            } else if let lock {
                await locks.release(lock)
            }
            return incoming == nil ? .unchanged : SessionResponseAction(cookie: .clear)
        }

        var oldCopies: (SessionKeys, String)? = nil
        if regenerate {
            oldCopies = (keys, id.nodeID)
            id = context.generateID(nodeID: context.placementNode(), route: configuration.route)
            keys = self.keys(for: id.token)
            session.setID(id)
            session.markAllChanged()
            statistics.count(.sessionsRegenerated)
        }

        if case .auto = context.lockingMode {
            // Learn which paths only read: they run unlocked until one of their requests writes.
            locks.readOnlyPaths.record(access.path, modified: session.hasUnsavedChanges || mustWriteAll || regenerate)
        }

        if let held = lock, !regenerate, session.hasUnsavedChanges || mustWriteAll {
            // A locked request writes only under its lock.
            lock = try await locks.confirmLock(held, keys: keys, session: session)
        }

        if session.hasUnsavedChanges || mustWriteAll || regenerate {
            let isFreshPlacement = mustWriteAll || regenerate
            // The lock rides with the write only when both are on the same node.
            let lockWithWrite = (regenerate || lock?.nodeID != id.nodeID) ? nil : lock
            let (outcome, finalID) = await store.saveWithRelocation(
                session, keys: keys, nodeID: id.nodeID, lock: lockWithWrite, forceAdd: isFreshPlacement)
            if lockWithWrite == nil, let lock { await locks.release(lock) }
            switch outcome {
            case .saved(var record, let bytes, let written):
                var missed = AdoptedBackupNow.nothing
                if let adoptedBackup, !regenerate { missed = await missedChanges(since: adoptedBackup, written: record, keys: keys) }
                if case .ended = missed {
                    // Ended meanwhile (a logout on the old node): it stays ended.
                    statistics.count(.sessionsNotFound)
                    return .unchanged
                }
                if case .newer(let newer) = missed, let adoptedBackup {
                    // Moved, and a concurrent request wrote a newer version on the old node
                    // meanwhile (this instance could not reach it; the other could), whose backup
                    // landed after this request's search: the two are merged, as a fork is (the
                    // simulation, non-sticky seed 65295).
                    let merged: SessionRecord?
                    do {
                        merged = try await saveOntoFork(session, keys: keys, nodeID: finalID.nodeID, fork: .init(written: written, copy: newer))
                    } catch {
                        // Not written, or not known to be (the new place refused it, or did not
                        // answer): the write this move missed, acknowledged, would be lost with
                        // the old node. It is merged into the new place once that answers, within
                        // the move's minute (a second merge of a write that landed changes
                        // nothing, unless a request there removed an attribute it set between
                        // the two). (A session moved on meanwhile is not followed.)
                        store.leaveMissedMerge(keys: keys, home: finalID.nodeID, adopted: adoptedBackup, found: newer.record)
                        throw error
                    }
                    guard let merged else {
                        statistics.count(.sessionsNotFound)
                        return .unchanged
                    }
                    statistics.count(.backupForks)
                    record = merged
                    // The old copy's cleanup merges only what the backup shows after this.
                    store.advanceMergeBase(keys: keys, home: finalID.nodeID, to: newer.record)
                } else if let copy = await store.writeBackup(
                    keys: keys, primaryNode: finalID.nodeID, bytes: bytes, metadata: record.metadata, now: now, detectsForks: true)
                {
                    // Another copy of the version just written: the two are merged.
                    guard let merged = try await saveOntoFork(session, keys: keys, nodeID: finalID.nodeID, fork: .init(written: written, copy: copy))
                    else {
                        // Ended meanwhile (a logout, a login's new id): it stays ended.
                        statistics.count(.sessionsNotFound)
                        return .unchanged
                    }
                    record = merged
                }
                if let movedFrom, movedFrom != finalID.nodeID, let drained = topology.node(movedFrom) {
                    await drained.submit(prepared(.delete(keys.primary, quiet: true)))
                }
                if let (oldKeys, oldNode) = oldCopies {
                    // Waited for: the old id must be dead before the response (session fixation).
                    await store.deleteCopies(
                        keys: oldKeys, nodeID: oldNode, lock: nil, wait: true, sessionIdle: record.metadata.idleTimeoutSeconds,
                        cookieNodeID: incoming?.nodeID)
                } else if let incoming, finalID.token == incoming.token, finalID.nodeID != incoming.nodeID,
                    case .tombstone = await store.readStored(key: keys.primary, on: finalID.nodeID, touch: nil)
                {
                    // Moved, and ended meanwhile: a login racing this request gave the session a
                    // new id (or a logout ended it). The browser may hold the login's cookie by
                    // now, which this request's cookie would replace.
                    statistics.count(.sessionsNotFound)
                    return .unchanged
                }
                return finalID != incoming ? context.cookieAction(.set(finalID), record.metadata) : .unchanged
            case .gone:
                // Deleted meanwhile (a logout, or a login that gave it a new id, raced this
                // request): it stays deleted. The cookie is left alone: this request did not set
                // it, and the browser may hold a newer one by now (the login's).
                statistics.count(.sessionsNotFound)
                return .unchanged
            case .refused(let error):
                if let lockWithWrite { await locks.release(lockWithWrite) }
                throw error
            case .unreachable(let error, let afterConflict):
                if let lockWithWrite { await locks.release(lockWithWrite) }
                if error.leavesOutcomeUnknown || afterConflict {
                    // It may have been saved, or not: never a cleared cookie, never "saved". If it
                    // lands late, its backup (not written) is behind it: the next read here
                    // checks the backup's version (simulation, seed 1038: the primary evicted
                    // after the late write had been read, the older backup brought back).
                    store.backupMemo.forget(keys.backup)
                    statistics.count(.unavailable)
                    throw SessionError.unavailable("the session's write got no answer (\(error.code)): it may not have been saved")
                }
                _ = try context.unavailable(id: id, cause: "the session could be saved on no node (\(error.code))")
                return incoming == nil ? .unchanged : SessionResponseAction(cookie: .clear)
            case .unguarded:
                // Written, but not under the lock (``SessionStore/save``): it may or may not
                // survive. Its backup (not written) is behind it: the next read here checks the
                // backup's version.
                store.backupMemo.forget(keys.backup)
                statistics.count(.unavailable)
                throw SessionError(
                    code: .lockUnavailable,
                    message: "the session's lock was lost before this request's write landed: its changes may not have been saved")
            case .moved:
                // Moved again and again while this request ran (its relocations are bounded).
                if let lockWithWrite { await locks.release(lockWithWrite) }
                statistics.count(.unavailable)
                throw SessionError.unavailable("the session kept moving between nodes while this request ran: it was not saved")
            }
        }

        // Unchanged: no write at all, unless its copy was sealed with an older key.
        statistics.count(.writesSkipped)
        let metadata = session.metadata
        if let raw, store.needsReseal(raw) {
            await store.reseal(session.currentRecord, casUnique: session.storedCasUnique, keys: keys, nodeID: id.nodeID, now: now, releasing: lock)
            return id != incoming ? context.cookieAction(.set(id), metadata) : .unchanged
        }
        if let lock { await locks.release(lock) }
        store.refreshBackupIfDue(keys: keys, primaryNode: id.nodeID, raw: raw, metadata: metadata, now: now)
        if let expected = SessionStore.primaryTTLSeconds(metadata, now: now), expected != defaultIdleSeconds + 1,
            let node = topology.node(id.nodeID)
        {
            // The load slid the TTL to the default; this session has its own timeout.
            await node.submit(.touch(keys.primary, ttl: .seconds(Int(expected))))
        }
        return id != incoming ? context.cookieAction(.set(id), metadata) : .unchanged
    }

    /// What the backup copy a recovery served the session from holds now.
    private enum AdoptedBackupNow {
        /// Nothing this request's write lacks.
        case nothing
        /// A copy with changes the write lacks.
        case newer(StoredSession)
        /// A tombstone: the session was ended (a logout, a login's new id) on the old node.
        case ended
    }

    /// The backup copy a recovery served the session from, read again after the session's write
    /// at its new place: a copy there that holds a change the write lacks (an attribute or the
    /// idle timeout that differs from the adopted copy's and from the written one's) was written
    /// after the recovery's search, by a request that still reached the old node. (A copy whose
    /// changes the write holds already is not.) One round trip, on a request that moved the
    /// session from a backup (not a restore's, whose new primary's backup goes to that key).
    private func missedChanges(since adopted: SessionAccess.AdoptedBackup, written: SessionRecord, keys: SessionKeys) async
        -> AdoptedBackupNow
    {
        let stored: StoredSession
        switch await store.readStored(key: keys.backup, on: adopted.nodeID, touch: nil) {
        case .found(let found): stored = found
        case .tombstone: return .ended
        case .missing, .unreachable: return .nothing
        }
        guard stored.record.metadata.version >= adopted.record.metadata.version else { return .nothing }
        // A change of the copy's since the adopted one that the write does not hold.
        let changes = stored.record.changes(since: adopted.record)
        let missed =
            changes.attributes.contains { name, value in value != written.attributes[name] }
            || changes.idleTimeoutSeconds.map { $0 != written.metadata.idleTimeoutSeconds } ?? false
        return missed ? .newer(stored) : .nothing
    }

    /// A save's backup write met a fork: another copy of the version the save wrote. Two writes
    /// gave the session one version, one of them after its copy was lost (its node restarted)
    /// and before the other's backup landed, so each copy lacks the other's change (the
    /// simulation, non-sticky seed 67253). The primary is written again with a three-way merge
    /// of the two copies onto it as it is now
    /// (``SessionStore/save(_:keys:on:releasing:forceAdd:restoreIfMissing:ontoFork:)``), and its
    /// backup after it. Returns the record written; nil when the session ended
    /// meanwhile. Throws when it could not be written: this request's changes may be in neither
    /// copy.
    private func saveOntoFork(
        _ session: MemcachedSession, keys: SessionKeys, nodeID: String, fork: SessionStore.ForkedCopy
    ) async throws(SessionError) -> SessionRecord? {
        switch await store.save(session, keys: keys, on: nodeID, ontoFork: fork) {
        case .saved(let record, let bytes, _):
            await store.writeBackup(keys: keys, primaryNode: nodeID, bytes: bytes, metadata: record.metadata, now: currentTimeMillis())
            return record
        case .gone:
            return nil
        case .refused(let error):
            throw error
        case .unreachable, .moved, .unguarded:
            store.backupMemo.forget(keys.backup)
            statistics.count(.unavailable)
            throw SessionError.unavailable(
                "a concurrent request's copy of the session, of the same version as this request's, could not be merged with it: its changes may not have been saved"
            )
        }
    }

    /// A request that carried a session cookie but never opened the session: slide its TTL with
    /// requests it does not wait for. The session's own idle timeout is in the primary item's
    /// flags (a "remember me" session must not be shortened to the default), so the slide reads
    /// the item's metadata (`mg <key> f c t`, no value) and then touches primary and, when due,
    /// backup with the right TTLs.
    func slideUnopened(_ id: MemcachedSessionID) async {
        guard topology.contains(id.nodeID), let node = topology.node(id.nodeID), node.isAvailable else { return }
        let keys = self.keys(for: id.token)
        statistics.count(.touches)
        guard configuration.memcached.protocolMode == .meta else {
            // The text protocol cannot read flags without the value: slide to the default.
            let slide = store.slideTTL
            await node.submit(prepared(.touch(keys.primary, ttl: slide)))
            return
        }
        await node.submit(prepared(.getMetadata(keys.primary))) { [weak self] result in
            guard let self, case .success(.item(let item?)) = result, item.flags != SessionStore.tombstoneFlags else { return }
            let idle = Int64(item.flags)
            guard idle > 0 else { return }  // never expires from inactivity: nothing to slide
            let metadata = SessionMetadata(createdAt: 0, lastAccessedAt: 0, idleTimeoutSeconds: idle, absoluteTimeoutSeconds: 0, version: 0)
            let backupNode = self.topology.nextAvailable(after: id.nodeID)
            let backupDue =
                backupNode.map {
                    self.store.backupMemo.needsRefresh(keys.backup, node: $0, window: SessionStore.backupRefreshWindow(metadata))
                } ?? false
            if backupDue, let backupNode { self.store.backupMemo.record(keys.backup, node: backupNode) }
            let now = self.currentTimeMillis()
            let backupTTL = SessionStore.backupTTL(metadata, now: now)
            let expiresAt = SessionStore.backupExpiresAt(metadata, now: now)
            _ = Task {
                await node.submit(.touch(keys.primary, ttl: .seconds(Int(idle) + 1)))
                if backupDue, let backupNode, let backup = self.topology.node(backupNode) {
                    self.statistics.count(.backupTouches)
                    await backup.submit(.touch(keys.backup, ttl: backupTTL)) { result in
                        // Sent, unanswered: it may land late and keep the copy past its end.
                        guard case .failure(let error) = result, error.leavesOutcomeUnknown, let expiresAt else { return }
                        self.store.leaveForLater(
                            .backupTouch(flags: nil, expiresAt: expiresAt, primaryKey: keys.primary, primaryNode: id.nodeID),
                            key: keys.backup, on: backupNode)
                    }
                }
            }
        }
    }

}

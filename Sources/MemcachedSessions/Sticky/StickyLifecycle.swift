import Logging
import Memcached
import NIOCore
import Synchronization

/// Sticky mode: this instance's memory is authoritative and memcached holds a copy for failover.
///
/// - A request finds the session in memory (no round trip), or loads it from memcached when this
///   instance does not hold it (app-server failover) or the id names another instance's route
///   (explicit takeover: the local copy, possibly stale, is dropped and never served).
/// - At the end a changed session is written back: before the response (synchronous: no
///   acknowledged change is lost if the instance dies) or through the asynchronous writer
///   (faster; a crash loses at most the queued writes; graceful shutdown flushes them).
/// - An unchanged session only has its memcached TTL slid, at most once per touch interval.
/// - When its node is down the session moves to the next available node (new id, new cookie);
///   when every node is down sessions keep working from memory and are saved once a node is back.
/// - Writes are CAS writes: a copy changed by another instance meanwhile is merged, never
///   overwritten, and a copy deleted meanwhile (logout elsewhere) ends the local one too.
final class StickyLifecycle: SessionLifecycle {
    let context: SessionContext
    let store: SessionStore
    /// This instance's sessions.
    let localStore: LocalSessionStore
    let writer: AsynchronousWriter
    /// When this instance last read its ownership notices.
    let notices = OwnershipNotices()
    /// How often an unchanged session's memcached TTL is slid.
    let touchInterval: TimeAmount
    /// Notices sent for logouts of sessions not found (``endUnfound(_:)``) in the current second:
    /// a cookie's route is not authenticated, and forged logouts must not flood a mailbox.
    private let unfoundNotices = Mutex<(second: Int64, sent: Int)>((0, 0))
    static let unfoundNoticesPerSecond = 20

    init(context: SessionContext, store: SessionStore) {
        self.context = context
        self.store = store
        let configuration = context.configuration
        self.localStore = LocalSessionStore(capacity: configuration.sticky.localSessionLimit)
        self.writer = AsynchronousWriter(
            limit: configuration.sticky.queueLimit, delay: TimeAmount(configuration.sticky.saveDelay), clock: context.clock)
        self.touchInterval = TimeAmount(
            configuration.sticky.touchInterval ?? .seconds(CopyLifetimes.refreshWindowSeconds(idle: context.defaultIdleSeconds)))
        if configuration.mode == .sticky {
            // A node that restarted lost this instance's copies there: written back from memory.
            store.onNodeRestart { [weak self] nodeID in
                guard let self, self.isEnabled else { return }
                await self.restoreLocalCopies(on: nodeID)
            }
        }
    }

    /// The sticky instance's background work: the asynchronous writer (flushed on graceful
    /// shutdown), retries of saves no node took, the sweep of idle sessions from memory, and the
    /// ownership notices with the heartbeat.
    func run() async {
        await withDiscardingTaskGroup { background in
            background.addTask {
                await self.writer.run(
                    write: { batch in await self.saveBatch(batch) },
                    unsaved: {
                        self.localStore.allSessions.filter { $0.hasUnsavedChanges && !$0.isInvalidated && !$0.isTakenOver }
                    })
            }
            background.addTask { await self.retryFailedSavesPeriodically() }
            background.addTask { await self.sweepPeriodically() }
            background.addTask { await self.readNoticesPeriodically() }
        }
    }

    private func retryFailedSavesPeriodically() async {
        guard configuration.mode == .sticky else { return }
        while !Task.isCancelled {
            do { try await clock.sleep(for: AsynchronousWriter.retryInterval) } catch { return }
            if writer.retryCount > 0 { writer.requeueRetries() }
        }
    }

    private func sweepPeriodically() async {
        // Off the event loop the background work runs on: a sweep walks every session held (up
        // to `localSessionLimit`), which would hold up that loop's connections.
        await withTaskExecutorPreference(SessionManager.backgroundExecutor == nil ? nil : globalConcurrentExecutor) {
            while !Task.isCancelled {
                do { try await clock.sleep(for: .seconds(5)) } catch { return }
                let removed = localStore.sweep(now: currentTimeMillis())
                if removed > 0 { statistics.count(.sessionsExpired, removed) }
            }
        }
    }

    func mayWaitForMemcached(_ id: MemcachedSessionID?) -> Bool {
        guard isEnabled else { return false }
        if !configuration.sticky.asynchronousSaving { return true }
        guard let id else { return false }  // a new sticky session is saved by the writer
        if configuration.route != nil, id.route != configuration.route { return true }  // takeover: a load
        return !localStore.holdsFresh(id.token, within: touchInterval, now: clock.now())
    }

    /// A session replaced by ``SessionAccess/create()``: gone from memory, its stored copies ended.
    func retire(_ session: MemcachedSession, lock: HeldLock?) -> Task<Void, Never> {
        // Ended, not just removed: a concurrent request that read the copy before the tombstones
        // below landed must not adopt it back into memory (it did, when the request that
        // replaced it returned at once: an empty new session).
        localStore.end(session.id.token, at: clock.now())
        guard isEnabled else { return Task {} }
        return Task {
            // A save of it in flight lands first (a queued one is dropped: it is invalidated).
            await self.writer.awaitWrites(of: [session])
            await self.store.deleteCopies(
                keys: self.keys(for: session.id.token), nodeID: session.id.nodeID, lock: lock, wait: true,
                sessionIdle: session.metadata.idleTimeoutSeconds)
        }
    }

    /// As every mode, and the instance the id's route names is told (an ownership notice that
    /// ends any version): it may still hold the session in memory, which a takeover that found no
    /// copy (evicted, a node restarted empty) never told (the simulation, sticky-async seed 5764:
    /// the owner served the logged-out id from memory). Only a live route (a heartbeat), and at
    /// most ``unfoundNoticesPerSecond`` a second: the route comes from the cookie, and any
    /// request can claim one; past that the owner finds the tombstones at its next check.
    func endUnfound(_ id: MemcachedSessionID) async {
        let keys = keys(for: id.token)
        await store.deleteCopies(keys: keys, nodeID: id.nodeID, lock: nil, wait: true, sessionIdle: nil)
        guard let owner = id.route, let route = configuration.route, owner != route else { return }
        let second = clock.now().uptimeNanoseconds / 1_000_000_000
        let admitted = unfoundNotices.withLock { budget -> Bool in
            if budget.second != Int64(second) { budget = (Int64(second), 0) }
            guard budget.sent < Self.unfoundNoticesPerSecond else { return false }
            budget.sent += 1
            return true
        }
        guard admitted else {
            statistics.count(.unfoundNoticesSkipped)
            return
        }
        guard await !readHeartbeats(of: owner).isEmpty else { return }
        _ = await endTakenOver(keys, from: owner, version: .max)
    }

    func load(_ access: SessionAccess) async throws(SessionError) -> MemcachedSession? {
        guard let id = access.requestedID else { return nil }
        let memoryOnly = !isEnabled
        guard memoryOnly || topology.contains(id.nodeID) else {
            statistics.count(.sessionsNotFound)
            return nil
        }
        let now = currentTimeMillis()
        let takeover = !memoryOnly && configuration.route != nil && id.route != configuration.route
        if !takeover, let (session, refreshed) = localStore.access(id.token, now: now) {
            if session.isInvalidated { return nil }
            if context.isExpired(SessionRecord(metadata: session.metadata, attributes: [:]), now: now) {
                localStore.remove(id.token, ifSame: session)
                statistics.count(.sessionsExpired)
                if !memoryOnly {
                    await store.deleteCopies(
                        keys: keys(for: id.token), nodeID: session.id.nodeID, lock: nil, wait: false,
                        sessionIdle: session.metadata.idleTimeoutSeconds)
                }
                return nil
            }
            statistics.count(.sessionsLoadedLocally)
            let now = clock.now()
            if !memoryOnly,
                now - refreshed >= touchInterval || notices.mayHaveMissed(now: now, limit: Self.noticeGapLimit)
                    || session.indexNamesAnotherRoute
            {
                // Once per touch interval the local copy is checked against memcached, in the
                // same round trip that slides its TTL: a copy another instance changed or
                // invalidated (it took the session over while a stale cookie still routes here)
                // is not served past that. At every request while the principal index names
                // another instance for it: a revocation's notice would not reach this one.
                guard await revalidate(session) else { return nil }
                access.state.withLock { $0.loaded.lastStoreRefresh = clock.now() }
            } else {
                access.state.withLock { $0.loaded.lastStoreRefresh = refreshed }
            }
            return session
        }
        if memoryOnly {
            statistics.count(.sessionsNotFound)
            return nil
        }
        if takeover {
            // A concurrent request of this session already took it over here: share its copy.
            if let shared = localStore.held(id.token, refreshedSince: access.started), !shared.isInvalidated {
                access.state.withLock { $0.loaded.lastStoreRefresh = clock.now() }
                return shared
            }
            // Another instance owned it: whatever this instance remembers may be stale.
            localStore.remove(id.token)
        }
        var keys = self.keys(for: id.token)
        if store.leftovers.count > 0 { await store.cleanLeftovers(on: id.nodeID, key: keys.primary) }
        let slide = store.slideTTL
        var read = await store.readStored(key: keys.primary, on: id.nodeID, touch: slide)
        (keys, read) = await store.followingKeyTransition(keys: keys, read: read, token: id.token, on: id.nodeID, touch: slide)
        if takeover, case .missing = read, configuration.sticky.asynchronousSaving {
            // The previous owner may still have the session's first save queued (asynchronous
            // saving): wait out its window once, then look again. A crashed owner's window is
            // lost, as documented; a live one's lands within it.
            do { try await clock.sleep(for: configuration.sticky.saveDelay + .milliseconds(100)) } catch {}
            read = await store.readStored(key: keys.primary, on: id.nodeID, touch: slide)
        }
        if takeover, case .missing = read, await previousOwnerMayBeRestoring(on: id.nodeID) {
            // The node restarted empty a moment ago: the previous owner writes the sessions it
            // holds there back from memory (``restoreLocalCopies(on:)``) once its own watch has
            // seen the restart. Wait for that, bounded, before calling the session gone.
            read = await awaitRestoredCopy(key: keys.primary, on: id.nodeID, touch: slide)
        }
        var home = id.nodeID
        if takeover, case .missing = read {
            // The previous owner may have moved the session to another node while its own was
            // down (a save that found the node down relocates it, keeping its token), with no
            // response to carry the new cookie: look there, in one parallel round trip (the
            // simulation, seeds 2933 and 3182: the node restarted empty, or answered again and
            // had its old copy deleted).
            let search = await store.searchCopies(
                keys: keys, on: topology.others(than: id.nodeID).filter { topology.isReachable($0) })
            if search.tombstone {
                statistics.count(.sessionsNotFound)
                return nil
            }
            if let newest = search.newest, newest.isPrimary {
                read = .found(newest.stored)
                home = newest.nodeID
                statistics.count(.sessionsRestored)
            }
        }
        var noticePosted = false
        var writeBack = false
        if takeover, configuration.sticky.asynchronousSaving, case .found(let first) = read, let previous = id.route {
            // The takeover handshake: the previous owner may hold a queued write of this session
            // (asynchronous saving). Once it has read the notice, nothing of it is queued or in
            // flight; the copy read after that has whatever landed. Without the handshake a write
            // due just before the notice's read lands after this copy was read, and the browser
            // sees a change come back it had not seen since (the simulation, seed 1146).
            noticePosted = true
            // Read again even when the owner did not acknowledge in time (a fault slowed its
            // notice read): its write, due meanwhile, has most likely landed by now (the
            // simulation, seed 11679). Not when it is not alive (no heartbeat): nothing of it
            // lands meanwhile, and reading again would only cost a round trip; nor when the
            // notice reached no node (no node answers now: a second read would not either).
            let handshake = await endTakenOver(keys, from: previous, version: first.record.metadata.version)
            if handshake == .read || handshake == .timedOut {
                switch await store.readStored(key: keys.primary, on: home, touch: slide) {
                case .missing:
                    // The node restarted meanwhile, and the previous owner has dropped its copy:
                    // the copy read before is the newest there is; it is written back at the end
                    // of this request (the simulation, seed 1187).
                    writeBack = true
                case .unreachable:
                    break  // the copy read before
                case let again:
                    read = again
                }
            }
        }
        switch read {
        case .found(let stored):
            if context.isExpired(stored.record, now: now) {
                statistics.count(.sessionsExpired)
                await store.deleteCopies(keys: keys, nodeID: home, lock: nil, wait: false, sessionIdle: stored.record.metadata.idleTimeoutSeconds)
                return nil
            }
            let owned = id.relocated(to: home).routed(to: configuration.route)
            let loaded = context.makeSession(id: owned, record: stored.record, casUnique: stored.casUnique, isNew: false)
            let refreshed = clock.now()
            // Concurrent requests of this session that loaded it meanwhile share one copy.
            guard let session = localStore.adopt(loaded, token: id.token, now: now, refreshed: refreshed, since: access.started)
            else { throw localStoreFull() }
            // Found under its keyed keys just before a storage-key switch: it stays there.
            if keys.isKeyed { session.cacheKeys(keys) }
            if session.isInvalidated {
                // Ended by a request of this instance since this one began (its read came first).
                statistics.count(.sessionsNotFound)
                return nil
            }
            access.state.withLock { $0.loaded.lastStoreRefresh = refreshed }
            if writeBack { session.markAllChanged() }
            if store.needsReseal(stored.raw) {
                // Sealed with an older key (or not sealed): this instance owns it now, and its
                // save (asynchronous by default) seals it with the current key.
                statistics.count(.sessionsResealed)
                session.markAllChanged()
            }
            statistics.count(.sessionsLoaded)
            if takeover, let previous = id.route {
                // The previous owner drops its copy (and its queued write) when it reads this.
                session.takenOverFrom = previous
                // Its principal index entry names the previous owner, whom a revocation would
                // tell: the end of this request moves it here.
                session.markIndexedRoute(previous)
                let version = stored.record.metadata.version
                if !noticePosted { Task { await self.postNotice(keys, to: previous, version: version) } }
            }
            if takeover {
                statistics.count(.takeovers)
                events.record(.failover, "sessions taken over from route \(id.route ?? "-") (app server failover)")
                logger.info(
                    "sticky session taken over from another instance",
                    metadata: ["route.previous": "\(id.route ?? "-")", "route": "\(configuration.route ?? "-")"])
            } else {
                statistics.count(.appServerFailovers)
            }
            return session
        case .missing, .tombstone:
            statistics.count(.sessionsNotFound)
            return nil
        case .unreachable(let error):
            return try context.unavailable(id: id, cause: "not in this instance's memory and its node did not answer (\(error.code))")
        }
    }

    func end(_ access: SessionAccess) async throws(SessionError) -> SessionResponseAction {
        let (phase, session, regenerate, lastRefresh) = access.state.withLock { state in
            (state.phase, state.session, state.regenerate, state.lastStoreRefresh)
        }
        let incoming = access.requestedID
        guard phase == .loaded, let session else {
            if phase == .idle, let incoming { await slideUnopened(incoming) }
            return .unchanged
        }
        var id = session.id
        let now = currentTimeMillis()

        if session.isInvalidated {
            statistics.count(.sessionsInvalidated)
            if session.wasInvalidatedElsewhere {
                localStore.remove(id.token, ifSame: session)
            } else {
                localStore.end(id.token, at: clock.now())
            }
            // A write of the session the asynchronous writer has in flight lands first; a new
            // session whose first add had its reply lost may be stored as well (the simulation,
            // seed 87: a logout left that copy alone, and another instance served it).
            if isEnabled { await writer.awaitWrites(of: [session]) }
            if session.mayBeStored, isEnabled {
                await store.deleteCopies(
                    keys: keys(for: id.token), nodeID: id.nodeID, lock: nil, wait: true, sessionIdle: session.metadata.idleTimeoutSeconds,
                    cookieNodeID: incoming?.nodeID)
                // The instance it was taken over from must not serve it from memory any more.
                if let previous = session.takenOverFrom, previous != configuration.route {
                    await endTakenOver(keys(for: id.token), from: previous, version: session.metadata.version)
                }
            }
            return incoming == nil ? .unchanged : SessionResponseAction(cookie: .clear)
        }

        if regenerate {
            let old = id
            id = context.generateID(nodeID: context.placementNode(), route: configuration.route)
            session.setID(id)
            session.markAllChanged()
            localStore.end(old.token, at: clock.now())
            localStore.put(session, token: id.token, now: now, refreshed: clock.now(), force: true)
            statistics.count(.sessionsRegenerated)
            if isEnabled {
                await store.deleteCopies(
                    keys: keys(for: old.token), nodeID: old.nodeID, lock: nil, wait: true, sessionIdle: session.metadata.idleTimeoutSeconds,
                    cookieNodeID: incoming?.nodeID)
                if let previous = session.takenOverFrom, previous != configuration.route {
                    await endTakenOver(keys(for: old.token), from: previous, version: session.metadata.version)
                    session.takenOverFrom = nil
                }
            }
        } else if session.isNew {
            guard localStore.put(session, token: id.token, now: now, refreshed: clock.now()) else { throw localStoreFull() }
        }

        guard isEnabled else {
            return id != incoming ? context.cookieAction(.set(id), session.metadata) : .unchanged
        }

        if !topology.isAvailable(id.nodeID), let next = topology.nextAvailable(after: id.nodeID) {
            // The node is down: the session is safe in memory; give it a live node and a new id.
            statistics.count(.relocations)
            statistics.count(.memcachedFailovers)
            events.record(.failover, "sticky sessions moved from \(id.nodeID) to \(next): \(id.nodeID) is down or removed")
            store.leaveOldPrimary(keys: keys(for: id.token), on: id.nodeID, version: session.metadata.version + 1)
            id = id.relocated(to: next)
            session.setID(id)
            session.markAllChanged()
        }

        if session.hasUnsavedChanges {
            if configuration.sticky.asynchronousSaving, writer.enqueue(session) {
                statistics.count(.writesAsynchronous)
            } else {
                try await save(session, synchronous: true)
            }
        } else {
            statistics.count(.writesSkipped)
            if lastRefresh.map({ clock.now() - $0 >= touchInterval }) ?? true {
                await touch(session)
            }
        }
        id = session.id
        if session.isInvalidated {
            // Ended by this request: clear the cookie. Found ended by another (a logout there):
            // leave the cookie alone, the browser may hold a newer one by now.
            return incoming == nil || session.wasInvalidatedElsewhere ? .unchanged : SessionResponseAction(cookie: .clear)
        }
        return id != incoming ? context.cookieAction(.set(id), session.metadata) : .unchanged
    }

    /// Saves a sticky session (at the end of the request, or from the asynchronous writer).
    func save(_ session: MemcachedSession, synchronous: Bool, again: Bool = false) async throws(SessionError) {
        let id = session.id
        let keys = self.keys(of: session)
        let (outcome, finalID) = await store.saveWithRelocation(
            session, keys: keys, nodeID: id.nodeID, lock: nil, forceAdd: false, restoreIfMissing: true)
        switch outcome {
        case .saved:
            localStore.markRefreshed(finalID.token, at: clock.now())
            let now = session.id
            if !again, now.token == finalID.token, now.nodeID != finalID.nodeID, session.hasUnsavedChanges {
                // A concurrent request of this instance moved the session while this save went
                // to the node it left: this request's changes go where the session is now, before
                // the response.
                try await save(session, synchronous: synchronous, again: true)
            }
        case .gone:
            statistics.count(.sessionsNotFound)
            // A copy under an id the session no longer has (a login gave it a new one while this
            // save was on its way): that id's end is expected; the session lives on under its new id.
            guard session.id.token == id.token else { return }
            // Deleted in memcached meanwhile: logged out on another instance. End it here too.
            session.invalidate(byAnotherRequest: true)
            localStore.remove(id.token, ifSame: session)
        case .refused(let error):
            logger.warning("session not saved", metadata: ["reason": "\(error.message)"])
            if synchronous { throw error }
        case .moved, .unguarded:
            // Not in sticky mode (a missing copy is written again from memory; no locks): tried
            // again.
            writer.retryLater(session)
        case .unreachable(let error, _):
            // Every node is down: the session keeps living in memory; the writer tries again
            // until a node answers (and a later change would save it anyway).
            logger.warning("sticky session could not be saved: no memcached node answered", metadata: ["memcached.error": "\(error)"])
            writer.retryLater(session)
        }
    }

    /// The asynchronous writer's batch: the sessions are encoded and sent to their nodes in one
    /// pipelined write per node (one waiting task per node, not per session); a session whose
    /// write did not simply succeed (a conflict, a lost copy, a node down) then takes the full
    /// save path of ``save(_:synchronous:)``.
    func saveBatch(_ sessions: [MemcachedSession]) async {
        let now = currentTimeMillis()
        struct Pending {
            let session: MemcachedSession
            let snapshot: MemcachedSession.Snapshot
            let bytes: ByteBuffer
        }
        var perNode: [String: [Pending]] = [:]
        var slow: [MemcachedSession] = []
        // A session another instance took over meanwhile is dead here: its queued write goes
        // no further (it would merge older values over the new owner's).
        for session in sessions where !session.isInvalidated && !session.isTakenOver {
            let snapshot = session.snapshotForSave(now: now)
            let nodeID = snapshot.id.nodeID
            guard !snapshot.moved, snapshot.casUnique != nil || snapshot.isNew, topology.isAvailable(nodeID) else {
                slow.append(session)
                continue
            }
            let keys = self.keys(of: session)
            do {
                let bytes = try store.encode(snapshot.record, key: keys.primary)
                perNode[nodeID, default: []].append(Pending(session: session, snapshot: snapshot, bytes: bytes))
            } catch {
                logger.warning("session not saved", metadata: ["reason": "\(error.message)"])
            }
        }
        let retries = await withTaskGroup(of: [MemcachedSession].self) { group in
            for (nodeID, pending) in perNode {
                guard let node = topology.node(nodeID) else { continue }
                group.addTask {
                    let requests = pending.map { item in
                        var request = MemcachedRequest.store(
                            self.keys(of: item.session).primary, value: item.bytes,
                            mode: item.snapshot.casUnique == nil ? .add : .set,
                            ttl: SessionStore.primaryTTL(item.snapshot.record.metadata, now: now),
                            flags: SessionStore.primaryFlags(item.snapshot.record.metadata), cas: item.snapshot.casUnique)
                        request.timeout = self.configuration.timeouts.save
                        return self.prepared(request)
                    }
                    let results = await node.executeBatch(requests)
                    var retry: [MemcachedSession] = []
                    for (item, result) in zip(pending, results) {
                        if case .success(.stored(.stored(let cas))) = result {
                            item.session.markSaved(item.snapshot, saved: item.snapshot.record, casUnique: cas)
                            self.statistics.count(.writes)
                            self.statistics.count(.bytesWritten, item.bytes.readableBytes)
                            self.localStore.markRefreshed(item.snapshot.id.token, at: self.clock.now())
                            let current = item.session.id
                            if current.token == item.snapshot.id.token, current.nodeID != item.snapshot.id.nodeID,
                                item.session.hasUnsavedChanges
                            {
                                retry.append(item.session)  // moved meanwhile: written where it is now
                            }
                        } else {
                            retry.append(item.session)
                        }
                    }
                    return retry
                }
            }
            var all: [MemcachedSession] = []
            for await part in group { all += part }
            return all
        }
        let remaining = slow + retries
        guard !remaining.isEmpty else { return }
        await withDiscardingTaskGroup { group in
            for session in remaining {
                group.addTask { try? await self.save(session, synchronous: false) }
            }
        }
    }

    /// Reads the stored copy of a locally held session, sliding its TTL. A newer copy replaces the
    /// local one (unless the local one has changes of its own, which the next save merges); a
    /// tombstone ends it; a missing copy (memcached restarted or evicted it) is written again.
    /// Returns false when the session is gone.
    func revalidate(_ session: MemcachedSession) async -> Bool {
        let id = session.id
        let keys = self.keys(of: session)
        let ttl = SessionStore.primaryTTL(session.metadata, now: currentTimeMillis())
        statistics.count(.touches)
        switch await store.readStored(key: keys.primary, on: id.nodeID, touch: ttl) {
        case .found(let stored):
            if session.replaceIfNewerAndUnchanged(with: stored.record, casUnique: stored.casUnique) {
                statistics.count(.localCopiesReplaced)
            }
        case .tombstone:
            // A login of this instance racing this request may have given the shared copy a new
            // id and ended the old one meanwhile: the old id is gone, the copy under its new id
            // stays (the simulation, seed 1571: the login's response cleared its own cookie).
            session.invalidate(byAnotherRequest: false, ifToken: id.token)
            localStore.remove(id.token, ifSame: session)
            statistics.count(.sessionsNotFound)
            return false
        case .missing:
            if await store.endedOnSomeNode(keys) {
                // Ended (its node lost the tombstone in a restart; the other nodes have theirs).
                session.invalidate(byAnotherRequest: true, ifToken: id.token)
                localStore.remove(id.token, ifSame: session)
                statistics.count(.sessionsNotFound)
                return false
            }
            guard session.id.token == id.token else { return false }  // regenerated meanwhile
            statistics.count(.backupRepairs)
            session.markAllChanged()
            if !writer.enqueue(session) { writer.retryLater(session) }
        case .unreachable:
            break  // sticky sessions keep working from memory
        }
        localStore.markRefreshed(id.token, at: clock.now())
        return true
    }

    /// Slides an unchanged sticky session's memcached TTL (a touch the request does not wait for).
    func touch(_ session: MemcachedSession) async {
        let id = session.id
        guard let node = topology.node(id.nodeID), node.isAvailable else { return }
        let ttl = SessionStore.primaryTTL(session.metadata, now: currentTimeMillis())
        statistics.count(.touches)
        localStore.markRefreshed(id.token, at: clock.now())
        let statistics = self.statistics
        await node.submit(.touch(keys(of: session).primary, ttl: ttl)) { [weak self] result in
            // memcached lost the copy (restarted, evicted): write it again from memory.
            guard case .success(.touched(false)) = result, let self, !session.isInvalidated else { return }
            statistics.count(.backupRepairs)
            session.markAllChanged()
            if !self.writer.enqueue(session) { self.writer.retryLater(session) }
        }
    }

    /// A request with the cookie that never opened the session: mark it accessed in memory and
    /// slide the memcached TTL when due.
    func slideUnopened(_ id: MemcachedSessionID) async {
        let takeover = isEnabled && configuration.route != nil && id.route != configuration.route
        guard !takeover, let (session, refreshed) = localStore.access(id.token, now: currentTimeMillis()) else { return }
        if isEnabled, clock.now() - refreshed >= touchInterval {
            await touch(session)
        }
    }

    /// The error for a new session refused because memory is full of unsaved sessions.
    func localStoreFull() -> SessionError {
        statistics.count(.localStoreRefusals)
        logger.warning(
            "new session refused: local memory is full of sessions memcached has not taken yet",
            metadata: ["sessions.limit": "\(configuration.sticky.localSessionLimit)"])
        return SessionError(
            code: .localStoreFull,
            message:
                "this instance holds \(configuration.sticky.localSessionLimit) sessions with changes memcached has not taken yet; new sessions are refused until a node answers"
        )
    }
}

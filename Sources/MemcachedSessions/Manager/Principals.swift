import Logging
import Memcached
import NIOCore

/// Sessions per principal: the index kept at the end of each request that changes a session's
/// principal or id, the limits, and the revocation of every session of a principal.
final class Principals: SessionManagerPart {
    let context: SessionContext
    let store: SessionStore
    /// Sticky mode's local sessions (this instance's copies end at once on a revocation).
    let sticky: StickyLifecycle
    let index: PrincipalIndex

    init(context: SessionContext, store: SessionStore, sticky: StickyLifecycle) {
        self.context = context
        self.store = store
        self.sticky = sticky
        self.index = PrincipalIndex(context: context, store: store)
    }

    // MARK: - the end of a request

    /// After the session's own write: the index learns a login, a change of principal, a new id,
    /// or a logout. A login refused at the concurrent session limit ends the session and throws.
    func requestEnded(_ session: MemcachedSession, lifecycle: any SessionLifecycle) async throws(SessionError) {
        guard let work = session.principalIndexWork(), isEnabled else { return }
        let change: PrincipalIndexChange
        switch work {
        case .ended(let principal, let token):
            // A logout: its entry goes, best effort (a stale entry only ends an ended session again).
            let digest = keys(for: token).digest
            _ = try? await index.update(index.locate(principal)) { entries in
                (entries.filter { $0.digest != digest }, [])
            }
            session.markUnindexed()
            return
        case .changed(let changed):
            change = changed
        }
        let oldDigest = change.old.map { keys(for: $0.token).digest }
        if let old = change.old, change.new?.principal != old.principal, let oldDigest {
            // Out of the previous principal's index (a change of user, or a logout of the user
            // that keeps the session): best effort, as a logout's.
            _ = try? await index.update(index.locate(old.principal)) { entries in
                (entries.filter { $0.digest != oldDigest }, [])
            }
        }
        if let new = change.new {
            let entry = PrincipalIndexEntry(digest: keys(for: new.token).digest, nodeID: change.nodeID, createdAt: change.createdAt)
            let outcome: PrincipalIndex.UpdateOutcome
            do {
                outcome = try await index.update(index.locate(new.principal)) { entries in
                    await admit(entry, replacing: oldDigest, into: entries)
                }
            } catch {
                statistics.count(.principalIndexFailures)
                // Not indexed, the session could not be revoked with the others: it ends (fail
                // closed) and the request fails.
                logger.warning("a login's session was ended: the principal index could not be updated", metadata: ["reason": "\(error.message)"])
                session.invalidate()
                await lifecycle.retire(session, lock: nil).value
                throw error
            }
            switch outcome {
            case .refused:
                statistics.count(.principalLoginsRefused)
                session.invalidate()
                await lifecycle.retire(session, lock: nil).value
                throw SessionError(code: .sessionLimitReached, message: "the principal has as many sessions as its limit allows")
            case .written(let dropped):
                statistics.count(.principalIndexUpdates)
                session.markIndexed(change)
                if !dropped.isEmpty {
                    statistics.count(.principalLimitLogouts, dropped.count)
                    await end(dropped)
                }
            }
        } else {
            statistics.count(.principalIndexUpdates)
            session.markIndexed(change)
        }
    }

    /// The index's entries with `entry` in (and `replaced`, the session's previous id, out);
    /// nil when the concurrent session limit refuses it. Entries past their absolute timeout go.
    private func admit(
        _ entry: PrincipalIndexEntry, replacing replaced: String?, into entries: [PrincipalIndexEntry]
    ) async -> (entries: [PrincipalIndexEntry], dropped: [PrincipalIndexEntry])? {
        let now = currentTimeMillis()
        var others = entries.filter { $0.digest != entry.digest && $0.digest != replaced && !isPastAbsolute($0, now: now) }
        var dropped: [PrincipalIndexEntry] = []
        if let limit = configuration.principals.concurrentSessionLimit, others.count >= limit {
            others = await live(others)
            if others.count >= limit {
                switch configuration.principals.whenLimitReached {
                case .refuseNewLogin:
                    return nil
                case .logOutOldest:
                    let excess = others.count - limit + 1
                    dropped = Array(others.prefix(excess))
                    others.removeFirst(excess)
                }
            }
        }
        return (others + [entry], dropped)
    }

    private func isPastAbsolute(_ entry: PrincipalIndexEntry, now: Int64) -> Bool {
        guard let absolute = configuration.timeouts.absolute else { return false }
        return entry.createdAt + absolute.components.seconds * 1000 < now
    }

    /// The entries whose sessions may still be live: those no node answered about are kept
    /// (fail closed); a session is dead only when a tombstone says so or no node holds it.
    private func live(_ entries: [PrincipalIndexEntry]) async -> [PrincipalIndexEntry] {
        var kept: [PrincipalIndexEntry] = []
        for entry in entries {
            let key = SessionKeys(digest: entry.digest, prefix: configuration.keyPrefix).primary
            var answered = 0
            var found = false
            var ended = false
            for nodeID in [entry.nodeID] + topology.others(than: entry.nodeID) {
                switch await store.readStored(key: key, on: nodeID, touch: nil) {
                case .found: found = true
                case .tombstone: ended = true
                case .missing: break
                case .unreachable: continue
                }
                answered += 1
                if found || ended { break }
            }
            let dead = ended || (!found && answered == topology.order.count)
            if !dead { kept.append(entry) }
        }
        return kept
    }

    // MARK: - ending sessions

    /// Ends the sessions of `entries` on every node (tombstones, as a logout that did not find
    /// its session), and this instance's local copies.
    func end(_ entries: [PrincipalIndexEntry]) async {
        let digests = Set(entries.map(\.digest))
        endLocally(digests)
        await withDiscardingTaskGroup { group in
            for entry in entries {
                group.addTask {
                    await self.store.deleteCopies(
                        keys: SessionKeys(digest: entry.digest, prefix: self.configuration.keyPrefix), nodeID: entry.nodeID, lock: nil, wait: true,
                        sessionIdle: nil)
                }
            }
        }
    }

    /// This instance's copies in memory (sticky mode, or memcached switched off) whose digest
    /// is in `digests` end at once.
    private func endLocally(_ digests: Set<String>) {
        guard !digests.isEmpty else { return }
        for session in sticky.localStore.allSessions where digests.contains(keys(of: session).digest) {
            let token = session.id.token
            session.invalidate(byAnotherRequest: true)
            sticky.localStore.end(token, at: clock.now())
        }
    }

    /// Ends every session of `principal` (see ``SessionManager/invalidateAll(principal:)``).
    func invalidateAll(_ principal: ByteBuffer) async throws(SessionError) -> Int {
        // This instance's own copies end first, whatever the index says.
        var localEnded = 0
        for session in sticky.localStore.allSessions where session.encodedValue(of: MemcachedSession.principalAttribute) == principal {
            let token = session.id.token
            session.invalidate(byAnotherRequest: true)
            sticky.localStore.end(token, at: clock.now())
            localEnded += 1
        }
        guard isEnabled else { return localEnded }
        let located = index.locate(principal)
        let (primary, backup) = await index.readBoth(located)
        let entries: [PrincipalIndexEntry]
        switch PrincipalIndex.newest(primary, backup) {
        case .noAnswer:
            throw PrincipalIndex.unavailable("neither node of the principal index answered: no session was ended", ended: 0)
        case .none:
            if case .unreachable = primary {
                throw PrincipalIndex.unavailable("the principal index's primary node did not answer and its backup has no copy", ended: 0)
            }
            if case .unreachable = backup {
                throw PrincipalIndex.unavailable("the principal index's backup node did not answer and its primary has no copy", ended: 0)
            }
            if await mayHaveEvicted([located.primaryNode, located.backupNode].compactMap { $0 }) {
                throw PrincipalIndex.unavailable(
                    "no copy of the principal index, and its nodes have evicted items: it may have been dropped", ended: 0)
            }
            return 0
        case .found(let contents, _, _):
            entries = contents.entries
        }
        await end(entries)
        let digests = Set(entries.map(\.digest))
        do {
            _ = try await index.update(located) { current in
                (current.filter { !digests.contains($0.digest) }, [])
            }
        } catch {
            // Every session read was ended; the index could not be emptied (ending them again
            // later is harmless), so the count is right but the caller must know.
            statistics.count(.sessionsRevoked, entries.count)
            throw PrincipalIndex.unavailable("sessions ended, but the principal index could not be rewritten: \(error.message)", ended: entries.count)
        }
        statistics.count(.sessionsRevoked, entries.count)
        logger.notice("every session of a principal was ended", metadata: ["sessions": "\(entries.count)"])
        return entries.count
    }

    /// Whether any of `nodes` has evicted items (an index missing there may have been dropped).
    private func mayHaveEvicted(_ nodes: [String]) async -> Bool {
        for nodeID in nodes {
            guard let node = topology.node(nodeID) else { return true }
            guard let stats = try? await node.stats() else { return true }
            let evictions = stats.first(where: { $0.name == "evictions" }).flatMap { Int64($0.value) } ?? 0
            if evictions > 0 { return true }
        }
        return false
    }
}

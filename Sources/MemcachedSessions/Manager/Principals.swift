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
            await unindex(token, from: principal)
            session.markUnindexed()
            return
        case .changed(let changed):
            change = changed
        }
        let oldDigest = change.old.map { keys(for: $0.token).digest }
        if let old = change.old, change.new?.principal != old.principal {
            // Out of the previous principal's index (a change of user, or a logout of the user
            // that keeps the session): best effort, as a logout's.
            await unindex(old.token, from: old.principal)
        }
        if let new = change.new {
            let entry = PrincipalIndexEntry(
                digest: keys(for: new.token).digest, nodeID: change.nodeID, createdAt: change.createdAt,
                // Sticky instances hold sessions in memory: a revocation tells the one named.
                route: configuration.mode == .sticky ? change.route : nil)
            // Only the route changed (a sticky takeover): the entry moves, it is never added back
            // (``takenOverButNotIndexed``).
            let routeOnly = change.old?.principal == new.principal && change.old?.token == new.token
            var absent = false
            let outcome: PrincipalIndex.UpdateOutcome
            do {
                outcome = try await index.update(index.locate(new.principal)) { entries in
                    absent = routeOnly && !entries.contains { $0.digest == entry.digest }
                    if absent { return nil }
                    return await admit(entry, replacing: oldDigest, into: entries)
                }
                if absent {
                    try await takenOverButNotIndexed(session, entry: entry, change: change, lifecycle: lifecycle)
                    return
                }
            } catch {
                statistics.count(.principalIndexFailures)
                guard change.old?.principal != new.principal || change.old?.token != new.token else {
                    // Only the route changed (a sticky takeover): the entry still names this
                    // session's keys, which a revocation tombstones. Tried again at its next request.
                    return
                }
                // A login or a new id the index does not hold could not be revoked with the
                // others: the session ends (fail closed) and the request fails.
                logger.warning("a login's session was ended: the principal index could not be updated", metadata: ["reason": "\(error.message)"])
                session.invalidate()
                await lifecycle.retire(session, lock: nil).value
                throw error
            }
            try await settle(outcome, of: session, change: change, lifecycle: lifecycle)
        } else {
            statistics.count(.principalIndexUpdates)
            session.markIndexed(change)
        }
    }

    /// A sticky takeover whose session the principal index no longer names: a revocation took
    /// it out since this instance read the session's copy (telling the route the entry named, not
    /// this one), or a login past the concurrent-session limit logged it out, or its principal's
    /// index was lost; the session ends here (fail closed: whichever it was, a tombstone may not
    /// have reached the node this instance reads). Kept only when the index kept before a
    /// storage-key switch still names it (a session indexed before the switch): its entry is
    /// then added to the current index, as before.
    private func takenOverButNotIndexed(
        _ session: MemcachedSession, entry: PrincipalIndexEntry, change: PrincipalIndexChange, lifecycle: any SessionLifecycle
    ) async throws(SessionError) {
        if let principal = change.new?.principal, let earlier = index.locateBeforeSwitch(principal) {
            let (primary, backup) = await index.readBoth(earlier)
            let unkeyed = SessionKeys.digest(of: session.id.token, secret: nil)
            if case .found(let contents, _, _) = PrincipalIndex.newest(primary, backup), contents.entries.contains(where: { $0.digest == unkeyed }) {
                // Not a new login: back in whatever the concurrent-session limit says (the limit
                // counts only the sessions indexed since the switch, and this one came before).
                let outcome = try await index.update(index.locate(principal)) { entries in
                    await admit(entry, replacing: nil, into: entries, limited: false)
                }
                try await settle(outcome, of: session, change: change, lifecycle: lifecycle)
                return
            }
        }
        statistics.count(.sessionsRevoked)
        logger.notice("a session taken over from another instance was revoked meanwhile: ended here too")
        let token = session.id.token
        session.invalidate(byAnotherRequest: true)
        sticky.localStore.end(token, at: clock.now())
        // Its copies too (a tombstone the revocation left for a node it could not reach).
        await store.deleteCopies(keys: keys(of: session), nodeID: session.id.nodeID, lock: nil, wait: false, sessionIdle: nil)
    }

    /// An index update that admitted the session: counted and marked on it, and the sessions a
    /// login past the concurrent-session limit logged out ended. Refused at the limit: the
    /// session ends and the request fails.
    private func settle(
        _ outcome: PrincipalIndex.UpdateOutcome, of session: MemcachedSession, change: PrincipalIndexChange,
        lifecycle: any SessionLifecycle
    ) async throws(SessionError) {
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
                await end(context.isShortOfKeySwitch ? dropped.flatMap(bothForms) : dropped)
            }
        }
    }

    /// An entry of an index kept under unkeyed digests, named in both forms: around a
    /// storage-key switch the instance that holds its session, or the node, may have it under its
    /// keyed keys already (a clock ahead of this one's). Keyed digests derive from unkeyed ones.
    private func bothForms(_ entry: PrincipalIndexEntry) -> [PrincipalIndexEntry] {
        guard let secret = configuration.sealing.storageKeySecret,
            let keyed = SessionKeys.keyedDigest(ofUnkeyed: entry.digest, secret: secret)
        else { return [entry] }
        return [entry, PrincipalIndexEntry(digest: keyed, nodeID: entry.nodeID, createdAt: entry.createdAt, route: entry.route)]
    }

    /// Takes a session out of a principal's index, best effort. After a storage-key switch, out
    /// of the index kept before it too (under its unkeyed digest): else revoking that principal
    /// would end the session, which may belong to another principal by now.
    private func unindex(_ token: MemcachedSessionID.Token, from principal: ByteBuffer) async {
        let digest = keys(for: token).digest
        let index = self.index
        // The index kept before a storage-key switch, if any, at the same time (two round trips
        // in parallel, not one after the other).
        async let earlierUpdated: Void = {
            guard let earlier = index.locateBeforeSwitch(principal) else { return }
            let unkeyed = SessionKeys.digest(of: token, secret: nil)
            _ = try? await index.update(earlier) { entries in
                (entries.filter { $0.digest != unkeyed }, [])
            }
        }()
        _ = try? await index.update(index.locate(principal)) { entries in
            (entries.filter { $0.digest != digest }, [])
        }
        await earlierUpdated
    }

    /// The index's entries with `entry` in (and `replaced`, the session's previous id, out);
    /// nil when the concurrent session limit refuses it (only when `limited`). Entries past their
    /// absolute timeout go.
    private func admit(
        _ entry: PrincipalIndexEntry, replacing replaced: String?, into entries: [PrincipalIndexEntry], limited: Bool = true
    ) async -> (entries: [PrincipalIndexEntry], dropped: [PrincipalIndexEntry])? {
        let now = currentTimeMillis()
        var others = entries.filter { $0.digest != entry.digest && $0.digest != replaced && !isPastAbsolute($0, now: now) }
        var dropped: [PrincipalIndexEntry] = []
        if limited, let limit = configuration.principals.concurrentSessionLimit, others.count >= limit {
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
    /// its session), this instance's local copies at once, and another sticky instance's copies
    /// by a notice to its route (read within a quarter of a second; waited for, at most a second,
    /// while that instance is alive).
    func end(_ entries: [PrincipalIndexEntry]) async {
        endLocally(Set(entries.map(\.digest)))
        await withDiscardingTaskGroup { group in
            for entry in entries {
                group.addTask {
                    let keys = SessionKeys(digest: entry.digest, prefix: self.configuration.keyPrefix)
                    await self.store.deleteCopies(keys: keys, nodeID: entry.nodeID, lock: nil, wait: true, sessionIdle: nil)
                    if let route = entry.route, route != self.configuration.route {
                        await self.sticky.endTakenOver(keys, from: route, version: .max)
                    }
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
        // This instance's own copies in memory are ended whatever the index says (one its
        // index update missed included), their stored copies with the others.
        var local: [PrincipalIndexEntry] = []
        for session in sticky.localStore.allSessions where session.encodedValue(of: MemcachedSession.principalAttribute) == principal {
            let id = session.id
            local.append(PrincipalIndexEntry(digest: keys(of: session).digest, nodeID: id.nodeID, createdAt: session.metadata.createdAt))
        }
        guard isEnabled else {
            endLocally(Set(local.map(\.digest)))
            return local.count
        }
        /// Ends what this instance knows of, then throws.
        func fail(_ message: String) async throws(SessionError) -> Never {
            await end(local)
            throw PrincipalIndex.unavailable(message, ended: local.count)
        }
        // After a storage-key switch the index kept before it is read too (and emptied); in the
        // minute before it, the one instances whose clocks are past it keep.
        let forms = [index.locate(principal)] + [index.locateBeforeSwitch(principal), index.locateAfterSwitch(principal)].compactMap { $0 }
        var entries: [PrincipalIndexEntry] = []
        var indexed: [Set<String>] = []
        // Each session once: an entry of the index from before the switch names it by its
        // unkeyed digest, and it may have moved to its keyed one (indexed since, too).
        var named = Set<String>()
        var count = 0
        var anyCopy = false
        // The forms whose entries are unkeyed digests: the index from before the switch, or the
        // current one in the minute before it.
        let unkeyedForms: Set<Int> = context.isShortOfKeySwitch ? [0] : [1]
        for (form, located) in forms.enumerated() {
            let (primary, backup) = await index.readBoth(located)
            var found: [PrincipalIndexEntry] = []
            switch PrincipalIndex.newest(primary, backup) {
            case .noAnswer:
                try await fail("neither node of the principal index answered")
            case .none:
                if case .unreachable = primary {
                    try await fail("the principal index's primary node did not answer and its backup has no copy")
                }
                if case .unreachable = backup {
                    try await fail("the principal index's backup node did not answer and its primary has no copy")
                }
            case .found(let contents, _, _):
                found = contents.entries
                anyCopy = true
            }
            indexed.append(Set(found.map(\.digest)))
            for entry in found {
                let names = unkeyedForms.contains(form) ? bothForms(entry) : [entry]
                let fresh = names.filter { !named.contains($0.digest) }
                if fresh.count == names.count { count += 1 }
                entries += fresh
                named.formUnion(names.map(\.digest))
            }
        }
        // No copy in either form: an index its nodes evicted would end nothing, silently.
        if !anyCopy, await mayHaveEvicted(Array(Set(forms.flatMap { [$0.primaryNode, $0.backupNode].compactMap { $0 } }))) {
            try await fail("no copy of the principal index, and its nodes have evicted items: it may have been dropped")
        }
        for entry in local where !named.contains(entry.digest) {
            entries.append(entry)
            named.insert(entry.digest)
            count += 1
        }
        await end(entries)
        statistics.count(.sessionsRevoked, count)
        // The route each entry named when it was read (the instance its notice went to).
        var notified: [String: String] = [:]
        for entry in entries { notified[entry.digest] = entry.route }
        for (form, (located, digests)) in zip(forms, indexed).enumerated() where !digests.isEmpty {
            do {
                // An entry whose route changed meanwhile (a sticky takeover of the session that
                // read its copy before the tombstones) names the instance that holds it now: it is
                // told too (the "dropped" of this rewrite).
                let outcome = try await index.update(located) { current in
                    (
                        current.filter { !digests.contains($0.digest) },
                        current.filter { digests.contains($0.digest) && $0.route != nil && $0.route != notified[$0.digest] }
                    )
                }
                if case .written(let changed) = outcome, !changed.isEmpty {
                    let moved = unkeyedForms.contains(form) ? changed.flatMap(bothForms) : changed
                    // A session this instance took over itself: its scan above usually holds it,
                    // but not when the takeover adopted it after the scan.
                    endLocally(Set(moved.filter { $0.route == configuration.route }.map(\.digest)))
                    await withDiscardingTaskGroup { group in
                        for entry in moved {
                            guard let route = entry.route, route != configuration.route else { continue }
                            group.addTask {
                                let keys = SessionKeys(digest: entry.digest, prefix: self.configuration.keyPrefix)
                                _ = await self.sticky.endTakenOver(keys, from: route, version: .max)
                            }
                        }
                    }
                }
            } catch {
                // Every session read was ended; the index could not be emptied (ending them
                // again later is harmless), so the count is right but the caller must know.
                throw PrincipalIndex.unavailable("sessions ended, but the principal index could not be rewritten: \(error.message)", ended: count)
            }
        }
        logger.notice("every session of a principal was ended", metadata: ["sessions": "\(count)"])
        return count
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

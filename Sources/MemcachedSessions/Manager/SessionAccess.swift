import Memcached
import NIOCore
import Synchronization

/// A request's access to its session, handed to handlers by the framework adapters.
///
/// Nothing is read from memcached until the handler first asks for the session; a request that
/// never asks still counts as an access (its session's TTL slides, without a round trip the
/// request waits for).
///
/// ```swift
/// let session = try await access.loadOrCreate()
/// let count = (session["count", as: Int.self] ?? 0) + 1
/// try session.set("count", count)
/// ```
public final class SessionAccess: Sendable {
    let manager: SessionManager
    /// The id the request's cookie carried, if it is a well-formed session id.
    public let requestedID: SessionID?
    /// The request path (what the ignore and locking patterns match).
    public let path: String
    /// Whether the request matched the ignore pattern: it has no session and cannot create one.
    public let isIgnored: Bool
    /// Whether opening the session takes its lock.
    let locks: Bool

    struct State: Sendable {
        enum Phase: Sendable {
            case idle
            case loading
            case loaded
        }

        var phase: Phase = .idle
        var waiters: [CheckedContinuation<Void, Never>] = []
        var session: Session?
        var loadError: SessionError?
        var lock: HeldLock?
        /// Non-sticky: the bytes as loaded (to repair a missing backup) and their node.
        var loadedRaw: ByteBuffer?
        /// The session must be written in full at its (new) place: recovered from a backup or
        /// relocated after a node failure.
        var mustWriteAll = false
        /// The id the session had before ``SessionAccess/regenerateID()``: its copies are deleted.
        var regenerate = false
        /// Non-sticky: the draining node the session was read from (its copy there goes once the
        /// session is written at its new place).
        var movedFrom: String?
        /// Sticky: when memcached last saw this session (for TTL slides).
        var lastStoreRefresh: NIODeadline?
        /// What the load in progress found besides the session; adopted when the load completes,
        /// unless the request ended (or created a new session) meanwhile, in which case its lock is
        /// released.
        var loaded = LoadExtras()
        /// The stored copy is known to be gone (deleted meanwhile): clear the cookie.
        var gone = false
        var ended = false
        /// The session was created by this request (its id never reached the browser).
        var createdHere = false
        /// The request logged out a session that was not found: its id is ended all the same.
        var endMissing = false
    }

    struct LoadExtras: Sendable {
        var lock: HeldLock?
        var raw: ByteBuffer?
        var mustWriteAll = false
        var lastStoreRefresh: NIODeadline?
        var movedFrom: String?
    }

    let state = Mutex(State())

    /// When the request began (the manager's clock).
    let started: NIODeadline

    init(manager: SessionManager, incomingID: SessionID?, path: String, ignored: Bool, locks: Bool) {
        self.manager = manager
        self.started = manager.clock.now()
        self.requestedID = incomingID
        self.path = path
        self.isIgnored = ignored
        self.locks = locks
    }

    /// The request's session, loaded on the first call; nil when the request has none (no cookie,
    /// an unknown or expired id, or a session that was invalidated).
    /// - Throws: ``SessionError/Code/unavailable`` when the nodes that could hold it do not answer
    ///   and the unavailable policy is `fail`; ``SessionError/Code/lockUnavailable`` when the lock
    ///   could not be had and the lock policy is `fail`.
    public func load() async throws(SessionError) -> Session? {
        while true {
            enum Step {
                case done(Session?, SessionError?)
                case wait
                case load
            }
            let step: Step = state.withLock { state in
                switch state.phase {
                case .loaded: return .done(state.session, state.loadError)
                case .loading: return .wait
                case .idle:
                    state.phase = .loading
                    return .load
                }
            }
            switch step {
            case .done(let session, let error):
                if let error { throw error }
                if let session, session.isInvalidated { return nil }
                return session
            case .wait:
                await withCheckedContinuation { continuation in
                    let resumeNow = state.withLock { state -> Bool in
                        if state.phase == .loading {
                            state.waiters.append(continuation)
                            return false
                        }
                        return true
                    }
                    if resumeNow { continuation.resume() }
                }
            case .load:
                let result: Result<Session?, SessionError>
                if isIgnored || requestedID == nil || state.withLock({ $0.ended }) {
                    result = .success(nil)
                } else {
                    do {
                        result = .success(try await manager.load(for: self))
                    } catch {
                        result = .failure(error)
                    }
                }
                let (waiters, orphan) = state.withLock { state -> ([CheckedContinuation<Void, Never>], HeldLock?) in
                    var orphan: HeldLock? = nil
                    if state.phase == .loading, !state.ended {
                        state.phase = .loaded
                        switch result {
                        case .success(let session): state.session = session
                        case .failure(let error): state.loadError = error
                        }
                        state.lock = state.loaded.lock
                        state.loadedRaw = state.loaded.raw
                        state.mustWriteAll = state.loaded.mustWriteAll
                        state.lastStoreRefresh = state.loaded.lastStoreRefresh
                        state.movedFrom = state.loaded.movedFrom
                    } else {
                        // The request ended, or created a new session, while this load ran: what
                        // it found is not used, and its lock must not outlive the request.
                        if state.phase == .loading { state.phase = .loaded }
                        orphan = state.loaded.lock
                    }
                    state.loaded = LoadExtras()
                    defer { state.waiters = [] }
                    return (state.waiters, orphan)
                }
                for waiter in waiters { waiter.resume() }
                if let orphan { await manager.release(orphan) }
            }
        }
    }

    /// The request's session, or a new one if it has none.
    public func loadOrCreate() async throws(SessionError) -> Session {
        if let session = try await load() { return session }
        return try create()
    }

    /// Starts a new session for this request (replacing, and invalidating, any it had). The cookie
    /// is sent at the end of the request.
    @discardableResult
    public func create() throws(SessionError) -> Session {
        guard !isIgnored else {
            throw SessionError(code: .disabled, message: "the request matches the ignore pattern: it cannot have a session")
        }
        let now = manager.currentTimeMillis()
        let id = manager.generateID(nodeID: manager.placementNode(), route: manager.configuration.route)
        let session = manager.makeSession(id: id, record: manager.newSessionRecord(now: now), casUnique: nil, isNew: true)
        let previous = state.withLock { state -> Session? in
            let previous = state.session
            state.session = session
            state.phase = .loaded
            state.loadError = nil
            state.mustWriteAll = false
            state.regenerate = false
            state.createdHere = true
            return previous
        }
        manager.statistics.count(.sessionsCreated)
        if let previous, previous !== session, !previous.isNew {
            manager.retire(previous, access: self)
        }
        return session
    }

    /// Gives the session a new id (do it after a login, against session fixation): the data moves
    /// to the new id and the old copies are deleted at the end of the request.
    ///
    /// Only a session this request created is left alone (its id has not reached the browser
    /// yet): a session made by an earlier request gets a new id even when it is not in memcached
    /// yet (a sticky instance's asynchronous save may still be queued).
    public func regenerateID() async throws(SessionError) {
        guard try await load() != nil else { return }
        state.withLock { state in
            if !state.createdHere { state.regenerate = true }
        }
    }

    /// Ends the request's session: every copy is removed at the end of the request, and the cookie
    /// is cleared.
    ///
    /// A logout whose session is not found (evicted, or on a node that restarted) still ends its
    /// id: tombstones go where its copies could be, so that no backup brings it back later.
    public func invalidate() async throws(SessionError) {
        guard let session = try await load() else {
            if requestedID != nil, !isIgnored { state.withLock { $0.endMissing = true } }
            return
        }
        session.invalidate()
    }

    /// Whether this request may wait for memcached round trips (a load, a synchronous save, a
    /// lock). Adapters move a request to its channel's event loop only when it may: a sticky
    /// request served from memory with asynchronous saving never waits, and the move would be two
    /// thread hops for nothing.
    public var mayWaitForMemcached: Bool {
        !isIgnored && manager.mayWaitForMemcached(requestedID)
    }

    /// The session if it was loaded or created by this request (no I/O).
    public var current: Session? {
        state.withLock { $0.phase == .loaded ? $0.session : nil }
    }

    func end() async throws(SessionError) -> SessionResponseAction {
        let alreadyEnded = state.withLock { state -> Bool in
            defer { state.ended = true }
            return state.ended
        }
        guard !alreadyEnded, !isIgnored else { return .unchanged }
        let (endMissing, session) = state.withLock { ($0.endMissing, $0.session) }
        if endMissing, session == nil, let id = requestedID, manager.isEnabled, manager.topology.contains(id.nodeID) {
            // A logout of a session that was not found: its id ends all the same.
            // Its own idle timeout is not known: the default's horizon (a longer one's copies
            // were not found either).
            await manager.deleteCopies(keys: manager.keys(for: id.token), nodeID: id.nodeID, lock: nil, wait: true, sessionIdle: nil)
            return SessionResponseAction(cookie: .clear)
        }
        if manager.usesLocalLifecycle {
            return try await manager.endSticky(self)
        }
        return try await manager.endNonSticky(self)
    }
}

extension SessionManager {
    func mayWaitForMemcached(_ id: SessionID?) -> Bool {
        guard isEnabled else { return false }
        if configuration.mode == .nonSticky || !configuration.sticky.asynchronousSaving { return true }
        guard let id else { return false }  // a new sticky session is saved by the writer
        if configuration.route != nil, id.route != configuration.route { return true }  // takeover: a load
        return !localStore.holdsFresh(id.token, within: stickyTouchInterval, now: clock.now())
    }

    /// Whether sessions live in this instance's memory (sticky, or memcached disabled).
    var usesLocalLifecycle: Bool {
        configuration.mode == .sticky || !isEnabled
    }

    func load(for access: SessionAccess) async throws(SessionError) -> Session? {
        let start = NIODeadline.now()
        defer { statistics.time(.load, since: start) }
        if usesLocalLifecycle {
            return try await loadSticky(access)
        }
        return try await loadNonSticky(access)
    }

    /// A node for a new session.
    func placementNode() -> String {
        topology.placeNew()
    }

    /// A session replaced by ``SessionAccess/create()``: its stored copies go.
    func retire(_ session: Session, access: SessionAccess) {
        session.invalidate()
        let id = session.id
        let keys = self.keys(for: id.token)
        let idle = session.metadata.idleTimeoutSeconds
        if usesLocalLifecycle { localStore.remove(id.token) }
        guard isEnabled else { return }
        let lock = access.state.withLock { state -> HeldLock? in
            defer { state.lock = nil }
            return state.lock
        }
        Task {
            await self.deleteCopies(keys: keys, nodeID: id.nodeID, lock: lock, wait: false, sessionIdle: idle)
        }
    }

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
    /// `sessionIdle` is the session's own idle timeout when it is known: its tombstones outlive
    /// its copies (``CopyLifetimes/tombstoneSeconds(defaultIdle:sessionIdle:)``).
    func deleteCopies(keys: SessionKeys, nodeID: String, lock: HeldLock?, wait: Bool, sessionIdle: Int64?) async {
        if let lock { heldLocks.remove(lock) }
        backupMemo.forget(keys.backup)
        let ttl = tombstoneTTL(sessionIdle: sessionIdle)
        let seconds = Int(ttl.wireValue(now: 0))
        func tombstone(_ key: String, quiet: Bool) -> MemcachedRequest {
            var request = MemcachedRequest.store(key, value: ByteBuffer(), ttl: ttl, flags: Self.tombstoneFlags, quiet: quiet)
            if key == keys.backup { request.connectionAffinity = Self.affinity(of: keys.backup) }
            request.honorsCancellation = false
            return prepared(request)
        }
        // The session's own node first, with the lock release: a concurrent write that has not
        // landed yet then finds the tombstone and writes no backup.
        if let node = topology.node(nodeID) {
            var batch = [tombstone(keys.primary, quiet: false)]
            if !usesLocalLifecycle { batch.append(tombstone(keys.backup, quiet: false)) }
            if let lock { batch.append(prepared(await lockReleaseRequest(lock))) }
            let requests = batch
            let backups = !usesLocalLifecycle
            let primaryTombstone = requests[0]
            let home = { @Sendable () async in
                let results = await node.executeBatch(requests)
                if let lock { self.releaseAnswered(results[requests.count - 1], lock: lock, node: node) }
                if case .failure(let error) = results[0] {
                    // Once more while the node is marked up (a lost reply, a dropped command).
                    var ended = false
                    if error.leavesOutcomeUnknown, self.topology.isReachable(nodeID),
                        case .success = await node.executeBatch([primaryTombstone])[0]
                    {
                        ended = true
                    }
                    if !ended { self.leaveForLater(.tombstone(ttlSeconds: seconds), key: keys.primary, on: nodeID) }
                }
                if backups, case .failure = results[1] {
                    self.leaveForLater(.tombstone(ttlSeconds: seconds), key: keys.backup, on: nodeID)
                }
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
        let keysThere = usesLocalLifecycle ? [keys.primary] : [keys.primary, keys.backup]
        var reachable: [(String, any MemcachedNodeCommandRunner)] = []
        for candidate in topology.order where candidate != nodeID {
            guard let other = topology.node(candidate) else { continue }
            guard other.isAvailable else {
                for key in keysThere { leaveForLater(.tombstone(ttlSeconds: seconds), key: key, on: candidate) }
                continue
            }
            reachable.append((candidate, other))
        }
        guard wait else {
            for (candidate, other) in reachable {
                for key in keysThere {
                    await other.submit(tombstone(key, quiet: true)) { result in
                        if case .failure = result { self.leaveForLater(.tombstone(ttlSeconds: seconds), key: key, on: candidate) }
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
                        if case .failure = result { self.leaveForLater(.tombstone(ttlSeconds: seconds), key: key, on: candidate) }
                    }
                }
            }
        }
    }
}

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
    let context: SessionContext
    /// The mode's lifecycle (the sticky one, in memory only, while memcached is switched off).
    let lifecycle: any SessionLifecycle
    let principals: Principals
    /// The id the request's cookie carried, if it is a well-formed session id.
    public let requestedID: MemcachedSessionID?
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
        var session: MemcachedSession?
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
        /// Non-sticky: the backup copy a recovery adopted (the session was served from it).
        var adoptedBackup: AdoptedBackup?
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
        /// ``SessionAccess/create()`` replaced a session of an earlier request (loaded, or made
        /// by an earlier request and not saved yet): it was ended.
        var replacedStored = false
        /// The endings of the sessions ``SessionAccess/create()`` replaced: the request's end
        /// waits for them.
        var retiring: [Task<Void, Never>] = []
        /// The request logged out a session that was not found: its id is ended all the same.
        var endMissing = false
    }

    struct LoadExtras: Sendable {
        var lock: HeldLock?
        var raw: ByteBuffer?
        var mustWriteAll = false
        var lastStoreRefresh: NIODeadline?
        var movedFrom: String?
        var adoptedBackup: AdoptedBackup?
    }

    /// A backup copy a non-sticky recovery served the session from: its node, and the record as
    /// read. The request's end reads that copy again after its own write (a concurrent request
    /// may have written a newer version on the old node meanwhile, whose backup landed there).
    struct AdoptedBackup: Sendable {
        var nodeID: String
        var record: SessionRecord
        /// The node the session moved off (its old copy's cleanup waits there).
        var movedOff: String
    }

    let state = Mutex(State())

    /// When the request began (the manager's clock).
    let started: NIODeadline

    init(
        context: SessionContext, lifecycle: any SessionLifecycle, principals: Principals, incomingID: MemcachedSessionID?, path: String,
        ignored: Bool, locks: Bool
    ) {
        self.context = context
        self.lifecycle = lifecycle
        self.principals = principals
        self.started = context.clock.now()
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
    public func load() async throws(SessionError) -> MemcachedSession? {
        while true {
            enum Step {
                case done(MemcachedSession?, SessionError?)
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
                let result: Result<MemcachedSession?, SessionError>
                if isIgnored || requestedID == nil || state.withLock({ $0.ended }) {
                    result = .success(nil)
                } else {
                    let start = NIODeadline.now()
                    result = await context.traced("session.load") { () async -> Result<MemcachedSession?, SessionError> in
                        do throws(SessionError) {
                            return .success(try await lifecycle.load(self))
                        } catch {
                            return .failure(error)
                        }
                    } describe: { session, attributes in
                        attributes["msm.session.found"] = session != nil
                    }
                    context.statistics.time(.load, since: start)
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
                        state.adoptedBackup = state.loaded.adoptedBackup
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
                if let orphan { await lifecycle.store.locks.release(orphan) }
            }
        }
    }

    /// The request's session, or a new one if it has none.
    public func loadOrCreate() async throws(SessionError) -> MemcachedSession {
        if let session = try await load() { return session }
        return try create()
    }

    /// Starts a new session for this request (replacing, and invalidating, any it had). The cookie
    /// is sent at the end of the request.
    @discardableResult
    public func create() throws(SessionError) -> MemcachedSession {
        guard !isIgnored else {
            throw SessionError(code: .disabled, message: "the request matches the ignore pattern: it cannot have a session")
        }
        let now = context.currentTimeMillis()
        let id = context.generateID(nodeID: context.placementNode(), route: context.configuration.route)
        let session = context.makeSession(id: id, record: context.newSessionRecord(now: now), casUnique: nil, isNew: true)
        let (previous, previousCreatedHere) = state.withLock { state -> (MemcachedSession?, Bool) in
            let previous = (state.session, state.createdHere)
            state.session = session
            state.phase = .loaded
            state.loadError = nil
            state.mustWriteAll = false
            state.regenerate = false
            state.createdHere = true
            return previous
        }
        context.statistics.count(.sessionsCreated)
        // Replaced: a session of an earlier request (loaded, or a sticky one whose first save is
        // still queued) or one of this request's that may be stored already. Invalidated (a
        // queued save of it is dropped), its stored copies go with the lock it was loaded under.
        if let previous, previous !== session, !previousCreatedHere || previous.mayBeStored {
            previous.invalidate()
            let lock = state.withLock { state -> HeldLock? in
                defer { state.lock = nil }
                return state.lock
            }
            let retiring = lifecycle.retire(previous, lock: lock)
            state.withLock { state in
                state.retiring.append(retiring)
                if !previousCreatedHere { state.replacedStored = true }
            }
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
        !isIgnored && lifecycle.mayWaitForMemcached(requestedID)
    }

    /// The session if it was loaded or created by this request (no I/O).
    public var current: MemcachedSession? {
        state.withLock { $0.phase == .loaded ? $0.session : nil }
    }

    func end() async throws(SessionError) -> SessionResponseAction {
        struct Ending {
            var endMissing: Bool
            var session: MemcachedSession?
            var loaded: Bool
            var createdHere: Bool
            var replacedStored: Bool
            var lock: HeldLock?
            var retiring: [Task<Void, Never>]
        }
        // One read of the request's state for every decision below.
        let ending = state.withLock { state -> Ending? in
            guard !state.ended else { return nil }
            state.ended = true
            return Ending(
                endMissing: state.endMissing, session: state.session, loaded: state.phase == .loaded, createdHere: state.createdHere,
                replacedStored: state.replacedStored, lock: state.lock, retiring: state.retiring)
        }
        guard let ending, !isIgnored else { return .unchanged }
        if ending.endMissing, ending.session == nil, let id = requestedID, context.isEnabled, context.topology.contains(id.nodeID) {
            // A logout of a session that was not found: its id ends all the same.
            await lifecycle.endUnfound(id)
            return SessionResponseAction(cookie: .clear)
        }
        let action: Result<SessionResponseAction, SessionError>
        if ending.loaded, ending.createdHere, let session = ending.session, !session.isInvalidated, session.isEmptyNew {
            // Created here and nothing put in it: not kept, not written, no cookie (the cookie of
            // a session it replaced is cleared: that session ended). Either mode.
            if let lock = ending.lock { await lifecycle.store.locks.release(lock) }
            context.statistics.count(.writesSkipped)
            action = .success(ending.replacedStored ? SessionResponseAction(cookie: .clear) : .unchanged)
        } else {
            do {
                let ended = try await lifecycle.end(self)
                // The principal index learns a login, a new id or a logout, after the write.
                if ending.loaded, let session = ending.session { try await principals.requestEnded(session, lifecycle: lifecycle) }
                action = .success(ended)
            } catch {
                action = .failure(error)
            }
        }
        // The sessions create() replaced are dead before the response (as a regenerated id's).
        for task in ending.retiring { await task.value }
        return try action.get()
    }
}

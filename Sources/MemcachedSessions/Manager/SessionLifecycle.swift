/// How a mode serves sessions: where a request's session comes from, what happens to it at the
/// end of the request, and the background work that goes with it. One is chosen when the manager
/// is made, by ``SessionManager/Configuration/mode``: ``NonStickyLifecycle`` (memcached is
/// authoritative) or ``StickyLifecycle`` (this instance's memory is, memcached holds a copy);
/// the sticky one also serves every mode's sessions from memory while memcached is switched off
/// at run time (``SessionManager/Configuration/enabled``).
protocol SessionLifecycle: SessionManagerPart, AnyObject {
    /// Where the sessions' copies are kept in memcached.
    var store: SessionStore { get }

    /// The request's session (its cookie named one), or nil when there is none.
    func load(_ access: SessionAccess) async throws(SessionError) -> MemcachedSession?

    /// Saves what changed, slides TTLs, releases the lock; says which cookie the response carries.
    func end(_ access: SessionAccess) async throws(SessionError) -> SessionResponseAction

    /// Whether a request with this session id may wait for memcached round trips.
    func mayWaitForMemcached(_ id: MemcachedSessionID?) -> Bool

    /// A session replaced by a new one in its request (``SessionAccess/create()``): its copies go.
    /// The task ends when they are gone; the request's end waits for it, so that the response
    /// never reaches the browser while the replaced id still works.
    func retire(_ session: MemcachedSession, lock: HeldLock?) -> Task<Void, Never>

    /// A logout of a session that was not found (`invalidate()` without a session): its id ends
    /// all the same, on every node, before the response.
    func endUnfound(_ id: MemcachedSessionID) async

    /// The lifecycle's background work, until cancelled (graceful shutdown); it returns once what
    /// must not be lost (queued writes) is flushed.
    func run() async
}

extension SessionLifecycle {
    func endUnfound(_ id: MemcachedSessionID) async {
        // Its own idle timeout is not known: the default's horizon (a longer one's copies were not
        // found either).
        await store.deleteCopies(keys: context.keys(for: id.token), nodeID: id.nodeID, lock: nil, wait: true, sessionIdle: nil)
    }
}

/// A request's session, as handlers see it through a framework adapter: loaded on first use,
/// created on demand. Adapters hand one to every request they manage.
///
/// ```swift
/// let session = try await sessions.loadOrCreate()
/// let count = (session["count", as: Int.self] ?? 0) + 1
/// try session.set("count", count)
/// ```
public struct RequestSessions: Sendable {
    /// The manager's per-request access; nil outside the adapter's session middleware.
    public let access: SessionAccess?

    /// No session machinery (what a context holds before the middleware runs).
    public init() { self.access = nil }

    public init(access: SessionAccess) { self.access = access }

    private func required() throws(SessionError) -> SessionAccess {
        guard let access else {
            throw SessionError(code: .disabled, message: "no session for this route: add the memcached session middleware before it")
        }
        return access
    }

    /// The request's session, or nil when it has none. Throws `unavailable` (→ 503) when the
    /// session's nodes do not answer and the policy is to fail.
    public func load() async throws(SessionError) -> MemcachedSession? {
        try await required().load()
    }

    /// The request's session, created if it has none.
    public func loadOrCreate() async throws(SessionError) -> MemcachedSession {
        try await required().loadOrCreate()
    }

    /// A new session for this request (replacing, and invalidating, any it had).
    @discardableResult
    public func create() throws(SessionError) -> MemcachedSession {
        try required().create()
    }

    /// Ends the session: every copy is deleted and the cookie cleared.
    public func invalidate() async throws(SessionError) {
        try await required().invalidate()
    }

    /// A new id for the session (after a login).
    public func regenerateID() async throws(SessionError) {
        try await required().regenerateID()
    }

    /// The well-formed session id the request's cookie carried, if any.
    public var requestedID: MemcachedSessionID? { access?.requestedID }
}

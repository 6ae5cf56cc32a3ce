extension SessionManager {
    /// Where the framework adapters answer a load balancer's health check by default
    /// (`GET /_msm/health`: 200 when ``canServeSessions``, else 503; no details, no
    /// authentication, no session touched).
    public static let defaultHealthPath = "/_msm/health"

    /// Whether a request's session can be served now: for a load balancer's health check.
    ///
    /// - memcached not used (``isEnabled`` false): always (sessions live in memory).
    /// - non-sticky: some node may take sessions (up and not draining).
    /// - sticky: some node may take sessions, or this instance's memory can take a new one
    ///   (sessions live there while no node answers). Memory is full when it holds
    ///   ``Configuration/localSessionLimit`` sessions with changes no node has taken: written
    ///   ones make room. It is kept in 16 shards, and a new session goes to one of them by its
    ///   id, so close to the bound some new sessions are refused (503) while this still says yes;
    ///   it says no once none would fit.
    public var canServeSessions: Bool {
        guard isEnabled else { return true }
        let topology = self.topology
        if topology.order.contains(where: { topology.isAvailable($0) }) { return true }
        return lifecycle === sticky && sticky.localStore.acceptsNewSessions
    }

    /// The health check's answer, for the framework adapters: 200 `ok` when
    /// ``canServeSessions``, 503 `unavailable` when not; nothing else (no node names, no
    /// counts), never cached.
    public var healthAnswer: HealthAnswer {
        canServeSessions ? HealthAnswer(status: 200, body: "ok\n") : HealthAnswer(status: 503, body: "unavailable\n")
    }

    /// What a health check answers (``healthAnswer``), whatever the framework.
    public struct HealthAnswer: Sendable, Hashable {
        public var status: Int
        public var body: String
        /// The headers of every answer, besides the body's length.
        public static let headers: [(name: String, value: String)] = [
            ("Cache-Control", "no-store"), ("Content-Type", "text/plain"),
        ]
    }
}

extension SessionManager {
    /// Where the framework adapters answer a load balancer's health check by default
    /// (`GET /_msm/health`: 200 when ``canServeSessions``, else 503; no details, no
    /// authentication, no session touched).
    public static let defaultHealthPath = "/_msm/health"

    /// Whether a request's session can be served now: for a load balancer's health check.
    ///
    /// - memcached not used (``isEnabled`` false): always (sessions live in memory).
    /// - non-sticky: some node may take sessions (up and not draining).
    /// - sticky: some node may take sessions, or this instance's memory has room for more
    ///   (sessions live there while no node answers; at the bound new ones are refused).
    public var canServeSessions: Bool {
        guard isEnabled else { return true }
        let topology = self.topology
        if topology.order.contains(where: { topology.isAvailable($0) }) { return true }
        return usesLocalLifecycle && localStore.count < configuration.localSessionLimit
    }
}

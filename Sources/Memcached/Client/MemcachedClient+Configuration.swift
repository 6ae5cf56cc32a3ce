import CoreMetrics

extension MemcachedClient {
    /// How keys without an explicit node are spread over the nodes.
    public struct KeyDistribution: Sendable, Hashable {
        fileprivate enum Base: Hashable, Sendable { case ketama, ketamaSkippingUnavailable }
        fileprivate let base: Base

        /// libmemcached-compatible ketama; a key whose node is down fails fast with
        /// ``MemcachedError/Code/nodeUnavailable`` (the key does not silently move).
        public static let ketama = KeyDistribution(base: .ketama)
        /// Ketama, but a key whose node is down goes to the next available node on the ring
        /// (libmemcached's "remove failed servers"): a cache keeps working, at the price of misses.
        public static let ketamaSkippingUnavailable = KeyDistribution(base: .ketamaSkippingUnavailable)

        var skipsUnavailable: Bool { base == .ketamaSkippingUnavailable }
    }

    /// The client's settings, with defaults fit for a local network.
    public struct Configuration: Sendable {
        /// The nodes, in order. Ids must be unique.
        public var nodes: [MemcachedNodeAddress]
        /// Meta protocol (default) or the classic text protocol.
        public var protocolMode: MemcachedProtocolMode = .meta
        /// How keys are checked and put on the wire.
        public var keyEncoding: MemcachedKeyEncoding = .plain
        /// How keys are spread over the nodes.
        public var keyDistribution: KeyDistribution = .ketama
        /// Pipelined connections per node (each carries many requests at once), opened on demand
        /// and spread over the event loop group's loops. A request made on an event loop goes over
        /// that loop's first connection to the node, one with a ``MemcachedRequest/connectionAffinity``
        /// over the first connection of the loop its affinity picks, any other in turn. So a client
        /// whose requests all come from its event loops uses one connection a node per loop, and the
        /// requests of one loop tick leave in one write.
        public var connectionsPerNode: Int = 2
        /// How long a connection attempt may take.
        public var connectTimeout: Duration = .seconds(1)
        /// How long a request may wait for its reply, unless the request sets its own timeout.
        public var requestTimeout: Duration = .seconds(1)
        /// The largest item the server stores (memcached's `-I`, 1 MiB by default). Larger values are
        /// refused before anything is sent.
        public var itemSizeLimit: Int = 1024 * 1024
        /// Consecutive failures (timeouts, closed or refused connections) after which a node is
        /// marked down and requests to it fail fast.
        public var failureThreshold: Int = 3
        /// How often a node marked down is probed.
        public var probeInterval: Duration = .milliseconds(500)
        /// Delay before reconnecting after a failed connection attempt: doubles from `minimum` up to
        /// `maximum`; during it requests to that connection fail fast.
        public var reconnectBackoff: (minimum: Duration, maximum: Duration) = (.milliseconds(50), .seconds(2))
        /// How long a request marked ``MemcachedRequest/coalesces`` may wait for others to share its
        /// write (one `write` system call, one read on the server, for many of them).
        public var coalescingWindow: Duration = .milliseconds(1)
        /// Where per-node metrics go; `nil` uses the process-wide `MetricsSystem` (bootstrap it before
        /// creating the client).
        public var metricsFactory: (any MetricsFactory)? = nil
        /// Spans for round trips (off by default: no tracer).
        public var tracing = MemcachedTracingConfiguration()
        /// TLS to every node (off by default; see ``TLS``).
        public var tls: TLS = .disable
        /// Credentials sent first on every connection (memcached's `-Y`; off by default).
        public var authentication: Authentication? = nil

        public init(nodes: [MemcachedNodeAddress]) {
            self.nodes = nodes
        }

        /// Parses a node list such as `n1:127.0.0.1:11211 n2:127.0.0.1:11212` (spaces or commas).
        public init(nodes: String) throws(MemcachedError) {
            self.init(nodes: try MemcachedNodeAddress.parseList(nodes))
        }

        /// Checks every setting; the error says which and why.
        public func validate() throws(MemcachedError) {
            func invalid(_ message: String) -> MemcachedError {
                MemcachedError(code: .invalidConfiguration, message: message)
            }
            if nodes.isEmpty { throw invalid("no memcached nodes configured") }
            try authentication?.validate()
            var ids = Set<String>()
            for node in nodes where !ids.insert(node.id).inserted {
                throw invalid("node id '\(node.id)' appears twice")
            }
            if connectionsPerNode < 1 { throw invalid("connectionsPerNode must be at least 1") }
            if requestTimeout <= .zero { throw invalid("requestTimeout must be positive") }
            if connectTimeout <= .zero { throw invalid("connectTimeout must be positive") }
            if itemSizeLimit < 1024 { throw invalid("itemSizeLimit must be at least 1024 bytes") }
            if failureThreshold < 1 { throw invalid("failureThreshold must be at least 1") }
            if probeInterval <= .zero { throw invalid("probeInterval must be positive") }
            if coalescingWindow < .zero || coalescingWindow > .seconds(1) {
                throw invalid("coalescingWindow must be between 0 and 1 second")
            }
            if reconnectBackoff.minimum <= .zero || reconnectBackoff.maximum < reconnectBackoff.minimum {
                throw invalid("reconnectBackoff needs 0 < minimum <= maximum")
            }
        }
    }
}

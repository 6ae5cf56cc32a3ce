import Logging
import Memcached
import NIOCore
import Synchronization

/// What can change while the manager runs.
struct RuntimeState: Sendable {
    var topology: NodeTopology
    var locking: SessionManager.LockingMode
    var lockPattern: PathPattern?
    var enabled: Bool
    /// The configured nodes (draining ones are not listed here, but stay in the topology).
    var nodes: [MemcachedNodeAddress]
    var failoverNodes: [String]
    /// Removed nodes still read until their deadline, with their addresses.
    var draining: [String: (address: MemcachedNodeAddress, until: NIODeadline)] = [:]
}

/// The memcached clients the manager runs: the current one, and those retiring after a node
/// change (kept until requests in flight on them are done).
struct ClientTasks: Sendable {
    var running: [ObjectIdentifier: Task<Void, any Error>] = [:]
    var started = false
}

extension SessionManager {
    /// A change of the manager's run-time settings (MSM's JMX operations); nil fields are left as
    /// they are. Also the JSON body of `PUT /_msm/config`.
    public struct RuntimeChange: Sendable, Codable, Hashable {
        /// The node list (`n1:host:port n2:host:port`, spaces or commas). Removed nodes drain: their
        /// sessions move to other nodes at their next request; added nodes take new sessions.
        public var nodes: String?
        /// Failover node ids (among the nodes).
        public var failoverNodes: [String]?
        /// `none`, `all`, `auto` or `uriPattern:<regex>` (non-sticky only).
        public var locking: String?
        /// Whether memcached is used.
        public var enabled: Bool?

        public init(nodes: String? = nil, failoverNodes: [String]? = nil, locking: String? = nil, enabled: Bool? = nil) {
            self.nodes = nodes
            self.failoverNodes = failoverNodes
            self.locking = locking
            self.enabled = enabled
        }
    }

    /// The run-time settings in force, as `GET /_msm/config` shows them.
    public struct RuntimeView: Sendable, Codable, Hashable {
        public var mode: String
        public var nodes: String
        public var failoverNodes: [String]
        public var drainingNodes: [String]
        public var locking: String
        public var enabled: Bool
    }

    /// The settings in force.
    public var runtimeView: RuntimeView {
        context.runtime.withLock { state in
            RuntimeView(
                mode: configuration.mode.rawValue, nodes: state.nodes.map(\.description).joined(separator: ","),
                failoverNodes: state.failoverNodes, drainingNodes: state.draining.keys.sorted(), locking: "\(state.locking)",
                enabled: state.enabled)
        }
    }

    /// How long a removed node is still read: long enough for every session on it to have had a
    /// request (and moved) or to have expired.
    var drainPeriod: TimeAmount {
        .seconds(context.copyHorizonSeconds)
    }

    /// Applies a change without a restart and without losing sessions: new node lists build a new
    /// client (the old one finishes its requests, then closes), removed nodes drain.
    /// - Throws: ``SessionError/Code/invalidConfiguration`` for an invalid change (nothing applied).
    ///
    /// Changes are serialized: concurrent calls (two `PUT /_msm/config` at once) apply one after
    /// the other, never interleaved (interleaved, one could drop the other's draining nodes). A
    /// node keeps its address for as long as it has its id: a moved node gets a new id (and the
    /// old id drains), because sessions name their node by id. A `uriPattern` is limited to a safe
    /// subset of regular expressions here (see `PathPattern.checkSafe(_:)`), since it may come
    /// over HTTP.
    @discardableResult
    public func reconfigure(_ change: RuntimeChange) async throws(SessionError) -> RuntimeView {
        let (view, newClient, oldClient) = try reconfiguration.withLock { _ throws(SessionError) in
            try applyReconfiguration(change)
        }
        if let newClient {
            startClientIfRunning(newClient)
            if let oldClient { retire(oldClient) }
        }
        events.record(
            .configuration,
            "configuration changed: nodes \(view.nodes), failover \(view.failoverNodes), locking \(view.locking), enabled \(view.enabled)"
                + (view.drainingNodes.isEmpty ? "" : ", draining \(view.drainingNodes)"))
        logger.notice(
            "session manager reconfigured",
            metadata: ["nodes": "\(view.nodes)", "locking": "\(view.locking)", "enabled": "\(view.enabled)"])
        return view
    }

    /// The body of ``reconfigure(_:)``, under the reconfiguration lock (it never suspends).
    private func applyReconfiguration(_ change: RuntimeChange) throws(SessionError) -> (RuntimeView, MemcachedClient?, MemcachedClient?) {
        // Everything is checked before anything changes.
        var newNodes: [MemcachedNodeAddress]? = nil
        if let list = change.nodes {
            var candidate = try Configuration(nodes: list)
            candidate.failoverNodes =
                change.failoverNodes
                ?? context.runtime.withLock { $0.failoverNodes }.filter { id in
                    candidate.memcached.nodes.contains { $0.id == id }
                }
            candidate.mode = configuration.mode
            try candidate.validate()
            guard ownsClient else {
                throw .configuration("this manager runs a client it was given: its nodes cannot change at run time")
            }
            let (current, draining) = context.runtime.withLock { ($0.nodes, $0.draining) }
            let known = current + draining.values.map(\.address)
            for node in candidate.memcached.nodes {
                if let old = known.first(where: { $0.id == node.id }), old.host != node.host || old.port != node.port {
                    throw .configuration(
                        "node '\(node.id)' is \(old.host):\(old.port); a node cannot change its address under the same id (sessions name their node by id): give the moved node a new id, and the old id drains"
                    )
                }
            }
            newNodes = candidate.memcached.nodes
        }
        var newLocking: LockingMode? = nil
        var newPattern: PathPattern? = nil
        if let text = change.locking {
            let locking = try LockingMode(parsing: text)
            if locking != .none, configuration.mode == .sticky {
                throw .configuration("locking applies to non-sticky mode only")
            }
            if case .uriPattern(let pattern) = locking {
                try PathPattern.checkSafe(pattern)
                newPattern = try PathPattern(pattern, setting: "locking uriPattern")
            }
            newLocking = locking
        }
        let nodeIDs = Set((newNodes ?? context.runtime.withLock { $0.nodes }).map(\.id))
        if let failover = change.failoverNodes {
            for id in failover where !nodeIDs.contains(id) {
                throw .configuration("failover node '\(id)' is not one of the nodes \(nodeIDs.sorted())")
            }
            if !failover.isEmpty, Set(failover) == nodeIDs {
                throw .configuration("every node is a failover node: at least one must be a primary")
            }
        }

        var newClient: MemcachedClient? = nil
        if let newNodes {
            // Removed nodes drain; a node added back stops draining.
            let (current, draining) = context.runtime.withLock { ($0.nodes, $0.draining) }
            var stillDraining = draining.filter { id, entry in !newNodes.contains { $0.id == id } && clock.now() < entry.until }
            for node in current where !newNodes.contains(where: { $0.id == node.id }) {
                stillDraining[node.id] = (node, clock.now() + drainPeriod)
            }
            var clientConfiguration = configuration.memcached
            clientConfiguration.nodes = newNodes + stillDraining.values.map(\.address).sorted { $0.id < $1.id }
            if clientConfiguration.metricsFactory == nil { clientConfiguration.metricsFactory = metricsFactory }
            if clientConfiguration.tracing.tracer == nil { clientConfiguration.tracing.tracer = configuration.tracing.tracer }
            do {
                newClient = try MemcachedClient(configuration: clientConfiguration, eventLoopGroup: eventLoopGroup, logger: logger)
            } catch {
                throw .configuration(error.message)
            }
            context.runtime.withLock { state in
                state.draining = stillDraining
            }
        }

        let (oldClient, view): (MemcachedClient?, RuntimeView) = context.runtime.withLock { state in
            var replaced: MemcachedClient? = nil
            if let locking = newLocking {
                state.locking = locking
                state.lockPattern = newPattern
            }
            if let enabled = change.enabled { state.enabled = enabled }
            if let newNodes { state.nodes = newNodes }
            if let failover = change.failoverNodes {
                state.failoverNodes = failover
            } else if newNodes != nil {
                state.failoverNodes = state.failoverNodes.filter { nodeIDs.contains($0) }
            }
            let nodes: any MemcachedNodeSet = newClient ?? state.topology.nodeSet
            if newClient != nil { replaced = state.topology.client }
            state.topology = NodeTopology(
                nodes: nodes, failoverNodes: state.failoverNodes, draining: state.draining.mapValues(\.until), clock: clock)
            return (
                replaced,
                RuntimeView(
                    mode: configuration.mode.rawValue, nodes: state.nodes.map(\.description).joined(separator: ","),
                    failoverNodes: state.failoverNodes, drainingNodes: state.draining.keys.sorted(), locking: "\(state.locking)",
                    enabled: state.enabled)
            )
        }
        return (view, newClient, oldClient)
    }

    // MARK: - clients

    /// Runs a client in a detached task (see ``run()``) and remembers it.
    func startClient(_ client: MemcachedClient) {
        clientTasks.withLock { tasks in
            tasks.started = true
            guard tasks.running[ObjectIdentifier(client)] == nil else { return }
            tasks.running[ObjectIdentifier(client)] = Task.detached { try await client.run() }
        }
    }

    private func startClientIfRunning(_ client: MemcachedClient) {
        let started = clientTasks.withLock { $0.started }
        if started { startClient(client) }
    }

    /// Stops a replaced client once the requests it may still carry are over.
    private func retire(_ client: MemcachedClient) {
        let grace = configuration.memcached.requestTimeout * 2 + configuration.locking.waitBudget + .seconds(1)
        Task.detached { [weak self] in
            try? await Task.sleep(for: grace)
            guard let self else { return }
            let task = self.clientTasks.withLock { $0.running.removeValue(forKey: ObjectIdentifier(client)) }
            task?.cancel()
            _ = await task?.result
        }
    }

    /// Stops every client this manager runs and waits for them.
    func stopClients() async {
        let tasks = clientTasks.withLock { tasks -> [Task<Void, any Error>] in
            defer { tasks.running = [:] }
            return Array(tasks.running.values)
        }
        for task in tasks { task.cancel() }
        for task in tasks { _ = await task.result }
    }
}

import Atomics
import Logging
import NIOCore
import NIOPosix
import ServiceLifecycle
import Tracing

/// A memcached client over one or more nodes.
///
/// Requests are pipelined over a few connections per node. Keys are spread over the nodes by
/// libmemcached-compatible ketama; ``node(_:)`` addresses a node by id instead (for data whose
/// location is part of its identity, such as session ids). A node that keeps failing is marked
/// down: requests to it fail fast until a background probe finds it answering again.
///
/// The client is a `Service`: run ``run()`` (for example in a `ServiceGroup`) for as long as the
/// client is used. Requests work from the moment the client exists (so none has to wait for `run()`
/// to be scheduled), but nodes marked down are only probed while `run()` runs. On graceful shutdown
/// (or when the task running `run()` is cancelled) the client stops taking requests (they fail with
/// ``MemcachedError/Code/shutdown``), lets those in flight finish or time out, and closes its
/// connections.
///
/// ```swift
/// let client = MemcachedClient(configuration: try .init(nodes: "n1:127.0.0.1:11211 n2:127.0.0.1:11212"))
/// try await withThrowingDiscardingTaskGroup { group in
///     group.addTask { try await client.run() }
///     try await client.set("greeting", value: "hello")
///     let item = try await client.get("greeting")
///     group.cancelAll()
/// }
/// ```
public final class MemcachedClient: MemcachedCommandRunner, Service {
    public let configuration: Configuration
    let nodes: [MemcachedNode]
    private let nodeIndex: [String: Int]
    private let continuum: KetamaContinuum
    private let logger: Logger
    private let state = ManagedAtomic<UInt8>(State.created.rawValue)

    private enum State: UInt8 {
        case created, running, shuttingDown, finished
    }

    /// Creates a client; nothing connects before ``run()``.
    /// - Throws: ``MemcachedError/Code/invalidConfiguration`` for an invalid configuration.
    public init(
        configuration: Configuration,
        eventLoopGroup: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
        logger: Logger = Logger(label: "memcached", factory: { _ in SwiftLogNoOpLogHandler() })
    ) throws(MemcachedError) {
        try configuration.validate()
        self.configuration = configuration
        self.logger = logger
        self.nodes = configuration.nodes.map {
            MemcachedNode(address: $0, configuration: configuration, eventLoopGroup: eventLoopGroup, logger: logger)
        }
        var index: [String: Int] = [:]
        for (position, node) in configuration.nodes.enumerated() { index[node.id] = position }
        self.nodeIndex = index
        self.continuum = KetamaContinuum(nodes: configuration.nodes.map { ($0.host, $0.port) })
    }

    // MARK: - Service

    /// Runs the client until graceful shutdown or cancellation: probes nodes that are down, then
    /// drains and closes every connection.
    public func run() async throws {
        let (started, _) = state.compareExchange(
            expected: State.created.rawValue, desired: State.running.rawValue, ordering: .acquiringAndReleasing)
        guard started else {
            throw MemcachedError(code: .invalidConfiguration, message: "run() may be called only once per client")
        }
        logger.debug("memcached client running", metadata: ["memcached.nodes": "\(configuration.nodes)"])
        await cancelWhenGracefulShutdown {
            await self.probeDownNodes()
        }
        state.store(State.shuttingDown.rawValue, ordering: .releasing)
        await withDiscardingTaskGroup { group in
            for node in nodes {
                group.addTask { await node.pool.shutdown() }
            }
        }
        state.store(State.finished.rawValue, ordering: .releasing)
        logger.debug("memcached client stopped")
    }

    private func probeDownNodes() async {
        // Text mode: what each node answers (a proxy may lack `gats` and `stats`), asked at once
        // and then with each probe until known.
        var capabilitiesKnown = configuration.protocolMode != .text
        while !Task.isCancelled {
            if !capabilitiesKnown {
                capabilitiesKnown = true
                for node in nodes where await !node.probeTextCapabilities(timeout: configuration.connectTimeout) {
                    capabilitiesKnown = false
                }
            }
            do {
                try await Task.sleep(for: configuration.probeInterval)
            } catch {
                return
            }
            for node in nodes where !node.health.isUp {
                _ = await node.probe(timeout: configuration.connectTimeout)
            }
        }
    }

    // MARK: - requests

    /// Runs a request on the node its key maps to. Requests without a key (`noop`, `version`,
    /// `stats`) name a node: use ``node(_:)``.
    public func execute(_ request: MemcachedRequest) async throws(MemcachedError) -> MemcachedResponse {
        let (node, prepared) = try route(request)
        guard configuration.tracing.tracer != nil else { return try await node.execute(prepared, deadline: deadline(for: prepared)) }
        return try await configuration.tracing.traced([prepared], node: node.id) {
            do throws(MemcachedError) {
                return [.success(try await node.execute(prepared, deadline: deadline(for: prepared)))]
            } catch {
                return [.failure(error)]
            }
        }[0].get()
    }

    /// Runs requests pipelined: one write and one round trip per node involved.
    public func executeBatch(_ requests: [MemcachedRequest]) async -> [Result<MemcachedResponse, MemcachedError>] {
        var results = [Result<MemcachedResponse, MemcachedError>](repeating: .failure(.shutdownError), count: requests.count)
        // The requests that can be sent, each with its node and its place in `requests`. All to
        // one node (the usual case) they go as they are, with no grouping per node.
        // `prepared` shares `requests`' storage: no request is copied (a copy retains its key and
        // value) unless one is rewritten for the wire or refused, both rare.
        var prepared = requests
        var targets: [(node: Int, position: Int)] = []
        targets.reserveCapacity(requests.count)
        var oneNode = true
        var refused = false
        requests.withUnsafeBufferPointer { requests in  // each request looked at in place
            for position in requests.indices {
                do throws(MemcachedError) {
                    let (node, rewritten) = try routeIndex(of: requests[position])
                    oneNode = oneNode && (targets.first?.node ?? node) == node
                    if let rewritten { prepared[position] = rewritten }
                    targets.append((node, position))
                } catch {
                    results[position] = .failure(error)
                    refused = true
                }
            }
        }
        if refused { prepared = targets.map { prepared[$0.position] } }
        guard let first = targets.first else { return results }
        let timeout = configuration.requestTimeout
        if oneNode {
            let deadline = NIODeadline.now() + TimeAmount(prepared[0].timeout ?? timeout)
            let target = nodes[first.node]
            let replies = await configuration.tracing.traced(prepared, node: target.id) {
                await target.executeBatch(prepared, deadline: deadline)
            }
            for (sent, reply) in zip(targets, replies) { results[sent.position] = reply }
            return results
        }
        var perNode: [Int: [Int]] = [:]  // node → indices into `prepared`
        for (index, sent) in targets.enumerated() { perNode[sent.node, default: []].append(index) }
        let batches = perNode
        let all = prepared
        let outcomes = await withTaskGroup(of: [(Int, Result<MemcachedResponse, MemcachedError>)].self) { group in
            for (node, indices) in batches {
                group.addTask {
                    let requests = indices.map { all[$0] }
                    let deadline = NIODeadline.now() + TimeAmount(requests[0].timeout ?? timeout)
                    let target = self.nodes[node]
                    let replies = await self.configuration.tracing.traced(requests, node: target.id) {
                        await target.executeBatch(requests, deadline: deadline)
                    }
                    return zip(indices, replies).map { ($0, $1) }
                }
            }
            var outcomes: [(Int, Result<MemcachedResponse, MemcachedError>)] = []
            for await part in group { outcomes += part }
            return outcomes
        }
        for (index, result) in outcomes { results[targets[index].position] = result }
        return results
    }

    /// Sends a request without waiting for it; `completion` gets the outcome (on an event-loop thread:
    /// keep it short). For writes whose outcome is only counted, such as backup copies.
    public func submit(
        _ request: MemcachedRequest,
        completion: @escaping @Sendable (Result<MemcachedResponse, MemcachedError>) -> Void = { _ in }
    ) async {
        do throws(MemcachedError) {
            let (node, prepared) = try route(request)
            await node.submit(prepared, deadline: deadline(for: prepared), completion: completion)
        } catch {
            completion(.failure(error))
        }
    }

    /// The node with this id.
    /// - Throws: ``MemcachedError/Code/unknownNode`` when no node has that id.
    public func node(_ id: String) throws(MemcachedError) -> MemcachedNodeClient {
        guard let index = nodeIndex[id] else {
            throw MemcachedError(code: .unknownNode, message: "no memcached node with id '\(id)'")
        }
        return MemcachedNodeClient(client: self, node: nodes[index])
    }

    /// Every node, in configuration order.
    public var allNodes: [MemcachedNodeClient] {
        nodes.map { MemcachedNodeClient(client: self, node: $0) }
    }

    /// The id of the node a key maps to on the ketama ring (ignoring availability).
    public func nodeID(forKey key: String) throws(MemcachedError) -> String {
        let wireKey = try MemcachedKey.wireKey(key, encoding: configuration.keyEncoding)
        return nodes[continuum.node(forKey: wireKey.utf8)].id
    }

    // MARK: - internals

    func checkRunning() throws(MemcachedError) {
        guard state.load(ordering: .relaxed) <= State.running.rawValue else {
            throw MemcachedError.shutdownError
        }
    }

    func prepare(_ request: MemcachedRequest) throws(MemcachedError) -> MemcachedRequest {
        try rewrite(request) ?? request
    }

    /// ``prepare(_:)``, or nil when the request goes as it is (checked, not copied).
    func rewrite(_ request: borrowing MemcachedRequest) throws(MemcachedError) -> MemcachedRequest? {
        try checkRunning()
        return try request.rewrittenForWire(
            mode: configuration.protocolMode, keyEncoding: configuration.keyEncoding,
            itemSizeLimit: configuration.itemSizeLimit)
    }

    func deadline(for request: MemcachedRequest) -> NIODeadline {
        .now() + TimeAmount(request.timeout ?? configuration.requestTimeout)
    }

    private func route(_ request: MemcachedRequest) throws(MemcachedError) -> (MemcachedNode, MemcachedRequest) {
        let (index, prepared) = try routeIndex(request)
        return (nodes[index], prepared)
    }

    /// ``route(_:)`` with the node's index in `nodes`.
    private func routeIndex(_ request: MemcachedRequest) throws(MemcachedError) -> (Int, MemcachedRequest) {
        let (index, rewritten) = try routeIndex(of: request)
        return (index, rewritten ?? request)
    }

    /// Where `request` goes (its node's index in `nodes`), and its rewrite for the wire (nil: it
    /// goes as it is).
    private func routeIndex(of request: borrowing MemcachedRequest) throws(MemcachedError) -> (Int, MemcachedRequest?) {
        let rewritten = try rewrite(request)
        guard request.command.hasKey else {
            throw MemcachedError(
                code: .invalidArgument, message: "noop, version and stats go to a node: use client.node(id)")
        }
        // (One node: its key is not read, which costs a copy of the request.)
        if nodes.count == 1 { return (0, rewritten) }
        guard let key = rewritten?.key ?? request.key else { throw MemcachedError(code: .invalidArgument, message: "a request without a key") }
        if configuration.keyDistribution.skipsUnavailable {
            guard let index = continuum.node(forKey: key.utf8, isAvailable: { nodes[$0].health.isUp }) else {
                throw MemcachedError(code: .nodeUnavailable, message: "every memcached node is marked down")
            }
            return (index, rewritten)
        }
        return (continuum.node(forKey: key.utf8), rewritten)
    }
}

/// One node of a ``MemcachedClient``, addressed by id: every request goes to this node, whatever
/// its key. Also where the node-level commands live (`noop`, `version`, `stats`).
public struct MemcachedNodeClient: MemcachedNodeCommandRunner {
    let client: MemcachedClient
    let node: MemcachedNode

    /// The node's id and address.
    public var address: MemcachedNodeAddress { node.address }
    public var id: String { node.id }
    /// Whether the node takes requests (false while it is marked down).
    public var isAvailable: Bool { node.health.isUp }
    /// How many connections the client has opened to this node so far (each new connection gets
    /// the next number): see ``MemcachedRequest/connectionGenerationLimit``.
    public var connectionGeneration: UInt64? { node.connectionGeneration }

    /// Text mode: whether the node answers `gats` (else a read that slides the TTL is a `gets` and
    /// a `touch`, pipelined) and `stats` (else stats requests fail with
    /// ``MemcachedError/Code/unsupportedInProtocolMode``, unsent); nil while not known yet (probed
    /// when the client runs), and in meta mode, where memcached answers every command.
    public var answersGetAndTouch: Bool? { node.textCapabilities.flatMap { Self.known($0.getAndTouch.load(ordering: .relaxed)) } }
    public var answersStats: Bool? { node.textCapabilities.flatMap { Self.known($0.stats.load(ordering: .relaxed)) } }

    private static func known(_ answer: TextCapabilities.Answer) -> Bool? {
        switch answer {
        case .unknown: nil
        case .yes: true
        case .no: false
        }
    }

    /// Requests, errors and latency seen by this node since the client was created.
    public var statistics: MemcachedNodeStatistics {
        MemcachedNodeStatistics(
            requests: node.tally.requests.load(ordering: .relaxed), errors: node.tally.errors.load(ordering: .relaxed),
            timeouts: node.tally.timeouts.load(ordering: .relaxed),
            totalLatencyNanoseconds: node.tally.latencyNanoseconds.load(ordering: .relaxed), isAvailable: node.health.isUp)
    }

    public func execute(_ request: MemcachedRequest) async throws(MemcachedError) -> MemcachedResponse {
        let prepared = try client.prepare(request)
        let tracing = client.configuration.tracing
        guard tracing.tracer != nil else { return try await node.execute(prepared, deadline: client.deadline(for: prepared)) }
        return try await tracing.traced([prepared], node: node.id) {
            do throws(MemcachedError) {
                return [.success(try await node.execute(prepared, deadline: client.deadline(for: prepared)))]
            } catch {
                return [.failure(error)]
            }
        }[0].get()
    }

    public func executeBatch(_ requests: [MemcachedRequest]) async -> [Result<MemcachedResponse, MemcachedError>] {
        if requests.count == 1 {
            // One request (the session layer's backups and checks): the single request's path,
            // which builds no batch (no collector, no index map) and takes an open connection
            // without an async call. Same outcome: one connection, one retry if not sent.
            do throws(MemcachedError) {
                return [.success(try await execute(requests[0]))]
            } catch {
                return [.failure(error)]
            }
        }
        // As the client's batch: `prepared` shares `requests`' storage, no request copied unless
        // rewritten for the wire or refused.
        var prepared = requests
        var failures: [Int: MemcachedError] = [:]
        requests.withUnsafeBufferPointer { requests in
            for index in requests.indices {
                do throws(MemcachedError) {
                    if let rewritten = try client.rewrite(requests[index]) { prepared[index] = rewritten }
                } catch {
                    failures[index] = error
                }
            }
        }
        if !failures.isEmpty { prepared = prepared.indices.filter { failures[$0] == nil }.map { prepared[$0] } }
        // Every request refused before sending: nothing reaches the node (no connection chosen
        // or opened, no span, no metric).
        if prepared.isEmpty { return requests.indices.map { .failure(failures[$0] ?? .connectionClosed()) } }
        let deadline = client.deadline(for: prepared.first ?? .noop)
        let node = self.node
        var replies = await client.configuration.tracing.traced(prepared, node: node.id) {
            await node.executeBatch(prepared, deadline: deadline)
        }.makeIterator()
        return requests.indices.map { index in
            if let failure = failures[index] { return .failure(failure) }
            return replies.next() ?? .failure(.connectionClosed())
        }
    }

    /// Sends a request without waiting for it; `completion` gets the outcome on an event-loop thread.
    public func submit(
        _ request: MemcachedRequest,
        completion: @escaping @Sendable (Result<MemcachedResponse, MemcachedError>) -> Void = { _ in }
    ) async {
        do throws(MemcachedError) {
            let prepared = try client.prepare(request)
            guard let tracer = client.configuration.tracing.tracer else {
                await node.submit(prepared, deadline: client.deadline(for: prepared), completion: completion)
                return
            }
            // Not waited for: the span ends with the reply.
            let span = tracer.startAnySpan(
                "memcached " + prepared.command.operationName, context: ServiceContext.current ?? .topLevel, ofKind: .client)
            span.attributes["db.system.name"] = "memcached"
            span.attributes["db.operation.name"] = prepared.command.operationName
            span.attributes["memcached.node"] = node.id
            await node.submit(prepared, deadline: client.deadline(for: prepared)) { result in
                if case .failure(let error) = result {
                    span.attributes["error.type"] = "\(error.code)"
                    span.setStatus(SpanStatus(code: .error))
                }
                span.end()
                completion(result)
            }
        } catch {
            completion(.failure(error))
        }
    }

    /// A no-op answered in order (`mn`; `version` in text mode): the node is alive and has processed
    /// everything sent before it on that connection.
    public func noop() async throws(MemcachedError) {
        _ = try await execute(.noop)
    }

    /// The server's version string.
    public func version() async throws(MemcachedError) -> String {
        let response = try await execute(.version)
        guard case .version(let version) = response else { throw Self.unexpected(response) }
        return version
    }

}

extension MemcachedClient: MemcachedNodeSet {
    public var nodeRunners: [any MemcachedNodeCommandRunner] { allNodes }
}

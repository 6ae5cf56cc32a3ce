import Atomics
import Logging
import Metrics
import NIOCore

/// One memcached node as the client sees it: its connections, its health and its metrics.
final class MemcachedNode: Sendable {
    let address: MemcachedNodeAddress
    let pool: ConnectionPool
    let health: NodeHealth
    let metrics: NodeMetrics
    let tally = NodeTally()
    let logger: Logger
    /// Text mode: what the node (or the proxy it is) understands; nil in meta mode.
    let textCapabilities: TextCapabilities?
    let connectTimeout: Duration

    var id: String { address.id }

    init(
        address: MemcachedNodeAddress, configuration: MemcachedClient.Configuration, eventLoopGroup: any EventLoopGroup,
        logger: Logger
    ) {
        self.address = address
        self.health = NodeHealth(failureThreshold: configuration.failureThreshold)
        self.metrics = NodeMetrics(nodeID: address.id, factory: configuration.metricsFactory ?? MetricsSystem.factory)
        var logger = logger
        logger[metadataKey: "memcached.node"] = "\(address.id)"
        self.logger = logger
        self.textCapabilities = configuration.protocolMode == .text ? TextCapabilities() : nil
        self.connectTimeout = configuration.connectTimeout
        self.pool = ConnectionPool(
            host: address.host, port: address.port, count: configuration.connectionsPerNode,
            eventLoopGroup: eventLoopGroup,
            settings: MemcachedConnection.Settings(
                mode: configuration.protocolMode, connectTimeout: TimeAmount(configuration.connectTimeout),
                stallGrace: TimeAmount(configuration.requestTimeout),
                maximumValueSize: max(configuration.itemSizeLimit * 2, 1 << 20),
                coalescingWindow: TimeAmount(configuration.coalescingWindow), tls: configuration.tls,
                authentication: configuration.authentication),
            backoff: (TimeAmount(configuration.reconnectBackoff.minimum), TimeAmount(configuration.reconnectBackoff.maximum)))
        metrics.up.record(1)
    }

    /// Text mode: a request the node may not understand is refused here, before it could make the
    /// node close a connection other requests share (see ``TextCapabilities``). A stats request
    /// before the node's answers are known asks first (bounded by the connect timeout).
    private func refusal(of request: MemcachedRequest) async -> MemcachedError? {
        guard let textCapabilities, case .stats = request.command else { return nil }
        if textCapabilities.stats.load(ordering: .relaxed) == .unknown { _ = await probeTextCapabilities(timeout: connectTimeout) }
        guard textCapabilities.stats.load(ordering: .relaxed) != .yes else { return nil }
        return MemcachedError(
            code: .unsupportedInProtocolMode, message: "this node has not shown it answers stats (a proxy?): not sent", nodeID: id)
    }

    /// Text mode without `gats` (or not known yet): reads that slide the TTL are split.
    private func needsSplit(_ requests: [MemcachedRequest]) -> Bool {
        guard let textCapabilities, textCapabilities.getAndTouch.load(ordering: .relaxed) != .yes else { return false }
        return TextFallbackBatch.needsSplit(requests)
    }

    /// Runs a validated request.
    func execute(_ request: MemcachedRequest, deadline: NIODeadline) async throws(MemcachedError) -> MemcachedResponse {
        // Text mode's checks only in text mode: the usual request builds no array and makes no
        // async call for them.
        if textCapabilities != nil {
            if let refusal = await refusal(of: request) { throw refusal }
            if needsSplit([request]) { return try await executeBatch([request], deadline: deadline)[0].get() }
        }
        guard health.isUp else {
            metrics.record(error: .nodeUnavailable)
            throw MemcachedError(code: .nodeUnavailable, message: "node is marked down after repeated failures", nodeID: id)
        }
        let start = NIODeadline.now()
        let result: Result<MemcachedResponse, MemcachedError>
        do throws(MemcachedError) {
            let connection = try await pool.connection(affinity: request.connectionAffinity)
            if let refusal = generationRefusal(request, on: connection) { throw refusal }
            var attempt = await connection.execute(request, deadline: deadline)
            if case .failure(let error) = attempt, error.wasNotSent {
                // The connection closed under us before the request went out: once more on a new one.
                let fresh = try await pool.connection(affinity: request.connectionAffinity, replacing: connection)
                if let refusal = generationRefusal(request, on: fresh) { throw refusal }
                attempt = await fresh.execute(request, deadline: deadline)
            }
            result = attempt
        } catch where error.code == .connectionChanged {
            throw error  // not sent: neither a request nor an error of the node's
        } catch {
            result = .failure(error)
        }
        return try finish(result, start: start).get()
    }

    /// Runs validated requests in one write on one connection.
    func executeBatch(_ requests: [MemcachedRequest], deadline: NIODeadline) async -> [Result<MemcachedResponse, MemcachedError>] {
        if textCapabilities != nil {
            var refusals: [MemcachedError?] = []
            for request in requests { refusals.append(await refusal(of: request)) }
            if refusals.contains(where: { $0 != nil }) {
                // Each refused alone; the others go.
                let sent = zip(requests, refusals).filter { $0.1 == nil }.map(\.0)
                var results = sent.isEmpty ? [] : await executeBatch(sent, deadline: deadline)[...]
                return refusals.map { refusal in
                    if let refusal { return .failure(refusal) }
                    return results.popFirst()!  // one result per request sent, in order
                }
            }
            if needsSplit(requests) {
                let split = TextFallbackBatch(requests)
                return split.results(await executeBatch(split.requests, deadline: deadline))
            }
        }
        guard health.isUp else {
            metrics.record(error: .nodeUnavailable)
            let error = MemcachedError(code: .nodeUnavailable, message: "node is marked down after repeated failures", nodeID: id)
            return requests.map { _ in .failure(error) }
        }
        let start = NIODeadline.now()
        let results: [Result<MemcachedResponse, MemcachedError>]
        do throws(MemcachedError) {
            let connection = try await pool.connection(affinity: requests.first?.connectionAffinity)
            if let refusal = generationRefusal(requests, on: connection) { throw refusal }
            var attempt = await connection.executeBatch(requests, deadline: deadline)
            if !attempt.isEmpty, attempt.allSatisfy({ if case .failure(let error) = $0 { error.wasNotSent } else { false } }) {
                // The connection closed under us before the batch went out: once more on a new one.
                let fresh = try await pool.connection(affinity: requests.first?.connectionAffinity, replacing: connection)
                if let refusal = generationRefusal(requests, on: fresh) { throw refusal }
                attempt = await fresh.executeBatch(requests, deadline: deadline)
            }
            results = attempt
        } catch where error.code == .connectionChanged {
            return requests.map { _ in .failure(error) }  // not sent
        } catch {
            results = requests.map { _ in .failure(error) }
        }
        return results.map { finish($0, start: start) }
    }

    /// Sends a validated request without waiting; `completion` gets the outcome.
    func submit(
        _ request: MemcachedRequest, deadline: NIODeadline,
        completion: @escaping @Sendable (Result<MemcachedResponse, MemcachedError>) -> Void
    ) async {
        if textCapabilities != nil {
            if let refusal = await refusal(of: request) {
                completion(.failure(refusal))
                return
            }
            if needsSplit([request]) {
                // The read and the touch in one write; the completion waits for both.
                Task { completion(await self.executeBatch([request], deadline: deadline)[0]) }
                return
            }
        }
        guard health.isUp else {
            metrics.record(error: .nodeUnavailable)
            completion(.failure(MemcachedError(code: .nodeUnavailable, message: "node is marked down after repeated failures", nodeID: id)))
            return
        }
        let start = NIODeadline.now()
        do throws(MemcachedError) {
            let connection = try await pool.connection(affinity: request.connectionAffinity)
            if let refusal = generationRefusal(request, on: connection) { throw refusal }
            connection.submit(request, deadline: deadline) { result in
                // Rare (the connection closed under us before the request went out): once more on
                // a new connection, from a task since this runs on the event loop. Not a request
                // with a connection affinity: those rely on their order on one connection, which a
                // late retry could break (an old backup landing after a logout's tombstone).
                if case .failure(let error) = result, error.wasNotSent, request.connectionAffinity == nil {
                    Task { await self.resubmit(request, deadline: deadline, replacing: connection, start: start, completion: completion) }
                    return
                }
                completion(self.finish(result, start: start))
            }
        } catch where error.code == .connectionChanged {
            completion(.failure(error))  // not sent
        } catch {
            completion(finish(.failure(error), start: start))
        }
    }

    private func resubmit(
        _ request: MemcachedRequest, deadline: NIODeadline, replacing stale: MemcachedConnection, start: NIODeadline,
        completion: @escaping @Sendable (Result<MemcachedResponse, MemcachedError>) -> Void
    ) async {
        do throws(MemcachedError) {
            let connection = try await pool.connection(affinity: request.connectionAffinity, replacing: stale)
            if let refusal = generationRefusal(request, on: connection) { throw refusal }
            connection.submit(request, deadline: deadline) { result in completion(self.finish(result, start: start)) }
        } catch where error.code == .connectionChanged {
            completion(.failure(error))  // not sent
        } catch {
            completion(finish(.failure(error), start: start))
        }
    }

    /// The pool's connection count (``ConnectionPool/generation``).
    var connectionGeneration: UInt64 { pool.generation }

    /// Requests limited to older connections (``MemcachedRequest/connectionGenerationLimit``) are
    /// not sent over a newer one: all of a batch fail then (a batch shares one connection).
    private func generationRefusal(_ requests: [MemcachedRequest], on connection: MemcachedConnection) -> MemcachedError? {
        let generation = connection.generation
        guard requests.contains(where: { $0.connectionGenerationLimit.map { generation > $0 } ?? false }) else { return nil }
        return generationRefusal()
    }

    /// One request's ``generationRefusal(_:on:)``, without building an array.
    private func generationRefusal(_ request: borrowing MemcachedRequest, on connection: MemcachedConnection) -> MemcachedError? {
        guard let limit = request.connectionGenerationLimit, connection.generation > limit else { return nil }
        return generationRefusal()
    }

    private func generationRefusal() -> MemcachedError {
        MemcachedError(
            code: .connectionChanged, message: "the connection was opened after the request's connection generation limit: not sent",
            nodeID: id)
    }

    private func finish(_ result: Result<MemcachedResponse, MemcachedError>, start: NIODeadline) -> Result<
        MemcachedResponse, MemcachedError
    > {
        let elapsed = (NIODeadline.now() - start).nanoseconds
        metrics.requests.increment()
        metrics.latency.recordNanoseconds(elapsed)
        tally.requests.wrappingIncrement(ordering: .relaxed)
        tally.latencyNanoseconds.wrappingIncrement(by: Int(elapsed), ordering: .relaxed)
        switch result {
        case .success:
            health.recordSuccess()
            return result
        case .failure(let error):
            metrics.record(error: error.code)
            tally.errors.wrappingIncrement(ordering: .relaxed)
            if error.code == .timeout { tally.timeouts.wrappingIncrement(ordering: .relaxed) }
            if error.isNodeFailure, health.recordFailure() {
                metrics.up.record(0)
                logger.warning("memcached node marked down", metadata: ["memcached.error": "\(error)"])
            }
            return .failure(error.with(nodeID: id))
        }
    }

    /// Text mode: finds out, each on a connection of its own (which a proxy may close), whether the
    /// node answers `gats` and `stats`. Returns whether both are known now.
    func probeTextCapabilities(timeout: Duration) async -> Bool {
        guard let textCapabilities, !textCapabilities.isKnown else { return true }
        let probes: [(ManagedAtomic<TextCapabilities.Answer>, MemcachedRequest)] = [
            (textCapabilities.getAndTouch, .get("msm-capability-probe", touch: .seconds(60))),
            (textCapabilities.stats, .stats()),
        ]
        for (answer, request) in probes where answer.load(ordering: .relaxed) == .unknown {
            let connection: MemcachedConnection
            do {
                connection = try await pool.detachedConnection()
            } catch {
                return false
            }
            let result = await connection.execute(request, deadline: .now() + TimeAmount(timeout))
            connection.close()
            let learned = TextCapabilities.answer(result)
            answer.store(learned, ordering: .relaxed)
            if learned == .no {
                logger.notice("memcached node does not answer a text command: its fallback is used", metadata: ["memcached.command": "\(request.command)"])
            }
        }
        return textCapabilities.isKnown
    }

    /// Asks the node for its version on a fresh connection attempt; marks it up when it answers.
    func probe(timeout: Duration) async -> Bool {
        pool.resetBackoff()
        do {
            let connection = try await pool.connection()
            let result = await connection.execute(.version, deadline: .now() + TimeAmount(timeout))
            if case .success = result {
                if health.markUp() {
                    metrics.up.record(1)
                    logger.notice("memcached node is back up")
                }
                return true
            }
        } catch {}
        return false
    }
}

/// A node's counters as atomics, for ``MemcachedNodeClient/statistics`` (swift-metrics backends
/// cannot be read back).
final class NodeTally: Sendable {
    let requests = ManagedAtomic<Int>(0)
    let errors = ManagedAtomic<Int>(0)
    let timeouts = ManagedAtomic<Int>(0)
    let latencyNanoseconds = ManagedAtomic<Int>(0)
}

/// What one node has seen since the client started.
public struct MemcachedNodeStatistics: Sendable, Hashable, Codable {
    /// Requests completed (successfully or not).
    public var requests: Int
    /// Requests that failed.
    public var errors: Int
    /// Requests that timed out.
    public var timeouts: Int
    /// The sum of the requests' latencies.
    public var totalLatencyNanoseconds: Int
    /// Whether the node takes requests now.
    public var isAvailable: Bool

    /// Mean latency in microseconds (0 before any request).
    public var meanLatencyMicroseconds: Double {
        requests == 0 ? 0 : Double(totalLatencyNanoseconds) / Double(requests) / 1000
    }
}

/// Per-node metrics through swift-metrics. Labels carry the node id only: never a key or a value.
struct NodeMetrics: Sendable {
    let requests: Counter
    let timeouts: Counter
    let latency: Metrics.Timer
    let up: Gauge
    private let errors: [MemcachedError.Code: Counter]
    private let otherErrors: Counter

    static let errorCodes: [MemcachedError.Code] = [
        .timeout, .connectionClosed, .connectFailed, .nodeUnavailable, .serverError, .clientError, .protocolError,
        .cancelled, .shutdown,
    ]

    init(nodeID: String, factory: any MetricsFactory) {
        let node = [("node", nodeID)]
        requests = Counter(label: "memcached_requests_total", dimensions: node, factory: factory)
        timeouts = Counter(label: "memcached_timeouts_total", dimensions: node, factory: factory)
        latency = Metrics.Timer(label: "memcached_request_duration_seconds", dimensions: node, factory: factory)
        up = Gauge(label: "memcached_node_up", dimensions: node, factory: factory)
        var errors: [MemcachedError.Code: Counter] = [:]
        for code in Self.errorCodes {
            errors[code] = Counter(label: "memcached_errors_total", dimensions: node + [("kind", code.description)], factory: factory)
        }
        self.errors = errors
        otherErrors = Counter(label: "memcached_errors_total", dimensions: node + [("kind", "other")], factory: factory)
    }

    func record(error code: MemcachedError.Code) {
        (errors[code] ?? otherErrors).increment()
        if code == .timeout { timeouts.increment() }
    }
}

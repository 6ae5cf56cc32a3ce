import Tracing

/// Distributed tracing of the client's round trips (swift-distributed-tracing), off by default.
///
/// With a tracer, every round trip is a client span, a child of the span current in the calling
/// task (`ServiceContext`): named `memcached <commands>` (`memcached get`, `memcached set get`
/// for a pipelined batch), with the node's id, the commands and the outcome. Never a key or a
/// value: keys may carry what identifies a user (a session's, even hashed, is a credential's
/// digest).
public struct MemcachedTracingConfiguration: Sendable {
    /// The tracer the spans go to; nil: no spans (and no cost beyond a check).
    public var tracer: (any Tracer)?

    public init(tracer: (any Tracer)? = nil) {
        self.tracer = tracer
    }
}

extension MemcachedRequest.Command {
    /// The command's name in a span: memcached's own verb, not the wire form of either protocol.
    var operationName: String {
        switch self {
        case .get(_, let value, let touch): touch == nil ? (value ? "get" : "get-metadata") : "get-and-touch"
        case .store(_, _, _, _, let mode, let cas): cas == nil ? mode.rawValue : "cas"
        case .delete: "delete"
        case .touch: "touch"
        case .arithmetic(_, _, let increment, _, _): increment ? "incr" : "decr"
        case .noop: "noop"
        case .version: "version"
        case .stats: "stats"
        }
    }
}

extension MemcachedTracingConfiguration {
    /// Runs a round trip of `requests` to `node` in a span, when a tracer is configured.
    func traced(
        _ requests: [MemcachedRequest], node: String?,
        _ body: () async -> [Result<MemcachedResponse, MemcachedError>]
    ) async -> [Result<MemcachedResponse, MemcachedError>] {
        guard let tracer else { return await body() }
        var names: [String] = []
        for request in requests where names.last != request.command.operationName { names.append(request.command.operationName) }
        let operation = names.joined(separator: " ")
        let span = tracer.startAnySpan("memcached " + operation, context: ServiceContext.current ?? .topLevel, ofKind: .client)
        span.attributes["db.system.name"] = "memcached"
        span.attributes["db.operation.name"] = operation
        span.attributes["db.operation.batch.size"] = requests.count
        if let node { span.attributes["memcached.node"] = node }
        let results = await body()
        var failed = 0
        for case .failure(let error) in results {
            failed += 1
            if failed == 1 {
                span.attributes["error.type"] = "\(error.code)"
                span.setStatus(SpanStatus(code: .error))
            }
        }
        if failed > 0 { span.attributes["memcached.failed"] = failed }
        span.end()
        return results
    }
}

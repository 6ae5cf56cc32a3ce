import Memcached
import Tracing

/// Distributed tracing of the session manager (swift-distributed-tracing), off by default.
///
/// With a tracer, each request that opens its session has a `session.load` span, and each that
/// ends with its session opened a `session.save` span (whatever it came to: written, only slid,
/// or nothing), the memcached round trips their children (see `MemcachedTracingConfiguration`).
/// Attributes: the mode, whether a session was found, the cookie the response carries (`set`,
/// `clear`, `unchanged`), the error's code. Never a session id, a key or an attribute value.
public struct SessionTracingConfiguration: Sendable {
    /// The tracer the spans go to; nil: no spans (and no cost beyond a check).
    public var tracer: (any Tracer)?

    public init(tracer: (any Tracer)? = nil) {
        self.tracer = tracer
    }
}

extension SessionContext {
    /// Runs `body` in a span named `name`, when a tracer is configured; `describe` adds the
    /// outcome's attributes.
    func traced<Value>(
        _ name: String, _ body: () async -> Result<Value, SessionError>,
        describe: (Value, inout SpanAttributes) -> Void = { _, _ in }
    ) async -> Result<Value, SessionError> {
        guard let tracer = configuration.tracing.tracer else { return await body() }
        let span = tracer.startAnySpan(name, context: ServiceContext.current ?? .topLevel, ofKind: .internal)
        span.attributes["msm.mode"] = configuration.mode.rawValue
        let result = await ServiceContext.withValue(span.context) { await body() }
        switch result {
        case .success(let value):
            describe(value, &span.attributes)
        case .failure(let error):
            span.attributes["error.type"] = "\(error.code)"
            span.setStatus(SpanStatus(code: .error))
        }
        span.end()
        return result
    }
}

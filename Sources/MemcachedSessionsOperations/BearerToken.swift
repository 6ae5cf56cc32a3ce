#if Operations
import CoreMetrics
import Crypto
import Logging
import Synchronization

/// A secret that requests present as `Authorization: Bearer <token>` (the management endpoints,
/// the metrics page): the one place that checks it. Compared in constant time, over digests so
/// that not even the length leaks; the token itself is never shown (its description is redacted).
public struct BearerToken: Sendable, CustomStringConvertible {
    private let digest: [UInt8]

    public init(_ token: String) {
        digest = Array(SHA256.hash(data: Array(token.utf8)))
    }

    /// Whether an `Authorization` header value carries this token.
    public func isPresented(in authorization: String?) -> Bool {
        // The scheme is case-insensitive (RFC 9110 §11.1); the token is not.
        guard let authorization, authorization.utf8.count > 7,
            authorization.utf8.prefix(6).map({ $0 | 0x20 }) == Array("bearer".utf8),
            authorization.utf8.dropFirst(6).first == UInt8(ascii: " ")
        else { return false }
        let presented = Array(SHA256.hash(data: Array(authorization.utf8.dropFirst(7))))
        var difference: UInt8 = 0
        for (a, b) in zip(presented, digest) { difference |= a ^ b }
        return difference == 0
    }

    public var description: String { "BearerToken(redacted)" }
}

/// Requests to a token-protected page (a management endpoint, the metrics page) that came without
/// the token or with a wrong one: counted (``count``, and the metric
/// `msm_management_unauthorized_total{endpoint}`) and logged at warning, at most one line per
/// `logInterval` with the number since the last, so that a guessing attacker cannot flood the
/// log. Neither the presented token nor anything else from the request is recorded: the endpoint's
/// name is one of a fixed set.
public final class UnauthorizedAttempts: Sendable {
    private struct LogState {
        var lastLog: ContinuousClock.Instant? = nil
        var unlogged = 0
    }

    /// The endpoints counted apart (a fixed set: nothing from the request names a counter).
    public enum Endpoint: String, Sendable, CaseIterable {
        case page, status, config, metrics, revoke

        /// Its counter's place in ``UnauthorizedAttempts``' array (the order of `allCases`).
        var index: Int {
            switch self {
            case .page: 0
            case .status: 1
            case .config: 2
            case .metrics: 3
            case .revoke: 4
            }
        }
    }

    private let total = Atomic<Int>(0)
    private let logState = Mutex(LogState())
    private let logger: Logger
    private let counters: [CoreMetrics.Counter]
    private let logInterval: Duration

    public init(
        logger: Logger = Logger(label: "msm.management"), metricsFactory: any MetricsFactory = MetricsSystem.factory,
        logInterval: Duration = .seconds(1)
    ) {
        self.logger = logger
        self.counters = Endpoint.allCases.map {
            CoreMetrics.Counter(label: "msm_management_unauthorized_total", dimensions: [("endpoint", $0.rawValue)], factory: metricsFactory)
        }
        self.logInterval = logInterval
    }

    /// Failed attempts since this started.
    public var count: Int { total.load(ordering: .relaxed) }

    /// Records one failed attempt at `endpoint`. The log line names the endpoint of the attempt
    /// that wrote it and counts every refusal (all endpoints) since the previous line.
    public func record(endpoint: Endpoint) {
        total.add(1, ordering: .relaxed)
        counters[endpoint.index].increment()
        let now = ContinuousClock.now
        let toLog = logState.withLock { state -> Int? in
            state.unlogged += 1
            if let last = state.lastLog, now - last < logInterval { return nil }
            defer { state.unlogged = 0 }
            state.lastLog = now
            return state.unlogged
        }
        if let toLog {
            logger.warning(
                "requests without a valid management token were refused",
                metadata: ["msm.endpoint": "\(endpoint.rawValue)", "msm.refused": "\(toLog)", "msm.refused.total": "\(count)"])
        }
    }
}
#endif

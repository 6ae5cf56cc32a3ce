import Metrics
import Prometheus
import Synchronization

/// The app's metrics backend: swift-metrics bootstrapped with Prometheus once per process, so that
/// every statistic of the session manager (`msm_*`) and of the memcached client (`memcached_*`)
/// can be served at `/metrics` in Prometheus' text format. Labels carry node ids and error kinds,
/// never a session id or an attribute value.
public enum MetricsExport {
    public static let registry = PrometheusCollectorRegistry()
    private static let bootstrapped = Atomic<Bool>(false)

    /// Makes Prometheus the process's metrics backend (once; later calls do nothing).
    public static func bootstrap() {
        guard bootstrapped.compareExchange(expected: false, desired: true, ordering: .relaxed).exchanged else { return }
        MetricsSystem.bootstrap(PrometheusMetricsFactory(registry: registry))
    }

    /// The metrics in Prometheus' text exposition format.
    public static func text() -> String {
        registry.emitToString()
    }

    /// Whether an `Authorization` header carries `token` (constant-time comparison).
    static func authorized(_ header: String?, token: String) -> Bool {
        guard let header, header.hasPrefix("Bearer ") else { return false }
        let presented = Array(header.utf8.dropFirst(7))
        let expected = Array(token.utf8)
        guard presented.count == expected.count else { return false }
        var difference: UInt8 = 0
        for (a, b) in zip(presented, expected) { difference |= a ^ b }
        return difference == 0
    }
}

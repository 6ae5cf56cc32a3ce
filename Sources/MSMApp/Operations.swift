#if Tools
import MemcachedSessions
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
}
#endif

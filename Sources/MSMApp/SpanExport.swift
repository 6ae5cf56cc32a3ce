#if Tools
import ServiceLifecycle
import Tracing
#if OpenTelemetry
import OTel
#endif

/// `msm serve --otel`: the tracing spans exported over OTLP/HTTP with swift-otel (the tool's
/// dependency only, behind the `OpenTelemetry` trait; the libraries trace through
/// swift-distributed-tracing's `Tracer` and export nothing themselves).
public enum SpanExport {
    public struct Started: Sendable {
        /// The tracer handed to the session manager (and to its memcached client).
        public let tracer: any Tracer
        /// Sends the batched spans; runs beside the app, stops after the session manager.
        public let service: any Service
    }

    public struct Unavailable: Error, CustomStringConvertible {
        public var description: String { "this msm was built without the OpenTelemetry trait: --otel is not available" }
    }

    /// The OTLP/HTTP exporter, configured by the standard `OTEL_*` environment variables (endpoint,
    /// headers, protocol, batch delay); the service name defaults to `msm`, the instance's name
    /// is the `service.instance.id` resource attribute. Bootstraps the process's global tracer
    /// too, for the frameworks' request spans (once per process).
    public static func start(instance: String) throws -> Started {
        #if OpenTelemetry
        var configuration = OTel.Configuration.default
        configuration.serviceName = "msm"
        configuration.resourceAttributes = ["service.instance.id": instance]
        configuration.traces.exporter = .otlp
        configuration.traces.otlpExporter.protocol = .httpProtobuf
        configuration.metrics.enabled = false
        configuration.logs.enabled = false
        let backend = try OTel.makeTracingBackend(configuration: configuration)
        InstrumentationSystem.bootstrap(backend.factory)
        return Started(tracer: backend.factory, service: backend.service)
        #else
        throw Unavailable()
        #endif
    }
}
#endif

#if Tools
import Hummingbird
import Logging
import Memcached
import MemcachedSessions
import MemcachedSessionsVapor
import NIOCore
import NIOPosix
import ServiceLifecycle
import Vapor

/// One app instance serving the session-counter endpoints (`msm serve`), bound to 127.0.0.1.
public struct ServeOptions: Sendable {
    public enum Framework: String, Sendable, CaseIterable {
        case hummingbird, vapor
    }

    public enum Mode: String, Sendable, CaseIterable {
        case sticky
        case nonSticky = "non-sticky"
        /// Sessions in this instance's memory only (the manager with memcached disabled).
        case memory
    }

    public var framework: Framework = .hummingbird
    public var mode: Mode = .nonSticky
    public var locking: SessionManager.LockingMode = .none
    public var nodes: String = "n1:127.0.0.1:11211"
    /// meta, or text for memcached-protocol stores and proxies without meta commands.
    public var protocolMode: MemcachedProtocolMode = .meta
    public var port: Int = 8080
    public var eventLoops: Int? = nil
    public var route: String? = nil
    public var instance: String = "app"
    public var synchronousSaves = false
    /// Sticky asynchronous saving: how long a change may wait to be written (coalescing window).
    public var asynchronousSaveDelay: Duration? = nil
    public var unavailablePolicy: SessionManager.UnavailablePolicy = .fail
    /// Enables the management endpoints (`/_msm/...`) behind this bearer token.
    public var managementToken: String? = nil
    /// Serves Prometheus metrics at `/metrics`.
    public var metrics = false
    /// `/metrics` is public even when a management token is set (by default it then requires
    /// the token).
    public var metricsPublic = false
    /// The session cookie without `Secure`, for plain-HTTP development (the demo): browsers would
    /// not send a `Secure` cookie back over plain HTTP to anything but localhost.
    public var insecureCookie = false
    public var logLevel: Logger.Level = .warning
    /// Exports tracing spans (the framework's request spans, the session loads and saves, their
    /// memcached round trips) over OTLP/HTTP with swift-otel; the standard `OTEL_*` environment
    /// variables configure the exporter (endpoint default `http://localhost:4318/v1/traces`).
    /// Only in a build with the `OpenTelemetry` trait (on with `Tools`).
    public var openTelemetry = false
    /// TLS to every memcached node (`--tls`, `--tls-ca-file`...; off by default).
    public var tls: MemcachedClient.Configuration.TLS = .disable
    /// memcached authentication (`--auth-user`, the password from a file or the environment).
    public var authentication: MemcachedClient.Configuration.Authentication? = nil
    /// Sealed sessions and keyed storage keys (`--session-keys-file`, `--key-secret-file`).
    public var sealing = SessionManager.Configuration.Sealing()

    public init() {}

    /// The session manager's configuration for these options.
    public func sessionConfiguration() throws(SessionError) -> SessionManager.Configuration {
        var configuration = try SessionManager.Configuration(nodes: nodes)
        configuration.memcached.protocolMode = protocolMode
        configuration.memcached.tls = tls
        configuration.memcached.authentication = authentication
        configuration.sealing = sealing
        switch mode {
        case .sticky: configuration.mode = .sticky
        case .nonSticky: configuration.mode = .nonSticky
        case .memory:
            configuration.mode = .sticky
            configuration.enabled = false
        }
        configuration.locking.mode = mode == .nonSticky ? locking : .none
        configuration.route = route
        configuration.sticky.asynchronousSaving = !synchronousSaves
        if let asynchronousSaveDelay { configuration.sticky.saveDelay = asynchronousSaveDelay }
        configuration.unavailablePolicy = unavailablePolicy
        configuration.memcached.connectTimeout = .milliseconds(500)
        configuration.memcached.requestTimeout = .milliseconds(500)
        configuration.memcached.probeInterval = .milliseconds(250)
        if insecureCookie { configuration.cookie = try SessionCookie(secure: false) }
        return configuration
    }
}

public enum AppServer {
    /// Runs until SIGINT or SIGTERM, then shuts down gracefully (queued session writes flushed).
    public static func run(_ options: ServeOptions) async throws {
        var logger = Logger(label: "msm.\(options.instance)")
        logger.logLevel = options.logLevel
        // `msm serve` sizes NIO's singleton group from --event-loops before anything runs (and may
        // run Swift concurrency on it): one group for the server, memcached and the tasks.
        let group: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton
        if options.metrics { MetricsExport.bootstrap() }
        var configuration = try options.sessionConfiguration()
        let spanExport = options.openTelemetry ? try SpanExport.start(instance: options.instance) : nil
        configuration.tracing.tracer = spanExport?.tracer
        let manager = try SessionManager(configuration: configuration, eventLoopGroup: group, logger: logger)
        let operations = HummingbirdApp.Operations(
            endpoints: try options.managementToken.map { token throws(SessionError) in
                try ManagementEndpoints(manager: manager, token: token, instance: options.instance)
            },
            metrics: options.metrics, metricsToken: options.metricsPublic ? nil : options.managementToken)
        switch options.framework {
        case .hummingbird:
            let app = Hummingbird.Application(
                router: HummingbirdApp.router(
                    manager: manager, instance: options.instance, operations: operations, tracing: options.openTelemetry),
                // Each connection's task on its channel's event loop (no hop, no executor switch
                // between the channel, the handler and the memcached replies);
                // MSM_CONNECTION_TASKS=global: Hummingbird's default, to measure the difference.
                server: ProcessInfo.processInfo.environment["MSM_CONNECTION_TASKS"] == "global" ? .http1() : .http1OnChannelEventLoop(),
                configuration: .init(address: .hostname("127.0.0.1", port: options.port)),
                // Services stop in reverse order: the export after the manager, whose last
                // saves' spans go out too.
                services: (spanExport.map { [$0.service] } ?? []) + [manager],
                eventLoopGroupProvider: .shared(group),
                logger: logger)
            try await app.runService()
        case .vapor:
            var environment = Vapor.Environment.production
            environment.arguments = [CommandLine.arguments.first ?? "msm"]
            let app = try await Vapor.Application.make(environment, .shared(group))
            app.logger = logger
            app.http.server.configuration.hostname = "127.0.0.1"
            app.http.server.configuration.port = options.port
            app.http.server.configuration.reportMetrics = false
            SessionManagerLifecycle.register(manager, on: app)
            VaporApp.configure(app, manager: manager, operations: operations, tracing: options.openTelemetry)
            // Vapor runs the manager through its lifecycle; the span export (if any) runs beside
            // it and stops after Vapor has shut down (the manager's last saves flushed).
            let export = spanExport.map {
                ServiceGroup(configuration: .init(services: [$0.service], gracefulShutdownSignals: [], logger: logger))
            }
            try await withThrowingTaskGroup(of: Void.self) { tasks in
                if let export { tasks.addTask { try await export.run() } }
                do {
                    try await app.execute()
                } catch {
                    try? await app.asyncShutdown()
                    await export?.triggerGracefulShutdown()
                    throw error
                }
                try await app.asyncShutdown()
                await export?.triggerGracefulShutdown()
                try await tasks.waitForAll()
            }
        }
    }
}
#endif

#if Tools
import MemcachedSessions
import MemcachedSessionsVapor
import Vapor

/// The session-counter endpoints on Vapor, with ``MemcachedSessionsMiddleware``.
public enum VaporApp {
    public static func configure(
        _ app: Application, manager: SessionManager, cookie: SessionCookie? = nil,
        operations: HummingbirdApp.Operations = .init(), tracing: Bool = false
    ) {
        // No per-request logging middleware (Vapor's default logs every request at info).
        app.middleware = Middlewares()
        // A span per request (the global tracer's), the sessions' spans its children.
        if tracing { app.middleware.use(TracingMiddleware()) }
        app.get("hello") { _ -> String in "hello" }
        if let metrics = operations.metrics { app.metrics(metrics) }
        if let endpoints = operations.endpoints { app.sessionManagement(endpoints) }
        app.sessionHealthCheck(manager: manager)
        let sessions = app.grouped(MemcachedSessionsMiddleware(manager: manager, cookie: cookie))
        sessions.get("counter") { req async throws -> String in
            String(try await CounterWorkload.counter(req.memcachedSessions))
        }
        sessions.get("read") { req async throws -> String in
            String(try await CounterWorkload.read(req.memcachedSessions))
        }
    }
}
#endif

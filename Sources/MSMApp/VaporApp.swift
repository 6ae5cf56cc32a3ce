#if Tools
import MemcachedSessions
import MemcachedSessionsVapor
import Vapor

/// The session-counter endpoints on Vapor, with ``MemcachedSessionsMiddleware``.
public enum VaporApp {
    public static func configure(
        _ app: Application, manager: SessionManager, cookie: SessionCookie? = nil,
        operations: HummingbirdApp.Operations = .init()
    ) {
        // No per-request logging middleware (Vapor's default logs every request at info).
        app.middleware = Middlewares()
        app.get("hello") { _ -> String in "hello" }
        if operations.metrics {
            app.get("metrics") { req -> Response in
                if let token = operations.metricsToken, !token.isPresented(in: req.headers.first(name: .authorization)) {
                    return Response(status: .unauthorized, headers: ["WWW-Authenticate": "Bearer"])
                }
                return Response(
                    status: .ok, headers: ["Content-Type": "text/plain; version=0.0.4; charset=utf-8"],
                    body: .init(string: MetricsExport.text()))
            }
        }
        if let endpoints = operations.endpoints {
            let management = app.grouped(MemcachedSessionManagementMiddleware(endpoints: endpoints))
            let notFound: @Sendable (Request) -> Response = { _ in Response(status: .notFound) }
            management.get("_msm", use: notFound)
            management.get("_msm", "status", use: notFound)
            management.get("_msm", "config", use: notFound)
            management.put("_msm", "config", use: notFound)
        }
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

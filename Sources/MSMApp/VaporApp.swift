import MemcachedSessions
import MemcachedSessionsVapor
import Vapor

/// The session-counter endpoints on Vapor, with ``MemcachedSessionsMiddleware``.
public enum VaporApp {
    public static func configure(_ app: Application, manager: SessionManager, cookie: SessionCookie = .default) {
        // No per-request logging middleware (Vapor's default logs every request at info).
        app.middleware = Middlewares()
        app.get("hello") { _ -> String in "hello" }
        let sessions = app.grouped(MemcachedSessionsMiddleware(manager: manager, cookie: cookie))
        sessions.get("counter") { req async throws -> String in
            String(try await CounterWorkload.counter(req.memcachedSessions))
        }
        sessions.get("read") { req async throws -> String in
            String(try await CounterWorkload.read(req.memcachedSessions))
        }
    }
}

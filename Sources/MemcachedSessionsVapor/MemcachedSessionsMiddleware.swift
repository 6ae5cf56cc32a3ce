@_exported import MemcachedSessions
import Vapor

/// Vapor middleware for memcached sessions: reads the cookie, gives the route its
/// ``MemcachedSessions/RequestSessions`` (`req.memcachedSessions`), and when the route is done
/// (also when it threw) saves what changed, releases the lock and sets the cookie only when the
/// session id is new or changed: no write and no `Set-Cookie` (hence no date formatting) for an
/// unchanged session.
///
/// ```swift
/// app.middleware.use(MemcachedSessionsMiddleware(manager: manager))
/// app.get("counter") { req async throws -> String in
///     let session = try await req.memcachedSessions.loadOrCreate()
///     let count = (session["count", as: Int.self] ?? 0) + 1
///     try session.set("count", count)
///     return "\(count)"
/// }
/// ```
///
/// Requests matching the ignore pattern pass through untouched. When the session store cannot be
/// reached and the unavailable policy is `fail`, the response is a 503 (never a silent logout).
public struct MemcachedSessionsMiddleware: AsyncMiddleware {
    public let manager: SessionManager
    public let cookie: SessionCookie
    /// Whether the route runs on the request's event loop (see ``EventLoopExecutor``).
    public let runsOnRequestEventLoop: Bool

    public init(manager: SessionManager, cookie: SessionCookie = .default, runsOnRequestEventLoop: Bool = true) {
        self.manager = manager
        self.cookie = cookie
        self.runsOnRequestEventLoop = runsOnRequestEventLoop
    }

    public func respond(to request: Request, chainingTo next: any AsyncResponder) async throws -> Response {
        let path = request.url.path
        if manager.isIgnored(path: path) {
            return try await next.respond(to: request)
        }
        var cookieValue: Substring? = nil
        if let header = request.headers.first(name: .cookie) {
            cookieValue = cookie.value(inCookieHeader: header)
        }
        let access = manager.beginRequest(path: path, sessionCookie: cookieValue.map(String.init))
        // Requests that may wait for memcached run on their event loop, with the connection they
        // talk to; already there (NIO as the global executor), nothing to gain.
        if runsOnRequestEventLoop, access.mayWaitForMemcached, !request.eventLoop.inEventLoop {
            return try await withTaskExecutorPreference(EventLoopExecutor.for(request.eventLoop)) {
                try await respond(to: request, access: access, chainingTo: next)
            }
        }
        return try await respond(to: request, access: access, chainingTo: next)
    }

    private func respond(to request: Request, access: SessionAccess, chainingTo next: any AsyncResponder) async throws -> Response {
        request.storage[SessionAccessKey.self] = access
        let response: Response
        do {
            response = try await next.respond(to: request)
        } catch {
            // The lock is released and what changed is saved even when the route failed.
            _ = try? await manager.endRequest(access)
            if let sessionError = error as? SessionError { throw Self.abort(sessionError) }
            throw error
        }
        let action: SessionResponseAction
        do throws(SessionError) {
            action = try await manager.endRequest(access)
        } catch {
            throw Self.abort(error)
        }
        if let header = cookie.setCookieHeader(for: action) {
            // Added directly: `response.cookies[...] =` would re-parse and re-serialize every cookie.
            response.headers.add(name: .setCookie, value: header)
        }
        return response
    }

    /// Session errors as HTTP responses: an unreachable store or a busy lock are 503s (the client
    /// may retry), anything else a 500.
    static func abort(_ error: SessionError) -> Abort {
        switch error.code {
        case .unavailable:
            return Abort(.serviceUnavailable, headers: ["Retry-After": "1"], reason: "The session store is unavailable; please retry.")
        case .lockUnavailable:
            return Abort(.serviceUnavailable, headers: ["Retry-After": "1"], reason: "The session is busy; please retry.")
        default:
            return Abort(.internalServerError, reason: "Session error: \(error.code)")
        }
    }
}

struct SessionAccessKey: StorageKey {
    typealias Value = SessionAccess
}

extension Request {
    /// The request's memcached session (set by ``MemcachedSessionsMiddleware``).
    public var memcachedSessions: RequestSessions {
        storage[SessionAccessKey.self].map { RequestSessions(access: $0) } ?? RequestSessions()
    }
}

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
            // The lock is released and what changed is saved even when the route failed, and the
            // error response carries the cookie that goes with it (a regenerated id whose old
            // copies are already deleted, a new session, a logout).
            let failure: any Error = (error as? SessionError).map { Self.abort($0) } ?? error
            let header = (try? await manager.endRequest(access)).flatMap { cookie.setCookieHeader(for: $0) }
            guard let header else { throw failure }
            throw ErrorWithSessionCookie(error: failure, setCookie: header)
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
        case .localStoreFull:
            return Abort(.serviceUnavailable, headers: ["Retry-After": "5"], reason: "No new sessions can be started now; please retry.")
        default:
            return Abort(.internalServerError, reason: "Session error: \(error.code)")
        }
    }
}

/// A route's error with the session cookie its response must carry: Vapor's error middleware
/// answers with the wrapped error's status, reason and headers (a 500 for errors that are not
/// `AbortError`s), plus the `Set-Cookie`.
public struct ErrorWithSessionCookie: AbortError, CustomStringConvertible {
    /// What the route threw.
    public let error: any Error
    let setCookie: String

    public var status: HTTPResponseStatus { (error as? any AbortError)?.status ?? .internalServerError }
    public var reason: String { (error as? any AbortError)?.reason ?? HTTPResponseStatus.internalServerError.reasonPhrase }
    public var headers: HTTPHeaders {
        var headers = (error as? any AbortError)?.headers ?? [:]
        headers.add(name: .setCookie, value: setCookie)
        return headers
    }

    public var description: String { "\(error)" }
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

#if Vapor
import MemcachedSessions
import Vapor

/// Vapor middleware for memcached sessions: reads the cookie, gives the route its
/// `RequestSessions` (`req.memcachedSessions`), and when the route is done
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
///
/// The middleware also answers a load balancer's health check, `GET /_msm/health` (200 when a
/// session can be served, 503 when not; no details): see `SessionManager.canServeSessions`.
public struct MemcachedSessionsMiddleware: AsyncMiddleware {
    public let manager: SessionManager
    /// The session cookie: the one given, else the manager's (`SessionManager.Configuration.cookie`).
    public let cookie: SessionCookie
    /// Whether the route runs on the request's event loop (see `EventLoopExecutor`).
    public let runsOnRequestEventLoop: Bool
    /// The path of the health check it answers (nil: none).
    public let healthPath: String?

    public init(
        manager: SessionManager, cookie: SessionCookie? = nil, runsOnRequestEventLoop: Bool = true,
        healthPath: String? = SessionManager.defaultHealthPath
    ) {
        self.manager = manager
        self.cookie = cookie ?? manager.configuration.cookie
        self.runsOnRequestEventLoop = runsOnRequestEventLoop
        self.healthPath = healthPath
    }

    public func respond(to request: Request, chainingTo next: any AsyncResponder) async throws -> Response {
        let path = request.url.path
        if let healthPath, path == healthPath, request.method == .GET || request.method == .HEAD {
            return Self.healthResponse(manager, head: request.method == .HEAD)
        }
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

    /// `SessionManager.healthAnswer` as a response.
    static func healthResponse(_ manager: SessionManager, head: Bool) -> Response {
        let answer = manager.healthAnswer
        return Response(
            status: HTTPResponseStatus(statusCode: answer.status),
            headers: HTTPHeaders(SessionManager.HealthAnswer.headers.map { ($0.name, $0.value) }),
            body: head ? .empty : .init(string: answer.body))
    }

    /// Session errors as HTTP responses: an unreachable store or a busy lock are 503s (the client
    /// may retry), anything else a 500.
    static func abort(_ error: SessionError) -> Abort {
        let answer = error.httpAnswer
        var headers = HTTPHeaders()
        if let retryAfter = answer.retryAfter { headers.add(name: "Retry-After", value: String(retryAfter)) }
        return Abort(HTTPResponseStatus(statusCode: answer.status), headers: headers, reason: answer.message)
    }
}

extension RoutesBuilder {
    /// Answers the health check (`GET /_msm/health`, see
    /// `SessionManager.canServeSessions`) as a route: for an application that uses
    /// ``MemcachedSessionsMiddleware`` on a route group, whose middleware sees only that group's paths.
    public func sessionHealthCheck(manager: SessionManager, path: [PathComponent] = ["_msm", "health"]) {
        on(.GET, path) { _ in MemcachedSessionsMiddleware.healthResponse(manager, head: false) }
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
#endif

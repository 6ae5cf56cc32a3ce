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
        do {
            // Every `Cookie` header: the first alone could miss the session cookie.
            let (response, setCookie) = try await manager.serveRequest(
                path: path, sessionCookie: cookie.value(inCookieHeaders: request.headers[.cookie]), cookie: cookie,
                eventLoop: runsOnRequestEventLoop ? request.eventLoop : nil
            ) { access in
                if let access { request.storage[SessionAccessKey.self] = access }
                return try await next.respond(to: request)
            }
            if let setCookie {
                // Added directly: `response.cookies[...] =` would re-parse and re-serialize every cookie.
                response.headers.add(name: .setCookie, value: setCookie)
                response.headers.replaceOrAdd(name: .cacheControl, value: SessionCookie.cacheControl)
            }
            return response
        } catch {
            switch error {
            case .handler(let error, let setCookie):
                let failure: any Error = (error as? SessionError).map { Self.abort($0) } ?? error
                guard let setCookie else { throw failure }
                throw ErrorWithSessionCookie(error: failure, setCookie: setCookie)
            case .endOfRequest(let error):
                throw Self.abort(error)
            }
        }
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
        headers.replaceOrAdd(name: .cacheControl, value: SessionCookie.cacheControl)
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

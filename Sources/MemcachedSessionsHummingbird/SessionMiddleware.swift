import HTTPTypes
@_exported import MemcachedSessions
import Hummingbird

/// A request context that gives handlers their session (through ``MemcachedSessionMiddleware``).
///
/// Use ``BasicMemcachedSessionRequestContext``, or add the property to your own context:
///
/// ```swift
/// struct AppContext: MemcachedSessionRequestContext {
///     var coreContext: CoreRequestContextStorage
///     var sessions = RequestSessions()
///     init(source: ApplicationRequestContextSource) { coreContext = .init(source: source) }
/// }
/// ```
public protocol MemcachedSessionRequestContext: RequestContext {
    /// Set by ``MemcachedSessionMiddleware`` for each request.
    var sessions: RequestSessions { get set }
}

/// The simplest context with sessions.
public struct BasicMemcachedSessionRequestContext: MemcachedSessionRequestContext {
    public var coreContext: CoreRequestContextStorage
    public var sessions: RequestSessions

    public init(source: ApplicationRequestContextSource) {
        self.coreContext = .init(source: source)
        self.sessions = RequestSessions()
    }
}

/// Hummingbird middleware for memcached sessions: reads the cookie, gives the handler its
/// ``RequestSessions``, and when the handler is done (also when it threw) saves what changed,
/// releases the lock and sets the cookie only when the session id is new or changed.
///
/// Requests matching the configuration's ignore pattern pass through untouched. When the session
/// store cannot be reached and the unavailable policy is `fail`, the response is a 503 (never a
/// silent logout).
public struct MemcachedSessionMiddleware<Context: MemcachedSessionRequestContext>: RouterMiddleware {
    public let manager: SessionManager
    public let cookie: SessionCookie

    public init(manager: SessionManager, cookie: SessionCookie = .default) {
        self.manager = manager
        self.cookie = cookie
    }

    public func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        let path = request.uri.path
        if manager.isIgnored(path: path) {
            return try await next(request, context)
        }
        var cookieValue: Substring? = nil
        if let header = request.headers[.cookie] {
            cookieValue = cookie.value(inCookieHeader: header)
        }
        let access = manager.beginRequest(path: path, sessionCookie: cookieValue.map(String.init))
        var context = context
        context.sessions = RequestSessions(access: access)
        var response: Response
        do {
            response = try await next(request, context)
        } catch {
            // The lock is released and what changed is saved even when the handler failed.
            _ = try? await manager.endRequest(access)
            if let sessionError = error as? SessionError { throw Self.httpError(sessionError) }
            throw error
        }
        let action: SessionResponseAction
        do throws(SessionError) {
            action = try await manager.endRequest(access)
        } catch {
            throw Self.httpError(error)
        }
        if let header = cookie.setCookieHeader(for: action) {
            response.headers.append(HTTPField(name: .setCookie, value: header))
        }
        return response
    }

    /// Session errors as HTTP responses: the store being unreachable or a lock that cannot be had
    /// are 503s (the client may retry), anything else a 500. Never a silent logout.
    static func httpError(_ error: SessionError) -> HTTPError {
        switch error.code {
        case .unavailable:
            return HTTPError(.serviceUnavailable, headers: [.retryAfter: "1"], message: "The session store is unavailable; please retry.")
        case .lockUnavailable:
            return HTTPError(.serviceUnavailable, headers: [.retryAfter: "1"], message: "The session is busy; please retry.")
        default:
            return HTTPError(.internalServerError, message: "Session error: \(error.code)")
        }
    }
}

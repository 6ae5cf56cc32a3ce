#if Hummingbird
import HTTPTypes
import Hummingbird
@_exported import MemcachedSessions
import NIOCore

/// A request context that gives handlers their session (through ``MemcachedSessionMiddleware``).
///
/// Use ``BasicMemcachedSessionRequestContext``, or add the property to your own context:
///
/// ```swift
/// struct AppContext: MemcachedSessionRequestContext {
///     var coreContext: CoreRequestContextStorage
///     var memcachedSessions = RequestSessions()
///     init(source: ApplicationRequestContextSource) { coreContext = .init(source: source) }
/// }
/// ```
public protocol MemcachedSessionRequestContext: RequestContext {
    /// Set by ``MemcachedSessionMiddleware`` for each request. (Not `sessions`: that is
    /// hummingbird-auth's `SessionRequestContext.sessions`, and one context can be both.)
    var memcachedSessions: RequestSessions { get set }
    /// The event loop of the request's channel, if known: the middleware then runs the handler on
    /// it (see `EventLoopExecutor`). The default is nil (the handler runs where Hummingbird runs it).
    var channelEventLoop: (any EventLoop)? { get }
}

extension MemcachedSessionRequestContext {
    public var channelEventLoop: (any EventLoop)? { nil }

    @available(*, deprecated, renamed: "memcachedSessions")
    public var sessions: RequestSessions {
        get { memcachedSessions }
        set { memcachedSessions = newValue }
    }
}

/// The simplest context with sessions.
public struct BasicMemcachedSessionRequestContext: MemcachedSessionRequestContext {
    public var coreContext: CoreRequestContextStorage
    public var memcachedSessions: RequestSessions
    public let channelEventLoop: (any EventLoop)?

    public init(source: ApplicationRequestContextSource) {
        self.coreContext = .init(source: source)
        self.memcachedSessions = RequestSessions()
        self.channelEventLoop = source.channel.eventLoop
    }
}

/// Hummingbird middleware for memcached sessions: reads the cookie, gives the handler its
/// `RequestSessions`, and when the handler is done (also when it threw) saves what changed,
/// releases the lock and sets the cookie only when the session id is new or changed.
///
/// Requests matching the configuration's ignore pattern pass through untouched. When the session
/// store cannot be reached and the unavailable policy is `fail`, the response is a 503 (never a
/// silent logout).
///
/// The middleware also answers a load balancer's health check, `GET /_msm/health` (200 when a
/// session can be served, 503 when not; no details): see `SessionManager.canServeSessions`.
public struct MemcachedSessionMiddleware<Context: MemcachedSessionRequestContext>: RouterMiddleware {
    public let manager: SessionManager
    /// The session cookie: the one given, else the manager's (`SessionManager.Configuration.cookie`).
    public let cookie: SessionCookie
    /// Whether the handler runs on its channel's event loop (when the context knows it). Under
    /// `HTTPServerBuilder.http1OnChannelEventLoop()` it already does, whatever this says.
    public let runsOnChannelEventLoop: Bool
    /// The path of the health check it answers (nil: none).
    public let healthPath: String?

    public init(
        manager: SessionManager, cookie: SessionCookie? = nil, runsOnChannelEventLoop: Bool = true,
        healthPath: String? = SessionManager.defaultHealthPath
    ) {
        self.manager = manager
        self.cookie = cookie ?? manager.configuration.cookie
        self.runsOnChannelEventLoop = runsOnChannelEventLoop
        self.healthPath = healthPath
    }

    public func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        let path = request.uri.path
        if let healthPath, path == healthPath, request.method == .get || request.method == .head {
            return HealthCheck.response(manager, head: request.method == .head)
        }
        let eventLoop = runsOnChannelEventLoop ? context.channelEventLoop : nil
        do {
            // Field by field: `headers[.cookie]` would first join every `Cookie` field into a new
            // string (docs/benchmarks/instructions.md: 4,205 instructions a request).
            var (response, setCookie) = try await manager.serveRequest(
                path: path, sessionCookie: cookie.value(inCookieHeaders: request.headers.lazy.filter { $0.name == .cookie }.map(\.value)),
                cookie: cookie, eventLoop: eventLoop
            ) { access in
                var context = context
                if let access { context.memcachedSessions = RequestSessions(access: access) }
                return try await next(request, context)
            }
            if let setCookie {
                response.headers.append(HTTPField(name: .setCookie, value: setCookie))
                response.headers[.cacheControl] = SessionCookie.cacheControl
            }
            return response
        } catch {
            switch error {
            case .handler(let error, let setCookie):
                let failure: any Error = (error as? SessionError).map { Self.httpError($0) } ?? error
                guard let setCookie else { throw failure }
                throw ErrorWithSessionCookie(error: failure, setCookie: setCookie)
            case .endOfRequest(let error):
                throw Self.httpError(error)
            }
        }
    }

    /// Session errors as HTTP responses: the store being unreachable or a lock that cannot be had
    /// are 503s (the client may retry), anything else a 500. Never a silent logout.
    static func httpError(_ error: SessionError) -> HTTPError {
        let answer = error.httpAnswer
        var headers = HTTPFields()
        if let retryAfter = answer.retryAfter { headers[.retryAfter] = String(retryAfter) }
        return HTTPError(HTTPResponse.Status(code: answer.status), headers: headers, message: answer.message)
    }
}

enum HealthCheck {
    /// `SessionManager.healthAnswer` as a response.
    static func response(_ manager: SessionManager, head: Bool) -> Response {
        let answer = manager.healthAnswer
        var headers = HTTPFields()
        for header in SessionManager.HealthAnswer.headers {
            if let name = HTTPField.Name(header.name) { headers[name] = header.value }
        }
        return Response(
            status: HTTPResponse.Status(code: answer.status), headers: headers,
            body: head ? .init() : .init(byteBuffer: ByteBuffer(string: answer.body)))
    }
}

extension RouterMethods {
    /// Answers the health check (`GET`/`HEAD` `/_msm/health`, see
    /// `SessionManager.canServeSessions`) as a route: for an application that adds
    /// ``MemcachedSessionMiddleware`` to a route group, whose middleware sees only that group's paths.
    @discardableResult
    public func addSessionHealthCheck(manager: SessionManager, path: RouterPath = RouterPath(SessionManager.defaultHealthPath)) -> Self {
        get(path) { _, _ in HealthCheck.response(manager, head: false) }
        head(path) { _, _ in HealthCheck.response(manager, head: true) }
        return self
    }
}

/// A handler's error with the session cookie its response must carry. Hummingbird turns it into
/// the response the wrapped error would have made (a 500 for errors that make none), with the
/// `Set-Cookie` added.
public struct ErrorWithSessionCookie: HTTPResponseError, CustomStringConvertible {
    /// What the handler threw.
    public let error: any Error
    let setCookie: String

    public var status: HTTPResponse.Status {
        (error as? any HTTPResponseError)?.status ?? .internalServerError
    }

    public func response(from request: Request, context: some RequestContext) throws -> Response {
        var response: Response
        if let error = error as? any HTTPResponseError {
            response = try error.response(from: request, context: context)
        } else {
            response = Response(status: .internalServerError)
        }
        response.headers.append(HTTPField(name: .setCookie, value: setCookie))
        response.headers[.cacheControl] = SessionCookie.cacheControl
        return response
    }

    public var description: String { "\(error)" }
}
#endif

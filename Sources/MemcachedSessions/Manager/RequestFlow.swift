import NIOCore

/// How a request served by ``SessionManager/serveRequest(path:cookieHeader:cookie:eventLoop:_:)``
/// failed. An adapter turns each case into its framework's error response.
public enum SessionRequestFailure: Error {
    /// The handler threw `error`. The session was ended all the same (what changed saved, the
    /// lock released); `setCookie`, when not nil, is the `Set-Cookie` value the error response
    /// must carry (a regenerated id whose old copies are already deleted, a new session, a logout).
    /// A `SessionError` the handler let through (e.g. from `loadOrCreate()`) is one of these, to be
    /// answered as its `SessionError/httpAnswer` says.
    case handler(any Error, setCookie: String?)
    /// The handler answered, but ending its session failed: answer as `SessionError/httpAnswer`
    /// says (never a silent logout).
    case endOfRequest(SessionError)
}

extension SessionManager {
    /// The flow of one request through the session manager, the one home of what each framework's
    /// middleware does (the Hummingbird and Vapor adapters are this call and their framework's
    /// types around it):
    ///
    /// 1. a path matching the ignore pattern runs `handler` with no session (nil) and nothing else;
    /// 2. otherwise the session cookie is read from `cookieHeader` and the request begins
    ///    (`beginRequest(path:sessionCookie:)`, nothing sent to memcached yet);
    /// 3. `handler` runs with the request's ``SessionAccess``; when the request may wait for
    ///    memcached and `eventLoop` (the request's channel's) is not the current thread, on that
    ///    event loop, with the connection it talks to (see `EventLoopExecutor`, the memcached client's);
    /// 4. then, also when `handler` threw, the request ends (`endRequest(_:)`: what changed saved,
    ///    the lock released), and the `Set-Cookie` value the response must carry is returned, nil
    ///    when the session id is unchanged.
    ///
    /// Inlinable so that each adapter's call is specialized for its framework's response type:
    /// unspecialized, the generic result (a tuple of an unknown type) cost a metadata lookup and
    /// indirect copies on every request.
    @inlinable
    public func serveRequest<Response>(
        path: String, cookieHeader: String?, cookie: SessionCookie, eventLoop: (any EventLoop)?,
        _ handler: (SessionAccess?) async throws -> Response
    ) async throws(SessionRequestFailure) -> (response: Response, setCookie: String?) {
        try await serveRequest(
            path: path, sessionCookie: cookieHeader.flatMap { cookie.value(inCookieHeader: $0) }, cookie: cookie,
            eventLoop: eventLoop, handler)
    }

    /// ``serveRequest(path:cookieHeader:cookie:eventLoop:_:)`` with the session cookie's value
    /// found by the adapter (``SessionCookie/value(inCookieHeaders:)``, for a framework that keeps
    /// several `Cookie` fields apart), evaluated only for a path that is not ignored.
    @inlinable
    public func serveRequest<Response>(
        path: String, sessionCookie: @autoclosure () -> Substring?, cookie: SessionCookie, eventLoop: (any EventLoop)?,
        _ handler: (SessionAccess?) async throws -> Response
    ) async throws(SessionRequestFailure) -> (response: Response, setCookie: String?) {
        if isIgnored(path: path) {
            do {
                return (try await handler(nil), nil)
            } catch {
                throw .handler(error, setCookie: nil)
            }
        }
        let access = beginRequest(path: path, sessionCookie: sessionCookie().map(String.init))
        // Already on the event loop (`http1OnChannelEventLoop()`, or NIO as the global executor),
        // or a request that never waits for memcached: nothing to gain from hopping. (NIO as the
        // global executor runs jobs as the loop's serial executor; a preference taken here would
        // spare the handler's executor switches, but measured on Vapor it changed nothing: 18,750
        // against 18,697 req/s summed over three alternated rounds, against the build before,
        // bench-results/ab-2026-12-06-connections-on-loop.txt.)
        if let eventLoop, access.mayWaitForMemcached, !eventLoop.inEventLoop {
            return try await withTaskExecutorPreference(EventLoopExecutor.for(eventLoop)) {
                await serve(access, cookie: cookie, handler)
            }.get()
        }
        return try await serve(access, cookie: cookie, handler).get()
    }

    @inlinable
    func serve<Response>(
        _ access: SessionAccess, cookie: SessionCookie, _ handler: (SessionAccess?) async throws -> Response
    ) async -> Result<(response: Response, setCookie: String?), SessionRequestFailure> {
        let response: Response
        do {
            response = try await handler(access)
        } catch {
            // Ended all the same; if ending fails too, the handler's error is the one reported.
            let setCookie = (try? await endRequest(access)).flatMap { cookie.setCookieHeader(for: $0) }
            return .failure(.handler(error, setCookie: setCookie))
        }
        do throws(SessionError) {
            let action = try await endRequest(access)
            return .success((response, cookie.setCookieHeader(for: action)))
        } catch {
            return .failure(.endOfRequest(error))
        }
    }
}

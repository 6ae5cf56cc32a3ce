#if Vapor
import MemcachedSessions
import Synchronization
import Vapor

/// Vapor's `SessionDriver` on the session manager, for applications that keep Vapor's own
/// `SessionsMiddleware` (so `req.session` and Vapor's session authentication keep working).
///
/// Vapor's middleware calls `updateSession` after every request that has a session, changed or
/// not; this driver compares the data with what it read and writes nothing when it is unchanged
/// (the manager's `writes_skipped` counter shows it). The session's memcached TTL still slides,
/// in the same round trip as the read. Non-sticky and sticky modes, failover and backups work as
/// with ``MemcachedSessionsMiddleware``; locking does not (Vapor's middleware gives no chance to
/// release a lock when a route throws): use ``MemcachedSessionsMiddleware`` for locking.
///
/// ```swift
/// app.sessions.use(.memcached(manager))   // the driver, its cookie, and the manager's lifecycle
/// app.middleware.use(app.sessions.noStoreMiddleware)   // Vapor's, with Cache-Control: no-store
/// ```
public struct MemcachedSessionDriver: AsyncSessionDriver {
    public let manager: SessionManager

    public init(manager: SessionManager) {
        self.manager = manager
    }

    /// Vapor's sessions configuration with a cookie that carries no `Expires` (Vapor formats that
    /// date with a new `DateFormatter` on every response) and is `HttpOnly`.
    public static func sessionsConfiguration(cookie: SessionCookie = .default) -> SessionsConfiguration {
        SessionsConfiguration(cookieName: cookie.name) { id in
            HTTPCookies.Value(
                string: id.string, expires: nil, maxAge: cookie.maxAge.map { Int($0.components.seconds) }, domain: cookie.domain,
                path: cookie.path, isSecure: cookie.secure, isHTTPOnly: cookie.httpOnly,
                sameSite: cookie.sameSite.map { HTTPCookies.SameSitePolicy(rawValue: $0.rawValue) ?? .lax })
        }
    }

    struct AccessKey: StorageKey {
        typealias Value = SessionAccess
    }

    /// The attribute names this request showed Vapor in `req.session.data`: only those can have
    /// been removed through it.
    struct ShownKey: StorageKey {
        typealias Value = Set<String>
    }

    private func access(for request: Request, cookie: String?) -> SessionAccess {
        if let access = request.storage[AccessKey.self] { return access }
        let access = manager.beginRequest(path: request.url.path, sessionCookie: cookie, allowLocking: false)
        request.storage[AccessKey.self] = access
        return access
    }

    /// What Vapor's `SessionData` can show: the attributes whose values are strings. Attributes of
    /// other types (set through the typed API) are not shown, and survive untouched.
    static func data(of session: MemcachedSession) -> (data: SessionData, shown: Set<String>) {
        var values: [String: String] = [:]
        for name in session.attributeNames {
            if let value = session[name, as: String.self] { values[name] = value }
        }
        return (SessionData(initialData: values), Set(values.keys))
    }

    /// Applies Vapor's data: sets what it holds, and removes only what it showed and no longer
    /// holds (`shown` nil: nothing was shown, so nothing can have been removed).
    static func apply(_ data: SessionData, shown: Set<String>?, to session: MemcachedSession) throws {
        let snapshot = data.snapshot
        for name in shown ?? [] where snapshot[name] == nil {
            session.remove(name)
        }
        for (name, value) in snapshot {
            try session.set(name, value)  // an equal value is not a change
        }
    }

    private func finish(_ access: SessionAccess, request: Request, fallback: Vapor.SessionID?) async throws -> Vapor.SessionID {
        request.storage[AccessKey.self] = nil
        request.storage[ShownKey.self] = nil
        let action: SessionResponseAction
        do throws(SessionError) {
            action = try await manager.endRequest(access)
        } catch {
            throw MemcachedSessionsMiddleware.abort(error)
        }
        switch action.cookie {
        case .set(let id): return Vapor.SessionID(string: id.description)
        case .unchanged, .clear:
            if let id = access.current?.id { return Vapor.SessionID(string: id.description) }
            return fallback ?? Vapor.SessionID(string: "")
        }
    }

    public func readSession(_ sessionID: Vapor.SessionID, for request: Request) async throws -> SessionData? {
        guard !manager.isIgnored(path: request.url.path) else { return nil }
        let access = self.access(for: request, cookie: sessionID.string)
        do throws(SessionError) {
            guard let session = try await access.load() else { return nil }
            let (data, shown) = Self.data(of: session)
            request.storage[ShownKey.self] = shown
            return data
        } catch {
            throw MemcachedSessionsMiddleware.abort(error)
        }
    }

    public func createSession(_ data: SessionData, for request: Request) async throws -> Vapor.SessionID {
        let access = self.access(for: request, cookie: nil)
        let session = try access.create()
        try Self.apply(data, shown: nil, to: session)
        return try await finish(access, request: request, fallback: nil)
    }

    public func updateSession(_ sessionID: Vapor.SessionID, to data: SessionData, for request: Request) async throws -> Vapor.SessionID {
        let access = self.access(for: request, cookie: sessionID.string)
        let session: MemcachedSession
        do {
            guard let loaded = try await access.load() else {
                // Gone meanwhile: Vapor asked to update what no longer exists; start it again.
                let created = try access.create()
                try Self.apply(data, shown: nil, to: created)
                return try await finish(access, request: request, fallback: nil)
            }
            session = loaded
        } catch let error as SessionError {
            throw MemcachedSessionsMiddleware.abort(error)
        }
        try Self.apply(data, shown: request.storage[ShownKey.self], to: session)
        return try await finish(access, request: request, fallback: sessionID)
    }

    public func deleteSession(_ sessionID: Vapor.SessionID, for request: Request) async throws {
        let access = self.access(for: request, cookie: sessionID.string)
        do throws(SessionError) {
            try await access.invalidate()
        } catch {
            throw MemcachedSessionsMiddleware.abort(error)
        }
        _ = try await finish(access, request: request, fallback: sessionID)
    }
}

/// Vapor's `SessionsMiddleware` with `Cache-Control: no-store` on every response that sets or
/// clears the session cookie (OWASP: a shared cache must not keep a response that hands out a
/// session id). Vapor's own middleware sets the cookie after the driver has run, where the driver
/// cannot reach the response; use this in its place: `app.sessions.noStoreMiddleware`.
public struct SessionsNoStoreMiddleware: AsyncMiddleware {
    let sessions: any Middleware
    let cookieName: String

    public init(wrapping sessions: any Middleware, cookieName: String) {
        self.sessions = sessions
        self.cookieName = cookieName
    }

    public func respond(to request: Request, chainingTo next: any AsyncResponder) async throws -> Response {
        let response = try await sessions.respond(to: request, chainingTo: next).get()
        if response.cookies[cookieName] != nil {
            response.headers.replaceOrAdd(name: .cacheControl, value: "no-store")
        }
        return response
    }
}

extension Application.Sessions {
    /// `app.sessions.middleware` (Vapor's `SessionsMiddleware`) with `Cache-Control: no-store` on
    /// every response that sets or clears the session cookie.
    public var noStoreMiddleware: SessionsNoStoreMiddleware {
        SessionsNoStoreMiddleware(wrapping: middleware, cookieName: configuration.cookieName)
    }
}

extension Application.Sessions.Provider {
    /// Vapor's sessions (`req.session`, Vapor's session authentication) in memcached, as Vapor's
    /// own `.memory` and `.fluent` are used: the ``MemcachedSessionDriver`` over `manager`, Vapor's
    /// sessions configuration with `cookie` (the manager's own by default), and the manager's
    /// lifecycle (run after boot, flushed at shutdown), registered once per application.
    ///
    /// ```swift
    /// app.sessions.use(.memcached(manager))
    /// app.middleware.use(app.sessions.noStoreMiddleware)
    /// ```
    public static func memcached(_ manager: SessionManager, cookie: SessionCookie? = nil) -> Self {
        .init { app in
            app.sessions.use { _ in MemcachedSessionDriver(manager: manager) }
            app.sessions.configuration = MemcachedSessionDriver.sessionsConfiguration(cookie: cookie ?? manager.configuration.cookie)
            SessionManagerLifecycle.register(manager, on: app)
        }
    }

    /// The same, with a manager made from `configuration` (its own memcached client).
    /// - Throws: `SessionError.Code.invalidConfiguration` naming the setting at fault.
    public static func memcached(configuration: SessionManager.Configuration) throws(SessionError) -> Self {
        .memcached(try SessionManager(configuration: configuration))
    }
}

/// Runs a `SessionManager` for as long as a Vapor application runs (Vapor has no service
/// groups): started after boot, and on shutdown cancelled, which flushes queued sticky writes
/// before the manager stops.
///
/// ```swift
/// app.lifecycle.use(SessionManagerLifecycle(manager: manager))
/// ```
public final class SessionManagerLifecycle: LifecycleHandler {
    public let manager: SessionManager
    private let task = Mutex<Task<Void, any Error>?>(nil)

    public init(manager: SessionManager) {
        self.manager = manager
    }

    /// The managers whose lifecycle an application has registered through ``register(_:on:)``.
    private struct Registered: StorageKey {
        typealias Value = Set<ObjectIdentifier>
    }

    /// Registers `manager`'s lifecycle on `app` unless it is registered already (a manager runs
    /// once, whichever of the provider and the middleware set-up asked first).
    public static func register(_ manager: SessionManager, on app: Application) {
        var registered = app.storage[Registered.self] ?? []
        guard registered.insert(ObjectIdentifier(manager)).inserted else { return }
        app.storage[Registered.self] = registered
        app.lifecycle.use(SessionManagerLifecycle(manager: manager))
    }

    public func didBootAsync(_ application: Application) async throws {
        let manager = self.manager
        task.withLock { $0 = Task { try await manager.run() } }
    }

    public func shutdownAsync(_ application: Application) async {
        let running = task.withLock { task -> Task<Void, any Error>? in
            defer { task = nil }
            return task
        }
        running?.cancel()
        _ = await running?.result
    }
}
#endif

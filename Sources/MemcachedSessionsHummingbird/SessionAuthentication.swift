#if HummingbirdAuth
import Hummingbird
public import HummingbirdAuth

/// hummingbird-auth's session authentication on memcached sessions: reads the user's id from the
/// request's memcached session (the attribute ``key``), asks a `UserSessionRepository` for the
/// user, and sets `context.identity`. Put it after ``MemcachedSessionMiddleware``.
///
/// ```swift
/// struct AppContext: MemcachedSessionRequestContext, AuthRequestContext {
///     var coreContext: CoreRequestContextStorage
///     var memcachedSessions = RequestSessions()
///     var identity: User?
///     init(source: ApplicationRequestContextSource) { coreContext = .init(source: source) }
/// }
/// router.add(middleware: MemcachedSessionMiddleware<AppContext>(manager: sessions))
/// router.add(middleware: MemcachedSessionAuthenticator<AppContext, _>(users: users))
/// // in the login route: try await context.memcachedSessions.logIn(userID: user.id)
/// // in the logout route: try await context.memcachedSessions.logOut()
/// ```
///
/// A session that cannot be read (its nodes do not answer) fails the request as the middleware's
/// own load would (503 with the unavailable policy `fail`): never a silent "not logged in".
public struct MemcachedSessionAuthenticator<
    Context: AuthRequestContext & MemcachedSessionRequestContext,
    Repository: UserSessionRepository
>: AuthenticatorMiddleware where Repository.User == Context.Identity {
    public typealias Identity = Context.Identity

    /// Where the users are looked up by the id the session holds.
    public let users: Repository
    /// The session attribute that holds the user's id.
    public let key: String

    public init(users: Repository, key: String = RequestSessions.userIDKey, context: Context.Type = Context.self) {
        self.users = users
        self.key = key
    }

    /// Looks the user up with a closure instead of a repository.
    public init<Identifier: Codable & Sendable>(
        key: String = RequestSessions.userIDKey, context: Context.Type = Context.self,
        getUser: @escaping @Sendable (Identifier, UserRepositoryContext) async throws -> Context.Identity?
    ) where Repository == UserSessionClosureRepository<Identifier, Context.Identity> {
        self.users = UserSessionClosureRepository(getUser)
        self.key = key
    }

    public func authenticate(request: Request, context: Context) async throws -> Identity? {
        guard let session = try await context.memcachedSessions.load(),
            let id = session[key, as: Repository.Identifier.self]
        else { return nil }
        return try await users.getUser(from: id, context: .init(logger: context.logger))
    }
}

extension RequestSessions {
    /// The session attribute ``MemcachedSessionAuthenticator`` reads the user's id from by default.
    public static let userIDKey = "userID"

    /// Logs a user in: the session (new or the request's) holds the user's id under `key`, and
    /// gets a new id (against session fixation), sent with the response.
    public func logIn<Identifier: Codable & Sendable>(userID: Identifier, key: String = Self.userIDKey) async throws {
        let session = try await loadOrCreate()
        try session.set(key, userID)
        try await regenerateID()
    }

    /// Logs the user out: the session ends, every copy of it, and the cookie is cleared.
    public func logOut() async throws {
        try await invalidate()
    }
}
#endif

// snippet.hide
#if HummingbirdAuth
// snippet.show
import Hummingbird
import HummingbirdAuth
import MemcachedSessionsHummingbird

// 1. The session manager: your memcached nodes (`n1:host:port`, spaces or commas), sticky or not.
var configuration = try SessionManager.Configuration(nodes: "n1:127.0.0.1:11211 n2:127.0.0.1:11212")
configuration.mode = .nonSticky  // or .sticky, with `configuration.route = "app1"` (MSM's jvmRoute)
configuration.locking.mode = .none  // .all, .auto or .uriPattern("/cart/.*") against concurrent requests
let sessions = try SessionManager(configuration: configuration)

// 2. A request context with sessions (`MemcachedSessionRequestContext`) and, for hummingbird-auth,
//    an identity (`AuthRequestContext`); `BasicMemcachedSessionRequestContext` has sessions only.
struct User: Sendable {
    var name: String
}

struct AppContext: MemcachedSessionRequestContext, AuthRequestContext {
    var coreContext: CoreRequestContextStorage
    var memcachedSessions = RequestSessions()
    var identity: User?
    init(source: ApplicationRequestContextSource) { coreContext = .init(source: source) }
}

let router = Router(context: AppContext.self)
router.add(middleware: MemcachedSessionMiddleware(manager: sessions))
// hummingbird-auth: the user whose id the session holds becomes `context.identity`.
router.add(middleware: MemcachedSessionAuthenticator(context: AppContext.self) { (id: String, _) in User(name: id) })

router.get("counter") { _, context -> String in
    // Loaded on first use; routes that never ask cost no memcached round trip.
    let session = try await context.memcachedSessions.loadOrCreate()
    let count = (session["count", as: Int.self] ?? 0) + 1
    try session.set("count", count)  // only a changed session is written back
    return "\(count)"
}

router.post("login") { _, context -> String in
    // The user's id in the session, and a new session id (against session fixation).
    try await context.memcachedSessions.logIn(userID: "alice")
    return "welcome"
}

router.get("me") { _, context -> String in
    try context.requireIdentity().name  // 401 when nobody is logged in
}

router.post("logout") { _, context -> String in
    try await context.memcachedSessions.logOut()  // every copy goes, the cookie is cleared
    return "bye"
}

// 3. The manager runs as a service of the application: graceful shutdown flushes its writes.
//    `.http1OnChannelEventLoop()`: each connection's requests run on its channel's event loop,
//    with the memcached replies they wait for (no thread hop; handlers must not block).
let app = Application(
    router: router,
    server: .http1OnChannelEventLoop(),
    configuration: .init(address: .hostname("127.0.0.1", port: 8080)),
    services: [sessions]
)
try await app.runService()
// snippet.hide
#endif

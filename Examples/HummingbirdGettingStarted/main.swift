#if Hummingbird
import Hummingbird
import MemcachedSessionsHummingbird

// 1. The session manager: your memcached nodes (`n1:host:port`, spaces or commas), sticky or not.
var configuration = try SessionManager.Configuration(nodes: "n1:127.0.0.1:11211 n2:127.0.0.1:11212")
configuration.mode = .nonSticky  // or .sticky, with `configuration.route = "app1"` (MSM's jvmRoute)
configuration.locking.mode = .none  // .all, .auto or .uriPattern("/cart/.*") against concurrent requests
let sessions = try SessionManager(configuration: configuration)

// 2. A request context with sessions (or add `var sessions = RequestSessions()` to your own
//    context, conforming it to `MemcachedSessionRequestContext`), and the middleware.
let router = Router(context: BasicMemcachedSessionRequestContext.self)
router.add(middleware: MemcachedSessionMiddleware(manager: sessions))

router.get("counter") { _, context -> String in
    // Loaded on first use; routes that never ask cost no memcached round trip.
    let session = try await context.sessions.loadOrCreate()
    let count = (session["count", as: Int.self] ?? 0) + 1
    try session.set("count", count)  // only a changed session is written back
    return "\(count)"
}

router.post("login") { _, context -> String in
    let session = try await context.sessions.loadOrCreate()
    try await context.sessions.regenerateID()  // a new id after login (session fixation)
    try session.set("user", "alice")
    return "welcome"
}

router.post("logout") { _, context -> String in
    try await context.sessions.invalidate()  // every copy goes, the cookie is cleared
    return "bye"
}

// 3. The manager runs as a service of the application: graceful shutdown flushes its writes.
let app = Application(
    router: router,
    configuration: .init(address: .hostname("127.0.0.1", port: 8080)),
    services: [sessions]
)
try await app.runService()
#endif

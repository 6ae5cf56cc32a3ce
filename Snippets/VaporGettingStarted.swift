// snippet.hide
#if Vapor
// snippet.show
import MemcachedSessionsVapor
import Vapor

let app = try await Application.make(.detect())

// 1. The session manager: your memcached nodes (`n1:host:port`, spaces or commas), sticky or not.
var configuration = try SessionManager.Configuration(nodes: "n1:127.0.0.1:11211 n2:127.0.0.1:11212")
configuration.mode = .nonSticky  // or .sticky, with `configuration.route = "app1"` (MSM's jvmRoute)
let sessions = try SessionManager(configuration: configuration)
SessionManagerLifecycle.register(sessions, on: app)  // runs it; shutdown flushes it

// 2a. Our middleware: no memcached write for an unchanged session, `Set-Cookie` only when the id
//     changes, locking, 503 (never a silent logout) when memcached cannot be reached.
let counted = app.grouped(MemcachedSessionsMiddleware(manager: sessions))
counted.get("counter") { req async throws -> String in
    let session = try await req.memcachedSessions.loadOrCreate()
    let count = (session["count", as: Int.self] ?? 0) + 1
    try session.set("count", count)
    return "\(count)"
}

// 2b. Or keep Vapor's own session API (`req.session`, session authentication) on memcached, as
//     Vapor's `.memory` is used (the driver, its cookie, the manager's lifecycle once).
app.sessions.use(.memcached(sessions))
let classic = app.grouped(app.sessions.noStoreMiddleware)
classic.get("visits") { req -> String in
    let visits = (req.session.data["visits"].flatMap(Int.init) ?? 0) + 1
    req.session.data["visits"] = String(visits)
    return "\(visits)"
}

try await app.execute()
try await app.asyncShutdown()
// snippet.hide
#endif

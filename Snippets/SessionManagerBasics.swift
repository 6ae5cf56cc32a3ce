// The session manager without a web framework: what an adapter does for each request.
import MemcachedSessions

var configuration = try SessionManager.Configuration(nodes: "n1:127.0.0.1:21211 n2:127.0.0.1:21212")
configuration.mode = .nonSticky  // or .sticky (with `route`, MSM's jvmRoute)
configuration.locking.mode = .none  // .all, .auto, .uriPattern("/cart/.*")
let manager = try SessionManager(configuration: configuration)  // a Service: run it in your ServiceGroup

// snippet.hide
let cookieValue: String? = nil
// snippet.show
let access = manager.beginRequest(path: "/counter", sessionCookie: cookieValue)
let session = try await access.loadOrCreate()  // loaded on first use
let count = (session["count", as: Int.self] ?? 0) + 1
try session.set("count", count)
let action = try await manager.endRequest(access)  // .unchanged, .set(newID) or .clear
// snippet.hide
print(action)

#if Vapor
import AsyncHTTPClient
import Memcached
import MemcachedSessionsVapor
import MemcachedTestRig
import NIOCore
import NIOHTTP1
import Testing
import Vapor

func nodes(_ servers: [MemcachedServer]) -> String { servers.nodeList }

func makeManager(
    _ servers: [MemcachedServer], _ configure: (inout SessionManager.Configuration) -> Void = { _ in }
) throws -> SessionManager {
    var configuration = try SessionManager.Configuration(nodes: nodes(servers))
    configuration.memcached.probeInterval = .milliseconds(100)
    configuration.memcached.requestTimeout = .milliseconds(500)
    configure(&configuration)
    return try SessionManager(configuration: configuration)
}

struct Boom: Error {}

/// A response as the tests need it.
struct Reply {
    var status: Int
    var body: String
    var setCookies: [String]
    var cacheControl: String? = nil

    var sessionCookie: String? {
        for header in setCookies {
            let pair = header.split(separator: ";", maxSplits: 1)[0]
            if pair.hasPrefix("SESSION_ID=") { return String(pair.dropFirst("SESSION_ID=".count)) }
        }
        return nil
    }
}

/// Runs `configure`d Vapor app on a real port on 127.0.0.1 and gives `body` a GET function.
func withVaporApp(
    manager: SessionManager, _ configure: (Application) throws -> Void,
    _ body: (_ get: @escaping @Sendable (String, String?) async throws -> Reply) async throws -> Void
) async throws {
    try await withVaporServer(manager: manager, configure) { port in
        let client = HTTPClient(eventLoopGroupProvider: .singleton)
        do {
            try await body { path, cookie in
                var request = HTTPClientRequest(url: "http://127.0.0.1:\(port)\(path)")
                if let cookie { request.headers.add(name: "Cookie", value: "SESSION_ID=\(cookie)") }
                let response = try await client.execute(request, timeout: .seconds(10))
                let bytes = try await response.body.collect(upTo: 1 << 20)
                return Reply(
                    status: Int(response.status.code), body: String(buffer: bytes), setCookies: response.headers["Set-Cookie"],
                    cacheControl: response.headers.first(name: "Cache-Control"))
            }
        } catch {
            try? await client.shutdown()
            throw error
        }
        try await client.shutdown()
    }
}

/// Runs `configure`d Vapor app on a real port on 127.0.0.1 and gives `body` the port.
func withVaporServer(
    manager: SessionManager, _ configure: (Application) throws -> Void, _ body: (_ port: Int) async throws -> Void
) async throws {
    let app = try await Application.make(.testing)
    app.logger.logLevel = .warning
    app.http.server.configuration.reportMetrics = false
    SessionManagerLifecycle.register(manager, on: app)
    try configure(app)
    try await app.asyncBoot()  // runs the manager (SessionManagerLifecycle.didBootAsync)
    do {
        try await app.server.start(address: .hostname("127.0.0.1", port: 0))
        try await body(try #require(app.http.server.shared.localAddress?.port))
    } catch {
        await app.server.shutdown()
        try? await app.asyncShutdown()
        throw error
    }
    await app.server.shutdown()
    try await app.asyncShutdown()  // stops the manager (SessionManagerLifecycle.shutdownAsync)
}

func commandCount(_ manager: SessionManager, _ names: [String]) async throws -> Int {
    var total = 0
    for node in manager.client.allNodes {
        let stats = try await node.stats()
        total += names.map { name in Int(stats.first { $0.name == name }?.value ?? "0") ?? 0 }.reduce(0, +)
    }
    return total
}

@Suite("Vapor adapter over real HTTP and real memcached", .serialized)
struct VaporAdapterTests {
    /// A load balancer's health check, through Vapor's global middleware: 200 while a session can
    /// be served, 503 once no node can take one; no details, no cookie.
    @Test func theHealthCheckSaysWhetherASessionCanBeServed() async throws {
        try await withMemcachedServers(count: 1) { servers in
            let manager = try makeManager(servers) { $0.memcached.failureThreshold = 1 }
            try await withVaporApp(manager: manager, { app in
                app.middleware.use(MemcachedSessionsMiddleware(manager: manager))
                app.get("counter") { req async throws -> String in
                    try await req.memcachedSessions.loadOrCreate().set("count", 1)
                    return "1"
                }
            }) { get in
                let healthy = try await get("/_msm/health", nil)
                #expect(healthy.status == 200 && healthy.body == "ok\n" && healthy.setCookies.isEmpty)
                try await servers[0].kill()
                _ = try await get("/counter", nil)  // finds n1 down
                try await eventually("the health check reports it") { try await get("/_msm/health", nil).status == 503 }
                #expect(try await get("/_msm/health", nil).body == "unavailable\n", "no details")
            }
        }
    }

    /// The management endpoints and the metrics page as route groups (no placeholder routes):
    /// through real HTTP, with the token, with a wrong one, and a change of the settings.
    @Test func theManagementRoutesServeTheStatusAndTheSettings() async throws {
        try await withMemcachedServers(count: 1) { servers in
            let manager = try makeManager(servers)
            let token = "0123456789abcdef-token"
            try await withVaporServer(manager: manager, { app in
                app.sessionManagement(try ManagementEndpoints(manager: manager, token: token, instance: "vapor-test"))
                app.metrics(MetricsPage(token: token) { "msm_writes_total 0\n" })
            }) { port in
                let client = HTTPClient(eventLoopGroupProvider: .singleton)
                defer { _ = client.shutdown() }
                func send(_ method: NIOHTTP1.HTTPMethod, _ path: String, token: String?, body: String? = nil) async throws -> Reply {
                    var request = HTTPClientRequest(url: "http://127.0.0.1:\(port)\(path)")
                    request.method = method
                    if let token { request.headers.add(name: "Authorization", value: "Bearer \(token)") }
                    if let body { request.body = .bytes(ByteBuffer(string: body)) }
                    let response = try await client.execute(request, timeout: .seconds(10))
                    let bytes = try await response.body.collect(upTo: 1 << 20)
                    return Reply(status: Int(response.status.code), body: String(buffer: bytes), setCookies: [])
                }
                for path in ["/_msm", "/_msm/", "/_msm/status", "/_msm/config", "/metrics"] {
                    #expect(try await send(.GET, path, token: nil).status == 401, "\(path) without the token")
                    #expect(try await send(.GET, path, token: "wrong-token-0123456789").status == 401)
                    #expect(try await send(.GET, path, token: token).status == 200, "\(path) with the token")
                }
                #expect(try await send(.GET, "/_msm/", token: token).body.contains("vapor-test"))
                #expect(try await send(.GET, "/_msm/status", token: token).body.contains(#""instance":"vapor-test""#))
                let changed = try await send(.PUT, "/_msm/config", token: token, body: #"{"locking":"all"}"#)
                #expect(changed.status == 200)
                #expect(manager.lockingMode == .all)
                #expect(try await send(.GET, "/_msm/nothing", token: token).status == 404)
                // Revoking a principal: behind the token, POST only, a count in JSON.
                #expect(try await send(.POST, "/_msm/principals/revoke", token: nil, body: #"{"principal":"alice"}"#).status == 401)
                let revoked = try await send(.POST, "/_msm/principals/revoke", token: token, body: #"{"principal":"alice"}"#)
                #expect(revoked.status == 200)
                #expect(revoked.body == #"{"ended":0}"#)
                #expect(try await send(.POST, "/_msm/principals/revoke", token: token, body: "alice").status == 400)
            }
        }
    }

    /// `app.sessions.use(.memcached(manager))`, as Vapor's `.memory` is used: `req.session` in
    /// memcached, the cookie the manager's, the lifecycle registered once (the test's own set-up
    /// registered it too). Vapor's `Session` and `SessionID` need no qualification beside ours.
    @Test func theProviderPutsVaporsOwnSessionsInMemcached() async throws {
        try await withMemcachedServers(count: 2) { servers in
            let manager = try makeManager(servers)
            try await withVaporApp(manager: manager) { app in
                app.middleware = Middlewares()
                app.sessions.use(.memcached(manager))
                app.grouped(app.sessions.middleware).get("visits") { req -> String in
                    let session: Session = req.session
                    let visits = (session.data["visits"].flatMap(Int.init) ?? 0) + 1
                    session.data["visits"] = String(visits)
                    let ours: MemcachedSessionID? = session.id.flatMap { (id: SessionID) in MemcachedSessionID(parsing: id.string) }
                    return "\(visits) \(ours == nil ? "-" : "memcached")"
                }
            } _: { get in
                let first = try await get("/visits", nil)
                #expect(first.body == "1 -")
                let cookie = try #require(first.sessionCookie)
                #expect(MemcachedSessionID(parsing: cookie) != nil, "one of our ids")
                #expect(first.setCookies.first.map { !$0.contains("Expires") } == true)
                #expect(try await get("/visits", cookie).body == "2 memcached")
                #expect(try await get("/visits", cookie).body == "3 memcached")
                #expect(manager.statistics.value(of: .sessionsLoaded) >= 2, "read from memcached")
            }
        }
    }

    @Test(arguments: [SessionManager.Mode.nonSticky, .sticky])
    func middlewareCountsAndSetsTheCookieOnlyWhenTheIDChanges(mode: SessionManager.Mode) async throws {
        try await withMemcachedServers(count: 2) { servers in
            let manager = try makeManager(servers) {
                $0.mode = mode
                $0.route = mode == .sticky ? "v1" : nil
            }
            try await withVaporApp(manager: manager) { app in
                app.middleware = Middlewares()
                let sessions = app.grouped(MemcachedSessionsMiddleware(manager: manager))
                addCounterRoute(sessions)
            } _: { get in
                let first = try await get("/counter", nil)
                #expect(first.body == "1")
                let header = try #require(first.setCookies.first)
                #expect(header.contains("HttpOnly") && header.contains("; Secure") && !header.contains("Expires"))
                #expect(first.cacheControl == "no-store", "a response that sets the cookie is not cached")
                let cookie = try #require(first.sessionCookie)
                for expected in 2...4 {
                    let next = try await get("/counter", cookie)
                    #expect(next.body == "\(expected)")
                    #expect(next.setCookies.isEmpty, "no Set-Cookie when the id is unchanged")
                    #expect(next.cacheControl == nil)
                }
            }
        }
    }

    /// Several `Cookie` headers, over real HTTP: looked at in order, the first session cookie
    /// found counts, wherever it is.
    @Test func theSessionCookieIsFoundInAnyOfSeveralCookieHeaders() async throws {
        try await withMemcachedServers(count: 2) { servers in
            let manager = try makeManager(servers)
            try await withVaporServer(manager: manager) { app in
                app.middleware = Middlewares()
                addCounterRoute(app.grouped(MemcachedSessionsMiddleware(manager: manager)))
            } _: { port in
                let client = HTTPClient(eventLoopGroupProvider: .singleton)
                func counter(_ cookies: [String]) async throws -> (body: String, setCookies: [String]) {
                    var request = HTTPClientRequest(url: "http://127.0.0.1:\(port)/counter")
                    for cookie in cookies { request.headers.add(name: "Cookie", value: cookie) }
                    let response = try await client.execute(request, timeout: .seconds(10))
                    return (String(buffer: try await response.body.collect(upTo: 1 << 20)), response.headers["Set-Cookie"])
                }
                do {
                    let first = try await counter([])
                    let pair = try #require(first.setCookies.first?.split(separator: ";").first)
                    #expect(first.body == "1")
                    let second = try await counter(["other=1", String(pair)])
                    #expect(second.body == "2", "found in the second header")
                    let third = try await counter(["x=y; SESSION_ID=unknown", String(pair)])
                    #expect(third.body == "1", "the first header's session cookie counts: an unknown id, a new session")
                } catch {
                    try? await client.shutdown()
                    throw error
                }
                try await client.shutdown()
            }
        }
    }

    @Test func aThrowingRouteStillSavesAndReleasesTheLockAndADeadStoreIsA503() async throws {
        try await withMemcachedServers(count: 1) { servers in
            let manager = try makeManager(servers) {
                $0.locking.mode = .all
                $0.locking.waitBudget = .milliseconds(300)
            }
            try await withVaporApp(manager: manager) { app in
                app.middleware = Middlewares()
                app.middleware.use(ErrorMiddleware.default(environment: app.environment))
                let sessions = app.grouped(MemcachedSessionsMiddleware(manager: manager))
                addCounterRoute(sessions)
                sessions.get("fail") { req async throws -> String in
                    let session = try await req.memcachedSessions.loadOrCreate()
                    try session.set("count", (session["count", as: Int.self] ?? 0) + 100)
                    throw Boom()
                }
            } _: { get in
                let cookie = try #require(try await get("/counter", nil).sessionCookie)
                #expect(try await get("/fail", cookie).status == 500)
                let next = try await get("/counter", cookie)
                #expect(next.status == 200)
                #expect(next.body == "102", "saved though the route threw, and the lock released")
                try await servers[0].kill()
                let dead = try await get("/counter", cookie)
                #expect(dead.status == 503)
                #expect(dead.setCookies.isEmpty)
            }
        }
    }

    @Test func vaporsOwnSessionsMiddlewareWorksAndWritesOnlyChanges() async throws {
        try await withMemcachedServers(count: 2) { servers in
            let manager = try makeManager(servers)
            try await withVaporApp(manager: manager) { app in
                app.middleware = Middlewares()
                app.sessions.use { _ in MemcachedSessionDriver(manager: manager) }
                app.sessions.configuration = MemcachedSessionDriver.sessionsConfiguration()
                let sessions = app.grouped(app.sessions.noStoreMiddleware)
                sessions.get("counter") { req -> String in
                    let count = (req.session.data["count"].flatMap(Int.init) ?? 0) + 1
                    req.session.data["count"] = String(count)
                    return String(count)
                }
                sessions.get("read") { req -> String in
                    req.session.data["count"] ?? "0"
                }
                sessions.get("logout") { req -> String in
                    req.session.destroy()
                    return "bye"
                }
            } _: { get in
                let first = try await get("/counter", nil)
                #expect(first.body == "1")
                let cookie = try #require(first.sessionCookie)
                #expect(!(first.setCookies.first ?? "").contains("Expires"), "the cookie factory formats no date")
                #expect(first.cacheControl == "no-store", "a response that sets the cookie is not cached")
                #expect(try await get("/counter", cookie).body == "2")
                // Vapor's middleware calls updateSession on every request; unchanged data is not written.
                let setsBefore = try await commandCount(manager, ["cmd_set"])
                let skippedBefore = manager.statistics.value(of: .writesSkipped)
                for _ in 0..<10 { #expect(try await get("/read", cookie).body == "2") }
                #expect(try await commandCount(manager, ["cmd_set"]) == setsBefore)
                #expect(manager.statistics.value(of: .writesSkipped) - skippedBefore == 10)
                // Logout through Vapor's session API removes it (and clears the cookie, not cached).
                let logout = try await get("/logout", cookie)
                #expect(logout.cacheControl == "no-store")
                #expect(try await get("/read", cookie).body == "0")
            }
        }
    }

    /// The getting-started mix: typed attributes through our middleware, strings through Vapor's
    /// `req.session`, on the same session. Vapor's `SessionData` shows only strings; whatever it
    /// cannot show must survive its request (it used to be deleted: `count` was lost).
    @Test func attributesVaporCannotShowSurviveItsRequests() async throws {
        try await withMemcachedServers(count: 2) { servers in
            let manager = try makeManager(servers)
            try await withVaporApp(manager: manager) { app in
                app.middleware = Middlewares()
                app.sessions.use { _ in MemcachedSessionDriver(manager: manager) }
                app.sessions.configuration = MemcachedSessionDriver.sessionsConfiguration()
                app.grouped(MemcachedSessionsMiddleware(manager: manager)).get("counter") { req async throws -> String in
                    let session = try await req.memcachedSessions.loadOrCreate()
                    let count = (session["count", as: Int.self] ?? 0) + 1
                    try session.set("count", count)
                    return "\(count)"
                }
                let classic = app.grouped(app.sessions.middleware)
                classic.get("visits") { req -> String in
                    let visits = (req.session.data["visits"].flatMap(Int.init) ?? 0) + 1
                    req.session.data["visits"] = String(visits)
                    req.session.data["note"] = nil
                    return "\(visits)"
                }
                classic.get("note") { req -> String in
                    req.session.data["note"] = "kept"
                    return "ok"
                }
            } _: { get in
                let first = try await get("/counter", nil)
                let cookie = try #require(first.sessionCookie)
                #expect(try await get("/counter", cookie).body == "2")
                #expect(try await get("/note", cookie).body == "ok")
                #expect(try await get("/visits", cookie).body == "1")
                #expect(try await get("/visits", cookie).body == "2")
                #expect(try await get("/counter", cookie).body == "3", "the typed count survived Vapor's requests")
                // A string Vapor showed and the route removed is removed.
                let access = manager.beginRequest(path: "/inspect", sessionCookie: cookie)
                let session = try #require(try await access.load())
                #expect(session["note", as: String.self] == nil)
                #expect(session["visits", as: String.self] == "2")
                _ = try await manager.endRequest(access)
            }
        }
    }

    /// A route that regenerates the id (the old copies are deleted before the response) and then
    /// throws: the error response still carries the new cookie.
    @Test func anErrorResponseCarriesTheSessionCookie() async throws {
        try await withMemcachedServers(count: 2) { servers in
            let manager = try makeManager(servers)
            try await withVaporApp(manager: manager) { app in
                let sessions = app.grouped(MemcachedSessionsMiddleware(manager: manager))
                sessions.get("counter") { req async throws -> String in
                    let session = try await req.memcachedSessions.loadOrCreate()
                    let count = (session["count", as: Int.self] ?? 0) + 1
                    try session.set("count", count)
                    return "\(count)"
                }
                sessions.get("read") { req async throws -> String in
                    String(try await req.memcachedSessions.load()?["count", as: Int.self] ?? 0)
                }
                sessions.get("login-then-fail") { req async throws -> String in
                    try await req.memcachedSessions.regenerateID()
                    throw Abort(.forbidden, reason: "second factor required")
                }
                sessions.get("create-then-fail") { req async throws -> String in
                    try await req.memcachedSessions.loadOrCreate().set("count", 7)
                    throw Boom()
                }
            } _: { get in
                let old = try #require(try await get("/counter", nil).sessionCookie)
                let failed = try await get("/login-then-fail", old)
                #expect(failed.status == 403, "the route's own error response")
                let new = try #require(failed.sessionCookie, "the new id reaches the browser")
                #expect(new != old)
                #expect(try await get("/read", new).body == "1")
                #expect(try await get("/read", old).body == "0", "the old id is dead")
                let fresh = try await get("/create-then-fail", nil)
                #expect(fresh.status == 500 && fresh.cacheControl == "no-store")
                let freshCookie = try #require(fresh.sessionCookie)
                #expect(try await get("/read", freshCookie).body == "7")
            }
        }
    }

    @Test func ignoredPathsNeverTouchMemcached() async throws {
        try await withMemcachedServers(count: 1) { servers in
            let manager = try makeManager(servers) { $0.ignoredPathPattern = #".*\.css$"# }
            try await withVaporApp(manager: manager) { app in
                app.middleware = Middlewares()
                let sessions = app.grouped(MemcachedSessionsMiddleware(manager: manager))
                addCounterRoute(sessions)
                sessions.get("site.css") { req -> String in
                    req.memcachedSessions.access == nil ? "no session machinery" : "sessions attached"
                }
            } _: { get in
                let cookie = try #require(try await get("/counter", nil).sessionCookie)
                let before = try await commandCount(manager, ["cmd_get", "cmd_set", "cmd_touch"])
                for _ in 0..<5 {
                    let css = try await get("/site.css", cookie)
                    #expect(css.body == "no session machinery")
                    #expect(css.setCookies.isEmpty)
                }
                #expect(try await commandCount(manager, ["cmd_get", "cmd_set", "cmd_touch"]) == before)
            }
        }
    }
}

/// `GET /counter`: adds one to the session's count and answers it.
func addCounterRoute(_ routes: some RoutesBuilder) {
    routes.get("counter") { req async throws -> String in
        let session = try await req.memcachedSessions.loadOrCreate()
        let count = (session["count", as: Int.self] ?? 0) + 1
        try session.set("count", count)
        return String(count)
    }
}
#endif

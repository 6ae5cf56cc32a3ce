#if Hummingbird
import HTTPTypes
import Hummingbird
import HummingbirdAuth
import HummingbirdTesting
import Memcached
import MemcachedSessions
import MemcachedSessionsHummingbird
import MemcachedTestRig
import NIOCore
import Testing

typealias Context = BasicMemcachedSessionRequestContext

/// The first `name=value` of each Set-Cookie header, and the attributes of the first one.
func setCookies(_ response: TestResponse) -> [String] {
    response.headers[values: .setCookie]
}

func sessionCookie(_ response: TestResponse, name: String = "SESSION_ID") -> String? {
    for header in setCookies(response) {
        let pair = header.split(separator: ";", maxSplits: 1)[0]
        if pair.hasPrefix("\(name)=") { return String(pair.dropFirst(name.count + 1)) }
    }
    return nil
}

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

func counterApp(_ manager: SessionManager, cookie: SessionCookie = .default) -> some ApplicationProtocol {
    let router = Router(context: Context.self)
    router.get("hello") { _, _ in "hello" }
    let group = router.group().add(middleware: MemcachedSessionMiddleware<Context>(manager: manager, cookie: cookie))
    group.get("counter") { _, context -> String in
        let session = try await context.memcachedSessions.loadOrCreate()
        let count = (session["count", as: Int.self] ?? 0) + 1
        try session.set("count", count)
        return String(count)
    }
    group.get("read") { _, context -> String in
        String(try await context.memcachedSessions.load()?["count", as: Int.self] ?? 0)
    }
    group.get("static/site.css") { _, context -> String in
        context.memcachedSessions.access == nil ? "no session machinery" : "sessions attached"
    }
    group.get("fail-after-change") { _, context -> String in
        let session = try await context.memcachedSessions.loadOrCreate()
        try session.set("count", (session["count", as: Int.self] ?? 0) + 100)
        throw Boom()
    }
    group.get("logout") { _, context -> String in
        try await context.memcachedSessions.invalidate()
        return "bye"
    }
    group.get("login-then-fail") { _, context -> String in
        try await context.memcachedSessions.regenerateID()
        throw HTTPError(.forbidden, message: "second factor required")
    }
    group.get("visit") { _, context -> String in
        // Opens a session and puts nothing in it.
        _ = try await context.memcachedSessions.loadOrCreate()
        return "visited"
    }
    group.get("create-then-fail") { _, context -> String in
        try await context.memcachedSessions.loadOrCreate().set("count", 7)
        throw Boom()
    }
    return Application(router: router, services: [manager])
}

@Suite("Hummingbird adapter over real HTTP and real memcached", .serialized)
struct HummingbirdAdapterTests {
    @Test(arguments: [SessionManager.Mode.nonSticky, .sticky])
    func countsAndSetsTheCookieOnlyWhenTheIDChanges(mode: SessionManager.Mode) async throws {
        try await withMemcachedServers(count: 2) { servers in
            let manager = try makeManager(servers) {
                $0.mode = mode
                $0.route = mode == .sticky ? "a1" : nil
            }
            try await counterApp(manager).test(.live) { client in
                let first = try await client.execute(uri: "/counter", method: .get)
                #expect(String(buffer: first.body) == "1")
                let header = try #require(setCookies(first).first)
                #expect(header.contains("; Path=/") && header.contains("; HttpOnly") && header.contains("; SameSite=Lax"))
                #expect(!header.contains("Expires"), "no date formatted per response")
                let cookie = try #require(sessionCookie(first))
                #expect(MemcachedSessionID(parsing: cookie) != nil)
                for expected in 2...5 {
                    let response = try await client.execute(uri: "/counter", method: .get, headers: [.cookie: "SESSION_ID=\(cookie)"])
                    #expect(String(buffer: response.body) == "\(expected)")
                    #expect(setCookies(response).isEmpty, "unchanged id: no Set-Cookie")
                }
                let read = try await client.execute(uri: "/read", method: .get, headers: [.cookie: "other=1; SESSION_ID=\(cookie); x=y"])
                #expect(String(buffer: read.body) == "5")
                // Logout clears the cookie; the old id is gone.
                let logout = try await client.execute(uri: "/logout", method: .get, headers: [.cookie: "SESSION_ID=\(cookie)"])
                #expect(setCookies(logout).first?.contains("Max-Age=0") == true)
                let after = try await client.execute(uri: "/read", method: .get, headers: [.cookie: "SESSION_ID=\(cookie)"])
                #expect(String(buffer: after.body) == "0")
                #expect(client.port != nil, "a real port")
            }
        }
    }

    /// Several `Cookie` fields, as HTTP/2 may send (over HTTP/1 the client joins them into one
    /// header, so this goes through the router directly): looked at in order, the first session
    /// cookie found counts, as in the fields joined into one header.
    @Test func theSessionCookieIsFoundInAnyOfSeveralCookieFields() async throws {
        try await withMemcachedServers(count: 2) { servers in
            let manager = try makeManager(servers)
            try await counterApp(manager).test(.router) { client in
                let first = try await client.execute(uri: "/counter", method: .get)
                let cookie = try #require(sessionCookie(first))
                let split = try await client.execute(
                    uri: "/read", method: .get,
                    headers: HTTPFields([.init(name: .cookie, value: "other=1"), .init(name: .cookie, value: "SESSION_ID=\(cookie)")]))
                #expect(String(buffer: split.body) == "1")
                let firstWins = try await client.execute(
                    uri: "/read", method: .get,
                    headers: HTTPFields([
                        .init(name: .cookie, value: "x=y; SESSION_ID=unknown"), .init(name: .cookie, value: "SESSION_ID=\(cookie)"),
                    ]))
                #expect(String(buffer: firstWins.body) == "0")
            }
        }
    }

    /// `HTTPServerBuilder.http1OnChannelEventLoop()`: a connection's task runs on its channel's
    /// event loop from its first request, before any middleware (`/where`, between requests that
    /// made memcached round trips); Hummingbird's own `.http1()` (the control) runs it elsewhere
    /// (the tests run Swift's default global executor), so this fails if the builder binds
    /// nothing. Behind the middleware the handler is on the loop either way (it moves it there),
    /// before and after its session's round trip.
    @Test(arguments: [true, false])
    func connectionTasksRunOnTheirChannelsEventLoop(bound: Bool) async throws {
        try await withMemcachedServers(count: 2) { servers in
            let manager = try makeManager(servers)
            let router = Router(context: Context.self)
            // Before any middleware: where Hummingbird runs the connection's requests.
            router.get("where") { _, context -> String in
                context.channelEventLoop?.inEventLoop == true ? "loop" : "elsewhere"
            }
            let sessions = router.group().add(middleware: MemcachedSessionMiddleware<Context>(manager: manager))
            sessions.get("counter") { _, context -> String in
                let before = context.channelEventLoop?.inEventLoop == true
                let session = try await context.memcachedSessions.loadOrCreate()
                try session.set("count", (session["count", as: Int.self] ?? 0) + 1)
                // After the load's round trip: still on the loop.
                return before && context.channelEventLoop?.inEventLoop == true ? "loop" : "elsewhere"
            }
            let app = Application(router: router, server: bound ? .http1OnChannelEventLoop() : .http1(), services: [manager])
            try await app.test(.live) { client in
                var cookie: String?
                for _ in 0..<5 {
                    let place = try await client.execute(uri: "/where", method: .get)
                    #expect(String(buffer: place.body) == (bound ? "loop" : "elsewhere"))
                    let counted = try await client.execute(
                        uri: "/counter", method: .get, headers: cookie.map { [.cookie: "SESSION_ID=\($0)"] } ?? [:])
                    cookie = cookie ?? sessionCookie(counted)
                    // The middleware moves the handler to the loop either way.
                    #expect(String(buffer: counted.body) == "loop")
                }
                let count = try await client.execute(uri: "/counter", method: .get, headers: [.cookie: "SESSION_ID=\(try #require(cookie))"])
                #expect(String(buffer: count.body) == "loop")
            }
        }
    }

    /// A load balancer's health check: 200 while a session can be served, 503 once no node can
    /// take one (non-sticky, its only node killed), no details; answered by the middleware added
    /// to the router, without a route of its own, and not at all when turned off.
    /// The manager's configuration names the cookie (`configuration.cookie`); a middleware given
    /// one of its own uses that one.
    @Test func theCookieComesFromTheManagersConfigurationUnlessGiven() async throws {
        try await withMemcachedServers(count: 1) { servers in
            let configured = try SessionCookie(name: "sid", path: "/")
            let manager = try makeManager(servers) { $0.cookie = configured }
            let router = Router(context: Context.self)
            router.add(middleware: MemcachedSessionMiddleware<Context>(manager: manager))
            router.get("counter") { _, context -> String in
                try await context.memcachedSessions.loadOrCreate().set("count", 1)
                return "1"
            }
            try await Application(router: router, services: [manager]).test(.live) { client in
                let response = try await client.execute(uri: "/counter", method: .get)
                #expect(sessionCookie(response, name: "sid") != nil, "\(setCookies(response))")
                #expect(sessionCookie(response) == nil, "not the default name")
            }
            let given = try SessionCookie(name: "other")
            #expect(MemcachedSessionMiddleware<Context>(manager: manager, cookie: given).cookie == given)
            #expect(MemcachedSessionMiddleware<Context>(manager: manager).cookie == configured)
        }
    }

    @Test func theHealthCheckSaysWhetherASessionCanBeServed() async throws {
        try await withMemcachedServers(count: 1) { servers in
            let manager = try makeManager(servers) { $0.memcached.failureThreshold = 1 }
            let router = Router(context: Context.self)
            router.add(middleware: MemcachedSessionMiddleware<Context>(manager: manager))
            router.get("counter") { _, context -> String in
                try await context.memcachedSessions.loadOrCreate().set("count", 1)
                return "1"
            }
            try await Application(router: router, services: [manager]).test(.live) { client in
                let healthy = try await client.execute(uri: "/_msm/health", method: .get)
                #expect(healthy.status == .ok)
                #expect(String(buffer: healthy.body) == "ok\n")
                #expect(healthy.headers[.cacheControl] == "no-store")
                #expect(setCookies(healthy).isEmpty)
                #expect(try await client.execute(uri: "/_msm/health", method: .head).status == .ok)
                try await servers[0].kill()
                _ = try await client.execute(uri: "/counter", method: .get)  // finds n1 down
                try await eventually("the health check reports it") {
                    try await client.execute(uri: "/_msm/health", method: .get).status == .serviceUnavailable
                }
                let down = try await client.execute(uri: "/_msm/health", method: .get)
                #expect(String(buffer: down.body) == "unavailable\n", "no details")
                try await servers[0].restart()
                try await eventually("healthy again") {
                    try await client.execute(uri: "/_msm/health", method: .get).status == .ok
                }
            }
            let off = Router(context: Context.self)
            off.add(middleware: MemcachedSessionMiddleware<Context>(manager: try makeManager(servers), healthPath: nil))
            try await Application(router: off).test(.router) { client in
                let response = try await client.execute(uri: "/_msm/health", method: .get)
                #expect(response.status == .notFound)
            }
        }
    }

    /// The management endpoints and the metrics page as route groups (no placeholder routes):
    /// through real HTTP, with the token, with a wrong one, and a change of the settings.
    @Test func theManagementRoutesServeTheStatusAndTheSettings() async throws {
        try await withMemcachedServers(count: 1) { servers in
            let manager = try makeManager(servers)
            let token = "0123456789abcdef-token"
            let router = Router(context: Context.self)
            router.addSessionManagement(try ManagementEndpoints(manager: manager, token: token, instance: "hb-test"))
            router.addMetrics(MetricsPage(token: token) { "msm_writes_total 0\n" })
            try await Application(router: router, services: [manager]).test(.live) { client in
                let bearer: HTTPFields = [.authorization: "Bearer \(token)"]
                for path in ["/_msm", "/_msm/", "/_msm/status", "/_msm/config", "/metrics"] {
                    let denied = try await client.execute(uri: path, method: .get)
                    #expect(denied.status == .unauthorized, "\(path) without the token")
                    #expect(denied.headers[.wwwAuthenticate] == "Bearer")
                    let allowed = try await client.execute(uri: path, method: .get, headers: bearer)
                    #expect(allowed.status == .ok, "\(path) with the token")
                    #expect(allowed.headers[.cacheControl] == "no-store")
                }
                let page = try await client.execute(uri: "/_msm/", method: .get, headers: bearer)
                #expect(String(buffer: page.body).contains("hb-test") && page.headers[.contentType]?.hasPrefix("text/html") == true)
                let status = try await client.execute(uri: "/_msm/status", method: .get, headers: bearer)
                #expect(String(buffer: status.body).contains(#""instance":"hb-test""#))
                let changed = try await client.execute(
                    uri: "/_msm/config", method: .put, headers: bearer, body: ByteBuffer(string: #"{"locking":"all"}"#))
                #expect(changed.status == .ok)
                #expect(manager.lockingMode == .all)
                #expect(try await client.execute(uri: "/_msm/nothing", method: .get, headers: bearer).status == .notFound)
                // Revoking a principal: behind the token, POST only, a count in JSON.
                let body = ByteBuffer(string: #"{"principal":"alice"}"#)
                #expect(try await client.execute(uri: "/_msm/principals/revoke", method: .post, body: body).status == .unauthorized)
                let revoked = try await client.execute(uri: "/_msm/principals/revoke", method: .post, headers: bearer, body: body)
                #expect(revoked.status == .ok)
                #expect(String(buffer: revoked.body) == #"{"ended":0}"#)
                let malformed = try await client.execute(
                    uri: "/_msm/principals/revoke", method: .post, headers: bearer, body: ByteBuffer(string: "alice"))
                #expect(malformed.status == .badRequest)
            }
        }
    }

    @Test func ignoredPathsAndHelloNeverTouchMemcached() async throws {
        try await withMemcachedServers(count: 1) { servers in
            let manager = try makeManager(servers) { $0.ignoredPathPattern = #".*\.css$"# }
            try await counterApp(manager).test(.live) { client in
                let created = try await client.execute(uri: "/counter", method: .get)
                let cookie = try #require(sessionCookie(created))
                let before = try await manager.client.node("n1").stats()
                for _ in 0..<5 {
                    let css = try await client.execute(uri: "/static/site.css", method: .get, headers: [.cookie: "SESSION_ID=\(cookie)"])
                    #expect(String(buffer: css.body) == "no session machinery")
                    #expect(setCookies(css).isEmpty)
                    _ = try await client.execute(uri: "/hello", method: .get, headers: [.cookie: "SESSION_ID=\(cookie)"])
                }
                let after = try await manager.client.node("n1").stats()
                func commands(_ stats: [MemcachedStat]) -> Int {
                    ["cmd_get", "cmd_set", "cmd_touch"].map { name in Int(stats.first { $0.name == name }?.value ?? "0") ?? 0 }.reduce(0, +)
                }
                #expect(commands(after) == commands(before))
            }
        }
    }

    @Test func aDeadStoreIsA503NotASilentLogout() async throws {
        try await withMemcachedServers(count: 1) { servers in
            let manager = try makeManager(servers)
            try await counterApp(manager).test(.live) { client in
                let created = try await client.execute(uri: "/counter", method: .get)
                let cookie = try #require(sessionCookie(created))
                try await servers[0].kill()
                let response = try await client.execute(uri: "/counter", method: .get, headers: [.cookie: "SESSION_ID=\(cookie)"])
                #expect(response.status == .serviceUnavailable)
                #expect(response.headers[.retryAfter] == "1")
                #expect(setCookies(response).isEmpty, "the browser keeps its cookie")
            }
        }
    }

    @Test func aThrowingRouteStillSavesAndReleasesTheLock() async throws {
        try await withMemcachedServers(count: 1) { servers in
            let manager = try makeManager(servers) {
                $0.locking.mode = .all
                $0.locking.waitBudget = .milliseconds(300)
            }
            try await counterApp(manager).test(.live) { client in
                let created = try await client.execute(uri: "/counter", method: .get)
                let cookie = try #require(sessionCookie(created))
                let failed = try await client.execute(uri: "/fail-after-change", method: .get, headers: [.cookie: "SESSION_ID=\(cookie)"])
                #expect(failed.status == .internalServerError)
                // The lock was released (a 300 ms budget could not outwait it) and the change saved.
                let next = try await client.execute(uri: "/counter", method: .get, headers: [.cookie: "SESSION_ID=\(cookie)"])
                #expect(next.status == .ok)
                #expect(String(buffer: next.body) == "102")
                #expect(manager.statistics.value(of: .lockFailures) == 0)
            }
        }
    }

    /// A handler that regenerates the id (the old copies are deleted before the response) and
    /// then throws: the error response still carries the new cookie, or the browser would keep a
    /// dead one and lose its session. A new session made by a failing handler gets its cookie too.
    @Test func anErrorResponseCarriesTheSessionCookie() async throws {
        try await withMemcachedServers(count: 2) { servers in
            let manager = try makeManager(servers)
            try await counterApp(manager).test(.live) { client in
                let created = try await client.execute(uri: "/counter", method: .get)
                let old = try #require(sessionCookie(created))
                let failed = try await client.execute(uri: "/login-then-fail", method: .get, headers: [.cookie: "SESSION_ID=\(old)"])
                #expect(failed.status == .forbidden, "the handler's own error response")
                let new = try #require(sessionCookie(failed), "the new id reaches the browser")
                #expect(new != old)
                let read = try await client.execute(uri: "/read", method: .get, headers: [.cookie: "SESSION_ID=\(new)"])
                #expect(String(buffer: read.body) == "1")
                let stale = try await client.execute(uri: "/read", method: .get, headers: [.cookie: "SESSION_ID=\(old)"])
                #expect(String(buffer: stale.body) == "0", "the old id is dead")

                let fresh = try await client.execute(uri: "/create-then-fail", method: .get)
                #expect(fresh.status == .internalServerError)
                let freshCookie = try #require(sessionCookie(fresh))
                let count = try await client.execute(uri: "/read", method: .get, headers: [.cookie: "SESSION_ID=\(freshCookie)"])
                #expect(String(buffer: count.body) == "7")
            }
        }
    }

    /// Secure defaults (OWASP): the cookie is `Secure`; a response that sets or clears it is
    /// `Cache-Control: no-store`; a session that nothing was put in is neither written nor
    /// given a cookie.
    @Test(arguments: [SessionManager.Mode.nonSticky, .sticky])
    func secureDefaults(mode: SessionManager.Mode) async throws {
        try await withMemcachedServers(count: 2) { servers in
            let manager = try makeManager(servers) {
                $0.mode = mode
                $0.route = mode == .sticky ? "a1" : nil
                $0.sticky.asynchronousSaving = false
            }
            try await counterApp(manager).test(.live) { client in
                let writesBefore = manager.statistics.value(of: .writes)
                let visit = try await client.execute(uri: "/visit", method: .get)
                #expect(visit.status == .ok && setCookies(visit).isEmpty, "an empty session gets no cookie")
                #expect(visit.headers[.cacheControl] == nil, "nor a no-store it does not need")
                #expect(manager.statistics.value(of: .writes) == writesBefore, "and is not written")

                let created = try await client.execute(uri: "/counter", method: .get)
                let header = try #require(setCookies(created).first)
                #expect(header.contains("; Secure") && header.contains("; HttpOnly"), "\(header)")
                #expect(created.headers[.cacheControl] == "no-store")
                let cookie = try #require(sessionCookie(created))
                let next = try await client.execute(uri: "/counter", method: .get, headers: [.cookie: "SESSION_ID=\(cookie)"])
                #expect(String(buffer: next.body) == "2" && setCookies(next).isEmpty && next.headers[.cacheControl] == nil)
                let visited = try await client.execute(uri: "/visit", method: .get, headers: [.cookie: "SESSION_ID=\(cookie)"])
                #expect(setCookies(visited).isEmpty, "an existing session opened and left alone keeps its cookie")
                let logout = try await client.execute(uri: "/logout", method: .get, headers: [.cookie: "SESSION_ID=\(cookie)"])
                #expect(setCookies(logout).first?.contains("Max-Age=0") == true)
                #expect(logout.headers[.cacheControl] == "no-store")
                let failed = try await client.execute(uri: "/create-then-fail", method: .get)
                #expect(failed.status == .internalServerError && failed.headers[.cacheControl] == "no-store")
            }
        }
    }

    @Test func cookieSettingsAreHonouredAndValidated() async throws {
        #expect(throws: SessionError.self) { _ = try SessionCookie(name: "__Host-sid", secure: false) }
        #expect(throws: SessionError.self) { _ = try SessionCookie(name: "__Host-sid", domain: "example.com", secure: true) }
        #expect(throws: SessionError.self) { _ = try SessionCookie(name: "__Secure-sid", secure: false) }
        #expect(throws: SessionError.self) { _ = try SessionCookie(secure: false, sameSite: SessionCookie.SameSite.none) }
        #expect(try SessionCookie.default.secure && SessionCookie(name: "__Host-sid").secure, "Secure by default")
        #expect(throws: SessionError.self) { _ = try SessionCookie(name: "bad name") }
        let hostCookie = try SessionCookie(name: "__Host-sid", secure: true, sameSite: .strict)
        try await withMemcachedServers(count: 1) { servers in
            let manager = try makeManager(servers)
            try await counterApp(manager, cookie: hostCookie).test(.live) { client in
                let created = try await client.execute(uri: "/counter", method: .get)
                let header = try #require(setCookies(created).first)
                #expect(header.hasPrefix("__Host-sid="))
                #expect(header.contains("; Secure") && header.contains("; SameSite=Strict") && header.contains("; Path=/"))
                let cookie = try #require(sessionCookie(created, name: "__Host-sid"))
                let next = try await client.execute(uri: "/counter", method: .get, headers: [.cookie: "__Host-sid=\(cookie)"])
                #expect(String(buffer: next.body) == "2")
                // The default name is not read when another is configured.
                let other = try await client.execute(uri: "/read", method: .get, headers: [.cookie: "SESSION_ID=\(cookie)"])
                #expect(String(buffer: other.body) == "0")
            }
        }
    }

    /// hummingbird-auth's session authentication on memcached sessions, in a context that is also
    /// hummingbird-auth's `SessionRequestContext` (its `sessions` and our `memcachedSessions` side
    /// by side, no qualification needed): log in, be recognized, log out, the old cookie is nobody.
    @Test func theAuthenticatorSetsTheIdentityFromTheMemcachedSession() async throws {
        struct User: Sendable { var name: String }
        struct AuthContext: MemcachedSessionRequestContext, AuthRequestContext, SessionRequestContext {
            var coreContext: CoreRequestContextStorage
            var memcachedSessions = RequestSessions()
            var identity: User?
            var sessions: SessionContext<String>
            init(source: ApplicationRequestContextSource) {
                coreContext = .init(source: source)
                sessions = .init()
            }
        }
        try await withMemcachedServers(count: 2) { servers in
            let manager = try makeManager(servers)
            let known = ["alice": User(name: "Alice")]
            let router = Router(context: AuthContext.self)
            router.add(middleware: MemcachedSessionMiddleware<AuthContext>(manager: manager))
            router.add(middleware: MemcachedSessionAuthenticator<AuthContext, _> { (id: String, _) in known[id] })
            router.get("me") { _, context -> String in context.identity?.name ?? "nobody" }
            router.post("login/:name") { _, context -> String in
                let name = try context.parameters.require("name")
                try await context.memcachedSessions.logIn(userID: name)
                return "in"
            }
            router.post("logout") { _, context -> String in
                try await context.memcachedSessions.logOut()
                return "out"
            }
            try await Application(router: router, services: [manager]).test(.live) { client in
                #expect(String(buffer: try await client.execute(uri: "/me", method: .get).body) == "nobody")
                let login = try await client.execute(uri: "/login/alice", method: .post)
                let cookie = try #require(sessionCookie(login))
                let me = try await client.execute(uri: "/me", method: .get, headers: [.cookie: "SESSION_ID=\(cookie)"])
                #expect(String(buffer: me.body) == "Alice")
                // An id that names no user is nobody.
                let stranger = try #require(sessionCookie(try await client.execute(uri: "/login/mallory", method: .post)))
                #expect(String(buffer: try await client.execute(uri: "/me", method: .get, headers: [.cookie: "SESSION_ID=\(stranger)"]).body) == "nobody")
                // A login on an existing session gives it a new id (session fixation).
                let again = try await client.execute(uri: "/login/alice", method: .post, headers: [.cookie: "SESSION_ID=\(cookie)"])
                let renewed = try #require(sessionCookie(again))
                #expect(renewed != cookie)
                #expect(String(buffer: try await client.execute(uri: "/me", method: .get, headers: [.cookie: "SESSION_ID=\(cookie)"]).body) == "nobody")
                let logout = try await client.execute(uri: "/logout", method: .post, headers: [.cookie: "SESSION_ID=\(renewed)"])
                #expect(setCookies(logout).contains { $0.hasPrefix("SESSION_ID=;") })
                #expect(String(buffer: try await client.execute(uri: "/me", method: .get, headers: [.cookie: "SESSION_ID=\(renewed)"]).body) == "nobody")
            }
        }
    }

    @Test func persistDriverServesHummingbirdAuthsSessionMiddleware() async throws {
        struct Visit: Codable, Sendable {
            var count: Int
        }
        typealias AuthContext = BasicSessionRequestContext<Visit, String>
        try await withMemcachedServers(count: 1) { servers in
            let client = try MemcachedClient(configuration: .init(nodes: "n1:127.0.0.1:\(servers[0].port)"))
            let driver = MemcachedPersistDriver(client: client)
            let router = Router(context: AuthContext.self)
            router.add(middleware: SessionMiddleware(storage: driver, defaultSessionExpiration: .seconds(600)))
            router.get("visit") { _, context -> String in
                let count = context.sessions.withLockedSession { data -> Int in
                    if data != nil {
                        data!.count += 1
                        return data!.count
                    }
                    return -1
                }
                if count >= 0 { return String(count) }
                context.sessions.createSession(Visit(count: 1))
                return "1"
            }
            let app = Application(router: router, services: [driver])
            try await app.test(.live) { testClient in
                let first = try await testClient.execute(uri: "/visit", method: .get)
                #expect(String(buffer: first.body) == "1")
                let cookie = try #require(sessionCookie(first))
                for expected in 2...4 {
                    let next = try await testClient.execute(uri: "/visit", method: .get, headers: [.cookie: "SESSION_ID=\(cookie)"])
                    #expect(String(buffer: next.body) == "\(expected)")
                }
                // Updates without a new expiry keep the TTL the session was created with.
                let stored = try await driver.getWithTTL(key: "hbs.\(cookie)", as: Visit.self)
                #expect(stored?.object.count == 4)
                let ttl = try #require(stored?.ttl)
                #expect(ttl > .seconds(590) && ttl <= .seconds(600))
                // The memcached key is a digest: the cookie is not in a key dump.
                #expect(try await client.get("hbp:hbs.\(cookie)") == nil)
                #expect(try await client.get(driver.memcachedKey("hbs.\(cookie)")) != nil)
                #expect(!driver.memcachedKey("hbs.\(cookie)").contains(cookie))
                // A key from a hostile cookie is "missing", never a command.
                #expect(try await driver.get(key: "x\r\nflush_all", as: Visit.self) == nil)
                await #expect(throws: (any Error).self) {
                    try await driver.create(key: "hbs.\(cookie)", value: Visit(count: 0), expires: nil)
                }
            }
        }
    }

    /// `set` without an expiry keeps the item's TTL (hummingbird-auth's contract), in both
    /// protocol modes: the text protocol, which cannot read a TTL, used to store it forever.
    @Test(arguments: MemcachedProtocolMode.allCases)
    func persistDriverSetKeepsTheExpiryInEitherProtocol(mode: MemcachedProtocolMode) async throws {
        try await withMemcachedServers(count: 1) { servers in
            var configuration = try MemcachedClient.Configuration(nodes: "n1:127.0.0.1:\(servers[0].port)")
            configuration.protocolMode = mode
            let driver = MemcachedPersistDriver(client: try MemcachedClient(configuration: configuration))
            let inspector = try MemcachedClient(configuration: .init(nodes: "n1:127.0.0.1:\(servers[0].port)"))
            func remaining(_ key: String) async throws -> Int? {
                guard case .item(let item?) = try await inspector.execute(.getMetadata(driver.memcachedKey(key))) else { return nil }
                return item.timeToLive
            }
            try await driver.create(key: "a", value: 1, expires: .seconds(600))
            try await driver.set(key: "a", value: 2)
            #expect(try await driver.get(key: "a", as: Int.self) == 2)
            // An absolute expiry: memcached's whole-second clock may report one second more.
            let kept = try #require(try await remaining("a"))
            #expect(kept > 590 && kept <= 601, "TTL \(kept)")
            let reported = try #require(try await driver.getWithTTL(key: "a", as: Int.self))
            #expect(reported.object == 2)
            #expect(reported.ttl.map { $0 > .seconds(590) && $0 <= .seconds(601) } == true)
            // A new expiry replaces it; a key that never had one keeps none.
            try await driver.set(key: "a", value: 3, expires: .seconds(60))
            #expect(try await remaining("a").map { $0 > 50 && $0 <= 61 } == true)
            try await driver.set(key: "b", value: 1)
            try await driver.set(key: "b", value: 2)
            #expect(try await remaining("b") == -1, "no expiry")
            // Values written by earlier versions (bare JSON) are still read.
            try await inspector.set(driver.memcachedKey("c"), value: "42")
            #expect(try await driver.get(key: "c", as: Int.self) == 42)
        }
    }

    @Test func persistDriverSealsItsValuesUnderKeyedKeys() async throws {
        try await withMemcachedServers(count: 1) { servers in
            let nodes = "n1:127.0.0.1:\(servers[0].port)"
            let old = SessionSealingKey.generate()
            let secret = try StorageKeySecret(secretFile: SessionSealingKey.generate().base64)
            let driver = MemcachedPersistDriver(
                client: try MemcachedClient(configuration: .init(nodes: nodes)), keyRing: try SessionKeyRing(current: old),
                storageKeySecret: secret)
            let plain = MemcachedPersistDriver(client: try MemcachedClient(configuration: .init(nodes: nodes)))
            let inspector = try MemcachedClient(configuration: .init(nodes: nodes))
            try await driver.create(key: "a", value: "alice", expires: .seconds(600))
            try await driver.set(key: "a", value: "alice-2")
            #expect(try await driver.get(key: "a", as: String.self) == "alice-2")
            // Sealed, under a keyed key; the expiry (inside the sealed envelope) kept by the set.
            #expect(driver.memcachedKey("a") != plain.memcachedKey("a"))
            let stored = try #require(try await inspector.get(driver.memcachedKey("a")))
            #expect(SessionSealer.isSealed(stored.value))
            #expect(!String(decoding: stored.value.readableBytesView, as: UTF8.self).contains("alice"))
            #expect(try await driver.getWithTTL(key: "a", as: String.self)?.ttl.map { $0 > .seconds(590) } == true)
            // Copied under another key, or planted unsealed: missing.
            try await inspector.set(driver.memcachedKey("b"), value: stored.value)
            #expect(try await driver.get(key: "b", as: String.self) == nil)
            try await inspector.set(driver.memcachedKey("c"), value: "\"mallory\"")
            #expect(try await driver.get(key: "c", as: String.self) == nil)
            // Rotation: a driver with a new current key opens the old key's values.
            let rotated = MemcachedPersistDriver(
                client: try MemcachedClient(configuration: .init(nodes: nodes)),
                keyRing: try SessionKeyRing(current: .generate(), previous: [old]), storageKeySecret: secret)
            #expect(try await rotated.get(key: "a", as: String.self) == "alice-2")
        }
    }
}
#endif

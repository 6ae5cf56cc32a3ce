#if canImport(Glibc)
import Glibc
#endif
import Foundation
import HTTPTypes
import InMemoryTracing
import Logging
import Memcached
import MemcachedSessionsOperations
import MemcachedTestRig
import NIOCore
import ServiceLifecycle
import Synchronization
import Testing
import Tracing

@_spi(Simulation) @testable import MemcachedSessions

@Suite("Requests and their sessions: load, create, regenerate, ignore, filter, expire, bad ids")
struct SessionAccessTests {
    @Test func regeneratedIDMovesTheDataAndDeletesTheOldKey() async throws {
        for mode in SessionManager.Mode.allCases {
            try await withMemcachedServers(count: 2) { servers in
                try await withManager(try configuration(servers, mode: mode) { $0.sticky.asynchronousSaving = false }) { manager in
                    try await withInspector(servers) { inspector in
                        var browser = Browser()
                        try await manager.increment(&browser)
                        try await manager.increment(&browser)
                        let old = try #require(browser.id)
                        try await manager.request(&browser) { access in try await access.regenerateID() }
                        let new = try #require(browser.id)
                        #expect(new.token != old.token)
                        #expect(try await manager.readCount(&browser) == 2)
                        // A tombstone: it tells other sticky instances so, and no copy can come back.
                        let leftover = try await inspector.node(old.nodeID).get(manager.keys(for: old.token).primary)
                        #expect(leftover?.flags == SessionManager.tombstoneFlags)
                        #expect(try await inspector.node(new.nodeID).get(manager.keys(for: new.token).primary) != nil)
                        var stale = Browser(cookie: old.description)
                        #expect(try await manager.readCount(&stale) == 0)
                    }
                }
            }
        }
    }

    @Test func ignoredPathsNeverTouchMemcached() async throws {
        try await withMemcachedServers(count: 1) { servers in
            try await withManager(try configuration(servers) { $0.ignoredPathPattern = #".*\.(css|js|png)$"# }) { manager in
                try await withInspector(servers) { inspector in
                    var browser = Browser()
                    try await manager.increment(&browser)
                    let before = try await commandCounts(inspector)
                    for _ in 0..<10 {
                        let (ignored, loaded, created) = try await manager.request(&browser, path: "/static/site.css") {
                            access -> (Bool, Bool, Bool) in
                            let loaded = try await access.load()
                            let created = try? access.create()
                            return (access.isIgnored, loaded != nil, created != nil)
                        }
                        #expect(ignored && !loaded && !created)
                    }
                    #expect(try await commandCounts(inspector) - before == CommandCounts())
                    #expect(manager.statistics.value(of: .requestsIgnored) == 10)
                    #expect(try await manager.readCount(&browser, path: "/page.html") == 1)
                }
            }
        }
    }

    @Test func attributeFilterStoresOnlyMatchingAttributes() async throws {
        try await withMemcachedServers(count: 1) { servers in
            try await withManager(try configuration(servers) { $0.attributeFilter = "^(count|user)$" }) { manager in
                var browser = Browser()
                try await manager.request(&browser) { access in
                    let session = try await access.loadOrCreate()
                    try session.set("user", "ann")
                    try session.set("scratch", "not stored")
                }
                try await manager.request(&browser) { access in
                    let session = try #require(try await access.load())
                    #expect(session["user", as: String.self] == "ann")
                    #expect(session["scratch", as: String.self] == nil)
                }
            }
        }
    }

    @Test func aRequestThatNeverOpensTheSessionSlidesItsOwnTimeout() async throws {
        try await withMemcachedServers(count: 2) { servers in
            try await withManager(try configuration(servers) { $0.timeouts.idle = .seconds(30) }) { manager in
                try await withInspector(servers) { inspector in
                    var browser = Browser()
                    try await manager.request(&browser) { access in
                        let session = try await access.loadOrCreate()
                        try session.set("user", "remembered")
                        session.setIdleTimeout(.seconds(3600))
                    }
                    let id = try #require(browser.id)
                    let key = manager.keys(for: id.token).primary
                    func remaining() async throws -> Int {
                        guard case .item(let item?) = try await inspector.node(id.nodeID).execute(.getMetadata(key)) else { return -9 }
                        return item.timeToLive ?? -9
                    }
                    #expect(try await remaining() > 3000)
                    // A read slides to the default first, then fixes it to the session's own timeout.
                    #expect(try await manager.readCount(&browser) == 0)
                    try await eventually("TTL back to the session's own") { try await remaining() > 3000 }
                    // A request that never opens the session slides with the session's timeout.
                    let touchesBefore = try await commandCounts(inspector).touches
                    try await manager.request(&browser, path: "/static") { _ in }
                    // The slide is a touch the request does not wait for: wait until it landed.
                    try await eventually("the slide's touch landed") {
                        try await commandCounts(inspector).touches > touchesBefore
                    }
                    #expect(try await remaining() > 3000, "not shortened to the 30 s default")
                }
            }
        }
    }

    /// A request racing a login (it loaded the session under the old id, the login moved it to
    /// a new one and deleted the old copies) finds its copy gone: its response must not clear the
    /// cookie, which by then is the login's new one. (The simulation found it on its own.)
    @Test func aRequestRacingALoginDoesNotClearTheNewCookie() async throws {
        try await withMemcachedServers(count: 2) { servers in
            try await withManager(try configuration(servers)) { manager in
                var browser = Browser()
                try await manager.increment(&browser)
                let old = browser
                // The racing request: loaded under the old id, ends after the login.
                let racing = manager.beginRequest(path: "/part", sessionCookie: old.cookie)
                let session = try #require(try await racing.load())
                var login = old
                try await manager.request(&login, path: "/login") { access in try await access.regenerateID() }
                #expect(login.cookie != old.cookie)
                try session.set("note", "raced")
                let action = try await manager.endRequest(racing)
                #expect(action.cookie == .unchanged, "the racing response leaves the new cookie alone")
                #expect(try await manager.readCount(&login) == 1)
            }
        }
    }

    /// Sticky, asynchronous saving: a login right after the session was made (its save still
    /// queued) gets a new id all the same; only a session made by the same request keeps its id
    /// (it never reached the browser). Before, the login kept the id: session fixation.
    @Test func aLoginRegeneratesASessionWhoseSaveIsStillQueued() async throws {
        try await withMemcachedServers(count: 1) { servers in
            let config = try configuration(servers, mode: .sticky) {
                $0.route = "a"
                $0.sticky.saveDelay = .seconds(30)
            }
            try await withManager(config) { manager in
                var browser = Browser()
                try await manager.increment(&browser)
                let before = browser.cookie
                try await manager.request(&browser, path: "/login") { access in try await access.regenerateID() }
                #expect(browser.cookie != before, "a new id at login")
                var stale = Browser(cookie: before)
                #expect(try await manager.readCount(&stale) == 0, "the old id is dead")
                #expect(try await manager.readCount(&browser) == 1)
                // Made and regenerated by one request: nothing to regenerate.
                var fresh = Browser()
                try await manager.request(&fresh) { access in
                    try await access.loadOrCreate().set("count", 1)
                    try await access.regenerateID()
                }
                #expect(try await manager.readCount(&fresh) == 1)
            }
        }
    }

    @Test func disabledManagerKeepsSessionsInMemoryOnly() async throws {
        try await withMemcachedServers(count: 1) { servers in
            try await withManager(try configuration(servers) { $0.enabled = false }) { manager in
                try await withInspector(servers) { inspector in
                    let before = try await commandCounts(inspector)
                    var browser = Browser()
                    for expected in 1...5 { #expect(try await manager.increment(&browser) == expected) }
                    #expect(try await commandCounts(inspector) - before == CommandCounts())
                }
            }
        }
    }

    /// An idle timeout far beyond ten years (here `Int64.max` seconds) used to trap on overflow in
    /// TTL, deadline and expiry arithmetic. It is clamped to ten years: stored, served, no crash.
    @Test(arguments: [SessionManager.Mode.nonSticky, .sticky])
    func anEnormousIdleTimeoutIsClampedNotACrash(mode: SessionManager.Mode) async throws {
        try await withMemcachedServers(count: 2) { servers in
            try await withManager(try configuration(servers, mode: mode) {
                    $0.sticky.asynchronousSaving = false
                    $0.timeouts.absolute = nil  // else the 24 h default caps the TTL
                }
            ) { manager in
                try await withInspector(servers) { inspector in
                    var browser = Browser()
                    try await manager.request(&browser) { access in
                        let session = try await access.loadOrCreate()
                        try session.set("count", 1)
                        session.setIdleTimeout(.seconds(Int64.max))
                        #expect(session.metadata.idleTimeoutSeconds == SessionMetadata.maximumTimeoutSeconds)
                    }
                    #expect(try await manager.increment(&browser) == 2)
                    #expect(try await manager.readCount(&browser) == 2)
                    let id = try #require(browser.id)
                    let key = manager.keys(for: id.token).primary
                    // Sent as an absolute time ten years out (memcached reports what remains).
                    // Non-sticky, the read slid it to the default first and its own timeout's
                    // touch follows the response, not waited for (a CI run read it in between).
                    try await eventually("the session's own TTL, ten years out") {
                        guard case .item(let item?) = try await inspector.node(id.nodeID).execute(.getMetadata(key)) else { return false }
                        return (item.timeToLive ?? 0) > 9 * 365 * 24 * 3600
                    }
                }
            }
        }
    }

    /// A session that nothing was put in is never written to memcached and gets no cookie; one
    /// that replaced a stored session clears that session's cookie (the old session ended).
    @Test(arguments: [SessionManager.Mode.nonSticky, .sticky])
    func anEmptyNewSessionIsNeverWrittenAndGetsNoCookie(mode: SessionManager.Mode) async throws {
        try await withMemcachedServers(count: 2) { servers in
            try await withManager(try configuration(servers, mode: mode) { $0.sticky.asynchronousSaving = false }) { manager in
                try await withInspector(servers) { inspector in
                    let before = try await commandCounts(inspector)
                    var browser = Browser()
                    try await manager.request(&browser) { access in
                        let session = try access.create()
                        try session.set("count", 1)
                        session.remove("count")
                        session.setIdleTimeout(.seconds(60))
                    }
                    #expect(browser.cookie == nil)
                    #expect(try await commandCounts(inspector).sets == before.sets, "nothing written")

                    try await manager.increment(&browser)
                    let old = try #require(browser.cookie)
                    try await manager.request(&browser) { access in
                        _ = try await access.load()
                        try access.create()
                    }
                    #expect(browser.cookie == nil, "the replaced session's cookie is cleared")
                    // The replaced session ends (its copies go in the background, as for any
                    // session a create() replaces).
                    try await eventually("the replaced session ended") {
                        var stale = Browser(cookie: old)
                        return try await manager.readCount(&stale) == 0
                    }
                }
            }
        }
    }

    /// Sticky, asynchronous saves: a session whose first save is still queued, replaced by
    /// `create()` in a later request, ends (its queued save dropped, never written) and its
    /// cookie is cleared; the response waits until it is dead.
    @Test func aStickySessionReplacedBeforeItsFirstSaveEnds() async throws {
        try await withMemcachedServers(count: 2) { servers in
            let configuration = try configuration(servers, mode: .sticky) {
                $0.sticky.asynchronousSaving = true
                $0.sticky.saveDelay = .seconds(30)  // queued for the whole test
            }
            let replaced = Mutex<String?>(nil)
            try await withManager(configuration) { manager in
                var browser = Browser()
                try await manager.increment(&browser)
                let old = try #require(browser.cookie)
                replaced.withLock { $0 = old }
                try await manager.request(&browser) { access in
                    _ = try await access.load()
                    try access.create()
                }
                #expect(browser.cookie == nil, "the replaced session's cookie is cleared")
                var stale = Browser(cookie: old)
                #expect(try await manager.readCount(&stale) == 0, "and that session ended before the response")
            }
            // The graceful shutdown flushed the writer: the ended session was not written back.
            try await withManager(configuration) { manager in
                var stale = Browser(cookie: replaced.withLock { $0 })
                let count = try await manager.readCount(&stale)
                #expect(count == 0, "not in memcached either")
            }
        }
    }

    @Test func idleAndAbsoluteExpiry() async throws {
        try await withMemcachedServers(count: 1) { servers in
            // Idle: reads slide the TTL; without requests the session expires.
            // (memcached's clock ticks once a second: a 3 s TTL lives 2 to 3 s.)
            try await withManager(try configuration(servers) { $0.timeouts.idle = .seconds(4) }) { manager in
                try await withInspector(servers) { inspector in
                    var browser = Browser()
                    try await manager.increment(&browser)
                    let id = try #require(browser.id)
                    let key = manager.keys(for: id.token).primary
                    // The TTL memcached reports, looked at without touching (a load would slide it).
                    func remaining() async throws -> Int {
                        guard case .item(let item?) = try await inspector.node(id.nodeID).execute(.getMetadata(key)) else { return -1 }
                        return item.timeToLive ?? -1
                    }
                    for _ in 0..<2 {
                        // Wait until memcached's clock has run the TTL down, then read: it is back up.
                        try await eventually("the TTL runs down") { try await remaining() <= 2 }
                        #expect(try await manager.readCount(&browser) == 1, "each read slides the idle timeout")
                        #expect(try await remaining() >= 3, "slid back to the 4 s idle timeout")
                    }
                    try await eventually(timeout: .seconds(10), "idle expiry") { try await remaining() == -1 }
                    #expect(try await manager.readCount(&browser) == 0)
                }
            }
            // Absolute: gone after its lifetime even when used all the time.
            try await withManager(try configuration(servers) { $0.timeouts.absolute = .seconds(2) }) { manager in
                var browser = Browser()
                try await manager.increment(&browser)
                let start = ContinuousClock.now
                var count = 1
                while ContinuousClock.now - start < .seconds(6) {
                    let value = try await manager.readCount(&browser)
                    if value == 0 { break }
                    count = value
                    try await Task.sleep(for: .milliseconds(200))
                }
                #expect(count == 1)
                #expect(ContinuousClock.now - start < .seconds(5), "expired after about 2 s")
                #expect(try await manager.readCount(&browser) == 0)
            }
            // Over 30 days: sent as an absolute time (a raw 31-day TTL would read as 1970: expired at once).
            try await withManager(try configuration(servers) {
                $0.timeouts.idle = .seconds(31 * 24 * 3600)
                $0.timeouts.absolute = nil  // else the 24 h default caps the TTL
            }) { manager in
                var browser = Browser()
                try await manager.increment(&browser)
                try await Task.sleep(for: .milliseconds(1100))
                #expect(try await manager.increment(&browser) == 2)
                #expect(try await manager.readCount(&browser) == 2)
            }
            // Zero or less: never expires.
            try await withManager(try configuration(servers) {
                $0.timeouts.idle = .zero
                $0.timeouts.absolute = nil
            }) { manager in
                var browser = Browser()
                try await manager.increment(&browser)
                #expect(try await manager.readCount(&browser) == 1)
                #expect(manager.configuration.effectiveIdleTimeout == nil)
            }
        }
    }

    @Test func malformedAndForgedIDsAreNoSessionAndNeverAdopted() async throws {
        try await withMemcachedServers(count: 2) { servers in
            try await withManager(try configuration(servers)) { manager in
                try await withInspector(servers) { inspector in
                    let before = try await commandCounts(inspector)
                    let malformed = [
                        "garbage", "", String(repeating: "A", count: 100_000), "602F7397FBE4D9932E59A9D0E52FE178-n1\r\nflush_all",
                        "602F7397FBE4D9932E59A9D0E52FE178-n1 n2", "602f7397fbe4d9932e59a9d0e52fe178-n1", "../../../etc/passwd",
                    ]
                    for cookie in malformed {
                        var browser = Browser(cookie: cookie)
                        #expect(try await manager.readCount(&browser) == 0)
                        #expect(browser.cookie == cookie, "no Set-Cookie for a request that created nothing")
                    }
                    #expect(try await commandCounts(inspector) - before == CommandCounts(), "malformed ids cost no round trip")

                    // Well formed but never issued: no session, and a new session gets a new id.
                    let forged = MemcachedSessionID(token: .init(high: 0x0123_4567_89AB_CDEF, low: 42), nodeID: "n1")
                    var browser = Browser(cookie: forged.description)
                    #expect(try await manager.readCount(&browser) == 0)
                    #expect(try await manager.increment(&browser) == 1)
                    #expect(browser.id?.token != forged.token, "an id the server did not issue is never adopted")

                    // A node we do not have: "no session", not "unavailable".
                    var unknown = Browser(cookie: MemcachedSessionID.generate(nodeID: "n9", route: nil).description)
                    #expect(try await manager.readCount(&unknown) == 0)
                    #expect(manager.statistics.value(of: .unavailable) == 0)

                    // Someone else's route on a non-sticky instance is fine; the id still names the node.
                    var routed = Browser(cookie: browser.id!.routed(to: "elsewhere").description)
                    #expect(try await manager.readCount(&routed) == 1)
                }
            }
        }
    }
}

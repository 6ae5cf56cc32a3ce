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

@Suite("The sticky lifecycle: memory, takeovers, owners", .serialized)
struct StickyLifecycleTests {
    @Test func stickyServesFromMemoryAndSavesAsynchronously() async throws {
        try await withMemcachedServers(count: 2) { servers in
            let config = try configuration(servers, mode: .sticky) { $0.route = "a" }
            var browser = Browser()
            var keys: SessionKeys? = nil
            try await withInspector(servers) { inspector in
                try await withManager(config) { manager in
                    #expect(try await manager.increment(&browser) == 1)
                    #expect(browser.id?.route == "a")
                    keys = manager.keys(for: try #require(browser.id).token)
                    // Served from memory: no memcached read on reads.
                    let before = try await commandCounts(inspector)
                    for _ in 0..<50 { #expect(try await manager.readCount(&browser) == 1) }
                    for expected in 2...30 { #expect(try await manager.increment(&browser) == expected) }
                    let delta = try await commandCounts(inspector) - before
                    #expect(delta.gets == 0, "\(delta)")
                    #expect(delta.sets <= 30, "\(delta)")
                    #expect(manager.statistics.value(of: .sessionsLoadedLocally) == 79)
                }
                // Graceful shutdown flushed the queue: memcached has the last count.
                let id = try #require(browser.id)
                let stored = try #require(try await inspector.node(id.nodeID).get(keys!.primary))
                let record = try BinarySessionCodec().decodeSession(from: stored.value)
                #expect(try BinarySessionCodec().decodeValue(Int.self, from: record.attributes["count"]!) == 30)
            }
        }
    }

    @Test func stickySynchronousSavingIsAcknowledgedBeforeTheResponse() async throws {
        try await withMemcachedServers(count: 1) { servers in
            let config = try configuration(servers, mode: .sticky) {
                $0.route = "a"
                $0.sticky.asynchronousSaving = false
            }
            try await withManager(config) { manager in
                try await withInspector(servers) { inspector in
                    var browser = Browser()
                    for expected in 1...5 {
                        #expect(try await manager.increment(&browser) == expected)
                        // Synchronous: the write is in memcached by the time the response goes.
                        let id = try #require(browser.id)
                        let stored = try #require(try await inspector.node("n1").get(manager.keys(for: id.token).primary))
                        let record = try BinarySessionCodec().decodeSession(from: stored.value)
                        #expect(try BinarySessionCodec().decodeValue(Int.self, from: record.attributes["count"]!) == expected)
                    }
                }
            }
        }
    }

    @Test func stickySessionsSurviveOnTheAppServerAndMoveToALiveNode() async throws {
        try await withMemcachedServers(count: 3) { servers in
            let config = try configuration(servers, mode: .sticky) {
                $0.route = "a"
                $0.sticky.asynchronousSaving = false
            }
            try await withManager(config) { manager in
                let book = try await createSessions(manager, count: 300, readOnlyEvery: 4)
                let victim = "n2"
                let onVictim = (0..<book.count).filter { book[$0].browser.id?.nodeID == victim }
                #expect(!onVictim.isEmpty)
                try await servers[1].kill()
                try await verifyAndAdvance(manager, book)
                try await verifyAndAdvance(manager, book)
                for index in onVictim where !book[index].readOnly {
                    #expect(book[index].browser.id?.nodeID != victim, "a changed session moved off the dead node")
                }
                // A second app server (app-server failover) finds the moved sessions in memcached.
                let other = try configuration(servers, mode: .sticky) { $0.route = "b" }
                try await withManager(other) { (second: SessionManager) async throws in
                    for index in onVictim where !book[index].readOnly {
                        var browser = book[index].browser
                        #expect(try await second.readCount(&browser) == book[index].count)
                    }
                }
            }
        }
    }

    @Test func stickySessionsKeepWorkingWhenEveryNodeIsDown() async throws {
        try await withMemcachedServers(count: 1) { servers in
            let config = try configuration(servers, mode: .sticky) {
                $0.route = "a"
                $0.sticky.asynchronousSaving = false
                $0.memcached.requestTimeout = .milliseconds(300)
            }
            try await withManager(config) { manager in
                var browser = Browser()
                #expect(try await manager.increment(&browser) == 1)
                try await servers[0].kill()
                for expected in 2...6 { #expect(try await manager.increment(&browser) == expected) }
                var newcomer = Browser()
                #expect(try await manager.increment(&newcomer) == 1, "new sessions work from memory too")
                try await servers[0].restart()
                try await eventually("node back") { manager.topology.isAvailable("n1") }
                #expect(try await manager.increment(&newcomer) == 2)
                #expect(try await manager.increment(&browser) == 7)
                // Now in memcached: a second instance sees both.
                try await withManager(try configuration(servers, mode: .sticky) { $0.route = "b" }) {
                    (second: SessionManager) async throws in
                    var b1 = browser
                    var b2 = newcomer
                    #expect(try await second.readCount(&b1) == 7)
                    #expect(try await second.readCount(&b2) == 2)
                }
            }
        }
    }

    @Test func stickyTakeoverNeverServesAStaleCopy() async throws {
        try await withMemcachedServers(count: 2) { servers in
            let a = try configuration(servers, mode: .sticky) {
                $0.route = "a"
                $0.sticky.asynchronousSaving = false
            }
            let b = try configuration(servers, mode: .sticky) {
                $0.route = "b"
                $0.sticky.asynchronousSaving = false
            }
            try await withManagers([a, b]) { managers in
                let (instanceA, instanceB) = (managers[0], managers[1])
                var browser = Browser()
                for _ in 0..<3 { try await instanceA.increment(&browser) }
                #expect(browser.id?.route == "a")

                // The balancer sends the user to B (A looked dead): B takes over and changes it.
                #expect(try await instanceB.increment(&browser) == 4)
                #expect(browser.id?.route == "b", "B rewrote the route and sent the new cookie")
                #expect(try await instanceB.increment(&browser) == 5)
                #expect(instanceB.statistics.value(of: .takeovers) == 1)

                // A, which still holds count 3 in memory, receives the session again: B's data.
                #expect(try await instanceA.readCount(&browser) == 5)
                #expect(browser.id?.route == "a")
                #expect(try await instanceA.increment(&browser) == 6)

            }
        }
    }

    @Test func stickyLogoutOnOneInstanceIsNotRevivedByAnother() async throws {
        try await withMemcachedServers(count: 1) { servers in
            let a = try configuration(servers, mode: .sticky) {
                $0.route = "a"
                $0.sticky.asynchronousSaving = false
            }
            let b = try configuration(servers, mode: .sticky) {
                $0.route = "b"
                $0.sticky.asynchronousSaving = false
            }
            try await withManagers([a, b]) { managers in
                let (instanceA, instanceB) = (managers[0], managers[1])
                var browser = Browser()
                for _ in 0..<2 { try await instanceA.increment(&browser) }
                try await instanceB.increment(&browser)  // takeover
                let routedToB = browser
                try await instanceB.request(&browser) { access in try await access.invalidate() }
                #expect(browser.cookie == nil)
                // A request still carrying B's cookie reaches A: A must not serve its old copy.
                var late = routedToB
                #expect(try await instanceA.readCount(&late) == 0)
                // Nor one carrying A's own older cookie, once A has seen the session gone.
                var older = Browser(cookie: routedToB.id!.routed(to: "a").description)
                #expect(try await instanceA.readCount(&older) == 0)
            }
        }
    }

    /// Two requests of one session take it over on the same instance at once (its cookie still
    /// names another instance): they must share one local copy. Each used to load its own, and
    /// the copy kept in memory (authoritative in sticky mode) lacked the other's change.
    @Test func concurrentTakeoversOnOneInstanceShareOneCopy() async throws {
        try await withMemcachedServers(count: 1) { servers in
            let a = try configuration(servers, mode: .sticky) {
                $0.route = "a"
                $0.sticky.asynchronousSaving = false
            }
            let b = try configuration(servers, mode: .sticky) {
                $0.route = "b"
                $0.sticky.asynchronousSaving = false
            }
            try await withManagers([a, b]) { managers in
                var browser = Browser()
                try await managers[0].increment(&browser)
                let cookie = browser
                let instanceB = managers[1]
                let first = instanceB.beginRequest(path: "/part", sessionCookie: cookie.cookie)
                let second = instanceB.beginRequest(path: "/part", sessionCookie: cookie.cookie)
                async let loadFirst = first.load()
                async let loadSecond = second.load()
                let (left, right) = try await (#require(loadFirst), #require(loadSecond))
                #expect(left === right, "one copy")
                try left.set("left", "left")
                try right.set("right", "right")
                // The copy memory keeps ends first; the other's save then merges in memcached.
                let token = try #require(cookie.id).token
                let held = instanceB.sticky.localStore.held(token, refreshedSince: .uptimeNanoseconds(0))
                for access in held === right ? [second, first] : [first, second] {
                    _ = try await instanceB.endRequest(access)
                }
                var atB = Browser(cookie: cookie.id!.routed(to: "b").description)
                try await instanceB.request(&atB, path: "/read") { access in
                    let session = try #require(try await access.load())
                    #expect(session["left", as: String.self] == "left")
                    #expect(session["right", as: String.self] == "right")
                }
            }
        }
    }

    /// Seeds 2933 and 3182: the owner's queued write found the session's node down and moved the
    /// session (same token, another node) with no response to carry the new cookie; once the node
    /// answered again (restarted empty, or thawed and its old copy deleted by the owner), another
    /// instance given the old cookie found nothing there, and looked nowhere else.
    @Test(arguments: [true, false])
    func aTakeoverFindsTheCopyItsOwnerMovedWhileTheNodeWasDown(restartedEmpty: Bool) async throws {
        try await withMemcachedServers(count: 2) { servers in
            var a = try sticky(servers, route: "a", asynchronous: true, delay: .milliseconds(300))
            a.memcached.requestTimeout = .milliseconds(500)
            let b = try sticky(servers, route: "b")
            try await withManagers([a, b]) { managers in
                let (a, b) = (managers[0], managers[1])
                try await withInspector(servers) { inspector in
                    var browser = Browser()
                    try await a.increment(&browser)
                    let id = try #require(browser.id)
                    let keys = a.keys(for: id.token)
                    let home = id.nodeID == "n1" ? 0 : 1
                    let other = id.nodeID == "n1" ? "n2" : "n1"
                    try await eventually("written") { try await storedCount(inspector, id.nodeID, keys.primary) == 1 }
                    #expect(try await a.increment(&browser) == 2)  // queued
                    try await eventually("both watches have looked at \(id.nodeID)") {
                        a.store.nodeRestarts.knows(id.nodeID) && b.store.nodeRestarts.knows(id.nodeID)
                    }
                    if restartedEmpty { try await servers[home].kill() } else { try await servers[home].freeze() }
                    try await eventually(timeout: .seconds(20), "A's writer moved it") {
                        try await storedCount(inspector, other, keys.primary) == 2
                    }
                    if restartedEmpty {
                        try await servers[home].restart()
                    } else {
                        servers[home].thaw()
                        try await eventually(timeout: .seconds(20), "A deleted the copy it left there") {
                            try await storedCount(inspector, id.nodeID, keys.primary) == nil
                        }
                    }
                    try await reconnect(b, id.nodeID)
                    var atB = browser  // still naming the node that was down
                    #expect(try await b.readCount(&atB) == 2)
                    #expect(atB.id?.nodeID == other)
                }
            }
        }
    }

    /// Seed 1354: an instance wrote its first heartbeat only after its first quarter second; a
    /// logout elsewhere in that time did not wait for it to read the notice, and it went on
    /// serving the ended session from memory.
    @Test func anInstanceIsAliveForEndingsFromItsStart() async throws {
        final class Sleeps: Sendable {
            let count = Mutex(0)
        }
        let sleeps = Sleeps()
        // A's first notice read comes only after 900 ms (B waits up to a second for it).
        let lateFirstRead = StretchingClock { duration in
            guard duration == StickyLifecycle.noticeInterval else { return nil }
            return sleeps.count.withLock { count in
                count += 1
                return count == 1 ? .milliseconds(900) : nil
            }
        }
        try await withMemcachedServers(count: 1) { servers in
            let a = try sticky(servers, route: "a")
            let b = try sticky(servers, route: "b")
            try await withManagers([(a, lateFirstRead), (b, SystemSessionClock())]) { managers in
                let (a, b) = (managers[0], managers[1])
                var browser = Browser()
                try await a.increment(&browser)
                let stale = browser
                var atB = browser
                try await b.request(&atB) { access in try #require(try await access.load()).invalidate() }
                var again = stale
                #expect(try await a.readCount(&again) == 0, "ended on A before B answered")
            }
        }
    }

    /// The review: after an instance crashed, its heartbeat outlives it for up to 3 s, and each
    /// asynchronous takeover of its sessions waited the whole second for a notice nobody reads.
    /// Once it has not read one in time, it is not waited for again until its heartbeat changes.
    @Test func aCrashedOwnerIsWaitedForOnceUntilItsHeartbeatChanges() async throws {
        try await withMemcachedServers(count: 1) { servers in
            var browsers = [Browser(), Browser(), Browser()]
            // "dead" serves three sessions, then stops without a word, its heartbeat left behind.
            try await withManager(try sticky(servers, route: "dead", asynchronous: true)) { dead in
                for index in browsers.indices { try await dead.increment(&browsers[index]) }
            }
            try await withManager(try sticky(servers, route: "b", asynchronous: true)) { b in
                try await withInspector(servers) { inspector in
                    func beat() async throws {
                        // Longer than the test: the heartbeat of an instance that died a moment ago.
                        try await inspector.node("n1").set(b.sticky.heartbeatKey("dead"), value: ByteBuffer(string: "1"), ttl: .seconds(60))
                    }
                    try await beat()
                    #expect(try await b.readCount(&browsers[0]) == 1)
                    #expect(b.statistics.value(of: .noticesUnread) == 1, "waited for the first")
                    #expect(try await b.readCount(&browsers[1]) == 1)
                    #expect(b.statistics.value(of: .noticesUnread) == 1)
                    #expect(b.statistics.value(of: .noticeWaitsSkipped) == 1, "not for the second")
                    try await beat()  // alive again, by its heartbeat
                    #expect(try await b.readCount(&browsers[2]) == 1)
                    #expect(b.statistics.value(of: .noticesUnread) == 2, "waited again")
                    #expect(b.statistics.value(of: .noticeWaitsSkipped) == 1)
                }
            }
        }
    }
}

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

@Suite("Ownership notices")
struct OwnershipNoticesTests {
    /// Sticky ownership notices: a takeover tells the previous owner, which drops its copy; a
    /// logout on the new owner answers only once the previous owner has read that it ended, so an
    /// old tab's cookie, still routed to the previous owner, is never served it again.
    @Test func aStickyInstanceStopsServingACopyTakenOverElsewhere() async throws {
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
                for _ in 0..<3 { try await instanceA.increment(&browser) }
                let staleCookie = browser  // route a
                var atB = browser
                #expect(try await instanceB.increment(&atB) == 4)  // takeover
                try await eventually("A read the takeover notice") { instanceA.statistics.value(of: .noticesRead) == 1 }
                var stale = staleCookie
                #expect(try await instanceA.readCount(&stale) == 4, "A serves B's data, not its stale copy")
                // A holds it again (the old tab's request took it back); logged out on B: the
                // logout answers once A has read the notice, so A's copy has ended by then.
                try await instanceB.request(&atB) { access in try await access.invalidate() }
                #expect(instanceB.statistics.value(of: .noticesSent) == 2)
                #expect(instanceB.statistics.value(of: .noticesUnread) == 0)
                var again = staleCookie
                #expect(try await instanceA.readCount(&again) == 0, "no sleep: ended on A before B answered")
            }
        }
    }

    /// The simulation, seed 6774: a logout's notice to the previous owner went to one node (the
    /// first available) and its heartbeat was looked for there; that node then died, and the
    /// previous owner, never told, served the logged-out session from memory to an old cookie.
    /// Here the previous owner cannot reach the first node at all (cut off): the notice goes to
    /// every node, the heartbeat lives on two, and the ending waits for the acknowledgement.
    @Test func aNoticeReachesAPreviousOwnerCutOffFromTheFirstNode() async throws {
        try await withMemcachedServers(count: 3) { servers in
            let proxy = try await FaultProxy.start(port: servers[0].port)
            defer { proxy.stop() }
            func config(_ route: String, nodes: String) throws -> SessionManager.Configuration {
                var config = try SessionManager.Configuration(nodes: nodes)
                config.mode = .sticky
                config.route = route
                config.sticky.asynchronousSaving = false
                config.memcached.probeInterval = .milliseconds(100)
                config.memcached.requestTimeout = .milliseconds(500)
                config.memcached.failureThreshold = 1
                return config
            }
            let others = "n2:127.0.0.1:\(servers[1].port),n3:127.0.0.1:\(servers[2].port)"
            let a = try config("a", nodes: "n1:127.0.0.1:\(servers[0].port)," + others)
            let b = try config("b", nodes: "n1:\(proxy.hostAndPort)," + others)
            try await withManagers([a, b]) { managers in
                let (a, b) = (managers[0], managers[1])
                try await withInspector(servers) { inspector in
                    var browser = Browser()
                    for _ in 0..<3 { try await b.increment(&browser) }
                    // B is cut off from n1; A is not.
                    proxy.stop()
                    try await eventually("B sees n1 down") { !b.topology.isAvailable("n1") }
                    try await eventually("B's heartbeat on a node it reaches") {
                        try await inspector.node("n2").get(b.sticky.heartbeatKey("b")) != nil
                    }
                    // A takes the session over and logs it out.
                    var atA = browser
                    #expect(try await a.readCount(&atA) == 3)
                    try await a.request(&atA, path: "/logout") { access in try await access.invalidate() }
                    #expect(atA.cookie == nil)
                    // The old cookie, routed to B, is not served from B's memory: B was told, though
                    // not on n1 (when the session lives on n1, B cannot read it there: unavailable).
                    var stale = browser
                    do {
                        #expect(try await b.readCount(&stale) == 0)
                    } catch let error as SessionError {
                        #expect(error.code == .unavailable && browser.id?.nodeID == "n1", "\(error)")
                    }
                    #expect(a.statistics.value(of: .noticesUnread) == 0)
                }
            }
        }
    }

    /// The simulation, seed 3591: B took the session over from A, the browser went back to A,
    /// which took it back; only then did A read B's notice, and it dropped the copy it had just
    /// taken (the only one in memory: a node restart then lost the session). A notice names the
    /// version its sender read, and ends only a copy taken at that version or earlier.
    @Test func aNoticeReadLateLeavesACopyTakenBackSince() async throws {
        try await withMemcachedServers(count: 2) { servers in
            // A reads its notices every 3 s: B's notice waits there while the browser returns.
            let slowNotices = StretchingClock { $0 == StickyLifecycle.noticeInterval ? .seconds(3) : nil }
            try await withManagers([(try sticky(servers, route: "a"), slowNotices), (try sticky(servers, route: "b"), SystemSessionClock())]) {
                managers in
                let (a, b) = (managers[0], managers[1])
                var browser = Browser()
                for _ in 0..<2 { try await a.increment(&browser) }
                let last = a.sticky.notices.lastReadAt
                try await eventually("A read its notices") { a.sticky.notices.lastReadAt != last }
                let readBefore = a.sticky.notices.lastReadAt
                #expect(try await b.increment(&browser) == 3, "B took it over")
                #expect(try await a.increment(&browser) == 4, "A took it back")
                try await eventually(timeout: .seconds(10), "A read B's notice") { a.sticky.notices.lastReadAt != readBefore }
                #expect(a.statistics.value(of: .noticesRead) == 0, "the notice named an older copy")
                // A's copy is the only one in memory (B dropped its own at A's notice): a restart
                // of the node is repaired from it.
                let id = try #require(browser.id)
                try await servers[Int(id.nodeID.dropFirst())! - 1].restart()
                try await eventually(timeout: .seconds(10), "A wrote its copy back") {
                    a.statistics.value(of: .sessionsRestored) >= 1
                }
                // B's pooled connections to the restarted node fail once each (or a probe in the
                // restart's window marked it down): B reads once it reaches the node again.
                try await reconnect(b, id.nodeID)
                var elsewhere = browser
                #expect(try await b.readCount(&elsewhere) == 4, "read from memcached, restored by A")
            }
        }
    }
}

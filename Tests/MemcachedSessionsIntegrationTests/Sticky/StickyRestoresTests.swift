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

@Suite("Sticky restores after a node restart")
struct StickyRestoresTests {
    /// Seed 1912: a browser moved to another instance within the second its node restarted empty
    /// found no session: the previous owner had not written its copy back yet.
    @Test func aTakeoverRightAfterARestartWaitsForThePreviousOwnersCopy() async throws {
        try await withMemcachedServers(count: 1) { servers in
            try await withManagers([try sticky(servers, route: "a"), try sticky(servers, route: "b")]) { managers in
                let (a, b) = (managers[0], managers[1])
                var browser = Browser()
                for _ in 0..<2 { try await a.increment(&browser) }
                // A restart is a boot time that changed: each watch must have seen the first one.
                try await eventually("both watches have looked at n1") { a.store.nodeRestarts.knows("n1") && b.store.nodeRestarts.knows("n1") }
                try await servers[0].restart()
                try await reconnect(b, "n1")
                var atB = browser
                #expect(try await b.readCount(&atB) == 2, "A's copy, written back after the restart")
                #expect(b.statistics.value(of: .restoreWaits) == 1)
            }
        }
    }

    /// Seed 188: a restart first seen by a miss's check (not by the periodic watch, which then
    /// never reports it) left the sessions this instance held there unwritten.
    @Test func aRestartSeenFirstByAMissStillRestoresTheSessionsHeld() async throws {
        try await withMemcachedServers(count: 1) { servers in
            try await withManagers([(try sticky(servers, route: "a"), StretchingClock.noRestartWatch)]) { managers in
                let a = managers[0]
                try await eventually("the watch has looked at n1 once") { a.store.nodeRestarts.knows("n1") }
                try await withInspector(servers) { inspector in
                    var browser = Browser()
                    for _ in 0..<2 { try await a.increment(&browser) }
                    let keys = a.keys(for: try #require(browser.id).token)
                    try await servers[0].restart()
                    try await reconnect(a, "n1")
                    // A cookie of another instance's session there: a takeover's miss, checked.
                    var stranger = Browser(cookie: String(repeating: "A", count: 32) + "-n1.b")
                    #expect(try await a.readCount(&stranger) == 0)
                    try await eventually("A wrote its session back") { try await storedCount(inspector, "n1", keys.primary) == 2 }
                }
            }
        }
    }

    /// Seed 950: after a restart, the owner wrote back a new session whose first (queued) save
    /// had not happened yet; its logout then found nothing stored to end, and the written-back
    /// copy outlived it.
    @Test func aRestoreLeavesNewSessionsToTheirOwnSave() async throws {
        try await withMemcachedServers(count: 1) { servers in
            try await withManagers([try sticky(servers, route: "a", asynchronous: true, delay: .seconds(4))]) { managers in
                let a = managers[0]
                try await eventually("the watch has looked at n1 once") { a.store.nodeRestarts.knows("n1") }
                try await withInspector(servers) { inspector in
                    var old = Browser()
                    try await a.increment(&old)
                    let oldKeys = a.keys(for: try #require(old.id).token)
                    try await eventually("the old session written") { try await storedCount(inspector, "n1", oldKeys.primary) == 1 }
                    try await servers[0].restart()
                    var new = Browser()
                    try await a.increment(&new)  // queued for 4 s
                    let newKeys = a.keys(for: try #require(new.id).token)
                    try await eventually("A wrote the old session back") { try await storedCount(inspector, "n1", oldKeys.primary) == 1 }
                    #expect(try await storedCount(inspector, "n1", newKeys.primary) == nil, "the new one left to its own save")
                    try await a.request(&new) { access in try #require(try await access.load()).invalidate() }
                    #expect(try await storedCount(inspector, "n1", newKeys.primary) == nil)
                }
            }
        }
    }

    /// Seed 87: a new session's first add was applied but its reply lost; a logout then wrote no
    /// tombstone (the session was still "new"), and the copy outlived it.
    @Test func aLogoutAfterALostFirstWriteEndsTheCopyAnyway() async throws {
        try await withMemcachedServers(count: 1) { servers in
            let proxy = try await FaultProxy.start(port: servers[0].port)
            defer { proxy.stop() }
            var config = try SessionManager.Configuration(nodes: "n1:\(proxy.hostAndPort)")
            config.mode = .sticky
            config.route = "a"
            config.sticky.asynchronousSaving = false
            config.memcached.probeInterval = .milliseconds(100)
            config.memcached.requestTimeout = .seconds(5)
            try await withManager(config) { a in
                try await withInspector(servers) { inspector in
                    proxy.cutNextReplies(1, toRequestsContaining: " ME")  // the first add's reply
                    var browser = Browser()
                    _ = try? await a.increment(&browser)
                    let keys = a.keys(for: try #require(browser.id).token)
                    #expect(try await storedCount(inspector, "n1", keys.primary) == 1, "the add was applied")
                    try await eventually("A reaches n1 again") { a.topology.isReachable("n1") }
                    try await a.request(&browser) { access in try #require(try await access.load()).invalidate() }
                    #expect(try await storedCount(inspector, "n1", keys.primary) == nil, "ended in memcached too")
                }
            }
        }
    }
}

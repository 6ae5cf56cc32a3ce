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

@Suite("Logouts and their tombstones")
struct TombstonesTests {
    @Test func aLogoutIsNotUndoneByARacingReadOrALaterFailover() async throws {
        try await withMemcachedServers(count: 3) { servers in
            try await withManager(try configuration(servers)) { manager in
                var browser = Browser()
                try await manager.increment(&browser)
                try await manager.increment(&browser)
                let cookie = browser
                let id = try #require(cookie.id)
                // A read-only request is open while the user logs out; it ends afterwards (its backup
                // refresh must not write the session back).
                let loaded = Barrier(count: 2)
                let loggedOut = Barrier(count: 2)
                async let reader: Int = {
                    var mine = cookie
                    return try await manager.request(&mine) { access in
                        let count = try await access.load()?["count", as: Int.self] ?? 0
                        await loaded.arriveAndWait()
                        await loggedOut.arriveAndWait()
                        return count
                    }
                }()
                await loaded.arriveAndWait()
                var logout = cookie
                try await manager.request(&logout) { access in try await access.invalidate() }
                await loggedOut.arriveAndWait()
                #expect(try await reader == 2)
                // Now the session's node dies: the old cookie must not find a copy to recover.
                try await servers[Int(id.nodeID.dropFirst())! - 1].kill()
                var old = cookie
                #expect(try await manager.readCount(&old) == 0)
                #expect(manager.statistics.value(of: .unavailable) == 0, "a tombstone is an answer: gone, not unavailable")
            }
        }
    }

    @Test func invalidateRemovesEveryCopy() async throws {
        try await withMemcachedServers(count: 2) { servers in
            try await withManager(try configuration(servers) { $0.locking.mode = .all }) { manager in
                try await withInspector(servers) { inspector in
                    var browser = Browser()
                    try await manager.increment(&browser)
                    try await manager.increment(&browser)
                    let id = try #require(browser.id)
                    let keys = manager.keys(for: id.token)
                    let backupNode = id.nodeID == "n1" ? "n2" : "n1"
                    try await eventually("backup written") { try await inspector.node(backupNode).get(keys.backup) != nil }

                    try await manager.request(&browser) { access in try await access.invalidate() }
                    #expect(browser.cookie == nil, "the cookie is cleared")
                    // The primary is a tombstone on every node (after a move the old primary may be
                    // anywhere), the lock is gone.
                    for node in inspector.allNodes {
                        try await eventually("primary tombstone on \(node.id)") {
                            try await node.get(keys.primary)?.flags == SessionManager.tombstoneFlags
                        }
                    }
                    #expect(try await inspector.node(id.nodeID).get(keys.lock) == nil)
                    // Every backup key is now a tombstone: no recovery or repair can bring it back.
                    try await eventually("backup replaced by a tombstone") {
                        try await inspector.node(backupNode).get(keys.backup)?.flags == SessionManager.tombstoneFlags
                    }

                    var old = Browser(cookie: id.description)
                    #expect(try await manager.readCount(&old) == 0)
                    #expect(manager.statistics.value(of: .sessionsInvalidated) == 1)
                }
            }
        }
    }

    /// A logout's tombstones outlive the session's own copies, also when the session's idle
    /// timeout is longer than the default ("remember me"): a backup on a node that missed the
    /// logout must not be found once the tombstones are gone. They used to follow the default
    /// only (60 s here: 150 s of tombstone for a copy living an hour and ten minutes).
    @Test(arguments: [SessionManager.Mode.nonSticky, .sticky])
    func aLogoutsTombstonesOutliveALongerIdleTimeoutsCopies(mode: SessionManager.Mode) async throws {
        try await withMemcachedServers(count: 2) { servers in
            let config = try configuration(servers, mode: mode) {
                $0.timeouts.idle = .seconds(60)
                $0.sticky.asynchronousSaving = false
            }
            try await withManager(config) { manager in
                try await withInspector(servers) { inspector in
                    var browser = Browser()
                    try await manager.request(&browser) { access in
                        let session = try await access.loadOrCreate()
                        try session.set("user", "remembered")
                        session.setIdleTimeout(.seconds(3600))
                    }
                    let id = try #require(browser.id)
                    let keys = manager.keys(for: id.token)
                    func timeToLive(_ key: String, on node: String) async throws -> Int? {
                        guard case .item(let item?) = try await inspector.node(node).execute(.getMetadata(key)) else { return nil }
                        return item.timeToLive
                    }
                    let copy = try #require(try await timeToLive(keys.primary, on: id.nodeID))
                    #expect(copy > 3000)
                    try await manager.request(&browser, path: "/logout") { access in
                        try #require(try await access.load()).invalidate()
                    }
                    for node in ["n1", "n2"] {
                        // Sticky sessions have no backup copy: their primary key, on every node.
                        for key in mode == .nonSticky ? [keys.primary, keys.backup] : [keys.primary] {
                            let tombstone = try #require(try await timeToLive(key, on: node), "a tombstone on \(node)")
                            // The copy's hour plus two refresh windows (5 minutes each), plus a minute.
                            #expect(tombstone > 3600 + 600, "on \(node)")
                        }
                    }
                    #expect(try await manager.readCount(&browser) == 0)
                }
            }
        }
    }

    @Test func aLogoutEndsTheCopiesOnOtherNodesBeforeItsResponse() async throws {
        try await withMemcachedServers(count: 2) { servers in
            let proxy = try await FaultProxy.start(port: servers[1].port)
            defer { proxy.stop() }
            let config = try configuration(n1: servers[0].hostAndPort, n2: proxy.hostAndPort)
            try await withManager(config) { manager in
                try await withInspector(servers) { inspector in
                    var browser = Browser()
                    try await manager.increment(&browser)
                    let id = try #require(browser.id)
                    let keys = manager.keys(for: id.token)
                    // A primary an earlier failover left on n2 (its delete not through yet).
                    let stored = try #require(try await inspector.node("n1").get(keys.primary))
                    try await inspector.node("n2").set(keys.primary, value: stored.value, ttl: .seconds(60), flags: stored.flags)
                    proxy.update { $0.delay = .milliseconds(300) }
                    try await manager.request(&browser) { access in try #require(try await access.load()).invalidate() }
                    // At once: an old tab's cookie for n2, sent right after the logout, finds it ended.
                    #expect(try await inspector.node("n2").get(keys.primary)?.flags == SessionManager.tombstoneFlags)
                    #expect(try await inspector.node("n2").get(keys.backup)?.flags == SessionManager.tombstoneFlags)
                    proxy.update { $0.delay = .zero }
                    var oldTab = Browser(cookie: id.relocated(to: "n2").description)
                    #expect(try await manager.readCount(&oldTab) == 0)
                }
            }
        }
    }

    /// A logout whose session is not found (evicted) still ends its id: the backup that
    /// survived cannot bring it back when the primary's node later fails. (The simulation found it.)
    @Test func aLogoutOfAnEvictedSessionEndsItsBackupToo() async throws {
        try await withMemcachedServers(count: 2) { servers in
            try await withManager(try configuration(servers) { $0.memcached.requestTimeout = .milliseconds(500) }) { manager in
                try await withInspector(servers) { inspector in
                    var browser = Browser()
                    try await manager.increment(&browser)
                    let id = try #require(browser.id)
                    let keys = manager.keys(for: id.token)
                    let backupNode = try inspector.node(id.nodeID == "n1" ? "n2" : "n1")
                    try await eventually("the backup is written") { try await backupNode.get(keys.backup) != nil }
                    #expect(try await inspector.node(id.nodeID).delete(keys.primary) == .deleted)  // "evicted"
                    let old = browser
                    try await manager.request(&browser, path: "/logout") { access in try await access.invalidate() }
                    #expect(browser.cookie == nil)
                    // (The other nodes' tombstones are sent without waiting for them.)
                    try await eventually("the backup is tombstoned") {
                        try await backupNode.get(keys.backup)?.flags == SessionManager.tombstoneFlags
                    }
                    try await servers[Int(id.nodeID.dropFirst())! - 1].kill()
                    var stale = old
                    #expect(try await manager.readCount(&stale) == 0, "not restored from the backup")
                }
            }
        }
    }

    @Test func aRequestRacingALogoutDoesNotBringTheSessionBack() async throws {
        try await withMemcachedServers(count: 2) { servers in
            try await withManager(try configuration(servers)) { manager in
                for _ in 0..<10 {
                    var browser = Browser()
                    try await manager.increment(&browser)
                    let cookie = browser
                    let loaded = Barrier(count: 2)
                    let loggedOut = Barrier(count: 2)
                    async let slow: Browser = {
                        var mine = cookie
                        try await manager.request(&mine) { access in
                            let session = try #require(try await access.load())
                            await loaded.arriveAndWait()
                            await loggedOut.arriveAndWait()
                            try session.set("cart", "stale write after logout")
                        }
                        return mine
                    }()
                    var logout = cookie
                    await loaded.arriveAndWait()
                    try await manager.request(&logout) { access in try await access.invalidate() }
                    await loggedOut.arriveAndWait()
                    let slowBrowser = try await slow
                    // The racing request learns the session is gone, and leaves the cookie alone: it
                    // did not set it (the browser may hold a newer one, a login's).
                    #expect(slowBrowser.cookie == cookie.cookie)
                    var probe = cookie
                    #expect(try await manager.readCount(&probe) == 0)
                }
            }
        }
    }

    /// A logout whose tombstone never reached the session's node (its connection closed under it,
    /// the node still up and marked up) writes it there before it answers: the node holds the
    /// tombstone when the logout's response comes (the simulation, seed 14016: the logout
    /// answered, and another instance served the session there). Two rules see to it, each
    /// enough alone here: the tombstone is tried once more at once, and a logout waits, within the
    /// request timeout, for a missed one to land on the nodes its cookies name. The old cookie then
    /// reads nothing, at once: the lock the logout could not release (its release went with the
    /// tombstone) is not waited out for an ended session.
    @Test func aLogoutsTombstoneThatDidNotArriveLandsBeforeTheLogoutAnswers() async throws {
        try await withProxiedPair { proxy, config, servers in
            try await withManager(config) { manager in
                try await withInspector(servers) { inspector in
                    let (started, id, keys) = try await startedSession(manager)
                    var browser = started
                    try #require(id.nodeID == "n1", "behind the proxy")
                    proxy.dropNextRequests(1, containing: "ms \(keys.primary) ")
                    try await manager.request(&browser, path: "/logout") { access in try await access.invalidate() }
                    #expect(proxy.requestsDropped == 1)
                    #expect(browser.cookie == nil)
                    // servers[0], behind the proxy, read directly.
                    let stored = try await inspector.node("n1").get(keys.primary)
                    #expect(stored?.flags == SessionManager.tombstoneFlags, "the tombstone landed before the logout answered")
                    // The logout's lock stays (its release went with the tombstone), unless a slow
                    // run outlived it: then the wait it would cause cannot be seen.
                    let lockStays = try await inspector.node("n1").get(keys.lock) != nil
                    let waits = manager.statistics.value(of: .lockWaits)
                    var old = Browser(cookie: id.description)
                    #expect(try await manager.readCount(&old) == 0)
                    if lockStays {
                        #expect(manager.statistics.value(of: .lockWaits) == waits, "no wait for an ended session's lock")
                    }
                }
            }
        }
    }
}

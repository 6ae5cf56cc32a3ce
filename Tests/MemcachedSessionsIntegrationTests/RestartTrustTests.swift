import Memcached
import MemcachedTestRig
import NIOCore
import Testing

@_spi(Simulation) @testable import MemcachedSessions

/// Issue 8 §4, found by the chaos drills (`scripts/drills/chaos.py`, restart drill): a primary
/// restarted empty right after a write must not lose it, and misses arriving together after a
/// restart must all find the backup.
@Suite("Restarts under load")
struct RestartTrustTests {
    /// Every new session on n1 (n2 only takes over), so every backup on n2.
    func configuration(n1: String, n2: String) throws -> SessionManager.Configuration {
        var config = try SessionManager.Configuration(nodes: "n1:\(n1),n2:\(n2)")
        config.mode = .nonSticky
        config.failoverNodes = ["n2"]
        config.memcached.probeInterval = .milliseconds(100)
        config.memcached.requestTimeout = .seconds(5)
        return config
    }

    @Test func theBackupIsWrittenBeforeTheResponse() async throws {
        try await withMemcachedServers(count: 2) { servers in
            // The backup node answers late: a backup not waited for lands after the response.
            let proxy = try await FaultProxy.start(port: servers[1].port)
            defer { proxy.stop() }
            let config = try configuration(n1: servers[0].hostAndPort, n2: proxy.hostAndPort)
            try await withManager(config) { manager in
                try await withInspector(servers) { inspector in
                    var browser = Browser()
                    try await manager.increment(&browser)
                    proxy.update { $0.delay = .milliseconds(300) }
                    #expect(try await manager.increment(&browser) == 2)
                    let keys = manager.keys(for: try #require(browser.id).token)
                    let primary = try #require(try await inspector.node("n1").get(keys.primary))
                    // Read at once, not eventually: the response came after the backup.
                    #expect(try await inspector.node("n2").get(keys.backup)?.value == primary.value, "backup written before the response")
                    proxy.update { $0.delay = .zero }
                    // The primary restarted empty: the acknowledged count comes back from the backup.
                    try await servers[0].kill()
                    try await servers[0].restart()
                    try await eventually("the manager uses n1 again") { manager.topology.isReachable("n1") }
                    #expect(try await manager.readCount(&browser) == 2)
                }
            }
        }
    }

    @Test func missesArrivingTogetherAfterARestartAllFindTheirBackups() async throws {
        try await withMemcachedServers(count: 2) { servers in
            let config = try configuration(n1: servers[0].hostAndPort, n2: servers[1].hostAndPort)
            let client = try MemcachedClient(configuration: config.memcached)
            let manager = try SessionManager(configuration: config, nodes: client, clock: StretchingClock.noRestartWatch, entropy: SystemEntropy())
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await client.run() }
                group.addTask { try await manager.run() }
                defer { group.cancelAll() }
                try await eventually("the restart watch has looked at n1 once") { manager.store.nodeRestarts.knows("n1") }
                var browsers = [Browser](repeating: Browser(), count: 12)
                for index in browsers.indices {
                    try await manager.increment(&browsers[index])
                    #expect(try await manager.increment(&browsers[index]) == 2)
                }
                // A miss just before the restart (a forged cookie): before the fix, its check
                // kept every miss of the next second from asking again.
                var stranger = Browser(cookie: String(repeating: "A", count: 32) + "-n1")
                #expect(try await manager.readCount(&stranger) == 0)
                try await servers[0].kill()
                try await servers[0].restart()
                // Every pooled connection to n1 new (each old one fails once, then reconnects), so
                // that the reads below reach the restarted node and miss, rather than fail.
                try await eventually("the manager reaches n1 again on every connection") {
                    do {
                        for _ in 0..<32 { _ = try await client.node("n1").get("probe") }
                        return manager.topology.isReachable("n1")
                    } catch {
                        return false
                    }
                }
                let counts = try await withThrowingTaskGroup(of: Int.self) { reads in
                    for browser in browsers {
                        reads.addTask {
                            var browser = browser
                            return try await manager.increment(&browser)
                        }
                    }
                    var counts: [Int] = []
                    for try await count in reads { counts.append(count) }
                    return counts
                }
                #expect(counts == [Int](repeating: 3, count: browsers.count), "every session found its backup")
                #expect(manager.statistics.value(of: .sessionsRestored) >= browsers.count)
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
}

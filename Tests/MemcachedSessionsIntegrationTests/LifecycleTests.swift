import Foundation
import Logging
import Memcached
import MemcachedTestRig
import NIOCore
import ServiceLifecycle
import Testing

@testable import MemcachedSessions

@Suite("Session lifecycles against real memcached")
struct LifecycleTests {
    @Test func nonStickyCountsAndWritesOnlyWhatChanged() async throws {
        try await withMemcachedServers(count: 2) { servers in
            try await withManager(try configuration(servers)) { manager in
                try await withInspector(servers) { inspector in
                    var browser = Browser()
                    #expect(try await manager.increment(&browser) == 1)
                    let id = try #require(browser.id)
                    #expect(["n1", "n2"].contains(id.nodeID))
                    for expected in 2...5 {
                        #expect(try await manager.increment(&browser) == expected)
                        #expect(browser.id == id, "the cookie only changes when the id does")
                    }
                    // The primary holds the session; the backup the same bytes, on the other node.
                    let keys = manager.keys(for: id.token)
                    let backupNode = id.nodeID == "n1" ? "n2" : "n1"
                    try await eventually("backup written") { try await inspector.node(backupNode).get(keys.backup) != nil }
                    let primary = try #require(try await inspector.node(id.nodeID).get(keys.primary))
                    #expect(try await inspector.node(backupNode).get(keys.backup)?.value == primary.value)

                    // Read-only requests: one round trip each, no write at all.
                    let before = try await commandCounts(inspector)
                    for _ in 0..<20 { #expect(try await manager.readCount(&browser) == 5) }
                    let reads = try await commandCounts(inspector) - before
                    #expect(reads.sets == 0, "\(reads)")
                    // memcached counts `mg` with a TTL as a touch: reads are gets plus touches.
                    #expect(reads.gets + reads.touches >= 20, "\(reads)")
                    #expect(reads.gets + reads.touches <= 20 + 1, "\(reads)")  // + at most one backup refresh per window

                    // A modifying request: one read, one write, and the backup write (which reads
                    // the backup's version first, without its value: a backup never goes back).
                    let beforeWrite = try await commandCounts(inspector)
                    #expect(try await manager.increment(&browser) == 6)
                    try await eventually("backup write arrived") { (try await commandCounts(inspector) - beforeWrite).sets == 2 }
                    let write = try await commandCounts(inspector) - beforeWrite
                    #expect(write.gets + write.touches == 2, "\(write)")
                    #expect(write.sets == 2, "\(write)")

                    // A request that never opens the session still slides its TTL (a touch).
                    let beforeTouch = try await commandCounts(inspector)
                    try await manager.request(&browser, path: "/other") { _ in }
                    try await eventually("touch arrived") { (try await commandCounts(inspector) - beforeTouch).touches >= 1 }
                    #expect((try await commandCounts(inspector) - beforeTouch).sets == 0)

                    let stats = manager.statistics.snapshot().counters
                    #expect(stats["sessions_created"] == 1)
                    #expect(stats["writes"] == 6)
                    #expect(stats["writes_skipped"] == 20)
                }
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

    @Test func asynchronousSavesCoalesceWithinTheirWindow() async throws {
        try await withMemcachedServers(count: 1) { servers in
            let config = try configuration(servers, mode: .sticky) {
                $0.route = "a"
                $0.sticky.saveDelay = .milliseconds(400)
            }
            try await withManager(config) { manager in
                try await withInspector(servers) { inspector in
                    var browser = Browser()
                    try await manager.increment(&browser)
                    try await eventually("first write") { manager.statistics.value(of: .writes) == 1 }
                    let before = try await commandCounts(inspector)
                    for expected in 2...21 { #expect(try await manager.increment(&browser) == expected) }
                    // Twenty changes within the window: written once, with the last state.
                    let id = try #require(browser.id)
                    try await eventually("the window passed and the write landed") {
                        guard let stored = try await inspector.node("n1").get(manager.keys(for: id.token).primary) else { return false }
                        let record = try BinarySessionCodec().decodeSession(from: stored.value)
                        return try BinarySessionCodec().decodeValue(Int.self, from: record.attributes["count"]!) == 21
                    }
                    let writes = try await commandCounts(inspector) - before
                    #expect(writes.sets <= 2, "\(writes)")
                }
            }
        }
    }

    @Test func gracefulShutdownFlushesQueuedWrites() async throws {
        try await withMemcachedServers(count: 2) { servers in
            let manager = try SessionManager(configuration: try configuration(servers, mode: .sticky) { $0.route = "a" })
            let group = ServiceGroup(
                configuration: .init(services: [manager], gracefulShutdownSignals: [], logger: Logger(label: "test")))
            // Structured: whatever happens, the service group stops before the test goes on.
            let browsers = try await withThrowingTaskGroup(of: Void.self) { tasks in
                tasks.addTask { try await group.run() }
                var browsers = [Browser](repeating: Browser(), count: 200)
                do {
                    for index in browsers.indices {
                        for _ in 0..<3 { try await manager.increment(&browsers[index]) }
                    }
                } catch {
                    tasks.cancelAll()
                    throw error
                }
                await group.triggerGracefulShutdown()
                try await tasks.waitForAll()
                return browsers
            }
            // Every queued write reached memcached: another instance reads every final count.
            try await withManager(try configuration(servers, mode: .sticky) { $0.route = "b" }) { (other: SessionManager) async throws in
                for index in browsers.indices {
                    var browser = browsers[index]
                    let count = try await other.readCount(&browser)
                    #expect(count == 3, "session \(index) has \(count)")
                }
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
            try await withManager(try configuration(servers) { $0.timeouts.idle = .seconds(31 * 24 * 3600) }) { manager in
                var browser = Browser()
                try await manager.increment(&browser)
                try await Task.sleep(for: .milliseconds(1100))
                #expect(try await manager.increment(&browser) == 2)
                #expect(try await manager.readCount(&browser) == 2)
            }
            // Zero or less: never expires.
            try await withManager(try configuration(servers) { $0.timeouts.idle = .zero }) { manager in
                var browser = Browser()
                try await manager.increment(&browser)
                #expect(try await manager.readCount(&browser) == 1)
                #expect(manager.configuration.effectiveIdleTimeout == nil)
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
}

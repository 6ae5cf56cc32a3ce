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

@Suite("The non-sticky lifecycle", .serialized)
struct NonStickyLifecycleTests {
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

                    // A modifying request: one read, one write, and the backup write, over this
                    // instance's own last backup write with its CAS unique (no read of the backup's
                    // version first: BackupsTests covers when it does read).
                    let beforeWrite = try await commandCounts(inspector)
                    #expect(try await manager.increment(&browser) == 6)
                    try await eventually("backup write arrived") { (try await commandCounts(inspector) - beforeWrite).sets == 2 }
                    let write = try await commandCounts(inspector) - beforeWrite
                    #expect(write.gets + write.touches == 1, "\(write)")
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

    @Test func nonStickySessionsSurviveKilledNodesAndGetRepaired() async throws {
        try await withMemcachedServers(count: 3) { servers in
            let config = try configuration(servers) { $0.memcached.requestTimeout = .seconds(2) }
            try await withManager(config) { manager in
                let book = try await createSessions(manager, count: 1_000, readOnlyEvery: 5)
                try await verifyAndAdvance(manager, book)

                // Kill the node holding the most sessions while a load is running.
                func busiestNode() -> String {
                    var counts: [String: Int] = [:]
                    for index in 0..<book.count { counts[book[index].browser.id!.nodeID, default: 0] += 1 }
                    return counts.max { $0.value < $1.value }!.key
                }
                let first = busiestNode()
                let firstIndex = Int(first.dropFirst())! - 1
                let onFirst = (0..<book.count).filter { book[$0].browser.id?.nodeID == first }
                let requestsBefore = manager.statistics.value(of: .requestsWithSession)
                try await withThrowingTaskGroup(of: Void.self) { group in
                    group.addTask { try await verifyAndAdvance(manager, book, whileANodeDies: true) }
                    // Killed under load: once a tenth of the round is through.
                    try await eventually(timeout: .seconds(60), "the load is running") {
                        manager.statistics.value(of: .requestsWithSession) - requestsBefore >= 100
                    }
                    try await servers[firstIndex].kill()
                    try await group.waitForAll()
                }
                let uncertain = book.entries.withLock { $0.filter(\.uncertain).count }
                #expect(uncertain <= 50, "\(uncertain) writes were in flight when the node died")
                try await verifyAndAdvance(manager, book)
                // Sessions that lived on the dead node now carry the id of the node that took them.
                let target = manager.topology.nextAvailable(after: first)!
                for index in onFirst {
                    #expect(book[index].browser.id?.nodeID == target)
                }
                #expect(manager.statistics.value(of: .memcachedFailovers) >= onFirst.count)

                // Restart it (empty), kill another: every session still reads back, which needs
                // the copies that survived the first failure to have got a backup again.
                try await servers[firstIndex].restart()
                try await eventually("restarted node is up") { manager.topology.isAvailable(first) }
                try await verifyAndAdvance(manager, book)
                let second = busiestNode()
                try await servers[Int(second.dropFirst())! - 1].kill()
                try await verifyAndAdvance(manager, book)
                try await verifyAndAdvance(manager, book)
            }
        }
    }
}

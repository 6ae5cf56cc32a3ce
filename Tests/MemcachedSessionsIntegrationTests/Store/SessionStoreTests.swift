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

@Suite("The store: CAS writes and merges, stored bytes, sizes")
struct SessionStoreTests {
    @Test(arguments: SessionManager.Mode.allCases)
    func concurrentRequestsChangingDifferentAttributesBothSurvive(mode: SessionManager.Mode) async throws {
        try await withMemcachedServers(count: 2) { servers in
            let config = try configuration(servers, mode: mode) {
                $0.route = mode == .sticky ? "a" : nil
                $0.sticky.asynchronousSaving = false
            }
            let other = try configuration(servers, mode: mode) {
                $0.route = mode == .sticky ? "a" : nil  // two instances claiming one route: a worst case
                $0.sticky.asynchronousSaving = false
            }
            try await withManagers([config, other]) { managers in
                var browser = Browser()
                try await managers[0].increment(&browser)
                for round in 0..<20 {
                    let barrier = Barrier(count: 2)
                    let cookie = browser
                    try await withThrowingTaskGroup(of: Void.self) { group in
                        for (index, name) in ["a", "b"].enumerated() {
                            group.addTask {
                                var mine = cookie
                                try await managers[index].request(&mine) { access in
                                    let session = try #require(try await access.load())
                                    await barrier.arriveAndWait()  // both have read before either writes
                                    try session.set(name, round)
                                }
                            }
                        }
                        try await group.waitForAll()
                    }
                    // A fresh instance (memcached's view) sees both changes.
                    try await withManager(try configuration(servers, mode: mode) { $0.route = "z" }) {
                        (fresh: SessionManager) async throws in
                        var probe = cookie
                        let (a, b) = try await fresh.request(&probe) { access -> (Int?, Int?) in
                            let session = try await access.load()
                            return (session?["a", as: Int.self], session?["b", as: Int.self])
                        }
                        #expect(a == round && b == round, "round \(round): a=\(String(describing: a)) b=\(String(describing: b))")
                    }
                }
                #expect(managers.map { $0.statistics.value(of: .writeConflicts) }.reduce(0, +) >= 1)
            }
        }
    }

    /// Two requests recover one session from its backup at once (its node is dead), on two
    /// instances: one counts, the other changes another attribute. The loser of the race to write
    /// it at its new place merges only its own change; it used to merge its whole recovered copy,
    /// putting the old count back over the winner's.
    @Test func concurrentRecoveriesMergeOnlyTheirOwnChanges() async throws {
        try await withMemcachedServers(count: 3) { servers in
            let config = try configuration(servers) {
                $0.memcached.requestTimeout = .milliseconds(500)
                $0.memcached.failureThreshold = 1
            }
            try await withManagers([config, config]) { managers in
                try await withInspector(servers) { inspector in
                    var browser = Browser()
                    try await managers[0].increment(&browser)
                    let id = try #require(browser.id)
                    let keys = managers[0].keys(for: id.token)
                    let backupNode = managers[0].topology.nextAvailable(after: id.nodeID)!
                    try await eventually("the backup is written") { try await inspector.node(backupNode).get(keys.backup) != nil }
                    try await servers[Int(id.nodeID.dropFirst())! - 1].kill()
                    let counting = managers[0].beginRequest(path: "/counter", sessionCookie: browser.cookie)
                    let noting = managers[1].beginRequest(path: "/note", sessionCookie: browser.cookie)
                    async let first = counting.load()
                    async let second = noting.load()
                    let (counted, noted) = try await (#require(first), #require(second))
                    try counted.set("count", (counted["count", as: Int.self] ?? 0) + 1)
                    try noted.set("note", "kept")
                    let winner = try await managers[0].endRequest(counting)
                    _ = try await managers[1].endRequest(noting)
                    if case .set(let moved) = winner.cookie { browser.cookie = moved.description }
                    try await managers[1].request(&browser, path: "/read") { access in
                        let session = try #require(try await access.load())
                        #expect(session["count", as: Int.self] == 2, "the winner's count survives")
                        #expect(session["note", as: String.self] == "kept")
                    }
                }
            }
        }
    }

    /// Non-sticky: the session's copy is evicted while a request holds it. Its write finds
    /// nothing; no tombstone says the session ended, so the request writes it again rather than
    /// dropping the change (a logout would have left tombstones). (The simulation found it.)
    @Test func anEvictedCopyIsWrittenAgainByTheRequestHoldingIt() async throws {
        try await withMemcachedServers(count: 2) { servers in
            try await withManager(try configuration(servers)) { manager in
                try await withInspector(servers) { inspector in
                    var browser = Browser()
                    try await manager.increment(&browser)
                    let id = try #require(browser.id)
                    let keys = manager.keys(for: id.token)
                    let access = manager.beginRequest(path: "/counter", sessionCookie: browser.cookie)
                    let session = try #require(try await access.load())
                    #expect(try await inspector.node(id.nodeID).delete(keys.primary) == .deleted)  // "evicted"
                    try session.set("count", 2)
                    #expect(try await manager.endRequest(access).cookie == .unchanged)
                    #expect(try await manager.readCount(&browser) == 2)
                }
            }
        }
    }

    /// The simulation, seed 9611: a request read the session on its node, a concurrent request
    /// (another tab) then moved it off that node while it was frozen, and the move's cleanup
    /// deleted the old copy once the node thawed. The first request's write, finding its copy
    /// missing, wrote the session there again: two copies, the moved one without its change. Its
    /// changes go where the session is now, merged onto that copy, with that cookie.
    @Test func aWriteWhoseCopyAConcurrentRequestMovedGoesWhereTheSessionIsNow() async throws {
        try await withMemcachedServers(count: 3) { servers in
            let config = try configuration(servers) {
                // Long enough that only the frozen node times out: seen at 300 ms (and once at
                // 1 s, on the first run after a build) failing a healthy node's write on a loaded
                // machine.
                $0.memcached.requestTimeout = .seconds(2)
                $0.memcached.failureThreshold = 1
            }
            try await withManager(config) { manager in
                try await withInspector(servers) { inspector in
                    var browser = Browser()
                    try await manager.increment(&browser)
                    let id = try #require(browser.id)
                    let keys = manager.keys(for: id.token)
                    // The first tab's request has read the session and is still running.
                    let slow = manager.beginRequest(path: "/part0", sessionCookie: browser.cookie)
                    try #require(try await slow.load()).set("part0", true)
                    // Its node freezes; another tab's request moves the session off it.
                    let home = servers[Int(id.nodeID.dropFirst())! - 1]
                    try await home.freeze()
                    var tab = browser
                    try await manager.request(&tab, path: "/part1") { access in
                        try #require(try await access.load()).set("part1", true)
                    }
                    home.thaw()
                    let moved = try #require(tab.id)
                    #expect(moved.nodeID != id.nodeID && moved.token == id.token, "moved, same token")
                    try await eventually("the move's cleanup ended the old copy") {
                        guard manager.topology.isAvailable(id.nodeID), manager.store.leftovers.count == 0 else { return false }
                        return try await inspector.node(id.nodeID).get(keys.primary) == nil
                    }
                    // The first request ends: its write finds its copy gone.
                    #expect(try await manager.endRequest(slow).cookie == .set(moved), "the cookie of where it is now")
                    #expect(try await inspector.node(id.nodeID).get(keys.primary) == nil, "not written again where it was")
                    var check = tab
                    try await manager.request(&check) { access in
                        let session = try #require(try await access.load())
                        #expect(session["part0", as: Bool.self] == true, "the first request's change")
                        #expect(session["part1", as: Bool.self] == true, "the mover's change")
                        #expect(session["count", as: Int.self] == 1)
                    }
                }
            }
        }
    }

    @Test(arguments: SessionManager.Mode.allCases)
    func oversizedSessionsAreAClearErrorAndThePreviousCopyStays(mode: SessionManager.Mode) async throws {
        try await withMemcachedServers(count: 1) { servers in
            let config = try configuration(servers, mode: mode) { $0.sticky.asynchronousSaving = false }
            try await withManager(config) { manager in
                var browser = Browser()
                try await manager.increment(&browser)
                try await manager.increment(&browser)
                let error = await sessionError {
                    try await manager.request(&browser) { access in
                        let session = try #require(try await access.load())
                        try session.set("count", 3)
                        try session.set("huge", String(repeating: "x", count: 2 * 1024 * 1024))
                    }
                }
                #expect(error?.code == .sessionTooLarge)
                #expect(manager.statistics.value(of: .oversizedSessions) >= 1)
                // Memcached still has the previous copy (a second instance reads it).
                try await withManager(try configuration(servers, mode: mode) { $0.route = "other" }) {
                    (fresh: SessionManager) async throws in
                    var probe = browser
                    #expect(try await fresh.readCount(&probe) == 2)
                }
            }
        }
    }

    @Test func corruptAndForeignStoredBytesAreMissingDeletedAndCounted() async throws {
        try await withMemcachedServers(count: 1) { servers in
            try await withManager(try configuration(servers)) { manager in
                try await withInspector(servers) { inspector in
                    for garbage in ["", "hello", "\r\nflush_all\r\n", "MS\u{1}\u{0}truncated", String(repeating: "\u{FF}", count: 5000)] {
                        var browser = Browser()
                        try await manager.increment(&browser)
                        let id = try #require(browser.id)
                        let key = manager.keys(for: id.token).primary
                        try await inspector.node(id.nodeID).set(key, value: ByteBuffer(string: garbage))
                        #expect(try await manager.readCount(&browser) == 0)
                        try await eventually("corrupt key deleted") { try await inspector.node(id.nodeID).get(key) == nil }
                    }
                    #expect(manager.statistics.value(of: .corruptSessions) == 5)
                }
            }
            // Bytes of another codec are foreign too.
            var browser = Browser()
            try await withManager(try configuration(servers) { $0.codec = JSONDocumentCodec() }) { (other: SessionManager) async throws in
                #expect(try await other.increment(&browser) == 1)
                #expect(try await other.increment(&browser) == 2)
                #expect(try await other.readCount(&browser) == 2, "the JSON document codec works end to end")
            }
            try await withManager(try configuration(servers)) { (manager: SessionManager) async throws in
                #expect(try await manager.readCount(&browser) == 0)
                #expect(manager.statistics.value(of: .corruptSessions) == 1)
            }
        }
    }
}

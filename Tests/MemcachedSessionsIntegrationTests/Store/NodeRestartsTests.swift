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

@Suite("Nodes restarted empty")
struct NodeRestartsTests {
    /// A node that evicted items may have lost sessions: a miss there, within the copies'
    /// horizon of the eviction, is looked for in the backups, as after a restart, and the node
    /// is asked at the miss (the watch need not have seen the eviction). A logged-out session
    /// whose tombstone was evicted stays ended (its backup's tombstone says so). memcached runs
    /// with 2 MB here, filled with items of the copy's size until it evicts the copy.
    @Test(arguments: [false, true])
    func aSessionEvictedFromItsNodeIsReadFromItsBackup(loggedOut: Bool) async throws {
        try await withMemcachedServers(count: 2, memoryMegabytes: 2) { servers in
            let config = try configuration(n1: servers[0].hostAndPort, n2: servers[1].hostAndPort)
            try await withManager(config) { manager in
                try await withInspector(servers) { inspector in
                    let (started, id, keys) = try await startedSession(manager)
                    var browser = started
                    try #require(id.nodeID == "n1")
                    #expect(try await manager.increment(&browser) == 2)
                    let n1 = try inspector.node("n1")
                    try await eventually("a backup on n2") { try await inspector.node("n2").get(keys.backup) != nil }
                    try await eventually("n1's evictions known") { manager.store.nodeRestarts.knows("n1") }
                    #expect(!manager.store.missMayBeRestart(on: "n1"))
                    if loggedOut {
                        var loggingOut = browser
                        try await manager.request(&loggingOut, path: "/logout") { access in try await access.invalidate() }
                        #expect(loggingOut.cookie == nil)
                    }
                    // Items of the copy's size (key, value and flags), in its slab class: rounds of three
                    // times what 2 MB holds, the copy looked at only between rounds (a read moves
                    // it up the LRU).
                    let copy = try #require(try await n1.get(keys.primary))
                    let junk = ByteBuffer(repeating: UInt8(ascii: "j"), count: copy.value.readableBytes)
                    func junkKey(_ number: Int) -> String {
                        let name = "junk\(number)-"
                        return name + String(repeating: "x", count: max(0, keys.primary.utf8.count - name.utf8.count))
                    }
                    var written = 0
                    for _ in 0..<10 {
                        for _ in 0..<40 {
                            let batch = (0..<500).map { number in
                                MemcachedRequest.store(
                                    junkKey(written + number), value: junk, mode: .set, ttl: .seconds(60), flags: copy.flags)
                            }
                            let results = await n1.executeBatch(batch)
                            try #require(results.allSatisfy { if case .success = $0 { true } else { false } }, "the junk written")
                            written += batch.count
                        }
                        if try await n1.get(keys.primary) == nil { break }
                    }
                    try #require(try await n1.get(keys.primary) == nil, "the copy evicted after \(written) items")
                    if loggedOut {
                        #expect(try await manager.readCount(&browser) == 0, "ended: not brought back from its backup")
                    } else {
                        #expect(try await manager.readCount(&browser) == 2, "read from its backup")
                    }
                    #expect(manager.store.missMayBeRestart(on: "n1"), "the eviction seen at the miss")
                }
            }
        }
    }

    @Test func aQuicklyRestartedNodeDoesNotLoseSessionsThatHaveABackup() async throws {
        try await withMemcachedServers(count: 2) { servers in
            try await withManager(try configuration(servers)) { manager in
                var browsers = [Browser](repeating: Browser(), count: 20)
                for index in browsers.indices {
                    for _ in 0..<3 { try await manager.increment(&browsers[index]) }
                }
                try await eventually("both nodes' boot times known") {
                    !manager.store.missMayBeRestart(on: "n1") && !manager.store.missMayBeRestart(on: "n2")
                        && manager.store.nodeRestarts.knows("n1") && manager.store.nodeRestarts.knows("n2")
                }
                // Restart n1 between requests: no request saw it down.
                try await servers[0].kill()
                try await servers[0].restart()
                try await eventually("restart noticed") { manager.store.missMayBeRestart(on: "n1") }
                for index in browsers.indices {
                    #expect(try await manager.readCount(&browsers[index]) == 3, "session \(index)")
                    #expect(try await manager.increment(&browsers[index]) == 4)
                }
                #expect(manager.statistics.value(of: .sessionsRestored) >= 1)
                // Written back: the next read is a plain hit.
                let restored = manager.statistics.value(of: .sessionsRestored)
                for index in browsers.indices { #expect(try await manager.readCount(&browsers[index]) == 4) }
                #expect(manager.statistics.value(of: .sessionsRestored) == restored)
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

    /// Non-sticky: the session's node restarts (empty) while a request holds the session. The
    /// write then finds no copy; the request still holds the whole session, so it writes it
    /// again (no logout's tombstone anywhere) instead of dropping the change or clearing the
    /// cookie as for a logout. (The simulation found it on its own.)
    @Test func aNodeRestartedDuringARequestDoesNotLoseTheSession() async throws {
        try await withMemcachedServers(count: 2) { servers in
            try await withManager(try configuration(servers)) { manager in
                var browser = Browser()
                try await manager.increment(&browser)
                try await manager.increment(&browser)
                let (node, access, session) = try await loadedRequest(of: browser, path: "/counter", on: manager)
                try await restartEmpty(servers, node: node, seenBy: manager)
                try session.set("count", 3)
                let action = try await manager.endRequest(access)
                #expect(action.cookie == .unchanged)
                #expect(try await manager.readCount(&browser) == 3, "the change and the session survived")
            }
        }
    }

    /// Non-sticky, without locking: two requests load the session; one changes an attribute and
    /// is saved (primary and backup); the session's node then restarts (empty), and the other
    /// request's write finds no copy. Its copy was loaded before the first request's change: it
    /// is merged onto the newer copy the search finds (the backup), not written as it was, which
    /// would drop the acknowledged change. (The simulation found the shape: non-sticky seed 34826.)
    @Test func aWriteAfterARestartKeepsTheChangeSavedSinceItsLoad() async throws {
        try await withMemcachedServers(count: 2) { servers in
            try await withManager(try configuration(servers) { $0.locking.mode = .none }) { manager in
                var browser = Browser()
                try await manager.increment(&browser)
                let (node, late, session) = try await loadedRequest(of: browser, path: "/late", on: manager)
                var other = browser
                try await manager.request(&other, path: "/other") { access in
                    try #require(try await access.load()).set("part0", "a")
                }
                try await restartEmpty(servers, node: node, seenBy: manager)
                try session.set("part1", "b")
                _ = try await manager.endRequest(late)
                var reader = browser
                let (part0, part1) = try await manager.request(&reader, path: "/read") { access in
                    let session = try #require(try await access.load())
                    return (session["part0", as: String.self], session["part1", as: String.self])
                }
                #expect(part0 == "a", "the change saved since the load survives")
                #expect(part1 == "b")
            }
        }
    }

    /// Two copies of one version (the simulation, non-sticky seed 67253): B loads the session; A's
    /// write lands on n1, and its backup write is held on its way to n2 (a stalled proxy); n1
    /// restarts (empty). B's write finds the copy lost, finds nothing newer than what it loaded
    /// (A's backup has not landed), and writes its own copy, of A's version, and its backup.
    /// Then A's backup write arrives and meets B's backup: same version, other bytes. A's change
    /// is merged onto B's copy: both changes survive, in the primary and in the backup (read
    /// after another restart). Fails without the fork's detection: A's backup write takes B's
    /// backup for "as new already", and A's change is gone.
    @Test func twoCopiesOfOneVersionAfterARestartAreMerged() async throws {
        // A reaches n2 through a proxy that holds its backup write.
        try await withTwoInstances(proxied: [(instance: 0, node: 1)]) { instance, configuration in
            configuration.locking.mode = .none
            // A's backup write waits out the stall (a restart of memcached, B's request), however
            // slow a loaded machine is.
            if instance == 0 { configuration.memcached.requestTimeout = .seconds(30) }
        } _: { managers, proxies, servers, inspector in
            let (a, b) = (managers[0], managers[1])
            let proxy = proxies[0]
            var browser = Browser()
            try await a.increment(&browser)
            let id = try #require(browser.id)
            try #require(id.nodeID == "n1")
            let keys = a.keys(for: id.token)
            let (_, late, session) = try await loadedRequest(of: browser, path: "/b", on: b)
            try await eventually("A knows n1's boot time") { a.store.nodeRestarts.knows("n1") }
            proxy.stall()
            let started = browser
            let aSaved = Task {
                var mine = started
                try await a.request(&mine, path: "/a") { access in try #require(try await access.load()).set("part0", "a") }
            }
            try await eventually("A's write landed on n1") {
                guard let item = try await inspector.node("n1").get(keys.primary) else { return false }
                return try BinarySessionCodec().decodeSession(from: item.value).attributes["part0"] != nil
            }
            try await restartEmpty(servers, node: "n1", seenBy: b)
            try session.set("part1", "b")
            _ = try await b.endRequest(late)
            try await eventually("A reaches n1 again") { a.topology.isReachable("n1") }
            proxy.resume()
            try await aSaved.value
            #expect(a.statistics.value(of: .backupFailures) == 0, "A's backup write was answered")
            #expect(a.statistics.value(of: .backupForks) == 1, "A's backup write met B's copy of its version")
            func parts() async throws -> [String?] {
                var reader = browser
                return try await b.request(&reader, path: "/read") { access in
                    let session = try #require(try await access.load())
                    return [session["part0", as: String.self], session["part1", as: String.self]]
                }
            }
            #expect(try await parts() == ["a", "b"], "both changes in the primary")
            try await restartEmpty(servers, node: "n1", seenBy: b)
            #expect(try await parts() == ["a", "b"], "both changes in the backup")
        }
    }

    /// A locked request whose node restarted empty finds its session living as a primary on
    /// another node (a move while the node was down put it there): it works under that node's
    /// lock, which a request with the session's current cookie holds while it runs, not under the
    /// restarted node's. With that lock held by someone else, its wait ends at the budget and it
    /// changes nothing.
    @Test func aLockedRequestAfterARestartFindingTheSessionElsewhereTakesThatNodesLock() async throws {
        try await withMemcachedServers(count: 2) { servers in
            let config = try configuration(servers) {
                $0.locking.mode = .all
                $0.locking.waitBudget = .seconds(1)
            }
            try await withManager(config) { manager in
                try await withInspector(servers) { inspector in
                    let (started, id, keys) = try await startedSession(manager)
                    var browser = started
                    try #require(id.nodeID == "n1")
                    try await eventually("n1's boot time known") {
                        manager.store.nodeRestarts.knows("n1") && !manager.store.missMayBeRestart(on: "n1")
                    }
                    let n2 = try inspector.node("n2")
                    // The session as it is (count 1), living on n2, and someone else's request there.
                    let copy = try await livingElsewhere(keys, on: "n2", someoneElsesLock: true, inspector)
                    try await restartEmpty(servers, node: "n1", seenBy: manager)
                    let error = await sessionError { try await manager.increment(&browser) }
                    #expect(error?.code == .lockUnavailable, "\(String(describing: error))")
                    #expect(try await n2.get(keys.primary)?.value == copy.value, "unchanged under someone else's lock")
                    #expect(try await n2.get(keys.lock).map { String(buffer: $0.value) } == "someone-else")
                }
            }
        }
    }
}

/// A request of `browser`'s session on `path`, begun and loaded once `manager` knows the boot time
/// of the session's node (so that it sees that node's restart); with that node's id.
private func loadedRequest(
    of browser: Browser, path: String, on manager: SessionManager
) async throws -> (node: String, access: SessionAccess, session: MemcachedSession) {
    let node = try #require(browser.id).nodeID
    try await eventually("the nodes' boot times are known") { manager.store.nodeRestarts.knows(node) }
    let access = manager.beginRequest(path: path, sessionCookie: browser.cookie)
    let session = try #require(try await access.load())
    return (node, access, session)
}

/// Kills the server of `node` ("n1" is the first of `servers`) and starts it again (empty), then
/// waits until `manager` has seen the restart.
private func restartEmpty(_ servers: [MemcachedServer], node: String, seenBy manager: SessionManager) async throws {
    let server = servers[Int(node.dropFirst())! - 1]
    try await server.kill()
    try await server.restart()
    try await eventually("the restart is seen") { manager.store.missMayBeRestart(on: node) }
}

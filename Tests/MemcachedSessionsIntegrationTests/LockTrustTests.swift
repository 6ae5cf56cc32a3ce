import Memcached
import MemcachedTestRig
import NIOCore
import Testing

@testable import MemcachedSessions

/// Issue 8 §2: a lost lock is acted on, a merge never runs without the lock, a read that fails
/// once on a node still up does not move the session (two copies, two locks).
@Suite("Locks under faults")
struct LockTrustTests {
    /// Runs a locked request that sets `count` to 100 while `meanwhile` runs with the request
    /// holding its lock (loaded, not ended). Returns the request's error, if any.
    func lockedRequest(
        _ manager: SessionManager, _ browser: Browser, setting value: Int = 100, meanwhile: () async throws -> Void
    ) async throws -> SessionError? {
        let holding = Barrier(count: 2)
        let finish = Barrier(count: 2)
        let request = Task {
            var mine = browser
            return await sessionError {
                try await manager.request(&mine) { access in
                    let session = try #require(try await access.load())
                    await holding.arriveAndWait()
                    await finish.arriveAndWait()
                    try session.set("count", value)
                }
            }
        }
        await holding.arriveAndWait()
        do {
            try await meanwhile()
        } catch {
            await finish.arriveAndWait()
            _ = await request.value
            throw error
        }
        await finish.arriveAndWait()
        return await request.value
    }

    /// Another instance's lock in place of ours (ours expired and was taken).
    func stealLock(_ inspector: MemcachedClient, node: String, key: String) async throws {
        _ = try await inspector.node(node).delete(key)
        try await inspector.node(node).set(key, value: ByteBuffer(string: "someone-else"), ttl: .seconds(30))
    }

    @Test func aLostLockRefusesTheWriteWhenTheSessionChangedMeanwhile() async throws {
        try await withMemcachedServers(count: 1) { servers in
            let locked = try configuration(servers) {
                $0.locking.mode = .all
                $0.locking.expiry = .seconds(3)
            }
            let unlocked = try configuration(servers) { $0.locking.mode = .none }
            try await withManagers([locked, unlocked]) { managers in
                try await withInspector(servers) { inspector in
                    var browser = Browser()
                    try await managers[0].increment(&browser)
                    let id = try #require(browser.id)
                    let keys = managers[0].keys(for: id.token)
                    let error = try await lockedRequest(managers[0], browser) {
                        try await stealLock(inspector, node: id.nodeID, key: keys.lock)
                        // The thief's request changes the session, then ends.
                        var other = browser
                        #expect(try await managers[1].increment(&other) == 2)
                        try await eventually(timeout: .seconds(30), "the renewal finds the lock lost") {
                            managers[0].statistics.value(of: .locksLost) == 1
                        }
                        _ = try await inspector.node(id.nodeID).delete(keys.lock)
                    }
                    #expect(error?.code == .lockUnavailable, "refused, not merged over the other request's change")
                    #expect(managers[0].statistics.value(of: .lockConflicts) == 1)
                    var reader = browser
                    #expect(try await managers[1].readCount(&reader) == 2, "the other request's change stands")
                    #expect(try await inspector.node(id.nodeID).get(keys.lock) == nil, "the lock taken again was released")
                }
            }
        }
    }

    @Test func aLostLockIsTakenAgainWhenTheSessionDidNotChange() async throws {
        try await withMemcachedServers(count: 1) { servers in
            let locked = try configuration(servers) {
                $0.locking.mode = .all
                $0.locking.expiry = .seconds(3)
            }
            try await withManager(locked) { manager in
                try await withInspector(servers) { inspector in
                    var browser = Browser()
                    try await manager.increment(&browser)
                    let id = try #require(browser.id)
                    let keys = manager.keys(for: id.token)
                    let error = try await lockedRequest(manager, browser) {
                        try await stealLock(inspector, node: id.nodeID, key: keys.lock)
                        try await eventually(timeout: .seconds(30), "the renewal finds the lock lost") {
                            manager.statistics.value(of: .locksLost) == 1
                        }
                        _ = try await inspector.node(id.nodeID).delete(keys.lock)
                    }
                    #expect(error == nil)
                    #expect(manager.statistics.value(of: .lockConflicts) == 0)
                    var reader = browser
                    #expect(try await manager.readCount(&reader) == 100)
                    #expect(try await inspector.node(id.nodeID).get(keys.lock) == nil)
                }
            }
        }
    }

    /// A write conflict frees the lock (the release rode with the write): the merge takes it
    /// again first. One change its lock did not keep out (an unlocked request's) is merged under
    /// the lock; more than one may include a locked request's that read the copy without this
    /// request's changes, so the write is refused rather than merged.
    @Test func aConflictTakesTheLockAgainAndMergesOnlyWhatTheLockKeptApart() async throws {
        try await withMemcachedServers(count: 1) { servers in
            let locked = try configuration(servers) { $0.locking.mode = .all }
            let unlocked = try configuration(servers) { $0.locking.mode = .none }
            try await withManagers([locked, unlocked]) { managers in
                try await withInspector(servers) { inspector in
                    var browser = Browser()
                    try await managers[0].increment(&browser)
                    let id = try #require(browser.id)
                    let keys = managers[0].keys(for: id.token)
                    func setOther(_ value: String) async throws {
                        var other = browser
                        try await managers[1].request(&other, path: "/other") { access in
                            try #require(try await access.load()).set("other", value)
                        }
                    }
                    let acquiredBefore = managers[0].statistics.value(of: .locksAcquired)
                    let merged = try await lockedRequest(managers[0], browser) { try await setOther("a") }
                    #expect(merged == nil)
                    #expect(managers[0].statistics.value(of: .locksAcquired) == acquiredBefore + 2, "taken again for the merge")
                    var reader = browser
                    let (count, other) = try await managers[1].request(&reader) { access in
                        let session = try #require(try await access.load())
                        return (session["count", as: Int.self], session["other", as: String.self])
                    }
                    #expect(count == 100)
                    #expect(other == "a")

                    let refused = try await lockedRequest(managers[0], browser, setting: 200) {
                        try await setOther("b")
                        try await setOther("c")
                    }
                    #expect(refused?.code == .lockUnavailable)
                    #expect(managers[0].statistics.value(of: .lockConflicts) == 1)
                    #expect(try await inspector.node(id.nodeID).get(keys.lock) == nil)
                }
            }
        }
    }

    /// n1 behind a fault proxy, n2 its backup (a failover node, so new sessions go to n1).
    func withProxiedPair(
        _ body: (_ proxy: FaultProxy, _ config: SessionManager.Configuration, _ servers: [MemcachedServer]) async throws -> Void
    ) async throws {
        try await withMemcachedServers(count: 2) { servers in
            let proxy = try await FaultProxy.start(port: servers[0].port)
            defer { proxy.stop() }
            var config = try SessionManager.Configuration(nodes: "n1:\(proxy.hostAndPort),n2:\(servers[1].hostAndPort)")
            config.mode = .nonSticky
            config.failoverNodes = ["n2"]
            config.locking.mode = .all
            config.memcached.probeInterval = .milliseconds(100)
            config.memcached.requestTimeout = .seconds(5)
            // Up (a cut fails the lock and the read, and background polls may fail too).
            config.memcached.failureThreshold = 10
            try await body(proxy, config, servers)
        }
    }

    @Test func aReadThatFailsOnceOnANodeStillUpIsTriedAgainNotMoved() async throws {
        try await withProxiedPair { proxy, config, _ in
            try await withManager(config) { manager in
                var browser = Browser()
                #expect(try await manager.increment(&browser) == 1)
                let cookie = try #require(browser.cookie)
                #expect(browser.id?.nodeID == "n1")
                let primary = manager.keys(for: try #require(browser.id).token).primary
                proxy.cutNextReplies(1, toRequestsContaining: "mg \(primary)")
                #expect(try await manager.increment(&browser) == 2)
                #expect(proxy.repliesCut == 1)
                #expect(browser.cookie == cookie, "not moved")
                #expect(manager.statistics.value(of: .readRetries) == 1)
                #expect(manager.statistics.value(of: .relocations) == 0)
                #expect(manager.statistics.value(of: .lockWaits) == 0, "the lock its lost reply took is its own")
            }
        }
    }

    @Test func aReadThatFailsTwiceOnANodeStillUpIsUnavailableNotMoved() async throws {
        try await withProxiedPair { proxy, config, _ in
            try await withManager(config) { manager in
                var browser = Browser()
                #expect(try await manager.increment(&browser) == 1)
                let cookie = try #require(browser.cookie)
                let primary = manager.keys(for: try #require(browser.id).token).primary
                let released = manager.statistics.value(of: .locksReleased)
                proxy.cutNextReplies(2, toRequestsContaining: "mg \(primary)")
                let error = await sessionError { try await manager.increment(&browser) }
                #expect(error?.code == .unavailable)
                #expect(manager.statistics.value(of: .relocations) == 0)
                #expect(browser.cookie == cookie)
                // The node answers again: the session is where it was, unchanged, and the lock
                // the lost reply took was released (not waited out).
                try await eventually("the orphaned lock released") { manager.statistics.value(of: .locksReleased) == released + 1 }
                let waits = manager.statistics.value(of: .lockWaits)
                #expect(try await manager.increment(&browser) == 2)
                #expect(manager.statistics.value(of: .lockWaits) == waits)
                #expect(browser.cookie == cookie)
            }
        }
    }
}

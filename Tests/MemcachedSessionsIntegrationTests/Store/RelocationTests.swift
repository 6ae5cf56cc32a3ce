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

@Suite("Relocation off a failed node, and what it leaves behind")
struct RelocationTests {
    @Test func aRecoveredSessionCanBeInvalidated() async throws {
        try await withMemcachedServers(count: 3) { servers in
            try await withManager(try configuration(servers)) { manager in
                var browser = Browser()
                try await manager.increment(&browser)
                let original = browser
                let id = try #require(original.id)
                try await servers[Int(id.nodeID.dropFirst())! - 1].kill()
                #expect(try await manager.increment(&browser) == 2)
                #expect(browser.id?.nodeID != id.nodeID, "recovered onto another node")
                try await manager.request(&browser) { access in try await access.invalidate() }
                var viaOld = original
                var viaNew = Browser(cookie: original.id!.relocated(to: manager.topology.nextAvailable(after: id.nodeID)!).description)
                #expect(try await manager.readCount(&viaOld) == 0)
                #expect(try await manager.readCount(&viaNew) == 0)
            }
        }
    }

    /// The busiest defect of the review: a node freezes (SIGSTOP) past the request timeout, the
    /// session moves to another node under a new id, the node thaws, the user logs out: the
    /// pre-failover cookie must read nothing, on any instance. The old primary used to stay, so
    /// every pre-failover cookie still read its session after the logout.
    @Test(arguments: [SessionManager.Mode.nonSticky, .sticky])
    func aLogoutAfterAFailoverEndsTheOldPrimaryToo(mode: SessionManager.Mode) async throws {
        try await withMemcachedServers(count: 3) { servers in
            func config(_ route: String) throws -> SessionManager.Configuration {
                try configuration(servers, mode: mode) {
                    $0.memcached.requestTimeout = .milliseconds(300)
                    $0.memcached.failureThreshold = 1
                    $0.sticky.asynchronousSaving = false
                    if mode == .sticky { $0.route = route }
                }
            }
            try await withManagers([try config("a"), try config("b")]) { managers in
                var browser = Browser()
                for _ in 0..<2 { try await managers[0].increment(&browser) }
                let old = browser
                let id = try #require(old.id)
                let frozen = servers[Int(id.nodeID.dropFirst())! - 1]
                try await frozen.freeze()
                // The session moves off the frozen node (a write to it times out) under a new id.
                try await eventually(timeout: .seconds(20), "the session moved") {
                    (try? await managers[0].increment(&browser)) != nil && browser.id?.nodeID != id.nodeID
                }
                frozen.thaw()
                try await eventually("the thawed node is back") { managers[0].topology.isAvailable(id.nodeID) }
                try await managers[0].request(&browser, path: "/logout") { access in try await access.invalidate() }
                #expect(browser.cookie == nil)
                // Every pre-failover cookie reads nothing, on both instances.
                for manager in managers {
                    var stale = old
                    #expect(try await manager.readCount(&stale) == 0, "the old primary is ended too")
                }
            }
        }
    }

    @Test func aReadThatFailsOnceOnANodeStillUpIsTriedAgainNotMoved() async throws {
        try await withProxiedPair { proxy, config, _ in
            try await withManager(config) { manager in
                let (started, id, keys) = try await startedSession(manager)
                var browser = started
                #expect(id.nodeID == "n1", "behind the proxy")
                proxy.cutNextReplies(1, toRequestsContaining: "mg \(keys.primary)")
                #expect(try await manager.increment(&browser) == 2)
                #expect(proxy.repliesCut == 1)
                #expect(browser.id == id, "not moved")
                #expect(manager.statistics.value(of: .readRetries) == 1)
                #expect(manager.statistics.value(of: .relocations) == 0)
                #expect(manager.statistics.value(of: .lockWaits) == 0, "the lock its lost reply took is its own")
            }
        }
    }

    /// A write whose reply never came (the node applied it, the reply was cut): an unlocked one
    /// is tried once more on its node, finds its own write as a conflict, and merges onto it:
    /// saved once, not moved.
    @Test func anUnlockedWriteWithNoAnswerIsTriedAgainAndFindsItsOwnWrite() async throws {
        try await withProxiedPair { proxy, config, _ in
            var unlocked = config
            unlocked.locking.mode = .none
            try await withManager(unlocked) { manager in
                let (started, id, keys) = try await startedSession(manager)
                var browser = started
                proxy.cutNextReplies(1, toRequestsContaining: "ms \(keys.primary)")
                #expect(try await manager.increment(&browser) == 2)
                #expect(proxy.repliesCut == 1)
                #expect(browser.id == id, "not moved")
                #expect(manager.statistics.value(of: .writeRetries) == 1)
                #expect(manager.statistics.value(of: .relocations) == 0)
                #expect(try await manager.readCount(&browser) == 2, "saved once")
            }
        }
    }

    /// A locked write whose reply never came is not tried again (a request that read the copy
    /// before it may merge over it): the request fails, "may not have been saved", never with a
    /// cleared cookie, and the session does not move. (The proxy cuts only the reply: the node
    /// applied the write, so the session reads as after it.)
    @Test func aLockedWriteWithNoAnswerFailsTheRequestAndDoesNotMove() async throws {
        try await withProxiedPair { proxy, config, _ in
            try await withManager(config) { manager in
                let (started, id, keys) = try await startedSession(manager)
                var browser = started
                proxy.cutNextReplies(1, toRequestsContaining: "ms \(keys.primary)")
                let error = await sessionError { try await manager.increment(&browser) }
                #expect(error?.code == .unavailable)
                #expect(error?.message.contains("may not have been saved") == true, "\(String(describing: error))")
                #expect(proxy.repliesCut == 1)
                #expect(browser.id == id, "never a cleared cookie")
                #expect(manager.statistics.value(of: .writeRetries) == 0, "a locked write is not tried again")
                #expect(manager.statistics.value(of: .relocations) == 0)
                // The node applied the write before its reply was cut: the session reads as after.
                #expect(try await manager.readCount(&browser) == 2)
                #expect(browser.id == id)
            }
        }
    }

    /// An unlocked write whose reply never came, twice (the retry's too), on a node that still
    /// accepts connections: the request fails, and the session stays on its node.
    @Test func anUnlockedWriteWithNoAnswerTwiceFailsTheRequestAndDoesNotMove() async throws {
        try await withProxiedPair { proxy, config, _ in
            var unlocked = config
            unlocked.locking.mode = .none
            try await withManager(unlocked) { manager in
                let (started, id, keys) = try await startedSession(manager)
                var browser = started
                proxy.cutNextReplies(2, toRequestsContaining: "ms \(keys.primary)")
                let error = await sessionError { try await manager.increment(&browser) }
                #expect(error?.code == .unavailable)
                #expect(proxy.repliesCut == 2)
                #expect(browser.id == id, "never a cleared cookie")
                #expect(manager.statistics.value(of: .writeRetries) == 1)
                #expect(manager.statistics.value(of: .relocations) == 0, "not moved off a node that accepts connections")
                #expect(try await manager.readCount(&browser) == 2, "the first write landed")
                #expect(browser.id == id)
            }
        }
    }

    @Test func aReadThatFailsTwiceOnANodeStillUpIsUnavailableNotMoved() async throws {
        try await withProxiedPair { proxy, config, _ in
            try await withManager(config) { manager in
                let (started, id, keys) = try await startedSession(manager)
                var browser = started
                let released = manager.statistics.value(of: .locksReleased)
                proxy.cutNextReplies(2, toRequestsContaining: "mg \(keys.primary)")
                let error = await sessionError { try await manager.increment(&browser) }
                #expect(error?.code == .unavailable)
                #expect(manager.statistics.value(of: .relocations) == 0)
                #expect(browser.id == id)
                // The node answers again: the session is where it was, unchanged, and the lock
                // the lost reply took was released (not waited out).
                try await eventually("the orphaned lock released") { manager.statistics.value(of: .locksReleased) == released + 1 }
                let waits = manager.statistics.value(of: .lockWaits)
                #expect(try await manager.increment(&browser) == 2)
                #expect(manager.statistics.value(of: .lockWaits) == waits)
                #expect(browser.id == id)
            }
        }
    }

    /// What a locked request whose write must move finds on the node it moves to.
    enum AtTheNewNode: CaseIterable, Sendable { case nothing, someoneElsesLock, someoneElsesCopy }

    /// A locked request whose write must move (its node died while it ran) moves under the lock
    /// of the node it moves to, taken before it writes there, and only onto a node that holds no
    /// copy yet (one there was put by a request its lock did not keep out). With that lock held
    /// by someone else, its wait ends at the budget; with a copy there, it is refused (the read
    /// under the new lock finds it; the counted locks tell that rule from the later write's own
    /// conflict check, which refuses it too): either way it writes nothing there and the request
    /// fails. (Locking's failure policy is `.fail`, the default.) With nothing there, it moves,
    /// saves, and releases the new lock.
    @Test(arguments: AtTheNewNode.allCases)
    func aLockedWriteThatMustMoveTakesTheNewNodesLockFirst(found: AtTheNewNode) async throws {
        try await withMemcachedServers(count: 2) { servers in
            var config = try configuration(n1: servers[0].hostAndPort, n2: servers[1].hostAndPort)
            config.locking.mode = .all
            config.locking.waitBudget = .seconds(1)
            try await withManager(config) { manager in
                try await withInspector(servers) { inspector in
                    let (browser, id, keys) = try await startedSession(manager)
                    try #require(id.nodeID == "n1")
                    let n2 = try inspector.node("n2")
                    switch found {
                    case .nothing:
                        break
                    case .someoneElsesLock:
                        #expect(try await n2.add(keys.lock, value: ByteBuffer(string: "someone-else"), ttl: .seconds(30)))
                    case .someoneElsesCopy:
                        // The session as it was (count 1), put there as a recovery elsewhere would.
                        let copy = try #require(try await inspector.node("n1").get(keys.primary))
                        _ = try await n2.set(keys.primary, value: copy.value, ttl: .seconds(60), flags: copy.flags)
                    }
                    let acquired = manager.statistics.value(of: .locksAcquired)
                    let error = try await lockedRequest(manager, browser, setting: 100) {
                        try await servers[0].kill()
                        try await eventually("n1 is seen down") { !manager.topology.isReachable("n1") }
                    }
                    let lockThere = try await n2.get(keys.lock)
                    var moved = Browser(cookie: id.relocated(to: "n2").description)
                    switch found {
                    case .nothing:
                        #expect(error == nil, "\(String(describing: error))")
                        #expect(manager.statistics.value(of: .locksAcquired) == acquired + 2, "n1's, then n2's")
                        #expect(lockThere == nil, "the new lock released")
                        #expect(try await manager.readCount(&moved) == 100)
                    case .someoneElsesLock:
                        #expect(error?.code == .lockUnavailable, "\(String(describing: error))")
                        #expect(manager.statistics.value(of: .locksAcquired) == acquired + 1, "n1's only")
                        #expect(try await n2.get(keys.primary) == nil, "nothing written under someone else's lock")
                        #expect(lockThere.map { String(buffer: $0.value) } == "someone-else")
                    case .someoneElsesCopy:
                        #expect(error?.code == .lockUnavailable, "\(String(describing: error))")
                        #expect(manager.statistics.value(of: .locksAcquired) == acquired + 2, "n1's, then n2's")
                        #expect(lockThere == nil, "the new lock released")
                        #expect(try await manager.readCount(&moved) == 1, "the copy there is not written over")
                    }
                }
            }
        }
    }

    /// A locked request whose lease ran out while its node was dead (its renewals unanswered)
    /// cannot take its lock again there. Whether another request wrote the session after the
    /// lease ended is unknown: under `.fail` its changes are refused (nothing is moved, and the
    /// session stays as its backup has it); under `.proceedUnlocked` it moves, unlocked.
    @Test(arguments: [SessionManager.LockFailurePolicy.fail, .proceedUnlocked])
    func aLockedWriteWhoseLeaseRanOutOnADeadNodeFollowsTheFailurePolicy(policy: SessionManager.LockFailurePolicy)
        async throws
    {
        try await withMemcachedServers(count: 2) { servers in
            var config = try configuration(n1: servers[0].hostAndPort, n2: servers[1].hostAndPort)
            config.locking.mode = .all
            config.locking.expiry = .seconds(2)
            config.locking.waitBudget = .seconds(1)
            config.locking.failurePolicy = policy
            try await withManager(config) { manager in
                try await withInspector(servers) { inspector in
                    let (started, id, keys) = try await startedSession(manager)
                    var browser = started
                    try #require(id.nodeID == "n1")
                    let n2 = try inspector.node("n2")
                    let locks = manager.store.locks
                    let error = try await lockedRequest(manager, browser, setting: 100) {
                        try await servers[0].kill()
                        try await eventually("n1 is seen down") { !manager.topology.isReachable("n1") }
                        try await eventually("the lock's lease ran out") {
                            locks.held.all.contains { $0.nodeID == "n1" && !locks.holdsLease($0) }
                        }
                    }
                    var moved = Browser(cookie: id.relocated(to: "n2").description)
                    switch policy {
                    case .fail:
                        #expect(error?.code == .lockUnavailable, "\(String(describing: error))")
                        #expect(try await n2.get(keys.primary) == nil, "nothing moved")
                        #expect(try await manager.readCount(&browser) == 1, "recovered from its backup, without the refused change")
                    case .proceedUnlocked:
                        #expect(error == nil, "\(String(describing: error))")
                        #expect(try await manager.readCount(&moved) == 100)
                    }
                }
            }
        }
    }

    /// What a locked recovery finds on the node where its session lives now.
    enum WhereItLives: CaseIterable, Sendable { case nobodysLock, someoneElsesLock }

    /// A locked request whose node died finds its session living as a primary on a node other
    /// than the one it would move it to (an earlier recovery put it there, while that node was
    /// down): it works under that node's lock, the one a request with the session's current
    /// cookie holds while it runs, and on the copy read under it. With that lock held by someone
    /// else, its wait ends at the budget and it changes nothing; with it free, it takes it (after
    /// the target's, which concurrent recoveries take turns on) and saves there.
    @Test(arguments: WhereItLives.allCases)
    func aLockedRecoveryThatFindsTheSessionLivingElsewhereTakesThatNodesLock(found: WhereItLives) async throws {
        try await withMemcachedServers(count: 3) { servers in
            let config = try configuration(servers) {
                $0.locking.mode = .all
                $0.locking.waitBudget = .seconds(1)
            }
            try await withManager(config) { manager in
                try await withInspector(servers) { inspector in
                    let (started, id, keys) = try await startedSession(manager)
                    var browser = started
                    try #require(id.nodeID == "n1")
                    let n3 = try inspector.node("n3")
                    // The session as it is (count 1), living on n3 as a recovery while n2 was down would leave it.
                    let copy = try await livingElsewhere(keys, on: "n3", someoneElsesLock: found == .someoneElsesLock, inspector)
                    try await servers[0].kill()
                    try await eventually("n1 is seen down") { !manager.topology.isReachable("n1") }
                    let acquired = manager.statistics.value(of: .locksAcquired)
                    let error = await sessionError { try await manager.increment(&browser) }
                    switch found {
                    case .nobodysLock:
                        #expect(error == nil, "\(String(describing: error))")
                        #expect(browser.id == id.relocated(to: "n3"))
                        #expect(manager.statistics.value(of: .locksAcquired) == acquired + 2, "n2's, then n3's")
                        #expect(try await n3.get(keys.lock) == nil, "released")
                        #expect(try await inspector.node("n2").get(keys.lock) == nil, "released")
                        #expect(try await manager.readCount(&browser) == 2)
                    case .someoneElsesLock:
                        #expect(error?.code == .lockUnavailable, "\(String(describing: error))")
                        #expect(try await n3.get(keys.primary)?.value == copy.value, "unchanged under someone else's lock")
                        #expect(try await n3.get(keys.lock).map { String(buffer: $0.value) } == "someone-else")
                        #expect(try await inspector.node("n2").get(keys.lock) == nil, "the target's lock released")
                    }
                }
            }
        }
    }
}

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

@Suite("Session locks")
struct SessionLocksTests {
    @Test func fiftyConcurrentIncrementsOverTwoInstancesWithLockingAll() async throws {
        try await withMemcachedServers(count: 2) { servers in
            let config = try configuration(servers) { $0.locking.mode = .all }
            try await withManagers([config, config]) { managers in
                var browser = Browser()
                #expect(try await managers[0].increment(&browser) == 1)
                let cookie = browser
                let results = try await withThrowingTaskGroup(of: Int.self) { group in
                    for index in 0..<50 {
                        group.addTask {
                            var mine = cookie
                            return try await managers[index % 2].increment(&mine)
                        }
                    }
                    var results: [Int] = []
                    for try await result in group { results.append(result) }
                    return results
                }
                #expect(results.sorted() == Array(2...51), "every request saw the previous one's write")
                #expect(try await managers[1].readCount(&browser) == 51)
                let acquired = managers.map { $0.statistics.value(of: .locksAcquired) }.reduce(0, +)
                #expect(acquired >= 51)
                #expect(managers.map { $0.statistics.value(of: .lockFailures) }.reduce(0, +) == 0)
            }
        }
    }

    /// A request that holds its lock past the lock's TTL keeps it by renewal; nobody else can take
    /// or release it; once the request has answered, the session's next request does not wait
    /// for it at all (the release rode with the write and was acknowledged).
    @Test func aLongRequestRenewsItsLockAndOnlyTheOwnerCanRelease() async throws {
        try await withMemcachedServers(count: 1) { servers in
            let config = try configuration(servers) {
                $0.locking.mode = .all
                $0.locking.expiry = .seconds(3)
            }
            let impatient = try configuration(servers) {
                $0.locking.mode = .all
                $0.locking.waitBudget = .milliseconds(300)
            }
            try await withManagers([config, impatient]) { managers in
                try await withInspector(servers) { inspector in
                    let (browser, id, keys) = try await startedSession(managers[0])
                    let holding = Barrier(count: 2)
                    let finish = Barrier(count: 2)
                    let cookie = browser
                    let holder = managers[0]
                    let longRequest = Task {
                        var mine = cookie
                        return try await holder.request(&mine) { access in
                            let session = try #require(try await access.load())
                            await holding.arriveAndWait()
                            await finish.arriveAndWait()
                            try session.set("count", 100)
                            return true
                        }
                    }
                    await holding.arriveAndWait()
                    let acquired = try #require(try await inspector.node(id.nodeID).get(keys.lock))
                    // Three renewals, one per second: held longer than the item's 3 s TTL.
                    try await eventually(timeout: .seconds(30), "three renewals") {
                        managers[0].statistics.value(of: .lockRenewals) >= 3
                    }
                    let lock = try #require(try await inspector.node(id.nodeID).get(keys.lock), "the lock is still held")
                    #expect(lock.value == acquired.value, "the same owner's token")
                    #expect(lock.cas != acquired.cas, "renewed")
                    // Another request cannot have it...
                    var other = browser
                    let error = await sessionError { _ = try await managers[1].readCount(&other) }
                    #expect(error?.code == .lockUnavailable)
                    #expect(managers[1].statistics.value(of: .lockFailures) == 1)
                    // ...and a release by anyone but the owner fails.
                    let forged = try await inspector.node(id.nodeID).delete(keys.lock, cas: (lock.cas ?? 0) &+ 12345)
                    #expect(forged == .exists)
                    #expect(try await inspector.node(id.nodeID).get(keys.lock) != nil)

                    let releasedBefore = managers[0].statistics.value(of: .locksReleased)
                    await finish.arriveAndWait()
                    #expect(try await longRequest.value)
                    // Answered: the release was acknowledged before the response (no race with a
                    // renewal, which a release waits for), so the next request finds no lock.
                    #expect(managers[0].statistics.value(of: .locksReleased) == releasedBefore + 1)
                    #expect(managers[0].statistics.value(of: .lockReleaseRaces) == 0)
                    let waitsBefore = managers[1].statistics.value(of: .lockWaits)
                    #expect(try await managers[1].readCount(&other) == 100)
                    #expect(managers[1].statistics.value(of: .lockWaits) == waitsBefore, "did not wait for the lock")
                }
            }
        }
    }

    /// The worst case: a lock whose owner died without releasing it blocks the session's next
    /// request no longer than `locking.expiry` (memcached's one-second clock included), plus
    /// scheduling margin.
    @Test func anAbandonedLockBlocksNoLongerThanTheLockExpiry() async throws {
        try await withMemcachedServers(count: 1) { servers in
            let config = try configuration(servers) {
                $0.locking.mode = .all
                $0.locking.expiry = .seconds(3)
                $0.locking.waitBudget = .seconds(20)
            }
            try await withManager(config) { manager in
                try await withInspector(servers) { inspector in
                    let (started, id, keys) = try await startedSession(manager)
                    var browser = started
                    // What a request of a crashed instance leaves: its lock, with the manager's TTL.
                    let abandoned = ContinuousClock.now
                    #expect(try await inspector.node(id.nodeID).add(keys.lock, value: ByteBuffer(string: "dead"), ttl: manager.store.locks.itemTTL))
                    #expect(try await manager.increment(&browser) == 2)
                    let waited = ContinuousClock.now - abandoned
                    #expect(manager.statistics.value(of: .lockWaits) == 1)
                    #expect(waited < .seconds(3) + .seconds(1), "waited \(waited) for an abandoned lock")
                }
            }
        }
    }

    /// A renewal racing the release changes the lock's CAS unique before the release lands: the
    /// owner's conditional delete finds `EX`. The lock, still holding the owner's token, must go
    /// anyway; a lock that now holds someone else's token must stay.
    @Test(arguments: [true, false])
    func aReleaseRacingARenewalStillReleasesOnlyItsOwnLock(modifies: Bool) async throws {
        try await withMemcachedServers(count: 1) { servers in
            let config = try configuration(servers) {
                $0.locking.mode = .all
                $0.locking.expiry = .seconds(30)
            }
            try await withManager(config) { manager in
                try await withInspector(servers) { inspector in
                    let (started, id, keys) = try await startedSession(manager)
                    var browser = started
                    let node = try inspector.node(id.nodeID)

                    // The owner's token under a new CAS unique: what a renewal does.
                    try await manager.request(&browser) { access in
                        let session = try #require(try await access.load())
                        let lock = try #require(try await node.get(keys.lock))
                        try await node.set(keys.lock, value: lock.value, ttl: .seconds(30))
                        if modifies { try session.set("count", 7) }
                    }
                    // (Without a write, the release's read-back after the conflict runs after the
                    // response.) Well before the lock's 30 s expiry:
                    try await eventually(timeout: .seconds(3), "the owner's lock is released despite the renewal") {
                        try await node.get(keys.lock) == nil
                    }

                    // Someone else's token: the lock expired and another request took it. A write
                    // that landed without the lock is not acknowledged (that request may have
                    // read the copy before it).
                    let error = await sessionError {
                        try await manager.request(&browser) { access in
                            let session = try #require(try await access.load())
                            try await node.set(keys.lock, value: ByteBuffer(string: "someone-else"), ttl: .seconds(30))
                            if modifies { try session.set("count", 8) }
                        }
                    }
                    #expect(error?.code == (modifies ? .lockUnavailable : nil))
                    try await eventually(timeout: .seconds(3), "the second release is done") {
                        manager.statistics.value(of: .lockReleaseRaces) == 2
                    }
                    let left = try await node.get(keys.lock)
                    #expect(left?.value == ByteBuffer(string: "someone-else"), "another request's lock is left alone")
                }
            }
        }
    }

    @Test func aCancelledRequestStillReleasesItsLockAndSaves() async throws {
        try await withMemcachedServers(count: 1) { servers in
            let config = try configuration(servers) {
                $0.locking.mode = .all
                $0.locking.waitBudget = .milliseconds(300)
            }
            try await withManager(config) { manager in
                var browser = Browser()
                try await manager.increment(&browser)
                let cookie = browser
                let loaded = Barrier(count: 2)
                let request = Task {
                    var mine = cookie
                    try await manager.request(&mine) { access in
                        let session = try #require(try await access.load())
                        try session.set("count", 41)
                        await loaded.arriveAndWait()
                        try await Task.sleep(for: .seconds(30))  // cancelled here: the client went away
                    }
                }
                await loaded.arriveAndWait()
                request.cancel()
                _ = await request.result
                // The lock was released (a 300 ms budget would not outwait its expiry) and the
                // change made before the cancellation was saved.
                #expect(try await manager.readCount(&browser) == 41)
                #expect(manager.statistics.value(of: .lockFailures) == 0)
            }
        }
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
                    let (browser, id, keys) = try await startedSession(managers[0])
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
                    let (browser, id, keys) = try await startedSession(manager)
                    let acquiredBefore = manager.statistics.value(of: .locksAcquired)
                    let error = try await lockedRequest(manager, browser) {
                        try await stealLock(inspector, node: id.nodeID, key: keys.lock)
                        try await eventually(timeout: .seconds(30), "the renewal finds the lock lost") {
                            manager.statistics.value(of: .locksLost) == 1
                        }
                        _ = try await inspector.node(id.nodeID).delete(keys.lock)
                    }
                    #expect(error == nil)
                    #expect(manager.statistics.value(of: .locksAcquired) == acquiredBefore + 2, "taken again for the write")
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
                    let (browser, id, keys) = try await startedSession(managers[0])
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
                    var after = browser
                    let (countAfter, otherAfter) = try await managers[1].request(&after) { access in
                        let session = try #require(try await access.load())
                        return (session["count", as: Int.self], session["other", as: String.self])
                    }
                    #expect(countAfter == 100, "the refused change was not saved")
                    #expect(otherAfter == "c", "the other requests' changes stand")
                }
            }
        }
    }

    /// memcached may evict a held lock (its lease says nothing of that). A locked request that
    /// took the lock meanwhile changed the session; the first request's write then meets that
    /// change, and its release (riding with the write) finds no lock: its lock kept nobody out,
    /// so its changes are refused, not merged over the other request's. (Merged, both requests
    /// would have answered from the same count: the simulation, seed 6285.)
    @Test func aLockEvictedWhileItsRequestRunsRefusesTheWriteOverALockedChange() async throws {
        try await withMemcachedServers(count: 1) { servers in
            let locked = try configuration(servers) { $0.locking.mode = .all }
            try await withManagers([locked, locked]) { managers in
                try await withInspector(servers) { inspector in
                    let (browser, id, keys) = try await startedSession(managers[0])
                    let lostBefore = managers[0].statistics.value(of: .locksLost)
                    let error = try await lockedRequest(managers[0], browser) {
                        _ = try await inspector.node(id.nodeID).delete(keys.lock)  // evicted
                        var other = browser
                        #expect(try await managers[1].increment(&other) == 2, "a locked request, with the lock free")
                    }
                    #expect(error?.code == .lockUnavailable, "refused, not merged over the other locked request's change")
                    #expect(managers[0].statistics.value(of: .locksLost) == lostBefore + 1)
                    var reader = browser
                    #expect(try await managers[1].readCount(&reader) == 2, "the other request's change stands")
                    #expect(try await inspector.node(id.nodeID).get(keys.lock) == nil)
                }
            }
        }
    }

    /// A lock evicted while its request ran, and nobody wrote meanwhile: the write lands (a CAS
    /// write over the copy read), but a locked request may have read that copy before it and
    /// would merge its changes over it; so the request is not told "saved", but "may not have
    /// been saved".
    @Test func aWriteItsEvictedLockDidNotGuardIsNotAcknowledged() async throws {
        try await withMemcachedServers(count: 1) { servers in
            let locked = try configuration(servers) { $0.locking.mode = .all }
            try await withManager(locked) { manager in
                try await withInspector(servers) { inspector in
                    let (browser, id, keys) = try await startedSession(manager)
                    let error = try await lockedRequest(manager, browser) {
                        _ = try await inspector.node(id.nodeID).delete(keys.lock)  // evicted
                    }
                    #expect(error?.code == .lockUnavailable)
                    #expect(error?.message.contains("may not have been saved") == true)
                    var reader = browser
                    #expect(try await manager.readCount(&reader) == 100, "it landed")
                    // With the lock in place the same request is acknowledged.
                    #expect(try await lockedRequest(manager, browser, setting: 200) {} == nil)
                    #expect(try await manager.readCount(&reader) == 200)
                }
            }
        }
    }

    /// The session's copy evicted while its request holds the lock (and, with `lockEvictedToo`,
    /// the lock as well): the write finds the copy gone, and its release rode with it (finding the
    /// lock, or none). Nobody placed a copy meanwhile, so the session is written again (an add)
    /// only under the lock taken again, and the request is acknowledged.
    @Test(arguments: [false, true])
    func aCopyEvictedUnderItsLockIsWrittenAgainUnderTheLockTakenAgain(lockEvictedToo: Bool) async throws {
        try await withMemcachedServers(count: 2) { servers in
            let locked = try configuration(servers) { $0.locking.mode = .all }
            try await withManager(locked) { manager in
                try await withInspector(servers) { inspector in
                    let (browser, id, keys) = try await startedSession(manager)
                    let acquiredBefore = manager.statistics.value(of: .locksAcquired)
                    let lostBefore = manager.statistics.value(of: .locksLost)
                    let error = try await lockedRequest(manager, browser) {
                        _ = try await inspector.node(id.nodeID).delete(keys.primary)  // evicted
                        if lockEvictedToo { _ = try await inspector.node(id.nodeID).delete(keys.lock) }
                    }
                    #expect(error == nil)
                    #expect(manager.statistics.value(of: .locksAcquired) == acquiredBefore + 2, "taken again for the rewrite")
                    #expect(manager.statistics.value(of: .locksLost) == lostBefore + (lockEvictedToo ? 1 : 0))
                    var reader = browser
                    #expect(try await manager.readCount(&reader) == 100)
                    #expect(try await inspector.node(id.nodeID).get(keys.lock) == nil, "the lock taken again was released")
                }
            }
        }
    }

    /// The session's node restarts (empty: copy and lock gone) while a locked request runs; its
    /// write finds the copy gone. Before it takes the lock again, another instance's locked
    /// request restores the session from its backup and changes it. The first request must not
    /// write over that (both changed the same version): it is refused, and the other request's
    /// change stands. The backup's node, stalled, holds the first request's search for the copy
    /// between its failed write and the lock taken again. (The simulation found this shape, with
    /// an eviction: seed 6285.)
    @Test func aCopyPlacedBeforeTheLockIsTakenAgainIsNotWrittenOver() async throws {
        // The first instance reaches n2 through a proxy that stalls its search for the copy.
        try await withTwoInstances(proxied: [(instance: 0, node: 1)]) { instance, configuration in
            configuration.locking.mode = .all
            // No renewal due for 10 s (a third of the expiry): a renewal finding the lock gone
            // would end the request before its write (another path, with the same outcome).
            if instance == 0 { configuration.locking.expiry = .seconds(30) }
        } _: { managers, proxies, servers, inspector in
            let proxy = proxies[0]
            let (browser, id, keys) = try await startedSession(managers[0])
            try #require(id.nodeID == "n1")
            try await eventually("the nodes' boot times are known") {
                managers.allSatisfy { $0.store.nodeRestarts.knows("n1") }
            }
            let holding = Barrier(count: 2)
            let finish = Barrier(count: 2)
            let request = Task {
                var mine = browser
                return await sessionError {
                    try await managers[0].request(&mine) { access in
                        let session = try #require(try await access.load())
                        await holding.arriveAndWait()
                        await finish.arriveAndWait()
                        try session.set("count", 100)
                    }
                }
            }
            await holding.arriveAndWait()
            try await servers[0].kill()
            try await servers[0].restart()
            try await eventually("the restart is seen") { managers.allSatisfy { $0.store.missMayBeRestart(on: "n1") } }
            let lostBefore = managers[0].statistics.value(of: .locksLost)
            proxy.stall()
            await finish.arriveAndWait()
            // The write found nothing, and its riding release no lock; the search for the
            // copy that follows waits on the backup's node (it may also meet the other
            // request's copy on n1: the lock taken again finds that copy either way).
            var other = browser
            let restored: Result<Int, any Error>
            do {
                try await eventually(timeout: .seconds(30), "the write's release finds no lock") {
                    managers[0].statistics.value(of: .locksLost) == lostBefore + 1
                }
                try await eventually(timeout: .seconds(30), "the search for the lost copy reaches the stalled node") {
                    proxy.heldChunks > 0
                }
                restored = .success(try await managers[1].increment(&other))
            } catch {
                restored = .failure(error)
            }
            proxy.resume()
            #expect(try restored.get() == 2, "restored from the backup, under the free lock")
            let error = await request.value
            #expect(error?.code == .lockUnavailable, "refused, not written over the other locked request's change")
            #expect(managers[0].statistics.value(of: .lockConflicts) == 1)
            var reader = browser
            #expect(try await managers[1].readCount(&reader) == 2, "the other request's change stands")
            #expect(try await inspector.node("n1").get(keys.lock) == nil, "the lock taken again was released")
        }
    }
}

import Memcached
import MemcachedTestRig
import NIOCore
import Testing

@testable import MemcachedSessions

/// Lets `count` tasks wait for each other.
actor Barrier {
    private let count: Int
    private var arrived = 0
    private var waiting: [CheckedContinuation<Void, Never>] = []

    init(count: Int) { self.count = count }

    func arriveAndWait() async {
        arrived += 1
        if arrived >= count {
            for continuation in waiting { continuation.resume() }
            waiting = []
            return
        }
        await withCheckedContinuation { waiting.append($0) }
    }
}

@Suite("Locking and concurrent requests")
struct ConcurrencyTests {
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
                    var browser = Browser()
                    try await managers[0].increment(&browser)
                    let id = try #require(browser.id)
                    let keys = managers[0].keys(for: id.token)
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
                    var browser = Browser()
                    try await manager.increment(&browser)
                    let id = try #require(browser.id)
                    let keys = manager.keys(for: id.token)
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
                    var browser = Browser()
                    try await manager.increment(&browser)
                    let id = try #require(browser.id)
                    let keys = manager.keys(for: id.token)
                    let node = try inspector.node(id.nodeID)

                    // The owner's token under a new CAS unique: what a renewal does.
                    try await manager.request(&browser) { access in
                        let session = try #require(try await access.load())
                        let lock = try #require(try await node.get(keys.lock))
                        try await node.set(keys.lock, value: lock.value, ttl: .seconds(30))
                        if modifies { try session.set("count", 7) }
                    }
                    // (The read-back after the conflict runs in the background, after the response.) Well
                    // before the lock's 30 s expiry:
                    try await eventually(timeout: .seconds(3), "the owner's lock is released despite the renewal") {
                        try await node.get(keys.lock) == nil
                    }

                    // Someone else's token: the lock expired and another request took it.
                    try await manager.request(&browser) { access in
                        let session = try #require(try await access.load())
                        try await node.set(keys.lock, value: ByteBuffer(string: "someone-else"), ttl: .seconds(30))
                        if modifies { try session.set("count", 8) }
                    }
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

    @Test func autoLockingLearnsReadOnlyPaths() async throws {
        try await withMemcachedServers(count: 1) { servers in
            try await withManager(try configuration(servers) { $0.locking.mode = .auto }) { manager in
                var browser = Browser()
                try await manager.increment(&browser)
                let afterCreate = manager.statistics.value(of: .locksAcquired)
                #expect(try await manager.readCount(&browser, path: "/read") == 1)
                #expect(manager.statistics.value(of: .locksAcquired) == afterCreate + 1, "unknown paths lock")
                for _ in 0..<5 { #expect(try await manager.readCount(&browser, path: "/read") == 1) }
                #expect(manager.statistics.value(of: .locksAcquired) == afterCreate + 1, "a read-only path runs unlocked")
                #expect(manager.statistics.value(of: .requestsUnlockedReadOnly) == 5)
                // The same path with a query string is the same path.
                _ = manager.beginRequest(path: "/read", sessionCookie: nil)
                // A write on that path: locked again from then on.
                #expect(try await manager.increment(&browser, path: "/read") == 2)
                #expect(try await manager.readCount(&browser, path: "/read") == 2)
                #expect(manager.statistics.value(of: .locksAcquired) == afterCreate + 2)
                // Writing paths always lock.
                try await manager.increment(&browser)
                try await manager.increment(&browser)
                #expect(manager.statistics.value(of: .locksAcquired) == afterCreate + 4)
            }
        }
    }

    @Test func uriPatternLocksOnlyMatchingPaths() async throws {
        try await withMemcachedServers(count: 1) { servers in
            try await withManager(try configuration(servers) { $0.locking.mode = .uriPattern("/cart/.*") }) { manager in
                var browser = Browser()
                try await manager.increment(&browser, path: "/home")
                try await manager.increment(&browser, path: "/home")
                #expect(manager.statistics.value(of: .locksAcquired) == 0)
                try await manager.increment(&browser, path: "/cart/add")
                #expect(manager.statistics.value(of: .locksAcquired) == 1)
            }
        }
    }

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
}

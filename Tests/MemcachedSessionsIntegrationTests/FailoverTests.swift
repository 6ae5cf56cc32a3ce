import Memcached
import MemcachedTestRig
import NIOCore
import Synchronization
import Testing

@testable import MemcachedSessions

/// What a load generator knows: each session's cookie and its last acknowledged count.
final class SessionBook: Sendable {
    struct Entry: Sendable {
        var browser: Browser
        var count: Int
        var readOnly: Bool
        /// Its last increment failed with "may not have been saved" (its write was in flight when
        /// the node died): the next read shows the count before it or after it.
        var uncertain = false
    }

    let entries: Mutex<[Entry]>

    init(_ entries: [Entry]) { self.entries = Mutex(entries) }

    subscript(index: Int) -> Entry {
        get { entries.withLock { $0[index] } }
    }

    func update(_ index: Int, _ entry: Entry) { entries.withLock { $0[index] = entry } }
    var count: Int { entries.withLock { $0.count } }
}

@Suite("Failover: memcached nodes and app servers dying", .serialized)
struct FailoverTests {
    /// Creates `count` sessions through `manager`, with `concurrency` parallel browsers.
    static func createSessions(_ manager: SessionManager, count: Int, readOnlyEvery: Int) async throws -> SessionBook {
        let book = SessionBook((0..<count).map { SessionBook.Entry(browser: Browser(), count: 0, readOnly: $0 % readOnlyEvery == 0) })
        try await runAll(book, concurrency: 50) { index, entry in
            var entry = entry
            entry.count = try await manager.increment(&entry.browser)
            return entry
        }
        return book
    }

    /// Runs `step` over every entry with `concurrency` workers.
    static func runAll(
        _ book: SessionBook, concurrency: Int,
        _ step: @escaping @Sendable (Int, SessionBook.Entry) async throws -> SessionBook.Entry
    ) async throws {
        let next = LockedBox<Int>(0)
        try await withThrowingTaskGroup(of: Void.self) { group in
            for _ in 0..<concurrency {
                group.addTask {
                    while true {
                        let index = next.withLock { value in
                            defer { value += 1 }
                            return value
                        }
                        guard index < book.count else { return }
                        book.update(index, try await step(index, book[index]))
                    }
                }
            }
            try await group.waitForAll()
        }
    }

    /// Every session reads back its last acknowledged count; modifiable sessions take one more
    /// increment, acknowledged.
    /// One round: every session read (its last acknowledged count) and, unless read-only,
    /// incremented. `whileANodeDies`: an increment whose write was in flight when its node died
    /// may fail with `unavailable` ("may not have been saved"): then the next read shows either
    /// count, never another.
    static func verifyAndAdvance(_ manager: SessionManager, _ book: SessionBook, whileANodeDies: Bool = false) async throws {
        try await runAll(book, concurrency: 50) { index, entry in
            var entry = entry
            let read = try await manager.readCount(&entry.browser)
            if entry.uncertain {
                #expect(read == entry.count || read == entry.count + 1, "session \(index) read \(read) around \(entry.count)")
                entry.count = read
                entry.uncertain = false
            } else {
                #expect(read == entry.count, "session \(index) read \(read), last acknowledged \(entry.count)")
            }
            if !entry.readOnly {
                do {
                    let next = try await manager.increment(&entry.browser)
                    #expect(next == entry.count + 1, "session \(index) counted \(next) after \(entry.count)")
                    entry.count = next
                } catch let error as SessionError where whileANodeDies && error.code == .unavailable {
                    entry.uncertain = true
                }
            }
            return entry
        }
    }

    @Test func nonStickySessionsSurviveKilledNodesAndGetRepaired() async throws {
        try await withMemcachedServers(count: 3) { servers in
            let config = try configuration(servers) { $0.memcached.requestTimeout = .seconds(2) }
            try await withManager(config) { manager in
                let book = try await Self.createSessions(manager, count: 1_000, readOnlyEvery: 5)
                try await Self.verifyAndAdvance(manager, book)

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
                    group.addTask { try await Self.verifyAndAdvance(manager, book, whileANodeDies: true) }
                    // Killed under load: once a tenth of the round is through.
                    try await eventually(timeout: .seconds(60), "the load is running") {
                        manager.statistics.value(of: .requestsWithSession) - requestsBefore >= 100
                    }
                    try await servers[firstIndex].kill()
                    try await group.waitForAll()
                }
                let uncertain = book.entries.withLock { $0.filter(\.uncertain).count }
                #expect(uncertain <= 50, "\(uncertain) writes were in flight when the node died")
                try await Self.verifyAndAdvance(manager, book)
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
                try await Self.verifyAndAdvance(manager, book)
                let second = busiestNode()
                try await servers[Int(second.dropFirst())! - 1].kill()
                try await Self.verifyAndAdvance(manager, book)
                try await Self.verifyAndAdvance(manager, book)
            }
        }
    }

    @Test func stickySessionsSurviveOnTheAppServerAndMoveToALiveNode() async throws {
        try await withMemcachedServers(count: 3) { servers in
            let config = try configuration(servers, mode: .sticky) {
                $0.route = "a"
                $0.sticky.asynchronousSaving = false
            }
            try await withManager(config) { manager in
                let book = try await Self.createSessions(manager, count: 300, readOnlyEvery: 4)
                let victim = "n2"
                let onVictim = (0..<book.count).filter { book[$0].browser.id?.nodeID == victim }
                #expect(!onVictim.isEmpty)
                try await servers[1].kill()
                try await Self.verifyAndAdvance(manager, book)
                try await Self.verifyAndAdvance(manager, book)
                for index in onVictim where !book[index].readOnly {
                    #expect(book[index].browser.id?.nodeID != victim, "a changed session moved off the dead node")
                }
                // A second app server (app-server failover) finds the moved sessions in memcached.
                let other = try configuration(servers, mode: .sticky) { $0.route = "b" }
                try await withManager(other) { (second: SessionManager) async throws in
                    for index in onVictim where !book[index].readOnly {
                        var browser = book[index].browser
                        #expect(try await second.readCount(&browser) == book[index].count)
                    }
                }
            }
        }
    }

    @Test func stickySessionsKeepWorkingWhenEveryNodeIsDown() async throws {
        try await withMemcachedServers(count: 1) { servers in
            let config = try configuration(servers, mode: .sticky) {
                $0.route = "a"
                $0.sticky.asynchronousSaving = false
                $0.memcached.requestTimeout = .milliseconds(300)
            }
            try await withManager(config) { manager in
                var browser = Browser()
                #expect(try await manager.increment(&browser) == 1)
                try await servers[0].kill()
                for expected in 2...6 { #expect(try await manager.increment(&browser) == expected) }
                var newcomer = Browser()
                #expect(try await manager.increment(&newcomer) == 1, "new sessions work from memory too")
                try await servers[0].restart()
                try await eventually("node back") { manager.topology.isAvailable("n1") }
                #expect(try await manager.increment(&newcomer) == 2)
                #expect(try await manager.increment(&browser) == 7)
                // Now in memcached: a second instance sees both.
                try await withManager(try configuration(servers, mode: .sticky) { $0.route = "b" }) {
                    (second: SessionManager) async throws in
                    var b1 = browser
                    var b2 = newcomer
                    #expect(try await second.readCount(&b1) == 7)
                    #expect(try await second.readCount(&b2) == 2)
                }
            }
        }
    }

    @Test func stickyTakeoverNeverServesAStaleCopy() async throws {
        try await withMemcachedServers(count: 2) { servers in
            let a = try configuration(servers, mode: .sticky) {
                $0.route = "a"
                $0.sticky.asynchronousSaving = false
            }
            let b = try configuration(servers, mode: .sticky) {
                $0.route = "b"
                $0.sticky.asynchronousSaving = false
            }
            try await withManagers([a, b]) { managers in
                let (instanceA, instanceB) = (managers[0], managers[1])
                var browser = Browser()
                for _ in 0..<3 { try await instanceA.increment(&browser) }
                #expect(browser.id?.route == "a")

                // The balancer sends the user to B (A looked dead): B takes over and changes it.
                #expect(try await instanceB.increment(&browser) == 4)
                #expect(browser.id?.route == "b", "B rewrote the route and sent the new cookie")
                #expect(try await instanceB.increment(&browser) == 5)
                #expect(instanceB.statistics.value(of: .takeovers) == 1)

                // A, which still holds count 3 in memory, receives the session again: B's data.
                #expect(try await instanceA.readCount(&browser) == 5)
                #expect(browser.id?.route == "a")
                #expect(try await instanceA.increment(&browser) == 6)

            }
        }
    }

    @Test func stickyLogoutOnOneInstanceIsNotRevivedByAnother() async throws {
        try await withMemcachedServers(count: 1) { servers in
            let a = try configuration(servers, mode: .sticky) {
                $0.route = "a"
                $0.sticky.asynchronousSaving = false
            }
            let b = try configuration(servers, mode: .sticky) {
                $0.route = "b"
                $0.sticky.asynchronousSaving = false
            }
            try await withManagers([a, b]) { managers in
                let (instanceA, instanceB) = (managers[0], managers[1])
                var browser = Browser()
                for _ in 0..<2 { try await instanceA.increment(&browser) }
                try await instanceB.increment(&browser)  // takeover
                let routedToB = browser
                try await instanceB.request(&browser) { access in try await access.invalidate() }
                #expect(browser.cookie == nil)
                // A request still carrying B's cookie reaches A: A must not serve its old copy.
                var late = routedToB
                #expect(try await instanceA.readCount(&late) == 0)
                // Nor one carrying A's own older cookie, once A has seen the session gone.
                var older = Browser(cookie: routedToB.id!.routed(to: "a").description)
                #expect(try await instanceA.readCount(&older) == 0)
            }
        }
    }

    @Test func unavailablePolicyDecidesWhenNoNodeAnswers() async throws {
        try await withMemcachedServers(count: 1) { servers in
            for policy in [SessionManager.UnavailablePolicy.fail, .startNewSession] {
                if servers[0].pid == nil { try await servers[0].restart() }
                let config = try configuration(servers) {
                    $0.unavailablePolicy = policy
                    $0.memcached.requestTimeout = .milliseconds(300)
                }
                try await withManager(config) { manager in
                    var browser = Browser()
                    try await manager.increment(&browser)
                    try await servers[0].kill()
                    let error = await sessionError { _ = try await manager.readCount(&browser) }
                    switch policy {
                    case .fail:
                        #expect(error?.code == .unavailable, "a dead node is never read as 'no session'")
                        #expect(browser.cookie != nil, "the user keeps the cookie")
                    case .startNewSession:
                        #expect(error == nil)
                    }
                    #expect(manager.statistics.value(of: .unavailable) >= 1)
                }
            }
        }
    }
}

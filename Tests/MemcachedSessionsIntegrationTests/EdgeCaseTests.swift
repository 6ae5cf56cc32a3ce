#if canImport(Glibc)
import Glibc
#endif
import Memcached
import MemcachedTestRig
import NIOCore
import Testing

@testable import MemcachedSessions

@Suite("Edge cases: logouts racing reads, restarts, stale sticky copies, custom timeouts")
struct EdgeCaseTests {
    @Test func aLogoutIsNotUndoneByARacingReadOrALaterFailover() async throws {
        try await withMemcachedServers(count: 3) { servers in
            try await withManager(try configuration(servers)) { manager in
                var browser = Browser()
                try await manager.increment(&browser)
                try await manager.increment(&browser)
                let cookie = browser
                let id = try #require(cookie.id)
                // A read-only request is open while the user logs out; it ends afterwards (its backup
                // refresh must not write the session back).
                let loaded = Barrier(count: 2)
                let loggedOut = Barrier(count: 2)
                async let reader: Int = {
                    var mine = cookie
                    return try await manager.request(&mine) { access in
                        let count = try await access.load()?["count", as: Int.self] ?? 0
                        await loaded.arriveAndWait()
                        await loggedOut.arriveAndWait()
                        return count
                    }
                }()
                await loaded.arriveAndWait()
                var logout = cookie
                try await manager.request(&logout) { access in try await access.invalidate() }
                await loggedOut.arriveAndWait()
                #expect(try await reader == 2)
                // Now the session's node dies: the old cookie must not find a copy to recover.
                try await servers[Int(id.nodeID.dropFirst())! - 1].kill()
                var old = cookie
                #expect(try await manager.readCount(&old) == 0)
                #expect(manager.statistics.value(of: .unavailable) == 0, "a tombstone is an answer: gone, not unavailable")
            }
        }
    }

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

    /// Sticky ownership notices: a takeover tells the previous owner, which drops its copy; a
    /// logout on the new owner answers only once the previous owner has read that it ended, so an
    /// old tab's cookie, still routed to the previous owner, is never served it again.
    @Test func aStickyInstanceStopsServingACopyTakenOverElsewhere() async throws {
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
                for _ in 0..<3 { try await instanceA.increment(&browser) }
                let staleCookie = browser  // route a
                var atB = browser
                #expect(try await instanceB.increment(&atB) == 4)  // takeover
                try await eventually("A read the takeover notice") { instanceA.statistics.value(of: .noticesRead) == 1 }
                var stale = staleCookie
                #expect(try await instanceA.readCount(&stale) == 4, "A serves B's data, not its stale copy")
                // A holds it again (the old tab's request took it back); logged out on B: the
                // logout answers once A has read the notice, so A's copy has ended by then.
                try await instanceB.request(&atB) { access in try await access.invalidate() }
                #expect(instanceB.statistics.value(of: .noticesSent) == 2)
                #expect(instanceB.statistics.value(of: .noticesUnread) == 0)
                var again = staleCookie
                #expect(try await instanceA.readCount(&again) == 0, "no sleep: ended on A before B answered")
            }
        }
    }

    @Test func stickyIdleAndAbsoluteExpiry() async throws {
        try await withMemcachedServers(count: 1) { servers in
            try await withManager(try configuration(servers, mode: .sticky) { $0.timeouts.idle = .seconds(1) }) { manager in
                var browser = Browser()
                try await manager.increment(&browser)
                #expect(try await manager.readCount(&browser) == 1)
                // No request for well past the idle timeout (1 s, plus memcached's one-second clock and
                // the asynchronous save's window): gone from memory and from memcached. A check
                // any earlier would itself be a request that keeps the session alive.
                try await Task.sleep(for: .milliseconds(3500))
                #expect(try await manager.readCount(&browser) == 0, "idle past its timeout: gone")
            }
            try await withManager(try configuration(servers, mode: .sticky) { $0.timeouts.absolute = .seconds(1) }) { manager in
                var browser = Browser()
                try await manager.increment(&browser)
                let start = ContinuousClock.now
                while ContinuousClock.now - start < .seconds(4), try await manager.readCount(&browser) != 0 {
                    try await Task.sleep(for: .milliseconds(100))
                }
                #expect(try await manager.readCount(&browser) == 0)
                #expect(ContinuousClock.now - start < .seconds(3))
            }
        }
    }

    @Test func aRequestThatNeverOpensTheSessionSlidesItsOwnTimeout() async throws {
        try await withMemcachedServers(count: 2) { servers in
            try await withManager(try configuration(servers) { $0.timeouts.idle = .seconds(30) }) { manager in
                try await withInspector(servers) { inspector in
                    var browser = Browser()
                    try await manager.request(&browser) { access in
                        let session = try await access.loadOrCreate()
                        try session.set("user", "remembered")
                        session.setIdleTimeout(.seconds(3600))
                    }
                    let id = try #require(browser.id)
                    let key = manager.keys(for: id.token).primary
                    func remaining() async throws -> Int {
                        guard case .item(let item?) = try await inspector.node(id.nodeID).execute(.getMetadata(key)) else { return -9 }
                        return item.timeToLive ?? -9
                    }
                    #expect(try await remaining() > 3000)
                    // A read slides to the default first, then fixes it to the session's own timeout.
                    #expect(try await manager.readCount(&browser) == 0)
                    try await eventually("TTL back to the session's own") { try await remaining() > 3000 }
                    // A request that never opens the session slides with the session's timeout.
                    let touchesBefore = try await commandCounts(inspector).touches
                    try await manager.request(&browser, path: "/static") { _ in }
                    // The slide is a touch the request does not wait for: wait until it landed.
                    try await eventually("the slide's touch landed") {
                        try await commandCounts(inspector).touches > touchesBefore
                    }
                    #expect(try await remaining() > 3000, "not shortened to the 30 s default")
                }
            }
        }
    }

    /// A logout's tombstones outlive the session's own copies, also when the session's idle
    /// timeout is longer than the default ("remember me"): a backup on a node that missed the
    /// logout must not be found once the tombstones are gone. They used to follow the default
    /// only (60 s here: 150 s of tombstone for a copy living an hour and ten minutes).
    @Test(arguments: [SessionManager.Mode.nonSticky, .sticky])
    func aLogoutsTombstonesOutliveALongerIdleTimeoutsCopies(mode: SessionManager.Mode) async throws {
        try await withMemcachedServers(count: 2) { servers in
            let config = try configuration(servers, mode: mode) {
                $0.timeouts.idle = .seconds(60)
                $0.sticky.asynchronousSaving = false
            }
            try await withManager(config) { manager in
                try await withInspector(servers) { inspector in
                    var browser = Browser()
                    try await manager.request(&browser) { access in
                        let session = try await access.loadOrCreate()
                        try session.set("user", "remembered")
                        session.setIdleTimeout(.seconds(3600))
                    }
                    let id = try #require(browser.id)
                    let keys = manager.keys(for: id.token)
                    func timeToLive(_ key: String, on node: String) async throws -> Int? {
                        guard case .item(let item?) = try await inspector.node(node).execute(.getMetadata(key)) else { return nil }
                        return item.timeToLive
                    }
                    let copy = try #require(try await timeToLive(keys.primary, on: id.nodeID))
                    #expect(copy > 3000)
                    try await manager.request(&browser, path: "/logout") { access in
                        try #require(try await access.load()).invalidate()
                    }
                    for node in ["n1", "n2"] {
                        // Sticky sessions have no backup copy: their primary key, on every node.
                        for key in mode == .nonSticky ? [keys.primary, keys.backup] : [keys.primary] {
                            let tombstone = try #require(try await timeToLive(key, on: node), "a tombstone on \(node)")
                            // The copy's hour plus two refresh windows (5 minutes each), plus a minute.
                            #expect(tombstone > 3600 + 600, "on \(node)")
                        }
                    }
                    #expect(try await manager.readCount(&browser) == 0)
                }
            }
        }
    }

    /// `msm session show`'s reading, from the core: the newest copy wins by version, on equal
    /// versions the primary; undecodable bytes are counted, not shown; a tombstone says the
    /// session was logged out; nothing is changed.
    @Test func anInspectionFindsTheNewestCopyByTheRecoveriesRule() async throws {
        try await withMemcachedServers(count: 2) { servers in
            try await withInspector(servers) { client in
                let keys = SessionKeys(token: MemcachedSessionID.generate(nodeID: "n1", route: nil).token, prefix: "msm:")
                func bytes(version: UInt64, note: String) throws -> ByteBuffer {
                    var buffer = ByteBuffer()
                    try BinarySessionCodec().encodeSession(
                        SessionRecord(
                            metadata: SessionMetadata(
                                createdAt: 1, lastAccessedAt: 2, idleTimeoutSeconds: 60, absoluteTimeoutSeconds: 0, version: version),
                            attributes: ["note": ByteBuffer(string: note)]),
                        into: &buffer)
                    return buffer
                }
                func note(_ inspection: StoredSessionInspection) -> String? {
                    inspection.newest?.record.attributes["note"].map { String(buffer: $0) }
                }
                let n1 = try client.node("n1")
                let n2 = try client.node("n2")
                var inspection = await SessionManager.inspectStored(keys: keys, on: client)
                #expect(inspection.newest == nil && inspection.copies.isEmpty && !inspection.isInvalidated)

                try await n1.set(keys.primary, value: try bytes(version: 3, note: "primary 3"))
                try await n2.set(keys.backup, value: try bytes(version: 3, note: "backup 3"))
                inspection = await SessionManager.inspectStored(keys: keys, on: client)
                #expect(note(inspection) == "primary 3", "equal versions: the primary")
                #expect(inspection.copies.count == 2)

                try await n2.set(keys.backup, value: try bytes(version: 4, note: "backup 4"))
                try await n2.set(keys.primary, value: ByteBuffer(string: "not a session"))
                inspection = await SessionManager.inspectStored(keys: keys, on: client)
                #expect(note(inspection) == "backup 4", "a newer backup over an older primary")
                #expect(inspection.newest?.copy.nodeID == "n2" && inspection.newest?.copy.isPrimary == false)
                #expect(inspection.undecodable == 1)
                #expect(try await n2.get(keys.primary) != nil, "an inspection changes nothing")

                _ = await SessionManager.invalidateStored(keys: keys, on: client)
                inspection = await SessionManager.inspectStored(keys: keys, on: client)
                #expect(inspection.isInvalidated && inspection.newest == nil)
                #expect(inspection.unreachable.isEmpty)
            }
        }
    }

    /// An idle timeout far beyond ten years (here `Int64.max` seconds) used to trap on overflow in
    /// TTL, deadline and expiry arithmetic. It is clamped to ten years: stored, served, no crash.
    @Test(arguments: [SessionManager.Mode.nonSticky, .sticky])
    func anEnormousIdleTimeoutIsClampedNotACrash(mode: SessionManager.Mode) async throws {
        try await withMemcachedServers(count: 2) { servers in
            try await withManager(try configuration(servers, mode: mode) { $0.sticky.asynchronousSaving = false }) { manager in
                try await withInspector(servers) { inspector in
                    var browser = Browser()
                    try await manager.request(&browser) { access in
                        let session = try await access.loadOrCreate()
                        try session.set("count", 1)
                        session.setIdleTimeout(.seconds(Int64.max))
                        #expect(session.metadata.idleTimeoutSeconds == SessionMetadata.maximumTimeoutSeconds)
                    }
                    #expect(try await manager.increment(&browser) == 2)
                    #expect(try await manager.readCount(&browser) == 2)
                    let id = try #require(browser.id)
                    let key = manager.keys(for: id.token).primary
                    guard case .item(let item?) = try await inspector.node(id.nodeID).execute(.getMetadata(key)) else {
                        Issue.record("not stored")
                        return
                    }
                    // Sent as an absolute time ten years out (memcached reports what remains).
                    #expect((item.timeToLive ?? 0) > 9 * 365 * 24 * 3600)
                }
            }
        }
    }

    /// Sticky, every node down: sessions live in memory only, and memory is bounded. At the bound
    /// new sessions are refused with a typed error (503 through the adapters); the unsaved ones
    /// are never dropped, and are written once memcached is back, which frees room again.
    @Test func localMemoryIsBoundedWhileMemcachedIsDown() async throws {
        try await withMemcachedServers(count: 1) { servers in
            let config = try configuration(servers, mode: .sticky) {
                $0.sticky.localSessionLimit = 32
                $0.memcached.requestTimeout = .milliseconds(300)
                $0.memcached.failureThreshold = 1
            }
            try await withManager(config) { manager in
                try await servers[0].kill()
                var kept: [Browser] = []
                var refused = 0
                for _ in 0..<100 {
                    var browser = Browser()
                    do {
                        #expect(try await manager.increment(&browser) == 1)
                        kept.append(browser)
                    } catch let error as SessionError {
                        #expect(error.code == .localStoreFull, "\(error)")
                        #expect(browser.cookie == nil, "a refused session gets no cookie")
                        refused += 1
                    }
                }
                #expect(refused > 0)
                #expect(kept.count <= 32)
                #expect(manager.sticky.localStore.count <= 32)
                #expect(manager.statistics.value(of: .localStoreRefusals) == refused)
                // Nothing unsaved was dropped: every kept session still counts on.
                for index in kept.indices { #expect(try await manager.increment(&kept[index]) == 2) }

                try await servers[0].restart()
                // Waits for what frees room, not for a first new session to fit: that one can
                // push a written copy out of a shard whose other entry is still unsaved, and
                // reading that copy back then finds no room (the first fresh-clone CI run of
                // 2026-12-02, under load).
                try await eventually(timeout: .seconds(20), "the unsaved sessions are written") {
                    manager.sticky.writer.pendingCount == 0 && !manager.sticky.localStore.allSessions.contains { $0.hasUnsavedChanges }
                }
                var fresh = Browser()
                #expect(try await manager.increment(&fresh) == 1, "room again")
                for index in kept.indices { #expect(try await manager.readCount(&kept[index]) == 2) }
            }
        }
    }

    /// Sticky, no node answering: the health check says yes while memory can take a new session
    /// (written sessions are evicted to make room; before, a memory full of them said no), and no
    /// once none would fit (every new session is refused then).
    @Test func theStickyHealthCheckCountsRoomNotEntries() async throws {
        try await withMemcachedServers(count: 1) { servers in
            let config = try configuration(servers, mode: .sticky) {
                $0.sticky.localSessionLimit = 32
                $0.memcached.requestTimeout = .milliseconds(300)
                $0.memcached.failureThreshold = 1
                $0.sticky.asynchronousSaving = false
            }
            try await withManager(config) { manager in
                var made = 0
                while manager.sticky.localStore.count < 32, made < 2_000 {
                    var browser = Browser()
                    try await manager.increment(&browser)
                    made += 1
                }
                #expect(manager.sticky.localStore.count == 32, "memory full of written sessions")
                try await servers[0].kill()
                var probe = Browser()
                try await manager.increment(&probe)  // finds the node down; kept in memory, unsaved
                let topology = manager.topology
                #expect(!topology.order.contains { topology.isAvailable($0) })
                #expect(manager.canServeSessions, "written sessions make room")
                var attempts = 0
                while manager.canServeSessions, attempts < 2_000 {
                    var browser = Browser()
                    _ = try? await manager.increment(&browser)
                    attempts += 1
                }
                #expect(!manager.canServeSessions, "memory full of unsaved sessions")
                for _ in 0..<20 {
                    var browser = Browser()
                    await #expect(throws: SessionError.self) { try await manager.increment(&browser) }
                }
            }
        }
    }

    /// A request racing a login (it loaded the session under the old id, the login moved it to
    /// a new one and deleted the old copies) finds its copy gone: its response must not clear the
    /// cookie, which by then is the login's new one. (The simulation found it on its own.)
    @Test func aRequestRacingALoginDoesNotClearTheNewCookie() async throws {
        try await withMemcachedServers(count: 2) { servers in
            try await withManager(try configuration(servers)) { manager in
                var browser = Browser()
                try await manager.increment(&browser)
                let old = browser
                // The racing request: loaded under the old id, ends after the login.
                let racing = manager.beginRequest(path: "/part", sessionCookie: old.cookie)
                let session = try #require(try await racing.load())
                var login = old
                try await manager.request(&login, path: "/login") { access in try await access.regenerateID() }
                #expect(login.cookie != old.cookie)
                try session.set("note", "raced")
                let action = try await manager.endRequest(racing)
                #expect(action.cookie == .unchanged, "the racing response leaves the new cookie alone")
                #expect(try await manager.readCount(&login) == 1)
            }
        }
    }

    /// Sticky, asynchronous saving: a login right after the session was made (its save still
    /// queued) gets a new id all the same; only a session made by the same request keeps its id
    /// (it never reached the browser). Before, the login kept the id: session fixation.
    @Test func aLoginRegeneratesASessionWhoseSaveIsStillQueued() async throws {
        try await withMemcachedServers(count: 1) { servers in
            let config = try configuration(servers, mode: .sticky) {
                $0.route = "a"
                $0.sticky.saveDelay = .seconds(30)
            }
            try await withManager(config) { manager in
                var browser = Browser()
                try await manager.increment(&browser)
                let before = browser.cookie
                try await manager.request(&browser, path: "/login") { access in try await access.regenerateID() }
                #expect(browser.cookie != before, "a new id at login")
                var stale = Browser(cookie: before)
                #expect(try await manager.readCount(&stale) == 0, "the old id is dead")
                #expect(try await manager.readCount(&browser) == 1)
                // Made and regenerated by one request: nothing to regenerate.
                var fresh = Browser()
                try await manager.request(&fresh) { access in
                    try await access.loadOrCreate().set("count", 1)
                    try await access.regenerateID()
                }
                #expect(try await manager.readCount(&fresh) == 1)
            }
        }
    }

    /// A session idle past its timeout must not come back from its backup, which outlives the
    /// primary by two refresh windows, when the primary's node is dead (recovery) or restarted
    /// empty (restore). Both paths used to check only the absolute timeout.
    @Test(arguments: [false, true])
    func anIdleExpiredSessionDoesNotComeBackFromItsBackup(restart: Bool) async throws {
        try await withMemcachedServers(count: 2) { servers in
            // Idle 12 s: refresh window 3 s, backup TTL 18 s.
            try await withManager(try configuration(servers) { $0.timeouts.idle = .seconds(12) }) { manager in
                try await withInspector(servers) { inspector in
                    var browser = Browser()
                    try await manager.increment(&browser)
                    let id = try #require(browser.id)
                    let keys = manager.keys(for: id.token)
                    let primary = Int(id.nodeID.dropFirst())! - 1
                    let backupNode = try inspector.node(id.nodeID == "n1" ? "n2" : "n1")
                    func backupTTL() async throws -> Int? {
                        guard case .item(let item?) = try await backupNode.execute(.getMetadata(keys.backup)) else { return nil }
                        return item.timeToLive
                    }
                    try await eventually("a backup exists") { try await backupTTL() != nil }
                    // Idle past 12 s, with the backup still there (less than a window left).
                    try await eventually(timeout: .seconds(30), "the session is idle past its timeout") {
                        guard let left = try await backupTTL() else { return false }
                        return left <= 3
                    }
                    if restart {
                        try await servers[primary].kill()
                        try await servers[primary].restart()
                        // The manager knows the node restarted: a miss there looks for the backup.
                        try await eventually("the restart is seen") { manager.store.missMayBeRestart(on: id.nodeID) }
                    } else {
                        try await servers[primary].kill()
                    }
                    #expect(try await backupTTL() != nil, "the backup is still there")
                    #expect(try await manager.readCount(&browser) == 0, "idle-expired: gone, not restored from the backup")
                }
            }
        }
    }

    /// Two requests of one session take it over on the same instance at once (its cookie still
    /// names another instance): they must share one local copy. Each used to load its own, and
    /// the copy kept in memory (authoritative in sticky mode) lacked the other's change.
    @Test func concurrentTakeoversOnOneInstanceShareOneCopy() async throws {
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
                var browser = Browser()
                try await managers[0].increment(&browser)
                let cookie = browser
                let instanceB = managers[1]
                let first = instanceB.beginRequest(path: "/part", sessionCookie: cookie.cookie)
                let second = instanceB.beginRequest(path: "/part", sessionCookie: cookie.cookie)
                async let loadFirst = first.load()
                async let loadSecond = second.load()
                let (left, right) = try await (#require(loadFirst), #require(loadSecond))
                #expect(left === right, "one copy")
                try left.set("left", "left")
                try right.set("right", "right")
                // The copy memory keeps ends first; the other's save then merges in memcached.
                let token = try #require(cookie.id).token
                let held = instanceB.sticky.localStore.held(token, refreshedSince: .uptimeNanoseconds(0))
                for access in held === right ? [second, first] : [first, second] {
                    _ = try await instanceB.endRequest(access)
                }
                var atB = Browser(cookie: cookie.id!.routed(to: "b").description)
                try await instanceB.request(&atB, path: "/read") { access in
                    let session = try #require(try await access.load())
                    #expect(session["left", as: String.self] == "left")
                    #expect(session["right", as: String.self] == "right")
                }
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
                let id = try #require(browser.id)
                let primary = Int(id.nodeID.dropFirst())! - 1
                try await eventually("the nodes' boot times are known") { manager.store.nodeRestarts.knows(id.nodeID) }
                let access = manager.beginRequest(path: "/counter", sessionCookie: browser.cookie)
                let session = try #require(try await access.load())
                try await servers[primary].kill()
                try await servers[primary].restart()
                try await eventually("the restart is seen") { manager.store.missMayBeRestart(on: id.nodeID) }
                try session.set("count", 3)
                let action = try await manager.endRequest(access)
                #expect(action.cookie == .unchanged)
                #expect(try await manager.readCount(&browser) == 3, "the change and the session survived")
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
                let pid = try #require(frozen.pid)
                kill(pid, SIGSTOP)
                // The session moves off the frozen node (a write to it times out) under a new id.
                try await eventually(timeout: .seconds(20), "the session moved") {
                    (try? await managers[0].increment(&browser)) != nil && browser.id?.nodeID != id.nodeID
                }
                kill(pid, SIGCONT)
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

    /// The simulation, seed 9611: a request read the session on its node, a concurrent request
    /// (another tab) then moved it off that node while it was frozen, and the move's cleanup
    /// deleted the old copy once the node thawed. The first request's write, finding its copy
    /// missing, wrote the session there again: two copies, the moved one without its change. Its
    /// changes go where the session is now, merged onto that copy, with that cookie.
    @Test func aWriteWhoseCopyAConcurrentRequestMovedGoesWhereTheSessionIsNow() async throws {
        try await withMemcachedServers(count: 3) { servers in
            let config = try configuration(servers) {
                $0.memcached.requestTimeout = .milliseconds(300)
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
                    let pid = try #require(servers[Int(id.nodeID.dropFirst())! - 1].pid)
                    kill(pid, SIGSTOP)
                    var tab = browser
                    try await manager.request(&tab, path: "/part1") { access in
                        try #require(try await access.load()).set("part1", true)
                    }
                    kill(pid, SIGCONT)
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

    /// A logout whose session is not found (evicted) still ends its id: the backup that
    /// survived cannot bring it back when the primary's node later fails. (The simulation found it.)
    @Test func aLogoutOfAnEvictedSessionEndsItsBackupToo() async throws {
        try await withMemcachedServers(count: 2) { servers in
            try await withManager(try configuration(servers) { $0.memcached.requestTimeout = .milliseconds(500) }) { manager in
                try await withInspector(servers) { inspector in
                    var browser = Browser()
                    try await manager.increment(&browser)
                    let id = try #require(browser.id)
                    let keys = manager.keys(for: id.token)
                    let backupNode = try inspector.node(id.nodeID == "n1" ? "n2" : "n1")
                    try await eventually("the backup is written") { try await backupNode.get(keys.backup) != nil }
                    #expect(try await inspector.node(id.nodeID).delete(keys.primary) == .deleted)  // "evicted"
                    let old = browser
                    try await manager.request(&browser, path: "/logout") { access in try await access.invalidate() }
                    #expect(browser.cookie == nil)
                    // (The other nodes' tombstones are sent without waiting for them.)
                    try await eventually("the backup is tombstoned") {
                        try await backupNode.get(keys.backup)?.flags == SessionManager.tombstoneFlags
                    }
                    try await servers[Int(id.nodeID.dropFirst())! - 1].kill()
                    var stale = old
                    #expect(try await manager.readCount(&stale) == 0, "not restored from the backup")
                }
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

    /// A backup write racing a logout can land after the logout's tombstone on the backup key
    /// (backups are unconditional, nobody waits for them). The logout's tombstones on the primary
    /// key of every node still outrank it: when the session's node later fails, neither recovery
    /// nor restore brings the logged-out session back.
    @Test(arguments: [false, true])
    func aBackupLandingAfterALogoutDoesNotBringItBack(restart: Bool) async throws {
        try await withMemcachedServers(count: 3) { servers in
            let config = try configuration(servers) {
                $0.memcached.requestTimeout = .milliseconds(500)
                $0.memcached.failureThreshold = 1
            }
            try await withManager(config) { manager in
                try await withInspector(servers) { inspector in
                    var browser = Browser()
                    try await manager.increment(&browser)
                    let id = try #require(browser.id)
                    let keys = manager.keys(for: id.token)
                    let backupNode = try inspector.node(manager.topology.nextAvailable(after: id.nodeID)!)
                    try await eventually("the backup is written") { try await backupNode.get(keys.backup) != nil }
                    let copy = try #require(try await backupNode.get(keys.backup))
                    try await eventually("the boot times are known") { manager.store.nodeRestarts.knows(id.nodeID) }
                    let old = browser
                    try await manager.request(&browser, path: "/logout") { access in try await access.invalidate() }
                    // The racing backup write lands last.
                    try await backupNode.set(keys.backup, value: copy.value, ttl: .seconds(60))
                    let home = servers[Int(id.nodeID.dropFirst())! - 1]
                    try await home.kill()
                    if restart {
                        try await home.restart()
                        try await eventually("the restart is seen") { manager.store.missMayBeRestart(on: id.nodeID) }
                    }
                    var stale = old
                    #expect(try await manager.readCount(&stale) == 0, "the logged-out session stays ended")
                }
            }
        }
    }
}

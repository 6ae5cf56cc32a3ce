@_spi(Simulation) import MemcachedSessions
import Memcached
import NIOCore

/// Unit tests of the session logic (lifecycles, locking, the CAS merge, failover, expiry) against
/// the simulated memcached cluster: real session managers behind the command-level seam, virtual
/// time driven by the ``DeterministicScheduler`` (an idle timeout of 30 minutes passes in no time),
/// each test run under several seeds, that is several interleavings of its concurrent requests.
///
/// They need the scheduler installed, which takes over the process's global executor: they run in
/// their own process (`session-sim --test NAME`), which the `MemcachedSimulationTests` target
/// starts once per test. What only a real server shows stays in the integration tests.
public struct SimulatedTest: Sendable {
    public let name: String
    let nodes: Int
    let instances: Int
    let configure: @Sendable (inout SessionManager.Configuration, _ instance: Int) -> Void
    let body: @Sendable (SimulatedTestBench) async throws -> Void

    init(
        _ name: String, nodes: Int = 3, instances: Int = 2,
        configure: @escaping @Sendable (inout SessionManager.Configuration, Int) -> Void,
        _ body: @escaping @Sendable (SimulatedTestBench) async throws -> Void
    ) {
        self.name = name
        self.nodes = nodes
        self.instances = instances
        self.configure = configure
        self.body = body
    }

    /// Runs the test under one seed. The scheduler must be installed. Returns its failures (none:
    /// it passed).
    public func run(seed: UInt64) -> [String] {
        let scheduler = DeterministicScheduler.shared
        scheduler.reset(seed: seed)
        let bench = SimulatedTestBench(self)
        let finished = Flag()
        Task.detached {
            await bench.run(self.body)
            finished.value = true
        }
        let completed = scheduler.run(until: { finished.value }, maximumJobs: 5_000_000)
        if !completed {
            bench.failures.append("did not finish (a request or the shutdown hung) after \(scheduler.jobsRun) jobs")
        }
        scheduler.abandon()
        return bench.failures
    }
}

/// What a simulated test works with: the cluster, the managers, virtual time, browsers' requests.
public final class SimulatedTestBench: @unchecked Sendable {
    // @unchecked Sendable: everything runs on the simulation's one thread.
    public let cluster: SimulatedCluster
    public private(set) var managers: [SessionManager] = []
    let clock = SimulatedClock()
    var failures: [String] = []

    init(_ test: SimulatedTest) {
        cluster = SimulatedCluster(nodeCount: test.nodes, requestTimeout: .seconds(1), failureThreshold: 2, probeInterval: .milliseconds(500))
        for index in 0..<test.instances {
            var configuration = try! SessionManager.Configuration(nodes: cluster.nodeList)
            configuration.memcached.requestTimeout = .seconds(1)
            configuration.timeouts.save = .milliseconds(500)
            configuration.unavailablePolicy = .fail
            test.configure(&configuration, index)
            managers.append(try! SessionManager(configuration: configuration, nodes: cluster, clock: clock, entropy: SimulatedEntropy()))
        }
    }

    func run(_ body: @Sendable (SimulatedTestBench) async throws -> Void) async {
        await withTaskGroup(of: Void.self) { services in
            services.addTask { try? await self.cluster.run() }
            for manager in managers {
                services.addTask { try? await manager.run() }
            }
            do {
                try await body(self)
            } catch {
                failures.append("threw \(error)")
            }
            services.cancelAll()
        }
    }

    /// Virtual seconds since the run started.
    public var now: Double { Double(DeterministicScheduler.shared.nanoseconds) / 1e9 }

    public func check(_ condition: Bool, _ message: @autoclosure () -> String) {
        if !condition { failures.append(message()) }
    }

    public func sleep(seconds: Double) async {
        try? await clock.sleep(for: .nanoseconds(Int64(seconds * 1e9)))
    }

    /// One request on `instance`, as an adapter runs it (`SessionManager/serveRequest`): the
    /// browser's cookie in, the response's cookie applied to it.
    public func request<T>(
        _ instance: Int, _ cookie: inout String?, path: String = "/", _ handler: (SessionAccess) async throws -> T
    ) async throws -> T {
        let manager = managers[instance]
        let header = cookie.map { "\(manager.configuration.cookie.name)=\($0)" }
        let (value, setCookie): (T, String?)
        do {
            (value, setCookie) = try await manager.serveRequest(path: path, cookieHeader: header, cookie: manager.configuration.cookie, eventLoop: nil) {
                access in try await handler(access!)
            }
        } catch {
            switch error {
            case .handler(let error, _): throw error
            case .endOfRequest(let error): throw error
            }
        }
        if let setCookie {
            // `name=value; attributes`, read as the adapters read a Cookie header (the first pair
            // named so); a logout's value is empty.
            let value = manager.configuration.cookie.value(inCookieHeader: setCookie) ?? ""
            cookie = value.isEmpty ? nil : String(value)
        }
        return value
    }

    /// Adds one to the session's count (creating the session), after `handlerSeconds` in the handler.
    @discardableResult
    public func increment(_ instance: Int, _ cookie: inout String?, path: String = "/counter", handlerSeconds: Double = 0) async throws -> Int {
        try await request(instance, &cookie, path: path) { access in
            let session = try await access.loadOrCreate()
            let count = (session["count", as: Int.self] ?? 0) + 1
            if handlerSeconds > 0 { await self.sleep(seconds: handlerSeconds) }
            try session.set("count", count)
            return count
        }
    }

    /// The session's count, nil when there is no session.
    public func count(_ instance: Int, _ cookie: inout String?, path: String = "/read") async throws -> Int? {
        try await request(instance, &cookie, path: path) { access in
            try await access.load().map { $0["count", as: Int.self] ?? 0 }
        }
    }

    public func logout(_ instance: Int, _ cookie: inout String?) async throws {
        try await request(instance, &cookie, path: "/logout") { access in try await access.invalidate() }
    }

    /// A login on `instance`: a session with a count of 1 and `principal` set.
    public func logIn(_ instance: Int, _ cookie: inout String?, as principal: String) async throws {
        try await request(instance, &cookie, path: "/login") { access in
            let session = try await access.loadOrCreate()
            try session.set("count", 1)
            try session.setPrincipal(principal)
        }
    }

    /// While `refused`, every node answers SERVER_ERROR to every write of a principal index (its
    /// primary and backup keys); reads, and the sessions' own commands, go through.
    public func refusePrincipalIndexWrites(_ refused: Bool) {
        let prefix = managers[0].configuration.keyPrefix
        let fault: @Sendable (MemcachedRequest) -> CommandFault? = { request in
            guard case .store(let key, _, _, _, _, _) = request.command,
                key.hasPrefix(prefix + "p:") || key.hasPrefix(prefix + "q:")
            else { return nil }
            return .serverError
        }
        for node in cluster.nodes { node.faultMatching = refused ? fault : nil }
    }

    /// The node the cookie's session lives on.
    public func node(of cookie: String?) -> SimulatedNode? {
        cookie.flatMap { MemcachedSessionID(parsing: $0) }.flatMap { cluster.node($0.nodeID) }
    }

    /// Starts a session on instance 0 (its count at 1), into `cookie`: the node its primary copy
    /// lives on, and the key prefix of its copies (`s:` primary, `b:` backup, `l:` lock).
    public func startSession(_ cookie: inout String?) async throws -> (primary: SimulatedNode, prefix: String) {
        try await increment(0, &cookie)
        return (try requireNode(node(of: cookie)), managers[0].configuration.keyPrefix)
    }

    /// Where the session named by `cookie`, whose primary copy is on `primary`, moves when that
    /// node fails: the next node of the cluster (where its backup is), and the id naming it
    /// there. Nil (a failed check) when `cookie` names no session on `primary`.
    public func relocationTarget(of cookie: String?, from primary: SimulatedNode) -> (node: SimulatedNode, id: String)? {
        let nodes = cluster.nodes
        guard let id = cookie.flatMap({ MemcachedSessionID(parsing: $0) }), id.nodeID == primary.id,
            let index = nodes.firstIndex(where: { $0 === primary })
        else {
            check(false, "the cookie names a session on the failed node")
            return nil
        }
        let target = nodes[(index + 1) % nodes.count]
        return (target, id.relocated(to: target.id).description)
    }
}

extension SimulatedTest {
    /// Every simulated test, by name.
    public static let all: [SimulatedTest] = [
        // Revocation: the sessions are ended before the principal index is rewritten; when the
        // rewrite fails, the call fails with the count ended (never a silent partial success), the
        // sessions stay ended on every instance, and a later revocation empties the index.
        SimulatedTest("revocation-whose-index-rewrite-fails-ends-the-sessions-and-says-so-non-sticky") { configuration, _ in
            configuration.mode = .nonSticky
        } _: { bench in try await revocationWhoseIndexRewriteFails(bench) },
        SimulatedTest("revocation-whose-index-rewrite-fails-ends-the-sessions-and-says-so-sticky") { configuration, instance in
            configuration.mode = .sticky
            configuration.route = "r\(instance + 1)"
        } _: { bench in try await revocationWhoseIndexRewriteFails(bench) },
        // A sticky takeover whose update of the principal index (the entry's route) fails: the
        // request is served (the entry still names the session's keys), and a revocation on the
        // previous owner still ends the session on the new one, which checks memcached before
        // serving while the entry names another instance.
        SimulatedTest("a-takeover-whose-index-update-fails-is-still-revoked-within-a-second") { configuration, instance in
            configuration.mode = .sticky
            configuration.route = "r\(instance + 1)"
        } _: { bench in
            var cookie: String? = nil
            try await bench.logIn(0, &cookie, as: "alice")
            bench.refusePrincipalIndexWrites(true)
            // The balancer sends the session to instance 1, which takes it over.
            let taken = try await bench.increment(1, &cookie)
            bench.check(taken == 2, "the takeover served the session: \(taken)")
            bench.check(cookie?.hasSuffix(".r2") == true, "the session's route is now r2: \(cookie ?? "none")")
            var still = cookie
            bench.check(try await bench.count(1, &still) == 2, "served from instance 1's memory (the index still unwritable)")
            // The revocation reads the index (naming r1), ends the session's copies and tells r1;
            // it cannot rewrite the index, and says so.
            do throws(SessionError) {
                _ = try await bench.managers[0].invalidateAll(principal: "alice")
                bench.check(false, "the revocation succeeded though its index could not be rewritten")
            } catch {
                bench.check(error.sessionsEnded == 1, "the index named the session: \(String(describing: error.sessionsEnded))")
            }
            var after = cookie
            bench.check(try await bench.count(1, &after) == nil, "instance 1 no longer serves the revoked session")
            // Once the index can be written, a takeover moves its entry: a revocation then tells
            // the new owner, which stops serving at once (no check of memcached needed).
            bench.refusePrincipalIndexWrites(false)
            var bob: String? = nil
            try await bench.logIn(0, &bob, as: "bob")
            bench.check(try await bench.increment(1, &bob) == 2, "bob's session taken over by instance 1")
            bench.check(try await bench.managers[0].invalidateAll(principal: "bob") == 1, "bob's one session revoked")
            var bobAfter = bob
            bench.check(try await bench.count(1, &bobAfter) == nil, "instance 1 stopped serving bob's revoked session")
        },
        // A logout while the session's node is marked down (faults of other requests) though it
        // still answers: the logout waits, within the request timeout, for the node to be probed
        // up and take its tombstone, so that no instance reads the ended copy there after the
        // response (the simulation, sticky-sync seed 245).
        SimulatedTest("a-logout-while-its-node-is-marked-down-lands-its-tombstone-before-answering-non-sticky") { configuration, _ in
            configuration.mode = .nonSticky
        } _: { bench in try await logoutWhileItsNodeIsMarkedDown(bench) },
        SimulatedTest("a-logout-while-its-node-is-marked-down-lands-its-tombstone-before-answering-sticky-sync") { configuration, instance in
            configuration.mode = .sticky
            configuration.sticky.asynchronousSaving = false
            configuration.route = "r\(instance + 1)"
        } _: { bench in try await logoutWhileItsNodeIsMarkedDown(bench) },
        SimulatedTest("a-login-while-its-node-is-marked-down-ends-the-old-id-before-answering-sticky-sync") { configuration, instance in
            configuration.mode = .sticky
            configuration.sticky.asynchronousSaving = false
            configuration.route = "r\(instance + 1)"
        } _: { bench in try await logoutWhileItsNodeIsMarkedDown(bench, login: true) },
        SimulatedTest("a-login-while-its-node-is-marked-down-ends-the-old-id-before-answering-non-sticky") { configuration, _ in
            configuration.mode = .nonSticky
        } _: { bench in try await logoutWhileItsNodeIsMarkedDown(bench, login: true) },
        // A logout on another instance of a sticky session whose copies memcached lost (an
        // operator's `flush_all`; the simulation, sticky-async seed 5764: evicted): the takeover
        // finds nothing, the logout ends the id all the same and tells the owner, which stops
        // serving it from memory.
        SimulatedTest("a-logout-elsewhere-of-a-sticky-session-memcached-lost-ends-the-owners-copy") { configuration, instance in
            configuration.mode = .sticky
            configuration.route = "r\(instance + 1)"
        } _: { bench in
            var cookie: String? = nil
            try await bench.increment(0, &cookie)
            try await bench.increment(0, &cookie)
            let ended = cookie
            await bench.sleep(seconds: 1)  // the owner's queued save has landed
            for node in bench.cluster.nodes { node.flushAll() }
            var elsewhere = cookie
            try await bench.logout(1, &elsewhere)
            bench.check(elsewhere == nil, "the logout cleared the cookie")
            var replayed = ended
            let count = try await bench.count(0, &replayed)
            bench.check(count == nil, "the owner served the logged-out id from memory: \(String(describing: count))")
        },
        // A revocation racing a sticky takeover: the new owner read the session's copy before the
        // revocation's tombstones, and the revocation read the index while it still named the
        // previous owner. Whichever way their index writes interleave, the new owner stops
        // serving the session: its own index update finds the entry gone (and the copy ended),
        // or the revocation's rewrite finds the entry moved and tells the new route as well.
        SimulatedTest("a-revocation-racing-a-takeover-ends-the-session-on-the-new-owner", instances: 3) { configuration, instance in
            configuration.mode = .sticky
            configuration.route = "r\(instance + 1)"
        } _: { bench in
            // The revocation runs on a third instance (five timings of the takeover's request),
            // then once on the new owner itself as the takeover starts (whichever of its scan, the
            // takeover's second read after its handshake, or its index rewrite ends the session:
            // no timing is forced there).
            for (revoker, timings) in [(2, [0.0, 0.05, 0.2, 0.6, 1.2]), (1, [0.2])] {
                for (round, handlerSeconds) in timings.enumerated() {
                    let principal = "alice\(revoker)-\(round)"
                    var cookie: String? = nil
                    try await bench.logIn(0, &cookie, as: principal)
                    await bench.sleep(seconds: 1)  // its save and its index entry have landed
                    let loaded = Flag()
                    let taken = cookie
                    let (takenCookie, revoked) = try await withThrowingTaskGroup(of: (String?, Int?).self) { group in
                        group.addTask {
                            // The balancer moves the browser to instance 1, which takes the session over.
                            var cookie = taken
                            _ = try await bench.request(1, &cookie, path: "/read") { access -> Int? in
                                let count = try await access.load().map { $0["count", as: Int.self] ?? 0 }
                                loaded.value = true
                                if handlerSeconds > 0 { await bench.sleep(seconds: handlerSeconds) }
                                return count
                            }
                            return (cookie, nil)
                        }
                        group.addTask {
                            // A third instance revokes the principal once the takeover has read
                            // the copy. The new owner revokes it as the takeover starts: its scan
                            // of its own sessions then misses the one being taken over, and its
                            // index read still names the previous owner.
                            if revoker == 2 {
                                while !loaded.value { await bench.sleep(seconds: 0.001) }
                            }
                            return (nil, try await bench.managers[revoker].invalidateAll(principal: principal))
                        }
                        var cookie: String? = nil
                        var revoked: Int? = nil
                        for try await (taken, count) in group {
                            if let taken { cookie = taken }
                            if let count { revoked = count }
                        }
                        return (cookie, revoked)
                    }
                    bench.check(revoked == 1, "revoker \(revoker), round \(round): the revocation ended the one session: \(String(describing: revoked))")
                    // The new owner first (a takeover of the new cookie by another instance would
                    // read the tombstone and tell it).
                    for instance in [1, 0, 2] {
                        for sent in [takenCookie, taken].compactMap({ $0 }) {
                            var replayed: String? = sent
                            let count = try await bench.count(instance, &replayed)
                            bench.check(
                                count == nil,
                                "revoker \(revoker), round \(round) (handler \(handlerSeconds) s): instance \(instance) served the revoked session: \(String(describing: count))")
                        }
                    }
                }
            }
        },
        // Logouts of sessions that do not exist, with routes of the attacker's choosing: a route
        // without a heartbeat gets no notice, and a live one at most 20 a second per instance.
        SimulatedTest("forged-logouts-do-not-flood-a-mailbox") { configuration, instance in
            configuration.mode = .sticky
            configuration.route = "r\(instance + 1)"
        } _: { bench in
            func forged(_ index: Int, route: String) -> String {
                let hex = String(index, radix: 16, uppercase: true)
                return String(repeating: "F", count: 32 - hex.count) + hex + "-n1." + route
            }
            await bench.sleep(seconds: 1)  // heartbeats written
            var nowhere: String? = forged(1, route: "r9")
            try await bench.logout(1, &nowhere)
            let statistics = bench.managers[1].statistics
            bench.check((statistics.snapshot().counters["notices_sent"] ?? 0) == 0, "a notice to a route with no heartbeat")
            try await withThrowingTaskGroup(of: Void.self) { group in
                for index in 0..<30 {
                    group.addTask {
                        var cookie: String? = forged(100 + index, route: "r1")
                        try await bench.logout(1, &cookie)
                    }
                }
                try await group.waitForAll()
            }
            let sent = statistics.snapshot().counters["notices_sent"] ?? 0
            let skipped = statistics.snapshot().counters["unfound_notices_skipped"] ?? 0
            bench.check(sent >= 1 && sent <= 20, "notices for 30 forged logouts within a second: \(sent)")
            bench.check(sent + skipped == 30, "each of 30 forged logouts sent a notice or counted one skipped: \(sent) + \(skipped)")
            // The budget is per second: a second later, a logout tells a live route again.
            await bench.sleep(seconds: 1)
            var later: String? = forged(200, route: "r1")
            try await bench.logout(1, &later)
            let after = statistics.snapshot().counters["notices_sent"] ?? 0
            bench.check(after == sent + 1, "a notice a second later: \(after) after \(sent)")
        },
        // Locking: concurrent requests of one session are serializable.
        SimulatedTest("locking-all-serializes-concurrent-increments") { configuration, _ in
            configuration.mode = .nonSticky
            configuration.locking.mode = .all
            configuration.locking.expiry = .seconds(5)
            configuration.locking.waitBudget = .seconds(30)
        } _: { bench in
            var cookie: String? = nil
            try await bench.increment(0, &cookie)
            let shared = cookie
            let results = try await withThrowingTaskGroup(of: Int.self, returning: [Int].self) { group in
                for index in 0..<8 {
                    group.addTask {
                        var cookie = shared
                        return try await bench.increment(index % 2, &cookie, handlerSeconds: 0.05)
                    }
                }
                return try await group.reduce(into: []) { $0.append($1) }
            }
            bench.check(results.sorted() == Array(2...9), "each increment saw the one before it: \(results.sorted())")
            bench.check(try await bench.count(1, &cookie) == 9, "8 concurrent increments after the first: 9")
        },
        // Without locking: concurrent requests changing different attributes both survive (the
        // CAS merge); on the same attribute the last writer wins.
        SimulatedTest("unlocked-concurrent-writes-merge-by-attribute") { configuration, _ in
            configuration.mode = .nonSticky
            configuration.locking.mode = .none
        } _: { bench in
            var cookie: String? = nil
            try await bench.increment(0, &cookie)
            let shared = cookie
            try await withThrowingTaskGroup(of: Void.self) { group in
                for (index, name) in ["left", "right"].enumerated() {
                    group.addTask {
                        var cookie = shared
                        try await bench.request(index, &cookie) { access in
                            let session = try await access.loadOrCreate()
                            await bench.sleep(seconds: 0.05)  // both have read before either writes
                            try session.set(name, name)
                            try session.set("last", name)
                        }
                    }
                }
                try await group.waitForAll()
            }
            let (left, right, last, count) = try await bench.request(0, &cookie) { access in
                let session = try await access.load()
                return (
                    session?["left", as: String.self], session?["right", as: String.self], session?["last", as: String.self],
                    session?["count", as: Int.self]
                )
            }
            bench.check(left == "left" && right == "right", "both attributes survive: \(String(describing: left)), \(String(describing: right))")
            bench.check(last == "left" || last == "right", "the same attribute: one of the writers")
            bench.check(count == 1, "what neither changed stays: \(String(describing: count))")
        },
        // Failover: a dead primary moves the session (a new id, the count kept); the logout that
        // follows ends every copy, the old primary's once it is back.
        SimulatedTest("failover-moves-the-session-and-logout-ends-every-copy") { configuration, _ in
            configuration.mode = .nonSticky
        } _: { bench in
            var cookie: String? = nil
            for _ in 0..<3 { try await bench.increment(0, &cookie) }
            let before = cookie
            let primary = try requireNode(bench.node(of: cookie))
            primary.freeze()
            let started = bench.now
            let count = try await bench.increment(1, &cookie)
            bench.check(count == 4, "the count survives the frozen primary: \(count)")
            bench.check(bench.now - started < 3 + 1 + 0.5 + 1, "the request ended within its bound: \(bench.now - started) s")
            bench.check(cookie != before && bench.node(of: cookie) !== primary, "a new id, on another node")
            try await bench.logout(0, &cookie)
            primary.thaw()
            await bench.sleep(seconds: 5)  // the thawed node answers again; leftovers go
            var old = before
            bench.check(try await bench.count(0, &old) == nil, "the pre-failover cookie reads nothing after the logout")
            bench.check(try await bench.count(1, &old) == nil, "on either instance")
        },
        // A node restarted empty: the session comes back from its backup.
        SimulatedTest("a-primary-restarted-empty-serves-the-backup") { configuration, _ in
            configuration.mode = .nonSticky
        } _: { bench in
            var cookie: String? = nil
            for _ in 0..<2 { try await bench.increment(0, &cookie) }
            try requireNode(bench.node(of: cookie)).restartEmpty(pid: 4242)
            await bench.sleep(seconds: 2)
            bench.check(try await bench.count(1, &cookie) == 2, "read from the backup")
            bench.check(try await bench.increment(0, &cookie) == 3, "and counted on")
        },
        // Expiry on virtual time: a request slides the idle timeout; past it the session is gone.
        SimulatedTest("idle-timeout-slides-and-expires-non-sticky") { configuration, _ in
            configuration.mode = .nonSticky
            configuration.timeouts.idle = .seconds(60)
        } _: { bench in
            var cookie: String? = nil
            try await bench.increment(0, &cookie)
            await bench.sleep(seconds: 50)
            bench.check(try await bench.count(1, &cookie) == 1, "alive within the idle timeout")
            await bench.sleep(seconds: 50)
            bench.check(try await bench.count(0, &cookie) == 1, "the read slid it")
            await bench.sleep(seconds: 75)
            bench.check(try await bench.count(1, &cookie) == nil, "expired past the idle timeout")
        },
        SimulatedTest("idle-timeout-expires-sticky") { configuration, instance in
            configuration.mode = .sticky
            configuration.route = "r\(instance + 1)"
            configuration.sticky.asynchronousSaving = false
            configuration.timeouts.idle = .seconds(60)
        } _: { bench in
            var cookie: String? = nil
            try await bench.increment(0, &cookie)
            await bench.sleep(seconds: 50)
            bench.check(try await bench.count(0, &cookie) == 1, "alive within the idle timeout")
            await bench.sleep(seconds: 75)
            var other = cookie
            bench.check(try await bench.count(0, &cookie) == nil, "expired in memory")
            bench.check(try await bench.count(1, &other) == nil, "and in memcached")
        },
        // Sticky takeover and back: the instance that takes over reads the newest copy, the one
        // taken back from never serves its stale copy, and a logout is never undone by it.
        SimulatedTest("sticky-takeover-and-back-then-logout") { configuration, instance in
            configuration.mode = .sticky
            configuration.route = "r\(instance + 1)"
            configuration.sticky.asynchronousSaving = false
        } _: { bench in
            var cookie: String? = nil
            for _ in 0..<3 { try await bench.increment(0, &cookie) }
            let first = cookie
            bench.check(try await bench.increment(1, &cookie) == 4, "instance 2 takes over with the count")
            bench.check(cookie != first, "the cookie names the new owner")
            bench.check(try await bench.increment(0, &cookie) == 5, "back on instance 1: its stale copy is not served")
            try await bench.logout(1, &cookie)
            var old = first
            bench.check(try await bench.count(0, &old) == nil, "the first owner does not bring the session back")
            old = first
            bench.check(try await bench.count(1, &old) == nil, "nor does the second")
        },
        // Asynchronous saving: what a request changed is in memcached once the delay has passed
        // (another instance reads it), and the writes of a burst coalesce.
        SimulatedTest("sticky-asynchronous-saves-reach-memcached-after-the-delay") { configuration, instance in
            configuration.mode = .sticky
            configuration.route = "r\(instance + 1)"
            configuration.sticky.asynchronousSaving = true
            configuration.sticky.saveDelay = .milliseconds(100)
        } _: { bench in
            var cookie: String? = nil
            for _ in 0..<5 { try await bench.increment(0, &cookie) }
            await bench.sleep(seconds: 1)
            bench.check(try await bench.count(1, &cookie) == 5, "the other instance reads the last count")
        },
        // Without locking: a write meets a newer copy (a concurrent request's, acknowledged), and
        // that copy is lost (its node restarted) before the write can read it back. Writing the
        // request's own copy would drop the other request's change (the simulation, non-sticky
        // seed 34826, where the newer copy's backup had not landed yet). With the backup's node
        // stalled, the search for the lost copy waits for that backup and the write is merged
        // onto it: both changes survive.
        SimulatedTest("a-write-whose-newer-copy-was-lost-is-merged-onto-that-copys-backup") { configuration, _ in
            configuration.mode = .nonSticky
            configuration.locking.mode = .none
        } _: { bench in try await writeWhoseNewerCopyWasLost(bench, .mergedOntoBackup) },
        // The same with the newer copy's backup writes lost while the write ends (it is written
        // later, from the writes left for later): no copy of that version is found, and the
        // write is refused rather than written over it.
        SimulatedTest("a-write-whose-newer-copy-was-lost-everywhere-is-refused") { configuration, _ in
            configuration.mode = .nonSticky
            configuration.locking.mode = .none
        } _: { bench in try await writeWhoseNewerCopyWasLost(bench, .refused) },
        // The same with B locked (A, on another path, is not): B's write, its lock's release
        // riding with it, meets A's copy; B takes its lock again with a read, and the copy is
        // lost right then (the lock is taken on the restarted node). With no newer copy found, B
        // is refused and its lock released.
        SimulatedTest("a-locked-write-whose-newer-copy-was-lost-everywhere-is-refused") { configuration, _ in
            configuration.mode = .nonSticky
            configuration.locking.mode = .uriPattern("^/b$")
        } _: { bench in try await writeWhoseNewerCopyWasLost(bench, .refusedUnderLock) },
        // Three writers: the write met a newer copy (C's), read and merged onto it, then found
        // the copy lost; the search finds only an older one (A's backup; C's backup write was
        // lost). The merged copy already holds everything: it is written as it is, not merged
        // onto the older backup (which would drop C's change).
        SimulatedTest("a-write-merged-onto-a-copy-since-lost-is-not-merged-onto-an-older-backup") { configuration, _ in
            configuration.mode = .nonSticky
            configuration.locking.mode = .none
        } _: { bench in try await writeWhoseNewerCopyWasLost(bench, .threeWriters) },
        // Two copies of one version (the simulation, non-sticky seed 67253): A and B load the
        // session; A's write lands and the primary's node restarts before A's backup write;
        // B's write finds the copy lost, finds nothing newer than what it loaded (A's backup has
        // not landed), and writes its own copy, of the same version as A's. Here B's backup
        // lands first, and A's backup write meets it: same version, other bytes. A's changes are
        // merged onto B's copy: both survive, in the primary and in its backup.
        SimulatedTest("two-copies-of-one-version-are-merged-when-the-lost-ones-backup-comes-second") { configuration, _ in
            configuration.mode = .nonSticky
            configuration.locking.mode = .none
        } _: { bench in try await twoCopiesOfOneVersion(bench, .lostWriteComesSecond) },
        // The same with A's backup landing first: B's backup write (the write made after the
        // loss) meets it, and B's changes are merged onto A's copy.
        SimulatedTest("two-copies-of-one-version-are-merged-when-the-rewrites-backup-comes-second") { configuration, _ in
            configuration.mode = .nonSticky
            configuration.locking.mode = .none
        } _: { bench in try await twoCopiesOfOneVersion(bench, .rewriteComesSecond) },
        // The same, and before B's backup write meets A's copy, a third request D reads B's
        // copy and saves a third change over it (D's backup write on its way). B's merge goes
        // onto D's copy: it takes A's change where D's copy still holds B's side, keeps D's.
        SimulatedTest("two-copies-of-one-version-are-merged-over-a-later-write") { configuration, _ in
            configuration.mode = .nonSticky
            configuration.locking.mode = .none
        } _: { bench in try await twoCopiesOfOneVersion(bench, .rewriteComesSecondAfterAThirdWrite) },
        // As the lost one's backup coming second, with the primary's node restarting again at
        // the merge's read of the primary: the merge is written again as a lost copy, onto the
        // other copy (the search finds nothing newer).
        SimulatedTest("two-copies-of-one-version-are-merged-when-the-primary-is-lost-again") { configuration, _ in
            configuration.mode = .nonSticky
            configuration.locking.mode = .none
        } _: { bench in try await twoCopiesOfOneVersion(bench, .lostWriteComesSecondPrimaryLostAgain) },
        // A move that missed a write (the simulation, non-sticky seed 65295): instance 1 is cut
        // off from the session's node, marks it down, and serves B from the backup; before B's
        // write, instance 0 (whose write was on its way) saves A there, and A's backup lands
        // where B read it. The node then dies. B's write moves the session to the backup's node,
        // reads the backup it served from again, finds A's newer copy, and merges the two: both
        // changes survive, in the new primary and in its backup.
        SimulatedTest("a-move-from-a-backup-merges-a-write-its-backup-shows-meanwhile") { configuration, _ in
            configuration.mode = .nonSticky
            configuration.locking.mode = .none
        } _: { bench in try await moveThatMissedAWrite(bench, .backupLandsFirstNodeDies) },
        // The same, with A's backup landing after B's read of it, and the node answering instance
        // 1 again: the old copy (A's), newer than the backup B moved from, has that backup read
        // again, and what it shows (A's change) is merged into the session's new place before
        // the old copy is deleted.
        SimulatedTest("a-move-merges-a-write-the-old-node-took-meanwhile-once-it-answers") { configuration, _ in
            configuration.mode = .nonSticky
            configuration.locking.mode = .none
        } _: { bench in try await moveThatMissedAWrite(bench, .backupLandsLastNodeAnswers) },
        // The same, with A's backup landing after the old copy's cleanup first looked: the old
        // copy is deleted, and the backup watched until it shows A's write (an acknowledged
        // write's backup follows it), which is merged then.
        SimulatedTest("a-move-waits-for-the-backup-of-a-write-the-old-node-took-meanwhile") { configuration, _ in
            configuration.mode = .nonSticky
            configuration.locking.mode = .none
        } _: { bench in try await moveThatMissedAWrite(bench, .backupLandsAfterTheCleanupLooked) },
        // A write merged by the move's read of the backup, then removed at the new place, is not
        // merged again by the old copy's cleanup.
        SimulatedTest("a-write-a-move-merged-is-not-merged-again-by-the-cleanup") { configuration, _ in
            configuration.mode = .nonSticky
            configuration.locking.mode = .none
        } _: { bench in try await moveThatMissedAWrite(bench, .backupLandsFirstThenUndone) },
        // The same as the cleanup's merge, with the two changes too large together for the item
        // size limit: nothing is merged (counted, logged), the new place keeps its copy, the old
        // copy is deleted.
        SimulatedTest("a-move-whose-missed-write-is-too-large-to-merge-keeps-its-copy") { configuration, _ in
            configuration.mode = .nonSticky
            configuration.locking.mode = .none
            configuration.memcached.itemSizeLimit = 4_096
        } _: { bench in try await moveThatMissedAWrite(bench, .backupLandsLastTooLargeToMerge) },
        // The same, with a write at the new place between the cleanup's read there and its
        // merge's write: the merge's CAS write is refused, and the next pass merges onto the
        // newer copy (all three changes survive).
        SimulatedTest("a-move-merges-a-missed-write-onto-a-write-that-came-first") { configuration, _ in
            configuration.mode = .nonSticky
            configuration.locking.mode = .none
        } _: { bench in try await moveThatMissedAWrite(bench, .backupLandsLastMergeMeetsAWrite) },
        // The move's read of the backup finds the missed write, and the new place refuses the
        // merge's write (B's request fails) while the old node stays dead: the merge is left to
        // the leftover loop, which writes it once the new place answers (A's acknowledged change
        // survives, in the new primary and its backup).
        SimulatedTest("a-move-whose-merge-is-refused-keeps-the-missed-write") { configuration, _ in
            configuration.mode = .nonSticky
            configuration.locking.mode = .none
        } _: { bench in try await moveThatMissedAWrite(bench, .backupLandsFirstMergeRefused) },
        // As the last, with the old node frozen: once it answers, its copy's cleanup merges A's
        // change first, and a request at the new place then removes it; the pending merge of the
        // move is dropped (the cleanup's merge holds its copy), so the removal stands.
        SimulatedTest("a-move-whose-refused-merge-the-cleanup-merged-first-keeps-a-later-removal") { configuration, _ in
            configuration.mode = .nonSticky
            configuration.locking.mode = .none
        } _: { bench in try await moveThatMissedAWrite(bench, .backupLandsFirstMergeRefusedCleanupFirst) },
        // As the refused merge, refused for longer than the move's minute: given up at the
        // deadline, counted (and warned of), not tried forever.
        SimulatedTest("a-moves-merge-refused-past-its-deadline-is-given-up-and-counted") { configuration, _ in
            configuration.mode = .nonSticky
            configuration.locking.mode = .none
        } _: { bench in try await moveThatMissedAWrite(bench, .backupLandsFirstMergeRefusedPastDeadline) },
        // The first two, with every request locked (the seed ran with locking auto): the locks
        // are on two nodes (A's on the old one, B's on the new one), so neither keeps the other
        // out.
        SimulatedTest("a-locked-move-from-a-backup-merges-a-write-its-backup-shows-meanwhile") { configuration, _ in
            configuration.mode = .nonSticky
            configuration.locking.mode = .all
        } _: { bench in try await moveThatMissedAWrite(bench, .backupLandsFirstNodeDies) },
        SimulatedTest("a-locked-move-merges-a-write-the-old-node-took-meanwhile-once-it-answers") { configuration, _ in
            configuration.mode = .nonSticky
            configuration.locking.mode = .all
        } _: { bench in try await moveThatMissedAWrite(bench, .backupLandsLastNodeAnswers) },
        // A logout during a move (instance 1 cut off from the session's node moves it from its
        // backup; instance 0 logs it out on that node meanwhile): the session stays ended,
        // whether the logout's tombstones reach the new place before the move's write or between
        // that write and the move's read of the backup.
        SimulatedTest("a-logout-before-a-moves-write-leaves-the-session-ended") { configuration, _ in
            configuration.mode = .nonSticky
            configuration.locking.mode = .none
        } _: { bench in try await logoutDuringAMove(bench, .beforeTheMovesWrite) },
        SimulatedTest("a-logout-between-a-moves-write-and-its-read-leaves-the-session-ended") { configuration, _ in
            configuration.mode = .nonSticky
            configuration.locking.mode = .none
        } _: { bench in try await logoutDuringAMove(bench, .betweenTheMovesWriteAndItsRead) },
    ]

    /// The test named `name`.
    public static func named(_ name: String) -> SimulatedTest? { all.first { $0.name == name } }
}

struct MissingNode: Error, CustomStringConvertible {
    var description: String { "the cookie names no node of the cluster" }
}

func requireNode(_ node: SimulatedNode?) throws -> SimulatedNode {
    guard let node else { throw MissingNode() }
    return node
}

/// Alice logs in on both instances; every write to the principal index then fails (its reads, and
/// the sessions' own reads and tombstones, do not); a revocation on instance 0 ends both sessions
/// and fails with `principalIndexUnavailable`, 2 ended; once the index can be written again a
/// revocation rewrites it (ending them again is harmless) and the next finds nothing.
/// A logout (or, with `login`, a login that gives the session a new id) on instance 0 while the
/// session's node is marked down; the node answers again right after the response, and the ended
/// id is sent to instance 1.
private func logoutWhileItsNodeIsMarkedDown(_ bench: SimulatedTestBench, login: Bool = false) async throws {
    var cookie: String? = nil
    try await bench.increment(0, &cookie)
    try await bench.increment(0, &cookie)
    let ended = cookie
    guard let node = bench.node(of: cookie) else { return bench.check(false, "no node in the cookie") }
    node.markDown()
    let started = bench.now
    if login {
        try await bench.request(0, &cookie, path: "/login") { access in
            guard try await access.load() != nil else { return }
            try await access.regenerateID()
        }
        bench.check(cookie != nil && cookie != ended, "the login gave the session a new id")
    } else {
        try await bench.logout(0, &cookie)
        bench.check(cookie == nil, "the logout cleared the cookie")
    }
    bench.check(bench.now - started <= 1.1, "answered within the request timeout: \(bench.now - started) s")
    // The node answers again (for every instance) the moment the logout has answered.
    node.probe()
    var replayed = ended
    do {
        let count = try await bench.count(1, &replayed)
        bench.check(count == nil, "the ended id read on the other instance: \(String(describing: count))")
    } catch {
        bench.check(false, "the ended id's read on the other instance failed (it must answer \"no session\"): \(error)")
    }
    if login {
        bench.check(try await bench.count(0, &cookie) == 2, "the session lives on under its new id")
    }
}

private func revocationWhoseIndexRewriteFails(_ bench: SimulatedTestBench) async throws {
    var cookies: [String?] = [nil, nil]
    for instance in [0, 1] {
        try await bench.logIn(instance, &cookies[instance], as: "alice")
        bench.check(cookies[instance] != nil, "logged in on instance \(instance)")
    }
    bench.refusePrincipalIndexWrites(true)
    do {
        let ended = try await bench.managers[0].invalidateAll(principal: "alice")
        bench.check(false, "the revocation succeeded (\(ended) ended) though its index could not be rewritten")
    } catch {
        bench.check(error.code == .principalIndexUnavailable, "typed error: \(error.code)")
        bench.check(error.sessionsEnded == 2, "says both sessions were ended: \(String(describing: error.sessionsEnded))")
    }
    bench.refusePrincipalIndexWrites(false)
    for instance in [0, 1] {
        for reader in [0, 1] {
            var cookie = cookies[instance]
            bench.check(try await bench.count(reader, &cookie) == nil, "session of instance \(instance) ended, read on \(reader)")
        }
    }
    let again = try await bench.managers[1].invalidateAll(principal: "alice")
    bench.check(again == 2, "the index still named both (ended again, harmlessly): \(again)")
    let after = try await bench.managers[0].invalidateAll(principal: "alice")
    bench.check(after == 0, "the index was rewritten: \(after)")
}

/// How ``writeWhoseNewerCopyWasLost(_:_:)`` loses the newer copy.
private enum LostCopyScenario {
    /// A's backup write stalls its node; the restart comes at B's read after its conflict.
    case mergedOntoBackup
    /// A's backup writes are lost until B has ended; the restart comes at B's read after its conflict.
    case refused
    /// As `refused`, with B locked: the restart comes at B's lock taken again (with a read) after
    /// its conflict.
    case refusedUnderLock
    /// A saves (backup and all), then C, whose backup writes are lost until B has ended; the
    /// restart comes at B's second write (after it read and merged onto C's copy).
    case threeWriters
}

/// Shared by the tests above: request B (instance 1) loads the session; A (and C) change other
/// attributes and are saved on instance 0; B changes its own and ends, and the primary's node
/// restarts (empty) at the moment the scenario says. Every acknowledged change must survive, and
/// B must have been acknowledged or refused as the scenario says.
private func writeWhoseNewerCopyWasLost(_ bench: SimulatedTestBench, _ scenario: LostCopyScenario) async throws {
    var cookie: String? = nil
    let (primary, prefix) = try await bench.startSession(&cookie)
    let failBackups = Flag()
    let restartArmed = Flag()
    let restarted = Flag()
    let casWrites = Tally()
    for node in bench.cluster.nodes where node !== primary {
        node.faultMatching = { request in
            guard failBackups.value, case .store(let key, _, _, _, _, _) = request.command, key.hasPrefix(prefix + "b:") else { return nil }
            if scenario == .mergedOntoBackup {
                failBackups.value = false
                return .appliedLate
            }
            return .neverApplied
        }
    }
    primary.faultMatching = { request in
        guard restartArmed.value else { return nil }
        switch (scenario, request.command) {
        case (.threeWriters, .store(let key, _, _, _, _, _?)):
            // B's second write (its first met C's copy).
            guard key.hasPrefix(prefix + "s:") else { return nil }
            casWrites.value += 1
            guard casWrites.value == 2 else { return nil }
        case (.mergedOntoBackup, .get(let key, true, nil)), (.refused, .get(let key, true, nil)):
            // B's read after its conflict (a plain read: a load also touches).
            guard key.hasPrefix(prefix + "s:") else { return nil }
        case (.refusedUnderLock, .store(let key, _, _, _, .add, _)):
            // B's lock taken again after its conflict (the read goes with it): the lock is taken
            // on the restarted node, so the refusal must release it.
            guard key.hasPrefix(prefix + "l:") else { return nil }
        default:
            return nil
        }
        restartArmed.value = false
        restarted.value = true
        primary.restartEmpty(pid: 7000)
        return nil
    }
    let loaded = Flag()
    let othersAnswered = Flag()
    let started = cookie
    let b = Task { () -> Result<Void, any Error> in
        var mine = started
        do {
            try await bench.request(1, &mine, path: "/b") { access in
                let session = try await access.load()
                loaded.value = true
                while !othersAnswered.value { await bench.sleep(seconds: 0.01) }
                try session?.set("part1", "b")
            }
            return .success(())
        } catch {
            return .failure(error)
        }
    }
    while !loaded.value { await bench.sleep(seconds: 0.01) }
    if scenario != .threeWriters { failBackups.value = true }
    var a = cookie
    try await bench.request(0, &a, path: "/a") { access in
        try await access.load()?.set("part0", "a")
    }
    if scenario == .threeWriters {
        failBackups.value = true
        var c = cookie
        try await bench.request(0, &c, path: "/c") { access in
            try await access.load()?.set("part2", "c")
        }
    }
    restartArmed.value = true
    othersAnswered.value = true
    let outcome = await b.value
    failBackups.value = false
    bench.check(restarted.value, "the primary's node restarted where the scenario says")
    // The backup's node thaws, the writes left for later land, the instances see the restart.
    await bench.sleep(seconds: 3)
    var reader = cookie
    let parts = try await bench.request(0, &reader, path: "/read") { access in
        let session = try await access.load()
        return ["part0", "part1", "part2"].map { session?[$0, as: String.self] }
    }
    bench.check(parts[0] == "a", "A's acknowledged change survives: \(parts[0] ?? "none")")
    switch (scenario, outcome) {
    case (.mergedOntoBackup, .success), (.threeWriters, .success):
        bench.check(parts[1] == "b", "B's acknowledged change survives: \(parts[1] ?? "none")")
    case (.refused, .failure(let error as SessionError)), (.refusedUnderLock, .failure(let error as SessionError)):
        bench.check(error.code == .unavailable && error.message.contains("newer copy"), "B refused as a lost newer copy: \(error)")
        bench.check(parts[1] == nil, "B's refused change was not saved: \(parts[1] ?? "none")")
    default:
        bench.check(false, "B: \(outcome)")
    }
    if scenario == .refusedUnderLock {
        let counters = bench.managers[1].statistics.snapshot().counters
        bench.check(counters["locks_acquired"] == 2, "B's lock taken again after its conflict: \(counters["locks_acquired"] ?? 0) taken")
        bench.check(counters["locks_released"] == 2, "and released when refused: \(counters["locks_released"] ?? 0) released")
    }
    if scenario == .threeWriters {
        bench.check(parts[2] == "c", "C's acknowledged change survives: \(parts[2] ?? "none")")
    }
}

/// Which backup write of ``twoCopiesOfOneVersion(_:_:)`` comes second (and meets the other).
private enum ForkSide {
    /// A's: the acknowledged write whose copy was lost.
    case lostWriteComesSecond
    /// B's: the write made after the loss, over it.
    case rewriteComesSecond
    /// B's, after a third request D read B's copy and saved over it (D's backup write held).
    case rewriteComesSecondAfterAThirdWrite
    /// A's, and the primary's node restarts again at the merge's read of the primary.
    case lostWriteComesSecondPrimaryLostAgain
}

/// Request B (instance 1) loads the session; A (instance 0) changes another attribute and its
/// write lands; A's backup write is held on its way, and the primary's node restarts (empty).
/// B's write finds the copy lost, and its search finds only the older backup: it writes its own
/// copy, of A's version. The two backup writes then come in the order `side` says (with a third
/// request D's write between them, for `rewriteComesSecondAfterAThirdWrite`). Every change must
/// survive, in the primary and in the backup (read after a second restart; the waits of three
/// virtual seconds let the instances' restart watch see each restart and the backup writes left
/// for later land).
private func twoCopiesOfOneVersion(_ bench: SimulatedTestBench, _ side: ForkSide) async throws {
    var cookie: String? = nil
    let (primary, prefix) = try await bench.startSession(&cookie)
    // A backup write's commands (a copy search's reads, which carry the value, pass): A's first,
    // then B's read (the rewrite's orders), then D's first (`rewriteComesSecondAfterAThirdWrite`).
    let holds = Tally()
    for node in bench.cluster.nodes where node !== primary {
        node.holdMatching = { requests in
            guard holds.value > 0 else { return false }
            let backupWrite = requests.contains { request in
                switch request.command {
                case .get(let key, false, _), .store(let key, _, _, _, _, _): key.hasPrefix(prefix + "b:")
                default: false
                }
            }
            guard backupWrite else { return false }
            holds.value -= 1
            return true
        }
    }
    let backupNodes = bench.cluster.nodes.filter { $0 !== primary }
    var held: Int { backupNodes.map(\.heldCount).reduce(0, +) }
    func release(first count: Int = .max) {
        var left = count
        for node in backupNodes where left > 0 {
            let released = min(left, node.heldCount)
            node.releaseHeld(first: released)
            left -= released
        }
    }
    let loaded = Flag()
    let bMayWrite = Flag()
    let started = cookie
    func request(_ instance: Int, path: String, set attribute: String, waitingFor flag: Flag?) -> Task<Result<Void, any Error>, Never> {
        let flagged = flag
        return Task {
            var mine = started
            do {
                try await bench.request(instance, &mine, path: path) { access in
                    let session = try await access.load()
                    if let flagged {
                        loaded.value = true
                        while !flagged.value { await bench.sleep(seconds: 0.001) }
                    }
                    try session?.set(attribute, path)
                }
                return .success(())
            } catch {
                return .failure(error)
            }
        }
    }
    let b = request(1, path: "/b", set: "part1", waitingFor: bMayWrite)
    while !loaded.value { await bench.sleep(seconds: 0.001) }
    holds.value = [.lostWriteComesSecond: 1, .lostWriteComesSecondPrimaryLostAgain: 1, .rewriteComesSecond: 2, .rewriteComesSecondAfterAThirdWrite: 3][side]!
    let a = request(0, path: "/a", set: "part0", waitingFor: nil)
    // A's write has landed, its backup write is on its way: the primary's node restarts.
    while held < 1 { await bench.sleep(seconds: 0.001) }
    primary.restartEmpty(pid: 7000)
    bMayWrite.value = true
    let outcomes: [Result<Void, any Error>]
    switch side {
    case .lostWriteComesSecond:
        let bOutcome = await b.value
        release()
        outcomes = [await a.value, bOutcome]
    case .lostWriteComesSecondPrimaryLostAgain:
        let bOutcome = await b.value
        // The next plain read of the primary is A's merge's (B has answered; loads touch).
        let restartedAgain = Flag()
        primary.faultMatching = { request in
            guard !restartedAgain.value, case .get(let key, true, nil) = request.command, key.hasPrefix(prefix + "s:") else { return nil }
            restartedAgain.value = true
            primary.restartEmpty(pid: 7002)
            return nil
        }
        release()
        outcomes = [await a.value, bOutcome]
        primary.faultMatching = nil
        bench.check(restartedAgain.value, "the primary's node restarted again at the merge's read")
    case .rewriteComesSecond:
        while held < 2 { await bench.sleep(seconds: 0.001) }
        release(first: 1)
        let aOutcome = await a.value
        release()
        outcomes = [aOutcome, await b.value]
    case .rewriteComesSecondAfterAThirdWrite:
        while held < 2 { await bench.sleep(seconds: 0.001) }
        release(first: 1)
        let aOutcome = await a.value
        let d = request(0, path: "/d", set: "part2", waitingFor: nil)
        while held < 2 { await bench.sleep(seconds: 0.001) }
        release(first: 1)
        let bOutcome = await b.value
        release()
        outcomes = [aOutcome, bOutcome, await d.value]
    }
    holds.value = 0
    for (name, outcome) in zip(["A", "B", "D"], outcomes) {
        if case .failure(let error) = outcome { bench.check(false, "\(name) failed: \(error)") }
    }
    let meeting = side == .lostWriteComesSecond || side == .lostWriteComesSecondPrimaryLostAgain ? 0 : 1
    let names = side == .rewriteComesSecondAfterAThirdWrite ? ["part0", "part1", "part2"] : ["part0", "part1"]
    let forks = bench.managers[meeting].statistics.snapshot().counters["backup_forks"] ?? 0
    bench.check(forks == 1, "the second backup write met the fork: \(forks)")
    func parts(_ when: String) async throws {
        var reader = cookie
        let parts = try await bench.request(0, &reader, path: "/read") { access in
            let session = try await access.load()
            return names.map { session?[$0, as: String.self] }
        }
        for (part, (name, path)) in zip(parts, zip(["A", "B", "D"], ["/a", "/b", "/d"])) {
            bench.check(part == path, "\(when): \(name)'s acknowledged change survives: \(part ?? "none")")
        }
    }
    await bench.sleep(seconds: 3)
    try await parts("primary")
    // The backup has both too: the primary is lost again, and the session read from its backup.
    primary.restartEmpty(pid: 7001)
    await bench.sleep(seconds: 3)
    try await parts("backup")
}

/// How the write a move missed is found (``moveThatMissedAWrite(_:_:)``).
private enum MissedWrite {
    /// Its backup lands before the move's write, and its node dies: the move's read of the
    /// backup it served from finds it.
    case backupLandsFirstNodeDies
    /// Its backup lands after the move's write, and its node answers again: the old copy's
    /// cleanup finds it.
    case backupLandsLastNodeAnswers
    /// As `backupLandsLastNodeAnswers`, with the backup landing after the cleanup's first look
    /// at the old copy: the cleanup waits for it.
    case backupLandsAfterTheCleanupLooked
    /// Its backup lands before the move's write, which merges it; then a request at the new place
    /// removes A's change, and only then does the node answer instance 1 again: the cleanup must
    /// not merge A's change a second time (it would come back).
    case backupLandsFirstThenUndone
    /// As `backupLandsLastNodeAnswers`, with A's and B's changes each fitting the item size limit
    /// and the two together not: the cleanup cannot merge them (counted as an oversized session),
    /// the new place's copy stays as B wrote it, and the old copy is deleted all the same.
    case backupLandsLastTooLargeToMerge
    /// As `backupLandsLastNodeAnswers`, with a request at the new place (C) writing between the
    /// cleanup's read of the new place and its write of the merge: the merge's CAS write is
    /// refused, and the next pass merges onto C's copy (all three changes survive).
    case backupLandsLastMergeMeetsAWrite
    /// As `backupLandsFirstNodeDies`, with the new place refusing the merge's write (a server
    /// error): B's request fails; A's acknowledged change must survive all the same.
    case backupLandsFirstMergeRefused
    /// As `backupLandsFirstMergeRefused`, with the old node frozen, not dead, and every merge write
    /// at the new place refused until the node answers again: the old copy's cleanup merges A's
    /// change first (from the backup, as new as the copy the move found), then a request at the
    /// new place removes it. The move's pending merge must not merge it again (it would come back).
    case backupLandsFirstMergeRefusedCleanupFirst
    /// As `backupLandsFirstMergeRefused`, with every merge write at the new place refused for
    /// longer than the move's minute: the pending merge is given up at its deadline, counted as a
    /// leftover dropped (A's change is lost with the old node, a limit `guarantees.md` lists).
    case backupLandsFirstMergeRefusedPastDeadline

    /// The bytes each side's change carries past its path (`/a`, `/b`).
    var padding: Int { self == .backupLandsLastTooLargeToMerge ? 2_000 : 0 }
}

/// Bounded wait in virtual time: up to `seconds` for `condition`.
private func waitUntil(_ bench: SimulatedTestBench, seconds: Double = 5, _ condition: () -> Bool) async {
    for _ in 0..<Int(seconds * 1000) where !condition() { await bench.sleep(seconds: 0.001) }
}

/// ``SimulatedTest/all``'s `a-move-…` tests (the simulation, non-sticky seed 65295).
private func moveThatMissedAWrite(_ bench: SimulatedTestBench, _ scenario: MissedWrite) async throws {
    var cookie: String? = nil
    let (primary, prefix) = try await bench.startSession(&cookie)
    // A (instance 0) loads the session and changes it; its write is held on its way to the node,
    // and (`backupLandsLastNodeAnswers`) its backup write's first read after it.
    let holdWrite = Flag()
    holdWrite.value = true
    primary.holdMatching = { requests in
        guard holdWrite.value else { return false }
        let write = requests.contains { request in
            if case .store(let key, _, _, _, _, _) = request.command { return key.hasPrefix(prefix + "s:") }
            return false
        }
        if write { holdWrite.value = false }
        return write
    }
    let holdBackup = Flag()
    let backupLandsLast: Set<MissedWrite> = [
        .backupLandsLastNodeAnswers, .backupLandsAfterTheCleanupLooked, .backupLandsLastTooLargeToMerge, .backupLandsLastMergeMeetsAWrite,
    ]
    // (`backupLandsLastMergeMeetsAWrite`) The cleanup's CAS write of the merge at the new place.
    let holdMerge = Flag()
    holdBackup.value = backupLandsLast.contains(scenario)
    for node in bench.cluster.nodes where node !== primary {
        node.holdMatching = { requests in
            if holdMerge.value {
                let merge = requests.contains { request in
                    if case .store(let key, _, _, _, _, let cas?) = request.command { return key.hasPrefix(prefix + "s:") && cas > 0 }
                    return false
                }
                if merge { holdMerge.value = false }
                return merge
            }
            guard holdBackup.value else { return false }
            // The backup write's first round trip: a read without the value, or a CAS write when
            // the instance wrote that backup last (B's searches and reads carry the value).
            let backupRead = requests.contains { request in
                switch request.command {
                case .get(let key, false, _), .store(let key, _, _, _, _, _): key.hasPrefix(prefix + "b:")
                default: false
                }
            }
            if backupRead { holdBackup.value = false }
            return backupRead
        }
    }
    let backupNodes = bench.cluster.nodes.filter { $0 !== primary }
    let started = cookie
    let a = Task {
        var mine = started
        try await bench.request(0, &mine, path: "/a") { access in
            try await access.load()?.set("part0", "/a" + String(repeating: "a", count: scenario.padding))
        }
        return mine
    }
    await waitUntil(bench) { primary.heldCount == 1 }
    bench.check(primary.heldCount == 1, "A's write is on its way")
    // B (instance 1): its read and its retry are cut off, the node is marked down, and B is
    // served from the backup.
    primary.pendingFaults = [.connectionCut, .connectionCut]
    let loaded = Flag()
    let bMayWrite = Flag()
    defer { bMayWrite.value = true }
    let b = Task {
        var mine = started
        try await bench.request(1, &mine, path: "/b") { access in
            let session = try await access.load()
            loaded.value = true
            await waitUntil(bench, seconds: 10) { bMayWrite.value }
            try session?.set("part1", "/b" + String(repeating: "b", count: scenario.padding))
        }
        return mine
    }
    await waitUntil(bench) { loaded.value }
    bench.check(loaded.value && primary.pendingFaults.isEmpty, "B met both cuts and was served")
    bench.check(bench.managers[1].statistics.snapshot().counters["memcached_failovers"] == 1, "B recovered from the backup")
    // A's write lands on the node.
    primary.releaseHeld()
    var aCookie: String? = nil
    switch scenario {
    case .backupLandsFirstMergeRefusedCleanupFirst:
        // Then its backup; then the node stops answering. Every merge write at the new place is
        // refused until the node's first read after it answers again (the old copy's cleanup).
        aCookie = try await a.value
        primary.freeze()
        let refuse = Flag()
        refuse.value = true
        primary.faultMatching = { request in
            if case .get(let key, _, _) = request.command, key.hasPrefix(prefix + "s:") { refuse.value = false }
            return nil
        }
        // After the cleanup's merge, a plain read of the session at the new place (a merge's;
        // a load touches) is held: C's removal goes first.
        let forks: @Sendable () -> Int = { bench.managers[1].statistics.snapshot().counters["backup_forks"] ?? 0 }
        for node in backupNodes {
            node.faultMatching = { request in
                guard refuse.value, case .store(let key, _, _, _, _, let cas?) = request.command, key.hasPrefix(prefix + "s:"), cas > 0
                else { return nil }
                return .serverError
            }
            node.holdMatching = { requests in
                forks() == 1 && requests.contains { request in
                    if case .get(let key, true, nil) = request.command { return key.hasPrefix(prefix + "s:") }
                    return false
                }
            }
        }
        bMayWrite.value = true
    case .backupLandsFirstNodeDies, .backupLandsFirstMergeRefused, .backupLandsFirstMergeRefusedPastDeadline:
        // Then its backup, where B read the session; then the node dies.
        aCookie = try await a.value
        primary.kill()
        if scenario != .backupLandsFirstNodeDies {
            // The merge's CAS write at the new place is refused, once (or always).
            let refuse = Flag()
            refuse.value = true
            let once = scenario == .backupLandsFirstMergeRefused
            for node in backupNodes {
                node.faultMatching = { request in
                    guard refuse.value, case .store(let key, _, _, _, _, let cas?) = request.command, key.hasPrefix(prefix + "s:"), cas > 0
                    else { return nil }
                    if once { refuse.value = false }
                    return .serverError
                }
            }
        }
        bMayWrite.value = true
    case .backupLandsFirstThenUndone:
        // Then its backup; then the node stops answering (instance 1's cleanup cannot run).
        aCookie = try await a.value
        primary.freeze()
        bMayWrite.value = true
    case .backupLandsLastNodeAnswers, .backupLandsAfterTheCleanupLooked, .backupLandsLastTooLargeToMerge, .backupLandsLastMergeMeetsAWrite:
        // B writes, and reads the backup again, before A's backup write.
        await waitUntil(bench) { backupNodes.contains { $0.heldCount == 1 } }
        bench.check(backupNodes.contains { $0.heldCount == 1 }, "A's backup write is on its way")
        bMayWrite.value = true
    }
    let run = MissedWriteRun(
        bench: bench, cookie: cookie, primary: primary, backupNodes: backupNodes, aCookie: aCookie, bOutcome: await b.result)
    switch scenario {
    case .backupLandsFirstMergeRefused: return try await mergeRefusedOnce(run)
    case .backupLandsFirstMergeRefusedPastDeadline: return await mergeRefusedPastDeadline(run)
    case .backupLandsFirstMergeRefusedCleanupFirst: return try await mergeRefusedCleanupFirst(run)
    default: break
    }
    let bOutcome = run.bOutcome
    let bCookie = try bOutcome.get()
    holdMerge.value = scenario == .backupLandsLastMergeMeetsAWrite
    if scenario == .backupLandsAfterTheCleanupLooked {
        // The node answers instance 1 again, and its cleanup finds A's copy newer than the
        // backup it moved from, which has not moved on: it waits (the entry is queued again).
        let queued = { bench.managers[1].statistics.snapshot().counters["leftovers_queued"] ?? 0 }
        await waitUntil(bench) { queued() >= 3 }
        bench.check(queued() >= 3, "the cleanup looked at the old copy and waits: \(queued())")
    }
    if backupLandsLast.contains(scenario) {
        for node in backupNodes { node.releaseHeld() }
        aCookie = try await a.value
    }
    bench.check(aCookie == cookie, "A was served where the session was: \(String(describing: aCookie))")
    guard let moved = bCookie, moved != cookie else {
        bench.check(false, "B's response moved the session: \(String(describing: bCookie))")
        return
    }
    let merges = { bench.managers[1].statistics.snapshot().counters["backup_forks"] ?? 0 }
    var names = ["part0", "part1"]
    switch scenario {
    case .backupLandsFirstNodeDies, .backupLandsFirstMergeRefused, .backupLandsFirstMergeRefusedCleanupFirst,
        .backupLandsFirstMergeRefusedPastDeadline:
        bench.check(merges() == 1, "B's write met A's newer copy: \(merges())")
    case .backupLandsFirstThenUndone:
        bench.check(merges() == 1, "B's write met A's newer copy: \(merges())")
        // C, at the new place, removes A's change.
        var undoer: String? = moved
        try await bench.request(0, &undoer, path: "/c") { access in try await access.load()?.remove("part0") }
        names = ["part1"]
        // The node answers again; instance 1's cleanup deletes the old copy.
        primary.thaw()
        await waitUntil(bench) { bench.managers[1].statistics.snapshot().counters["leftovers_cleaned"] == 1 }
        let cleaned = bench.managers[1].statistics.snapshot().counters["leftovers_cleaned"] ?? 0
        bench.check(cleaned == 1, "the old copy was deleted: \(cleaned)")
        bench.check(merges() == 1, "A's change was not merged again: \(merges())")
    case .backupLandsLastNodeAnswers, .backupLandsAfterTheCleanupLooked:
        bench.check(merges() == 0, "B's read of the backup found nothing newer: \(merges())")
        // The node answers instance 1 again (its next probe): what the backup shows is merged,
        // then the old copy deleted.
        await waitUntil(bench) { merges() == 1 && bench.managers[1].statistics.snapshot().counters["leftovers_cleaned"] == 1 }
        bench.check(merges() == 1, "A's old copy was merged into the new place: \(merges())")
        let cleaned = bench.managers[1].statistics.snapshot().counters["leftovers_cleaned"] ?? 0
        bench.check(cleaned == 1, "the old copy was deleted: \(cleaned)")
    case .backupLandsLastTooLargeToMerge:
        bench.check(merges() == 0, "B's read of the backup found nothing newer: \(merges())")
        // The node answers instance 1 again: the merge would not fit, the old copy goes.
        let counter = { (name: String) in bench.managers[1].statistics.snapshot().counters[name] ?? 0 }
        await waitUntil(bench) { counter("leftovers_cleaned") == 1 }
        bench.check(counter("leftovers_cleaned") == 1, "the old copy was deleted: \(counter("leftovers_cleaned"))")
        bench.check(merges() == 0, "nothing merged: \(merges())")
        bench.check(counter("oversized_sessions") == 1, "the merge was too large: \(counter("oversized_sessions"))")
        names = ["part1"]
    case .backupLandsLastMergeMeetsAWrite:
        bench.check(merges() == 0, "B's read of the backup found nothing newer: \(merges())")
        // The cleanup read the new place and its merge's write is on its way; C writes there.
        await waitUntil(bench) { backupNodes.contains { $0.heldCount == 1 } }
        bench.check(backupNodes.contains { $0.heldCount == 1 }, "the cleanup's merge is on its way")
        var writer: String? = moved
        try await bench.request(0, &writer, path: "/c") { access in try await access.load()?.set("part2", "/c") }
        for node in backupNodes { node.releaseHeld() }
        // Refused (C's write came first), and merged again onto C's copy.
        await waitUntil(bench) { merges() == 1 && bench.managers[1].statistics.snapshot().counters["leftovers_cleaned"] == 1 }
        bench.check(merges() == 1, "A's old copy was merged into the new place: \(merges())")
        let cleaned = bench.managers[1].statistics.snapshot().counters["leftovers_cleaned"] ?? 0
        bench.check(cleaned == 1, "the old copy was deleted: \(cleaned)")
        names = ["part0", "part1", "part2"]
    }
    func parts(_ when: String) async throws {
        var reader: String? = moved
        let parts = try await bench.request(0, &reader, path: "/read") { access in
            let session = try await access.load()
            return ["part0", "part1", "part2"].map { session?[$0, as: String.self] }
        }
        for (part, (name, path)) in zip(parts, [("A", "/a"), ("B", "/b"), ("C", "/c")]) {
            let value = path + String(repeating: String(path.dropFirst()), count: scenario.padding)
            if names.contains(["A": "part0", "B": "part1", "C": "part2"][name, default: ""]) {
                bench.check(part == value, "\(when): \(name)'s acknowledged change survives: \(part?.prefix(8) ?? "none")")
            } else {
                bench.check(part == nil, "\(when): \(name)'s change is not there: \(part?.prefix(8) ?? "none")")
            }
        }
    }
    await bench.sleep(seconds: 3)
    try await parts("primary")
    // The new primary's node is lost: the session is read from its backup.
    let home = try requireNode(bench.node(of: moved))
    home.restartEmpty(pid: 7100)
    await bench.sleep(seconds: 3)
    try await parts("backup")
}

/// Where ``moveThatMissedAWrite(_:_:)`` stands once B's request has ended, for the scenarios whose
/// checks differ from there on.
private struct MissedWriteRun {
    let bench: SimulatedTestBench
    /// The session's id before the move.
    let cookie: String?
    /// The session's node before the move.
    let primary: SimulatedNode
    let backupNodes: [SimulatedNode]
    /// A's response's cookie.
    let aCookie: String?
    let bOutcome: Result<String?, any Error>

    /// Instance 1's (B's, the move's) counter `name`.
    func counter(_ name: String) -> Int { bench.managers[1].statistics.snapshot().counters[name] ?? 0 }
}

/// The move's merge of A's change is refused once at the new place: it is merged later, and
/// survives the loss of the new place.
private func mergeRefusedOnce(_ run: MissedWriteRun) async throws {
    let (bench, cookie, primary, bOutcome, aCookie) = (run.bench, run.cookie, run.primary, run.bOutcome, run.aCookie)
    bench.check((try? bOutcome.get()) == nil, "B's request failed")
    bench.check(aCookie == cookie, "A was served where the session was: \(String(describing: aCookie))")
    // Instance 1 merges what the backup shows into the new place once it answers.
    let merges = { run.counter("backup_forks") }
    await waitUntil(bench) { merges() == 1 }
    bench.check(merges() == 1, "the missed write was merged later: \(merges())")
    func survives(_ when: String) async throws {
        for instance in 0..<2 {
            var reader = cookie
            let part = try await bench.request(instance, &reader, path: "/read") { access in try await access.load()?["part0", as: String.self] }
            bench.check(part == "/a", "\(when): instance \(instance): A's acknowledged change survives: \(part ?? "none")")
        }
    }
    await bench.sleep(seconds: 3)
    try await survives("primary")
    // The new place is lost: A's change is in its backup too.
    bench.relocationTarget(of: cookie, from: primary)?.node.restartEmpty(pid: 7300)
    await bench.sleep(seconds: 3)
    try await survives("backup")
}

/// The move's merge of A's change is refused until its deadline: given up, counted, and not
/// tried again.
private func mergeRefusedPastDeadline(_ run: MissedWriteRun) async {
    let (bench, bOutcome) = (run.bench, run.bOutcome)
    bench.check((try? bOutcome.get()) == nil, "B's request failed")
    let counter = run.counter
    await bench.sleep(seconds: 55)
    bench.check(counter("leftovers_dropped") == 0, "still tried within the minute: \(counter("leftovers_dropped"))")
    await waitUntil(bench, seconds: 10) { counter("leftovers_dropped") == 1 }
    bench.check(counter("leftovers_dropped") == 1, "given up at the deadline, and counted: \(counter("leftovers_dropped"))")
    bench.check(counter("backup_forks") == 0, "never merged: \(counter("backup_forks"))")
    // Given up: not tried again (the old copy's entry waits for the dead node, nothing else).
    let queued = counter("leftovers_queued")
    await bench.sleep(seconds: 5)
    bench.check(counter("leftovers_queued") == queued, "not queued again: \(queued) then \(counter("leftovers_queued"))")
}

/// The move's merge of A's change is refused until the old copy's cleanup has merged it: a later
/// removal of A's change at the new place stands (not merged again).
private func mergeRefusedCleanupFirst(_ run: MissedWriteRun) async throws {
    let (bench, cookie, primary, backupNodes) = (run.bench, run.cookie, run.primary, run.backupNodes)
    let (bOutcome, aCookie) = (run.bOutcome, run.aCookie)
    bench.check((try? bOutcome.get()) == nil, "B's request failed")
    bench.check(aCookie == cookie, "A was served where the session was: \(String(describing: aCookie))")
    let counter = run.counter
    // The move's pending merge is refused meanwhile.
    await bench.sleep(seconds: 1)
    bench.check(counter("backup_forks") == 0, "nothing merged while the old node is frozen: \(counter("backup_forks"))")
    // The node answers again: the cleanup merges A's change, and deletes the old copy.
    primary.thaw()
    await waitUntil(bench) { counter("backup_forks") == 1 && counter("leftovers_cleaned") >= 1 }
    bench.check(counter("backup_forks") == 1, "the cleanup merged A's change: \(counter("backup_forks"))")
    bench.check(counter("leftovers_cleaned") >= 1, "the old copy was deleted: \(counter("leftovers_cleaned"))")
    // C, at the new place (the next node, where the move wrote), removes A's change.
    guard let (home, moved) = bench.relocationTarget(of: cookie, from: primary) else { return }
    var undoer: String? = moved
    try await bench.request(0, &undoer, path: "/c") { access in try await access.load()?.remove("part0") }
    for node in backupNodes { node.holdMatching = nil }
    for node in backupNodes { node.releaseHeld() }
    await bench.sleep(seconds: 3)
    bench.check(counter("backup_forks") == 1, "A's change was not merged again: \(counter("backup_forks"))")
    func removed(_ when: String) async throws {
        for instance in 0..<2 {
            var reader: String? = moved
            let parts = try await bench.request(instance, &reader, path: "/read") { access in
                let session = try await access.load()
                return [session?["part0", as: String.self], session?["part1", as: String.self]]
            }
            bench.check(parts[0] == nil, "\(when): instance \(instance): C's removal of A's change stands: \(parts[0] ?? "none")")
            bench.check(parts[1] == "/b", "\(when): instance \(instance): B's change survives: \(parts[1] ?? "none")")
        }
    }
    try await removed("primary")
    home.restartEmpty(pid: 7400)
    await bench.sleep(seconds: 3)
    try await removed("backup")
}

/// When a logout on the instance that still reaches the session's node lands on the node a
/// concurrent move writes to (``logoutDuringAMove(_:_:)``).
private enum LogoutDuringAMove {
    /// Before the move's write: the write finds the logout's tombstone.
    case beforeTheMovesWrite
    /// After the move's write and before the move's read of the backup it served from: the
    /// logout's tombstones are written over the move's copy, and the read finds the backup ended.
    /// (That read, and the check of the new place's primary after it, each keep the moved id from
    /// the browser: the test fails with both removed.)
    case betweenTheMovesWriteAndItsRead
}

/// A logout during a move: instance 1 is cut off from the session's node, marks it down, and
/// serves B from the backup (a move); instance 0, which still reaches the node, logs the session
/// out meanwhile. The session stays ended: under the old cookie and the moved one, on both
/// instances, and after the node the move wrote to restarts (its backup is not brought back).
private func logoutDuringAMove(_ bench: SimulatedTestBench, _ scenario: LogoutDuringAMove) async throws {
    var cookie: String? = nil
    let (primary, prefix) = try await bench.startSession(&cookie)
    // The logout's first round trip to the session's node (its tombstones) is held.
    let holdLogout = Flag()
    holdLogout.value = true
    primary.holdMatching = { requests in
        guard holdLogout.value else { return false }
        let tombstone = requests.contains { request in
            if case .store(let key, _, _, _, _, _) = request.command { return key.hasPrefix(prefix + "s:") }
            return false
        }
        if tombstone { holdLogout.value = false }
        return tombstone
    }
    // The move's read of the backup it served from, after its write (`betweenTheMovesWriteAndItsRead`).
    let holdRead = Flag()
    let others = bench.cluster.nodes.filter { $0 !== primary }
    for node in others {
        node.holdMatching = { requests in
            guard holdRead.value else { return false }
            let read = requests.contains { request in
                if case .get(let key, true, _) = request.command { return key.hasPrefix(prefix + "b:") }
                return false
            }
            if read { holdRead.value = false }
            return read
        }
    }
    let started = cookie
    let a = Task {
        var mine = started
        try await bench.logout(0, &mine)
        return mine
    }
    await waitUntil(bench) { primary.heldCount == 1 }
    bench.check(primary.heldCount == 1, "A's logout is on its way")
    // B (instance 1): cut off from the node twice, marks it down, is served from the backup.
    primary.pendingFaults = [.connectionCut, .connectionCut]
    let loaded = Flag()
    let bMayWrite = Flag()
    defer { bMayWrite.value = true }
    let b = Task {
        var mine = started
        try await bench.request(1, &mine, path: "/b") { access in
            let session = try await access.load()
            loaded.value = session != nil
            await waitUntil(bench, seconds: 10) { bMayWrite.value }
            try session?.set("part1", "/b")
        }
        return mine
    }
    await waitUntil(bench) { loaded.value }
    bench.check(loaded.value && primary.pendingFaults.isEmpty, "B met both cuts and was served")
    bench.check(bench.managers[1].statistics.snapshot().counters["memcached_failovers"] == 1, "B recovered from the backup")
    let notFound = { bench.managers[1].statistics.snapshot().counters["sessions_not_found"] ?? 0 }
    let notFoundBefore = notFound()
    switch scenario {
    case .beforeTheMovesWrite:
        primary.releaseHeld()
        let aCookie = try await a.value
        bench.check(aCookie == nil, "A's logout cleared the cookie")
        bMayWrite.value = true
    case .betweenTheMovesWriteAndItsRead:
        holdRead.value = true
        bMayWrite.value = true
        await waitUntil(bench) { others.contains { $0.heldCount == 1 } }
        bench.check(others.contains { $0.heldCount == 1 }, "B wrote at the new place, and its read of the backup is on its way")
        primary.releaseHeld()
        let aCookie = try await a.value
        bench.check(aCookie == nil, "A's logout cleared the cookie")
        for node in others { node.releaseHeld() }
    }
    let bCookie = try await b.value
    bench.check(bCookie == cookie, "B's response left the cookie alone (the session ended): \(String(describing: bCookie))")
    bench.check(notFound() == notFoundBefore + 1, "B found the session ended: \(notFound() - notFoundBefore)")
    // The backup's node, the next after the session's: where B moved it.
    guard let (movedTo, moved) = bench.relocationTarget(of: cookie, from: primary) else { return }
    func ended(_ when: String) async throws {
        for instance in 0..<2 {
            for name in [cookie, moved] {
                var reader = name
                let count = try await bench.count(instance, &reader)
                bench.check(count == nil, "\(when): instance \(instance) reads no session under \(name == cookie ? "the old" : "the moved") id: \(String(describing: count))")
            }
        }
    }
    await bench.sleep(seconds: 3)
    try await ended("after the move")
    // The node the move wrote to is lost: nothing comes back from a backup either.
    movedTo.restartEmpty(pid: 7200)
    await bench.sleep(seconds: 3)
    try await ended("after the new place restarted")
}

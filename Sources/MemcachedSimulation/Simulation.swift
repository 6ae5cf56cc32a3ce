@_spi(Simulation) import MemcachedSessions
import Memcached
import NIOCore

/// One simulated run: a cluster, 2–3 session manager instances over it, browsers sending
/// requests, and a fault schedule, all drawn from one seed; the guarantees of
/// `docs/guarantees.md` checked on the recorded history as it unfolds.
public struct SimulationScenario: Sendable, CustomStringConvertible {
    public enum Mode: String, Sendable, CaseIterable {
        case nonSticky = "non-sticky"
        case stickySync = "sticky-sync"
        case stickyAsync = "sticky-async"
    }

    public var seed: UInt64
    public var mode: Mode
    public var locking: String
    public var instances: Int
    public var browsers: Int
    public var requestsPerBrowser: Int
    public var faults: Int
    public var idleTimeoutSeconds: Int

    /// The scenario a seed draws (mode and locking can be pinned).
    public static func draw(seed: UInt64, mode: Mode? = nil, locking: String? = nil) -> SimulationScenario {
        var generator = SeededGenerator(seed: seed)
        let mode = mode ?? Mode.allCases[Int(generator.next() % 3)]
        let lockings = ["none", "all", "auto", "uriPattern:/cart.*"]
        let locking = mode == .nonSticky ? (locking ?? lockings[Int(generator.next() % 4)]) : "none"
        return SimulationScenario(
            seed: seed, mode: mode, locking: locking, instances: 2 + Int(generator.next() % 2),
            browsers: 3 + Int(generator.next() % 3), requestsPerBrowser: 6 + Int(generator.next() % 8),
            faults: Int(generator.next() % 4), idleTimeoutSeconds: 10 + Int(generator.next() % 3) * 10)
    }

    public var description: String {
        "seed \(seed): \(mode.rawValue), locking \(locking), \(instances) instances, \(browsers) browsers × \(requestsPerBrowser) requests, \(faults) faults, idle \(idleTimeoutSeconds) s"
    }
}

/// A broken guarantee, with the part of the history that shows it.
public struct SimulationViolation: Sendable, CustomStringConvertible {
    public var invariant: String
    public var detail: String
    public var history: [String]

    public var description: String {
        "VIOLATION \(invariant): \(detail)\n" + history.map { "    \($0)" }.joined(separator: "\n")
    }
}

/// What a run found.
public struct SimulationOutcome: Sendable {
    public var scenario: SimulationScenario
    public var violations: [SimulationViolation]
    public var requests: Int
    public var failedRequests: Int
    public var virtualSeconds: Double
    public var jobs: Int
    public var finished: Bool
    /// Every line of the run's history.
    public var history: [String]
}

/// Runs scenarios on the ``DeterministicScheduler``.
public enum Simulation {
    /// Runs one scenario to its end. The scheduler must be installed.
    public static func run(_ scenario: SimulationScenario) -> SimulationOutcome {
        let scheduler = DeterministicScheduler.shared
        scheduler.reset(seed: scenario.seed)
        let world = World(scenario: scenario)
        let finished = Flag()
        Task.detached {
            await world.run()
            finished.value = true
        }
        let completed = scheduler.run(until: { finished.value }, maximumJobs: 20_000_000)
        if !completed {
            world.violation("termination", "the run did not finish (a request or the shutdown hung): \(scheduler.jobsRun) jobs", browser: nil)
        } else {
            // What the run left behind (writes nobody waits for, replies in flight) settles.
            _ = scheduler.run(until: { false }, maximumJobs: scheduler.jobsRun + 1_000_000, horizon: scheduler.nanoseconds + 10_000_000_000)
        }
        scheduler.abandon()
        return SimulationOutcome(
            scenario: scenario, violations: world.violations, requests: world.requests, failedRequests: world.failedRequests,
            virtualSeconds: Double(scheduler.nanoseconds) / 1e9, jobs: scheduler.jobsRun, finished: completed, history: world.history)
    }
}

final class Flag: @unchecked Sendable {
    // @unchecked Sendable: the simulation's one thread.
    var value = false
}

final class Tally: @unchecked Sendable {
    // @unchecked Sendable: the simulation's one thread.
    var value = 0
}

/// One browser's view: its cookie, what it may read next, the ids its sessions had.
struct BrowserState {
    let name: String
    var cookie: String?
    /// Counts the next read may show (more than one after a request whose outcome is unknown).
    var expected: Set<Int> = [0]
    /// Every id its current session had (relocations, regenerations).
    var ids: [String] = []
    /// Ids of sessions it logged out: never readable again.
    var loggedOut: [String] = []
    /// The instance it is routed to (sticky load balancing).
    var instance: Int
    /// The lossy faults it has taken into account.
    var seenLossyFaults = 0
    /// An eviction may have taken its session, and a backup may bring it back: until its next
    /// write, a read may show nothing or the last count.
    var mayHaveLost = false
    /// Counts acknowledged lately, with when (sticky asynchronous saving: what an instance move may lose).
    var recent: [(at: UInt64, count: Int)] = []
    /// When it last sent a request (any request with the cookie may slide the session's TTL).
    var lastRequestAt: UInt64?
}

/// The world of one run. Everything runs on the simulation's one thread.
final class World: @unchecked Sendable {
    // @unchecked Sendable: the simulation's one thread.
    let scenario: SimulationScenario
    let cluster: SimulatedCluster
    var managers: [SessionManager] = []
    var violations: [SimulationViolation] = []
    var history: [String] = []
    var requests = 0
    var failedRequests = 0
    let clock = SimulatedClock()
    let requestTimeout: Duration = .seconds(1)
    let lockWaitBudget: Duration = .seconds(3)
    let saveTimeout: Duration = .milliseconds(500)
    /// Whether a fault is active now (the guarantees assume a single fault at a time).
    var faultActive = false
    /// Faults that may lose data legitimately (memcached evicting items), so far.
    var lossyFaults = 0
    /// Key digests of the sessions each browser had, to show their commands in a history.
    var keyOwners: [String: String] = [:]

    init(scenario: SimulationScenario) {
        self.scenario = scenario
        self.cluster = SimulatedCluster(nodeCount: 3, requestTimeout: requestTimeout, failureThreshold: 2, probeInterval: .milliseconds(500))
        cluster.setObserver { [unowned self] line in self.log(line) }
        for index in 0..<scenario.instances {
            var configuration = try! SessionManager.Configuration(nodes: cluster.nodeList)
            switch scenario.mode {
            case .nonSticky:
                configuration.mode = .nonSticky
                configuration.locking.mode = try! SessionManager.LockingMode(parsing: scenario.locking)
            case .stickySync, .stickyAsync:
                configuration.mode = .sticky
                configuration.route = "r\(index + 1)"
                configuration.sticky.asynchronousSaving = scenario.mode == .stickyAsync
            }
            configuration.timeouts.idle = .seconds(Int64(scenario.idleTimeoutSeconds))
            configuration.memcached.requestTimeout = requestTimeout
            configuration.locking.waitBudget = lockWaitBudget
            configuration.locking.expiry = .seconds(3)
            configuration.timeouts.save = saveTimeout
            configuration.unavailablePolicy = .fail
            managers.append(try! SessionManager(configuration: configuration, nodes: cluster, clock: clock, entropy: SimulatedEntropy()))
        }
    }

    var now: UInt64 { DeterministicScheduler.shared.nanoseconds }
    var stamp: String { String(format: "%9.3f", Double(now) / 1e9) }

    func log(_ line: String) {
        history.append("\(stamp) \(line)")
    }

    func violation(_ invariant: String, _ detail: String, browser: String?) {
        let digests = browser.map { name in keyOwners.filter { $0.value == name }.map(\.key) } ?? []
        let relevant = history.filter { line in
            guard let browser else { return true }
            return line.contains("[\(browser)]") || line.contains("FAULT") || digests.contains { line.contains($0) }
        }
        violations.append(SimulationViolation(invariant: invariant, detail: detail, history: Array(relevant.suffix(60))))
    }

    /// The longest a request may take: lock wait, a walk over every node, the save, and a second
    /// of margin (plus what the handler itself waits).
    var requestBound: UInt64 {
        let nodes = Duration.seconds(Int64(cluster.nodes.count)) * Int(requestTimeout.components.seconds)
        let total = lockWaitBudget + nodes + saveTimeout + .seconds(1)
        return UInt64(total.components.seconds) * 1_000_000_000 + UInt64(total.components.attoseconds / 1_000_000_000)
    }

    // MARK: - the run

    func run() async {
        await withTaskGroup(of: Void.self) { services in
            services.addTask { try? await self.cluster.run() }
            for manager in managers {
                services.addTask { try? await manager.run() }
            }
            await withTaskGroup(of: Void.self) { workload in
                workload.addTask { await self.faults() }
                for index in 0..<scenario.browsers {
                    workload.addTask { await self.browse(index) }
                }
            }
            services.cancelAll()
        }
    }

    // MARK: - faults

    func random(_ bound: Int) -> Int { Int(DeterministicScheduler.shared.random(below: UInt64(bound))) }

    func sleep(milliseconds: Int) async {
        try? await clock.sleep(for: .milliseconds(milliseconds))
    }

    /// A schedule of single faults, one after the other, each on a random node.
    func faults() async {
        // The guarantees hold for a single fault. A fault that loses data (a restart, an
        // eviction, a lost write, which may leave a stale backup) leaves its damage until the
        // sessions are next written, so it is the last fault of a run; freezes (whose queued
        // commands apply in order at the thaw) come as often as the scenario says before it.
        var dataLost = false
        for _ in 0..<scenario.faults {
            await sleep(milliseconds: 200 + random(4_000))
            let node = cluster.nodes[random(cluster.nodes.count)]
            faultActive = true
            // After a fault that lost data, another one (even a freeze of the other copy's node)
            // would be a second fault at once: none follows.
            if dataLost { break }
            let kind = random(6)
            if kind != 0 { dataLost = true }
            switch kind {
            case 0:
                let duration = 1_500 + random(4_000)
                log("FAULT \(node.id) frozen for \(duration) ms")
                node.freeze()
                await sleep(milliseconds: duration)
                node.thaw()
                log("FAULT \(node.id) thawed")
            case 1:
                let duration = 500 + random(3_000)
                log("FAULT \(node.id) killed for \(duration) ms, then restarted empty")
                node.kill()
                await sleep(milliseconds: duration)
                node.restartEmpty(pid: 5000 + random(1000))
            case 2:
                log("FAULT \(node.id) restarted empty")
                node.restartEmpty(pid: 5000 + random(1000))
            case 3:
                let count = 1 + random(4)
                log("FAULT \(node.id) evicts \(count) items")
                node.evict(count: count)
                lossyFaults += 1
            default:
                let kinds: [CommandFault] = [.replyLost, .neverApplied, .appliedLate, .connectionCut]
                var injected: [CommandFault] = []
                for _ in 0..<(1 + random(3)) { injected.append(random(2) == 0 ? kinds[random(4)] : .replyLost) }
                log("FAULT \(node.id) next commands: \(injected)")
                node.pendingFaults = injected
            }
            // Let the cluster settle (probes, relocations) before the next fault.
            await sleep(milliseconds: 1_500)
            faultActive = false
        }
    }

    // MARK: - browsers

    enum Operation: String {
        case increment, read, note, logout, login, burst, replayLoggedOut, think, long, moveInstance, idle
    }

    /// Before each request: an eviction may have taken the session (memcached may do that).
    func absorbLossyFaults(_ browser: inout BrowserState) {
        if lossyFaults > browser.seenLossyFaults {
            browser.seenLossyFaults = lossyFaults
            browser.expected.insert(0)
            browser.mayHaveLost = true
        }
    }

    func browse(_ index: Int) async {
        var browser = BrowserState(name: "b\(index + 1)", instance: index % scenario.instances)
        let lockingSerializes = scenario.mode == .nonSticky && (scenario.locking == "all" || scenario.locking.hasPrefix("uriPattern"))
        for _ in 0..<scenario.requestsPerBrowser {
            let roll = random(100)
            let operation: Operation
            switch roll {
            case 0..<35: operation = .increment
            case 35..<55: operation = .read
            case 55..<62: operation = .note
            case 62..<67: operation = .logout
            case 67..<72: operation = .login
            case 72..<80: operation = .burst
            case 80..<86: operation = .replayLoggedOut
            case 86..<92: operation = .think
            case 92..<94: operation = .idle
            case 94..<97: operation = scenario.mode == .nonSticky ? .long : .increment
            default: operation = scenario.mode == .nonSticky ? .increment : .moveInstance
            }
            absorbLossyFaults(&browser)
            switch operation {
            case .increment: await increment(&browser)
            case .read: await read(&browser)
            case .note: await note(&browser, name: "note", value: "\(browser.name)-\(random(1000))")
            case .logout: await logout(&browser)
            case .login: await login(&browser)
            case .burst: await burst(&browser, serializes: lockingSerializes)
            case .replayLoggedOut: await replayLoggedOut(&browser)
            case .think: await sleep(milliseconds: 100 + random(3_000))
            case .long: await increment(&browser, handlerMilliseconds: 2_000 + random(5_000), path: "/cart/long")
            case .moveInstance:
                guard !faultActive else { break }
                browser.instance = (browser.instance + 1) % scenario.instances
                if scenario.mode == .stickyAsync {
                    // The old instance's queued writes of the last window may not be in memcached yet.
                    let windowStart = now > 400_000_000 ? now - 400_000_000 : 0
                    let surely = browser.recent.last { $0.at < windowStart }?.count
                    let lately = browser.recent.filter { $0.at >= windowStart }.map(\.count)
                    if !lately.isEmpty {
                        browser.expected = browser.expected.union(lately).union(surely.map { [$0] } ?? [0])
                    }
                }
                log("[\(browser.name)] now routed to instance \(browser.instance + 1)")
            case .idle:
                // Idle past the timeout: gone for good. After a failure the backup is the only copy,
                // and it bounds the last use to within one refresh window (idle / 4) of its last
                // refresh: the documented bound is the timeout plus that window (and memcached's
                // one-second clock).
                let idle = scenario.idleTimeoutSeconds
                let seconds = idle + max(idle / 4, 1) + 2
                await sleep(milliseconds: seconds * 1000)
                log("[\(browser.name)] was idle for \(seconds) s")
                browser.expected = [0]
                if let cookie = browser.cookie { browser.loggedOut.append(cookie) }
                browser.loggedOut += browser.ids
                browser.ids = []
            }
            await sleep(milliseconds: random(300))
        }
        // The end: the last count is readable, and no logged-out id is.
        await sleep(milliseconds: 3_000)
        await read(&browser)
        await replayLoggedOut(&browser)
    }

    /// Runs one request the way an adapter does: begin, handler, end (also after a throw), and
    /// applies the response's cookie. Returns the handler's result, or nil when the request failed.
    func request<T>(
        _ browser: inout BrowserState, path: String = "/counter", instance: Int? = nil, cookie: String?? = nil,
        applyCookie: Bool = true, handlerNanoseconds: UInt64 = 0, _ handler: (SessionAccess) async throws -> T
    ) async -> (value: T?, cookie: SessionResponseAction.Cookie?) {
        absorbLossyFaults(&browser)
        // Idle longer than the timeout since its last request: the session may have expired (it
        // lives at least its idle timeout; the explicit idle step below goes far past it).
        if let last = browser.lastRequestAt, now - last > UInt64(scenario.idleTimeoutSeconds) * 1_000_000_000 {
            browser.expected.insert(0)
        }
        if cookie == nil { browser.lastRequestAt = now }
        let manager = managers[instance ?? browser.instance]
        let sent = cookie ?? browser.cookie
        let started = now
        requests += 1
        let access = manager.beginRequest(path: path, sessionCookie: sent)
        var value: T? = nil
        var failure: (any Error)? = nil
        do {
            value = try await handler(access)
        } catch {
            failure = error
        }
        var action: SessionResponseAction? = nil
        do {
            action = try await manager.endRequest(access)
        } catch {
            failure = failure ?? error
        }
        let elapsed = now - started
        if elapsed > requestBound + handlerNanoseconds {
            violation(
                "bounded requests", "\(browser.name) \(path) took \(Double(elapsed) / 1e9) s (bound \(Double(requestBound) / 1e9) s)",
                browser: browser.name)
        }
        absorbLossyFaults(&browser)
        if let action, case .set(let id) = action.cookie {
            keyOwners[String(SessionKeys(token: id.token, prefix: "").primary.dropFirst(2))] = browser.name
        }
        if applyCookie, let action {
            switch action.cookie {
            case .unchanged: break
            case .set(let id):
                if browser.cookie.flatMap({ MemcachedSessionID(parsing: $0)?.token }) != id.token { browser.ids = [] }
                browser.cookie = id.description
                if !browser.ids.contains(id.description) { browser.ids.append(id.description) }
            case .clear: browser.cookie = nil
            }
        }
        if let failure {
            failedRequests += 1
            log("[\(browser.name)] \(path) at i\(manager.configuration.route ?? "\(instance ?? browser.instance)") failed: \(failure)")
            return (nil, action?.cookie)
        }
        return (value, action?.cookie)
    }

    struct OwnerMismatch: Error { let owner: String }

    /// The session's count after checking it is this browser's.
    func checkedCount(_ session: MemcachedSession, _ browser: BrowserState) throws -> Int {
        let owner = session["owner", as: String.self]
        if let owner, owner != browser.name { throw OwnerMismatch(owner: owner) }
        return session["count", as: Int.self] ?? 0
    }

    func noteOwnerMismatch(_ error: Error?, _ browser: BrowserState) {
        if let mismatch = error as? OwnerMismatch {
            violation("no other session's data", "\(browser.name) was served \(mismatch.owner)'s session", browser: browser.name)
        }
    }

    func increment(_ browser: inout BrowserState, handlerMilliseconds: Int = 0, path: String = "/counter") async {
        let name = browser.name
        var mismatch: Error? = nil
        let expectedBefore = browser.expected
        let (value, _) = await request(&browser, path: path, handlerNanoseconds: UInt64(handlerMilliseconds) * 1_000_000) { access -> Int in
            let session = try await access.loadOrCreate()
            let count: Int
            do { count = try self.checkedCount(session, browserNamed(name)) } catch {
                mismatch = error
                throw error
            }
            if session.isNew { try session.set("owner", name) }
            if handlerMilliseconds > 0 { try await self.clock.sleep(for: .milliseconds(Int64(handlerMilliseconds))) }
            try session.set("count", count + 1)
            return count + 1
        }
        noteOwnerMismatch(mismatch, browser)
        // An eviction while the request ran may have taken the session, as one before it may.
        absorbLossyFaults(&browser)
        let before = expectedBefore.union(browser.expected)
        guard let value else {
            // Unknown outcome: it may have counted.
            browser.expected = before.union(before.map { $0 + 1 }).union([0])
            return
        }
        log("[\(name)] increment → \(value) (cookie \(short(browser.cookie)))")
        if value == 1 {
            // A new session (none, or the old one is gone): fine only if the browser could have none.
            if !before.contains(0) {
                violation("no lost session", "\(name) started over at 1, expected \(before.sorted())", browser: name)
            }
            browser.ids = browser.cookie.map { [$0] } ?? []
        } else if !before.contains(value - 1) {
            violation("no lost or repeated count", "\(name) counted \(value), expected one more than \(before.sorted())", browser: name)
        }
        browser.expected = [value]
        browser.mayHaveLost = false
        // Counts a loss the checks allowed took back (an instance move within the last window,
        // sticky asynchronous saving) are not ones the session went on from: this increment
        // started below them (sticky-async seed 14340: a count lost to one move was then taken
        // for one the next move could not lose).
        while let last = browser.recent.last, last.count >= value { browser.recent.removeLast() }
        browser.recent.append((now, value))
        if browser.recent.count > 8 { browser.recent.removeFirst() }
    }

    func browserNamed(_ name: String) -> BrowserState { BrowserState(name: name, instance: 0) }

    func read(_ browser: inout BrowserState) async {
        let name = browser.name
        var mismatch: Error? = nil
        let (value, _) = await request(&browser, path: "/read") { access -> Int in
            guard let session = try await access.load() else { return 0 }
            do { return try self.checkedCount(session, browserNamed(name)) } catch {
                mismatch = error
                throw error
            }
        }
        noteOwnerMismatch(mismatch, browser)
        absorbLossyFaults(&browser)  // an eviction while the request ran
        guard let value else { return }
        log("[\(name)] read → \(value) (cookie \(short(browser.cookie)))")
        if !browser.expected.contains(value) {
            violation("read your writes", "\(name) read \(value), expected \(browser.expected.sorted())", browser: name)
        }
        if browser.mayHaveLost {
            browser.expected.insert(value)
        } else {
            browser.expected = [value]
            if value == 0 { browser.ids = [] }
        }
    }

    func note(_ browser: inout BrowserState, name attribute: String, value: String) async {
        _ = await request(&browser, path: "/note") { access -> Bool in
            guard let session = try await access.load() else { return false }
            try session.set(attribute, value)
            return true
        }
    }

    func logout(_ browser: inout BrowserState) async {
        guard browser.cookie != nil else { return }
        let ids = browser.ids + (browser.cookie.map { [$0] } ?? [])
        let (value, _) = await request(&browser, path: "/logout") { access -> Bool in
            // As an application's logout does: end whatever the cookie names.
            let found = try await access.load() != nil
            try await access.invalidate()
            return found
        }
        guard let value else {
            browser.expected = browser.expected.union([0])
            return
        }
        log("[\(browser.name)] logout (\(value ? "ended its session" : "had none")), ids \(ids.map(short))")
        browser.loggedOut += ids
        browser.ids = []
        browser.expected = [0]
    }

    func login(_ browser: inout BrowserState) async {
        guard browser.cookie != nil else { return }
        let old = browser.cookie
        let (value, _) = await request(&browser, path: "/login") { access -> Bool in
            guard try await access.load() != nil else { return false }
            try await access.regenerateID()
            return true
        }
        if value == true {
            log("[\(browser.name)] login: id \(short(old)) → \(short(browser.cookie))")
            if browser.cookie == old {
                violation("a login gets a new id", "\(browser.name)'s login kept id \(short(old)) (session fixation)", browser: browser.name)
            } else if let old {
                // The old id is dead, like a logged-out one.
                browser.loggedOut.append(old)
            }
            browser.ids = browser.cookie.map { [$0] } ?? []
        }
    }

    /// Concurrent requests of one browser: increments (serializable with locking), or changes
    /// of different attributes (all survive), sometimes with a login among them (the login's new
    /// cookie must not be cleared by a racing request).
    func burst(_ browser: inout BrowserState, serializes: Bool) async {
        guard let cookie = browser.cookie else {
            await increment(&browser)
            return
        }
        let size = 2 + random(2)
        let name = browser.name
        let before = browser.expected
        let withLogin = !serializes && random(3) == 0
        if serializes {
            // Concurrent increments with locking: each sees the previous one's write.
            var results: [Int?] = []
            await withTaskGroup(of: (Int?, SessionResponseAction.Cookie?).self) { group in
                for _ in 0..<size {
                    let instance = random(scenario.instances)
                    group.addTask {
                        var copy = BrowserState(name: name, cookie: cookie, instance: instance)
                        return await self.request(&copy, path: "/cart/burst", applyCookie: false) { access -> Int in
                            let session = try await access.loadOrCreate()
                            let count = try self.checkedCount(session, self.browserNamed(name))
                            if session.isNew { try session.set("owner", name) }
                            try session.set("count", count + 1)
                            return count + 1
                        }
                    }
                }
                // The browser applies the Set-Cookies in the order the responses arrive.
                for await (result, action) in group {
                    results.append(result)
                    switch action {
                    case .set(let id)?:
                        // Another session (each request of the burst made its own): the ids so
                        // far were other sessions'.
                        if browser.cookie.flatMap({ MemcachedSessionID(parsing: $0)?.token }) != id.token { browser.ids = [] }
                        browser.cookie = id.description
                        if !browser.ids.contains(id.description) { browser.ids.append(id.description) }
                    case .clear?: browser.cookie = nil
                    default: break
                    }
                }
            }
            let counted = results.compactMap { $0 }.sorted()
            log("[\(name)] burst of \(size) locked increments → \(counted)")
            let continued = counted.filter { $0 != 1 }  // (1: the cookie named no session; each made its own)
            if Set(continued).count != continued.count {
                violation("locking serializes", "\(name) concurrent locked increments returned \(counted)", browser: name)
            }
            let failures = results.count - counted.count
            if let base = before.min(), failures == 0, before.count == 1, counted != Array((base + 1)...(base + size)), !counted.contains(1) {
                violation("locking serializes", "\(name) from \(base), \(size) locked increments returned \(counted)", browser: name)
            }
            if failures == 0, let top = counted.last, !counted.contains(1) {
                browser.expected = [top]
            } else {
                var possible = before
                for _ in 0..<size { possible = possible.union(possible.map { $0 + 1 }) }
                browser.expected = possible.union([0]).union(Set(counted))
            }
            return
        }
        // Different attributes at once: every change survives the others (CAS merge).
        var outcomes: [(String, Bool?, SessionResponseAction.Cookie?)] = []
        await withTaskGroup(of: (String, Bool?, SessionResponseAction.Cookie?).self) { group in
            for part in 0..<size {
                let instance = scenario.mode == .nonSticky ? random(scenario.instances) : browser.instance
                let login = withLogin && part == 0
                group.addTask {
                    var copy = BrowserState(name: name, cookie: cookie, instance: instance)
                    let attribute = "part\(part)"
                    let (value, action) = await self.request(&copy, path: login ? "/login" : "/part", applyCookie: false) { access -> Bool in
                        guard let session = try await access.load() else { return false }
                        if login { try await access.regenerateID() }
                        try session.set(attribute, "\(name)-\(part)")
                        return true
                    }
                    return (attribute, value, action)
                }
            }
            for await outcome in group { outcomes.append(outcome) }
        }
        // The browser applies the Set-Cookies in the order the responses arrived.
        var loginCookie: String? = nil
        for (attribute, value, action) in outcomes {
            switch action {
            case .set(let id)?:
                browser.cookie = id.description
                if attribute == "part0", withLogin, value == true { loginCookie = id.description }
            case .clear?:
                if loginCookie != nil {
                    violation("a racing request never clears a fresh login", "\(name): a response cleared the cookie the login had just set", browser: name)
                }
                browser.cookie = nil
            default: break
            }
        }
        if withLogin, let loginCookie {
            browser.loggedOut.append(cookie)
            browser.ids = [loginCookie]
            if browser.cookie == nil { browser.cookie = loginCookie }  // (a violation was recorded)
            if let current = browser.cookie, current != loginCookie,
                MemcachedSessionID(parsing: current)?.token == MemcachedSessionID(parsing: cookie)?.token
            {
                // A racing request moved the old session (its node failed) and its response,
                // after the login's, replaced the login's cookie: the documented limit of
                // docs/guarantees.md ("Concurrent requests racing a login during a move"): the
                // browser is logged out, never served an ended or another session.
                log("[\(name)] a racing move's cookie replaced the login's: logged out (documented limit)")
                browser.expected.insert(0)
                browser.ids = [current]
            }
        }
        let written = outcomes.filter { $0.1 == true }.map(\.0)
        let answers = outcomes.map { outcome -> String in
            let cookie: String
            switch outcome.2 {
            case .set(let id)?: cookie = "set \(short(id.description))"
            case .clear?: cookie = "clear"
            default: cookie = "-"
            }
            return "\(outcome.0): \(outcome.1.map { "\($0)" } ?? "failed"), \(cookie)"
        }
        log("[\(name)] burst of \(size) attribute changes\(withLogin ? " with a login" : "") → \(written.sorted()) (answers in order: \(answers.joined(separator: "; ")))")
        // (Changes racing a login went to the old id, which the login ended: not checked.)
        guard !written.isEmpty, !withLogin, browser.cookie != nil else { return }
        // Every acknowledged change is there.
        var missing: [String] = []
        let (found, _) = await request(&browser, path: "/read") { access -> Bool in
            guard let session = try await access.load() else { return false }
            missing = written.filter { session[$0, as: String.self] != "\(name)-\($0.dropFirst(4))" }
            return true
        }
        if found == true, !missing.isEmpty {
            violation("concurrent changes of different attributes both survive", "\(name) lost \(missing.sorted())", browser: name)
        }
        if found == false {
            violation("concurrent changes of different attributes both survive", "\(name) lost its whole session after \(written.sorted())", browser: name)
        }
    }

    /// A stale tab sends an id of a session that was logged out (or replaced by a login): it must
    /// find nothing, on any instance.
    func replayLoggedOut(_ browser: inout BrowserState) async {
        guard !browser.loggedOut.isEmpty else { return }
        let id = browser.loggedOut[random(browser.loggedOut.count)]
        let instance = random(scenario.instances)
        let name = browser.name
        var mismatch: Error? = nil
        let (value, _) = await request(&browser, path: "/read", instance: instance, cookie: .some(id), applyCookie: false) { access -> Int in
            guard let session = try await access.load() else { return -1 }
            do { return try self.checkedCount(session, browserNamed(name)) } catch {
                mismatch = error
                throw error
            }
        }
        noteOwnerMismatch(mismatch, browser)
        guard let value else { return }
        if value != -1 {
            violation(
                "a logout is never undone", "\(name)'s logged-out id \(short(id)) read count \(value) on instance \(instance + 1)",
                browser: name)
        } else {
            log("[\(name)] replayed logged-out id \(short(id)) on instance \(instance + 1): nothing, as it should")
        }
    }

    func short(_ id: String?) -> String {
        guard let id else { return "none" }
        return String(id.prefix(6)) + "…" + (id.split(separator: "-").last.map { "-" + $0 } ?? "")
    }
}

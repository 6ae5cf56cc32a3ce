import Memcached
import NIOCore

/// What can go wrong with one command on a simulated node.
public enum CommandFault: Sendable, Hashable, CustomStringConvertible {
    /// The command was applied, its reply lost: the caller times out.
    case replyLost
    /// The command never reached the server: the caller times out.
    case neverApplied
    /// The node stalls on the command (a slow disk, a stop-the-world pause) past the caller's
    /// deadline: the caller times out, the command and every one after it are applied later, in
    /// order (a connection never reorders).
    case appliedLate
    /// The connection is cut before the command: it fails with `connectionClosed`, unapplied.
    case connectionCut
    /// The server refuses the command (`SERVER_ERROR out of memory storing object`), unapplied:
    /// a failed command on a node that stays up.
    case serverError

    public var description: String {
        switch self {
        case .replyLost: "reply lost"
        case .neverApplied: "never applied"
        case .appliedLate: "applied late"
        case .connectionCut: "connection cut"
        case .serverError: "server error"
        }
    }
}

/// One memcached node in memory, with memcached's semantics for every command and flag the
/// session manager sends (CAS uniques, add/replace, TTLs relative and absolute over 30 days,
/// memcached's whole-second clock, client flags, `mg` value/TTL/touch flags, quiet writes,
/// conditional deletes, `stats` with pid and uptime), the client's node health (consecutive
/// failures mark it down, probes bring it back), and injected faults: per-command faults
/// (``CommandFault``), frozen (commands queue, applied at the thaw; callers time out), dead
/// (refused), restarted empty (a new process: items and CAS counter gone), evictions.
///
/// Runs on the ``DeterministicScheduler``'s one thread.
public final class SimulatedNode: MemcachedNodeCommandRunner, @unchecked Sendable {
    // @unchecked Sendable: all state is touched only on the simulation's one thread.

    public let id: String
    let requestTimeout: Duration
    let failureThreshold: Int

    struct Item {
        var value: ByteBuffer
        var flags: UInt32
        var cas: UInt64
        /// memcached's exptime: 0 never, else the node's relative second at which it expires.
        var exptime: Int64
    }

    enum State: Equatable {
        case up
        case frozen
        case dead
    }

    private var items: [String: Item] = [:]
    /// Items evicted since the process started (memcached's `evictions`).
    private var evictions = 0
    private var casCounter: UInt64 = 0
    /// The client's connection generation (``MemcachedNodeCommandRunner/connectionGeneration``):
    /// a restart closes every connection, so the next request opens a new one.
    private var generation: UInt64 = 1
    private(set) var state: State = .up
    /// Virtual nanoseconds when the process started.
    private var bootNanoseconds: UInt64
    private(set) var pid: Int
    private var consecutiveFailures = 0
    private(set) var markedDown = false
    /// Commands waiting on a frozen node (applied at the thaw, in order).
    private var frozenQueue: [() -> Void] = []
    /// The next command's fault, set by a fault schedule (consumed by the next command).
    public var pendingFaults: [CommandFault] = []
    /// A fault for every command it matches (when no pending fault comes first): a test that
    /// needs one kind of command to fail whatever comes before it (the principal index's writes
    /// after the reads and ends of a revocation).
    public var faultMatching: (@Sendable (MemcachedRequest) -> CommandFault?)? = nil
    /// Round trips held on their way to the node (a slow path for some caller's commands: the
    /// test decides when they arrive, ``releaseHeld(first:)``); their callers' deadlines still
    /// run. Asked once per round trip, with its requests.
    public var holdMatching: (@Sendable ([MemcachedRequest]) -> Bool)? = nil
    private var held: [() -> Void] = []
    /// Round trips held (``holdMatching``) and not released yet.
    public var heldCount: Int { held.count }
    /// Every command applied, for the history: (virtual ns, command summary).
    public private(set) var applied = 0
    let clock = SimulatedClock()
    /// Called when a command is applied (key, summary), for histories.
    var observer: ((String) -> Void)?

    init(id: String, requestTimeout: Duration, failureThreshold: Int, pid: Int) {
        self.id = id
        self.requestTimeout = requestTimeout
        self.failureThreshold = failureThreshold
        self.pid = pid
        self.bootNanoseconds = DeterministicScheduler.shared.nanoseconds
    }

    public var isAvailable: Bool { !markedDown }

    // MARK: - faults

    /// The first `count` round trips held (``holdMatching``) arrive, in the order they were held.
    public func releaseHeld(first count: Int = .max) {
        let released = held.prefix(count)
        held.removeFirst(released.count)
        for arrive in released { arrive() }
    }

    public func freeze() { if state == .up { state = .frozen } }

    public func thaw() {
        guard state == .frozen else { return }
        state = .up
        let queued = frozenQueue
        frozenQueue = []
        for apply in queued { apply() }
    }

    public func kill() {
        state = .dead
        let queued = frozenQueue
        frozenQueue = []
        _ = queued  // a dead process applies nothing it had queued
        items = [:]
    }

    /// A new, empty process (after a kill, a freeze or while up).
    public func restartEmpty(pid newPID: Int) {
        frozenQueue = []
        items = [:]
        casCounter = 0
        generation += 1
        evictions = 0
        pid = newPID
        bootNanoseconds = DeterministicScheduler.shared.nanoseconds
        state = .up
    }

    /// Evicts `count` items (memcached under memory pressure), chosen by the run's generator.
    public func evict(count: Int) {
        for _ in 0..<count {
            guard !items.isEmpty else { return }
            let keys = items.keys.sorted()
            let key = keys[Int(DeterministicScheduler.shared.random(below: UInt64(keys.count)))]
            items[key] = nil
            evictions += 1
        }
    }

    /// memcached's `flush_all`: every item gone, no eviction counted, the process unchanged.
    func flushAll() { items = [:] }

    /// Marks the node down as repeated failures would (it still answers: the next probe marks
    /// it up again).
    func markDown() { markedDown = true }

    /// The client's probe: a node that answers is marked up again.
    func probe() {
        if markedDown, state == .up {
            markedDown = false
            consecutiveFailures = 0
        }
    }

    // MARK: - memcached's clock

    /// memcached's `current_time`: whole seconds since the process started (it starts at 2).
    private var currentTime: Int64 {
        Int64((DeterministicScheduler.shared.nanoseconds - bootNanoseconds) / 1_000_000_000) + 2
    }

    /// The Unix time memcached takes as its start (`process_started`).
    private var processStarted: Int64 {
        SimulatedClock.epochMilliseconds / 1000 + Int64(bootNanoseconds / 1_000_000_000) - 2
    }

    /// memcached's `realtime()`: an exptime from the wire to the node's relative seconds.
    private func realtime(_ ttl: MemcachedTTL) -> Int64 {
        let wire = ttl.wireValue(now: self.clock.unixSeconds)
        if wire == 0 { return 0 }
        if wire < 0 { return 1 }  // already expired
        if wire > MemcachedTTL.maximumRelativeSeconds {
            return wire <= processStarted ? 1 : wire - processStarted
        }
        return wire + currentTime
    }

    private func live(_ key: String) -> Item? {
        guard let item = items[key] else { return nil }
        if item.exptime != 0, item.exptime <= currentTime {
            items[key] = nil
            return nil
        }
        return item
    }

    private func nextCAS() -> UInt64 {
        casCounter += 1
        return casCounter
    }

    // MARK: - commands

    /// Applies one command with memcached's semantics.
    func apply(_ request: MemcachedRequest) -> Result<MemcachedResponse, MemcachedError> {
        applied += 1
        switch request.command {
        case .get(let key, let wantsValue, let touch):
            guard var item = live(key) else { return .success(.item(nil)) }
            if let touch {
                item.exptime = realtime(touch)
                items[key] = item
            }
            var ttl: Int? = nil
            if request.returnsTimeToLive { ttl = item.exptime == 0 ? -1 : Int(item.exptime - currentTime) }
            return .success(.item(MemcachedItem(value: wantsValue ? item.value : ByteBuffer(), flags: item.flags, cas: item.cas, timeToLive: ttl)))
        case .store(let key, let value, let flags, let ttl, let mode, let cas):
            if value.readableBytes + key.utf8.count > 1024 * 1024 {
                return .failure(MemcachedError(code: .valueTooLarge, message: "value too large", nodeID: id))
            }
            let existing = live(key)
            if let cas {
                guard let existing else { return .success(.stored(.notFound)) }
                guard existing.cas == cas else { return .success(.stored(.exists)) }
            }
            switch mode {
            case .add where existing != nil: return .success(.stored(.notStored))
            case .replace where existing == nil: return .success(.stored(.notStored))
            case .append, .prepend:
                guard var item = existing else { return .success(.stored(.notStored)) }
                var combined = mode == .append ? item.value : value
                var tail = mode == .append ? value : item.value
                combined.writeBuffer(&tail)
                item.value = combined
                item.cas = nextCAS()
                items[key] = item
                return .success(.stored(.stored(cas: item.cas)))
            default:
                let item = Item(value: value, flags: flags, cas: nextCAS(), exptime: realtime(ttl))
                if item.exptime == 1 {
                    items[key] = nil  // stored already expired: gone
                } else {
                    items[key] = item
                }
                return .success(.stored(.stored(cas: item.cas)))
            }
        case .delete(let key, let cas):
            guard let existing = live(key) else { return .success(.deleted(.notFound)) }
            if let cas, existing.cas != cas { return .success(.deleted(.exists)) }
            items[key] = nil
            return .success(.deleted(.deleted))
        case .touch(let key, let ttl):
            guard var item = live(key) else { return .success(.touched(false)) }
            item.exptime = realtime(ttl)
            items[key] = item
            return .success(.touched(true))
        case .arithmetic(let key, let delta, let increment, let initial, let ttl):
            guard var item = live(key) else {
                guard let initial else { return .success(.counter(nil)) }
                items[key] = Item(value: ByteBuffer(string: "\(initial)"), flags: 0, cas: nextCAS(), exptime: realtime(ttl))
                return .success(.counter(initial))
            }
            guard let current = UInt64(String(buffer: item.value)) else {
                return .failure(MemcachedError(code: .clientError, message: "cannot increment or decrement non-numeric value", nodeID: id))
            }
            let next = increment ? current &+ delta : (current > delta ? current - delta : 0)
            item.value = ByteBuffer(string: "\(next)")
            item.cas = nextCAS()
            items[key] = item
            return .success(.counter(next))
        case .noop:
            return .success(.noop)
        case .version:
            return .success(.version("1.6.18-simulated"))
        case .stats:
            let uptime = currentTime - 2
            return .success(
                .stats([
                    MemcachedStat(name: "pid", value: "\(pid)"),
                    MemcachedStat(name: "uptime", value: "\(uptime)"),
                    MemcachedStat(name: "time", value: "\(clock.unixSeconds)"),
                    MemcachedStat(name: "curr_items", value: "\(items.count)"),
                    MemcachedStat(name: "evictions", value: "\(evictions)"),
                ]))
        }
    }

    // MARK: - the seam

    /// One round trip: the requests go out together, are applied in order (each may meet a
    /// fault), and the replies come back together, or each caller times out at its deadline.
    private func roundTrip(_ requests: [MemcachedRequest], _ done: @escaping ([Result<MemcachedResponse, MemcachedError>]) -> Void) {
        let scheduler = DeterministicScheduler.shared
        let timeout = requests.first?.timeout ?? requestTimeout
        let deadline = scheduler.nanoseconds + UInt64(max(1, timeout.components.seconds * 1_000_000_000 + timeout.components.attoseconds / 1_000_000_000))
        if markedDown {
            done(requests.map { _ in .failure(MemcachedError(code: .nodeUnavailable, message: "node marked down", nodeID: id)) })
            return
        }
        // Limited to older connections: not sent over the one opened since a restart (and, sent
        // before one, never reaching the new process: that connection closed with the old one).
        let sentGeneration = generation
        let limited = requests.contains { $0.connectionGenerationLimit != nil }
        if requests.contains(where: { $0.connectionGenerationLimit.map { sentGeneration > $0 } ?? false }) {
            done(requests.map { _ in .failure(MemcachedError(code: .connectionChanged, message: "connection newer than the limit", nodeID: id)) })
            return
        }
        var answered = false
        var results: [Result<MemcachedResponse, MemcachedError>?] = Array(repeating: nil, count: requests.count)
        var timedOut = false
        func finish() {
            guard !answered else { return }
            answered = true
            let final = results.map { $0 ?? .failure(MemcachedError(code: .timeout, message: "request timed out", nodeID: id)) }
            if final.contains(where: { if case .failure(let error) = $0 { error.code == .timeout || error.code == .connectionClosed || error.code == .connectFailed } else { false } }) {
                recordFailure()
            } else {
                consecutiveFailures = 0
            }
            done(final)
        }
        // The deadline: whatever has no reply by then times out.
        let deadlineTimer = scheduler.schedule(at: deadline) {
            timedOut = true
            finish()
        }
        // Latency: 50 to 500 µs each way.
        let latency = 50_000 + scheduler.random(below: 450_000)
        scheduler.schedule(at: scheduler.nanoseconds + latency) { [self] in
            let arrive = {
                if limited, self.generation != sentGeneration {
                    for index in requests.indices {
                        results[index] = .failure(MemcachedError(code: .connectionClosed, message: "connection closed", nodeID: self.id))
                    }
                    scheduler.cancelTimer(deadlineTimer)
                    finish()
                    return
                }
                switch self.state {
                case .dead:
                    for index in requests.indices {
                        results[index] = .failure(MemcachedError(code: .connectFailed, message: "connection refused", nodeID: self.id))
                    }
                    scheduler.cancelTimer(deadlineTimer)
                    finish()
                    return
                case .frozen, .up:
                    break
                }
                var replyLost = false
                var cut = false
                var stalled = false
                for (index, request) in requests.enumerated() {
                    if stalled { break }
                    if cut {
                        results[index] = .failure(MemcachedError(code: .connectionClosed, message: "connection closed", nodeID: self.id))
                        continue
                    }
                    let fault = self.pendingFaults.isEmpty ? self.faultMatching?(request) : self.pendingFaults.removeFirst()
                    switch fault {
                    case .connectionCut?:
                        cut = true
                        results[index] = .failure(MemcachedError(code: .connectionClosed, message: "connection closed", nodeID: self.id))
                    case .serverError?:
                        results[index] = .failure(MemcachedError(code: .serverError, message: "SERVER_ERROR out of memory storing object", nodeID: self.id))
                    case .neverApplied?:
                        replyLost = true
                    case .replyLost?:
                        _ = self.apply(request)
                        self.observer?("\(self.id) applied (reply lost) \(Self.summary(request))")
                        replyLost = true
                    case .appliedLate?:
                        // Stall: this command and all that follow wait, then apply in order.
                        replyLost = true
                        let rest = Array(requests[index...].dropFirst())
                        self.freeze()
                        self.frozenQueue.append {
                            _ = self.apply(request)
                            self.observer?("\(self.id) applied late \(Self.summary(request))")
                            for later in rest { _ = self.apply(later) }
                        }
                        scheduler.schedule(at: deadline + 1_000_000 + scheduler.random(below: 500_000_000)) { self.thaw() }
                        stalled = true  // (the rest of this batch is applied with it, later)
                    case nil:
                        results[index] = self.apply(request)
                        self.observer?("\(self.id) applied \(Self.summary(request)) → \(Self.summary(results[index]))")
                    }
                }
                if replyLost || timedOut { return }  // the deadline answers
                // The replies travel back.
                scheduler.schedule(at: scheduler.nanoseconds + 50_000 + scheduler.random(below: 450_000)) {
                    guard !timedOut else { return }
                    scheduler.cancelTimer(deadlineTimer)
                    finish()
                }
            }
            let deliver = {
                if self.state == .frozen {
                    self.frozenQueue.append(arrive)
                } else {
                    arrive()
                }
            }
            if let hold = self.holdMatching, hold(requests) {
                self.held.append(deliver)
            } else {
                deliver()
            }
        }
    }

    private func recordFailure() {
        consecutiveFailures += 1
        if consecutiveFailures >= failureThreshold { markedDown = true }
    }

    static func summary(_ request: MemcachedRequest) -> String {
        switch request.command {
        case .get(let key, let value, let touch): "mg \(key)\(value ? " v" : "")\(touch.map { " T\($0)" } ?? "")"
        case .store(let key, _, let flags, let ttl, let mode, let cas): "ms \(key) \(mode) F\(flags) T\(ttl)\(cas.map { " C\($0)" } ?? "")"
        case .delete(let key, let cas): "md \(key)\(cas.map { " C\($0)" } ?? "")"
        case .touch(let key, let ttl): "touch \(key) \(ttl)"
        case .arithmetic(let key, _, _, _, _): "ma \(key)"
        case .noop: "mn"
        case .version: "version"
        case .stats: "stats"
        }
    }

    /// A reply, for histories: the outcome and CAS unique, never a value.
    static func summary(_ result: Result<MemcachedResponse, MemcachedError>?) -> String {
        switch result {
        case .success(.item(let item?))?: "HIT C\(item.cas.map(String.init) ?? "-") F\(item.flags)"
        case .success(.item(nil))?: "MISS"
        case .success(.stored(.stored(let cas)))?: "STORED C\(cas.map(String.init) ?? "-")"
        case .success(.stored(.notStored))?: "NOT_STORED"
        case .success(.stored(.exists))?: "EXISTS"
        case .success(.stored(let other))?: "\(other)"
        case .success(.deleted(let outcome))?: "\(outcome)"
        case .success(let other)?: "\(other)".prefix(40).description
        case .failure(let error)?: "\(error.code)"
        case nil: "-"
        }
    }

    public func execute(_ request: MemcachedRequest) async throws(MemcachedError) -> MemcachedResponse {
        try await executeBatch([request])[0].get()
    }

    public var connectionGeneration: UInt64? { generation }

    public func executeBatch(_ requests: [MemcachedRequest]) async -> [Result<MemcachedResponse, MemcachedError>] {
        guard !requests.isEmpty else { return [] }
        let box = ResultBox()
        await withCheckedContinuation { (continuation: CheckedContinuation<Void, Never>) in
            roundTrip(requests) { results in
                box.results = results
                continuation.resume()
            }
        }
        return box.results
    }

    public func submit(_ request: MemcachedRequest, completion: @escaping @Sendable (Result<MemcachedResponse, MemcachedError>) -> Void) async {
        roundTrip([request]) { results in completion(results[0]) }
    }

    private final class ResultBox: @unchecked Sendable {
        // @unchecked Sendable: written and read on the simulation's one thread.
        var results: [Result<MemcachedResponse, MemcachedError>] = []
    }
}

/// The simulated cluster: the nodes of a ``SimulatedNode`` set, with the client's probes.
public final class SimulatedCluster: MemcachedNodeSet, @unchecked Sendable {
    // @unchecked Sendable: all state is touched only on the simulation's one thread.
    public let nodes: [SimulatedNode]
    let probeInterval: Duration

    public init(nodeCount: Int, requestTimeout: Duration = .seconds(1), failureThreshold: Int = 2, probeInterval: Duration = .milliseconds(500)) {
        nodes = (1...nodeCount).map { SimulatedNode(id: "n\($0)", requestTimeout: requestTimeout, failureThreshold: failureThreshold, pid: 1000 + $0) }
        self.probeInterval = probeInterval
    }

    public var nodeRunners: [any MemcachedNodeCommandRunner] { nodes }

    public func node(_ id: String) -> SimulatedNode? { nodes.first { $0.id == id } }

    /// The node list for a session manager's configuration (addresses are never dialled).
    public var nodeList: String { nodes.enumerated().map { "\($0.element.id):127.0.0.1:\(20000 + $0.offset)" }.joined(separator: ",") }

    /// Probes marked-down nodes until cancelled.
    public func run() async throws {
        let clock = SimulatedClock()
        while !Task.isCancelled {
            do { try await clock.sleep(for: probeInterval) } catch { return }
            for node in nodes { node.probe() }
        }
    }

    public func setObserver(_ observer: @escaping (String) -> Void) {
        for node in nodes { node.observer = observer }
    }
}

import Memcached
import NIOCore
import Synchronization

/// When each memcached node last restarted, from its own `stats`: a new `pid`, or a boot time
/// (`time` - `uptime`) that moved; and when it last evicted items (its `evictions` counter went
/// up): memory pressure loses sessions as a restart does, one at a time.
///
/// A node that restarted is empty: a session missing from it may well have a backup elsewhere,
/// whereas a miss on a node that has been up all along means the session is gone (expired or
/// logged out). Without this, a quickly restarted node would turn its sessions into "no session".
final class NodeRestarts: Sendable {
    /// How often the watch asks every node for its pid and boot time.
    static let watchInterval = Duration.seconds(1)

    private struct Record {
        var pid: Int64
        var bootTime: Int64
        var restartedAt: Int64?
        var evictions: Int64
        var evictedAt: Int64?
    }

    private let records = Mutex<[String: Record]>([:])
    /// Nodes watched through a sentinel item: how often it went missing (their "pid").
    private let sentinelLosses = Mutex<[String: Int64]>([:])

    /// A sentinel observation's "pid": the number of times the item went missing (`lost`: once more).
    func sentinelGeneration(_ node: String, lost: Bool) -> Int64 {
        sentinelLosses.withLock { losses in
            if lost { losses[node, default: 0] += 1 }
            return losses[node] ?? 0
        }
    }

    /// The checks that misses asked for, per node: how many were started and finished, whether
    /// the last finished one failed, and the one in flight. At most one is in flight per node, and
    /// every miss waiting at once shares it: misses on forged or expired cookies cost one `stats`
    /// per round trip at most, never one each.
    private struct Checks {
        var started = 0
        var finished = 0
        var lastFailed = false
        var inFlight: Task<Void, Never>?
    }
    private let checks = Mutex<[String: Checks]>([:])

    enum CheckState {
        /// A check started after the miss has finished; whether it failed (the node did not say).
        case done(failed: Bool)
        /// Wait for this check, then look again.
        case wait(Task<Void, Never>)
    }

    /// How many checks of `node` have been started: a miss needs one started after it.
    func startedChecks(_ node: String) -> Int {
        checks.withLock { $0[node]?.started ?? 0 }
    }

    /// Where a miss that saw `seen` started checks stands: done once a check started after it has
    /// finished; otherwise the check to wait for (the one in flight, or a new one from `start`).
    func check(after seen: Int, node: String, start: @escaping @Sendable (Int) -> Task<Void, Never>) -> CheckState {
        checks.withLock { all in
            var state = all[node] ?? Checks()
            defer { all[node] = state }
            if state.finished > seen { return .done(failed: state.lastFailed) }
            if let inFlight = state.inFlight { return .wait(inFlight) }
            state.started += 1
            let task = start(state.started)
            state.inFlight = task
            return .wait(task)
        }
    }

    /// A check started as number `number` finished.
    func finishCheck(_ number: Int, node: String, failed: Bool) {
        checks.withLock { all in
            var state = all[node] ?? Checks()
            state.finished = max(state.finished, number)
            state.lastFailed = failed
            state.inFlight = nil
            all[node] = state
        }
    }

    /// Records a node's process id, boot time (Unix seconds) and eviction count; a new pid, or a
    /// boot time that moved by more than 2 s (another host behind the same address), is a restart
    /// at `now`; a higher eviction count, an eviction at `now`.
    /// Returns true when this observation is a restart.
    @discardableResult
    func observe(node: String, pid: Int64, bootTime: Int64, evictions: Int64, now: Int64) -> Bool {
        records.withLock { records in
            guard var record = records[node] else {
                records[node] = Record(pid: pid, bootTime: bootTime, evictions: evictions)
                return false
            }
            var restarted = false
            if record.pid != pid || abs(record.bootTime - bootTime) > 2 {
                record.restartedAt = now
                record.pid = pid
                record.bootTime = bootTime
                restarted = true
            } else if evictions > record.evictions {
                record.evictedAt = now
            }
            record.evictions = evictions
            records[node] = record
            return restarted
        }
    }

    /// Whether the node's boot time has been seen.
    func knows(_ node: String) -> Bool {
        records.withLock { $0[node] != nil }
    }

    /// Whether `node` restarted, or evicted items, within the last `seconds` (Unix seconds `now`).
    func restarted(_ node: String, within seconds: Int64, now: Int64) -> Bool {
        records.withLock { records in
            guard let record = records[node] else { return false }
            let last = max(record.restartedAt ?? .min, record.evictedAt ?? .min)
            return last != .min && now - last <= seconds
        }
    }
}

extension SessionStore {
    /// Watches the nodes' boot times while the manager runs (non-sticky mode: where a session's
    /// only other copy is its backup).
    ///
    /// Sticky mode: a node that restarted lost the copies of the sessions this instance holds
    /// there; they are written again from memory at once (the sticky lifecycle listens through
    /// ``onNodeRestart(_:)``), so that a browser routed to another instance meanwhile still finds
    /// its session.
    func watchNodeRestartsPeriodically() async {
        while !Task.isCancelled {
            for nodeID in topology.order {
                if await observeNode(nodeID) == true { await nodeRestarted(nodeID) }
            }
            do { try await clock.sleep(for: NodeRestarts.watchInterval) } catch { return }
        }
    }

    /// Asks a node for its pid and boot time and records them; true when it restarted, nil when
    /// the node did not say. A node that does not answer `stats` (a memcached-protocol proxy) is
    /// watched through a sentinel item instead (``observeBySentinel(_:node:)``).
    @discardableResult
    func observeNode(_ nodeID: String) async -> Bool? {
        guard let node = topology.node(nodeID), node.isAvailable else { return nil }
        var request = MemcachedRequest.stats()
        request.timeout = .seconds(1)
        request.honorsCancellation = false
        let stats: [MemcachedStat]
        do throws(MemcachedError) {
            guard case .stats(let answer) = try await node.execute(request) else { return nil }
            stats = answer
        } catch {
            guard error.code == .unsupportedInProtocolMode else { return nil }
            return await observeBySentinel(nodeID, node: node)
        }
        guard let time = stats.first(where: { $0.name == "time" }).flatMap({ Int64($0.value) }),
            let uptime = stats.first(where: { $0.name == "uptime" }).flatMap({ Int64($0.value) })
        else { return nil }
        let pid = stats.first(where: { $0.name == "pid" }).flatMap { Int64($0.value) } ?? 0
        let evictions = stats.first(where: { $0.name == "evictions" }).flatMap { Int64($0.value) } ?? 0
        return nodeRestarts.observe(
            node: nodeID, pid: pid, bootTime: time - uptime, evictions: evictions, now: currentTimeMillis() / 1000)
    }

    /// A node that cannot tell its pid and boot time (a proxy without `stats`): an item this
    /// instance keeps there, `<prefix>w:<instance nonce>`, read (and its day-long TTL slid) at each
    /// look, that went missing means the node, or behind a proxy the server that held it, lost its
    /// items (a restart, an eviction). Behind a proxy that spreads keys over several servers, only
    /// the one holding the sentinel is watched: a miss on the others is taken as a miss.
    func observeBySentinel(_ nodeID: String, node: any MemcachedNodeCommandRunner) async -> Bool? {
        var read = MemcachedRequest.get(sentinelKey, touch: .seconds(24 * 3600))
        read.timeout = .seconds(1)
        read.honorsCancellation = false
        let now = currentTimeMillis() / 1000
        switch await node.executeBatch([read])[0] {
        case .success(.item(.some)):
            return nodeRestarts.observe(node: nodeID, pid: nodeRestarts.sentinelGeneration(nodeID, lost: false), bootTime: 0, evictions: 0, now: now)
        case .success(.item(nil)):
            // Missing: never written yet (the first look), or lost.
            let generation = nodeRestarts.sentinelGeneration(nodeID, lost: nodeRestarts.knows(nodeID))
            var write = MemcachedRequest.store(sentinelKey, value: ByteBuffer(string: "1"), ttl: .seconds(24 * 3600))
            write.honorsCancellation = false
            guard case .success(.stored(.stored)) = await node.executeBatch([write])[0] else { return nil }
            return nodeRestarts.observe(node: nodeID, pid: generation, bootTime: 0, evictions: 0, now: now)
        default:
            return nil
        }
    }

    /// On a miss: whether the node restarted (or evicted items) recently. Unless the periodic
    /// watch has seen a restart already, the node is asked, by a check started after the miss (a
    /// request may come before the watch does, and a check from before the miss may predate the
    /// restart); concurrent misses share one check. A node that does not say counts as restarted:
    /// the other nodes are searched (a tombstone there still ends the session), never "no session"
    /// on a guess.
    func missMayBeRestartChecking(on nodeID: String) async -> Bool {
        if missMayBeRestart(on: nodeID) { return true }
        guard nodeRestarts.knows(nodeID) else { return false }
        let seen = nodeRestarts.startedChecks(nodeID)
        let restarts = nodeRestarts
        while true {
            let state = restarts.check(after: seen, node: nodeID) { number in
                Task {
                    let restarted = await self.observeNode(nodeID)
                    restarts.finishCheck(number, node: nodeID, failed: restarted == nil)
                    // The restart is seen here first, not by the watch (which will not see it
                    // again): sticky copies are written back from here (the simulation, seed 188).
                    if restarted == true { await self.nodeRestarted(nodeID) }
                }
            }
            switch state {
            case .done(let failed):
                return failed || missMayBeRestart(on: nodeID)
            case .wait(let check):
                await check.value
            }
        }
    }

    /// Whether a miss on `nodeID` may be a restart's or an eviction's loss rather than the session
    /// being gone.
    func missMayBeRestart(on nodeID: String) -> Bool {
        nodeRestarts.restarted(nodeID, within: context.copyHorizonSeconds, now: currentTimeMillis() / 1000)
    }
}

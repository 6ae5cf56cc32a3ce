import Memcached
import NIOCore
import Synchronization

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#elseif canImport(Darwin)
    import Darwin
#endif

/// Recent operational events (node down and up, failovers, reconfigurations), bounded. Messages
/// name nodes, never sessions. Repeated events of one kind and message within a few seconds are
/// counted on one entry instead of flooding the log.
public final class EventLog: Sendable {
    public enum Kind: String, Sendable, Codable {
        case nodeDown = "node-down"
        case nodeUp = "node-up"
        case failover
        case configuration
    }

    public struct Event: Sendable, Codable, Hashable {
        /// Milliseconds since 1970 of the first occurrence.
        public var time: Int64
        public var kind: Kind
        public var message: String
        /// How many times it happened within the entry's few seconds.
        public var count: Int
    }

    private let events = Mutex<[Event]>([])
    static let limit = 100
    static let mergeWindowMilliseconds: Int64 = 5_000

    func record(_ kind: Kind, _ message: String) {
        let now = SessionManager.systemTimeMillis()
        events.withLock { events in
            if let last = events.indices.last, events[last].kind == kind, events[last].message == message,
                now - events[last].time < Self.mergeWindowMilliseconds
            {
                events[last].count += 1
                return
            }
            events.append(Event(time: now, kind: kind, message: message, count: 1))
            if events.count > Self.limit { events.removeFirst(events.count - Self.limit) }
        }
    }

    /// The most recent events, newest last.
    public var recent: [Event] { events.withLock { $0 } }
}

/// The manager's statistics sampled every few seconds over the last minutes, for the status
/// page's charts: rates from counter deltas, latencies from timer deltas, per node too.
public final class StatusHistory: Sendable {
    public struct Sample: Sendable, Codable, Hashable {
        /// Milliseconds since 1970.
        public var time: Int64
        public var requestsPerSecond: Double
        public var loadsPerSecond: Double
        public var writesPerSecond: Double
        public var failoversPerSecond: Double
        public var lockWaitsPerSecond: Double
        /// Mean over the interval, microseconds.
        public var loadLatencyMicroseconds: Double
        public var writeLatencyMicroseconds: Double
        /// Per node: mean request latency over the interval, microseconds.
        public var nodeLatencyMicroseconds: [String: Double]
        public var nodesAvailable: [String: Bool]
    }

    private struct Previous {
        var time: Int64
        var counters: [String: Int]
        var timers: [String: SessionStatistics.TimerSnapshot]
        var nodes: [String: MemcachedNodeStatistics]
    }

    private let state = Mutex<(samples: [Sample], previous: Previous?)>(([], nil))
    /// Ten minutes at the sampling interval.
    static let sampleInterval: Duration = .seconds(2)
    static let limit = 300

    func record(statistics: SessionStatistics.Snapshot, nodes: [String: MemcachedNodeStatistics], now: Int64) {
        state.withLock { state in
            defer {
                state.previous = Previous(time: now, counters: statistics.counters, timers: statistics.timers, nodes: nodes)
            }
            guard let previous = state.previous, now > previous.time else { return }
            let seconds = Double(now - previous.time) / 1000
            func rate(_ names: [String]) -> Double {
                let delta = names.reduce(0) { $0 + (statistics.counters[$1] ?? 0) - (previous.counters[$1] ?? 0) }
                return Double(max(0, delta)) / seconds
            }
            func latency(_ name: String) -> Double {
                guard let now = statistics.timers[name], let before = previous.timers[name], now.count > before.count else { return 0 }
                return Double(now.totalMicroseconds - before.totalMicroseconds) / Double(now.count - before.count)
            }
            var nodeLatency: [String: Double] = [:]
            var available: [String: Bool] = [:]
            for (id, node) in nodes {
                available[id] = node.isAvailable
                if let before = previous.nodes[id], node.requests > before.requests {
                    nodeLatency[id] =
                        Double(node.totalLatencyNanoseconds - before.totalLatencyNanoseconds) / Double(node.requests - before.requests)
                        / 1000
                } else {
                    nodeLatency[id] = 0
                }
            }
            state.samples.append(
                Sample(
                    time: now, requestsPerSecond: rate(["requests_with_session", "requests_without_session"]),
                    loadsPerSecond: rate(["sessions_loaded", "sessions_loaded_locally"]), writesPerSecond: rate(["writes"]),
                    failoversPerSecond: rate(["memcached_failovers", "app_server_failovers"]), lockWaitsPerSecond: rate(["lock_waits"]),
                    loadLatencyMicroseconds: latency("load"), writeLatencyMicroseconds: latency("write"),
                    nodeLatencyMicroseconds: nodeLatency, nodesAvailable: available))
            if state.samples.count > Self.limit { state.samples.removeFirst(state.samples.count - Self.limit) }
        }
    }

    /// The samples, oldest first.
    public var samples: [Sample] { state.withLock { $0.samples } }
}

extension SessionManager {
    /// One memcached node as the status shows it.
    public struct NodeStatus: Sendable, Codable, Hashable {
        public var id: String
        public var address: String
        /// `primary`, `failover` or `draining`.
        public var role: String
        public var available: Bool
        public var requests: Int
        public var errors: Int
        public var timeouts: Int
        public var meanLatencyMicroseconds: Double
        /// Mean latency over the last sampling interval (0 without requests).
        public var recentLatencyMicroseconds: Double
    }

    /// Everything the status endpoint shows: never a session id or an attribute value.
    public struct Status: Sendable, Codable, Hashable {
        public var instance: String
        public var time: Int64
        public var mode: String
        public var locking: String
        public var enabled: Bool
        public var route: String?
        public var nodes: [NodeStatus]
        public var statistics: SessionStatistics.Snapshot
        public var localSessions: Int
        public var pendingAsynchronousWrites: Int
        public var history: [StatusHistory.Sample]
        public var events: [EventLog.Event]
    }

    /// The instance's status now.
    public func status(instance: String) -> Status {
        let topology = self.topology
        let view = runtimeView
        let latest = history.samples.last
        let nodes = topology.order.compactMap { id -> NodeStatus? in
            // Per-node statistics come from the memcached client (a simulated node set has none).
            guard let node = topology.node(id) as? MemcachedNodeClient else { return nil }
            let statistics = node.statistics
            return NodeStatus(
                id: id, address: node.address.hostAndPort, role: topology.role(of: id), available: statistics.isAvailable,
                requests: statistics.requests, errors: statistics.errors, timeouts: statistics.timeouts,
                meanLatencyMicroseconds: statistics.meanLatencyMicroseconds,
                recentLatencyMicroseconds: latest?.nodeLatencyMicroseconds[id] ?? 0)
        }
        return Status(
            instance: instance, time: Self.systemTimeMillis(), mode: configuration.mode.rawValue, locking: view.locking,
            enabled: view.enabled, route: configuration.route, nodes: nodes, statistics: statistics.snapshot(),
            localSessions: sticky.localStore.count, pendingAsynchronousWrites: sticky.writer.pendingCount, history: history.samples,
            events: events.recent)
    }

    /// Samples the statistics for the status history, and turns node availability changes into
    /// events. Runs in `run()`.
    func recordStatusPeriodically() async {
        var wasAvailable: [String: Bool] = [:]
        while !Task.isCancelled {
            let topology = self.topology
            var nodes: [String: MemcachedNodeStatistics] = [:]
            for id in topology.order {
                guard let node = topology.node(id) as? MemcachedNodeClient else { continue }
                let statistics = node.statistics
                nodes[id] = statistics
                if let before = wasAvailable[id], before != statistics.isAvailable {
                    events.record(
                        statistics.isAvailable ? .nodeUp : .nodeDown,
                        "memcached node \(id) is \(statistics.isAvailable ? "up again" : "down")")
                }
                wasAvailable[id] = statistics.isAvailable
            }
            history.record(statistics: statistics.snapshot(), nodes: nodes, now: Self.systemTimeMillis())
            do { try await clock.sleep(for: StatusHistory.sampleInterval) } catch { return }
        }
    }
}

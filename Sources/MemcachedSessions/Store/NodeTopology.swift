import Atomics
import Memcached
import NIOCore

/// The nodes sessions can live on, and the placement rules: new sessions on an available primary
/// (round robin), failover nodes only when no primary is up, backups on the next available node,
/// relocation to the next available node after the one that failed. Every walk over the nodes is
/// bounded by their number: no loop can spin whatever the node states.
final class NodeTopology: Sendable {
    /// The nodes: the memcached client, or (in simulations) another implementation of the
    /// command-level seam.
    let nodeSet: any MemcachedNodeSet
    /// The memcached client, when the nodes are one's (always, outside simulations).
    var client: MemcachedClient? { nodeSet as? MemcachedClient }
    /// Node ids in configuration order (draining nodes last).
    let order: [String]
    let failover: Set<String>
    /// Nodes removed by a reconfiguration: still read (their sessions move off at their next
    /// request), never chosen for new sessions, backups or relocations; forgotten at the deadline.
    let draining: [String: NIODeadline]
    /// The clock `draining` deadlines are on.
    let clock: any SessionClock
    private let nodes: [String: any MemcachedNodeCommandRunner]
    private let roundRobin = ManagedAtomic<Int>(0)

    init(nodes nodeSet: any MemcachedNodeSet, failoverNodes: [String], draining: [String: NIODeadline] = [:], clock: any SessionClock) {
        self.nodeSet = nodeSet
        let all = nodeSet.nodeRunners
        self.order = all.map(\.id)
        self.failover = Set(failoverNodes)
        self.draining = draining
        self.clock = clock
        self.nodes = Dictionary(uniqueKeysWithValues: all.map { ($0.id, $0) })
    }

    func node(_ id: String) -> (any MemcachedNodeCommandRunner)? { nodes[id] }

    /// Whether the node may take sessions: up, and not draining.
    func isAvailable(_ id: String) -> Bool {
        guard let node = nodes[id], draining[id] == nil else { return false }
        return node.isAvailable
    }

    /// Whether the node answers requests (draining nodes included).
    func isReachable(_ id: String) -> Bool { nodes[id]?.isAvailable ?? false }

    func isDraining(_ id: String) -> Bool { draining[id] != nil }

    /// Whether session ids may name this node (a draining node until its deadline).
    func contains(_ id: String) -> Bool {
        guard nodes[id] != nil else { return false }
        if let deadline = draining[id] { return clock.now() < deadline }
        return true
    }

    /// What each node is for: `primary`, `failover` or `draining`.
    func role(of id: String) -> String {
        if draining[id] != nil { return "draining" }
        return failover.contains(id) ? "failover" : "primary"
    }

    private var primaries: [String] { order.filter { !failover.contains($0) } }

    /// Where a new session goes: an available primary (round robin), else an available failover
    /// node, else the first primary (its write will fail and the unavailable policy applies; a
    /// sticky session stays in memory and is bound to a node once one answers).
    func placeNew() -> String {
        let primaries = order.filter { !failover.contains($0) && draining[$0] == nil }
        let start = roundRobin.loadThenWrappingIncrement(ordering: .relaxed)
        for offset in 0..<primaries.count {
            let id = primaries[(start &+ offset) % primaries.count]
            if isAvailable(id) { return id }
        }
        for id in order where failover.contains(id) && isAvailable(id) { return id }
        return primaries.first ?? order.first { draining[$0] == nil } ?? order[0]
    }

    /// The next available node after `id` in configuration order, primaries first, never `id`
    /// itself; nil when no other node is available. Used for backups and for relocation, so that
    /// every instance picks the same node for the same failure.
    func nextAvailable(after id: String, excluding excluded: Set<String> = []) -> String? {
        guard let position = order.firstIndex(of: id) else {
            return order.first { $0 != id && !excluded.contains($0) && isAvailable($0) && !failover.contains($0) }
                ?? order.first { $0 != id && !excluded.contains($0) && isAvailable($0) }
        }
        var fallback: String? = nil
        for offset in 1..<max(order.count, 1) {
            let candidate = order[(position + offset) % order.count]
            guard candidate != id, !excluded.contains(candidate), isAvailable(candidate) else { continue }
            if !failover.contains(candidate) { return candidate }
            if fallback == nil { fallback = candidate }
        }
        return fallback
    }

    /// Every node id other than `id`.
    func others(than id: String) -> [String] { order.filter { $0 != id } }
}

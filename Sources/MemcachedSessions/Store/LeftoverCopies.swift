import Memcached
import NIOCore
import Synchronization

/// Copies of sessions left on nodes that did not answer when they had to go: the old primary of
/// a session that moved to another node, a logout's tombstone a node never got. Each is dealt
/// with as soon as the node answers again (a loop retries every quarter second), and before this
/// instance reads that key on that node; so a logout or a move is never undone by a copy the
/// failed node kept.
///
/// Bounded: past ``limit`` entries the oldest go first (counted as
/// ``SessionStatistics/Counter/leftoversDropped``; they still expire with their TTL).
final class LeftoverCopies: Sendable {
    enum Action: Sendable, Hashable {
        /// A logout's tombstone (the session's keys must read as ended).
        case tombstone(ttlSeconds: Int)
        /// An old primary: deleted if it is not newer than `version` (a session that moved back
        /// to this node since has a newer copy there, which stays).
        case deleteUnlessNewer(version: UInt64)
        /// A backup write the node did not answer: written (in order, never over a newer copy or
        /// a tombstone) once it answers.
        /// `expiresAt`: the backup's end (milliseconds since 1970; nil: never). `primaryKey` on
        /// `primaryNode`: the session's primary copy, whose TTL says how long the session may
        /// live now (reads since slid it).
        case backup(bytes: ByteBuffer, flags: UInt32, expiresAt: Int64?, primaryKey: String, primaryNode: String)

        var isTombstone: Bool {
            if case .tombstone = self { return true }
            return false
        }
    }

    struct Entry: Sendable {
        var nodeID: String
        var key: String
        var action: Action
    }

    private struct State {
        var entries: [String: Entry] = [:]
        var order: [String] = []
    }

    private let state = Mutex(State())
    let limit: Int

    init(limit: Int = 100_000) { self.limit = limit }

    private static func slot(_ nodeID: String, _ key: String) -> String { nodeID + " " + key }

    /// Remembers a copy to deal with; returns how many older entries were dropped for room.
    @discardableResult
    func add(_ entry: Entry) -> Int {
        state.withLock { state in
            let slot = Self.slot(entry.nodeID, entry.key)
            if let waiting = state.entries[slot] {
                // A tombstone waiting there stays: no later write may take its place.
                if waiting.action.isTombstone, !entry.action.isTombstone { return 0 }
                // Nor may an older backup replace a newer one (a retry that failed again, put
                // back after a newer save's backup had been queued).
                if case .backup(_, let waitingFlags, _, _, _) = waiting.action, case .backup(_, let flags, _, _, _) = entry.action,
                    waitingFlags >= flags
                {
                    return 0
                }
            }
            if state.entries[slot] == nil { state.order.append(slot) }
            state.entries[slot] = entry
            var dropped = 0
            while state.entries.count > limit, !state.order.isEmpty {
                let oldest = state.order.removeFirst()
                if state.entries.removeValue(forKey: oldest) != nil { dropped += 1 }
            }
            return dropped
        }
    }

    /// Takes the entries for `nodeID` (all of them, or the one for `key`).
    func take(nodeID: String, key: String? = nil) -> [Entry] {
        state.withLock { state in
            if let key {
                guard let entry = state.entries.removeValue(forKey: Self.slot(nodeID, key)) else { return [] }
                state.order.removeAll { $0 == Self.slot(nodeID, key) }
                return [entry]
            }
            let taken = state.order.compactMap { slot -> Entry? in
                guard let entry = state.entries[slot], entry.nodeID == nodeID else { return nil }
                state.entries[slot] = nil
                return entry
            }
            state.order.removeAll { state.entries[$0] == nil }
            return taken
        }
    }

    /// Forgets the tombstone waiting for `key` on `nodeID`, if that is what waits there (one
    /// written meanwhile by the request that left it).
    func removeTombstone(nodeID: String, key: String) {
        state.withLock { state in
            let slot = Self.slot(nodeID, key)
            guard state.entries[slot]?.action.isTombstone == true else { return }
            state.entries[slot] = nil
            state.order.removeAll { $0 == slot }
        }
    }

    var count: Int { state.withLock { $0.entries.count } }

    /// Nodes with entries waiting.
    var nodes: Set<String> { state.withLock { Set($0.entries.values.map(\.nodeID)) } }
}

extension SessionStore {
    /// A tombstone's write: an empty value with the tombstone flags, never cancelled with the
    /// request that sends it (a logout's must land).
    func tombstoneRequest(key: String, ttl: MemcachedTTL, quiet: Bool = false) -> MemcachedRequest {
        var request = MemcachedRequest.store(key, value: ByteBuffer(), ttl: ttl, flags: Self.tombstoneFlags, quiet: quiet)
        request.honorsCancellation = false
        return request
    }

    /// Remembers a copy to deal with once `nodeID` answers again.
    func leaveForLater(_ action: LeftoverCopies.Action, key: String, on nodeID: String) {
        let dropped = leftovers.add(LeftoverCopies.Entry(nodeID: nodeID, key: key, action: action))
        if dropped > 0 { statistics.count(.leftoversDropped, dropped) }
        statistics.count(.leftoversQueued)
    }

    /// Deals with what is waiting for `nodeID` (for one key only, when given): before a read of
    /// that key there, and from the periodic loop. An entry whose node does not answer waits again.
    func cleanLeftovers(on nodeID: String, key: String? = nil) async {
        guard let node = topology.node(nodeID), node.isAvailable else { return }
        let entries = leftovers.take(nodeID: nodeID, key: key)
        for entry in entries {
            if await !clean(entry, node: node) { leaveForLater(entry.action, key: entry.key, on: nodeID) }
        }
    }

    /// One entry; false when the node did not answer.
    private func clean(_ entry: LeftoverCopies.Entry, node: any MemcachedNodeCommandRunner) async -> Bool {
        switch entry.action {
        case .tombstone(let seconds):
            let request = tombstoneRequest(key: entry.key, ttl: .seconds(seconds))
            guard case .success = await node.executeBatch([request])[0] else { return false }
            statistics.count(.leftoversCleaned)
            return true
        case .deleteUnlessNewer(let version):
            return await deleteIfStill(entry.key, on: node, value: true) { item in
                if item.flags == Self.tombstoneFlags { return false }
                guard let stored = decodeStored(item, key: entry.key, node: node) else { return true }
                // Newer: the session lives here again, and stays.
                return stored.record.metadata.version <= version
            }
        case .backup(let bytes, let flags, let expiresAt, let primaryKey, let primaryNode):
            var ttl = MemcachedTTL.never
            var secondsLeft: Int? = nil
            if let expiresAt {
                let left = Int((expiresAt - currentTimeMillis()) / 1000)
                switch await sessionEnd(primaryKey: primaryKey, on: primaryNode) {
                case .living(let byPrimary?):
                    // Never below what the session's primary allows now: a read since (here or
                    // on another instance) slid it, and touched the backup too.
                    let end = max(left, byPrimary)
                    ttl = .seconds(end)
                    secondsLeft = end
                case .living(nil):
                    break  // it never expires
                case .gone:
                    guard left > 0 else {
                        // Its session has expired by now; the write the node did not answer must
                        // not have landed late and be living on.
                        return await deleteIfStill(entry.key, on: node, value: false) { $0.flags == flags }
                    }
                    ttl = .seconds(left)
                    secondsLeft = left
                case .unknown:
                    // The primary's node does not answer: the backup is what the session has
                    // now, and is not shortened.
                    guard left > 0 else { return true }
                    ttl = .seconds(left)
                }
            }
            guard case .done = await writeBackupInOrder(key: entry.key, on: node, bytes: bytes, flags: flags, ttl: ttl, secondsLeft: secondsLeft)
            else { return false }
            statistics.count(.leftoversCleaned)
            return true
        }
    }

    /// How long a session may live by its primary copy now.
    enum SessionEnd {
        /// The primary's remaining TTL plus two refresh windows (what its backup may live), in
        /// seconds; nil: it never expires.
        case living(Int?)
        /// No primary (expired, evicted, or ended).
        case gone
        /// The primary's node did not answer.
        case unknown
    }

    /// Reads the primary's remaining TTL and flags (its idle timeout) at `primaryKey` on
    /// `nodeID`, without its value.
    func sessionEnd(primaryKey: String, on nodeID: String) async -> SessionEnd {
        guard let node = topology.node(nodeID) else { return .unknown }
        var read = MemcachedRequest.getMetadata(primaryKey)
        read.honorsCancellation = false
        switch await node.executeBatch([prepared(read)])[0] {
        case .success(.item(let item?)):
            guard item.flags != Self.tombstoneFlags else { return .gone }
            guard let ttl = item.timeToLive, ttl >= 0 else { return .living(nil) }
            return .living(ttl + 2 * Int(CopyLifetimes.refreshWindowSeconds(idle: Int64(item.flags))))
        case .success:
            return .gone
        case .failure:
            return .unknown
        }
    }

    /// Reads the copy at `key` (with its value when `value`, else its metadata only) and deletes it
    /// when `stillThere` says it is still the one to go, conditionally on its CAS unique in meta
    /// mode (text mode deletes by key). The cases: an old primary left behind by a move
    /// (`.deleteUnlessNewer`), and a backup write the node did not answer, landed late past its
    /// end. A missing copy counts as done. False when the node did not answer.
    private func deleteIfStill(
        _ key: String,
        on node: any MemcachedNodeCommandRunner,
        value: Bool,
        stillThere: (MemcachedItem) -> Bool
    ) async -> Bool {
        var read = value ? MemcachedRequest.get(key) : MemcachedRequest.getMetadata(key)
        read.honorsCancellation = false
        switch await node.executeBatch([prepared(read)])[0] {
        case .success(.item(let item?)):
            guard stillThere(item) else { return true }
            var delete = MemcachedRequest.delete(key, cas: configuration.memcached.protocolMode == .meta ? item.cas : nil)
            delete.honorsCancellation = false
            guard case .success = await node.executeBatch([prepared(delete)])[0] else { return false }
            statistics.count(.leftoversCleaned)
            return true
        case .success:
            return true
        case .failure:
            return false
        }
    }

    /// Writes a tombstone this request left for later on `nodeID` itself, each time the node
    /// answers again (the client's probe marks it up), until it lands or `deadline` passes; each
    /// attempt's timeout is the time left. Not the periodic loop's word for it: that loop takes a
    /// node's whole backlog before writing it, and a write it has taken may still fail (written
    /// twice, a tombstone is the same). Landed, the waiting entry goes; not, it stays for later.
    /// Returns whether it landed.
    @discardableResult
    func settleTombstone(key: String, seconds: Int, on nodeID: String, until deadline: NIODeadline) async -> Bool {
        while true {
            let now = clock.now()
            guard now < deadline else { return false }
            let left = deadline - now
            if topology.isReachable(nodeID), let node = topology.node(nodeID) {
                var request = tombstoneRequest(key: key, ttl: .seconds(seconds))
                request.timeout = .nanoseconds(left.nanoseconds)
                if case .success = await node.executeBatch([request])[0] {
                    // The tombstone waiting there, if the periodic loop has not taken it (only a
                    // tombstone: another entry for the key stays, uncounted twice).
                    leftovers.removeTombstone(nodeID: nodeID, key: key)
                    statistics.count(.leftoversCleaned)
                    return true
                }
                continue
            }
            do { try await clock.sleep(for: .nanoseconds(min(50_000_000, left.nanoseconds))) } catch { return false }
        }
    }

    /// Retries the leftovers of every node that answers again, four times a second. Runs in `run()`.
    func cleanLeftoversPeriodically() async {
        while !Task.isCancelled {
            do { try await clock.sleep(for: .milliseconds(250)) } catch { return }
            for nodeID in leftovers.nodes.sorted() where topology.node(nodeID)?.isAvailable == true {
                await cleanLeftovers(on: nodeID)
            }
        }
    }

    /// A session moved off `nodeID` (it did not answer): its copy there goes once it answers.
    func leaveOldPrimary(keys: SessionKeys, on nodeID: String, version: UInt64) {
        leaveForLater(.deleteUnlessNewer(version: version), key: keys.primary, on: nodeID)
    }
}

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
        /// to this node since has a newer copy there, which stays). With `merge`, when a copy newer
        /// than the one the move adopted is there, what the old placement's backup shows since goes
        /// to the session where it lives now first.
        case deleteUnlessNewer(version: UInt64, merge: StrayMerge? = nil)
        /// A backup write the node did not answer: written (in order, never over a newer copy or
        /// a tombstone) once it answers.
        /// `expiresAt`: the backup's end (milliseconds since 1970; nil: never). `primaryKey` on
        /// `primaryNode`: the session's primary copy, whose TTL says how long the session may
        /// live now (reads since slid it).
        case backup(bytes: ByteBuffer, flags: UInt32, expiresAt: Int64?, primaryKey: String, primaryNode: String)
        /// A backup touch the node did not answer: it may land late, with its whole TTL counted
        /// from its landing (a frozen node applies what it buffered when it thaws). Once the node
        /// answers, the copy it touched (its version's `flags`) is given back the end the touch
        /// meant (`expiresAt`, milliseconds since 1970), or later when the session's primary says
        /// a read slid it since. (`flags` nil: whatever version it was, not a tombstone: a slide
        /// of a session its request never opened does not know it.)
        case backupTouch(flags: UInt32?, expiresAt: Int64, primaryKey: String, primaryNode: String)
        /// A move's backup watched (``StrayMerge``): what it shows since the merge's base (and
        /// the merge's `pending` copy first) goes to the session at its new place, until the
        /// deadline. Deletes nothing; kept under its own key (``LeftoverCopies/watchKey(_:pending:)``), so
        /// that it never combines with a copy's delete.
        case watchBackup(StrayMerge)

        var isTombstone: Bool {
            if case .tombstone = self { return true }
            return false
        }
    }

    /// A move (a recovery) served the session from a backup copy on another node (`base`, the
    /// record it adopted, on `backupNode`) and wrote it to `home`. A copy on the old node newer
    /// than `base` was written after the move's search, by a request that still reached that node
    /// (the move's instance could not); what of it was acknowledged (the backup on `backupNode`
    /// moved on too) is the session's too.
    struct StrayMerge: Sendable, Hashable {
        var base: SessionRecord
        var keys: SessionKeys
        var home: String
        /// The node of the backup copy `base` was read from.
        var backupNode: String
        /// Until when the merge is tried (the move writes `home` at its request's end; a backup
        /// follows its primary's write); after it, the old copy goes as without a merge.
        var waitsForHomeUntil: NIODeadline
        /// A copy of the old placement's already read (by the move's read of its backup), whose
        /// changes since `base` are merged first (a watch's).
        var pending: SessionRecord? = nil

        /// Of two merges for one slot, the one that has merged more (the higher base): an entry
        /// taken by a pass and put back must not bring back an older base. Of two pending merges
        /// (two moves' refused merges), the one with the newer pending copy (found later, on the
        /// same line of copies).
        static func newest(_ a: StrayMerge?, _ b: StrayMerge?) -> StrayMerge? {
            guard let a, let b else { return a ?? b }
            if let pendingA = a.pending, let pendingB = b.pending, pendingA.metadata.version != pendingB.metadata.version {
                return pendingB.metadata.version > pendingA.metadata.version ? b : a
            }
            return b.base.metadata.version > a.base.metadata.version ? b : a
        }

        /// This merge with its base raised to `floor` when that is newer (what another path
        /// merged since); a `pending` copy's merge keeps its base (its change is that).
        func raised(to floor: SessionRecord?) -> StrayMerge {
            guard pending == nil, let floor, floor.metadata.version > base.metadata.version else { return self }
            var raised = self
            raised.base = floor
            return raised
        }
    }

    /// The key a watch of the backup of the session whose primary key is `primaryKey` waits
    /// under: never a memcached key (those have no spaces), so never another entry's slot. A
    /// watch with a `pending` copy (a move's merge that could not be written) has a key of its
    /// own too: two watches never fold into one (either would lose the other's change).
    static func watchKey(_ primaryKey: String, pending: Bool = false) -> String { (pending ? "merge " : "watch ") + primaryKey }

    struct Entry: Sendable {
        var nodeID: String
        var key: String
        var action: Action
    }

    private struct State {
        var entries: [String: Entry] = [:]
        var order: [String] = []
        /// Per session and new place (``floorKey(primaryKey:home:)``): the copy its merges' bases
        /// are raised to (``advanceMergeBase(primaryKey:home:to:until:)``), until a minute after
        /// the merge that last raised it to that copy (`until`).
        var floors: [String: (record: SessionRecord, until: NIODeadline)] = [:]

        /// The floor of `merge`'s session at its new place, unless its deadline has passed.
        func floor(of merge: StrayMerge, now: NIODeadline) -> SessionRecord? {
            guard let floor = floors[LeftoverCopies.floorKey(primaryKey: merge.keys.primary, home: merge.home)], floor.until > now
            else { return nil }
            return floor.record
        }

        /// Whether `merge` is a pending merge whose copy its session's floor holds already (a
        /// merge of the session's at that place wrote it first): nothing is left to merge.
        func holdsPending(_ merge: StrayMerge, now: NIODeadline) -> Bool {
            guard let pending = merge.pending, let floor = floor(of: merge, now: now) else { return false }
            return floor.metadata.version >= pending.metadata.version
        }

        /// `entry` with its merge's base raised to its session's floor.
        func raised(_ entry: Entry, now: NIODeadline) -> Entry {
            var entry = entry
            switch entry.action {
            case .deleteUnlessNewer(let version, let merge?):
                entry.action = .deleteUnlessNewer(version: version, merge: merge.raised(to: floor(of: merge, now: now)))
            case .watchBackup(let merge):
                entry.action = .watchBackup(merge.raised(to: floor(of: merge, now: now)))
            default:
                break
            }
            return entry
        }
    }

    /// A merge's floor: its session's, for its new place (a later move elsewhere is another
    /// line of copies).
    static func floorKey(primaryKey: String, home: String) -> String { primaryKey + " " + home }

    /// What `merge`'s session has merged at its new place so far, if anything is known (and its
    /// deadline has not passed).
    func floor(of merge: StrayMerge) -> SessionRecord? {
        let now = clock.now()
        return state.withLock { $0.floor(of: merge, now: now) }
    }

    /// Whether `merge` is a pending merge whose copy its session's floor (while it lasts) holds
    /// already: another merge wrote it, and nothing is left to merge.
    func holdsPending(_ merge: StrayMerge) -> Bool {
        let now = clock.now()
        return state.withLock { $0.holdsPending(merge, now: now) }
    }

    private let state = Mutex(State())
    private let clock: any SessionClock
    let limit: Int
    /// At most this many sessions' merge floors are kept (the one ending first goes).
    let floorLimit: Int

    init(limit: Int = 100_000, floorLimit: Int = 10_000, clock: any SessionClock = SystemSessionClock()) {
        self.limit = limit
        self.floorLimit = floorLimit
        self.clock = clock
    }

    private static func slot(_ nodeID: String, _ key: String) -> String { nodeID + " " + key }

    /// Remembers a copy to deal with; returns how many older entries were dropped for room.
    @discardableResult
    func add(_ entry: Entry) -> Int {
        let now = clock.now()
        return state.withLock { state in
            let entry = state.raised(entry, now: now)
            // (Dropped now, not at its first pass: the floor ends a minute after its merge, which
            // may be before this merge's deadline.)
            if case .watchBackup(let merge) = entry.action, state.holdsPending(merge, now: now) { return 0 }
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
                // A touch's end is a waiting write's to give when the write is of its version or
                // newer (it sets the copy's end itself).
                if case .backup(_, let waitingFlags, _, _, _) = waiting.action, case .backupTouch(let flags?, _, _, _) = entry.action,
                    waitingFlags >= flags
                {
                    return 0
                }
                // Two touches: the later end, for any version they name.
                if case .backupTouch(let waitingFlags, let waitingEnd, _, _) = waiting.action,
                    case .backupTouch(let flags, let end, let primaryKey, let primaryNode) = entry.action
                {
                    state.entries[slot] = Entry(
                        nodeID: entry.nodeID, key: entry.key,
                        action: .backupTouch(
                            flags: waitingFlags == flags ? flags : nil, expiresAt: max(waitingEnd, end), primaryKey: primaryKey,
                            primaryNode: primaryNode))
                    return 0
                }
                // Two moves' old copies: the higher bound, and the merge that has merged more (a
                // second recovery, from a copy it cannot merge from, must not drop the first's
                // pending merge; an entry a pass took and puts back must not undo the base an
                // advance moved on meanwhile).
                if case .deleteUnlessNewer(let waitingVersion, let waitingMerge) = waiting.action,
                    case .deleteUnlessNewer(let version, let merge) = entry.action
                {
                    var entry = entry
                    entry.action = .deleteUnlessNewer(
                        version: max(waitingVersion, version), merge: StrayMerge.newest(waitingMerge, merge))
                    state.entries[slot] = entry
                    return 0
                }
                if case .watchBackup(let waitingMerge) = waiting.action, case .watchBackup(let merge) = entry.action,
                    let newest = StrayMerge.newest(waitingMerge, merge)
                {
                    state.entries[slot] = Entry(nodeID: entry.nodeID, key: entry.key, action: .watchBackup(newest))
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
        let now = clock.now()
        return state.withLock { state in
            if let key {
                guard let entry = state.entries.removeValue(forKey: Self.slot(nodeID, key)) else { return [] }
                state.order.removeAll { $0 == Self.slot(nodeID, key) }
                return [state.raised(entry, now: now)]
            }
            let taken = state.order.compactMap { slot -> Entry? in
                guard let entry = state.entries[slot], entry.nodeID == nodeID else { return nil }
                state.entries[slot] = nil
                return state.raised(entry, now: now)
            }
            state.order.removeAll { state.entries[$0] == nil }
            return taken
        }
    }

    /// A move's merges of the old placement's backup (``StrayMerge``) for the session whose
    /// primary key is `primaryKey`, at its new place `home`: their base moves on to `record` (what
    /// one of them merged), so that it is not merged again over a later change at the new place
    /// (an attribute removed since would come back). Kept as the session's floor until `until`
    /// (the store passes a minute from this merge; raised again to the same copy, the later
    /// `until` stays; to a newer one, it replaces the floor), and applied whenever an entry is
    /// taken or added: an entry a pass holds now, put back later, is raised too. A `pending`
    /// merge is not raised; it is dropped once the floor holds its copy (``holdsPending(_:)``).
    /// Never moves back.
    /// Returns how many other sessions' floors were dropped for room (at ``floorLimit``, the one
    /// ending first goes).
    @discardableResult
    func advanceMergeBase(primaryKey: String, home: String, to record: SessionRecord, until: NIODeadline) -> Int {
        let key = Self.floorKey(primaryKey: primaryKey, home: home)
        let now = clock.now()
        return state.withLock { state in
            state.floors = state.floors.filter { $0.value.until > now }
            if let floor = state.floors[key], floor.record.metadata.version >= record.metadata.version {
                // Raised again to this copy: it lasts as long as the later says. (Not for an older
                // copy: that may be another line of the session's copies, a later move's.)
                if floor.record.metadata.version == record.metadata.version, floor.until < until {
                    state.floors[key] = (floor.record, until)
                }
                return 0
            }
            var dropped = 0
            if state.floors[key] == nil, state.floors.count >= floorLimit,
                let oldest = state.floors.min(by: { $0.value.until < $1.value.until })?.key
            {
                state.floors[oldest] = nil
                dropped = 1
            }
            state.floors[key] = (record, until)
            return dropped
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
        case .watchBackup(let merge):
            return await mergeAwaitedBackup(merge)
        case .deleteUnlessNewer(let version, let merge?):
            return await mergeStray(entry.key, on: node, upTo: version, merge)
        case .deleteUnlessNewer(let version, nil):
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
        case .backupTouch(let flags, let expiresAt, let primaryKey, let primaryNode):
            let left = Int((expiresAt - currentTimeMillis()) / 1000)
            let end: Int
            switch await sessionEnd(primaryKey: primaryKey, on: primaryNode) {
            case .living(let byPrimary?):
                end = max(left, byPrimary)  // a read since slid it (and touched the backup too)
            case .living(nil):
                statistics.count(.leftoversCleaned)
                return true  // it never expires
            case .unknown:
                // The primary's node does not answer: the backup, what the session has now, is
                // not shortened yet (tried again while its end is ahead; then given up: a slide
                // since, which would have touched the backup too, cannot be told from it).
                guard left <= 0 else { return false }
                statistics.count(.leftoversDropped)
                return true
            case .gone:
                // No primary: only a copy of the version it touched is its to end (a slide's
                // touch, which does not know it, leaves the copy alone: the session may have
                // moved, and its backup there be another placement's).
                guard let flags else { return true }
                guard left > 0 else {
                    // Its session has expired by now: the touched copy must not live on.
                    return await deleteIfStill(entry.key, on: node, value: false) { $0.flags == flags }
                }
                end = left
            }
            // Each on the key's connection, and never cancelled (it corrects a copy).
            func onKey(_ request: MemcachedRequest) -> MemcachedRequest {
                var request = request
                request.connectionAffinity = Self.affinity(of: entry.key)
                request.honorsCancellation = false
                return request
            }
            switch await node.executeBatch([onKey(.getMetadata(entry.key))])[0] {
            case .success(.item(let item?)):
                guard item.flags != Self.tombstoneFlags, flags == nil || item.flags == flags, let living = item.timeToLive,
                    living < 0 || living > end + 1
                else { break }
                guard case .success = await node.executeBatch([onKey(.touch(entry.key, ttl: .seconds(max(1, end))))])[0] else { return false }
                statistics.count(.backupTouches)
                // A read elsewhere may have slid the session (primary, then backup) meanwhile:
                // its end stands.
                if case .living(let slid?) = await sessionEnd(primaryKey: primaryKey, on: primaryNode), slid > end {
                    _ = await node.executeBatch([onKey(.touch(entry.key, ttl: .seconds(slid)))])[0]
                }
            case .success:
                break
            case .failure:
                return false
            }
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

    /// An old primary a move left (`.deleteUnlessNewer` with a merge): deleted if it is not newer
    /// than `version`, as without one; but first, until `merge.waitsForHomeUntil`, what the old
    /// placement wrote since the move's search is merged into the session's copy at its new place
    /// (the simulation, non-sticky seed 65295: an instance cut off from the node moved the session
    /// from its backup while the other instance saved a change there, which the move missed).
    ///
    /// What is merged is what the old placement's backup (the copy the move adopted, read again)
    /// shows since, not the old copy itself: a save writes its backup only once its write was
    /// acknowledged, while a write whose request failed (it may not have been saved, and a read
    /// since showed it absent) may have landed on the old node late and must not come back now
    /// (seeds 2278, 5617, 8490, 9509). An old copy newer than that backup is deleted all the same
    /// (a search must not find it), and the backup is watched until the deadline for it to catch
    /// up (``mergeAwaitedBackup(_:)``); an old copy gone (a restart, an eviction) still has its
    /// backup read. False: not done, tried again on the next pass.
    private func mergeStray(_ key: String, on node: any MemcachedNodeCommandRunner, upTo version: UInt64, _ merge: LeftoverCopies.StrayMerge) async -> Bool {
        var read = MemcachedRequest.get(key)
        read.honorsCancellation = false
        countRoundTrip()
        let item: MemcachedItem?
        switch await node.executeBatch([prepared(read)])[0] {
        case .success(.item(let found)): item = found
        case .success: item = nil
        case .failure: return false
        }
        if item?.flags == Self.tombstoneFlags { return true }
        let old = item.flatMap { decodeStored($0, key: key, node: node) }
        let baseVersion = merge.base.metadata.version
        let oldIsNewer = old.map { $0.record.metadata.version > baseVersion } ?? false
        var awaitsBackup = false
        var merge = merge
        if clock.now() < merge.waitsForHomeUntil, item == nil || oldIsNewer {
            switch await readStored(key: merge.keys.backup, on: merge.backupNode, touch: nil) {
            case .found(let backup) where backup.record.metadata.version > baseVersion:
                if let old, backup.record.metadata.version < old.record.metadata.version {
                    awaitsBackup = true
                } else {
                    guard await mergeIntoHome(backup.record, merge) else { return false }
                    // Merged: a pass again (a delete refused below), and the session's other
                    // merges, merge only what came since.
                    merge.base = backup.record
                    advanceMergeBase(keys: merge.keys, home: merge.home, to: backup.record)
                }
            case .unreachable:
                guard oldIsNewer else { return false }
                awaitsBackup = true
            default:
                // The old copy's backup may be on its way.
                awaitsBackup = oldIsNewer
            }
        }
        func watchBackup() {
            // On the new place's queue: the watch needs that node, not the old one.
            leaveForLater(.watchBackup(merge), key: LeftoverCopies.watchKey(merge.keys.primary), on: merge.home)
        }
        guard let item else { return true }
        // Newer than the bound: the session may live there again (moved back), and stays.
        if let old, old.record.metadata.version > version {
            if awaitsBackup { watchBackup() }
            return true
        }
        var delete = MemcachedRequest.delete(key, cas: configuration.memcached.protocolMode == .meta ? item.cas : nil)
        delete.honorsCancellation = false
        switch await node.executeBatch([prepared(delete)])[0] {
        case .success(.deleted(.exists)), .failure:
            // Written again since the read (a request that still reaches the node), or no
            // answer: read again, and merged, on the next pass (with the base as merged now).
            leaveForLater(.deleteUnlessNewer(version: version, merge: merge), key: key, on: node.id)
            return true
        case .success:
            statistics.count(.leftoversCleaned)
            if awaitsBackup { watchBackup() }
            return true
        }
    }

    /// A watch (``LeftoverCopies/Action/watchBackup(_:)``). An old copy newer than the backup was
    /// deleted (``mergeStray(_:on:upTo:_:)``): the backup is read until it shows a newer version
    /// (the old copy's write was acknowledged; its backup followed it), which is merged into the
    /// session's new place, or until the deadline. A move's merge that could not be written
    /// (``leaveMissedMerge(keys:home:adopted:found:)``): its `pending` copy is merged.
    private func mergeAwaitedBackup(_ merge: LeftoverCopies.StrayMerge) async -> Bool {
        guard clock.now() < merge.waitsForHomeUntil else {
            if merge.pending != nil, !leftovers.holdsPending(merge) {
                // A write the move found and could not merge: lost with the old placement. (Not
                // when the floor holds it: another merge wrote it after this one was left, and the
                // new place did not answer until now. A floor that ended meanwhile, a minute after
                // that merge, no longer tells: then the warning is logged all the same.)
                logger.warning("a change saved on a node this instance could not reach, while it moved the session elsewhere, could not be merged before the deadline")
                statistics.count(.leftoversDropped)
            }
            return true
        }
        // (What the backup shows after `pending` is the old copy's cleanup's to merge.)
        if let pending = merge.pending {
            // Merged already by another path (the old copy's cleanup, from a backup at least as
            // new): not again.
            if leftovers.holdsPending(merge) { return true }
            guard await mergeIntoHome(pending, merge) else { return false }
            advanceMergeBase(keys: merge.keys, home: merge.home, to: pending)
            return true
        }
        switch await readStored(key: merge.keys.backup, on: merge.backupNode, touch: nil) {
        case .found(let backup) where backup.record.metadata.version > merge.base.metadata.version:
            guard await mergeIntoHome(backup.record, merge) else { return false }
            advanceMergeBase(keys: merge.keys, home: merge.home, to: backup.record)
            return true
        case .tombstone:
            return true  // ended: nothing to merge
        default:
            return false
        }
    }

    /// Writes `stray`'s changes since `merge.base` (both copies of the old placement's backup)
    /// into the session's copy at `merge.home`, where that copy still holds the base's value (a
    /// change made there since stands). True when written, nothing was missing, or the session
    /// is no longer there; false to try again (until the entry's deadline).
    private func mergeIntoHome(_ stray: SessionRecord, _ merge: LeftoverCopies.StrayMerge) async -> Bool {
        let base = merge.base
        switch await readStored(key: merge.keys.primary, on: merge.home, touch: nil) {
        case .missing:
            // Not written yet (the move's request has not ended), or never (it failed), or gone
            // since (expired, evicted): waited for until the deadline.
            return false
        case .tombstone:
            return true
        case .unreachable:
            return false
        case .found(let current):
            // The copy's changes since the base, where the new place still holds the base's.
            var merged = current.record
            let changes = stray.changes(since: base)
            for (name, value) in changes.attributes where current.record.attributes[name] == base.attributes[name] {
                merged.attributes[name] = value
            }
            if let idle = changes.idleTimeoutSeconds, current.record.metadata.idleTimeoutSeconds == base.metadata.idleTimeoutSeconds {
                merged.metadata.idleTimeoutSeconds = idle
            }
            guard merged != current.record else { return true }
            let now = currentTimeMillis()
            merged.metadata.version = max(current.record.metadata.version, stray.metadata.version) &+ 1
            merged.metadata.lastAccessedAt = max(current.record.metadata.lastAccessedAt, stray.metadata.lastAccessedAt)
            let bytes: ByteBuffer
            do throws(SessionError) {
                bytes = try encode(merged, key: merge.keys.primary)
            } catch {
                // Cannot be written (grown past the item size limit): the move's copy stays.
                logger.warning(
                    "a change saved on a node this instance could not reach, while it moved the session elsewhere, could not be merged",
                    metadata: ["reason": "\(error.code)"])
                return true
            }
            switch await writeStored(
                key: merge.keys.primary, on: merge.home, bytes: bytes, ttl: Self.primaryTTL(merged.metadata, now: now),
                flags: Self.primaryFlags(merged.metadata), casUnique: current.casUnique, add: false)
            {
            case .stored:
                statistics.count(.writes)
                statistics.count(.backupForks)
                await writeBackup(keys: merge.keys, primaryNode: merge.home, bytes: bytes, metadata: merged.metadata, now: now)
                return true
            case .gone, .tooLarge:
                return true
            case .conflict, .unreachable:
                return false
            }
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

    /// A move's read of the backup it served from found a write it missed, `found`
    /// (``SessionAccess/AdoptedBackup``), and the merge of the two could not be written at
    /// `home`: the merge is left for later, as a watch with `found` pending on `home`'s queue
    /// (``mergeAwaitedBackup(_:)``): once `home` answers, `found`'s changes since the adopted
    /// copy are merged into the session there (until the deadline, a minute from now), unless
    /// another merge of the session's (the old copy's cleanup, from a backup at least as new)
    /// came first. Whichever merges first raises the base of the other merges
    /// (``LeftoverCopies/advanceMergeBase(primaryKey:home:to:until:)``): the old node may never answer
    /// again, and two merges of one change, with a change at the new place between them, would
    /// bring back what that change removed.
    func leaveMissedMerge(keys: SessionKeys, home: String, adopted: SessionAccess.AdoptedBackup, found: SessionRecord) {
        let merge = LeftoverCopies.StrayMerge(
            base: adopted.record, keys: keys, home: home, backupNode: adopted.nodeID,
            waitsForHomeUntil: clock.now() + .seconds(Self.strayMergeWaitSeconds), pending: found)
        leaveForLater(.watchBackup(merge), key: LeftoverCopies.watchKey(keys.primary, pending: true), on: home)
    }

    /// The session of `keys` merged `record` at its new place `home` (a move's own read of the
    /// backup it served from, or one of its merges since): the session's other merges there merge
    /// only what comes after it (``LeftoverCopies/advanceMergeBase(primaryKey:home:to:until:)``).
    /// A floor dropped for room is counted as a leftover dropped: a merge of that session may then
    /// merge a change twice.
    func advanceMergeBase(keys: SessionKeys, home: String, to record: SessionRecord) {
        let until = clock.now() + .seconds(Self.strayMergeWaitSeconds)
        let dropped = leftovers.advanceMergeBase(primaryKey: keys.primary, home: home, to: record, until: until)
        if dropped > 0 { statistics.count(.leftoversDropped, dropped) }
    }

    /// How long a stray copy's merge waits for the move's own write at the session's new place;
    /// also how long a merge floor lasts after the merge that last raised it.
    static let strayMergeWaitSeconds: Int64 = 60

    /// A session moved off `nodeID` (it did not answer): its copy there goes once it answers.
    /// `merging`: the move served the session from `base` (a backup copy, on `backupNode`) and
    /// wrote it to `home`; what the old placement's backup shows acknowledged since, when a newer
    /// copy is on `nodeID`, goes there first (``LeftoverCopies/StrayMerge``).
    func leaveOldPrimary(
        keys: SessionKeys, on nodeID: String, version: UInt64, merging: (home: String, base: SessionRecord, backupNode: String)? = nil
    ) {
        let until = clock.now() + .seconds(Self.strayMergeWaitSeconds)
        let merge = merging.map { home, base, backupNode in
            LeftoverCopies.StrayMerge(base: base, keys: keys, home: home, backupNode: backupNode, waitsForHomeUntil: until)
        }
        leaveForLater(.deleteUnlessNewer(version: version, merge: merge), key: keys.primary, on: nodeID)
    }
}

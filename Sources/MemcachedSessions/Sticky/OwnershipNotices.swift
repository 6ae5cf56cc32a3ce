import DequeModule
import Logging
import Memcached
import NIOCore
import Synchronization

/// Sticky mode: an instance that takes a session over tells the instance that held it (by its
/// route), which drops its copy, and its queued write, as soon as it reads the notice; an instance
/// that ends a session it took over (a logout, a login's new id) waits, before it answers, until
/// the previous owner has read the notice, so that a stale cookie still routed there is never
/// served the ended session from memory.
///
/// Notices are lines `<token digest> <nonce> <version>` (never tokens) appended to the recipient's mailbox,
/// `<prefix>n:<route>`, on every available node; each instance reads its mailbox on every node
/// four times a second, drops the sessions named, then acknowledges each line it read with an item
/// `<prefix>a:<nonce>` on that node and deletes the mailbox (CAS-checked: a notice appended
/// meanwhile stays). Each instance also keeps a heartbeat, `<prefix>h:<route>` (3 s TTL, refreshed
/// every second) on the first two available nodes: an ending waits only for a previous owner that
/// is alive (a heartbeat on some node), at most a second, for the acknowledgement on any node.
///
/// So one node that fails, or that one of the two instances cannot reach, neither loses the
/// notice nor fakes its reading (the simulation, seed 6774: the node that held the notice and the
/// heartbeat died right after the notice was posted, and the previous owner, never told, served
/// the logged-out session from memory). A mailbox that vanished (its node restarted) is not an
/// acknowledgement: only the nonce's item is.
///
/// A notice names the version of the session its sender read when it took the session over (or,
/// for an ending, the version it ends): the recipient drops only a copy it took at that version or
/// earlier. A copy it took back later (the browser returned to it meanwhile) was taken after the
/// notice was sent, and stays (the simulation, seed 3591: a notice read after such a return ended
/// the only copy in memory, and a node restart then lost the session).
///
/// An instance that could not read its notices for longer than a second (it was frozen, or cut
/// off from memcached) checks every session in its memory against memcached before serving it
/// again.
final class OwnershipNotices: Sendable {
    private let lastRead = Mutex<NIODeadline?>(nil)
    /// Per previous owner (route) that did not read a notice in time: its heartbeat then (the
    /// node and the CAS unique of a copy). While the heartbeat is the same item (not refreshed
    /// since: the owner crashed, or is frozen), further endings do not wait for it again.
    private let silentHeartbeats = Mutex<[String: Heartbeat]>([:])

    /// One copy of an instance's heartbeat.
    struct Heartbeat: Hashable {
        var nodeID: String
        var cas: UInt64
    }

    func read(at deadline: NIODeadline) { lastRead.withLock { $0 = deadline } }

    /// The nonces of the notices acted on lately: a notice is posted on every node, and its copies
    /// on the other nodes, read later, must not end a copy this instance legitimately took again
    /// meanwhile (the simulation, seed 3591). Bounded, oldest forgotten first; a notice lives at
    /// most a minute (its mailbox's TTL).
    private let seenNonces = Mutex<(set: Set<Substring>, order: Deque<Substring>)>(([], []))
    static let seenNonceLimit = 10_000

    /// Whether the notice with `nonce` is new to this instance (and remembers it).
    func isNew(nonce: Substring) -> Bool {
        seenNonces.withLock { seen in
            guard seen.set.insert(nonce).inserted else { return false }
            seen.order.append(nonce)
            if seen.order.count > Self.seenNonceLimit, let oldest = seen.order.popFirst() { seen.set.remove(oldest) }
            return true
        }
    }

    /// When notices were last read (nil: never yet).
    var lastReadAt: NIODeadline? { lastRead.withLock { $0 } }

    func markSilent(_ route: String, heartbeat: Heartbeat) {
        silentHeartbeats.withLock { $0[route] = heartbeat }
    }

    /// Whether `route` did not read a notice in time and has not refreshed its heartbeat since
    /// (the copy remembered is among `heartbeats`, unchanged). Forgets `route` when it has.
    func isSilent(_ route: String, heartbeats: [Heartbeat]) -> Bool {
        silentHeartbeats.withLock { silent in
            guard let known = silent[route] else { return false }
            if heartbeats.contains(known) { return true }
            if heartbeats.contains(where: { $0.nodeID == known.nodeID }) || heartbeats.isEmpty { silent[route] = nil }
            return false
        }
    }

    /// Whether notices may have been missed: none read within `limit`.
    func mayHaveMissed(now: NIODeadline, limit: TimeAmount) -> Bool {
        lastRead.withLock { last in last.map { now - $0 > limit } ?? false }
    }
}

/// How an ending's notice to the previous owner went.
enum NoticeHandshake: Equatable {
    /// The previous owner has read it (its acknowledgement is there): nothing of the session is
    /// queued or in flight there.
    case read
    /// The previous owner is not alive: no heartbeat on any node that answers.
    case notAlive
    /// No node took the notice: the previous owner cannot be told (nor asked whether it is alive).
    case undelivered
    /// The previous owner, alive by its heartbeat, did not read it within ``StickyLifecycle/noticeWait``
    /// (or did not read an earlier one and has not refreshed its heartbeat since).
    case timedOut
}

extension StickyLifecycle {
    static let noticeInterval = Duration.milliseconds(250)
    /// Four notice intervals: a loop of the notice reader later than this may have missed notices.
    /// Computed once: `Duration`'s multiplication and its conversion cost some 500 instructions,
    /// and every sticky request's load compares with it.
    static let noticeGapLimit = TimeAmount(noticeInterval * 4)
    /// The longest an ending waits for the previous owner to read its notice.
    static let noticeWait = Duration.seconds(1)
    /// The most notices one mailbox read acknowledges (a mailbox is a memcached item: bounded by
    /// its size, but a hostile one must not make a long batch).
    static let acknowledgementsPerRead = 1_000

    func noticeKey(_ route: String) -> String { configuration.keyPrefix + "n:" + route }
    func heartbeatKey(_ route: String) -> String { configuration.keyPrefix + "h:" + route }
    func acknowledgementKey(_ nonce: Substring) -> String { configuration.keyPrefix + "a:" + nonce }

    /// The digest part of a session's keys: what notices carry.
    func noticeDigest(_ keys: SessionKeys) -> Substring {
        keys.primary.dropFirst(configuration.keyPrefix.utf8.count + 2)
    }

    /// The digests a notice names the session by: its keys' own, and around a storage-key
    /// switch its other form too (an instance whose clock is on the other side of the switch
    /// holds it under that one, and would not know the notice was for it: it kept serving the
    /// session from memory, and its queued write landed under the key nobody reads after).
    func noticeDigests(_ keys: SessionKeys) -> [Substring] {
        let own = noticeDigest(keys)
        guard let other = context.otherKeyForm(of: keys) else { return [own] }
        return [own, noticeDigest(other)]
    }

    /// Where heartbeats live (the first two) and notices go (all of them): the available nodes in
    /// configuration order.
    var noticeNodes: [any MemcachedNodeCommandRunner] {
        topology.order.filter { topology.isAvailable($0) }.compactMap { topology.node($0) }
    }

    /// Appends a notice for the session with `keys` to `route`'s mailbox on every available node,
    /// in parallel. Returns the notice's nonce (what its acknowledgement is named by) and the
    /// number of nodes that took it.
    @discardableResult
    func postNotice(_ keys: SessionKeys, to route: String, version: UInt64) async -> (nonce: String, nodes: Int) {
        let key = noticeKey(route)
        let nonce = String(context.randomUInt64(), radix: 16)
        let line = ByteBuffer(string: noticeDigests(keys).map { $0 + " " + nonce + " " + String(version) + "\n" }.joined())
        let taken = await withTaskGroup(of: Bool.self) { group in
            for node in noticeNodes {
                group.addTask {
                    func send(_ request: MemcachedRequest) async -> Result<MemcachedResponse, MemcachedError> {
                        var request = request
                        request.honorsCancellation = false
                        return await node.executeBatch([request])[0]
                    }
                    for _ in 0..<3 {
                        switch await send(.store(key, value: line, mode: .append)) {
                        case .success(.stored(.stored)):
                            return true
                        case .success(.stored):
                            // No mailbox yet: create it (another poster may have, meanwhile: append again).
                            if case .success(.stored(.stored)) = await send(.store(key, value: line, mode: .add, ttl: .seconds(60))) {
                                return true
                            }
                        default:
                            return false  // no answer
                        }
                    }
                    return false
                }
            }
            var taken = 0
            for await took in group where took { taken += 1 }
            return taken
        }
        if taken > 0 { statistics.count(.noticesSent) }
        return (nonce, taken)
    }

    /// Ends a session this instance took over from `route`: posts the notice on every available
    /// node and waits, at most ``noticeWait``, until `route` has acknowledged it on some node
    /// (when `route` is alive: its heartbeat is on some node).
    ///
    /// Also the takeover handshake of asynchronous saving: once the previous owner has read the
    /// notice, none of its writes of the session is queued or in flight any more.
    ///
    /// A previous owner that did not read a notice in time and whose heartbeat has not been
    /// refreshed since (it crashed, and its heartbeat has not expired yet; or it is frozen) is not
    /// waited for again: after an instance crashes, each takeover of its sessions would otherwise
    /// wait a second for up to the heartbeat's 3 s TTL. It checks every copy in its memory against
    /// memcached before serving again when it missed notices for more than a second.
    @discardableResult
    func endTakenOver(_ keys: SessionKeys, from route: String, version: UInt64) async -> NoticeHandshake {
        let (nonce, posted) = await postNotice(keys, to: route, version: version)
        guard posted > 0 else { return .undelivered }
        let heartbeats = await readHeartbeats(of: route)
        // No heartbeat on any node that answers: not alive.
        guard !heartbeats.isEmpty else { return .notAlive }
        if notices.isSilent(route, heartbeats: heartbeats) {
            statistics.count(.noticeWaitsSkipped)
            return .timedOut
        }
        let acknowledgement = acknowledgementKey(Substring(nonce))
        let deadline = clock.now() + TimeAmount(Self.noticeWait)
        while clock.now() < deadline {
            if await isAcknowledged(acknowledgement) { return .read }
            do { try await clock.sleep(for: .milliseconds(50)) } catch { return .timedOut }
        }
        statistics.count(.noticesUnread)
        notices.markSilent(route, heartbeat: heartbeats[0])
        logger.notice(
            "the previous owner of a sticky session did not read its notice in time", metadata: ["route.previous": "\(route)"])
        return .timedOut
    }

    /// Whether some node that answers holds the acknowledgement (read in parallel).
    private func isAcknowledged(_ key: String) async -> Bool {
        let nodes = topology.order.filter { topology.isReachable($0) }.compactMap { topology.node($0) }
        return await withTaskGroup(of: Bool.self) { group in
            for node in nodes {
                group.addTask {
                    var read = MemcachedRequest.getMetadata(key)
                    read.honorsCancellation = false
                    if case .success(.item(.some)) = await node.executeBatch([read])[0] { return true }
                    return false
                }
            }
            for await found in group where found {
                group.cancelAll()
                return true
            }
            return false
        }
    }

    /// The copies of `route`'s heartbeat on the nodes that answer now (read in parallel).
    func readHeartbeats(of route: String) async -> [OwnershipNotices.Heartbeat] {
        let key = heartbeatKey(route)
        let nodes = topology.order.filter { topology.isReachable($0) }.compactMap { topology.node($0) }
        return await withTaskGroup(of: OwnershipNotices.Heartbeat?.self) { group in
            for node in nodes {
                group.addTask {
                    var read = MemcachedRequest.getMetadata(key)
                    read.honorsCancellation = false
                    guard case .success(.item(let item?)) = await node.executeBatch([read])[0] else { return nil }
                    return OwnershipNotices.Heartbeat(nodeID: node.id, cas: item.cas ?? 0)
                }
            }
            var found: [OwnershipNotices.Heartbeat] = []
            for await heartbeat in group { if let heartbeat { found.append(heartbeat) } }
            return found.sorted { $0.nodeID < $1.nodeID }
        }
    }

    /// Reads this instance's notices four times a second, and keeps its heartbeat. Runs in
    /// `run()` (sticky mode with a route).
    func readNoticesPeriodically() async {
        guard configuration.mode == .sticky, let route = configuration.route else { return }
        var lastLoop = clock.now()
        var beats = 0
        while !Task.isCancelled {
            // The heartbeat first, before the first sleep: an instance that serves sessions is
            // alive from its start on, or an ending elsewhere would not wait for it to read its
            // notice (the simulation, seed 1354: a logout answered while this instance, started
            // 0.1 s before, still served the session from memory).
            if beats % 4 == 0 {
                // On two nodes: one that dies does not take this instance's liveness with it.
                for node in noticeNodes.prefix(2) {
                    var beat = MemcachedRequest.store(heartbeatKey(route), value: ByteBuffer(string: "1"), ttl: .seconds(3), quiet: true)
                    beat.honorsCancellation = false
                    await node.submit(beat)
                }
            }
            beats += 1
            do { try await clock.sleep(for: Self.noticeInterval) } catch { return }
            let now = clock.now()
            if now - lastLoop > Self.noticeGapLimit {
                // This instance did not run for a while (frozen): notices may have come and gone.
                localStore.markAllStale()
                statistics.count(.noticeGaps)
            }
            lastLoop = now
            if await readNotices(route: route) { notices.read(at: now) }
        }
    }

    /// Reads and clears this instance's mailbox on every node that answers; false when none did.
    func readNotices(route: String) async -> Bool {
        let key = noticeKey(route)
        var answered = false
        // Node by node, each mailbox acted on as soon as it is read: a node slow to answer does
        // not hold back the acknowledgement of a notice read from another (the new owner waits
        // for it; the simulation, seed 9874).
        for nodeID in topology.order where topology.isReachable(nodeID) {
            guard let node = topology.node(nodeID) else { continue }
            var get = MemcachedRequest.get(key)
            get.honorsCancellation = false
            switch await node.executeBatch([get])[0] {
            case .success(.item(let item?)):
                answered = true
                // Per session digest, the highest version a new notice names (a line without one,
                // from an older release, ends any copy).
                var versions: [Substring: UInt64] = [:]
                var nonces: [Substring] = []
                // A notice may name its session in two forms (two lines, one nonce).
                var fresh: [Substring: Bool] = [:]
                for line in String(buffer: item.value).split(separator: "\n") where !line.isEmpty {
                    let parts = line.split(separator: " ")
                    if parts.count >= 2 {
                        // A copy of a notice acted on already (read on another node) is only
                        // acknowledged again.
                        let isNew: Bool
                        if let known = fresh[parts[1]] {
                            isNew = known
                        } else {
                            nonces.append(parts[1])
                            isNew = notices.isNew(nonce: parts[1])
                            fresh[parts[1]] = isNew
                        }
                        guard isNew else { continue }
                    }
                    let version = parts.count >= 3 ? UInt64(parts[2]) ?? .max : .max
                    versions[parts[0]] = max(versions[parts[0]] ?? 0, version)
                }
                var takenOver: [MemcachedSession] = []
                for session in localStore.allSessions {
                    guard let version = versions[noticeDigest(keys(of: session))], session.acquiredVersion <= version else { continue }
                    session.markTakenOver()
                    localStore.remove(session.id.token, ifSame: session)
                    statistics.count(.noticesRead)
                    takenOver.append(session)
                }
                // A write of these sessions already taken from the queue lands before the notice
                // is acknowledged: the new owner, seeing the acknowledgement, reads the copy with
                // it (the simulation, seed 1146: a queued write that landed after the takeover
                // brought back a count the browser had not seen since).
                if !takenOver.isEmpty { await writer.awaitWrites(of: takenOver) }
                var batch = nonces.prefix(Self.acknowledgementsPerRead).map { nonce in
                    MemcachedRequest.store(acknowledgementKey(nonce), value: ByteBuffer(), ttl: .seconds(60), quiet: true)
                }
                batch.append(.delete(key, cas: configuration.memcached.protocolMode == .meta ? item.cas : nil))
                for index in batch.indices { batch[index].honorsCancellation = false }
                _ = await node.executeBatch(batch)
            case .success:
                answered = true
            case .failure:
                break
            }
        }
        return answered
    }
}

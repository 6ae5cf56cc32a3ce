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
/// Notices are token digests (never tokens) appended to the recipient's mailbox key,
/// `<prefix>n:<route>`, on the first available node; each instance reads its mailbox on every
/// node four times a second and deletes what it read (CAS-checked: a notice appended meanwhile
/// stays). Each instance also keeps a heartbeat, `<prefix>h:<route>` (3 s TTL, refreshed every
/// second): an ending waits only for a previous owner that is alive, at most a second.
///
/// An instance that could not read its notices for longer than a second (it was frozen, or cut
/// off from memcached) checks every session in its memory against memcached before serving it
/// again.
final class OwnershipNotices: Sendable {
    private let lastRead = Mutex<NIODeadline?>(nil)
    /// Per previous owner (route) that did not read a notice in time: its heartbeat's CAS unique
    /// then. While the heartbeat is the same item (not refreshed since: the owner crashed, or is
    /// frozen), further endings do not wait for it again.
    private let silentHeartbeats = Mutex<[String: UInt64]>([:])

    func read(at deadline: NIODeadline) { lastRead.withLock { $0 = deadline } }

    /// When notices were last read (nil: never yet).
    var lastReadAt: NIODeadline? { lastRead.withLock { $0 } }

    func markSilent(_ route: String, heartbeat cas: UInt64) {
        silentHeartbeats.withLock { $0[route] = cas }
    }

    /// Whether `route` did not read a notice in time and has not refreshed its heartbeat since.
    /// Forgets `route` when it has.
    func isSilent(_ route: String, heartbeat cas: UInt64) -> Bool {
        silentHeartbeats.withLock { silent in
            guard let known = silent[route] else { return false }
            if known == cas { return true }
            silent[route] = nil
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
    /// The previous owner has read it: nothing of the session is queued or in flight there.
    case read
    /// The previous owner is not alive: no heartbeat on the node that took the notice.
    case notAlive
    /// No node took the notice, or the node that did stopped answering: the previous owner
    /// cannot be told (nor asked whether it is alive).
    case undelivered
    /// The previous owner, alive by its heartbeat, did not read it within ``StickyLifecycle/noticeWait``
    /// (or did not read an earlier one and has not refreshed its heartbeat since).
    case timedOut
}

extension StickyLifecycle {
    static let noticeInterval = Duration.milliseconds(250)
    /// The longest an ending waits for the previous owner to read its notice.
    static let noticeWait = Duration.seconds(1)

    func noticeKey(_ route: String) -> String { configuration.keyPrefix + "n:" + route }
    func heartbeatKey(_ route: String) -> String { configuration.keyPrefix + "h:" + route }

    /// The digest part of a session's keys: what notices carry.
    func noticeDigest(_ keys: SessionKeys) -> Substring {
        keys.primary.dropFirst(configuration.keyPrefix.utf8.count + 2)
    }

    /// Where heartbeats live, and notices go first: the first available node in configuration
    /// order (a notice that node does not take goes to the next; mailboxes are read on every node).
    var noticeNode: (any MemcachedNodeCommandRunner)? {
        noticeNodes.first
    }

    var noticeNodes: [any MemcachedNodeCommandRunner] {
        topology.order.filter { topology.isAvailable($0) }.compactMap { topology.node($0) }
    }

    /// Appends a notice for the session with `keys` to `route`'s mailbox. Returns the node it
    /// went to, nil when no node took it.
    @discardableResult
    func postNotice(_ keys: SessionKeys, to route: String) async -> (any MemcachedNodeCommandRunner)? {
        let key = noticeKey(route)
        let line = ByteBuffer(string: noticeDigest(keys) + "\n")
        nodes: for node in noticeNodes {
            func send(_ request: MemcachedRequest) async -> Result<MemcachedResponse, MemcachedError> {
                var request = request
                request.honorsCancellation = false
                return await node.executeBatch([request])[0]
            }
            for _ in 0..<3 {
                switch await send(.store(key, value: line, mode: .append)) {
                case .success(.stored(.stored)):
                    statistics.count(.noticesSent)
                    return node
                case .success(.stored):
                    // No mailbox yet: create it (another poster may have, meanwhile: append again).
                    if case .success(.stored(.stored)) = await send(.store(key, value: line, mode: .add, ttl: .seconds(60))) {
                        statistics.count(.noticesSent)
                        return node
                    }
                default:
                    continue nodes  // no answer: the next node
                }
            }
        }
        return nil
    }

    /// Ends a session this instance took over from `route`: posts the notice and waits, at most
    /// ``noticeWait``, until `route` has read it (when `route` is alive: its heartbeat is there).
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
    func endTakenOver(_ keys: SessionKeys, from route: String) async -> NoticeHandshake {
        guard let node = await postNotice(keys, to: route) else { return .undelivered }
        var heartbeat = MemcachedRequest.getMetadata(heartbeatKey(route))
        heartbeat.honorsCancellation = false
        let beat: MemcachedItem
        switch await node.executeBatch([heartbeat])[0] {
        case .success(.item(let item?)): beat = item
        case .success(.item(nil)): return .notAlive
        default: return .undelivered
        }
        if let cas = beat.cas, notices.isSilent(route, heartbeat: cas) {
            statistics.count(.noticeWaitsSkipped)
            return .timedOut
        }
        let digest = noticeDigest(keys)
        let deadline = clock.now() + TimeAmount(Self.noticeWait)
        while clock.now() < deadline {
            var read = MemcachedRequest.get(noticeKey(route))
            read.honorsCancellation = false
            guard case .success(.item(let item)) = await node.executeBatch([read])[0] else { return .timedOut }
            guard let item, String(buffer: item.value).contains(digest) else { return .read }  // read by the owner
            do { try await clock.sleep(for: .milliseconds(50)) } catch { return .timedOut }
        }
        statistics.count(.noticesUnread)
        if let cas = beat.cas { notices.markSilent(route, heartbeat: cas) }
        logger.notice(
            "the previous owner of a sticky session did not read its notice in time", metadata: ["route.previous": "\(route)"])
        return .timedOut
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
            if beats % 4 == 0, let node = noticeNode {
                var beat = MemcachedRequest.store(heartbeatKey(route), value: ByteBuffer(string: "1"), ttl: .seconds(3), quiet: true)
                beat.honorsCancellation = false
                await node.submit(beat)
            }
            beats += 1
            do { try await clock.sleep(for: Self.noticeInterval) } catch { return }
            let now = clock.now()
            if now - lastLoop > TimeAmount(Self.noticeInterval * 4) {
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
                var digests: Set<Substring> = []
                for line in String(buffer: item.value).split(separator: "\n") where !line.isEmpty { digests.insert(line) }
                var takenOver: [Session] = []
                for session in localStore.allSessions where digests.contains(noticeDigest(keys(of: session))) {
                    session.markTakenOver()
                    localStore.remove(session.id.token, ifSame: session)
                    statistics.count(.noticesRead)
                    takenOver.append(session)
                }
                // A write of these sessions already taken from the queue lands before the notice
                // goes: the new owner, seeing it gone, reads the copy with it (the simulation,
                // seed 1146: a queued write that landed after the takeover brought back a count
                // the browser had not seen since).
                if !takenOver.isEmpty { await writer.awaitWrites(of: takenOver) }
                var delete = MemcachedRequest.delete(key, cas: configuration.memcached.protocolMode == .meta ? item.cas : nil)
                delete.honorsCancellation = false
                _ = await node.executeBatch([delete])
            case .success:
                answered = true
            case .failure:
                break
            }
        }
        return answered
    }
}

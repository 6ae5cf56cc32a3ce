import Logging
import Memcached
import NIOCore

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#elseif canImport(Darwin)
    import Darwin
#endif

/// A session as read from memcached.
struct StoredSession: Sendable {
    var record: SessionRecord
    var casUnique: UInt64?
    /// The bytes as stored (copied as-is to repair a missing backup).
    var raw: ByteBuffer
}

enum StoredRead: Sendable {
    case found(StoredSession)
    /// The node answered: no such session (or it was corrupt and has been deleted).
    case missing
    /// The node holds a tombstone: the session was invalidated by a sticky instance. Unlike a
    /// plain miss (which may be a restarted node or an eviction) it must never be restored.
    case tombstone
    /// The node did not answer.
    case unreachable(MemcachedError)
}

enum StoredWrite: Sendable {
    case stored(casUnique: UInt64?)
    /// A CAS write found a newer copy, or an add found one.
    case conflict
    /// A CAS write found no copy: the session was deleted meanwhile (and must stay deleted).
    case gone
    /// The client refused the value as larger than the item size limit (nothing was sent).
    case tooLarge(MemcachedError)
    /// The node did not answer, or refused the write (a server error): not stored.
    case unreachable(MemcachedError)
}

/// What saving a session came to.
enum SaveOutcome: Sendable {
    case saved(record: SessionRecord, bytes: ByteBuffer)
    /// The stored copy was deleted meanwhile (logout): nothing was written.
    case gone
    /// Not written, for a reason the request must answer with: the session is too large, or a
    /// locked request found that its lock did not keep a concurrent change out.
    case refused(SessionError)
    /// Not stored. `afterConflict`: a concurrent write on the node came first (the node serves
    /// other requests): the session must not move off it.
    case unreachable(MemcachedError, afterConflict: Bool = false)
}

extension SessionManager {
    /// Item flags marking a tombstone (`MSXT`): an invalidated session's key.
    public static let tombstoneFlags: UInt32 = 0x4D53_5854

    /// Set for the asynchronous writer's work: its round trips are not waited for by a request.
    @TaskLocal static var isBackgroundWork = false

    /// Set while a request ends: its memcached requests complete even if the request's task is
    /// cancelled (the client went away), so that locks are released and changes saved.
    @TaskLocal static var isEnding = false

    /// Applies the cancellation rule of the current phase to a request.
    func prepared(_ request: MemcachedRequest) -> MemcachedRequest {
        guard Self.isEnding || Self.isBackgroundWork else { return request }
        var request = request
        request.honorsCancellation = false
        return request
    }

    /// Counts a memcached round trip a request waits for.
    func countRoundTrip() {
        if !Self.isBackgroundWork { statistics.count(.memcachedRoundTrips) }
    }

    /// Milliseconds since 1970 on the system clock: for what is only shown (event log, status).
    static func systemTimeMillis() -> Int64 {
        SystemSessionClock().wallMilliseconds()
    }

    /// Milliseconds since 1970 on the manager's clock: what sessions store and expire by.
    func currentTimeMillis() -> Int64 {
        clock.wallMilliseconds()
    }

    /// The memcached TTL of a session's primary copy: its idle timeout, capped by what remains of
    /// its absolute timeout; nil when the session never expires.
    ///
    /// memcached's clock ticks once a second, so an item stored with a TTL of `n` seconds lives
    /// between `n - 1` and `n` seconds: the idle part is the timeout plus one second, so that a
    /// session lives at least its idle timeout, and at most a second more.
    static func primaryTTLSeconds(_ metadata: SessionMetadata, now: Int64) -> Int64? {
        var seconds = metadata.idleTimeoutSeconds > 0 ? metadata.idleTimeoutSeconds + 1 : 0
        if let end = metadata.absoluteEndMillis {
            let (left, overflow) = end.subtractingReportingOverflow(now)
            let remaining = overflow ? SessionMetadata.maximumTimeoutSeconds : min(max(1, (left + 999) / 1000), SessionMetadata.maximumTimeoutSeconds)
            seconds = seconds > 0 ? min(seconds, remaining) : remaining
        }
        return seconds > 0 ? seconds : nil
    }

    /// The TTL a read slides a session's primary to: the default idle timeout, plus memcached's
    /// one-second tick (see ``primaryTTLSeconds(_:now:)``).
    var slideTTL: MemcachedTTL {
        defaultIdleSeconds > 0 ? .seconds(Int(defaultIdleSeconds) + 1) : .never
    }

    static func primaryTTL(_ metadata: SessionMetadata, now: Int64) -> MemcachedTTL {
        primaryTTLSeconds(metadata, now: now).map { .seconds(Int($0)) } ?? .never
    }

    /// How long a backup copy lives: the primary's TTL plus two refresh windows, so that a backup
    /// refreshed at most once per window by each instance always outlives the primary.
    func backupTTL(_ metadata: SessionMetadata, now: Int64) -> MemcachedTTL {
        backupTTLSeconds(metadata, now: now).map { .seconds(Int($0)) } ?? .never
    }

    func backupTTLSeconds(_ metadata: SessionMetadata, now: Int64) -> Int64? {
        guard let primary = Self.primaryTTLSeconds(metadata, now: now) else { return nil }
        return primary + 2 * backupRefreshWindow(metadata).components.seconds
    }

    /// How often each instance refreshes a read-only session's backup
    /// (``CopyLifetimes/refreshWindowSeconds(idle:)``).
    func backupRefreshWindow(_ metadata: SessionMetadata) -> Duration {
        .seconds(CopyLifetimes.refreshWindowSeconds(idle: metadata.idleTimeoutSeconds))
    }

    /// Reads a session from one node, optionally sliding its TTL in the same round trip. Corrupt
    /// or foreign bytes are deleted, counted and logged (without the session id), and read as a miss.
    func readStored(key: String, on nodeID: String, touch: MemcachedTTL?) async -> StoredRead {
        guard let node = topology.node(nodeID) else { return .missing }
        countRoundTrip()
        let item: MemcachedItem?
        do throws(MemcachedError) {
            let response = try await node.execute(prepared(.get(key, touch: touch)))
            guard case .item(let read) = response else {
                return .unreachable(MemcachedError(code: .protocolError, message: "unexpected reply to a get"))
            }
            item = read
        } catch {
            // Only an explicit miss means "missing"; anything else (a timeout, a refusal, a
            // cancellation) is not an answer about the session.
            return .unreachable(error)
        }
        guard let item else { return .missing }
        if item.flags == Self.tombstoneFlags { return .tombstone }
        guard let stored = decodeStored(item, key: key, node: node) else { return .missing }
        return .found(stored)
    }

    func decodeStored(_ item: MemcachedItem, key: String, node: any MemcachedNodeCommandRunner) -> StoredSession? {
        statistics.count(.bytesRead, item.value.readableBytes)
        do {
            let record = try configuration.codec.decodeSession(from: item.value)
            return StoredSession(record: record, casUnique: item.cas, raw: item.value)
        } catch {
            statistics.count(.corruptSessions)
            logger.warning(
                "undecodable session data deleted",
                metadata: ["memcached.node": "\(node.id)", "reason": "\(error.reason)", "bytes": "\(item.value.readableBytes)"])
            Task { try? await node.delete(key, quiet: true) }
            return nil
        }
    }

    /// Encodes a record, refusing sessions larger than memcached's item size limit before
    /// anything is sent (memcached drops the stored item when it refuses an oversized set).
    func encode(_ record: SessionRecord, keyLength: Int) throws(SessionError) -> ByteBuffer {
        var buffer = byteBufferAllocator.buffer(
            capacity: 64 + record.attributes.reduce(0) { $0 + $1.key.utf8.count + $1.value.readableBytes + 6 })
        do {
            try configuration.codec.encodeSession(record, into: &buffer)
        } catch {
            throw SessionError(code: .encodingFailed, message: "session could not be encoded: \(error.reason)")
        }
        if buffer.readableBytes + keyLength + 64 > configuration.memcached.itemSizeLimit {
            statistics.count(.oversizedSessions)
            throw SessionError(
                code: .sessionTooLarge,
                message:
                    "session of \(buffer.readableBytes) bytes exceeds the memcached item size limit of \(configuration.memcached.itemSizeLimit) bytes; the stored copy is unchanged"
            )
        }
        return buffer
    }

    /// One store on one node; `extra` requests (quiet lock releases) ride in the same write.
    func writeStored(
        key: String, on nodeID: String, bytes: ByteBuffer, ttl: MemcachedTTL, flags: UInt32 = 0, casUnique: UInt64?, add: Bool,
        releasing lock: HeldLock? = nil
    ) async -> StoredWrite {
        guard let node = topology.node(nodeID) else {
            return .unreachable(MemcachedError(code: .unknownNode, message: "no node \(nodeID)"))
        }
        var request = MemcachedRequest.store(
            key, value: bytes, mode: add && casUnique == nil ? .add : .set, ttl: ttl, flags: flags, cas: casUnique)
        if usesLocalLifecycle { request.timeout = configuration.timeouts.save }
        request = prepared(request)
        countRoundTrip()
        let result: Result<MemcachedResponse, MemcachedError>
        if let lock {
            let release = prepared(await lockReleaseRequest(lock))
            let results = await node.executeBatch([request, release])
            result = results[0]
            releaseAnswered(results[1], lock: lock, node: node)
        } else {
            do {
                result = .success(try await node.execute(request))
            } catch {
                result = .failure(error)
            }
        }
        switch result {
        case .success(.stored(let outcome)):
            switch outcome {
            case .stored(let cas):
                statistics.count(.bytesWritten, bytes.readableBytes)
                return .stored(casUnique: cas)
            case .exists, .notStored: return .conflict
            case .notFound: return .gone
            }
        case .success:
            return .unreachable(MemcachedError(code: .protocolError, message: "unexpected reply to a store"))
        case .failure(let error):
            if error.code == .valueTooLarge { return .tooLarge(error) }
            // Unreachable or refused (a server error such as out of memory): either way not stored.
            return .unreachable(error)
        }
    }

    /// The client flags of a primary copy: the session's idle timeout in seconds, so that a
    /// request that never opens the session can slide its TTL to the right value. (Timeouts are
    /// at most ten years, far below the tombstone's flags.)
    static func primaryFlags(_ metadata: SessionMetadata) -> UInt32 {
        UInt32(clamping: max(0, metadata.idleTimeoutSeconds))
    }

    /// Saves a session's changes to `nodeID` with CAS. On a conflict the newer stored copy is read
    /// and only this session's own changes are re-applied to it (so concurrent requests changing
    /// different attributes both survive); a copy deleted meanwhile is never brought back.
    /// Bounded: at most `maximumSaveAttempts` round trips of conflict resolution.
    ///
    /// `restoreIfMissing` (sticky mode, where memory is authoritative): a copy missing from memcached
    /// was lost by the node (a restart, an eviction), not deleted (deletions leave a tombstone), so
    /// it is written again instead of being given up.
    func save(
        _ session: Session, keys: SessionKeys, on nodeID: String, releasing lock: HeldLock? = nil, forceAdd: Bool = false,
        restoreIfMissing: Bool = false
    ) async -> SaveOutcome {
        let now = currentTimeMillis()
        let snapshot = session.snapshotForSave(now: now)
        var record = snapshot.record
        // A write to a new place (relocation, regenerated id) adds: it never overwrites a copy
        // another request put there meanwhile, and the CAS of the old place means nothing there.
        let forceAdd = forceAdd || snapshot.moved
        var casUnique = forceAdd ? nil : snapshot.casUnique
        var add = snapshot.isNew || forceAdd || casUnique == nil
        let start = NIODeadline.now()
        defer { statistics.time(.write, since: start) }
        var restoreChecked = false
        /// Whether a copy found missing may be written again: always in sticky mode (memory is
        /// authoritative), once per save in non-sticky mode when no tombstone says it ended.
        func mayRewriteLostCopy() async -> Bool {
            if restoreIfMissing {
                // Sticky: memory is authoritative, unless some node says the session ended (its
                // own node may have lost the logout's tombstone in a restart).
                return await !endedOnSomeNode(keys)
            }
            guard !restoreChecked else { return false }
            restoreChecked = true
            return await lostCopyMayBeRewritten(keys: keys, nodeID: nodeID)
        }
        var lock = lock
        var sawConflict = false
        for _ in 0..<Self.maximumSaveAttempts {
            let bytes: ByteBuffer
            do {
                bytes = try encode(record, keyLength: keys.primary.utf8.count)
            } catch {
                return .refused(error)
            }
            let result = await writeStored(
                key: keys.primary, on: nodeID, bytes: bytes, ttl: Self.primaryTTL(record.metadata, now: now),
                flags: Self.primaryFlags(record.metadata), casUnique: casUnique, add: add, releasing: lock)
            switch result {
            case .stored(let newCas):
                if let lock { releasedLock(lock) }
                session.markSaved(snapshot, saved: record, casUnique: newCas)
                statistics.count(.writes)
                return .saved(record: record, bytes: bytes)
            case .gone:
                if await mayRewriteLostCopy() {
                    casUnique = nil
                    add = true
                    continue
                }
                if let lock { releasedLock(lock) }
                return .gone
            case .tooLarge(let error):
                statistics.count(.oversizedSessions)
                return .refused(SessionError(code: .sessionTooLarge, message: "\(error.message); the stored copy is unchanged"))
            case .unreachable(let error):
                statistics.count(.writeFailures)
                return .unreachable(error, afterConflict: sawConflict)
            case .conflict:
                statistics.count(.writeConflicts)
                sawConflict = true
                if let held = lock {
                    // The release rode with the failed write: the lock is free now, and the merge
                    // must not run without it (a locked request could slip in between and both
                    // would save changes made from the same copy). Take it again, with the read.
                    releasedLock(held)
                    lock = nil
                    let relocked: (HeldLock?, StoredRead)
                    do {
                        relocked = try await lockAndRead(keys: keys, nodeID: nodeID, touch: nil)
                    } catch {
                        return .refused(error)
                    }
                    lock = relocked.0
                    if let newLock = lock {
                        switch relocked.1 {
                        case .found(let stored):
                            // While this request held its lock, only a write its lock does not
                            // cover (an unlocked request) could change the copy: exactly one
                            // version on. More means a locked request wrote after the release,
                            // from a copy without this request's changes: merging would lose its
                            // changes or ours.
                            guard stored.record.metadata.version == snapshot.record.metadata.version else {
                                await release(newLock)
                                statistics.count(.lockConflicts)
                                return .refused(Self.lockConflictError)
                            }
                            record = Session.merge(snapshot, onto: stored.record, now: now)
                            casUnique = stored.casUnique
                            add = false
                            continue
                        case .missing:
                            // Vanished since the conflict: an add found a copy that is gone now,
                            // or the copy was lost (a restart, an eviction).
                            let rewrite = add ? true : await mayRewriteLostCopy()
                            if rewrite {
                                casUnique = nil
                                add = true
                                continue
                            }
                            await release(newLock)
                            return .gone
                        case .tombstone:
                            await release(newLock)
                            return .gone
                        case .unreachable(let error):
                            await release(newLock)
                            statistics.count(.writeFailures)
                            return .unreachable(error, afterConflict: true)
                        }
                    }
                    // No lock: the failure policy let the request proceed without it.
                }
                switch await readStored(key: keys.primary, on: nodeID, touch: nil) {
                case .found(let stored):
                    record = Session.merge(snapshot, onto: stored.record, now: now)
                    casUnique = stored.casUnique
                    add = false
                case .missing:
                    // An add found a copy that vanished since, or a copy was lost: write it again.
                    if add {
                        casUnique = nil
                        add = true
                        continue
                    }
                    if await mayRewriteLostCopy() {
                        casUnique = nil
                        add = true
                        continue
                    }
                    if let lock { releasedLock(lock) }
                    return .gone
                case .tombstone:
                    if let lock { releasedLock(lock) }
                    return .gone
                case .unreachable(let error):
                    statistics.count(.writeFailures)
                    return .unreachable(error, afterConflict: true)
                }
            }
        }
        statistics.count(.writeFailures)
        return .unreachable(MemcachedError(code: .timeout, message: "session write lost the CAS race \(Self.maximumSaveAttempts) times"))
    }

    static let maximumSaveAttempts = 8

    /// A locked request whose lock did not keep out a concurrent change of the same session (it
    /// expired, or was freed by a failed write): its changes are not saved, so no change is lost
    /// silently; the browser may retry.
    static let lockConflictError = SessionError(
        code: .lockUnavailable,
        message: "the session was changed by another request while this request's lock was not held; its changes were not saved")

    /// Non-sticky: a write found the session's copy missing. Ends leave tombstones (a logout, an
    /// expiry, `msm session delete`, a login's old id: on the primary and backup keys of every
    /// node), so a missing copy was lost, not ended: evicted, or its node restarted while the
    /// request ran. Unless some node holds a tombstone for it (the primary's own may have been
    /// evicted too), the request, which holds the whole session, writes it again.
    func lostCopyMayBeRewritten(keys: SessionKeys, nodeID: String) async -> Bool {
        guard !usesLocalLifecycle else { return false }
        return await !endedOnSomeNode(keys)
    }

    /// Whether some node that answers holds a tombstone for the session (a logout, a login's old
    /// id, `msm session delete`: they leave one on every node).
    func endedOnSomeNode(_ keys: SessionKeys) async -> Bool {
        await searchCopies(keys: keys, on: topology.order.filter { topology.isReachable($0) }).tombstone
    }

    /// A stable connection choice for a key (its last bytes are hex digest characters).
    static func affinity(of key: String) -> Int {
        var hash = 0
        for byte in key.utf8.suffix(4) { hash = hash &* 31 &+ Int(byte) }
        return hash
    }

    /// The client flags of a backup copy: the session's version (below the tombstone's flags), so
    /// that a backup write can tell an older copy from a newer one without reading its value.
    static func backupFlags(_ metadata: SessionMetadata) -> UInt32 {
        UInt32(min(metadata.version, UInt64(tombstoneFlags) - 1))
    }

    /// Writes the backup copy and waits for it, before the response: a primary that loses its
    /// data right after the write (restarted empty, an eviction) must find the acknowledged change
    /// in the backup. A backup node that does not answer gets the write when it answers again;
    /// the response does not wait for that (the primary has the change: one fault at a time).
    ///
    /// A backup never goes back: saves of one session by different instances send their backups
    /// over different connections, and a slow one may land after a newer one (the newer backup
    /// would then be lost to a failover of the primary). In meta mode the write reads the backup's
    /// flags (its version) and CAS unique first, writes only over an older copy, with CAS, and
    /// never over a tombstone; text mode, which cannot read flags without the value, writes as is
    /// (documented).
    func writeBackup(keys: SessionKeys, primaryNode: String, bytes: ByteBuffer, metadata: SessionMetadata, now: Int64) async {
        guard let backupNode = topology.nextAvailable(after: primaryNode), let node = topology.node(backupNode) else { return }
        let ttl = backupTTL(metadata, now: now)
        backupMemo.record(keys.backup, node: backupNode)
        statistics.count(.backupWrites)
        guard configuration.memcached.protocolMode == .meta else {
            countRoundTrip()
            var request = MemcachedRequest.store(keys.backup, value: bytes, ttl: ttl)
            // One connection per session's backups: two saves' backups of one instance cannot
            // overtake each other.
            request.connectionAffinity = Self.affinity(of: keys.backup)
            request.honorsCancellation = false
            if case .failure = await node.executeBatch([prepared(request)])[0] { statistics.count(.backupFailures) }
            return
        }
        let flags = Self.backupFlags(metadata)
        // The backup's end in wall time: a write retried later keeps it (a backup lives as long
        // as its session may, never longer: the idle-expiry check relies on it).
        let expiresAt = backupTTLSeconds(metadata, now: now).map { now + $0 * 1000 }
        if await !writeBackupInOrder(key: keys.backup, on: node, bytes: bytes, flags: flags, ttl: ttl) {
            // Written once the node answers again (a frozen backup node must not leave the
            // session with an old backup only).
            leaveForLater(.backup(bytes: bytes, flags: flags, expiresAt: expiresAt), key: keys.backup, on: backupNode)
        }
    }

    /// The ordered backup write of ``writeBackup(keys:primaryNode:bytes:metadata:now:)``: at most
    /// four rounds of read and conditional write, each bounded by the request timeout. Returns
    /// false when the node did not answer (the write is to be tried again).
    func writeBackupInOrder(
        key: String, on node: any MemcachedNodeCommandRunner, bytes: ByteBuffer, flags: UInt32, ttl: MemcachedTTL
    ) async -> Bool {
        let affinity = Self.affinity(of: key)
        func send(_ request: MemcachedRequest) async -> Result<MemcachedResponse, MemcachedError> {
            var request = request
            request.honorsCancellation = false
            request.connectionAffinity = affinity
            countRoundTrip()
            return await node.executeBatch([request])[0]
        }
        /// A failed round: counted; false (try again later) when the node did not answer, true
        /// when it refused (a retry would be refused too).
        func failed(_ result: Result<MemcachedResponse, MemcachedError>) -> Bool {
            statistics.count(.backupFailures)
            guard case .failure(let error) = result, error.meansNodeUnreachable else { return true }
            backupMemo.forget(key)
            return false
        }
        for _ in 0..<4 {
            let write: MemcachedRequest
            let read = await send(.getMetadata(key))
            switch read {
            case .success(.item(nil)):
                write = .store(key, value: bytes, mode: .add, ttl: ttl, flags: flags)
            case .success(.item(let item?)):
                // Ended (a logout's tombstone), or as new already: nothing to do.
                if item.flags == Self.tombstoneFlags || item.flags >= flags {
                    statistics.count(.backupsOutdated)
                    return true
                }
                write = .store(key, value: bytes, mode: .set, ttl: ttl, flags: flags, cas: item.cas)
            default:
                return failed(read)
            }
            let result = await send(write)
            switch result {
            case .success(.stored(.stored)):
                return true
            case .success(.stored):
                continue  // changed between the read and the write: look again
            default:
                return failed(result)
            }
        }
        statistics.count(.backupFailures)
        return true
    }
}

import Logging
import Memcached
import NIOCore
import Synchronization

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
    /// Written: `record`, as `bytes`. `written` says what the write was (for a merge onto a fork
    /// its backup write meets: ``SessionStore/ForkedCopy``).
    case saved(record: SessionRecord, bytes: ByteBuffer, written: SessionStore.SavedWrite)
    /// The stored copy was deleted meanwhile (logout): nothing was written.
    case gone
    /// Not written, for a reason the request must answer with: the session is too large, or a
    /// locked request found that its lock did not keep a concurrent change out.
    case refused(SessionError)
    /// Not stored. `afterConflict`: a concurrent write on the node came first (the node serves
    /// other requests): the session must not move off it.
    case unreachable(MemcachedError, afterConflict: Bool = false)
    /// Not stored: a concurrent request moved the session to this node meanwhile (non-sticky);
    /// the changes go there.
    case moved(to: String)
    /// Stored, but the request's lock was no longer its own when the write was applied (evicted,
    /// or expired and taken): a locked request that read the copy before the write may merge its
    /// changes over it. Never acknowledged as saved.
    case unguarded
}

/// The sessions' copies in memcached, above the command-level seam (``MemcachedNodeSet``): reads
/// and CAS writes with the merge of concurrent changes, backups in order, tombstones (a logout's
/// end on every node), copies left for nodes that did not answer, the search for the newest copy,
/// and the watch of node restarts. Both lifecycles keep their sessions' copies through it.
final class SessionStore: SessionManagerPart {
    let context: SessionContext
    /// The locks a locked request's writes go under (a merge takes the lock again).
    let locks: SessionLocks
    /// Non-sticky: every session has a backup copy on the next node. Sticky: the primary only
    /// (this instance's memory is the other copy), and writes bounded by the save timeout.
    let keepsBackups: Bool
    let backupMemo: BackupMemo
    let leftovers: LeftoverCopies
    let nodeRestarts = NodeRestarts()
    let byteBufferAllocator = ByteBufferAllocator()
    /// This instance's sentinel item on nodes that cannot tell their restarts (``observeBySentinel(_:node:)``).
    let sentinelKey: String
    /// Told of each node restart (sticky: the sessions held in memory are written back there).
    private let restartListener = Mutex<(@Sendable (String) async -> Void)?>(nil)

    init(context: SessionContext, locks: SessionLocks) {
        self.context = context
        self.locks = locks
        self.keepsBackups = context.configuration.mode == .nonSticky
        self.sentinelKey = context.configuration.keyPrefix + "w:" + context.randomToken().description.lowercased()
        self.backupMemo = BackupMemo(limit: max(context.configuration.sticky.localSessionLimit, 10_000), clock: context.clock)
        self.leftovers = LeftoverCopies(clock: context.clock)
    }

    /// The store's background work: the watch of node restarts, and the copies left for nodes
    /// that did not answer, dealt with once they answer again.
    func run() async {
        await withDiscardingTaskGroup { background in
            background.addTask { await self.watchNodeRestartsPeriodically() }
            background.addTask { await self.cleanLeftoversPeriodically() }
        }
    }

    /// Sets what runs when a node is seen to have restarted (once per restart).
    func onNodeRestart(_ listener: @escaping @Sendable (String) async -> Void) {
        restartListener.withLock { $0 = listener }
    }

    func nodeRestarted(_ nodeID: String) async {
        backupMemo.forgetWrites(on: nodeID)
        guard let listener = restartListener.withLock({ $0 }) else { return }
        await listener(nodeID)
    }

    /// The TTL a read slides a session's primary to: the default idle timeout, plus memcached's
    /// one-second tick (see ``primaryTTLSeconds(_:now:)``).
    var slideTTL: MemcachedTTL {
        defaultIdleSeconds > 0 ? .seconds(Int(defaultIdleSeconds) + 1) : .never
    }

    /// How long a tombstone of a session whose own idle timeout is `sessionIdle` (nil: not known)
    /// stays.
    func tombstoneTTL(sessionIdle: Int64?) -> MemcachedTTL {
        .seconds(Int(CopyLifetimes.tombstoneSeconds(defaultIdle: defaultIdleSeconds, sessionIdle: sessionIdle)))
    }

    // MARK: - TTLs and flags of the stored copies

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

    static func primaryTTL(_ metadata: SessionMetadata, now: Int64) -> MemcachedTTL {
        primaryTTLSeconds(metadata, now: now).map { .seconds(Int($0)) } ?? .never
    }

    /// How long a backup copy lives: the primary's TTL plus two refresh windows, so that a backup
    /// refreshed at most once per window by each instance always outlives the primary.
    static func backupTTL(_ metadata: SessionMetadata, now: Int64) -> MemcachedTTL {
        backupTTLSeconds(metadata, now: now).map { .seconds(Int($0)) } ?? .never
    }

    static func backupTTLSeconds(_ metadata: SessionMetadata, now: Int64) -> Int64? {
        guard let primary = primaryTTLSeconds(metadata, now: now) else { return nil }
        return primary + 2 * backupRefreshWindow(metadata).components.seconds
    }

    /// When a backup written or touched at `now` ends, in milliseconds of wall time (nil: never).
    static func backupExpiresAt(_ metadata: SessionMetadata, now: Int64) -> Int64? {
        backupTTLSeconds(metadata, now: now).map { now + $0 * 1000 }
    }

    /// How often each instance refreshes a read-only session's backup
    /// (``CopyLifetimes/refreshWindowSeconds(idle:)``).
    static func backupRefreshWindow(_ metadata: SessionMetadata) -> Duration {
        .seconds(CopyLifetimes.refreshWindowSeconds(idle: metadata.idleTimeoutSeconds))
    }

    /// The client flags of a primary copy: the session's idle timeout in seconds, so that a
    /// request that never opens the session can slide its TTL to the right value. (Timeouts are
    /// at most ten years, far below the tombstone's flags.)
    static func primaryFlags(_ metadata: SessionMetadata) -> UInt32 {
        UInt32(clamping: max(0, metadata.idleTimeoutSeconds))
    }

    /// The client flags of a backup copy: the session's version (below the tombstone's flags), so
    /// that a backup write can tell an older copy from a newer one without reading its value.
    static func backupFlags(_ metadata: SessionMetadata) -> UInt32 {
        UInt32(min(metadata.version, UInt64(tombstoneFlags) - 1))
    }

    /// Item flags marking a tombstone (``SessionManager/tombstoneFlags``).
    static var tombstoneFlags: UInt32 { SessionManager.tombstoneFlags }

    /// A stable connection choice for a key (its last bytes are hex digest characters).
    static func affinity(of key: String) -> Int {
        var hash = 0
        for byte in key.utf8.suffix(4) { hash = hash &* 31 &+ Int(byte) }
        return hash
    }

    // MARK: - reads and writes

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

    /// A read's miss under its keyed `keys` in a storage-key transition's window
    /// (``SessionContext/unkeyedKeys(for:)``): a session found only under its `earlier` (SHA-256)
    /// keys on the same node moves, written under the keyed key with an add (a concurrent move or
    /// write wins, and its copy is read), its backup too, and its earlier copies are ended with
    /// tombstones on every node. Fail closed: an earlier copy whose end did not land reads as
    /// missing as long as the keyed copy exists, and as ended once the tombstone lands; it never
    /// comes back over a newer copy.
    func moveUnkeyedCopy(from earlier: SessionKeys, to keys: SessionKeys, on nodeID: String, touch: MemcachedTTL?) async -> StoredRead {
        let found = await readStored(key: earlier.primary, on: nodeID, touch: nil)
        // A tombstone there ends the session as it would under the keyed key.
        guard case .found(let stored) = found else { return found }
        let now = currentTimeMillis()
        let metadata = stored.record.metadata
        let bytes: ByteBuffer
        do {
            bytes = try encode(stored.record, key: keys.primary)
        } catch {
            return .missing
        }
        switch await writeStored(
            key: keys.primary, on: nodeID, bytes: bytes, ttl: Self.primaryTTL(metadata, now: now), flags: Self.primaryFlags(metadata),
            casUnique: nil, add: true)
        {
        case .stored(let cas):
            statistics.count(.sessionsMovedToKeyedKeys)
            if keepsBackups { await writeBackup(keys: keys, primaryNode: nodeID, bytes: bytes, metadata: metadata, now: now) }
            await deleteCopies(keys: earlier, nodeID: nodeID, lock: nil, wait: false, sessionIdle: metadata.idleTimeoutSeconds)
            return .found(StoredSession(record: stored.record, casUnique: cas, raw: bytes))
        case .conflict:
            // Moved (or written) by a concurrent request meanwhile: that copy is the session.
            return await readStored(key: keys.primary, on: nodeID, touch: touch)
        case .unreachable(let error), .tooLarge(let error):
            return .unreachable(error)
        case .gone:
            return .missing
        }
    }

    /// What a read under `keys` becomes in a storage-key transition: under keyed keys in the
    /// window, a miss looks for the unkeyed copy and moves it (``moveUnkeyedCopy(from:to:on:touch:)``);
    /// under unkeyed keys just before the switch, an ended or missing copy looks ahead at the keyed
    /// key (``lookAhead(keys:read:keyed:on:touch:)``). Outside a transition, the read as it is.
    func followingKeyTransition(
        keys: SessionKeys, read: StoredRead, token: MemcachedSessionID.Token, on nodeID: String, touch: MemcachedTTL?
    ) async -> (SessionKeys, StoredRead) {
        if case .missing = read, keys.isKeyed, let earlier = context.unkeyedKeys(for: token) {
            return (keys, await moveUnkeyedCopy(from: earlier, to: keys, on: nodeID, touch: touch))
        }
        if !keys.isKeyed, let keyed = context.keyedKeysBeforeSwitch(for: token) {
            return await lookAhead(keys: keys, read: read, keyed: keyed, on: nodeID, touch: touch)
        }
        return (keys, read)
    }

    /// Just before a storage-key switch (``SessionContext/keyedKeysBeforeSwitch(for:)``): an
    /// unkeyed read that found the session ended or missing looks at its keyed key, where an
    /// instance whose clock is ahead may have moved it; found there, the request goes on under the
    /// keyed keys.
    func lookAhead(
        keys: SessionKeys, read: StoredRead, keyed: SessionKeys, on nodeID: String, touch: MemcachedTTL?
    ) async -> (SessionKeys, StoredRead) {
        switch read {
        case .missing, .tombstone:
            let ahead = await readStored(key: keyed.primary, on: nodeID, touch: touch)
            if case .found = ahead { return (keyed, ahead) }
            return (keys, read)
        case .found, .unreachable:
            return (keys, read)
        }
    }

    /// Encodes a record for the session stored at `key` (sealed when sealing keys are set),
    /// refusing sessions larger than memcached's item size limit before anything is sent
    /// (memcached drops the stored item when it refuses an oversized set).
    func encode(_ record: SessionRecord, key: String) throws(SessionError) -> ByteBuffer {
        var buffer = byteBufferAllocator.buffer(
            capacity: 64 + record.attributes.reduce(0) { $0 + $1.key.utf8.count + $1.value.readableBytes + 6 })
        do {
            try configuration.codec.encodeSession(record, into: &buffer)
        } catch {
            throw SessionError(code: .encodingFailed, message: "session could not be encoded: \(error.reason)")
        }
        if let sealer = context.sealer, !configuration.sealing.writesUnsealed {
            buffer = try sealer.seal(buffer, forKey: key, allocator: byteBufferAllocator)
        }
        if buffer.readableBytes + key.utf8.count + 64 > configuration.memcached.itemSizeLimit {
            statistics.count(.oversizedSessions)
            throw SessionError(
                code: .sessionTooLarge,
                message:
                    "session of \(buffer.readableBytes) bytes exceeds the memcached item size limit of \(configuration.memcached.itemSizeLimit) bytes; the stored copy is unchanged"
            )
        }
        return buffer
    }

    /// Whether a copy just read should be sealed again although unchanged: sealed with an older
    /// key of the ring, or (in a rolling upgrade's window) not sealed.
    func needsReseal(_ raw: ByteBuffer) -> Bool {
        guard let sealer = context.sealer, !configuration.sealing.writesUnsealed else { return false }
        return SessionSealer.keyID(of: raw) != sealer.ring.current.id || SessionSealer.version(of: raw) != SessionSealer.formatVersion
    }

    /// Seals an unchanged session again with the current key (one version up, so that its backup
    /// is written too): a CAS write over the copy read, so that any write since wins and this one
    /// is dropped. Rotation thus reaches sessions that are only read. With the request's lock on
    /// the same node, the write goes in one batch before the lock's release (no other locked
    /// request can read the session between them, and the request waits for the release anyway);
    /// without, the request does not wait for it.
    func reseal(
        _ record: SessionRecord, casUnique: UInt64?, keys: SessionKeys, nodeID: String, now: Int64, releasing lock: HeldLock?
    ) async {
        var record = record
        record.metadata.version &+= 1
        guard let casUnique, let node = topology.node(nodeID), let bytes = try? encode(record, key: keys.primary) else {
            if let lock { await locks.release(lock) }
            return
        }
        var request = MemcachedRequest.store(
            keys.primary, value: bytes, mode: .set, ttl: Self.primaryTTL(record.metadata, now: now),
            flags: Self.primaryFlags(record.metadata), cas: casUnique)
        request.honorsCancellation = false
        statistics.count(.sessionsResealed)
        let metadata = record.metadata
        @Sendable func stored(_ result: Result<MemcachedResponse, MemcachedError>) async {
            guard case .success(.stored(.stored)) = result else { return }
            await self.writeBackup(keys: keys, primaryNode: nodeID, bytes: bytes, metadata: metadata, now: now)
        }
        if let lock, lock.nodeID == nodeID {
            let results = await node.executeBatch([request, prepared(await locks.releaseRequest(lock))])
            locks.releaseAnswered(results[1], lock: lock, node: node)
            let result = results[0]
            Task { await stored(result) }
        } else if let lock {
            // The lock is on another node (the session moved since its lock was taken): the write
            // lands before the release, so no locked request reads the older key's copy.
            let result = await node.executeBatch([request])[0]
            await locks.release(lock)
            Task { await stored(result) }
        } else {
            Task { await stored(await node.executeBatch([request])[0]) }
        }
    }

    /// One store on one node.
    func writeStored(
        key: String, on nodeID: String, bytes: ByteBuffer, ttl: MemcachedTTL, flags: UInt32 = 0, casUnique: UInt64?, add: Bool
    ) async -> StoredWrite {
        await writeStored(key: key, on: nodeID, bytes: bytes, ttl: ttl, flags: flags, casUnique: casUnique, add: add, releasing: nil).write
    }

    /// One store on one node, with `lock`'s release (when given) riding in the same write.
    /// `lockHeld`: whether the release showed the lock still this request's when the write was
    /// applied (``SessionLocks/releaseConfirmsHold(_:lock:node:)``); true without a lock.
    func writeStored(
        key: String, on nodeID: String, bytes: ByteBuffer, ttl: MemcachedTTL, flags: UInt32 = 0, casUnique: UInt64?, add: Bool,
        releasing lock: HeldLock?
    ) async -> (write: StoredWrite, lockHeld: Bool) {
        guard let node = topology.node(nodeID) else {
            return (.unreachable(MemcachedError(code: .unknownNode, message: "no node \(nodeID)")), lock == nil)
        }
        var request = MemcachedRequest.store(
            key, value: bytes, mode: add && casUnique == nil ? .add : .set, ttl: ttl, flags: flags, cas: casUnique)
        if !keepsBackups { request.timeout = configuration.timeouts.save }
        request = prepared(request)
        countRoundTrip()
        let result: Result<MemcachedResponse, MemcachedError>
        var lockHeld = true
        if let lock {
            let release = prepared(await locks.releaseRequest(lock))
            let results = await node.executeBatch([request, release])
            result = results[0]
            lockHeld = await locks.releaseConfirmsHold(results[1], lock: lock, node: node)
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
                return (.stored(casUnique: cas), lockHeld)
            case .exists, .notStored: return (.conflict, lockHeld)
            case .notFound: return (.gone, lockHeld)
            }
        case .success:
            return (.unreachable(MemcachedError(code: .protocolError, message: "unexpected reply to a store")), lockHeld)
        case .failure(let error):
            if error.code == .valueTooLarge { return (.tooLarge(error), lockHeld) }
            // Unreachable or refused (a server error such as out of memory): either way not stored.
            return (.unreachable(error), lockHeld)
        }
    }

    /// Saves a session's changes to `nodeID` with CAS. On a conflict the newer stored copy is read
    /// and only this session's own changes are re-applied to it (so concurrent requests changing
    /// different attributes both survive); a copy deleted meanwhile is never brought back.
    /// Bounded: at most `maximumSaveAttempts` round trips of conflict resolution.
    ///
    /// `restoreIfMissing` (sticky mode, where memory is authoritative): a copy missing from memcached
    /// was lost by the node (a restart, an eviction), not deleted (deletions leave a tombstone), so
    /// it is written again instead of being given up.
    ///
    /// Non-sticky, a copy found lost is written again merged onto a copy newer than the last one
    /// this request read, if the search finds one (a concurrent request's backup); after a
    /// conflict with a copy it never read and no newer copy found, the write is refused
    /// (`newerCopyLostError`) rather than written over that copy's changes.
    ///
    /// `ontoFork`: a save's backup write met a fork (another copy of the version it wrote). The
    /// primary is read first (the save's own CAS unique may be from before a restart, which
    /// counts them from the start again), and the fork's three-way merge
    /// (``MemcachedSession/merge(_:saved:fork:onto:now:)``) is written over it with CAS, and
    /// over whatever a conflict, or a search after a loss, finds.
    func save(
        _ session: MemcachedSession, keys: SessionKeys, on nodeID: String, releasing lock: HeldLock? = nil, forceAdd: Bool = false,
        restoreIfMissing: Bool = false, ontoFork fork: ForkedCopy? = nil
    ) async -> SaveOutcome {
        let now = currentTimeMillis()
        let snapshot = fork?.written.snapshot ?? session.snapshotForSave(now: now)
        var record = snapshot.record
        // A write to a new place (relocation, regenerated id) adds: it never overwrites a copy
        // another request put there meanwhile, and the CAS of the old place means nothing there.
        let forceAdd = fork == nil && (forceAdd || snapshot.moved)
        var casUnique = forceAdd ? nil : snapshot.casUnique
        var add = snapshot.isNew || forceAdd || casUnique == nil
        /// This request's changes merged onto a newer stored copy (a conflict's).
        func merged(onto stored: SessionRecord) -> SessionRecord {
            guard let fork else { return MemcachedSession.merge(snapshot, onto: stored, now: now) }
            return MemcachedSession.merge(snapshot, saved: fork.written.record, fork: fork.copy.record, onto: stored, now: now)
        }
        let start = NIODeadline.now()
        defer { statistics.time(.write, since: start) }
        var restoreChecked = false
        /// What a copy found missing means: written again always in sticky mode (memory is
        /// authoritative), once per save in non-sticky mode (onto a newer copy the search finds,
        /// if any), unless a tombstone says it ended or (non-sticky) a concurrent request moved it
        /// to another node.
        func lostCopy() async -> LostCopy {
            if restoreIfMissing {
                // Sticky: memory is authoritative, unless some node says the session ended (its
                // own node may have lost the logout's tombstone in a restart).
                return await endedOnSomeNode(keys) ? .ended : .rewrite(onto: nil)
            }
            guard !restoreChecked else { return .ended }
            restoreChecked = true
            // (`record` is based on the last copy this request read: the one it loaded, or the
            // one a conflict's merge read since.)
            return await lostCopyVerdict(
                keys: keys, nodeID: nodeID, loadedVersion: snapshot.record.metadata.version &- 1,
                baseVersion: record.metadata.version &- 1)
        }
        /// What to write again when a conflict's copy (a concurrent write newer than this
        /// request's, never read) was lost after the conflict: this request's changes merged onto
        /// a newer copy found elsewhere (that write's backup); nil (refused) when none is found in
        /// non-sticky mode, where writing this request's own copy would drop that write's changes
        /// (its backup may still be on its way: the simulation, seed 34826, a node restarted
        /// between the two). An add's conflict, and sticky mode (memory is authoritative), write
        /// the request's own.
        func rewrittenAfterConflict(onto newer: StoredSession?) -> SessionRecord? {
            if newer == nil, !add, !restoreIfMissing {
                statistics.count(.unavailable)
                return nil
            }
            return rewritten(onto: newer)
        }
        /// What to write again when the copy was lost: this request's changes merged onto a newer
        /// copy found elsewhere (a backup a concurrent request wrote after this one last read the
        /// session keeps that request's changes), or the record as it is.
        func rewritten(onto newer: StoredSession?) -> SessionRecord {
            guard let newer else { return record }
            return merged(onto: newer.record)
        }
        if let fork {
            // The primary as it is now (the save's own CAS unique may be from before a restart).
            switch await readStored(key: keys.primary, on: nodeID, touch: nil) {
            case .found(let stored):
                record = merged(onto: stored.record)
                casUnique = stored.casUnique
                add = false
            case .missing:
                // Lost again: written again as any lost copy, onto the other copy at least.
                record = merged(onto: fork.copy.record)
                switch await lostCopy() {
                case .rewrite(let newer):
                    record = rewritten(onto: newer)
                    casUnique = nil
                    add = true
                case .ended:
                    return .gone
                case .moved(let node):
                    return .moved(to: node)
                }
            case .tombstone:
                return .gone
            case .unreachable(let error):
                return .unreachable(error, afterConflict: true)
            }
        }
        var lock = lock
        // Whatever the outcome, this instance no longer renews a lock this save had (its release
        // rode with a write, or the caller releases it): a lock taken again here and left by a
        // write with no answer would otherwise stay in the held set for good.
        defer { if let lock { locks.released(lock) } }
        var sawConflict = false
        for _ in 0..<Self.maximumSaveAttempts {
            let bytes: ByteBuffer
            do {
                bytes = try encode(record, key: keys.primary)
            } catch {
                return .refused(error)
            }
            let (result, lockHeld) = await writeStored(
                key: keys.primary, on: nodeID, bytes: bytes, ttl: Self.primaryTTL(record.metadata, now: now),
                flags: Self.primaryFlags(record.metadata), casUnique: casUnique, add: add, releasing: lock)
            if lock != nil, !lockHeld {
                // The lock was no longer this request's when the write was applied (evicted, or
                // expired and taken): it kept no locked request out. A write that landed may be
                // merged over by one that read the copy before it; one that met another write is
                // refused (merging now could lose a locked request's change, or ours).
                switch result {
                case .stored:
                    statistics.count(.writes)
                    return .unguarded
                case .conflict:
                    statistics.count(.lockConflicts)
                    return .refused(SessionLocks.conflictError)
                case .gone, .tooLarge, .unreachable:
                    // Gone: written again only under the lock taken again, and only if nobody
                    // placed a copy since (below).
                    break
                }
            }
            switch result {
            case .stored(let newCas):
                session.markSaved(snapshot, saved: record, casUnique: newCas)
                statistics.count(.writes)
                return .saved(record: record, bytes: bytes, written: SavedWrite(snapshot: snapshot, record: record))
            case .gone:
                switch await lostCopy() {
                case .rewrite(let newer):
                    if let held = lock {
                        // The copy was lost (evicted, its node restarted) while this request ran,
                        // and the release rode with the failed write (its lock, if not lost with
                        // the copy, is free now): the session is written again only under the
                        // lock taken again, and only if nobody placed a copy since (a locked
                        // request that restored it from its backup: this request's changes would
                        // be merged onto a copy made from the same version, and one of the two
                        // lost).
                        switch await retakeLock(held, keys: keys, nodeID: nodeID) {
                        case .finished(let outcome):
                            return outcome
                        case .taken(let newLock, let read):
                            lock = newLock
                            if let newLock, case .found = read {
                                await locks.release(newLock)
                                statistics.count(.lockConflicts)
                                return .refused(SessionLocks.conflictError)
                            }
                        }
                    }
                    record = rewritten(onto: newer)
                    casUnique = nil
                    add = true
                    continue
                case .ended:
                    return .gone
                case .moved(let node):
                    return .moved(to: node)
                }
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
                    let newLock: HeldLock?
                    let read: RetakenLock.Read
                    switch await retakeLock(held, keys: keys, nodeID: nodeID) {
                    case .finished(let outcome): return outcome
                    case .taken(let taken, let copy): (newLock, read) = (taken, copy)
                    }
                    lock = newLock
                    if let newLock {
                        switch read {
                        case .found(let stored):
                            // While this request held its lock, only a write its lock does not
                            // cover (an unlocked request) could change the copy: exactly one
                            // version on. More means a locked request wrote after the release,
                            // from a copy without this request's changes: merging would lose its
                            // changes or ours.
                            guard stored.record.metadata.version == snapshot.record.metadata.version else {
                                await locks.release(newLock)
                                statistics.count(.lockConflicts)
                                return .refused(SessionLocks.conflictError)
                            }
                            record = MemcachedSession.merge(snapshot, onto: stored.record, now: now)
                            casUnique = stored.casUnique
                            add = false
                            continue
                        case .missing:
                            // Vanished since the conflict: an add found a copy that is gone now,
                            // or the copy was lost (a restart, an eviction).
                            let verdict: LostCopy = add ? .rewrite(onto: nil) : await lostCopy()
                            if case .rewrite(let newer) = verdict {
                                guard let merged = rewrittenAfterConflict(onto: newer) else {
                                    await locks.release(newLock)
                                    return .refused(Self.newerCopyLostError)
                                }
                                record = merged
                                casUnique = nil
                                add = true
                                continue
                            }
                            await locks.release(newLock)
                            if case .moved(let node) = verdict { return .moved(to: node) }
                            return .gone
                        }
                    }
                    // No lock: the failure policy let the request proceed without it.
                }
                switch await readStored(key: keys.primary, on: nodeID, touch: nil) {
                case .found(let stored):
                    record = merged(onto: stored.record)
                    casUnique = stored.casUnique
                    add = false
                case .missing:
                    // An add found a copy that vanished since, or a copy was lost: write it again.
                    if add {
                        casUnique = nil
                        add = true
                        continue
                    }
                    switch await lostCopy() {
                    case .rewrite(let newer):
                        guard let merged = rewrittenAfterConflict(onto: newer) else {
                            return .refused(Self.newerCopyLostError)
                        }
                        record = merged
                        casUnique = nil
                        add = true
                        continue
                    case .ended:
                        return .gone
                    case .moved(let node):
                        return .moved(to: node)
                    }
                case .tombstone:
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

    /// A save's write, as ``save(_:keys:on:releasing:forceAdd:restoreIfMissing:ontoFork:)`` needs
    /// it to merge that save's changes onto a fork.
    struct SavedWrite: Sendable {
        /// What the save changed.
        var snapshot: MemcachedSession.Snapshot
        /// The copy it wrote.
        var record: SessionRecord
    }

    /// A fork a save's backup write met (``writeBackup(keys:primaryNode:bytes:metadata:now:detectsForks:)``):
    /// the other copy of the version the save wrote.
    struct ForkedCopy: Sendable {
        var written: SavedWrite
        var copy: StoredSession
    }

    /// A write met a newer copy (a concurrent request's) that was lost before it could be read and
    /// merged onto, and no copy of it was found elsewhere: this request's changes are not saved.
    static let newerCopyLostError = SessionError.unavailable(
        "a concurrent request's newer copy of the session was lost before this request's changes could be merged onto it: they were not saved")

    /// A lock taken again by ``retakeLock(_:keys:nodeID:)``.
    enum RetakenLock {
        /// The session's copy, read with the lock.
        enum Read {
            case found(StoredSession)
            case missing
        }
        /// The lock (nil when the failure policy let the request proceed without it) and the
        /// session's copy read with it.
        case taken(HeldLock?, Read)
        /// The save ends here: the lock could not be had, the session ended, or its node did not
        /// answer (a lock taken is released).
        case finished(SaveOutcome)
    }

    /// Takes again the lock of a locked request whose write failed: its release rode with the
    /// write, so the lock is free now, and nothing more may be written without it. Reads the
    /// session in the same round trip.
    func retakeLock(_ released: HeldLock, keys: SessionKeys, nodeID: String) async -> RetakenLock {
        locks.released(released)
        let relocked: (HeldLock?, StoredRead)
        do {
            relocked = try await locks.lockAndRead(keys: keys, nodeID: nodeID, touch: nil)
        } catch {
            return .finished(.refused(error))
        }
        let newLock = relocked.0
        switch relocked.1 {
        case .found(let stored):
            return .taken(newLock, .found(stored))
        case .missing:
            return .taken(newLock, .missing)
        case .tombstone:
            if let newLock { await locks.release(newLock) }
            return .finished(.gone)
        case .unreachable(let error):
            if let newLock { await locks.release(newLock) }
            statistics.count(.writeFailures)
            return .finished(.unreachable(error, afterConflict: true))
        }
    }

    /// What a missing copy means, when a write finds it so.
    enum LostCopy {
        /// Lost (evicted, its node restarted): the request, which holds the whole session,
        /// writes it again; merged onto `onto`, a copy found elsewhere (a backup) that is newer
        /// than the last one this request read, when there is one.
        case rewrite(onto: StoredSession?)
        /// Ended (a tombstone says so): it stays ended.
        case ended
        /// Moved to this node by a concurrent request (its node failed for that request): this
        /// request's changes go there, merged onto that copy.
        case moved(to: String)
    }

    /// Non-sticky: a write found the session's copy missing. Ends leave tombstones (a logout, an
    /// expiry, `msm session delete`, a login's old id: on the primary and backup keys of every
    /// node), and a move deletes the old primary once its node answers again; so a missing copy
    /// was ended (a tombstone somewhere), moved (a primary elsewhere, at least as new as the copy
    /// this request loaded), or lost: evicted, or its node restarted while the request ran.
    ///
    /// The simulation, seed 9611: a request read the old primary of a session a concurrent
    /// request had just moved off a frozen node; the move's cleanup deleted that copy, and the
    /// write, finding it missing, wrote the session there again: two copies, and the moved one
    /// without this request's change.
    ///
    /// A copy found newer than `baseVersion` (the version of the last copy the request read, which
    /// its write is based on) holds changes the request has not seen: the rewrite goes onto it.
    /// A move is still judged against the version the request loaded (seed 9611's rule): a primary
    /// elsewhere is where the session lives now, and the write goes there, merged onto it, even
    /// when a conflict's merge here had read a newer copy that was then lost (a second fault).
    func lostCopyVerdict(keys: SessionKeys, nodeID: String, loadedVersion: UInt64, baseVersion: UInt64) async -> LostCopy {
        guard keepsBackups, isEnabled else { return .ended }
        let search = await searchCopies(keys: keys, on: topology.order.filter { topology.isReachable($0) })
        if search.tombstone { return .ended }
        if let newest = search.newest, newest.isPrimary, newest.nodeID != nodeID,
            newest.stored.record.metadata.version >= loadedVersion
        {
            return .moved(to: newest.nodeID)
        }
        if let newest = search.newest, newest.stored.record.metadata.version > baseVersion {
            return .rewrite(onto: newest.stored)
        }
        return .rewrite(onto: nil)
    }

}

extension SessionManagerPart {
    /// Decodes a stored copy. Corrupt or foreign bytes are deleted, counted and logged (without
    /// the session id), and read as a miss (nil). With sealing keys the copy is opened first: one
    /// that does not open (tampered, copied under another session) is deleted the same way; one
    /// sealed with a key this instance does not hold, or not sealed outside a rolling upgrade's
    /// window, is read as a miss and left in place.
    func decodeStored(_ item: MemcachedItem, key: String, node: any MemcachedNodeCommandRunner) -> StoredSession? {
        statistics.count(.bytesRead, item.value.readableBytes)
        var envelope = item.value
        if let sealer = context.sealer {
            if SessionSealer.isSealed(item.value) {
                do {
                    envelope = try sealer.open(item.value, forKey: key).plaintext
                } catch .unknownKey(let keyID) {
                    statistics.count(.sealedUnknownKeys)
                    logger.warning(
                        "a session sealed with a key this instance does not hold was read as missing",
                        metadata: ["memcached.node": "\(node.id)", "key_id": "\(String(format: "%08x", keyID))"])
                    return nil
                } catch {
                    if !acceptsUnsealed {
                        statistics.count(.sealedOpenFailures)
                        logger.warning(
                            "a sealed session that does not open (tampered, truncated, or copied from another session) was deleted",
                            metadata: ["memcached.node": "\(node.id)", "bytes": "\(item.value.readableBytes)"])
                        Task { try? await node.delete(key, quiet: true) }
                        return nil
                    }
                    // A rolling upgrade's window: perhaps an unsealed envelope that starts alike.
                }
            } else if !acceptsUnsealed {
                statistics.count(.unsealedRefused)
                logger.warning(
                    "a session that is not sealed was read as missing (sealing keys are set and no rolling upgrade window is open)",
                    metadata: ["memcached.node": "\(node.id)", "bytes": "\(item.value.readableBytes)"])
                return nil
            }
        }
        do {
            let record = try configuration.codec.decodeSession(from: envelope)
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

    /// Whether copies that are not sealed are read (sealing keys set): while this instance still
    /// writes them (a rolling upgrade's first step), or until the configured window ends.
    var acceptsUnsealed: Bool {
        let sealing = configuration.sealing
        if sealing.writesUnsealed { return true }
        guard let until = sealing.acceptUnsealedUntil else { return false }
        return Double(currentTimeMillis()) < until.timeIntervalSince1970 * 1000
    }
}

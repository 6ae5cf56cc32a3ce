import Logging
import Memcached
import NIOCore

extension SessionStore {
    /// Writes the backup copy and waits for it, before the response: a primary that loses its
    /// data right after the write (restarted empty, an eviction) must find the acknowledged change
    /// in the backup. A backup node that does not answer gets the write when it answers again;
    /// the response does not wait for that (the primary has the change: one fault at a time).
    ///
    /// A backup never goes back: saves of one session by different instances send their backups
    /// over different connections, and a slow one may land after a newer one (the newer backup
    /// would then be lost to a failover of the primary). In meta mode the write reads the backup's
    /// flags (its version) and CAS unique first (or, over this instance's own recent write of it,
    /// uses that write's CAS unique: see ``writeBackupInOrder(key:on:bytes:flags:ttl:nodeID:lastWrite:secondsLeft:detectsForks:)``),
    /// writes only over an older copy, with CAS, and never over a tombstone; text mode, which
    /// cannot read flags without the value, writes as is
    /// (documented).
    ///
    /// `detectsForks` (a non-sticky save's backup): a backup of this very version with other bytes
    /// is a fork, returned (nothing written): two writes gave the session the same version, one of
    /// them after its copy was lost (its node restarted) and before the other's backup landed, so
    /// each holds a change the other lacks (the simulation, non-sticky seed 67253). The caller
    /// writes the primary again with a three-way merge of the two copies
    /// (``SessionStore/save(_:keys:on:releasing:forceAdd:restoreIfMissing:ontoFork:)``).
    /// Whichever of the two backup writes comes second meets the fork: the one whose copy is the
    /// primary now, or the one whose copy was lost.
    @discardableResult
    func writeBackup(
        keys: SessionKeys, primaryNode: String, bytes: ByteBuffer, metadata: SessionMetadata, now: Int64, detectsForks: Bool = false
    ) async -> StoredSession? {
        guard let backupNode = topology.nextAvailable(after: primaryNode), let node = topology.node(backupNode) else { return nil }
        let ttl = Self.backupTTL(metadata, now: now)
        let lastWrite = backupMemo.record(keys.backup, node: backupNode)
        statistics.count(.backupWrites)
        guard configuration.memcached.protocolMode == .meta else {
            countRoundTrip()
            var request = MemcachedRequest.store(keys.backup, value: bytes, ttl: ttl)
            // One connection per session's backups: two saves' backups of one instance cannot
            // overtake each other.
            request.connectionAffinity = Self.affinity(of: keys.backup)
            request.honorsCancellation = false
            if case .failure = await node.executeBatch([prepared(request)])[0] { statistics.count(.backupFailures) }
            return nil
        }
        let flags = Self.backupFlags(metadata)
        // The backup's end in wall time: a write retried later keeps it (a backup lives as long
        // as its session may, never longer: the idle-expiry check relies on it).
        let expiresAt = Self.backupExpiresAt(metadata, now: now)
        switch await writeBackupInOrder(
            key: keys.backup, on: node, bytes: bytes, flags: flags, ttl: ttl, nodeID: backupNode, lastWrite: lastWrite,
            detectsForks: detectsForks)
        {
        case .done:
            return nil
        case .unanswered:
            // Written once the node answers again (a frozen backup node must not leave the
            // session with an old backup only).
            leaveForLater(
                .backup(bytes: bytes, flags: flags, expiresAt: expiresAt, primaryKey: keys.primary, primaryNode: primaryNode),
                key: keys.backup, on: backupNode)
            return nil
        case .forked(let item):
            // One that does not open here: sealed with a key this instance does not hold (left
            // alone, as a copy as new as this one); or corrupt, deleted as any read of it
            // deletes it, and the backup is written again by the next save or a read's repair.
            guard let fork = decodeStored(item, key: keys.backup, node: node) else { return nil }
            statistics.count(.backupForks)
            return fork
        }
    }

    /// What an ordered backup write (``writeBackupInOrder(key:on:bytes:flags:ttl:nodeID:lastWrite:secondsLeft:detectsForks:)``) came to.
    enum BackupWrite {
        /// Written; or not needed (as new a copy there, or a tombstone); or refused by the node
        /// (a retry would be refused too).
        case done
        /// The node did not answer: the write is to be tried again.
        case unanswered
        /// A copy of the same version with other bytes is there (a fork; only with
        /// `detectsForks`): nothing written.
        case forked(MemcachedItem)
    }

    /// The ordered backup write of ``writeBackup(keys:primaryNode:bytes:metadata:now:detectsForks:)``: at most
    /// four rounds of read and conditional write (after the one-round-trip write below, if it is
    /// tried), each bounded by the request timeout. Returns
    /// ``BackupWrite/unanswered`` when the node did not answer (the write is to be tried again).
    ///
    /// `detectsForks`: a copy there of this very version is read in full (one more round trip, on
    /// a rare path: in the normal course a backup of one version is written once, or copied from
    /// its primary's bytes by a read's repair) and compared with `bytes`; other bytes are a fork
    /// (``writeBackup(keys:primaryNode:bytes:metadata:now:detectsForks:)``).
    ///
    /// With `nodeID` (the node's id) and `lastWrite` (this instance's own last backup write of the
    /// session there, if recent: ``BackupMemo/record(_:node:)``), a write over it, when older than
    /// this one, goes first as one conditional write with
    /// that write's CAS unique, without the read: it lands only if the backup is still exactly
    /// what this instance wrote, so it is in order as the read-then-write is. Anything else
    /// (another instance wrote since, a tombstone, no copy) fails it, and the rounds of read and
    /// write follow. A session whose requests keep coming to this instance has its backup written
    /// in one round trip instead of two. memcached counts CAS uniques from the start again when it
    /// restarts, so the write goes only over a connection opened before the remembered write was
    /// sent (``Memcached/MemcachedRequest/connectionGenerationLimit``): a restart since closed it.
    /// (So do the rounds' CAS writes, over a connection opened before their read.) Not with
    /// ``SessionManager/Configuration/reusesBackupCAS`` off, for stores or proxies that keep a
    /// client's connections open across a restart of the memcached behind them.
    ///
    /// `secondsLeft` (a write left for later, ``LeftoverCopies``): the seconds its backup may live
    /// (its original end, or later when the session's primary says a read slid it since). The
    /// write the node did not answer may have landed since, late, with its whole TTL counted from
    /// its landing (a frozen node applies what it buffered when it thaws): a copy of this version
    /// found living longer gets that end (a CAS write of the same bytes). A
    /// backup that outlives its session would bring it back past its idle timeout (the
    /// simulation, seed 6911: the backup node froze under a write, and after the primary's node
    /// restarted, a request 14 s idle found a 10 s session again).
    func writeBackupInOrder(
        key: String, on node: any MemcachedNodeCommandRunner, bytes: ByteBuffer, flags: UInt32, ttl: MemcachedTTL,
        nodeID: String? = nil, lastWrite: BackupMemo.Written? = nil, secondsLeft: Int? = nil, detectsForks: Bool = false
    ) async -> BackupWrite {
        let affinity = Self.affinity(of: key)
        func send(_ request: MemcachedRequest) async -> Result<MemcachedResponse, MemcachedError> {
            var request = request
            request.honorsCancellation = false
            request.connectionAffinity = affinity
            let result = await node.executeBatch([request])[0]
            if case .failure(let error) = result, error.code == .connectionChanged { return result }  // not sent
            countRoundTrip()
            return result
        }
        /// A failed round: counted; unanswered (try again later) when the node did not answer,
        /// done when it refused (a retry would be refused too).
        func failed(_ result: Result<MemcachedResponse, MemcachedError>) -> BackupWrite {
            statistics.count(.backupFailures)
            guard case .failure(let error) = result, error.meansNodeUnreachable else { return .done }
            backupMemo.forget(key)
            return .unanswered
        }
        /// An acknowledged write (sent with the node's connection generation `generation` or
        /// later): remembered for the next one.
        func wrote(_ result: Result<MemcachedResponse, MemcachedError>, generation: UInt64?) {
            // A CAS unique of 0: the server does not keep them (`memcached -C`), and a write with
            // C0 would land over anything.
            guard let nodeID, let generation, case .success(.stored(.stored(let cas?))) = result, cas != 0 else { return }
            backupMemo.wrote(key, node: nodeID, cas: cas, flags: flags, generation: generation)
        }
        if nodeID != nil, configuration.reusesBackupCAS, let last = lastWrite, last.flags < flags {
            let generation = node.connectionGeneration
            var write = MemcachedRequest.store(key, value: bytes, mode: .set, ttl: ttl, flags: flags, cas: last.cas)
            write.connectionGenerationLimit = last.generation
            let result = await send(write)
            switch result {
            case .success(.stored(.stored)):
                statistics.count(.backupsWrittenWithoutRead)
                wrote(result, generation: generation)
                return .done
            case .success(.stored):
                break  // changed since (or gone): read, then write
            case .failure(let error) where error.code == .connectionChanged:
                break  // not sent: a connection opened since may reach a restarted node
            default:
                return failed(result)
            }
        }
        for _ in 0..<4 {
            var write: MemcachedRequest
            let readGeneration = node.connectionGeneration
            let read = await send(.getMetadata(key))
            switch read {
            case .success(.item(nil)):
                write = .store(key, value: bytes, mode: .add, ttl: ttl, flags: flags)
            case .success(.item(let item?)):
                if item.flags == flags, let secondsLeft, let living = item.timeToLive, living < 0 || living > secondsLeft + 1 {
                    // This write, landed late: its end back where it belongs.
                    write = .store(key, value: bytes, mode: .set, ttl: ttl, flags: flags, cas: item.cas)
                } else if detectsForks, item.flags == flags {
                    // This very version: this write's own copy (a repair from its primary's
                    // bytes), or a fork.
                    let full = await send(.get(key))
                    switch full {
                    case .success(.item(let copy?)) where copy.flags == flags:
                        guard copy.value != bytes else {
                            statistics.count(.backupsOutdated)
                            return .done
                        }
                        return .forked(copy)
                    case .success(.item):
                        continue  // changed or gone since: look again
                    default:
                        return failed(full)
                    }
                } else if item.flags == Self.tombstoneFlags || item.flags >= flags {
                    // Ended (a logout's tombstone), or as new already: nothing to do.
                    statistics.count(.backupsOutdated)
                    return .done
                } else {
                    write = .store(key, value: bytes, mode: .set, ttl: ttl, flags: flags, cas: item.cas)
                }
                // Over a connection opened before the read: one that reaches the same run of the
                // server (a restarted one counts CAS uniques from the start again).
                write.connectionGenerationLimit = readGeneration
            default:
                return failed(read)
            }
            // Read before the write is sent (after the read, which opened a connection if none was).
            let generation = node.connectionGeneration
            let result = await send(write)
            switch result {
            case .success(.stored(.stored)):
                wrote(result, generation: generation)
                return .done
            case .success(.stored):
                continue  // changed between the read and the write: look again
            case .failure(let error) where error.code == .connectionChanged:
                continue  // not sent: the read's connection closed (or the read opened the first)
            default:
                return failed(result)
            }
        }
        statistics.count(.backupFailures)
        return .done
    }

    /// Refreshes a read-only session's backup at most once per window per instance, and repairs it
    /// (copies the bytes just read) when the backup node has no copy, e.g. after a restart, or, in
    /// meta mode, when its copy is older than the one just read (a write whose reply was lost
    /// landed on the primary, its backup never written: a later loss of the primary must not
    /// bring the older count back). The repair never goes back and never replaces a tombstone.
    func refreshBackupIfDue(keys: SessionKeys, primaryNode: String, raw: ByteBuffer?, metadata: SessionMetadata, now: Int64) {
        guard let backupNode = topology.nextAvailable(after: primaryNode), let node = topology.node(backupNode) else { return }
        guard backupMemo.needsRefresh(keys.backup, node: backupNode, window: Self.backupRefreshWindow(metadata)) else { return }
        backupMemo.record(keys.backup, node: backupNode)
        let ttl = Self.backupTTL(metadata, now: now)
        let expiresAt = Self.backupExpiresAt(metadata, now: now)
        let statistics = self.statistics
        let memo = self.backupMemo
        let meta = configuration.memcached.protocolMode == .meta
        let flags = Self.backupFlags(metadata)
        statistics.count(.backupTouches)
        let submit = {
            @Sendable (request: MemcachedRequest, completion: @escaping @Sendable (Result<MemcachedResponse, MemcachedError>) -> Void) in
            _ = Task { await node.submit(request, completion: completion) }
        }
        Task {
            await node.submit(.touch(keys.backup, ttl: ttl)) { result in
                switch result {
                case .success(.touched(false)):
                    // No backup there: write one from the bytes just read.
                    guard let raw else { return }
                    statistics.count(.backupRepairs)
                    // An add: it cannot overwrite a tombstone (a logout racing this read) or a
                    // newer backup written meanwhile.
                    var repair = MemcachedRequest.store(
                        keys.backup, value: raw, mode: .add, ttl: ttl, flags: SessionStore.backupFlags(metadata), quiet: true)
                    repair.connectionAffinity = SessionStore.affinity(of: keys.backup)
                    submit(repair) { result in
                        if case .failure = result { statistics.count(.backupFailures) }
                    }
                case .success(.touched(true)):
                    // Older than what was just read? Only meta mode reads a backup's version
                    // (its flags) without its value.
                    guard meta, let raw else { return }
                    Task {
                        var check = MemcachedRequest.getMetadata(keys.backup)
                        check.connectionAffinity = SessionStore.affinity(of: keys.backup)
                        check.honorsCancellation = false
                        guard case .success(.item(let item?)) = await node.executeBatch([check])[0],
                            item.flags != SessionStore.tombstoneFlags, item.flags < flags
                        else { return }
                        statistics.count(.backupRepairs)
                        _ = await self.writeBackupInOrder(key: keys.backup, on: node, bytes: raw, flags: flags, ttl: ttl)
                    }
                case .failure(let error):
                    memo.forget(keys.backup)
                    statistics.count(.backupFailures)
                    // Sent, unanswered: it may land late and keep the copy past its end.
                    if meta, error.leavesOutcomeUnknown, let expiresAt {
                        self.leaveForLater(
                            .backupTouch(flags: flags, expiresAt: expiresAt, primaryKey: keys.primary, primaryNode: primaryNode),
                            key: keys.backup, on: backupNode)
                    }
                default:
                    break
                }
            }
        }
    }
}

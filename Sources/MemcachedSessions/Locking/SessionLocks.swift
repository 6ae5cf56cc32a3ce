import Logging
import Memcached
import NIOCore
import Synchronization

/// The sessions' locks (non-sticky mode): owned locks in memcached (a random token as the value,
/// release and renewal CAS-checked so that only the owner can do either), taken in the same round
/// trip as the session's read, renewed while a request runs, waited for with backoff within a
/// budget; and which requests lock (the locking mode in force, the `auto` mode's read-only paths).
final class SessionLocks: SessionManagerPart {
    let context: SessionContext
    let held = HeldLocks()
    let readOnlyPaths: ReadOnlyPaths

    init(context: SessionContext) {
        self.context = context
        self.readOnlyPaths = ReadOnlyPaths(limit: context.configuration.locking.autoPathLimit)
    }

    /// A locked request whose lock did not keep out a concurrent change of the same session (it
    /// expired, or was freed by a failed write): its changes are not saved, so no change is lost
    /// silently; the browser may retry.
    static let conflictError = SessionError(
        code: .lockUnavailable,
        message: "the session was changed by another request while this request's lock was not held; its changes were not saved")

    /// Whether a request on `path` takes the session's lock.
    func locksRequest(onPath path: String) -> Bool {
        // Sticky requests never lock: no lock taken on their (hot) path.
        guard configuration.mode == .nonSticky else { return false }
        let (locking, pattern, enabled) = context.runtime.withLock { ($0.locking, $0.lockPattern, $0.enabled) }
        guard enabled else { return false }
        switch locking {
        case .none: return false
        case .all: return true
        case .auto: return !readOnlyPaths.isReadOnly(path)
        case .uriPattern: return pattern?.matches(path) ?? false
        }
    }

    /// The lock item's TTL: `lockExpiry`, rounded up to whole seconds. memcached's clock ticks once
    /// a second, so the item lives between `lockExpiry - 1 s` and `lockExpiry`: a request waiting
    /// for a lock whose owner died or lost its release never waits longer than `lockExpiry`.
    /// The owner renews every third of `lockExpiry` (at least 2 s, so at least a second before the
    /// item can expire), and counts its lease as ``lease`` from each acquisition or renewal.
    var itemTTL: MemcachedTTL {
        .duration(configuration.locking.expiry)
    }

    /// How long a lock is surely held after its acquisition or last renewal: one memcached clock
    /// tick less than its TTL.
    var lease: TimeAmount {
        TimeAmount(configuration.locking.expiry - .seconds(1))
    }

    func newToken() -> String {
        context.randomToken().description
    }

    /// Takes the session's lock on `nodeID` and reads the session in the same round trip
    /// (`ms <lock> ... ME` and `mg <session>` in one write). While another request holds the lock,
    /// waits with exponential backoff and jitter within the wait budget.
    ///
    /// - Returns: the lock (nil when the policy let the request proceed without it, or when another
    ///   request holds it and the read found a tombstone) and the read.
    ///
    /// - Parameters:
    ///   - token: the lock's value (a new random token when nil).
    ///   - mayAlreadyHold: `token` was sent by an attempt whose reply was lost: a lock found held
    ///     with it is this request's own (that `add` was applied), taken under its CAS unique
    ///     instead of being waited out.
    func lockAndRead(
        keys: SessionKeys, nodeID: String, touch: MemcachedTTL?, token: String? = nil, mayAlreadyHold: Bool = false
    ) async throws(SessionError) -> (HeldLock?, StoredRead) {
        guard let node = topology.node(nodeID) else { return (nil, .missing) }
        let token = token ?? newToken()
        let lockTTL = itemTTL
        let start = clock.now()
        let budget = TimeAmount(configuration.locking.waitBudget)
        var attempt = 0
        var waited = false
        // The wait's time, however it ends (the lock taken, the session found ended, the node
        // silent, the budget spent, the request cancelled).
        defer { if waited { statistics.time(.lockWait, since: start) } }
        while true {
            let acquire = MemcachedRequest.store(keys.lock, value: ByteBuffer(string: token), mode: .add, ttl: lockTTL)
            let read = MemcachedRequest.get(keys.primary, touch: touch)
            countRoundTrip()
            let results = await node.executeBatch([acquire, read])
            let readOutcome: StoredRead
            switch results[1] {
            case .success(.item(let item?)):
                if item.flags == SessionStore.tombstoneFlags {
                    readOutcome = .tombstone
                } else {
                    readOutcome = decodeStored(item, key: keys.primary, node: node).map { .found($0) } ?? .missing
                }
            case .success:
                readOutcome = .missing
            case .failure(let error):
                readOutcome = .unreachable(error)
            }
            switch results[0] {
            case .success(.stored(.stored(let cas))):
                let lock = HeldLock(
                    key: keys.lock, nodeID: nodeID, token: token, casUnique: cas, now: clock.now(), sequence: held.nextSequence())
                held.add(lock)
                statistics.count(.locksAcquired)
                return (lock, readOutcome)
            case .success(.stored(.notStored)), .success(.stored(.exists)):
                if mayAlreadyHold, attempt == 0, let cas = await ownLock(keys.lock, token: token, on: node) {
                    let lock = HeldLock(
                        key: keys.lock, nodeID: nodeID, token: token, casUnique: cas, now: clock.now(), sequence: held.nextSequence())
                    held.add(lock)
                    statistics.count(.locksAcquired)
                    return (lock, readOutcome)
                }
                // Held by another request. An ended session has nothing left to guard: no write
                // replaces a tombstone, and a new session gets a new id. Its lock, perhaps left by
                // a logout whose release was lost, is not waited out. (Not in the minute before a
                // storage-key switch, where an unkeyed tombstone may mean the session moved to its
                // keyed keys, and the request goes on there: SessionStore.lookAhead.)
                if case .tombstone = readOutcome, !mayHaveMovedToKeyedKeys(keys) {
                    return (nil, readOutcome)
                }
            case .failure(let error) where error.meansNodeUnreachable:
                return (nil, .unreachable(error))
            default:
                // The lock could not be written for another reason (e.g. a server error): proceed
                // as if it could not be had in time.
                break
            }
            if !waited {
                waited = true
                statistics.count(.lockWaits)
            }
            let elapsed = clock.now() - start
            if elapsed >= budget {
                statistics.count(.lockFailures)
                logger.notice("session lock not acquired within the wait budget", metadata: ["memcached.node": "\(nodeID)"])
                switch configuration.locking.failurePolicy {
                case .fail:
                    throw SessionError(
                        code: .lockUnavailable, message: "the session's lock was not released within \(configuration.locking.waitBudget)")
                case .proceedUnlocked:
                    return (nil, readOutcome)
                }
            }
            // 1 ms doubling to 32 ms, times a random factor in 0.5...1.5, never past the budget.
            let base = Int64(1_000_000) << Int64(min(attempt, 5))
            let jittered = Int64(Double(base) * (0.5 + context.unitRandom()))
            let remaining = (budget - elapsed).nanoseconds
            attempt += 1
            do {
                try await clock.sleep(for: .nanoseconds(max(100_000, min(jittered, remaining))))
            } catch {
                throw SessionError(code: .lockUnavailable, message: "cancelled while waiting for the session's lock")
            }
        }
    }

    /// Whether a tombstone on `keys` may stand for a move to the session's keyed keys (the minute
    /// before a storage-key switch) rather than its end.
    private func mayHaveMovedToKeyedKeys(_ keys: SessionKeys) -> Bool {
        guard !keys.isKeyed else { return false }
        guard let token = keys.token else { return true }
        return context.keyedKeysBeforeSwitch(for: token) != nil
    }

    /// The CAS unique of the lock at `key` when it holds `token` (an acquisition of this request's
    /// whose reply was lost), else nil.
    func ownLock(_ key: String, token: String, on node: any MemcachedNodeCommandRunner) async -> UInt64? {
        guard case .success(.item(let item?)) = await node.executeBatch([prepared(.get(key))])[0],
            item.value.readableBytesView.elementsEqual(token.utf8)
        else { return nil }
        return item.cas
    }

    /// Gives up what ``lockAndRead(keys:nodeID:touch:token:mayAlreadyHold:)`` with `token` took on
    /// `nodeID`: the lock it returned; and, when its read got no answer, the lock a lost reply
    /// may have taken, or that a release on the failing connection may not have freed (this
    /// request's either way: released by its token in the background, tried until it would have
    /// expired, not waited out).
    func abandon(_ taken: HeldLock?, token: String, read: StoredRead, keys: SessionKeys, on nodeID: String) async {
        if let taken { await release(taken) }
        if case .unreachable = read, let node = topology.node(nodeID) {
            Task { await self.releaseIfOwn(keys.lock, token: token, on: node) }
        }
    }

    /// Deletes the lock at `key` if it holds `token` (taken by an acquisition whose reply was lost).
    /// Tried every 100 ms until the lock would have expired anyway (the node just failed: its
    /// connection may be reconnecting).
    func releaseIfOwn(_ key: String, token: String, on node: any MemcachedNodeCommandRunner) async {
        let attempts = max(1, Int(configuration.locking.expiry / .milliseconds(100)))
        for attempt in 0..<attempts {
            if attempt > 0 {
                do { try await clock.sleep(for: .milliseconds(100)) } catch { return }
            }
            var read = MemcachedRequest.get(key)
            read.honorsCancellation = false
            switch await node.executeBatch([read])[0] {
            case .success(.item(let item?)):
                guard item.value.readableBytesView.elementsEqual(token.utf8) else { return }  // not ours
                var delete = MemcachedRequest.delete(key, cas: configuration.memcached.protocolMode == .meta ? item.cas : nil)
                delete.honorsCancellation = false
                switch await node.executeBatch([delete])[0] {
                case .success(.deleted(.deleted)):
                    statistics.count(.locksReleased)
                    return
                case .success: return
                case .failure: continue
                }
            case .success: return  // gone
            case .failure: continue
            }
        }
    }

    /// The owner-only release: a delete conditional on the lock's CAS unique (meta protocol). In
    /// text mode, which has no conditional delete, the lock is deleted by key (documented limit).
    func releaseRequest(_ lock: HeldLock) async -> MemcachedRequest {
        let cas = await lock.beginRelease()
        var request: MemcachedRequest
        if configuration.memcached.protocolMode == .meta {
            request = .delete(lock.key, cas: cas, quiet: true)
        } else {
            request = .delete(lock.key, quiet: true)
        }
        request.honorsCancellation = false
        return request
    }

    /// A lock whose release rode with a write: no longer renewed.
    func released(_ lock: HeldLock) {
        held.remove(lock)
    }

    /// A lock this instance stops renewing (its request moved off the lock's node, or ended the
    /// session: the lock goes with its tombstones).
    func forget(_ lock: HeldLock) {
        held.remove(lock)
    }

    /// Releases a lock on its own (when there is nothing to write) and waits for the reply
    /// (bounded by the request timeout), so that the browser's next request, sent after the
    /// response, never finds this request's lock.
    func release(_ lock: HeldLock) async {
        held.remove(lock)
        // Already released (it rode with a write) or being released: nothing left to do.
        guard !lock.isReleasing, let node = topology.node(lock.nodeID) else { return }
        let request = prepared(await releaseRequest(lock))
        countRoundTrip()
        let result = await node.executeBatch([request])[0]
        releaseAnswered(result, lock: lock, node: node)
    }

    /// Handles the reply to a release (alone or riding with a write). After a conflict the
    /// follow-up (``releaseAfterConflict(_:node:)``) runs in the background: it is rare, bounded
    /// (at most six round trips, each within the request timeout), must not delay the response,
    /// and cannot run on the event loop that may be delivering this reply.
    func releaseAnswered(_ result: Result<MemcachedResponse, MemcachedError>, lock: HeldLock, node: any MemcachedNodeCommandRunner) {
        switch result {
        case .success(.deleted(.deleted)):
            statistics.count(.locksReleased)
        case .success(.deleted(.exists)):
            Task {
                await SessionManager.$isBackgroundWork.withValue(true) {
                    await self.releaseAfterConflict(lock, node: node)
                }
            }
        case .failure(let error) where !error.meansNodeUnreachable:
            statistics.count(.lockReleaseFailures)
        default:
            break
        }
    }

    /// A conditional release found the lock's CAS unique changed (`EX`). A renewal of ours racing
    /// the release does that (its reply may not even be in yet), so the lock is read back: if it
    /// still holds this request's random token it is ours, and is deleted under its current CAS.
    /// Someone else's lock (ours expired and was taken) is left alone. Without this the lock
    /// would linger until it expires, blocking the session's next requests.
    ///
    /// - Returns: whether the lock was still this request's (it held this request's token).
    @discardableResult
    func releaseAfterConflict(_ lock: HeldLock, node: any MemcachedNodeCommandRunner) async -> Bool {
        defer { statistics.count(.lockReleaseRaces) }
        for _ in 0..<3 {
            var read = MemcachedRequest.get(lock.key)
            read.honorsCancellation = false
            guard case .success(.item(let item?)) = await node.executeBatch([read])[0] else { return false }  // gone, or unreachable
            guard item.value.readableBytesView.elementsEqual(lock.token.utf8) else { return false }  // not ours
            var delete = MemcachedRequest.delete(lock.key, cas: item.cas)
            delete.honorsCancellation = false
            switch await node.executeBatch([delete])[0] {
            case .success(.deleted(.exists)): continue
            case .success(.deleted(.deleted)):
                statistics.count(.locksReleased)
                return true
            default: return true
            }
        }
        statistics.count(.lockReleaseFailures)
        return true
    }

    /// What the release that rode with a session's write says about that write: whether the lock
    /// was still this request's when the write was applied. The release follows the write in the
    /// same batch and is conditional on the lock's CAS unique, which any other acquisition of the
    /// lock changes; so a release that deletes the lock shows it was held, without a gap, up to
    /// the write. `EX` is this request's lock under a renewal whose reply was lost, or another
    /// request's: the lock is read back (``releaseAfterConflict(_:node:)``). A lock found gone
    /// (evicted; expired) or another's was not held: the write did not keep out a concurrent
    /// locked request. No answer: not known to be held.
    ///
    /// The simulation, seed 6285: a lock was evicted while its request ran; a second request took
    /// the lock and restored the session (evicted too) from its backup; the first request's write
    /// then met that copy and, its lock released with the failed write, merged onto it: two locked
    /// increments both answered the same count.
    func releaseConfirmsHold(
        _ result: Result<MemcachedResponse, MemcachedError>, lock: HeldLock, node: any MemcachedNodeCommandRunner
    ) async -> Bool {
        switch result {
        case .success(.deleted(.deleted)):
            statistics.count(.locksReleased)
            return true
        case .success(.deleted(.exists)):
            if await releaseAfterConflict(lock, node: node) { return true }
            statistics.count(.locksLost)
            return false
        case .success(.deleted):
            statistics.count(.locksLost)
            return false
        case .failure(let error):
            if !error.meansNodeUnreachable { statistics.count(.lockReleaseFailures) }
            return false
        case .success:
            return false
        }
    }

    /// Renews one lock's lease: a CAS write of the same token, so it only succeeds for the owner.
    /// (Text mode has no CAS on a plain renewal: it touches the lock instead, which cannot take
    /// over or re-create someone else's.)
    func renew(_ lock: HeldLock) async {
        guard let node = topology.node(lock.nodeID), let casUnique = lock.beginRenewal() else { return }
        if configuration.memcached.protocolMode == .text {
            switch await node.executeBatch([.touch(lock.key, ttl: itemTTL)])[0] {
            case .success(.touched(true)):
                lock.endRenewal(renewed: true, casUnique: nil, now: clock.now())
                statistics.count(.lockRenewals)
            case .success(.touched(false)):
                lock.endRenewal(renewed: false, casUnique: nil, lost: true, now: clock.now())
                held.remove(lock)
                statistics.count(.locksLost)
            default:
                lock.endRenewal(renewed: false, casUnique: nil, now: clock.now())
            }
            return
        }
        let request = MemcachedRequest.store(
            lock.key, value: ByteBuffer(string: lock.token), mode: .set, ttl: itemTTL, cas: casUnique)
        do {
            switch try await node.execute(request) {
            case .stored(.stored(let cas)):
                lock.endRenewal(renewed: true, casUnique: cas, now: clock.now())
                statistics.count(.lockRenewals)
            case .stored:
                lock.endRenewal(renewed: false, casUnique: nil, lost: true, now: clock.now())
                held.remove(lock)
                statistics.count(.locksLost)
                logger.warning("a held session lock was lost before its renewal", metadata: ["memcached.node": "\(lock.nodeID)"])
            default:
                lock.endRenewal(renewed: false, casUnique: nil, now: clock.now())
            }
        } catch {
            // No reply: the CAS unique may have changed or not. A release then finds `EX` and
            // reads the lock back (``releaseAfterConflict(_:node:)``).
            lock.endRenewal(renewed: false, casUnique: nil, now: clock.now())
            logger.debug("lock renewal failed", metadata: ["memcached.error": "\(error)"])
        }
    }

    /// Whether the request surely still holds `lock`: not found lost, and within its lease.
    func holdsLease(_ lock: HeldLock) -> Bool {
        !lock.isLost && clock.now() - lock.renewedAt < lease
    }

    /// Makes sure a locked request still holds its lock before it writes. A lock found lost by a
    /// renewal, or whose lease ran out (renewals went unanswered, or the request ran past the
    /// longest hold), did not keep other requests out: the request takes the lock again (waiting
    /// within the budget) and writes only if the session is the copy it read (its CAS unique is
    /// unchanged); otherwise its changes are refused (``SessionError/Code/lockUnavailable``), so
    /// that no locked request's change is lost silently.
    ///
    /// - Returns: the lock to write under; nil when the failure policy lets the request proceed
    ///   unlocked (under `.fail`, a lock that cannot be taken again, its node silent or another
    ///   request holding it past the wait budget, fails the request).
    func confirmLock(_ lock: HeldLock, keys: SessionKeys, session: MemcachedSession) async throws(SessionError) -> HeldLock? {
        if holdsLease(lock) { return lock }
        if !lock.isLost {
            // Renewals went unanswered, or are late: one now says which.
            await renew(lock)
            if holdsLease(lock) { return lock }
            // Still unknown (no reply): as good as lost. (A renewal that found it lost counted it.)
            if !lock.isLost { statistics.count(.locksLost) }
        }
        held.remove(lock)
        logger.notice("a session lock expired before its request ended; taking it again", metadata: ["memcached.node": "\(lock.nodeID)"])
        let (relocked, read) = try await lockAndRead(keys: keys, nodeID: lock.nodeID, touch: nil)
        guard let relocked else {
            if case .tombstone = read {
                // Ended meanwhile (its lock, held by another, was not waited out): as with the lock.
                statistics.count(.lockConflicts)
                throw Self.conflictError
            }
            // Not had again: its node did not answer (whether another request wrote after this
            // one's lease ran out is unknown), or left the configuration. Under `.fail`, a lock
            // not had fails the request (a move now would carry changes no lock guarded to
            // another node); `.proceedUnlocked` lets it write unlocked.
            guard configuration.locking.failurePolicy == .proceedUnlocked else {
                statistics.count(.lockFailures)
                throw SessionError(
                    code: .lockUnavailable,
                    message: "the session's lock ran out and could not be taken again (its node did not answer); the request's changes were not saved")
            }
            return nil
        }
        switch (read, session.storedCasUnique) {
        case (.found(let stored), let expected?) where stored.casUnique == expected:
            return relocked  // nobody wrote meanwhile
        case (.missing, nil):
            return relocked  // still to be placed there (its write is an add)
        default:
            break
        }
        await release(relocked)
        statistics.count(.lockConflicts)
        throw Self.conflictError
    }

    /// The longest a lock is renewed: a request that never ends (a bug, or an adapter that never
    /// calls `endRequest`) must not lock its session forever.
    var maximumLockHold: TimeAmount {
        TimeAmount(max(configuration.locking.expiry * 60, .seconds(300)))
    }

    /// Renews, concurrently, the leases of locks held for more than a third of the lock expiry.
    /// Runs in `run()`.
    func renewPeriodically() async {
        let interval = configuration.locking.expiry / 3
        while !Task.isCancelled {
            // Woken four times per renewal interval: a renewal is sent at most a quarter interval
            // late, well within the lease.
            do { try await clock.sleep(for: min(interval / 4, .milliseconds(250))) } catch { return }
            let now = clock.now()
            let due = now - TimeAmount(interval)
            var renewals: [HeldLock] = []
            for lock in held.all where lock.renewedAt <= due && !lock.isReleasing {
                if now - lock.acquiredAt > maximumLockHold {
                    held.remove(lock)
                    logger.warning(
                        "a session lock was held longer than the maximum; it is no longer renewed",
                        metadata: ["memcached.node": "\(lock.nodeID)"])
                    continue
                }
                renewals.append(lock)
            }
            await withDiscardingTaskGroup { group in
                for lock in renewals { group.addTask { await self.renew(lock) } }
            }
        }
    }
}

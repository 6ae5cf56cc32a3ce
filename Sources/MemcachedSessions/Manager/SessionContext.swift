import Logging
import Memcached
import NIOCore
import Synchronization

/// What every part of a session manager shares: its settings, statistics, log, clock and random
/// numbers, and the nodes and switches in force (which a run-time reconfiguration changes).
///
/// The parts themselves (``SessionStore``, ``SessionLocks``, the lifecycles) each own their state
/// and behaviour; this holds only what they all read.
final class SessionContext: Sendable {
    let configuration: SessionManager.Configuration
    let statistics: SessionStatistics
    /// Seals and opens stored envelopes; nil without sealing keys.
    let sealer: SessionSealer?
    let logger: Logger
    let events = EventLog()
    /// The manager's time (the system's, or a simulation's).
    let clock: any SessionClock
    /// A simulation's seeded random numbers; nil: the system's CSPRNG.
    let entropy: (any SessionEntropy)?
    /// What can change while the manager runs (MSM's JMX operations): the nodes, the failover
    /// nodes, the locking mode, enabled.
    let runtime: Mutex<RuntimeState>
    let attributeFilter: PathPattern?
    let defaultIdleSeconds: Int64
    let defaultAbsoluteSeconds: Int64
    /// The storage-key transition's times in milliseconds since 1970.
    let keyedFromMillis: Int64?
    let acceptUnkeyedUntilMillis: Int64?

    init(
        configuration: SessionManager.Configuration, statistics: SessionStatistics, sealer: SessionSealer?, logger: Logger,
        clock: any SessionClock, entropy: (any SessionEntropy)?, runtime: RuntimeState
    ) throws(SessionError) {
        self.configuration = configuration
        self.statistics = statistics
        self.sealer = sealer
        self.logger = logger
        self.clock = clock
        self.entropy = entropy
        self.runtime = Mutex(runtime)
        self.attributeFilter = try configuration.attributeFilter.map { pattern throws(SessionError) in
            try PathPattern(pattern, setting: "attributeFilter")
        }
        self.defaultIdleSeconds = max(0, configuration.timeouts.idle.components.seconds)
        self.defaultAbsoluteSeconds = configuration.timeouts.absolute.map { max(1, $0.components.seconds) } ?? 0
        self.keyedFromMillis = configuration.sealing.keyedStorageKeysFrom.map { Int64(($0.timeIntervalSince1970 * 1000).rounded()) }
        self.acceptUnkeyedUntilMillis = configuration.sealing.acceptUnkeyedUntil.map { Int64(($0.timeIntervalSince1970 * 1000).rounded()) }
    }

    /// The nodes and placement rules in force.
    var topology: NodeTopology { runtime.withLock { $0.topology } }

    /// Whether memcached is used (``SessionManager/Configuration/enabled``, changeable at run time).
    var isEnabled: Bool { runtime.withLock { $0.enabled } }

    /// The locking mode in force (changeable at run time).
    var lockingMode: SessionManager.LockingMode { runtime.withLock { $0.locking } }

    /// Milliseconds since 1970 on the manager's clock: what sessions store and expire by.
    func currentTimeMillis() -> Int64 {
        clock.wallMilliseconds()
    }

    /// Applies the cancellation rule of the current phase to a request: while a request ends, and
    /// in background work, memcached requests complete even if the task is cancelled (the client
    /// went away), so that locks are released and changes saved.
    func prepared(_ request: MemcachedRequest) -> MemcachedRequest {
        guard SessionManager.isEnding || SessionManager.isBackgroundWork else { return request }
        var request = request
        request.honorsCancellation = false
        return request
    }

    /// Counts a memcached round trip a request waits for.
    func countRoundTrip() {
        if !SessionManager.isBackgroundWork { statistics.count(.memcachedRoundTrips) }
    }

    func keys(for token: MemcachedSessionID.Token) -> SessionKeys {
        SessionKeys(token: token, prefix: configuration.keyPrefix, secret: storageKeySecret)
    }

    /// A session's keys, computed once per session and token. Non-sticky, a request keeps the
    /// keys it loaded its session under: one that straddles a storage-key switch writes where it
    /// read, and the next request moves the copy. Sticky sessions outlive requests and follow the
    /// switch: their next save writes the keyed key.
    func keys(of session: MemcachedSession) -> SessionKeys {
        session.keys(prefix: configuration.keyPrefix, secret: storageKeySecret, followsSwitch: configuration.mode == .sticky)
    }

    /// The storage-key secret in force: none before ``SessionManager/Configuration/Sealing/keyedStorageKeysFrom``.
    var storageKeySecret: StorageKeySecret? {
        guard let secret = configuration.sealing.storageKeySecret else { return nil }
        guard let from = keyedFromMillis else { return secret }
        return currentTimeMillis() >= from ? secret : nil
    }

    /// Whether a session not found under its keyed key is looked for under its SHA-256 one
    /// (a storage-key transition's window, ``SessionManager/Configuration/Sealing/acceptUnkeyedUntil``).
    var acceptsUnkeyed: Bool {
        guard configuration.sealing.storageKeySecret != nil, let until = acceptUnkeyedUntilMillis else { return false }
        let now = currentTimeMillis()
        return now < until && now >= (keyedFromMillis ?? .min)
    }

    /// In the minute before a storage-key switch, on an instance that holds the secret: the
    /// session's keyed keys, where an instance whose clock is ahead may already have moved it
    /// (its unkeyed copy then reads as ended or missing here). Else nil.
    func keyedKeysBeforeSwitch(for token: MemcachedSessionID.Token) -> SessionKeys? {
        guard let secret = configuration.sealing.storageKeySecret, let from = keyedFromMillis else { return nil }
        let now = currentTimeMillis()
        guard now < from, now >= from - 60_000 else { return nil }
        return SessionKeys(token: token, prefix: configuration.keyPrefix, secret: secret)
    }

    /// Around a storage-key switch (from a minute before it, the clock skew an instance may have,
    /// to the end of the window, or a minute after it without one): the session's keys in the
    /// form other than `keys`'s, which an instance on the other side of the switch uses. Else nil,
    /// and nil for keys made from a digest alone (the principal index's entries are named in
    /// both forms by ``Principals`` itself).
    func otherKeyForm(of keys: SessionKeys) -> SessionKeys? {
        guard let token = keys.token, let secret = configuration.sealing.storageKeySecret, let from = keyedFromMillis else {
            return nil
        }
        let now = currentTimeMillis()
        guard now >= from - 60_000, now < max(acceptUnkeyedUntilMillis ?? .min, from + 60_000) else { return nil }
        return SessionKeys(token: token, prefix: configuration.keyPrefix, secret: keys.isKeyed ? nil : secret)
    }

    /// In the minute before a storage-key switch, on an instance that holds the secret: the keys
    /// and the principal index here are still unkeyed, while an instance whose clock is ahead may
    /// hold the same sessions under their keyed keys already.
    var isShortOfKeySwitch: Bool {
        guard configuration.sealing.storageKeySecret != nil, let from = keyedFromMillis else { return false }
        let now = currentTimeMillis()
        return now < from && now >= from - 60_000
    }

    /// The session's earlier (SHA-256) keys, in a storage-key transition's window; else nil.
    func unkeyedKeys(for token: MemcachedSessionID.Token) -> SessionKeys? {
        acceptsUnkeyed ? SessionKeys(token: token, prefix: configuration.keyPrefix) : nil
    }

    // MARK: - sessions

    func makeSession(id: MemcachedSessionID, record: SessionRecord, casUnique: UInt64?, isNew: Bool) -> MemcachedSession {
        MemcachedSession(id: id, record: record, casUnique: casUnique, isNew: isNew, codec: configuration.codec, attributeFilter: attributeFilter)
    }

    func newSessionRecord(now: Int64) -> SessionRecord {
        SessionRecord(
            metadata: SessionMetadata(
                createdAt: now, lastAccessedAt: now, idleTimeoutSeconds: defaultIdleSeconds,
                absoluteTimeoutSeconds: defaultAbsoluteSeconds, version: 0),
            attributes: [:])
    }

    /// A stored session that is past its absolute timeout is expired: deleted and not served.
    func isExpired(_ record: SessionRecord, now: Int64) -> Bool {
        record.metadata.isPastAbsoluteTimeout(now: now)
    }

    /// A node for a new session.
    func placementNode() -> String {
        topology.placeNew()
    }

    /// ``CopyLifetimes/horizonSeconds(idle:)`` under the default idle timeout.
    var copyHorizonSeconds: Int64 { CopyLifetimes.horizonSeconds(idle: defaultIdleSeconds) }

    /// The session's nodes did not answer: the unavailable policy decides (an error, or no
    /// session).
    func unavailable(id: MemcachedSessionID, cause: String) throws(SessionError) -> MemcachedSession? {
        statistics.count(.unavailable)
        logger.warning("session unavailable", metadata: ["memcached.node": "\(id.nodeID)", "cause": "\(cause)"])
        switch configuration.unavailablePolicy {
        case .fail:
            throw SessionError.unavailable("the session's memcached node did not answer: \(cause)")
        case .startNewSession:
            return nil
        }
    }

    func cookieAction(_ cookie: SessionResponseAction.Cookie, _ metadata: SessionMetadata) -> SessionResponseAction {
        SessionResponseAction(cookie: cookie, idleTimeout: metadata.idleTimeout)
    }

    // MARK: - random numbers

    /// 64 random bits: the system's CSPRNG, or a simulation's seeded generator.
    func randomUInt64() -> UInt64 {
        if let entropy { return entropy.next() }
        var generator = SystemRandomNumberGenerator()
        return generator.next()
    }

    /// A new random token (session ids, lock values).
    func randomToken() -> MemcachedSessionID.Token {
        if entropy == nil { return .random() }
        return MemcachedSessionID.Token(high: randomUInt64(), low: randomUInt64())
    }

    /// A new session id on `nodeID`.
    func generateID(nodeID: String, route: String?) -> MemcachedSessionID {
        MemcachedSessionID(token: randomToken(), nodeID: nodeID, route: route)
    }

    /// A uniform random number in `0..<1` (backoff jitter).
    func unitRandom() -> Double {
        Double(randomUInt64() >> 11) / Double(UInt64(1) << 53)
    }
}

/// A part of the session manager (its store, its locks, a lifecycle): it reads the shared
/// ``SessionContext`` through these names.
protocol SessionManagerPart: Sendable {
    var context: SessionContext { get }
}

extension SessionManagerPart {
    var configuration: SessionManager.Configuration { context.configuration }
    var statistics: SessionStatistics { context.statistics }
    var logger: Logger { context.logger }
    var events: EventLog { context.events }
    var clock: any SessionClock { context.clock }
    var topology: NodeTopology { context.topology }
    var isEnabled: Bool { context.isEnabled }
    var defaultIdleSeconds: Int64 { context.defaultIdleSeconds }
    func currentTimeMillis() -> Int64 { context.currentTimeMillis() }
    func prepared(_ request: MemcachedRequest) -> MemcachedRequest { context.prepared(request) }
    func countRoundTrip() { context.countRoundTrip() }
    func keys(for token: MemcachedSessionID.Token) -> SessionKeys { context.keys(for: token) }
    func keys(of session: MemcachedSession) -> SessionKeys { context.keys(of: session) }
}

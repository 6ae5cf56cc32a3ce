import CoreMetrics
import Logging
import Memcached
import NIOCore
import NIOPosix
import ServiceLifecycle
import Synchronization

/// Highly available HTTP sessions in memcached: the framework-agnostic heart of the product.
///
/// Web framework adapters call ``beginRequest(path:sessionCookie:)`` when a request arrives (no
/// I/O), hand the returned ``SessionAccess`` to the handler, and call
/// ``endRequest(_:)`` when the handler is done (also when it threw): that saves what changed,
/// releases the lock, and says which cookie the response must carry.
///
/// The manager is a `Service`: run ``run()`` (e.g. in a `ServiceGroup`) while it is used. It runs
/// the memcached client, lock renewal, the sticky asynchronous writer and the local-memory sweeper,
/// and on graceful shutdown flushes the queued asynchronous writes before it returns.
public final class SessionManager: Service, Sendable {
    public let configuration: Configuration
    public let statistics: SessionStatistics
    let logger: Logger
    /// What can change while the manager runs (MSM's JMX operations): the nodes, the failover
    /// nodes, the locking mode, enabled.
    let runtime: Mutex<RuntimeState>
    /// Running memcached clients: the current one and any retiring after a node change.
    let clientTasks = Mutex<ClientTasks>(ClientTasks())
    /// Held for the whole of a run-time change, so that concurrent changes never interleave.
    let reconfiguration = Mutex<Void>(())
    let events = EventLog()
    let history = StatusHistory()
    let eventLoopGroup: any EventLoopGroup
    let metricsFactory: (any MetricsFactory)?
    let localStore: LocalSessionStore
    let backupMemo: BackupMemo
    let heldLocks = HeldLocks()
    let leftovers = LeftoverCopies()
    /// Sticky: when this instance last read its ownership notices.
    let notices = OwnershipNotices()
    let nodeRestarts = NodeRestarts()
    let readOnlyPaths: ReadOnlyPaths
    let ignoredPaths: PathPattern?
    let attributeFilter: PathPattern?
    let writer: AsynchronousWriter
    let byteBufferAllocator = ByteBufferAllocator()
    let defaultIdleSeconds: Int64
    let defaultAbsoluteSeconds: Int64
    /// Sticky: how often an unchanged session's memcached TTL is slid.
    let stickyTouchInterval: TimeAmount
    let ownsClient: Bool
    /// The manager's time (the system's, or a simulation's).
    let clock: any SessionClock
    /// A simulation's seeded random numbers; nil: the system's CSPRNG.
    let entropy: (any SessionEntropy)?

    /// Creates a manager with its own memcached client over the configured nodes.
    /// - Throws: ``SessionError/Code/invalidConfiguration`` naming the setting at fault.
    public convenience init(
        configuration: Configuration,
        eventLoopGroup: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
        logger: Logger = Logger(label: "memcached-sessions", factory: { _ in SwiftLogNoOpLogHandler() }),
        metricsFactory: (any MetricsFactory)? = nil
    ) throws(SessionError) {
        try configuration.validate()
        var clientConfiguration = configuration.memcached
        if clientConfiguration.metricsFactory == nil { clientConfiguration.metricsFactory = metricsFactory }
        let client: MemcachedClient
        do {
            client = try MemcachedClient(configuration: clientConfiguration, eventLoopGroup: eventLoopGroup, logger: logger)
        } catch {
            throw .configuration(error.message)
        }
        try self.init(
            configuration: configuration, nodes: client, ownsClient: true, eventLoopGroup: eventLoopGroup, logger: logger,
            metricsFactory: metricsFactory, clock: SystemSessionClock(), entropy: nil)
    }

    /// Creates a manager over an existing client, which the caller runs. The client's nodes must
    /// be those of `configuration.memcached`.
    public convenience init(
        configuration: Configuration, client: MemcachedClient,
        logger: Logger = Logger(label: "memcached-sessions", factory: { _ in SwiftLogNoOpLogHandler() }),
        metricsFactory: (any MetricsFactory)? = nil
    ) throws(SessionError) {
        try configuration.validate()
        try self.init(
            configuration: configuration, nodes: client, ownsClient: false, eventLoopGroup: MultiThreadedEventLoopGroup.singleton,
            logger: logger, metricsFactory: metricsFactory, clock: SystemSessionClock(), entropy: nil)
    }

    /// Creates a manager over another implementation of the command-level seam (a simulated
    /// cluster), on a clock and with random numbers the caller drives. For simulations: such a
    /// manager has no ``client`` (and its nodes cannot change at run time).
    @_spi(Simulation)
    public convenience init(
        configuration: Configuration, nodes: any MemcachedNodeSet, clock: any SessionClock, entropy: any SessionEntropy,
        logger: Logger = Logger(label: "memcached-sessions", factory: { _ in SwiftLogNoOpLogHandler() }),
        metricsFactory: (any MetricsFactory)? = nil
    ) throws(SessionError) {
        try configuration.validate()
        try self.init(
            configuration: configuration, nodes: nodes, ownsClient: false, eventLoopGroup: MultiThreadedEventLoopGroup.singleton,
            logger: logger, metricsFactory: metricsFactory, clock: clock, entropy: entropy)
    }

    private init(
        configuration: Configuration, nodes: any MemcachedNodeSet, ownsClient: Bool, eventLoopGroup: any EventLoopGroup,
        logger: Logger, metricsFactory: (any MetricsFactory)?, clock: any SessionClock, entropy: (any SessionEntropy)?
    ) throws(SessionError) {
        self.configuration = configuration
        self.clock = clock
        self.entropy = entropy
        self.logger = logger
        self.ownsClient = ownsClient
        self.eventLoopGroup = eventLoopGroup
        self.metricsFactory = metricsFactory
        var lockPattern: PathPattern? = nil
        if case .uriPattern(let pattern) = configuration.locking.mode {
            lockPattern = try PathPattern(pattern, setting: "locking uriPattern")
        }
        self.runtime = Mutex(
            RuntimeState(
                topology: NodeTopology(nodes: nodes, failoverNodes: configuration.failoverNodes, clock: clock),
                locking: configuration.locking.mode,
                lockPattern: lockPattern, enabled: configuration.enabled, nodes: configuration.memcached.nodes,
                failoverNodes: configuration.failoverNodes))
        self.statistics = SessionStatistics(
            enabled: configuration.statisticsEnabled, factory: metricsFactory ?? MetricsSystem.factory)
        self.localStore = LocalSessionStore(capacity: configuration.sticky.localSessionLimit)
        self.backupMemo = BackupMemo(limit: max(configuration.sticky.localSessionLimit, 10_000), clock: clock)
        self.readOnlyPaths = ReadOnlyPaths(limit: configuration.locking.autoPathLimit)
        self.ignoredPaths = try configuration.ignoredPathPattern.map { pattern throws(SessionError) in
            try PathPattern(pattern, setting: "ignoredPathPattern")
        }
        self.attributeFilter = try configuration.attributeFilter.map { pattern throws(SessionError) in
            try PathPattern(pattern, setting: "attributeFilter")
        }
        self.defaultIdleSeconds = max(0, configuration.timeouts.idle.components.seconds)
        self.defaultAbsoluteSeconds = configuration.timeouts.absolute.map { max(1, $0.components.seconds) } ?? 0
        self.stickyTouchInterval = TimeAmount(
            configuration.sticky.touchInterval ?? .seconds(CopyLifetimes.refreshWindowSeconds(idle: defaultIdleSeconds)))
        self.writer = AsynchronousWriter(
            limit: configuration.sticky.queueLimit, delay: TimeAmount(configuration.sticky.saveDelay), clock: clock)
        if configuration.mode == .sticky, configuration.route == nil, configuration.enabled {
            logger.notice(
                "sticky mode without a route: another instance cannot take a session over explicitly; set `route` (MSM's jvmRoute)")
        }
    }

    /// The memcached client the manager uses now (a node change replaces it). A simulation's
    /// manager (over another node set) has none: asking for it is a programming error.
    public var client: MemcachedClient {
        guard let client = topology.client else { preconditionFailure("a manager over a simulated node set has no client") }
        return client
    }

    /// The nodes and placement rules in force.
    var topology: NodeTopology { runtime.withLock { $0.topology } }

    /// Whether memcached is used (``Configuration/enabled``, changeable at run time).
    public var isEnabled: Bool { runtime.withLock { $0.enabled } }

    /// The locking mode in force (changeable at run time).
    public var lockingMode: LockingMode { runtime.withLock { $0.locking } }

    /// Sticky mode: changed sessions waiting for the asynchronous writer.
    public var pendingAsynchronousWrites: Int { writer.pendingCount }

    /// Sticky mode: sessions held in this instance's memory.
    public var localSessionCount: Int { localStore.count }

    // MARK: - Service

    /// Runs the manager's background work until graceful shutdown or cancellation, then flushes
    /// the asynchronous writes still queued (sticky mode) and, if it owns it, stops the client.
    public func run() async throws {
        logger.info(
            "session manager running",
            metadata: [
                "mode": "\(configuration.mode.rawValue)", "locking": "\(lockingMode)",
                "nodes": "\(configuration.memcached.nodes.map(\.description))",
            ])
        // The client runs in a detached task, not a child of this one: it must outlive the flush
        // of queued writes, whereas a child task would be cancelled at once with its parent, and
        // any task inheriting this one's task locals would see the graceful shutdown too. It is
        // stopped, and awaited, right after the flush.
        if ownsClient, let client = topology.client { startClient(client) }
        await cancelWhenGracefulShutdown {
            await withDiscardingTaskGroup { background in
                background.addTask { await self.writer.run(manager: self) }
                background.addTask { await self.renewLocksPeriodically() }
                background.addTask { await self.sweepLocalSessionsPeriodically() }
                background.addTask { await self.retryFailedSavesPeriodically() }
                background.addTask { await self.watchNodeRestartsPeriodically() }
                background.addTask { await self.recordStatusPeriodically() }
                background.addTask { await self.cleanLeftoversPeriodically() }
                background.addTask { await self.readNoticesPeriodically() }
            }
        }
        // The writer has flushed its queue; now stop the clients.
        await stopClients()
        logger.info("session manager stopped")
    }

    private func retryFailedSavesPeriodically() async {
        guard configuration.mode == .sticky else { return }
        while !Task.isCancelled {
            do { try await clock.sleep(for: AsynchronousWriter.retryInterval) } catch { return }
            if writer.retryCount > 0 { writer.requeueRetries() }
        }
    }

    private func sweepLocalSessionsPeriodically() async {
        while !Task.isCancelled {
            do { try await clock.sleep(for: .seconds(5)) } catch { return }
            let removed = localStore.sweep(now: currentTimeMillis())
            if removed > 0 { statistics.count(.sessionsExpired, removed) }
        }
    }

    // MARK: - request lifecycle

    /// Starts a request: parses the session cookie (strictly: anything but a well-formed id is
    /// "no session") and decides whether the request locks. No I/O happens here; the session is
    /// loaded when the handler first asks for it.
    ///
    /// `allowLocking: false` opts the request out of locking whatever the locking mode (for
    /// adapters that cannot guarantee ``endRequest(_:)`` runs, such as Vapor's own middleware).
    public func beginRequest(path: String, sessionCookie: String?, allowLocking: Bool = true) -> SessionAccess {
        if let ignoredPaths, ignoredPaths.matches(path) {
            statistics.count(.requestsIgnored)
            return SessionAccess(manager: self, incomingID: nil, path: path, ignored: true, locks: false)
        }
        let id = sessionCookie.flatMap { SessionID(parsing: $0) }
        statistics.count(id == nil ? .requestsWithoutSession : .requestsWithSession)
        let locking = allowLocking && id != nil && locks(path: path)
        if id != nil, !locking, case .auto = lockingMode, !usesLocalLifecycle {
            statistics.count(.requestsUnlockedReadOnly)
        }
        return SessionAccess(manager: self, incomingID: id, path: path, ignored: false, locks: locking)
    }

    /// Whether requests on `path` skip sessions entirely (the ignore pattern).
    public func isIgnored(path: String) -> Bool {
        ignoredPaths?.matches(path) ?? false
    }

    /// Ends a request: saves what changed, slides TTLs, releases the lock, and says which cookie the
    /// response carries. Call it also when the handler threw, so that the lock is released.
    /// - Throws: ``SessionError/Code/unavailable`` when a changed session could be saved nowhere
    ///   and the unavailable policy is ``UnavailablePolicy/fail``.
    public func endRequest(_ access: SessionAccess) async throws(SessionError) -> SessionResponseAction {
        let start = NIODeadline.now()
        defer { statistics.time(.end, since: start) }
        // Memcached requests made while ending complete even if the request's task is cancelled
        // (the client went away): the lock is released and what changed is saved.
        let result = await Self.$isEnding.withValue(true) { () async -> Result<SessionResponseAction, SessionError> in
            do throws(SessionError) {
                return .success(try await access.end())
            } catch {
                return .failure(error)
            }
        }
        return try result.get()
    }

    // MARK: - helpers shared by the lifecycles

    func keys(for token: SessionID.Token) -> SessionKeys {
        SessionKeys(token: token, prefix: configuration.keyPrefix)
    }

    /// A session's keys, computed once per session and token.
    func keys(of session: Session) -> SessionKeys {
        session.keys(prefix: configuration.keyPrefix)
    }

    func makeSession(id: SessionID, record: SessionRecord, casUnique: UInt64?, isNew: Bool) -> Session {
        Session(id: id, record: record, casUnique: casUnique, isNew: isNew, codec: configuration.codec, attributeFilter: attributeFilter)
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
}

/// What the response must do about the session cookie.
public struct SessionResponseAction: Sendable, Hashable {
    public enum Cookie: Sendable, Hashable {
        /// Leave the browser's cookie as it is (the common case: no `Set-Cookie`).
        case unchanged
        /// Send this session id (a new session, a relocation, a takeover or a regenerated id).
        case set(SessionID)
        /// Clear the cookie (the session was invalidated or is gone).
        case clear
    }

    public var cookie: Cookie
    /// The idle timeout of the session the cookie names, for a cookie `Max-Age` if wanted.
    public var idleTimeout: Duration?

    public init(cookie: Cookie, idleTimeout: Duration? = nil) {
        self.cookie = cookie
        self.idleTimeout = idleTimeout
    }

    public static let unchanged = SessionResponseAction(cookie: .unchanged)
}

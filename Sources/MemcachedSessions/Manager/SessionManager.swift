import CoreMetrics
import Logging
import Memcached
import NIOCore
import NIOPosix
import ServiceLifecycle
import Synchronization

/// Highly available HTTP sessions in memcached: the framework-agnostic heart of the product.
///
/// Web framework adapters call ``beginRequest(path:sessionCookie:allowLocking:)`` when a request arrives (no
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
    /// What the manager's parts share: settings, statistics, log, clock, the nodes in force.
    let context: SessionContext
    /// The sessions' copies in memcached.
    let store: SessionStore
    /// The mode's lifecycle, chosen once (``Configuration/mode``).
    let lifecycle: any SessionLifecycle
    /// Sticky mode's lifecycle (the same object as ``lifecycle``), or, in non-sticky mode, the one
    /// that serves sessions from memory while memcached is switched off at run time.
    let sticky: StickyLifecycle
    /// The per-principal index, its limits and revocations.
    let principals: Principals
    /// Running memcached clients: the current one and any retiring after a node change.
    let clientTasks = Mutex<ClientTasks>(ClientTasks())
    /// Held for the whole of a run-time change, so that concurrent changes never interleave.
    let reconfiguration = Mutex<Void>(())
    let history = StatusHistory()
    let eventLoopGroup: any EventLoopGroup
    package let metricsFactory: (any MetricsFactory)?
    let ignoredPaths: PathPattern?
    let ownsClient: Bool

    /// Creates a manager with its own memcached client over the configured nodes, on
    /// `eventLoopGroup`, which must outlive ``run()``: the client's connections and the manager's
    /// background work (run on one of its loops) end with it.
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
        if clientConfiguration.tracing.tracer == nil { clientConfiguration.tracing.tracer = configuration.tracing.tracer }
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
        self.ownsClient = ownsClient
        self.eventLoopGroup = eventLoopGroup
        self.metricsFactory = metricsFactory
        var lockPattern: PathPattern? = nil
        if case .uriPattern(let pattern) = configuration.locking.mode {
            lockPattern = try PathPattern(pattern, setting: "locking uriPattern")
        }
        let factory = metricsFactory ?? MetricsSystem.factory
        let sealer = configuration.sealing.keys.map { SessionSealer(ring: $0, metrics: factory) }
        self.statistics = SessionStatistics(enabled: configuration.statisticsEnabled, factory: factory, sealer: sealer)
        self.context = try SessionContext(
            configuration: configuration, statistics: statistics, sealer: sealer, logger: logger, clock: clock, entropy: entropy,
            runtime: RuntimeState(
                topology: NodeTopology(nodes: nodes, failoverNodes: configuration.failoverNodes, clock: clock),
                locking: configuration.locking.mode,
                lockPattern: lockPattern, enabled: configuration.enabled, nodes: configuration.memcached.nodes,
                failoverNodes: configuration.failoverNodes))
        self.store = SessionStore(context: context, locks: SessionLocks(context: context))
        self.sticky = StickyLifecycle(context: context, store: store)
        self.principals = Principals(context: context, store: store, sticky: sticky)
        switch configuration.mode {
        case .sticky: self.lifecycle = sticky
        case .nonSticky: self.lifecycle = NonStickyLifecycle(context: context, store: store)
        }
        self.ignoredPaths = try configuration.ignoredPathPattern.map { pattern throws(SessionError) in
            try PathPattern(pattern, setting: "ignoredPathPattern")
        }
        if configuration.mode == .sticky, configuration.route == nil, configuration.enabled {
            logger.notice(
                "sticky mode without a route: another instance cannot take a session over explicitly; set `route` (MSM's jvmRoute)")
        }
    }

    package var logger: Logger { context.logger }
    var events: EventLog { context.events }
    var clock: any SessionClock { context.clock }

    /// The memcached client the manager uses now (a node change replaces it). A simulation's
    /// manager (over another node set) has none: asking for it is a programming error.
    public var client: MemcachedClient {
        guard let client = topology.client else { preconditionFailure("a manager over a simulated node set has no client") }
        return client
    }

    /// The nodes and placement rules in force.
    var topology: NodeTopology { context.topology }

    /// Whether memcached is used (``Configuration/enabled``, changeable at run time).
    public var isEnabled: Bool { context.runtime.withLock { $0.enabled } }

    /// The locking mode in force (changeable at run time).
    public var lockingMode: LockingMode { context.runtime.withLock { $0.locking } }

    /// Sticky mode: changed sessions waiting for the asynchronous writer.
    public var pendingAsynchronousWrites: Int { sticky.writer.pendingCount }

    /// Sticky mode: sessions held in this instance's memory.
    public var localSessionCount: Int { sticky.localStore.count }

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
        // The background work (the asynchronous writer's batches, lock renewals, the nodes'
        // watch) runs on one of the group's event loops, where the memcached client reads the
        // replies of its round trips: no thread hop per round trip. Only over the client this
        // manager made on that group (a caller's client may run on another group; a simulated
        // cluster runs every job on its own scheduler's thread). The group must outlive `run()`:
        // NIO drops the jobs of a loop that has shut down.
        let executor = ownsClient ? topology.client.map { _ in EventLoopExecutor.for(eventLoopGroup.next()) } : nil
        await Self.$backgroundExecutor.withValue(executor) {
            await withTaskExecutorPreference(executor) {
                await cancelWhenGracefulShutdown {
                    await withDiscardingTaskGroup { background in
                        background.addTask { await self.lifecycle.run() }
                        if self.lifecycle !== self.sticky {
                            // Memory-only sessions while memcached is switched off (swept, never written).
                            background.addTask { await self.sticky.run() }
                        }
                        background.addTask { await self.store.run() }
                        background.addTask { await self.recordStatusPeriodically() }
                    }
                }
            }
        }
        // The writer has flushed its queue; now stop the clients.
        await stopClients()
        logger.info("session manager stopped")
    }

    // MARK: - principals

    /// Ends every session of `principal` (``MemcachedSession/setPrincipal(_:)``) on every
    /// instance: use it after a password change. Returns how many sessions the index held.
    ///
    /// Every copy in memcached is tombstoned, as a logout leaves it. This instance's copies in
    /// memory end at once; another sticky instance that holds one (named by the session's route)
    /// is sent a notice and, while it is alive, has dropped its copy before this returns.
    /// - Throws: ``SessionError/Code/principalIndexUnavailable`` when the index cannot be read
    ///   (its nodes down, or it may have been evicted) or rewritten; the error's
    ///   ``SessionError/sessionsEnded`` says how many sessions were ended. Never a silent partial
    ///   revocation.
    public func invalidateAll(principal: String) async throws(SessionError) -> Int {
        let bytes: ByteBuffer
        do {
            bytes = try configuration.codec.encodeValue(principal)
        } catch {
            throw SessionError(code: .encodingFailed, message: "the principal could not be encoded: \(error.reason)")
        }
        return try await principals.invalidateAll(bytes)
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
            return SessionAccess(
                context: context, lifecycle: sticky, principals: principals, incomingID: nil, path: path, ignored: true, locks: false)
        }
        let id = sessionCookie.flatMap { MemcachedSessionID(parsing: $0) }
        statistics.count(id == nil ? .requestsWithoutSession : .requestsWithSession)
        let lifecycle = context.isEnabled ? self.lifecycle : sticky
        let locking = allowLocking && id != nil && store.locks.locksRequest(onPath: path)
        if id != nil, !locking, configuration.mode == .nonSticky, case .auto = lockingMode, lifecycle is NonStickyLifecycle {
            statistics.count(.requestsUnlockedReadOnly)
        }
        return SessionAccess(
            context: context, lifecycle: lifecycle, principals: principals, incomingID: id, path: path, ignored: false, locks: locking)
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
            func end() async -> Result<SessionResponseAction, SessionError> {
                do throws(SessionError) {
                    return .success(try await access.end())
                } catch {
                    return .failure(error)
                }
            }
            // A span for the requests that opened their session (the others end without one).
            guard context.configuration.tracing.tracer != nil, access.current != nil else { return await end() }
            return await context.traced("session.save", end) { action, attributes in
                switch action.cookie {
                case .unchanged: attributes["msm.cookie"] = "unchanged"
                case .set: attributes["msm.cookie"] = "set"
                case .clear: attributes["msm.cookie"] = "clear"
                }
            }
        }
        return try result.get()
    }

    /// The memcached keys of a session's token (under this manager's key prefix).
    func keys(for token: MemcachedSessionID.Token) -> SessionKeys {
        context.keys(for: token)
    }
}

extension SessionManager {
    /// Item flags marking a tombstone (`MSXT`): an invalidated session's key.
    public static let tombstoneFlags: UInt32 = 0x4D53_5854

    /// Set for the asynchronous writer's work: its round trips are not waited for by a request.
    @TaskLocal static var isBackgroundWork = false

    /// The executor ``run()`` runs the background work on (an event loop's), if any: for the
    /// detached tasks of that work, which do not inherit the preference.
    @TaskLocal static var backgroundExecutor: (any TaskExecutor)?

    /// Set while a request ends: its memcached requests complete even if the request's task is
    /// cancelled (the client went away), so that locks are released and changes saved.
    @TaskLocal static var isEnding = false

    /// Milliseconds since 1970 on the system clock: for what is only shown (event log, status).
    static func systemTimeMillis() -> Int64 {
        SystemSessionClock().wallMilliseconds()
    }
}

/// What the response must do about the session cookie.
public struct SessionResponseAction: Sendable, Hashable {
    public enum Cookie: Sendable, Hashable {
        /// Leave the browser's cookie as it is (the common case: no `Set-Cookie`).
        case unchanged
        /// Send this session id (a new session, a relocation, a takeover or a regenerated id).
        case set(MemcachedSessionID)
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

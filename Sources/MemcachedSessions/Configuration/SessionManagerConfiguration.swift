import Foundation
import Memcached

extension SessionManager {
    /// Where sessions live between requests.
    public enum Mode: String, Sendable, Hashable, CaseIterable, Codable {
        /// The load balancer sends a session's requests to the instance that owns it (MSM's sticky
        /// mode). The instance's memory is authoritative; memcached holds a copy for failover.
        case sticky
        /// Any request may land on any instance: the session is read from memcached at the start of
        /// a request and written back (primary and backup node) at the end.
        case nonSticky = "non-sticky"
    }

    /// Which requests take the session's lock (non-sticky mode only).
    public enum LockingMode: Sendable, Hashable, CustomStringConvertible {
        /// No locking: concurrent requests are reconciled by CAS writes that re-apply only what each
        /// request changed.
        case none
        /// Every request that opens the session holds its lock until the end.
        case all
        /// Like ``all``, except for request paths seen to only read the session, which run unlocked
        /// until one of them writes.
        case auto
        /// Requests whose path matches this regular expression take the lock.
        case uriPattern(String)

        public var description: String {
            switch self {
            case .none: return "none"
            case .all: return "all"
            case .auto: return "auto"
            case .uriPattern(let pattern): return "uriPattern(\(pattern))"
            }
        }

        /// Parses `none`, `all`, `auto` or `uriPattern:<regex>`.
        public init(parsing text: String) throws(SessionError) {
            switch text {
            case "none": self = .none
            case "all": self = .all
            case "auto": self = .auto
            default:
                if text.hasPrefix("uriPattern:") {
                    self = .uriPattern(String(text.dropFirst("uriPattern:".count)))
                } else {
                    throw .configuration("locking mode '\(text)' is not none, all, auto or uriPattern:<regex>")
                }
            }
        }
    }

    /// What a request gets when no memcached node that could hold its session answers.
    public enum UnavailablePolicy: String, Sendable, Hashable, Codable {
        /// The request fails with ``SessionError/Code/unavailable`` (adapters answer 503): a user is
        /// never silently logged out because a node is slow or down.
        case fail
        /// The request continues without its session, as if it had none (MSM's behaviour).
        case startNewSession
    }

    /// What a request gets when the session's lock cannot be had within the wait budget.
    public enum LockFailurePolicy: String, Sendable, Hashable, Codable {
        /// The request fails with ``SessionError/Code/lockUnavailable`` (adapters answer 503).
        case fail
        /// The request proceeds without the lock; its write is still a CAS write.
        case proceedUnlocked
    }

    /// The session manager's settings, grouped by concern: ``memcached`` (the nodes, the protocol,
    /// timeouts; later TLS and authentication), ``timeouts``, ``sticky``, ``locking`` and
    /// ``cookie``; the rest apply to every mode. MSM's settings under Swift names (each setting
    /// names its MSM counterpart). The flat names of earlier releases (`lockExpiry`,
    /// `asynchronousSaving`, ...) remain as deprecated aliases for one release.
    public struct Configuration: Sendable {
        /// The memcached client's settings, among them the nodes (`memcachedNodes`), the protocol
        /// (meta, or text for memcached-protocol stores), the item size limit and timeouts
        /// (`operationTimeout` is `MemcachedClient.Configuration.requestTimeout`).
        public var memcached: MemcachedClient.Configuration
        /// Ids of nodes (listed in ``memcached``) used only when no other node is available
        /// (`failoverNodes`). Sticky set-ups list the memcached on the same host here.
        public var failoverNodes: [String] = []
        /// Sticky or non-sticky (`sticky`).
        public var mode: Mode = .nonSticky
        /// How long sessions live and how long a save may take.
        public var timeouts = Timeouts()
        /// Sticky mode's settings: asynchronous saving, this instance's memory.
        public var sticky = Sticky()
        /// Which requests lock the session, and how locks behave (non-sticky only).
        public var locking = Locking() {
            didSet {
                // The deprecated spelling `locking = .all` means the mode only.
                if locking.setsModeOnly {
                    let mode = locking.mode
                    locking = oldValue
                    locking.mode = mode
                }
            }
        }
        /// Spans for session loads and saves, the memcached round trips their children (off by
        /// default: no tracer). A manager that makes its own client gives it this tracer when
        /// ``memcached`` has none.
        public var tracing = SessionTracingConfiguration()
        /// The session cookie the framework adapters set: its name, path, domain and flags. An
        /// adapter given a cookie of its own uses that one.
        public var cookie: SessionCookie = .default
        /// Requests whose path matches this regular expression never touch sessions
        /// (`requestUriIgnorePattern`), e.g. `.*\.(css|js|png|ico)$`. Matched against the path only.
        public var ignoredPathPattern: String? = nil
        /// Only attributes whose name matches this regular expression are stored
        /// (`sessionAttributeFilter`); the others live for the request only.
        public var attributeFilter: String? = nil
        /// Prefix of every memcached key (`storageKeyPrefix`): several applications can share nodes.
        public var keyPrefix: String = Self.defaultKeyPrefix
        /// ``keyPrefix``'s default (also `msm session`'s).
        public static let defaultKeyPrefix = "msm:"
        /// How sessions and attribute values are turned into bytes.
        public var codec: any SessionCodec = BinarySessionCodec()
        /// When false, sessions live in this instance's memory only and memcached is not used.
        public var enabled: Bool = true
        /// Whether statistics and metrics are recorded (`enableStatistics`).
        public var statisticsEnabled: Bool = true
        /// What happens when no node that could hold a session answers.
        public var unavailablePolicy: UnavailablePolicy = .fail
        /// Meta mode: an instance writes a session's backup over its own recent write of it in one
        /// round trip, with that write's CAS unique, instead of reading the backup's version first.
        /// Safe against memcached restarts (which count CAS uniques from the start again) because
        /// a restart closes the client's connections and the write goes only over one opened
        /// before: turn it off for a store or proxy that keeps client connections open across a
        /// restart of the memcached behind it.
        public var reusesBackupCAS: Bool = true
        /// This instance's route (MSM's `jvmRoute`), appended to session ids as `.<route>` so a load
        /// balancer can route by it. Sticky set-ups need it for explicit takeover.
        public var route: String? = nil

        /// Sealed sessions and keyed storage keys (off by default: envelopes as the codec writes
        /// them, keys a SHA-256 of the token).
        public var sealing = Sealing()

        /// Sealed sessions: every stored envelope encrypted and authenticated with AES-256-GCM
        /// under ``keys`` (bound to its session and key prefix), and memcached keys an HMAC of the
        /// token under ``storageKeySecret``.
        public struct Sealing: Sendable {
            /// The key ring: the current key seals, every key opens. nil: sessions are stored as
            /// the codec writes them (anyone who can reach memcached can read and forge them).
            public var keys: SessionKeyRing? = nil
            /// The secret storage keys are an HMAC under. nil: a SHA-256 of the token.
            public var storageKeySecret: StorageKeySecret? = nil
            /// Adding ``storageKeySecret`` to a running cluster: before this time storage keys stay
            /// a SHA-256 of the token (what instances without the secret compute), from it on they
            /// are keyed. Give every instance the secret with the same time, one at a time, then let
            /// the time pass: every instance switches at once (clocks agreeing within a second).
            /// nil: keyed from the start.
            public var keyedStorageKeysFrom: Date? = nil
            /// After ``keyedStorageKeysFrom``, until this time, a session not found under its keyed
            /// key is looked for under its SHA-256 key on the same node and moved (written under
            /// the keyed key, its backup too, the earlier copies ended), counted as
            /// ``SessionStatistics/Counter/sessionsMovedToKeyedKeys``. Past it, sessions not used
            /// since the switch are not found (set it at least the idle timeout after the switch).
            public var acceptUnkeyedUntil: Date? = nil
            /// Rolling upgrade from unsealed sessions: until this time, copies that are not sealed
            /// are read too (and sealed at their next write). nil: an unsealed copy is refused
            /// (read as missing, counted as ``SessionStatistics/Counter/unsealedRefused``).
            public var acceptUnsealedUntil: Date? = nil
            /// The first step of a rolling upgrade: keys are configured (this instance opens sealed
            /// copies) but it writes unsealed ones still, so that instances of the earlier release
            /// can read them. Once every instance has keys, turn this off instance by instance.
            public var writesUnsealed: Bool = false

            public init() {}

            /// Whether stored envelopes are sealed.
            public var isEnabled: Bool { keys != nil }
        }

        /// How long sessions live and how long a save may take.
        /// Sessions per principal (``MemcachedSession/setPrincipal(_:)``): the index that lets
        /// ``SessionManager/invalidateAll(principal:)`` end them all, and an optional limit.
        public var principals = Principals()

        public struct Principals: Sendable, Hashable {
            /// What a login past ``concurrentSessionLimit`` does.
            public enum LimitPolicy: Sendable, Hashable {
                /// The principal's oldest sessions are logged out to make room.
                case logOutOldest
                /// The new login's session is ended and its request fails with
                /// ``SessionError/Code/sessionLimitReached``.
                case refuseNewLogin
            }
            /// The most sessions one principal's index holds: past it, the oldest are logged out
            /// (never silently forgotten). At least 1.
            public var indexLimit: Int = 100
            /// The most sessions one principal may have at once (nil: no limit). Sessions count
            /// until logged out, revoked or past their absolute timeout, or once no node holds them.
            public var concurrentSessionLimit: Int? = nil
            public var whenLimitReached: LimitPolicy = .logOutOldest

            public init() {}
        }

        public struct Timeouts: Sendable, Hashable {
            /// A session expires after this long without a request (`maxInactiveInterval`); zero
            /// or less means never. A session may set its own (``MemcachedSession/setIdleTimeout(_:)``).
            public var idle: Duration = .seconds(30 * 60)
            /// A session expires this long after its creation, whatever its activity (24 hours by
            /// default, OWASP's advice for a session that a stolen cookie could otherwise keep
            /// alive for ever); `nil`: no limit. A "remember me" session that should outlive it
            /// needs a longer setting here (it applies to the sessions created under it).
            public var absolute: Duration? = .seconds(24 * 60 * 60)
            /// Sticky mode: how long a save may take (`sessionBackupTimeout`).
            public var save: Duration = .milliseconds(500)

            public init() {}
        }

        /// Sticky mode's settings.
        public struct Sticky: Sendable, Hashable {
            /// Changed sessions are saved by a background writer instead of before the response
            /// (`sessionBackupAsync`). Faster; a crash of the app server loses the writes still
            /// queued (at most ``queueLimit``), graceful shutdown flushes them.
            public var asynchronousSaving: Bool = true
            /// Asynchronous saving: how long a change may wait before it is written, so that a
            /// session changed by a burst of requests is written once per window. A crash of the app
            /// server loses at most this window's changes (plus the queue); graceful shutdown loses
            /// nothing. Zero writes as soon as the writer gets to it.
            public var saveDelay: Duration = .milliseconds(250)
            /// The most sessions queued for asynchronous saving; beyond it a request saves
            /// synchronously (back-pressure, never an unbounded queue).
            public var queueLimit: Int = 10_000
            /// The most sessions kept in this instance's memory (least recently used go first;
            /// they stay in memcached).
            public var localSessionLimit: Int = 100_000
            /// An unchanged session's memcached TTL is slid at most this often; nil: a quarter of
            /// the idle timeout, between a second and five minutes.
            public var touchInterval: Duration? = nil

            public init() {}
        }

        /// Which requests take the session's lock, and how locks behave (non-sticky mode only).
        public struct Locking: Sendable, Hashable {
            /// Which requests lock the session (`lockingMode`).
            public var mode: LockingMode = .none
            /// How long a lock may live without renewal (`lockExpiration`); requests that run
            /// longer renew it.
            public var expiry: Duration = .seconds(5) {
                didSet { setsModeOnly = false }
            }
            /// How long a request waits for a lock before ``failurePolicy`` applies.
            public var waitBudget: Duration = .seconds(10) {
                didSet { setsModeOnly = false }
            }
            /// What happens when the lock cannot be had in time.
            public var failurePolicy: LockFailurePolicy = .fail {
                didSet { setsModeOnly = false }
            }
            /// Auto locking: the most request paths remembered as read-only.
            public var autoPathLimit: Int = 1_000 {
                didSet { setsModeOnly = false }
            }
            /// Set by the deprecated `locking = .all` spelling: only the mode is meant.
            var setsModeOnly = false

            public init(mode: LockingMode = .none) {
                self.mode = mode
            }

            public static func == (lhs: Self, rhs: Self) -> Bool {
                lhs.mode == rhs.mode && lhs.expiry == rhs.expiry && lhs.waitBudget == rhs.waitBudget
                    && lhs.failurePolicy == rhs.failurePolicy && lhs.autoPathLimit == rhs.autoPathLimit
            }

            public func hash(into hasher: inout Hasher) {
                hasher.combine(mode)
                hasher.combine(expiry)
                hasher.combine(waitBudget)
                hasher.combine(failurePolicy)
                hasher.combine(autoPathLimit)
            }
        }

        /// A configuration over the given nodes.
        public init(memcached: MemcachedClient.Configuration) {
            self.memcached = memcached
        }

        /// A configuration over a node list (`n1:host:port n2:host:port`, spaces or commas; or one
        /// `host:port`, which becomes node `n1`).
        public init(nodes: String) throws(SessionError) {
            let parsed: [MemcachedNodeAddress]
            do {
                parsed = try MemcachedNodeAddress.parseList(nodes)
            } catch {
                throw .configuration(error.message)
            }
            var addresses = parsed
            if addresses.count == 1, let only = addresses.first, only.id == only.hostAndPort {
                addresses[0].id = "n1"
            }
            self.init(memcached: MemcachedClient.Configuration(nodes: addresses))
        }

        /// The idle timeout, or nil when sessions never expire from inactivity.
        var effectiveIdleTimeout: Duration? {
            timeouts.idle > .zero ? timeouts.idle : nil
        }

        /// Checks every setting; the error names the setting and why.
        public func validate() throws(SessionError) {
            do {
                try memcached.validate()
            } catch {
                throw .configuration(error.message)
            }
            let ids = Set(memcached.nodes.map(\.id))
            for node in memcached.nodes where !MemcachedSessionID.isValidComponent(node.id) {
                throw .configuration(
                    "node id '\(node.id)' cannot appear in a session id: use letters, digits, '_' or '-' (at most 32), e.g. n1:\(node.hostAndPort)"
                )
            }
            for id in failoverNodes where !ids.contains(id) {
                throw .configuration("failover node '\(id)' is not one of the nodes \(memcached.nodes.map(\.id))")
            }
            if !failoverNodes.isEmpty, Set(failoverNodes).count == ids.count, memcached.nodes.count > 0 {
                throw .configuration("every node is a failover node: at least one must be a primary")
            }
            if let route, !MemcachedSessionID.isValidComponent(route) {
                throw .configuration("route '\(route)' must be letters, digits, '_' or '-' (at most 32)")
            }
            if case .uriPattern(let pattern) = locking.mode {
                _ = try PathPattern(pattern, setting: "locking uriPattern")
                if mode == .sticky {
                    throw .configuration("locking applies to non-sticky mode only; set locking.mode to none for sticky")
                }
            } else if locking.mode != .none, mode == .sticky {
                throw .configuration("locking applies to non-sticky mode only; set locking.mode to none for sticky")
            }
            if let ignoredPathPattern { _ = try PathPattern(ignoredPathPattern, setting: "ignoredPathPattern") }
            if let attributeFilter { _ = try PathPattern(attributeFilter, setting: "attributeFilter") }
            if keyPrefix.utf8.count > 100 || keyPrefix.utf8.contains(where: { $0 <= 0x20 || $0 == 0x7F }) {
                throw .configuration("keyPrefix must be at most 100 bytes without spaces or control characters")
            }
            // Upper bounds keep every duration far from arithmetic overflow (and from nonsense).
            let tenYears = Duration.seconds(10 * 365 * 24 * 3600)
            if timeouts.idle > tenYears { throw .configuration("timeouts.idle must be at most ten years (zero or less: never)") }
            if let absolute = timeouts.absolute, absolute > tenYears {
                throw .configuration("timeouts.absolute must be at most ten years")
            }
            if sealing.storageKeySecret == nil, sealing.keyedStorageKeysFrom != nil || sealing.acceptUnkeyedUntil != nil {
                throw .configuration("sealing.keyedStorageKeysFrom and sealing.acceptUnkeyedUntil need sealing.storageKeySecret")
            }
            if sealing.acceptUnkeyedUntil != nil, sealing.keyedStorageKeysFrom == nil {
                throw .configuration(
                    "sealing.acceptUnkeyedUntil needs sealing.keyedStorageKeysFrom (the switch every instance makes at once)")
            }
            if let from = sealing.keyedStorageKeysFrom, let until = sealing.acceptUnkeyedUntil, until <= from {
                throw .configuration("sealing.acceptUnkeyedUntil must be after sealing.keyedStorageKeysFrom")
            }
            if principals.indexLimit < 1 || principals.indexLimit > 10_000 {
                throw .configuration("principals.indexLimit must be between 1 and 10000")
            }
            if let limit = principals.concurrentSessionLimit, limit < 1 || limit > principals.indexLimit {
                throw .configuration("principals.concurrentSessionLimit must be between 1 and principals.indexLimit")
            }
            if locking.expiry > .seconds(24 * 3600) { throw .configuration("locking.expiry must be at most a day") }
            if locking.waitBudget > .seconds(3600) { throw .configuration("locking.waitBudget must be at most an hour") }
            if timeouts.save > .seconds(3600) { throw .configuration("timeouts.save must be at most an hour") }
            if sticky.saveDelay < .zero || sticky.saveDelay > .seconds(60) {
                throw .configuration("sticky.saveDelay must be between 0 and 60 seconds")
            }
            if let touchInterval = sticky.touchInterval, touchInterval > .seconds(24 * 3600) {
                throw .configuration("sticky.touchInterval must be at most a day")
            }
            if locking.expiry < .seconds(2) {
                throw .configuration("locking.expiry must be at least 2 seconds (memcached's clock ticks once a second)")
            }
            if locking.waitBudget < .zero { throw .configuration("locking.waitBudget cannot be negative") }
            if timeouts.save <= .zero { throw .configuration("timeouts.save must be positive") }
            if sticky.queueLimit < 1 { throw .configuration("sticky.queueLimit must be at least 1") }
            if sticky.localSessionLimit < 1 { throw .configuration("sticky.localSessionLimit must be at least 1") }
            if locking.autoPathLimit < 1 { throw .configuration("locking.autoPathLimit must be at least 1") }
            if let absolute = timeouts.absolute, absolute <= .zero {
                throw .configuration("timeouts.absolute must be positive, or nil for none")
            }
            if let touchInterval = sticky.touchInterval, touchInterval <= .zero {
                throw .configuration("sticky.touchInterval must be positive")
            }
        }
    }
}

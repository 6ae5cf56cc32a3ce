import Memcached

/// An error from the session manager.
///
/// Identified by its ``code``, an extensible set of static members (new codes do not break
/// callers). The ``message`` is for logs and never contains a session id or an attribute value.
public struct SessionError: Error, Sendable, Hashable, CustomStringConvertible {
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        fileprivate enum Base: String, Hashable, Sendable {
            case unavailable
            case lockUnavailable
            case sessionTooLarge
            case invalidConfiguration
            case encodingFailed
            case decodingFailed
            case invalidated
            case disabled
            case localStoreFull
            case invalidArgument
            case principalIndexUnavailable
            case sessionLimitReached
        }

        fileprivate let base: Base
        fileprivate init(_ base: Base) { self.base = base }

        /// No memcached node that could hold the session answered, and the configured
        /// ``SessionManager/UnavailablePolicy`` is ``SessionManager/UnavailablePolicy/fail``.
        /// Adapters answer 503: the user is not silently logged out.
        public static let unavailable = Code(.unavailable)
        /// The session's lock could not be had within the wait budget, and the lock policy says to fail.
        public static let lockUnavailable = Code(.lockUnavailable)
        /// The encoded session is larger than the memcached item size limit; the stored copy is untouched.
        public static let sessionTooLarge = Code(.sessionTooLarge)
        /// The configuration is invalid (the message says which setting and why).
        public static let invalidConfiguration = Code(.invalidConfiguration)
        /// An attribute value could not be encoded.
        public static let encodingFailed = Code(.encodingFailed)
        /// An attribute value could not be decoded as the requested type.
        public static let decodingFailed = Code(.decodingFailed)
        /// The session was invalidated and can no longer be used.
        public static let invalidated = Code(.invalidated)
        /// The request matched the ignore pattern, or sessions are used outside a request.
        public static let disabled = Code(.disabled)
        /// Sticky mode: this instance's memory holds ``SessionManager/Configuration/localSessionLimit``
        /// sessions with changes memcached has not taken yet (every node down). New sessions are
        /// refused until memcached answers; unsaved ones are never dropped. Adapters answer 503.
        public static let localStoreFull = Code(.localStoreFull)
        /// An argument the manager cannot take (the message says which).
        public static let invalidArgument = Code(.invalidArgument)
        /// The principal index could not be read or written (its nodes down, or it was dropped):
        /// ``SessionError/sessionsEnded`` says how many sessions were ended before the failure.
        /// Never a silent partial revocation.
        public static let principalIndexUnavailable = Code(.principalIndexUnavailable)
        /// A login past ``SessionManager/Configuration/Principals/concurrentSessionLimit`` with
        /// ``SessionManager/Configuration/Principals/LimitPolicy/refuseNewLogin``: the new
        /// session was ended. Adapters answer 403.
        public static let sessionLimitReached = Code(.sessionLimitReached)

        public var description: String { base.rawValue }
    }

    public var code: Code
    public var message: String
    /// ``Code/principalIndexUnavailable``: the sessions ended before the failure (nil: unknown
    /// or none attempted).
    public var sessionsEnded: Int? = nil

    public init(code: Code, message: String) {
        self.code = code
        self.message = message
    }

    public var description: String { "SessionError.\(code): \(message)" }

    static func configuration(_ message: String) -> SessionError {
        SessionError(code: .invalidConfiguration, message: message)
    }

    static func unavailable(_ message: String) -> SessionError {
        SessionError(code: .unavailable, message: message)
    }
}

extension MemcachedError {
    /// Whether the error says the node could not be reached or did not answer (as opposed to an
    /// answer such as a miss or a refusal): "missing" must never be confused with "unavailable".
    /// Whether the command may have reached the node (a timeout, a connection closed under it, a
    /// reply that made no sense): the node may be up for others. A refused connection, or a node
    /// already marked down, is not: the command never left.
    var leavesOutcomeUnknown: Bool {
        switch code {
        case .timeout, .connectionClosed, .protocolError: return true
        default: return false
        }
    }

    var meansNodeUnreachable: Bool {
        switch code {
        case .timeout, .connectionClosed, .connectFailed, .nodeUnavailable, .protocolError, .unknownNode, .tlsFailed,
            .authenticationFailed:
            return true
        default:
            return false
        }
    }
}

extension SessionError {
    /// How an HTTP adapter answers this error: the one home of the mapping both adapters use.
    /// The store unreachable, a busy lock or memory full of unsaved sessions are 503s with a
    /// `Retry-After` (the client may retry; never a silent logout); anything else is a 500. The
    /// message names the kind of failure only (no id, key or value).
    public struct HTTPAnswer: Sendable, Hashable {
        public var status: Int
        /// Seconds, for the `Retry-After` header (nil: none).
        public var retryAfter: Int?
        public var message: String
    }

    public var httpAnswer: HTTPAnswer {
        switch code {
        case .unavailable:
            return HTTPAnswer(status: 503, retryAfter: 1, message: "The session store is unavailable; please retry.")
        case .lockUnavailable:
            return HTTPAnswer(status: 503, retryAfter: 1, message: "The session is busy; please retry.")
        case .localStoreFull:
            return HTTPAnswer(status: 503, retryAfter: 5, message: "No new sessions can be started now; please retry.")
        case .sessionLimitReached:
            return HTTPAnswer(status: 403, retryAfter: nil, message: "Too many sessions are open for this user; log out elsewhere first.")
        default:
            return HTTPAnswer(status: 500, retryAfter: nil, message: "Session error: \(code)")
        }
    }
}

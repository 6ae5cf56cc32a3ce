/// An error thrown by the memcached client.
///
/// Errors are identified by their ``code``; new codes can be added without breaking
/// callers that switch over the ones they know (the type is a struct with static
/// members, not a frozen enum). The ``message`` is for humans and logs: it never
/// contains a stored value.
public struct MemcachedError: Error, Sendable, Hashable, CustomStringConvertible {
    /// What kind of failure this is.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        fileprivate enum Base: String, Hashable, Sendable {
            case timeout
            case connectionClosed
            case connectFailed
            case nodeUnavailable
            case invalidKey
            case valueTooLarge
            case serverError
            case clientError
            case protocolError
            case unsupportedInProtocolMode
            case cancelled
            case shutdown
            case unknownNode
            case invalidConfiguration
            case invalidArgument
            case tlsFailed
            case authenticationFailed
            case connectionChanged
        }

        fileprivate let base: Base
        fileprivate init(_ base: Base) { self.base = base }

        /// The request did not get its reply within its deadline.
        public static let timeout = Code(.timeout)
        /// The connection closed while the request was in flight (it may or may not have been executed).
        public static let connectionClosed = Code(.connectionClosed)
        /// A connection to the node could not be established.
        public static let connectFailed = Code(.connectFailed)
        /// The node is marked down after repeated failures; requests fail fast until a probe succeeds.
        public static let nodeUnavailable = Code(.nodeUnavailable)
        /// The key is empty, longer than 250 bytes, or contains a space or a control character.
        /// Nothing was sent.
        public static let invalidKey = Code(.invalidKey)
        /// The value is larger than the configured item size limit. Nothing was sent.
        public static let valueTooLarge = Code(.valueTooLarge)
        /// The server answered `SERVER_ERROR <message>`.
        public static let serverError = Code(.serverError)
        /// The server answered `CLIENT_ERROR <message>` or `ERROR`.
        public static let clientError = Code(.clientError)
        /// The server sent bytes that are not a valid reply to the request; the connection was closed.
        public static let protocolError = Code(.protocolError)
        /// The command, or one of its options, needs the meta protocol and the client is in text mode.
        public static let unsupportedInProtocolMode = Code(.unsupportedInProtocolMode)
        /// The calling task was cancelled.
        public static let cancelled = Code(.cancelled)
        /// The client is not running, or is shutting down.
        public static let shutdown = Code(.shutdown)
        /// No node with the given id is configured.
        public static let unknownNode = Code(.unknownNode)
        /// The request was limited to the node's connections up to a generation
        /// (``MemcachedRequest/connectionGenerationLimit``) and its connection is newer. Nothing was sent.
        public static let connectionChanged = Code(.connectionChanged)
        /// The configuration (for example a node list) is invalid.
        public static let invalidConfiguration = Code(.invalidConfiguration)
        /// An argument is out of range (for example a negative delta).
        public static let invalidArgument = Code(.invalidArgument)

        /// The TLS handshake with the node failed: its certificate is not trusted (unknown issuer,
        /// expired), does not carry the expected name, the server does not speak TLS, or it refused
        /// this client's certificate. The message says which; the node is marked down.
        public static let tlsFailed = Code(.tlsFailed)

        /// The node refused this client's credentials (memcached's `-Y`), or did not answer them
        /// within the connect timeout. The node is marked down.
        public static let authenticationFailed = Code(.authenticationFailed)

        public var description: String { base.rawValue }
    }

    /// What kind of failure this is.
    public var code: Code
    /// A human-readable explanation; for server errors, the server's own message.
    public var message: String
    /// The node the request was for, when known.
    public var nodeID: String?

    public init(code: Code, message: String, nodeID: String? = nil) {
        self.code = code
        self.message = message
        self.nodeID = nodeID
    }

    public var description: String {
        if let nodeID {
            return "MemcachedError.\(code) [node \(nodeID)]: \(message)"
        }
        return "MemcachedError.\(code): \(message)"
    }

    /// Whether the failure says something about the node's health (as opposed to the request).
    /// Such failures count towards marking a node down.
    public var isNodeFailure: Bool {
        switch code.base {
        case .timeout, .connectionClosed, .connectFailed, .protocolError, .tlsFailed, .authenticationFailed: return true
        default: return false
        }
    }

    func with(nodeID: String) -> MemcachedError {
        var copy = self
        copy.nodeID = nodeID
        return copy
    }

    static func timeout(_ message: String = "request timed out") -> MemcachedError {
        MemcachedError(code: .timeout, message: message)
    }
    static func connectionClosed(_ message: String = "connection closed") -> MemcachedError {
        MemcachedError(code: .connectionClosed, message: message)
    }
    /// A request refused by a connection that was already closing: it was never written, so it
    /// may be sent again on another connection whatever it does.
    static let notSentMessage = "connection was closing; request not sent"
    static let notSent = MemcachedError(code: .connectionClosed, message: notSentMessage)
    var wasNotSent: Bool { code == .connectionClosed && message == Self.notSentMessage }

    static func protocolError(_ message: String) -> MemcachedError {
        MemcachedError(code: .protocolError, message: message)
    }
    static func invalidKey(_ message: String) -> MemcachedError {
        MemcachedError(code: .invalidKey, message: message)
    }
    static func unsupported(_ message: String) -> MemcachedError {
        MemcachedError(code: .unsupportedInProtocolMode, message: message)
    }
    static let cancelledError = MemcachedError(code: .cancelled, message: "the calling task was cancelled")
    static let shutdownError = MemcachedError(code: .shutdown, message: "the client is not running")
}

import NIOCore
import NIOSSL
import NIOTLS

extension MemcachedClient.Configuration {
    /// TLS to every node (memcached started with `-Z`), off by default, as valkey-swift configures it.
    ///
    /// When it is on, every connection, including reconnections and probes, completes a TLS
    /// handshake within the connect timeout before any command is sent; a failed handshake (a
    /// certificate the trust roots do not vouch for, an expired one, a name that does not match,
    /// a server that does not speak TLS) is a ``MemcachedError/Code/tlsFailed`` error that marks
    /// the node down and backs off like a refused connection. Never a fallback to plaintext.
    public struct TLS: Sendable {
        enum Base: Sendable {
            case disable
            case enable(NIOSSLContext, serverName: String?)
        }
        let base: Base

        /// Plain TCP (the default).
        public static var disable: TLS { TLS(base: .disable) }

        /// TLS with `configuration` (trust roots, a client certificate for mutual TLS, the minimum
        /// version: `TLSConfiguration.makeClientConfiguration()` verifies the server's chain and
        /// name against the system's trust store). `serverName` is the name the servers'
        /// certificates must carry (and the SNI sent); `nil` checks each node's own host: its name,
        /// or for an IP address the certificate's IP address entries.
        public static func enable(_ configuration: TLSConfiguration, serverName: String? = nil) throws(MemcachedError) -> TLS {
            do {
                return TLS(base: .enable(try NIOSSLContext(configuration: configuration), serverName: serverName))
            } catch {
                throw MemcachedError(code: .invalidConfiguration, message: "TLS configuration: \(error)")
            }
        }

        public var isEnabled: Bool {
            if case .enable = base { return true }
            return false
        }
    }
}

/// Adds the TLS handler in front of a new connection's pipeline and reports the end of the
/// handshake: `handshake` succeeds once it completed, fails with a ``MemcachedError/Code/tlsFailed``
/// error when it did not (the channel is closed then).
final class TLSHandshakeHandler: ChannelInboundHandler, RemovableChannelHandler {
    typealias InboundIn = ByteBuffer
    typealias InboundOut = ByteBuffer

    let handshake: EventLoopPromise<Void>
    private let target: String
    private var done = false

    init(handshake: EventLoopPromise<Void>, target: String) {
        self.handshake = handshake
        self.target = target
    }

    func userInboundEventTriggered(context: ChannelHandlerContext, event: Any) {
        if let event = event as? TLSUserEvent, case .handshakeCompleted = event, !done {
            done = true
            context.fireUserInboundEventTriggered(event)
            // Out of the way of every later read.
            context.pipeline.syncOperations.removeHandler(context: context, promise: nil)
            handshake.succeed(())
            return
        }
        context.fireUserInboundEventTriggered(event)
    }

    /// The connect timeout passed with the handshake unfinished.
    func timedOut(channel: any Channel) {
        guard !done else { return }
        done = true
        handshake.fail(MemcachedError(code: .tlsFailed, message: "TLS with \(target): no handshake within the connect timeout"))
        channel.close(promise: nil)
    }

    func errorCaught(context: ChannelHandlerContext, error: any Error) {
        if !done {
            done = true
            handshake.fail(MemcachedError(code: .tlsFailed, message: Self.reason(error, target: target)))
            context.close(promise: nil)
            return
        }
        context.fireErrorCaught(error)
    }

    func channelInactive(context: ChannelHandlerContext) {
        if !done {
            done = true
            handshake.fail(MemcachedError(code: .tlsFailed, message: "TLS handshake with \(target): the server closed the connection"))
        }
        context.fireChannelInactive()
    }

    /// What went wrong, in an operator's words (the library's own text after it). Never a key or a
    /// value: a handshake carries neither.
    static func reason(_ error: any Error, target: String) -> String {
        let text = "\(error)"
        let reason: String
        if let extra = error as? NIOSSLExtraError, extra == .failedToValidateHostname {
            reason = "the certificate's name does not match"
        } else if text.contains("CERTIFICATE_VERIFY_FAILED") || text.contains("certificate verify failed") {
            reason = "the certificate is not trusted (unknown issuer, expired or not yet valid)"
        } else if text.contains("WRONG_VERSION_NUMBER") || text.contains("wrong version number") || text.contains("PACKET_LENGTH_TOO_LONG") {
            reason = "the server does not speak TLS (plaintext server?)"
        } else if text.contains("CERTIFICATE_REQUIRED") || text.contains("certificate required") || text.contains("HANDSHAKE_FAILURE") {
            reason = "the server refused the handshake (client certificate required or refused?)"
        } else {
            reason = "handshake failed"
        }
        return "TLS with \(target): \(reason) (\(text))"
    }
}

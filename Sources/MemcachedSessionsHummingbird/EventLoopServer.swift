#if Hummingbird
import Hummingbird
import HummingbirdCore
import Logging
import MemcachedSessions
import NIOCore

extension HTTPServerBuilder {
    /// Hummingbird's HTTP/1.1 server (its `http1(configuration:)`), with each connection's task
    /// running on its channel's event loop (a task executor preference for `EventLoopExecutor`),
    /// from its first request to its last.
    ///
    /// Hummingbird starts each connection's task on the global executor, and every request of the
    /// connection then runs there: on Swift's cooperative pool, a thread hop each way between the
    /// thread reading the channel and the thread running the request; with NIO installed as the
    /// global executor (`NIOSingletons.unsafeTryInstallSingletonPosixEventLoopGroupAsConcurrencyGlobalExecutor()`),
    /// on a loop, but as its serial executor, so that each call into a nonisolated async function
    /// is an executor switch (a job through the loop's task queue). Here the connection's task hops
    /// once, when it starts: its requests and the session layer run on the channel's loop, and so
    /// do the memcached replies they wait for when the session manager's client runs on the same
    /// event-loop group with a connection on every loop (`connectionsPerNode` at least the loop
    /// count; the default is 2).
    ///
    /// ```swift
    /// let app = Application(router: router, server: .http1OnChannelEventLoop())
    /// ```
    ///
    /// The handlers run on the event loop: a handler that blocks its thread (file I/O, heavy
    /// computation) blocks every connection of that loop. Move such work off it
    /// (`NIOThreadPool`, a detached task). For TLS, wrap it as Hummingbird's `.tls(...)` wraps any
    /// server; for other child channels (HTTP/2), ``EventLoopChildChannel``.
    public static func http1OnChannelEventLoop(configuration: HTTP1Channel.Configuration = .init()) -> HTTPServerBuilder {
        .init { responder in
            EventLoopChildChannel(HTTP1Channel(responder: responder, configuration: configuration))
        }
    }
}

/// A server's child channel setup whose connections' tasks run on their channels' event loops
/// (see `HTTPServerBuilder.http1OnChannelEventLoop(configuration:)`), around any
/// other one:
///
/// ```swift
/// let server = HTTPServerBuilder { responder in
///     EventLoopChildChannel(HTTP2UpgradeChannel(responder: responder, ...))
/// }
/// ```
public struct EventLoopChildChannel<Base: ServerChildChannel>: ServerChildChannel {
    public typealias Value = Base.Value
    public let base: Base

    public init(_ base: Base) {
        self.base = base
    }

    public func setup(channel: any Channel, logger: Logger) -> EventLoopFuture<Value> {
        base.setup(channel: channel, logger: logger)
    }

    public func handle(value: Value, logger: Logger) async {
        await withTaskExecutorPreference(EventLoopExecutor.for(value.channel.eventLoop)) {
            await base.handle(value: value, logger: logger)
        }
    }
}
#endif

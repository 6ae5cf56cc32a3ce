#if Hummingbird
import Hummingbird
import HummingbirdCore
import Logging
import MemcachedSessions
import NIOCore

extension HTTPServerBuilder {
    /// Hummingbird's HTTP/1.1 server (``HTTPServerBuilder/http1(configuration:)``), with each
    /// connection's task running on its channel's event loop (a task executor preference for
    /// `EventLoopExecutor`), from its first request to its last.
    ///
    /// Hummingbird starts each connection's task on the global executor, and every request of the
    /// connection then runs there: on Swift's cooperative pool, a thread hop each way between the
    /// thread reading the channel and the thread running the request; with NIO installed as the
    /// global executor (`NIOSingletons.unsafeTryInstallSingletonPosixEventLoopGroupAsConcurrencyGlobalExecutor()`),
    /// on the loop, but as its serial executor, so that each call into a nonisolated async function
    /// is an executor switch (a job through the loop's task queue). Here the connection's task hops
    /// once, when it starts: its requests, the session layer and the memcached client's replies
    /// (over a connection of the same loop, see `MemcachedClient.Configuration.connectionsPerNode`)
    /// all run on the channel's loop, with no switch between them.
    ///
    /// ```swift
    /// let app = Application(router: router, server: .http1OnChannelEventLoop())
    /// ```
    ///
    /// The handlers run on the event loop: a handler that blocks its thread (file I/O, heavy
    /// computation) blocks every connection of that loop. Move such work off it
    /// (`NIOThreadPool`, a detached task).
    public static func http1OnChannelEventLoop(configuration: HTTP1Channel.Configuration = .init()) -> HTTPServerBuilder {
        .init { responder in
            EventLoopChildChannel(base: HTTP1Channel(responder: responder, configuration: configuration))
        }
    }
}

/// A child channel setup whose connections' tasks run on their channels' event loops.
struct EventLoopChildChannel<Base: ServerChildChannel>: ServerChildChannel {
    typealias Value = Base.Value
    let base: Base

    func setup(channel: any Channel, logger: Logger) -> EventLoopFuture<Value> {
        base.setup(channel: channel, logger: logger)
    }

    func handle(value: Value, logger: Logger) async {
        await withTaskExecutorPreference(EventLoopExecutor.for(value.channel.eventLoop)) {
            await base.handle(value: value, logger: logger)
        }
    }
}
#endif

import NIOCore
import Synchronization

/// Runs Swift concurrency jobs on a NIO event loop, as a task executor preference.
///
/// A task that prefers it runs on that loop, and the client sends the task's requests over a
/// connection of the same loop when the node has one (see
/// ``MemcachedClient/Configuration/connectionsPerNode``): a round trip then costs no thread hop
/// (the reply resumes the task on the thread that read it), and the commands of the tasks served
/// in one event-loop tick leave in one write.
///
/// ```swift
/// let loop = MultiThreadedEventLoopGroup.singleton.next()
/// let item = try await withTaskExecutorPreference(EventLoopExecutor.for(loop)) {
///     try await client.get("greeting")
/// }
/// ```
///
/// The session layer's adapters run each request's handler on its HTTP channel's event loop this
/// way. One executor per event loop, created once (``for(_:)``).
public final class EventLoopExecutor: TaskExecutor, @unchecked Sendable {
    // @unchecked: the only stored property is an immutable reference to an event loop, which is
    // thread-safe (NIO's `EventLoop` is Sendable); the class adds no mutable state.
    public let eventLoop: any EventLoop

    private init(eventLoop: any EventLoop) {
        self.eventLoop = eventLoop
    }

    public func enqueue(_ job: consuming ExecutorJob) {
        let job = UnownedJob(job)
        let executor = asUnownedTaskExecutor()
        eventLoop.execute { job.runSynchronously(on: executor) }
    }

    private static let executors = Mutex<[ObjectIdentifier: EventLoopExecutor]>([:])

    /// The executor of an event loop (the same one every time).
    public static func `for`(_ eventLoop: any EventLoop) -> EventLoopExecutor {
        let key = ObjectIdentifier(eventLoop as AnyObject)
        return executors.withLock { executors in
            if let existing = executors[key] { return existing }
            let executor = EventLoopExecutor(eventLoop: eventLoop)
            executors[key] = executor
            return executor
        }
    }
}

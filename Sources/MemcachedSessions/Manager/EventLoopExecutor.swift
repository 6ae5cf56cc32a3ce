// The task executor on a NIO event loop lives with the memcached client (a request and the
// connection it talks to on one thread is the client's concern first); the session layer runs
// request handlers on it and re-exports it, so that `import MemcachedSessions` alone names it.
@_exported import class Memcached.EventLoopExecutor

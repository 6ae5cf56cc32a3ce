import NIOCore

/// Anything that runs memcached requests: the whole client (keys routed by consistent hashing) or
/// one node (``MemcachedNodeClient``). Higher layers depend on this protocol so that they can be
/// tested against a fake, and so that every typed command below exists once.
public protocol MemcachedCommandRunner: Sendable {
    /// Runs one request.
    func execute(_ request: MemcachedRequest) async throws(MemcachedError) -> MemcachedResponse

    /// Runs several requests, pipelined where possible; results are in request order.
    func executeBatch(_ requests: [MemcachedRequest]) async -> [Result<MemcachedResponse, MemcachedError>]
}

/// One memcached node, as the layers above the client (the session manager) reach it: commands
/// in, replies out. ``MemcachedNodeClient`` is the real one; a simulated cluster (memcached's
/// semantics in memory, with injected faults) implements it too, so that the session logic above
/// (CAS merges, backups, tombstones, locks) runs for real against exhaustive fault schedules.
public protocol MemcachedNodeCommandRunner: MemcachedCommandRunner {
    /// The node's id (`n1`).
    var id: String { get }
    /// Whether the node takes requests (false while it is marked down).
    var isAvailable: Bool { get }
    /// Sends a request without waiting for it; `completion` gets the outcome (keep it short).
    func submit(_ request: MemcachedRequest, completion: @escaping @Sendable (Result<MemcachedResponse, MemcachedError>) -> Void) async
    /// How many connections have been opened to the node so far, if the runner counts them (see
    /// ``MemcachedRequest/connectionGenerationLimit``); nil: not counted, and the limit not kept.
    var connectionGeneration: UInt64? { get }
}

extension MemcachedNodeCommandRunner {
    public var connectionGeneration: UInt64? { nil }

    /// Sends a request without waiting for it or its outcome.
    public func submit(_ request: MemcachedRequest) async {
        await submit(request) { _ in }
    }

    /// The node's statistics for a group.
    public func stats(_ group: MemcachedStatsGroup = .general) async throws(MemcachedError) -> [MemcachedStat] {
        let response = try await execute(.stats(group))
        guard case .stats(let stats) = response else { throw Self.unexpected(response) }
        return stats
    }
}

/// The nodes of a cluster, as the session manager uses them; ``MemcachedClient`` is the real one.
public protocol MemcachedNodeSet: Sendable {
    /// Every node, in configuration order.
    var nodeRunners: [any MemcachedNodeCommandRunner] { get }
    /// Runs whatever keeps the nodes healthy (probes, connections) until cancelled or shut down.
    func run() async throws
}

extension MemcachedCommandRunner {
    public func executeBatch(_ requests: [MemcachedRequest]) async -> [Result<MemcachedResponse, MemcachedError>] {
        var results: [Result<MemcachedResponse, MemcachedError>] = []
        results.reserveCapacity(requests.count)
        for request in requests {
            do throws(MemcachedError) {
                results.append(.success(try await execute(request)))
            } catch {
                results.append(.failure(error))
            }
        }
        return results
    }

    /// Reads an item: value, flags and CAS unique, or `nil` on a miss.
    public func get(_ key: String) async throws(MemcachedError) -> MemcachedItem? {
        try Self.item(from: try await execute(.get(key)))
    }

    /// Reads an item and sets its TTL in the same round trip.
    public func getAndTouch(_ key: String, ttl: MemcachedTTL) async throws(MemcachedError) -> MemcachedItem? {
        try Self.item(from: try await execute(.get(key, touch: ttl)))
    }

    /// Reads several items in one pipelined round trip per node. Missing keys are absent.
    public func getMany(_ keys: [String]) async throws(MemcachedError) -> [String: MemcachedItem] {
        let results = await executeBatch(keys.map { MemcachedRequest.get($0) })
        var items: [String: MemcachedItem] = [:]
        for (key, result) in zip(keys, results) {
            if let item = try Self.item(from: try result.get()) {
                items[key] = item
            }
        }
        return items
    }

    /// Stores a value unconditionally.
    @discardableResult
    public func set(
        _ key: String, value: ByteBuffer, ttl: MemcachedTTL = .never, flags: UInt32 = 0, quiet: Bool = false
    ) async throws(MemcachedError) -> MemcachedStoreResult {
        try await store(key, value: value, mode: .set, ttl: ttl, flags: flags, quiet: quiet)
    }

    /// Stores a string unconditionally.
    @discardableResult
    public func set(_ key: String, value: String, ttl: MemcachedTTL = .never, flags: UInt32 = 0) async throws(MemcachedError)
        -> MemcachedStoreResult
    {
        try await store(key, value: ByteBuffer(string: value), mode: .set, ttl: ttl, flags: flags)
    }

    /// Stores a value only if the key does not exist. Returns whether it was stored.
    public func add(_ key: String, value: ByteBuffer, ttl: MemcachedTTL = .never, flags: UInt32 = 0) async throws(MemcachedError)
        -> Bool
    {
        try await store(key, value: value, mode: .add, ttl: ttl, flags: flags).isStored
    }

    /// Stores a value only if the key exists. Returns whether it was stored.
    public func replace(_ key: String, value: ByteBuffer, ttl: MemcachedTTL = .never, flags: UInt32 = 0) async throws(MemcachedError)
        -> Bool
    {
        try await store(key, value: value, mode: .replace, ttl: ttl, flags: flags).isStored
    }

    /// Stores a value only if the item's CAS unique is still `cas`: ``MemcachedStoreResult/exists``
    /// when someone changed it meanwhile, ``MemcachedStoreResult/notFound`` when it is gone.
    public func compareAndSwap(
        _ key: String, value: ByteBuffer, cas: UInt64, ttl: MemcachedTTL = .never, flags: UInt32 = 0
    ) async throws(MemcachedError) -> MemcachedStoreResult {
        try await store(key, value: value, mode: .set, ttl: ttl, flags: flags, cas: cas)
    }

    /// The general storage command.
    @discardableResult
    public func store(
        _ key: String, value: ByteBuffer, mode: MemcachedStoreMode, ttl: MemcachedTTL = .never, flags: UInt32 = 0,
        cas: UInt64? = nil, quiet: Bool = false
    ) async throws(MemcachedError) -> MemcachedStoreResult {
        let response = try await execute(.store(key, value: value, mode: mode, ttl: ttl, flags: flags, cas: cas, quiet: quiet))
        guard case .stored(let result) = response else { throw Self.unexpected(response) }
        return result
    }

    /// Deletes an item; with `cas` (meta mode only), only if it was not changed since it was read.
    @discardableResult
    public func delete(_ key: String, cas: UInt64? = nil, quiet: Bool = false) async throws(MemcachedError)
        -> MemcachedDeleteResult
    {
        let response = try await execute(.delete(key, cas: cas, quiet: quiet))
        guard case .deleted(let result) = response else { throw Self.unexpected(response) }
        return result
    }

    /// Sets a new TTL. Returns whether the item exists.
    @discardableResult
    public func touch(_ key: String, ttl: MemcachedTTL) async throws(MemcachedError) -> Bool {
        let response = try await execute(.touch(key, ttl: ttl))
        guard case .touched(let found) = response else { throw Self.unexpected(response) }
        return found
    }

    /// Increments a decimal counter; `nil` when it does not exist. With `initial` (meta mode only)
    /// a missing counter is created with that value (and `ttl`) and the initial value is returned.
    public func increment(_ key: String, by delta: UInt64 = 1, initial: UInt64? = nil, ttl: MemcachedTTL = .never)
        async throws(MemcachedError) -> UInt64?
    {
        let response = try await execute(.arithmetic(key, delta: delta, increment: true, initial: initial, ttl: ttl))
        guard case .counter(let value) = response else { throw Self.unexpected(response) }
        return value
    }

    /// Decrements a decimal counter (memcached stops at 0); `nil` when it does not exist.
    public func decrement(_ key: String, by delta: UInt64 = 1, initial: UInt64? = nil, ttl: MemcachedTTL = .never)
        async throws(MemcachedError) -> UInt64?
    {
        let response = try await execute(.arithmetic(key, delta: delta, increment: false, initial: initial, ttl: ttl))
        guard case .counter(let value) = response else { throw Self.unexpected(response) }
        return value
    }

    static func item(from response: MemcachedResponse) throws(MemcachedError) -> MemcachedItem? {
        guard case .item(let item) = response else { throw unexpected(response) }
        return item
    }

    static func unexpected(_ response: MemcachedResponse) -> MemcachedError {
        .protocolError("unexpected response \(response)")
    }
}

import Memcached
import MemcachedTestRig
import NIOCore
import Testing

@_spi(Simulation) @testable import MemcachedSessions

/// What a browser keeps between requests: the session cookie.
struct Browser: Sendable {
    var cookie: String?

    var id: MemcachedSessionID? { cookie.flatMap { MemcachedSessionID(parsing: $0) } }
}

extension SessionManager {
    /// Does what a framework adapter does: begin, run the handler, end (also when it threw), and
    /// apply the cookie the response carries to the browser.
    func request<T: Sendable>(
        _ browser: inout Browser, path: String = "/counter", _ handler: (SessionAccess) async throws -> T
    ) async throws -> T {
        let access = beginRequest(path: path, sessionCookie: browser.cookie)
        let result: T
        do {
            result = try await handler(access)
        } catch {
            _ = try? await endRequest(access)
            throw error
        }
        let action = try await endRequest(access)
        switch action.cookie {
        case .unchanged: break
        case .set(let id): browser.cookie = id.description
        case .clear: browser.cookie = nil
        }
        return result
    }

    /// `/counter` of the session-counter workload: creates the session with count 1, else adds 1.
    @discardableResult
    func increment(_ browser: inout Browser, path: String = "/counter") async throws -> Int {
        try await request(&browser, path: path) { access in
            let session = try await access.loadOrCreate()
            let count = (session["count", as: Int.self] ?? 0) + 1
            try session.set("count", count)
            if session.isNew { try session.set("profile", String(repeating: "p", count: 1024)) }
            return count
        }
    }

    /// `/read`: the count, or 0 without a session.
    func readCount(_ browser: inout Browser, path: String = "/read") async throws -> Int {
        try await request(&browser, path: path) { access in
            try await access.load()?["count", as: Int.self] ?? 0
        }
    }
}

/// Node ids n1, n2, ... for `servers`.
func nodeList(_ servers: [MemcachedServer]) -> String { servers.nodeList }

func configuration(
    _ servers: [MemcachedServer], mode: SessionManager.Mode = .nonSticky,
    _ configure: (inout SessionManager.Configuration) -> Void = { _ in }
) throws -> SessionManager.Configuration {
    var configuration = try SessionManager.Configuration(nodes: nodeList(servers))
    configuration.mode = mode
    configuration.memcached.probeInterval = .milliseconds(100)
    // Generous: the whole suite runs in parallel on two cores; tests about timeouts set their own.
    configuration.memcached.requestTimeout = .seconds(5)
    configure(&configuration)
    return configuration
}

/// Runs `services` (managers, clients) in the background while `body` runs, then cancels them
/// (a graceful shutdown) and waits for them to end.
func whileRunning(_ services: [@Sendable () async throws -> Void], _ body: () async throws -> Void) async throws {
    try await withThrowingTaskGroup(of: Void.self) { group in
        for service in services { group.addTask { try await service() } }
        do {
            try await body()
        } catch {
            group.cancelAll()
            throw error
        }
        group.cancelAll()
        try await group.waitForAll()
    }
}

/// Runs `body` with running managers (one per configuration), then shuts them down gracefully.
func withManagers(
    _ configurations: [SessionManager.Configuration], _ body: ([SessionManager]) async throws -> Void
) async throws {
    let managers = try configurations.map { try SessionManager(configuration: $0) }
    var services: [@Sendable () async throws -> Void] = []
    for manager in managers { services.append { try await manager.run() } }
    try await whileRunning(services) { try await body(managers) }
}

func withManager(
    _ configuration: SessionManager.Configuration, _ body: (SessionManager) async throws -> Void
) async throws {
    try await withManagers([configuration]) { try await body($0[0]) }
}

/// A plain client over the same servers, to look at what is stored.
func withInspector(_ servers: [MemcachedServer], _ body: (MemcachedClient) async throws -> Void) async throws {
    var configuration = try MemcachedClient.Configuration(nodes: nodeList(servers))
    configuration.probeInterval = .milliseconds(100)
    let client = try MemcachedClient(configuration: configuration)
    try await whileRunning([{ try await client.run() }]) { try await body(client) }
}

/// memcached's own command counters summed over nodes.
struct CommandCounts: Equatable, CustomStringConvertible {
    var gets = 0
    var sets = 0
    var touches = 0
    var deletes = 0

    static func - (lhs: CommandCounts, rhs: CommandCounts) -> CommandCounts {
        CommandCounts(
            gets: lhs.gets - rhs.gets, sets: lhs.sets - rhs.sets, touches: lhs.touches - rhs.touches,
            deletes: lhs.deletes - rhs.deletes)
    }

    var description: String { "gets \(gets) sets \(sets) touches \(touches) deletes \(deletes)" }
}

func commandCounts(_ client: MemcachedClient, nodes: [String]? = nil) async throws -> CommandCounts {
    var counts = CommandCounts()
    for node in client.allNodes where nodes?.contains(node.id) ?? true {
        let stats = try await node.stats()
        func value(_ name: String) -> Int { Int(stats.first { $0.name == name }?.value ?? "0") ?? 0 }
        counts.gets += value("cmd_get")
        counts.sets += value("cmd_set")
        counts.touches += value("cmd_touch")
        counts.deletes += value("delete_hits") + value("delete_misses")
    }
    return counts
}

func sessionError(_ body: () async throws -> Void) async -> SessionError? {
    do {
        try await body()
        return nil
    } catch let error as SessionError {
        return error
    } catch {
        return SessionError(code: .disabled, message: "not a SessionError: \(error)")
    }
}

/// The system's clock, except for the sleeps `stretch` picks: those last the duration it returns
/// instead (an hour: until the manager stops). Drives a background loop's timing explicitly (a
/// restart watch that looks only once, notices read late), never a test's own waits.
struct StretchingClock: SessionClock {
    let system = SystemSessionClock()
    let stretch: @Sendable (Duration) -> Duration?

    func now() -> NIODeadline { system.now() }
    func wallMilliseconds() -> Int64 { system.wallMilliseconds() }
    func sleep(for duration: Duration) async throws {
        try await system.sleep(for: stretch(duration) ?? duration)
    }

    /// The restart watch looks once, at start, and never again: only misses' checks see restarts.
    static let noRestartWatch = StretchingClock { $0 == NodeRestarts.watchInterval ? .seconds(3600) : nil }
}

struct SystemEntropy: SessionEntropy {
    func next() -> UInt64 {
        var generator = SystemRandomNumberGenerator()
        return generator.next()
    }
}

/// Runs `body` with running managers, each over its own client and on its own clock, then shuts
/// them down.
func withManagers(
    _ setups: [(SessionManager.Configuration, any SessionClock)], _ body: ([SessionManager]) async throws -> Void
) async throws {
    let clients = try setups.map { try MemcachedClient(configuration: $0.0.memcached) }
    let managers = try zip(setups, clients).map { setup, client in
        try SessionManager(configuration: setup.0, nodes: client, clock: setup.1, entropy: SystemEntropy())
    }
    var services: [@Sendable () async throws -> Void] = []
    for client in clients { services.append { try await client.run() } }
    for manager in managers { services.append { try await manager.run() } }
    try await whileRunning(services) { try await body(managers) }
}

import Memcached
import MemcachedTestRig
import NIOCore
import NIOPosix
import Testing

/// Memcached's `total_connections` stat of `node`, read through `node` (so the read may open a
/// connection of its own pool): the connections the server has accepted since it started.
func totalConnections(_ node: MemcachedNodeClient) async throws -> Int {
    let value = try #require(try await node.stats().first { $0.name == "total_connections" }?.value)
    return try #require(Int(value))
}

/// Runs `body` with a running client over `servers` (node ids n1, n2, ...), then shuts the client down.
func withClient(
    _ servers: [MemcachedServer], mode: MemcachedProtocolMode = .meta,
    eventLoopGroup: any EventLoopGroup = MultiThreadedEventLoopGroup.singleton,
    configure: (inout MemcachedClient.Configuration) -> Void = { _ in },
    _ body: (MemcachedClient) async throws -> Void
) async throws {
    var configuration = MemcachedClient.Configuration(
        nodes: servers.enumerated().map { MemcachedNodeAddress(id: "n\($0.offset + 1)", host: "127.0.0.1", port: $0.element.port) })
    configuration.protocolMode = mode
    // Generous: the whole suite runs in parallel on two cores; tests about timeouts set their own.
    configuration.requestTimeout = .seconds(5)
    configure(&configuration)
    let client = try MemcachedClient(configuration: configuration, eventLoopGroup: eventLoopGroup)
    return try await withThrowingTaskGroup(of: Void.self) { group in
        group.addTask { try await client.run() }
        do {
            try await body(client)
            group.cancelAll()
            try await group.waitForAll()
        } catch {
            group.cancelAll()
            throw error
        }
    }
}

/// Runs `body` and returns the MemcachedError it throws, or nil.
func memcachedError(_ body: () async throws -> Void) async -> MemcachedError? {
    do {
        try await body()
        return nil
    } catch let error as MemcachedError {
        return error
    } catch {
        return MemcachedError(code: .invalidArgument, message: "not a MemcachedError: \(error)")
    }
}

func bytes(_ string: String) -> ByteBuffer { ByteBuffer(string: string) }

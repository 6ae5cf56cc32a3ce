@testable import Memcached
import MemcachedTestRig
import NIOCore
import NIOPosix
import Testing

@Suite("Input safety and pipelining against a real memcached")
struct SafetyAndLoadTests {
    static let hostileKeys: [(String, String)] = [
        ("CRLF", "a\r\nflush_all\r\n"),
        ("LF", "a\nflush_all"),
        ("CR", "a\rb"),
        ("space", "a b"),
        ("tab", "a\tb"),
        ("NUL", "a\u{0}b"),
        ("DEL", "a\u{7F}b"),
        ("empty", ""),
        ("251 bytes", String(repeating: "k", count: 251)),
    ]

    @Test(arguments: MemcachedProtocolMode.allCases)
    func hostileKeysAreRefusedBeforeSendingAndValuesCannotInject(mode: MemcachedProtocolMode) async throws {
        try await withMemcachedServers(count: 1) { servers in
            try await withClient(servers, mode: mode) { client in
                try await client.set("sentinel", value: bytes("still here"))
                let node = try client.node("n1")
                let before = try await Self.stat("cmd_set", node) + Self.stat("cmd_get", node) + Self.stat("cmd_touch", node)

                for (name, key) in Self.hostileKeys {
                    let requests: [MemcachedRequest] = [
                        .get(key), .store(key, value: bytes("x")), .delete(key), .touch(key, ttl: .seconds(1)),
                        .arithmetic(key, delta: 1),
                    ]
                    for request in requests {
                        let error = await memcachedError { _ = try await client.execute(request) }
                        #expect(error?.code == .invalidKey, "key \(name) was not refused for \(request.key ?? "")")
                    }
                    let viaNode = await memcachedError { _ = try await node.get(key) }
                    #expect(viaNode?.code == .invalidKey, "key \(name) was not refused on a node client")
                }
                // Nothing reached the server: its command counters did not move.
                let after = try await Self.stat("cmd_set", node) + Self.stat("cmd_get", node) + Self.stat("cmd_touch", node)
                #expect(after == before)

                // A value that looks like commands is data, byte for byte.
                let payload = bytes("\r\nflush_all\r\nset evil 0 0 1\r\nx\r\ndelete sentinel\r\n")
                try await client.set("payload", value: payload)
                #expect(try await client.get("payload")?.value == payload)
                try await client.set("payload2", value: bytes("END\r\nVALUE sentinel 0 1\r\nx\r\nEND\r\n"))
                #expect(try await client.get("payload2")?.string == "END\r\nVALUE sentinel 0 1\r\nx\r\nEND\r\n")

                #expect(try await client.get("sentinel")?.string == "still here")
                #expect(try await client.get("evil") == nil)
            }
        }
    }

    static func stat(_ name: String, _ node: MemcachedNodeClient) async throws -> Int {
        let stats = try await node.stats()
        return Int(stats.first { $0.name == name }?.value ?? "") ?? -1
    }

    @Test(arguments: MemcachedProtocolMode.allCases)
    func tenThousandPipelinedRequestsFromHundredTasks(mode: MemcachedProtocolMode) async throws {
        try await withMemcachedServers(count: 2) { servers in
            try await withClient(servers, mode: mode) { client in
                try await withThrowingTaskGroup(of: Int.self) { group in
                    for task in 0..<100 {
                        group.addTask {
                            var checked = 0
                            for index in 0..<50 {
                                let key = "p-\(task)-\(index)"
                                let value = "\(task):\(index):" + String(repeating: "v", count: (task * 7 + index) % 300)
                                try await client.set(key, value: bytes(value))
                                let item = try await client.get(key)
                                guard item?.string == value else {
                                    throw RigError("wrong value for \(key): \(item?.string ?? "nil")")
                                }
                                checked += 2
                            }
                            return checked
                        }
                    }
                    var total = 0
                    for try await count in group { total += count }
                    #expect(total == 10_000)
                }
                // The same volume as one pipelined batch per node.
                let keys = (0..<2_000).map { "p-\($0 % 100)-\($0 / 100 % 50)" }
                let items = try await client.getMany(keys)
                #expect(Set(keys).count == items.count)
            }
        }
    }

    @Test func coalescingRequestsShareWritesAndStillComplete() async throws {
        try await withMemcachedServers(count: 1) { servers in
            try await withClient(
                servers,
                configure: {
                    $0.coalescingWindow = .milliseconds(400); $0.connectionsPerNode = 1
                }
            ) { client in
                // Alone, a coalescing request leaves when its window ends.
                var lonely = MemcachedRequest.store("lonely", value: bytes("v"))
                lonely.coalesces = true
                let started = ContinuousClock.now
                _ = try await client.execute(lonely)
                #expect(ContinuousClock.now - started >= .milliseconds(350))
                // Any request that cannot wait takes the waiting ones along at once.
                let stats = try await client.node("n1").stats()
                let readsBefore = Int(stats.first { $0.name == "cmd_set" }?.value ?? "0") ?? 0
                await withTaskGroup(of: Void.self) { group in
                    for index in 0..<20 {
                        group.addTask {
                            var request = MemcachedRequest.store("c\(index)", value: bytes("v\(index)"), quiet: true)
                            request.coalesces = true
                            await client.submit(request)
                        }
                    }
                }
                // The window is 400 ms; the submitted writes were queued with no flush: a normal
                // request now sends them along at once (checked below by reading every value back
                // right after it, on the same single connection).
                _ = try await client.get("c0")
                for index in 0..<20 { #expect(try await client.get("c\(index)")?.string == "v\(index)") }
                let after = try await client.node("n1").stats()
                #expect((Int(after.first { $0.name == "cmd_set" }?.value ?? "0") ?? 0) - readsBefore == 20)
            }
        }
    }

    /// Requests with a connection affinity keep to one connection each (their order holds), and
    /// go to the first connection of an event loop: with one loop and two connections a node, they
    /// all share the one connection a loop's other requests use, so they leave in the same writes.
    /// With two loops they still spread over both (one connection each).
    @Test(arguments: [1, 2])
    func affineRequestsUseOneConnectionPerEventLoop(loops: Int) async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: loops)
        do {
            try await withMemcachedServers(count: 1) { servers in
                var configuration = MemcachedClient.Configuration(
                    nodes: [MemcachedNodeAddress(id: "n1", host: "127.0.0.1", port: servers[0].port)])
                configuration.connectionsPerNode = 2
                // The connections are counted: none may time out and be opened again on a busy
                // machine.
                configuration.connectTimeout = .seconds(60)
                configuration.requestTimeout = .seconds(60)
                let client = try MemcachedClient(configuration: configuration, eventLoopGroup: group)
                try await withThrowingTaskGroup(of: Void.self) { tasks in
                    tasks.addTask { try await client.run() }
                    defer { tasks.cancelAll() }
                    for affinity in 0..<16 {
                        var write = MemcachedRequest.store("k\(affinity)", value: ByteBuffer(string: "v"))
                        write.connectionAffinity = affinity
                        _ = try await client.execute(write)
                    }
                    // The same affinity, the same connection, every time.
                    let pool = client.nodes[0].pool
                    var used = Set<ObjectIdentifier>()
                    for affinity in 0..<16 {
                        let first = try await pool.connection(affinity: affinity)
                        used.insert(ObjectIdentifier(first))
                        for _ in 0..<3 { #expect(try await pool.connection(affinity: affinity) === first) }
                    }
                    // One connection a loop, none other opened (counted by the pool: the server's
                    // count of accepted connections, used before, was off once in a fresh-clone
                    // CI run, cause not found; it counts whatever reaches its port).
                    #expect(used.count == loops)
                    #expect(pool.opened == loops, "\(pool.opened) connections opened")
                    // From the event loop, a request without affinity takes the loop's connection,
                    // the one every affine request takes when there is one loop.
                    if loops == 1 {
                        let shared = try await group.next().submit {
                            let plain = pool.readyConnection(pool.choose(affinity: nil))
                            return plain != nil && (0..<16).allSatisfy { pool.readyConnection(pool.choose(affinity: $0)) === plain }
                        }.get()
                        #expect(shared)
                    }
                }
            }
        } catch {
            try? await group.shutdownGracefully()
            throw error
        }
        try await group.shutdownGracefully()
    }
}

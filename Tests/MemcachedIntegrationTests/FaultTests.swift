import Atomics
import MemcachedTestRig
import NIOCore
import NIOPosix
import Testing

@testable import Memcached

@Suite("Faults: killed nodes, silent servers, recovery")
struct FaultTests {
    @Test(arguments: MemcachedProtocolMode.allCases)
    func killedNodeFailsInFlightRequestsThenFailsFastThenRecovers(mode: MemcachedProtocolMode) async throws {
        try await withMemcachedServers(count: 1) { servers in
            let server = servers[0]
            try await withClient(
                servers, mode: mode,
                configure: {
                    $0.requestTimeout = .seconds(2)
                    $0.failureThreshold = 2
                    $0.probeInterval = .milliseconds(100)
                }
            ) { client in
                let node = try client.node("n1")
                try await client.set("k", value: bytes("v"))

                // Requests in flight when the node dies fail with a typed error within their deadline.
                let started = ContinuousClock.now
                let written = ManagedAtomic<Int>(0)
                let outcomes = try await withThrowingTaskGroup(of: MemcachedError?.self) { group in
                    for index in 0..<200 {
                        group.addTask {
                            await memcachedError {
                                for round in 0..<1_000 {
                                    try await client.set("load-\(index)-\(round)", value: ByteBuffer(repeating: 7, count: 2_000))
                                    written.wrappingIncrement(ordering: .relaxed)
                                }
                            }
                        }
                    }
                    // Killed under load: once writes flow.
                    try await eventually("writes in flight") { written.load(ordering: .relaxed) >= 400 }
                    try await server.kill()
                    var errors: [MemcachedError?] = []
                    for try await outcome in group { errors.append(outcome) }
                    return errors
                }
                let elapsed = ContinuousClock.now - started
                // Each request ends within its 2 s deadline; the kill itself can take a moment.
                #expect(elapsed < .seconds(10), "requests hung for \(elapsed)")
                let codes = Set(outcomes.compactMap { $0?.code })
                #expect(outcomes.allSatisfy { $0 != nil }, "some task finished 1000 writes before the kill")
                #expect(codes.isSubset(of: [.connectionClosed, .connectFailed, .nodeUnavailable, .timeout]), "\(codes)")

                // The node is marked down: requests fail fast.
                try await eventually("node marked down") {
                    _ = await memcachedError { _ = try await client.get("k") }
                    return !node.isAvailable
                }
                let fast = ContinuousClock.now
                let error = await memcachedError { _ = try await client.get("k") }
                #expect(error?.code == .nodeUnavailable)
                #expect(error?.nodeID == "n1")
                // Failed fast: without waiting for the 2 s request timeout.
                #expect(ContinuousClock.now - fast < .seconds(1))

                // Back up: the client recovers by itself within a bounded time.
                try await server.restart()
                try await eventually(timeout: .seconds(5), "node back up") { node.isAvailable }
                try await client.set("k", value: bytes("again"))
                #expect(try await client.get("k")?.string == "again")
            }
        }
    }

    /// A request limited to older connections is sent over a connection opened before the limit
    /// was read, and refused, unsent, over one opened after (here: after memcached restarted,
    /// counting its CAS uniques from the start again).
    @Test func aConnectionGenerationLimitKeepsARequestOffConnectionsOpenedSince() async throws {
        try await withMemcachedServers(count: 1) { servers in
            try await withClient(servers, configure: { $0.probeInterval = .milliseconds(100) }) { client in
                let node = try client.node("n1")
                // On one connection of the pool (it has several, opened on demand).
                var write = MemcachedRequest.store("k", value: bytes("v"))
                write.connectionAffinity = 0
                _ = try await node.execute(write)
                let generation = try #require(node.connectionGeneration)
                #expect(generation >= 1)
                var limited = MemcachedRequest.get("k")
                limited.connectionAffinity = 0
                limited.connectionGenerationLimit = generation
                guard case .item(let item?) = try await node.execute(limited) else {
                    Issue.record("the connection the limit was read on carries the request")
                    return
                }
                #expect(item.string == "v")

                try await servers[0].kill()
                try await servers[0].restart()
                try await eventually("reconnected") { (try? await client.set("k", value: bytes("w"))) != nil }
                #expect(try #require(node.connectionGeneration) > generation)
                let error = await memcachedError { _ = try await node.execute(limited) }
                #expect(error?.code == .connectionChanged)
                var other = MemcachedRequest.get("k")
                other.connectionAffinity = 0
                let batch = await node.executeBatch([limited, other])
                #expect(batch.allSatisfy { if case .failure(let error) = $0 { error.code == .connectionChanged } else { false } })
                var unlimited = limited
                unlimited.connectionGenerationLimit = nil
                guard case .item(let after?) = try await node.execute(unlimited) else {
                    Issue.record("an unlimited request is sent")
                    return
                }
                #expect(after.string == "w")
            }
        }
    }

    /// A reply that cannot be decoded fails the request it would have answered with a protocol
    /// error at once (not at its deadline), closes the connection, and the next request gets a new one.
    @Test(arguments: ["VA x\r\n", "HD O1\n", "VA 3 O1\r\nabcXY"])
    func aGarbledReplyFailsTheRequestAtOnceAndClosesTheConnection(reply: String) async throws {
        let garbler = try await BlackholeServer.start(reply: reply)
        defer { garbler.stop() }
        var configuration = try MemcachedClient.Configuration(nodes: "n1:127.0.0.1:\(garbler.port)")
        configuration.requestTimeout = .seconds(30)
        configuration.failureThreshold = 1000
        let client = try MemcachedClient(configuration: configuration)
        await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await client.run() }
            for round in 0..<2 {
                let started = ContinuousClock.now
                let error = await memcachedError { _ = try await client.get("k\(round)") }
                #expect(error?.code == .protocolError, "round \(round): \(String(describing: error))")
                #expect(ContinuousClock.now - started < .seconds(10))
            }
            group.cancelAll()
        }
    }

    @Test(arguments: MemcachedProtocolMode.allCases)
    func silentServerTimesOutWithoutHanging(mode: MemcachedProtocolMode) async throws {
        let blackhole = try await BlackholeServer.start()
        defer { blackhole.stop() }
        var configuration = try MemcachedClient.Configuration(nodes: "n1:127.0.0.1:\(blackhole.port)")
        configuration.protocolMode = mode
        configuration.requestTimeout = .milliseconds(200)
        configuration.failureThreshold = 1000
        let client = try MemcachedClient(configuration: configuration)
        await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await client.run() }
            let started = ContinuousClock.now
            let errors = await withTaskGroup(of: MemcachedError?.self) { tasks in
                for index in 0..<20 {
                    tasks.addTask { await memcachedError { _ = try await client.get("k\(index)") } }
                }
                var errors: [MemcachedError?] = []
                for await error in tasks { errors.append(error) }
                return errors
            }
            #expect(ContinuousClock.now - started < .seconds(2))
            #expect(errors.allSatisfy { $0?.code == .timeout })
            // A per-request timeout overrides the client's.
            var request = MemcachedRequest.get("k")
            request.timeout = .milliseconds(50)
            let quick = ContinuousClock.now
            let error = await memcachedError { _ = try await client.execute(request) }
            #expect(error?.code == .timeout)
            #expect(ContinuousClock.now - quick < .milliseconds(1000))
            group.cancelAll()
        }
    }

    @Test func silentServerMarksNodeDownAfterThreshold() async throws {
        let blackhole = try await BlackholeServer.start()
        defer { blackhole.stop() }
        var configuration = try MemcachedClient.Configuration(nodes: "n1:127.0.0.1:\(blackhole.port)")
        configuration.requestTimeout = .milliseconds(100)
        configuration.failureThreshold = 3
        let client = try MemcachedClient(configuration: configuration)
        for _ in 0..<3 {
            let error = await memcachedError { _ = try await client.get("k") }
            #expect(error?.code == .timeout)
        }
        let error = await memcachedError { _ = try await client.get("k") }
        #expect(error?.code == .nodeUnavailable)
    }

    /// A connection can close between the pool handing it out and the request reaching it (the
    /// server restarted, the connection stalled): the request, never sent, goes out on a new one.
    @Test func aConnectionClosedUnderARequestIsReplacedNotReported() async throws {
        try await withMemcachedServers(count: 1) { servers in
            try await withClient(servers) { client in
                try await client.set("k", value: bytes("v"))
                let pool = client.nodes[0].pool
                let first = try await pool.connection()
                try await first.eventLoop.submit { first.channel.close(promise: nil) }.get()

                // The connection refuses the request as unsent, rather than losing it.
                let refused = await first.execute(.get("k"), deadline: .now() + .seconds(5))
                guard case .failure(let error) = refused else {
                    Issue.record("a closed connection answered: \(refused)")
                    return
                }
                #expect(error.wasNotSent)
                // The pool does not hand out the closed connection again.
                let second = try await pool.connection(replacing: first)
                #expect(second !== first)
                #expect(second.channel.isActive)
                // And requests through the client never see it.
                try await first.eventLoop.submit { second.channel.close(promise: nil) }.get()
                #expect(try await client.get("k")?.string == "v")
                #expect(try await client.getMany(["k", "missing"]).count == 1)
                // A batch refused whole before sending (invalid keys) leaves the connections be:
                // none closed, none opened in their place. One request or several.
                let node = try client.node("n1")
                for _ in 0..<8 { _ = try await totalConnections(node) }  // every slot of the pool open by now
                let current = try await pool.connection()
                let before = try await totalConnections(node)
                let refusedOne = await node.executeBatch([.get("bad key")])
                let refusedTwo = await node.executeBatch([.get("bad key"), .get("bad\r\nkey")])
                #expect(refusedOne.count == 1 && refusedTwo.count == 2)
                #expect(current.channel.isActive)
                #expect(try await totalConnections(node) == before, "no connection opened in a refused batch's place")
            }
        }
    }

    /// Requests refused before sending (invalid keys), alone or in batches, reach no connection:
    /// with eight slots a node and round robin, a refused batch that chose a slot would open it.
    @Test func refusedBatchesOpenNoConnection() async throws {
        try await withMemcachedServers(count: 1) { servers in
            try await withClient(servers, configure: { $0.connectionsPerNode = 8 }) { client in
                let node = try client.node("n1")
                try await client.set("k", value: bytes("v"))
                let before = try await totalConnections(node)
                for _ in 0..<8 {
                    let one = await node.executeBatch([.get("bad key")])
                    let two = await node.executeBatch([.get("bad key"), .get("bad\r\nkey")])
                    #expect(one.count == 1 && two.count == 2)
                    #expect(one.allSatisfy { if case .failure = $0 { true } else { false } })
                    #expect(two.allSatisfy { if case .failure = $0 { true } else { false } })
                }
                // At most the one the second stats request opens (round robin's next slot).
                let after = try await totalConnections(node)
                #expect(after - before <= 1, "connections opened meanwhile: \(after - before)")
            }
        }
    }

    @Test func requestsThatIgnoreCancellationCompleteInACancelledTask() async throws {
        try await withMemcachedServers(count: 1) { servers in
            try await withClient(servers) { client in
                let task = Task {
                    withUnsafeCurrentTask { $0?.cancel() }
                    var write = MemcachedRequest.store("must-land", value: bytes("v"))
                    write.honorsCancellation = false
                    let kept = await memcachedError { _ = try await client.execute(write) }
                    let dropped = await memcachedError { _ = try await client.execute(.get("must-land")) }
                    return (kept, dropped)
                }
                let (kept, dropped) = await task.value
                #expect(kept == nil, "a write that ignores cancellation completes")
                #expect(dropped?.code == .cancelled, "an ordinary request in a cancelled task fails at once")
                let landed = try await client.get("must-land")
                #expect(landed?.string == "v")
            }
        }
    }

    @Test func cancellationEndsAWaitingRequest() async throws {
        let blackhole = try await BlackholeServer.start()
        defer { blackhole.stop() }
        var configuration = try MemcachedClient.Configuration(nodes: "n1:127.0.0.1:\(blackhole.port)")
        configuration.requestTimeout = .seconds(30)
        let client = try MemcachedClient(configuration: configuration)
        let started = ContinuousClock.now
        let task = Task { await memcachedError { _ = try await client.get("k") } }
        // Cancelled once the request is on the wire (the silent server has read it).
        try await eventually("the request reached the server") { blackhole.bytesReceived > 0 }
        task.cancel()
        let error = await task.value
        #expect(error?.code == .cancelled)
        #expect(ContinuousClock.now - started < .seconds(5))
    }

    @Test func refusedConnectionIsATypedErrorAndBacksOff() async throws {
        let port = try FreePort.find()
        var configuration = try MemcachedClient.Configuration(nodes: "n1:127.0.0.1:\(port)")
        configuration.failureThreshold = 100
        let client = try MemcachedClient(configuration: configuration)
        let first = await memcachedError { _ = try await client.get("k") }
        #expect(first?.code == .connectFailed)
        let second = await memcachedError { _ = try await client.get("k") }
        #expect(second?.code == .connectFailed)
    }

    @Test func gracefulShutdownLetsInFlightRequestsFinish() async throws {
        try await withMemcachedServers(count: 1) { servers in
            let client = try MemcachedClient(configuration: .init(nodes: "n1:127.0.0.1:\(servers[0].port)"))
            let run = Task { try await client.run() }
            try await client.set("warm", value: bytes("up"))
            let results = await withTaskGroup(of: MemcachedError?.self) { group in
                for index in 0..<500 {
                    group.addTask {
                        await memcachedError { try await client.set("g\(index)", value: ByteBuffer(repeating: 1, count: 10_000)) }
                    }
                }
                run.cancel()
                var errors: [MemcachedError?] = []
                for await error in group { errors.append(error) }
                return errors
            }
            try await run.value
            // Every request either completed or was refused as shutting down: none was cut off.
            for error in results {
                #expect(error == nil || error?.code == .shutdown, "\(String(describing: error))")
            }
        }
    }
}

/// A TCP server that accepts connections, reads everything and never answers.
final class BlackholeServer: Sendable {
    let channel: any Channel
    private let received: ManagedAtomic<Int>
    var port: Int { channel.localAddress?.port ?? 0 }
    /// Bytes read from every connection so far.
    var bytesReceived: Int { received.load(ordering: .relaxed) }

    private init(channel: any Channel, received: ManagedAtomic<Int>) {
        self.channel = channel
        self.received = received
    }

    /// `reply`: what the server writes back to every read (by default, nothing).
    static func start(reply: String? = nil) async throws -> BlackholeServer {
        let received = ManagedAtomic<Int>(0)
        let channel = try await ServerBootstrap(group: MultiThreadedEventLoopGroup.singleton)
            .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
            .childChannelInitializer { channel in
                channel.eventLoop.makeCompletedFuture {
                    try channel.pipeline.syncOperations.addHandler(Swallow(received: received, reply: reply))
                }
            }
            .bind(host: "127.0.0.1", port: 0)
            .get()
        return BlackholeServer(channel: channel, received: received)
    }

    func stop() {
        channel.close(promise: nil)
    }

    private final class Swallow: ChannelInboundHandler {
        typealias InboundIn = ByteBuffer
        let received: ManagedAtomic<Int>
        let reply: String?
        init(received: ManagedAtomic<Int>, reply: String?) {
            self.received = received
            self.reply = reply
        }
        func channelRead(context: ChannelHandlerContext, data: NIOAny) {
            received.wrappingIncrement(by: unwrapInboundIn(data).readableBytes, ordering: .relaxed)
            if let reply { context.writeAndFlush(NIOAny(ByteBuffer(string: reply)), promise: nil) }
        }
    }
}

@Suite("Fault proxy")
struct FaultProxyTests {
    @Test func forwardsDelaysStallsAndCutsReplies() async throws {
        try await withMemcachedServers(count: 1) { servers in
            let proxy = try await FaultProxy.start(port: servers[0].port)
            defer { proxy.stop() }
            var configuration = try MemcachedClient.Configuration(nodes: "n1:\(proxy.hostAndPort)")
            configuration.requestTimeout = .seconds(5)
            configuration.failureThreshold = 100
            let client = try MemcachedClient(configuration: configuration)
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await client.run() }
                try await client.set("k", value: "v")
                #expect(try await client.get("k")?.value == ByteBuffer(string: "v"))
                // A cut reply: the command was applied, its reply lost.
                proxy.cutNextReplies(1)
                await #expect(throws: MemcachedError.self) { try await client.set("k", value: "w") }
                #expect(proxy.repliesCut == 1)
                try await eventually("reconnected") { (try? await client.get("k"))?.value == ByteBuffer(string: "w") }
                // Stalled: nothing comes back until resumed, then everything in order.
                proxy.stall()
                let stalled = Task { try await client.get("k") }
                try await eventually("the request is held") { proxy.heldChunks > 0 }
                proxy.resume()
                #expect(try await stalled.value?.value == ByteBuffer(string: "w"))
                group.cancelAll()
            }
        }
    }
}

import Memcached
import MemcachedTestRig
import NIOCore
import NIOPosix
import Synchronization
import Testing

@Suite("Commands against a real memcached, in both protocol modes")
struct CommandTests {
    /// A task that prefers an event loop's `EventLoopExecutor` stays on that loop across its round
    /// trips (the session layer's adapters run request handlers this way): tasks of two loops at
    /// once, each resumed on its own loop with its own replies.
    @Test func tasksPreferringAnEventLoopStayOnIt() async throws {
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        defer { group.shutdownGracefully { _ in } }
        let loops = Array(group.makeIterator())
        try await withMemcachedServers(count: 1) { servers in
            try await withClient(servers, eventLoopGroup: group, configure: { $0.connectionsPerNode = 2 }) { client in
                try await withThrowingTaskGroup(of: Void.self) { tasks in
                    for (index, loop) in loops.enumerated() {
                        for worker in 0..<8 {
                            tasks.addTask(executorPreference: EventLoopExecutor.for(loop)) {
                                #expect(loop.inEventLoop)
                                let key = "loop\(index)-task\(worker)"
                                for round in 0..<20 {
                                    try await client.set(key, value: bytes("\(key):\(round)"))
                                    #expect(loop.inEventLoop)
                                    let item = try #require(try await client.get(key))
                                    #expect(loop.inEventLoop)
                                    #expect(item.string == "\(key):\(round)")
                                }
                            }
                        }
                    }
                    try await tasks.waitForAll()
                }
            }
        }
        #expect(EventLoopExecutor.for(loops[0]) === EventLoopExecutor.for(loops[0]))
        #expect(EventLoopExecutor.for(loops[0]) !== EventLoopExecutor.for(loops[1]))
    }

    /// A request made on an event loop goes over that loop's connection to the node, so its reply
    /// resumes the task without a thread hop: the executor is asked to run each task from another
    /// thread only once, when the task starts (with two loops and two connections a node, a
    /// request sent over the other loop's connection would be resumed from that loop's thread).
    @Test func requestsOnAnEventLoopUseItsConnection() async throws {
        /// `EventLoopExecutor`'s behaviour, counting the jobs enqueued from off its loop.
        final class CountingLoopExecutor: TaskExecutor, Sendable {
            let loop: any EventLoop
            let fromOtherThreads = Atomic<Int>(0)
            init(_ loop: any EventLoop) { self.loop = loop }
            func enqueue(_ job: consuming ExecutorJob) {
                if !loop.inEventLoop { fromOtherThreads.add(1, ordering: .relaxed) }
                let job = UnownedJob(job)
                let executor = asUnownedTaskExecutor()
                loop.execute { job.runSynchronously(on: executor) }
            }
        }
        let group = MultiThreadedEventLoopGroup(numberOfThreads: 2)
        defer { group.shutdownGracefully { _ in } }
        let executors = group.makeIterator().map { CountingLoopExecutor($0) }
        let tasksPerLoop = 8
        try await withMemcachedServers(count: 1) { servers in
            try await withClient(servers, eventLoopGroup: group, configure: { $0.connectionsPerNode = 2 }) { client in
                try await withThrowingTaskGroup(of: Void.self) { tasks in
                    for (index, executor) in executors.enumerated() {
                        for worker in 0..<tasksPerLoop {
                            tasks.addTask(executorPreference: executor) {
                                let key = "connection\(index)-task\(worker)"
                                for round in 0..<20 {
                                    try await client.set(key, value: bytes("\(round)"))
                                    #expect(try await client.get(key)?.string == "\(round)")
                                }
                            }
                        }
                    }
                    try await tasks.waitForAll()
                }
            }
        }
        for executor in executors {
            #expect(executor.fromOtherThreads.load(ordering: .relaxed) == tasksPerLoop)
        }
    }

    @Test(arguments: MemcachedProtocolMode.allCases)
    func setGetDeleteRoundTrip(mode: MemcachedProtocolMode) async throws {
        try await withMemcachedServers(count: 1) { servers in
            try await withClient(servers, mode: mode) { client in
                #expect(try await client.get("missing") == nil)
                let stored = try await client.set("greeting", value: bytes("hello"), flags: 42)
                #expect(stored.isStored)
                let item = try #require(try await client.get("greeting"))
                #expect(item.string == "hello")
                #expect(item.flags == 42)
                #expect(item.cas != nil)
                #expect(try await client.delete("greeting") == .deleted)
                #expect(try await client.delete("greeting") == .notFound)
                #expect(try await client.get("greeting") == nil)
            }
        }
    }

    @Test(arguments: MemcachedProtocolMode.allCases)
    func addReplaceAppendPrepend(mode: MemcachedProtocolMode) async throws {
        try await withMemcachedServers(count: 1) { servers in
            try await withClient(servers, mode: mode) { (client: MemcachedClient) async throws in
                #expect(try await client.replace("k", value: bytes("x")) == false)
                #expect(try await client.add("k", value: bytes("b")) == true)
                #expect(try await client.add("k", value: bytes("c")) == false)
                #expect(try await client.store("k", value: bytes("c"), mode: .append).isStored)
                #expect(try await client.store("k", value: bytes("a"), mode: .prepend).isStored)
                #expect(try await client.get("k")?.string == "abc")
                #expect(try await client.replace("k", value: bytes("z")) == true)
                #expect(try await client.get("k")?.string == "z")
                #expect(try await client.store("nothing", value: bytes("a"), mode: .append) == .notStored)
            }
        }
    }

    @Test(arguments: MemcachedProtocolMode.allCases)
    func compareAndSwapDetectsConflicts(mode: MemcachedProtocolMode) async throws {
        try await withMemcachedServers(count: 1) { servers in
            try await withClient(servers, mode: mode) { client in
                try await client.set("doc", value: bytes("v1"))
                let first = try #require(try await client.get("doc"))
                let cas = try #require(first.cas)
                // Someone else writes in between.
                try await client.set("doc", value: bytes("v2"))
                #expect(try await client.compareAndSwap("doc", value: bytes("mine"), cas: cas) == .exists)
                #expect(try await client.get("doc")?.string == "v2")
                let second = try #require(try await client.get("doc"))
                let result = try await client.compareAndSwap("doc", value: bytes("v3"), cas: try #require(second.cas))
                #expect(result.isStored)
                if mode == .meta {
                    // Meta mode returns the new CAS: a follow-up conditional write needs no re-read.
                    guard case .stored(let newCAS?) = result else {
                        Issue.record("no CAS returned in meta mode")
                        return
                    }
                    #expect(try await client.compareAndSwap("doc", value: bytes("v4"), cas: newCAS).isStored)
                }
                try await client.delete("doc")
                #expect(try await client.compareAndSwap("doc", value: bytes("x"), cas: cas) == .notFound)
            }
        }
    }

    @Test func conditionalDeleteInMetaMode() async throws {
        try await withMemcachedServers(count: 1) { servers in
            try await withClient(servers, mode: .meta) { client in
                try await client.set("lock", value: bytes("owner-a"))
                let item = try #require(try await client.get("lock"))
                try await client.set("lock", value: bytes("owner-b"))
                #expect(try await client.delete("lock", cas: item.cas) == .exists)
                let current = try #require(try await client.get("lock"))
                #expect(try await client.delete("lock", cas: current.cas) == .deleted)
            }
        }
    }

    @Test func textModeRefusesWhatNeedsMeta() async throws {
        try await withMemcachedServers(count: 1) { servers in
            try await withClient(servers, mode: .text) { client in
                let delete = await memcachedError { try await client.delete("k", cas: 1) }
                #expect(delete?.code == .unsupportedInProtocolMode)
                let counter = await memcachedError { _ = try await client.increment("c", initial: 5) }
                #expect(counter?.code == .unsupportedInProtocolMode)
                let casAdd = await memcachedError {
                    _ = try await client.store("k", value: bytes("v"), mode: .add, cas: 1)
                }
                #expect(casAdd?.code == .unsupportedInProtocolMode)
            }
        }
    }

    @Test func metadataWithoutTheValueInMetaModeWithItInText() async throws {
        try await withMemcachedServers(count: 1) { servers in
            try await withClient(servers) { client in
                try await client.set("meta", value: bytes(String(repeating: "x", count: 5000)), ttl: .seconds(100), flags: 42)
                let response = try await client.execute(.getMetadata("meta"))
                guard case .item(let item?) = response else {
                    Issue.record("no item: \(response)")
                    return
                }
                #expect(item.value.readableBytes == 0)
                #expect(item.flags == 42)
                #expect(item.cas != nil)
                #expect((98...100).contains(item.timeToLive ?? -5))
                #expect(try await client.execute(.getMetadata("absent")) == .item(nil))
            }
            // Text mode cannot leave the value out: a gets, whose item has the flags and the CAS
            // unique (and the value), and no TTL; the item's TTL is left as it was.
            try await withClient(servers, mode: .text) { client in
                let response = try await client.execute(.getMetadata("meta"))
                guard case .item(let item?) = response else {
                    Issue.record("no item: \(response)")
                    return
                }
                #expect(item.flags == 42 && item.cas != nil && item.timeToLive == nil)
                #expect(try await client.execute(.getMetadata("absent")) == .item(nil))
            }
            try await withClient(servers) { client in
                guard case .item(let item?) = try await client.execute(.getMetadata("meta")) else { return }
                #expect((95...100).contains(item.timeToLive ?? -5), "not touched by the text-mode read")
            }
        }
    }

    @Test(arguments: MemcachedProtocolMode.allCases)
    func touchAndGetAndTouch(mode: MemcachedProtocolMode) async throws {
        try await withMemcachedServers(count: 1) { servers in
            try await withClient(servers, mode: mode) { client in
                #expect(try await client.touch("absent", ttl: .seconds(100)) == false)
                // memcached's clock ticks once a second: an item with TTL N lives N-1 to N seconds,
                // so 2 s is the shortest TTL that surely survives the next few milliseconds.
                try await client.set("short", value: bytes("v"), ttl: .seconds(2))
                #expect(try await client.touch("short", ttl: .seconds(100)) == true)
                try await client.set("other", value: bytes("w"), ttl: .seconds(2))
                #expect(try await client.getAndTouch("other", ttl: .seconds(100))?.string == "w")
                #expect(try await client.getAndTouch("nothing", ttl: .seconds(100)) == nil)
                // Both were extended from 2 s to 100 s: memcached reports the new TTL (read with
                // the meta protocol's `mg t`, which changes nothing).
                try await withClient(servers, mode: .meta) { inspector in
                    for key in ["short", "other"] {
                        guard case .item(let item?) = try await inspector.execute(.getMetadata(key)) else {
                            Issue.record("\(key) is gone")
                            continue
                        }
                        #expect((item.timeToLive ?? 0) > 90, "\(key): TTL \(item.timeToLive ?? 0)")
                    }
                }
                #expect(try await client.get("short")?.string == "v")
                #expect(try await client.get("other")?.string == "w")
            }
        }
    }

    @Test(arguments: MemcachedProtocolMode.allCases)
    func ttlRules(mode: MemcachedProtocolMode) async throws {
        try await withMemcachedServers(count: 1) { servers in
            try await withClient(servers, mode: mode) { client in
                // 0 = never expires, negative = expired at once.
                try await client.set("forever", value: bytes("v"), ttl: .seconds(0))
                #expect(try await client.get("forever") != nil)
                try await client.set("gone", value: bytes("v"), ttl: .seconds(-1))
                #expect(try await client.get("gone") == nil)
                // Over 30 days: sent as an absolute time. Sent raw it would be a date in 1970,
                // i.e. expired at once.
                try await client.set("long", value: bytes("v"), ttl: .seconds(60 * 60 * 24 * 45))
                #expect(try await client.get("long")?.string == "v")
                if mode == .meta {
                    // The remaining TTL, read back: 45 days, not an absolute time taken for seconds.
                    let long = try await client.execute(.get("long", withTimeToLive: true))
                    guard case .item(let item?) = long, let ttl = item.timeToLive else {
                        Issue.record("no TTL in \(long)")
                        return
                    }
                    #expect(abs(ttl - 60 * 60 * 24 * 45) < 5)
                    let forever = try await client.execute(.get("forever", withTimeToLive: true))
                    #expect(
                        forever == .item(MemcachedItem(value: bytes("v"), flags: 0, cas: nil, timeToLive: -1))
                            || {
                                if case .item(let item?) = forever { return item.timeToLive == -1 }
                                return false
                            }())
                }
                try await client.set("exactly30", value: bytes("v"), ttl: .seconds(60 * 60 * 24 * 30))
                #expect(try await client.get("exactly30")?.string == "v")
                try await client.set("past", value: bytes("v"), ttl: .at(unixTime: 1_000_000_000))
                #expect(try await client.get("past") == nil)
                // A short TTL really expires.
                try await client.set("brief", value: bytes("v"), ttl: .seconds(2))
                #expect(try await client.get("brief") != nil)
                try await eventually(timeout: .seconds(5), "a 2 s item expires") {
                    try await client.get("brief") == nil
                }
            }
        }
    }

    @Test(arguments: MemcachedProtocolMode.allCases)
    func counters(mode: MemcachedProtocolMode) async throws {
        try await withMemcachedServers(count: 1) { servers in
            try await withClient(servers, mode: mode) { client in
                #expect(try await client.increment("hits") == nil)
                try await client.set("hits", value: bytes("10"))
                #expect(try await client.increment("hits", by: 5) == 15)
                #expect(try await client.decrement("hits", by: 3) == 12)
                #expect(try await client.decrement("hits", by: 100) == 0)
                if mode == .meta {
                    #expect(try await client.increment("fresh", by: 1, initial: 7) == 7)
                    #expect(try await client.increment("fresh", by: 1, initial: 7) == 8)
                }
            }
        }
    }

    @Test(arguments: MemcachedProtocolMode.allCases)
    func nodeCommands(mode: MemcachedProtocolMode) async throws {
        try await withMemcachedServers(count: 1) { servers in
            try await withClient(servers, mode: mode) { client in
                let node = try client.node("n1")
                try await node.noop()
                #expect(try await node.version().hasPrefix("1."))
                try await client.set("k", value: bytes("v"))
                let general = try await node.stats()
                #expect(general.contains { $0.name == "curr_items" && $0.value == "1" })
                let settings = try await node.stats(.settings)
                #expect(settings.contains { $0.name == "item_size_max" && $0.value == "1048576" })
                let slabs = try await node.stats(.slabs)
                #expect(slabs.contains { $0.name == "active_slabs" })
                let items = try await node.stats(.items)
                #expect(items.contains { $0.name.hasSuffix(":number") })
                let unknown = await memcachedError { _ = try client.node("n9") }
                #expect(unknown?.code == .unknownNode)
                let keyless = await memcachedError { _ = try await client.execute(.noop) }
                #expect(keyless?.code == .invalidArgument)
            }
        }
    }

    @Test(arguments: MemcachedProtocolMode.allCases)
    func getManyAcrossNodes(mode: MemcachedProtocolMode) async throws {
        try await withMemcachedServers(count: 3) { servers in
            try await withClient(servers, mode: mode) { client in
                for index in 0..<200 where index % 3 != 0 {
                    try await client.set("many-\(index)", value: bytes("value-\(index)"))
                }
                let keys = (0..<200).map { "many-\($0)" }
                let items = try await client.getMany(keys)
                #expect(items.count == 133)
                for index in 0..<200 {
                    #expect(items["many-\(index)"]?.string == (index % 3 == 0 ? nil : "value-\(index)"))
                }
                // Keys really are spread over the three nodes.
                var perNode: [String: Int] = [:]
                for key in keys { perNode[try client.nodeID(forKey: key), default: 0] += 1 }
                #expect(perNode.count == 3)
            }
        }
    }

    /// A batch's replies come back in its requests' places, whether its requests go to one node or
    /// to several, with refused requests (bad keys, a keyless command) among them.
    @Test(arguments: [1, 3])
    func aBatchAnswersEachRequestInItsPlace(nodes: Int) async throws {
        try await withMemcachedServers(count: nodes) { servers in
            try await withClient(servers) { client in
                for index in 0..<40 { try await client.set("place-\(index)", value: bytes("value-\(index)")) }
                var requests: [MemcachedRequest] = []
                var expected: [String?] = []  // the value, or nil for a refusal
                for index in 0..<40 {
                    if index % 7 == 3 {
                        requests.append(index % 2 == 0 ? .get("bad key \(index)") : .noop)
                        expected.append(nil)
                    }
                    requests.append(.get("place-\(index)"))
                    expected.append("value-\(index)")
                }
                let results = await client.executeBatch(requests)
                #expect(results.count == requests.count)
                for (result, value) in zip(results, expected) {
                    switch (result, value) {
                    case (.success(.item(let item?)), let value?):
                        #expect(item.string == value)
                    case (.failure(let error), nil):
                        #expect(error.code == .invalidKey || error.code == .invalidArgument)
                    default:
                        Issue.record("\(result) where \(value ?? "a refusal") was expected")
                    }
                }
                if nodes > 1 {
                    let used = Set(try (0..<40).map { try client.nodeID(forKey: "place-\($0)") })
                    #expect(used.count == nodes, "the batch spans every node")
                }
            }
        }
    }

    @Test(arguments: MemcachedProtocolMode.allCases)
    func quietWritesCompleteAndReportFailures(mode: MemcachedProtocolMode) async throws {
        try await withMemcachedServers(count: 1) { servers in
            try await withClient(servers, mode: mode) { client in
                // A quiet write gets no reply when it succeeds; the client still completes it.
                #expect(try await client.set("q", value: bytes("1"), quiet: true).isStored)
                #expect(try await client.get("q")?.string == "1")
                // A failed quiet conditional write is still reported.
                let current = try #require(try await client.get("q")?.cas)
                let result = try await client.store("q", value: bytes("2"), mode: .set, cas: current + 1000, quiet: true)
                #expect(result == .exists)
                #expect(try await client.delete("q", quiet: true) == .deleted)
                #expect(try await client.delete("q", quiet: true) == .notFound)
                // Many quiet writes pipelined with normal ones.
                let results = await client.executeBatch(
                    (0..<50).map { MemcachedRequest.store("bq-\($0)", value: bytes("\($0)"), quiet: $0 % 2 == 0) })
                for result in results { #expect(try result.get() == .stored(.stored(cas: nil)) || mode == .meta) }
                for index in 0..<50 { #expect(try await client.get("bq-\(index)")?.string == "\(index)") }
            }
        }
    }

    @Test func submitWithoutWaiting() async throws {
        try await withMemcachedServers(count: 1) { servers in
            try await withClient(servers) { client in
                let outcome = AsyncStream.makeStream(of: Result<MemcachedResponse, MemcachedError>.self)
                await client.submit(.store("fire", value: bytes("and-forget"), quiet: true)) { result in
                    outcome.continuation.yield(result)
                    outcome.continuation.finish()
                }
                var iterator = outcome.stream.makeAsyncIterator()
                let result = try #require(await iterator.next())
                #expect(try result.get() == .stored(.stored(cas: nil)))
                #expect(try await client.get("fire")?.string == "and-forget")
            }
        }
    }

    @Test(arguments: MemcachedProtocolMode.allCases)
    func valuesRoundTripByteForByte(mode: MemcachedProtocolMode) async throws {
        try await withMemcachedServers(count: 1) { servers in
            try await withClient(servers, mode: mode) { client in
                var everyByte = ByteBuffer()
                for _ in 0..<4 { for byte in UInt8.min...UInt8.max { everyByte.writeInteger(byte) } }
                try await client.set("binary", value: everyByte)
                #expect(try await client.get("binary")?.value == everyByte)
                try await client.set("empty", value: ByteBuffer())
                #expect(try await client.get("empty")?.value.readableBytes == 0)
                let large = ByteBuffer(repeating: 0x5A, count: 900 * 1024)
                try await client.set("large", value: large)
                #expect(try await client.get("large")?.value == large)
            }
        }
    }

    @Test(arguments: MemcachedProtocolMode.allCases)
    func oversizedValuesAreRefusedClearly(mode: MemcachedProtocolMode) async throws {
        try await withMemcachedServers(count: 1) { servers in
            try await withClient(servers, mode: mode) { client in
                try await client.set("big", value: bytes("previous"))
                let tooLarge = ByteBuffer(repeating: 1, count: 1024 * 1024 + 1)
                let error = await memcachedError { try await client.set("big", value: tooLarge) }
                #expect(error?.code == .valueTooLarge)
                #expect(try await client.get("big")?.string == "previous")
            }
            // A client configured with a larger limit than the server's: the server's refusal is a
            // typed server error, and the connection stays usable. (memcached itself drops the old
            // item when a set fails for size: the reason the client checks the size before sending.)
            try await withClient(servers, mode: mode, configure: { $0.itemSizeLimit = 4 * 1024 * 1024 }) {
                (client: MemcachedClient) async throws in
                let tooLarge = ByteBuffer(repeating: 1, count: 2 * 1024 * 1024)
                let error = await memcachedError { try await client.set("big", value: tooLarge) }
                #expect(error?.code == .serverError)
                #expect(error?.message.contains("too large") == true)
                try await client.set("after", value: bytes("fine"))
                #expect(try await client.get("after")?.string == "fine")
            }
        }
    }

    @Test func base64KeysAllowArbitraryBytes() async throws {
        try await withMemcachedServers(count: 1) { servers in
            try await withClient(servers, configure: { $0.keyEncoding = .base64 }) { client in
                let odd = "key with spaces\r\nand\u{0}nul"
                try await client.set(odd, value: bytes("ok"))
                #expect(try await client.get(odd)?.string == "ok")
                #expect(try await client.get("key with spaces") == nil)
                let tooLong = String(repeating: "x", count: 188)
                let error = await memcachedError { _ = try await client.get(tooLong) }
                #expect(error?.code == .invalidKey)
            }
        }
    }

    @Test func requestsAreRefusedAfterShutdown() async throws {
        try await withMemcachedServers(count: 1) { servers in
            let client = try MemcachedClient(configuration: .init(nodes: "n1:127.0.0.1:\(servers[0].port)"))
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await client.run() }
                try await client.set("k", value: bytes("v"))
                group.cancelAll()
                try await group.waitForAll()
            }
            let after = await memcachedError { _ = try await client.get("k") }
            #expect(after?.code == .shutdown)
            let again = await memcachedError { try await client.run() }
            #expect(again?.code == .invalidConfiguration)
        }
    }
}

import Memcached
import MemcachedTestRig
import NIOCore
import Testing

/// The client in text mode against a memcached-protocol proxy (twemproxy) in front of two
/// memcached servers, as one node: it learns, on connections of its own, that the proxy has no
/// `gats` and no `stats`, never sends either on a shared connection (the proxy would close it),
/// and falls back (`gets` then `touch`, pipelined).
@Suite("Text mode through a memcached-protocol proxy: the client")
struct ProxyTests {
    func withProxyClient(_ proxy: ProxyServer, _ body: (MemcachedClient, MemcachedNodeClient) async throws -> Void) async throws {
        var configuration = MemcachedClient.Configuration(nodes: [MemcachedNodeAddress(id: "p1", host: "127.0.0.1", port: proxy.port)])
        configuration.protocolMode = .text
        configuration.requestTimeout = .seconds(5)
        configuration.probeInterval = .milliseconds(100)
        let client = try MemcachedClient(configuration: configuration)
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await client.run() }
            do {
                try await body(client, try client.node("p1"))
                group.cancelAll()
                try await group.waitForAll()
            } catch {
                group.cancelAll()
                throw error
            }
        }
    }

    @Test func theProxysMissingCommandsAreLearnedAndNeverSentOnASharedConnection() async throws {
        try await withProxiedMemcachedServers(count: 2) { proxy, _ in
            try await withProxyClient(proxy) { client, node in
                // Before the probe knows: the conservative forms already.
                try await client.set("k", value: ByteBuffer(string: "v"), ttl: .seconds(60))
                #expect(try await client.getAndTouch("k", ttl: .seconds(120)).map { String(buffer: $0.value) } == "v")
                try await eventually("probed") { node.answersGetAndTouch != nil && node.answersStats != nil }
                #expect(node.answersGetAndTouch == false)
                #expect(node.answersStats == false)
                // A read that slides the TTL: gets then touch, one round trip, the read's result.
                #expect(try await client.getAndTouch("k", ttl: .seconds(120)).map { String(buffer: $0.value) } == "v")
                #expect(try await client.getAndTouch("missing", ttl: .seconds(120)) == nil)
                // Several in one batch, with other commands between.
                let batch = await node.executeBatch([
                    .get("k", touch: .seconds(30)), .store("j", value: ByteBuffer(string: "w")), .get("j", touch: .seconds(30)),
                    .getMetadata("k"),
                ])
                #expect(batch.count == 4)
                if case .success(.item(let item?)) = batch[0] { #expect(String(buffer: item.value) == "v") } else { Issue.record("\(batch[0])") }
                if case .success(.stored(.stored)) = batch[1] {} else { Issue.record("\(batch[1])") }
                if case .success(.item(let item?)) = batch[2] { #expect(String(buffer: item.value) == "w") } else { Issue.record("\(batch[2])") }
                if case .success(.item(let item?)) = batch[3] { #expect(item.cas != nil) } else { Issue.record("\(batch[3])") }
                // stats: refused here, unsent, typed; the node stays up and errors stay at zero.
                do throws(MemcachedError) {
                    _ = try await node.stats()
                    Issue.record("stats went through a proxy that has none")
                } catch {
                    #expect(error.code == .unsupportedInProtocolMode)
                }
                let stats = await node.executeBatch([.stats(), .get("k")])
                if case .failure(let error) = stats[0] { #expect(error.code == .unsupportedInProtocolMode) } else { Issue.record("\(stats[0])") }
                if case .success(.item(.some)) = stats[1] {} else { Issue.record("the rest of the batch goes: \(stats[1])") }
                // Quiet writes and appends (notices, heartbeats) work through it.
                _ = try await client.execute(.store("q", value: ByteBuffer(string: "a"), quiet: true))
                _ = try await client.execute(.store("q", value: ByteBuffer(string: "b"), mode: .append))
                #expect(try await client.get("q").map { String(buffer: $0.value) } == "ab")
                #expect(node.isAvailable && node.statistics.errors == 0)
            }
        }
    }

    /// Against memcached itself in text mode, the probe finds both: `gats` and `stats` are used.
    @Test func memcachedItselfAnswersBoth() async throws {
        try await withMemcachedServers(count: 1) { servers in
            try await withClient(servers, mode: .text, configure: { $0.probeInterval = .milliseconds(100) }) { client in
                let node = try client.node("n1")
                try await eventually("probed") { node.answersGetAndTouch != nil && node.answersStats != nil }
                #expect(node.answersGetAndTouch == true && node.answersStats == true)
                #expect(try await node.stats().contains { $0.name == "pid" })
            }
        }
    }
}

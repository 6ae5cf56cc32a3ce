import Memcached
import MemcachedTestRig
import MetricsTestKit
import NIOCore
import Testing

@Suite("Per-node metrics")
struct MetricsTests {
    @Test func countsRequestsLatencyErrorsAndAvailabilityPerNode() async throws {
        let metrics = TestMetrics()
        let blackhole = try await BlackholeServer.start()
        defer { blackhole.stop() }
        try await withMemcachedServers(count: 1) { servers in
            try await withClient(
                servers,
                configure: {
                    $0.nodes.append(MemcachedNodeAddress(id: "silent", host: "127.0.0.1", port: blackhole.port))
                    $0.metricsFactory = metrics
                    $0.failureThreshold = 2
                }
            ) { client in
                let n1 = try client.node("n1")
                for index in 0..<10 { try await n1.set("m\(index)", value: bytes("v")) }
                for index in 0..<10 { _ = try await n1.get("m\(index)") }
                #expect(try metrics.expectCounter("memcached_requests_total", [("node", "n1")]).totalValue == 20)
                #expect(try metrics.expectTimer("memcached_request_duration_seconds", [("node", "n1")]).values.count == 20)

                // Only the silent node's requests get a short deadline: a loaded machine must not time
                // out the real node's requests.
                let silent = try client.node("silent")
                var shortGet = MemcachedRequest.get("k")
                shortGet.timeout = .milliseconds(100)
                for _ in 0..<2 {
                    let error = await memcachedError { _ = try await silent.execute(shortGet) }
                    #expect(error?.code == .timeout)
                }
                let fast = await memcachedError { _ = try await silent.execute(shortGet) }
                #expect(fast?.code == .nodeUnavailable)
                #expect(try metrics.expectCounter("memcached_errors_total", [("node", "silent"), ("kind", "timeout")]).totalValue == 2)
                #expect(try metrics.expectCounter("memcached_timeouts_total", [("node", "silent")]).totalValue == 2)
                #expect(
                    try metrics.expectCounter("memcached_errors_total", [("node", "silent"), ("kind", "nodeUnavailable")]).totalValue == 1)
                #expect(try metrics.expectGauge("memcached_node_up", [("node", "silent")]).lastValue == 0)
                #expect(try metrics.expectGauge("memcached_node_up", [("node", "n1")]).lastValue == 1)

                // Labels carry node ids and error kinds, never keys or values.
                for counter in metrics.counters {
                    #expect(counter.dimensions.allSatisfy { $0.0 == "node" || $0.0 == "kind" })
                    #expect(!counter.dimensions.contains { $0.1.hasPrefix("m") && $0.1 != "n1" })
                }
            }
        }
    }
}

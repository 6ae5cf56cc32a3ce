#if canImport(Glibc)
import Glibc
#endif
import Foundation
import HTTPTypes
import InMemoryTracing
import Logging
import Memcached
import MemcachedSessionsOperations
import MemcachedTestRig
import NIOCore
import ServiceLifecycle
import Synchronization
import Testing
import Tracing

@_spi(Simulation) @testable import MemcachedSessions

@Suite("Tracing")
struct SessionTracingTests {
    @Test func loadsAndSavesHaveSpansWithTheirRoundTripsAsChildren() async throws {
        try await withMemcachedServers(count: 2) { servers in
            let tracer = InMemoryTracer()
            var config = try configuration(servers)
            config.tracing.tracer = tracer
            try await withManager(config) { manager in
                var browser = Browser()
                try await manager.increment(&browser)  // a new session: a save only (its add)
                try await manager.increment(&browser)  // a load, a save (CAS write, backup)
                #expect(try await manager.readCount(&browser) == 2)  // a load, a save that writes nothing
                let id = try #require(browser.id)
                let keys = manager.keys(for: id.token)
                let spans = tracer.finishedSpans
                let loads = spans.filter { $0.operationName == "session.load" }
                let saves = spans.filter { $0.operationName == "session.save" }
                #expect(loads.count == 2)
                #expect(saves.count == 3)
                #expect(loads.allSatisfy { $0.attributes["msm.session.found"]?.toSpanAttribute() == .bool(true) })
                #expect(saves.first?.attributes["msm.cookie"]?.toSpanAttribute() == .string("set"), "the new session's cookie")
                // The round trips are children of the session's spans.
                let parents = Set((loads + saves).map(\.spanID))
                let roundTrips = spans.filter { $0.operationName.hasPrefix("memcached ") }
                #expect(!roundTrips.isEmpty)
                let children = roundTrips.filter { $0.parentSpanID.map(parents.contains) ?? false }
                #expect(children.count >= 4, "reads and writes under the loads and saves: \(roundTrips.map(\.operationName))")
                #expect(children.contains { $0.operationName.contains("get-and-touch") })
                #expect(children.contains { $0.operationName.contains("cas") || $0.operationName.contains("set") })
                #expect(roundTrips.allSatisfy { $0.attributes["memcached.node"] != nil && $0.kind == .client })
                // Nothing identifies the session.
                for span in spans {
                    let text = "\(span.operationName) \(span.attributes)"
                    #expect(!text.contains(id.token.description) && !text.contains(id.description))
                    #expect(!text.contains(keys.primary) && !text.contains(keys.backup))
                }
            }
        }
    }
}

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

@Suite("Run-time reconfiguration", .serialized)
struct ReconfigurationTests {
    @Test func nodesChangeUnderLoadWithoutLosingSessions() async throws {
        try await withMemcachedServers(count: 4) { servers in
            let initial = "n1:127.0.0.1:\(servers[0].port),n2:127.0.0.1:\(servers[1].port),n3:127.0.0.1:\(servers[2].port)"
            var config = try SessionManager.Configuration(nodes: initial)
            config.memcached.probeInterval = .milliseconds(100)
            try await withManager(config) { manager in
                let book = try await createSessions(manager, count: 60, readOnlyEvery: 1000)
                let onN2 = (0..<book.count).filter { book[$0].browser.id?.nodeID == "n2" }
                #expect(!onN2.isEmpty)
                let load = CheckedLoad(book: book)
                let running = Task { await load.run({ manager }, workers: 8) }
                // Whatever happens below, the load stops with the test.
                defer { load.stop.store(true, ordering: .relaxed) }
                try await eventually("load running") { load.requests.load(ordering: .relaxed) > 200 }

                // Remove n2: it drains; its sessions move at their next request.
                let removed = try await manager.reconfigure(.init(nodes: "n1:127.0.0.1:\(servers[0].port) n3:127.0.0.1:\(servers[2].port)"))
                #expect(removed.drainingNodes == ["n2"])
                try await eventually("sessions moved off n2") {
                    onN2.allSatisfy { book[$0].browser.id?.nodeID != "n2" }
                }
                // Add n4: new sessions land there too.
                let before = load.requests.load(ordering: .relaxed)
                try await manager.reconfigure(
                    .init(nodes: "n1:127.0.0.1:\(servers[0].port),n3:127.0.0.1:\(servers[2].port),n4:127.0.0.1:\(servers[3].port)"))
                try await eventually("load continued") { load.requests.load(ordering: .relaxed) > before + 200 }
                load.stop.store(true, ordering: .relaxed)
                await running.value

                var fresh: [String] = []
                for _ in 0..<12 {
                    var browser = Browser()
                    try await manager.increment(&browser)
                    fresh.append(browser.id!.nodeID)
                }
                #expect(fresh.contains("n4"), "new sessions land on the added node: \(fresh)")
                #expect(!fresh.contains("n2"), "none on the removed one")
                #expect(load.mismatches.withLock { $0 } == [], "no lost update")
                #expect(load.failures.withLock { $0 } == [], "no failed request")
                // Every session still reads back its last count.
                try await verifyAndAdvance(manager, book)
                #expect(manager.runtimeView.locking == "none")
                let events = manager.events.recent.filter { $0.kind == .configuration }
                #expect(events.count == 2)
            }
        }
    }

    /// Concurrent node changes never interleave: whatever order they apply in, every node that was
    /// ever configured is either configured or draining afterwards (interleaved, one change could
    /// overwrite the other's draining list, and a node's sessions would be lost).
    @Test func concurrentNodeChangesAreSerialized() async throws {
        try await withMemcachedServers(count: 4) { servers in
            let addresses = servers.enumerated().map { "n\($0.offset + 1):127.0.0.1:\($0.element.port)" }
            var config = try SessionManager.Configuration(nodes: addresses.joined(separator: ","))
            config.memcached.probeInterval = .milliseconds(100)
            try await withManager(config) { manager in
                for round in 0..<5 {
                    await withTaskGroup(of: Void.self) { group in
                        for index in 0..<200 {
                            // Each change keeps n1 and a different selection of the others.
                            let kept = [addresses[0]] + (1..<4).filter { (index + round) & (1 << ($0 - 1)) != 0 }.map { addresses[$0] }
                            group.addTask { _ = try? await manager.reconfigure(.init(nodes: kept.joined(separator: " "))) }
                        }
                    }
                    let view = manager.runtimeView
                    let configured = Set(view.nodes.split(separator: ",").map { String($0.split(separator: ":")[0]) })
                    let known = configured.union(view.drainingNodes)
                    #expect(known == ["n1", "n2", "n3", "n4"], "round \(round): configured \(configured), draining \(view.drainingNodes)")
                    #expect(configured.isDisjoint(with: view.drainingNodes))
                }
            }
        }
    }

    /// A node's address cannot change under the same id (sessions name their node by id, so the
    /// sessions on the old server would be looked for on the new one): refused with a typed
    /// error; a moved node gets a new id and the old id drains.
    @Test func aNodeCannotChangeItsAddressUnderTheSameID() async throws {
        try await withMemcachedServers(count: 3) { servers in
            var config = try SessionManager.Configuration(nodes: "n1:127.0.0.1:\(servers[0].port),n2:127.0.0.1:\(servers[1].port)")
            config.memcached.probeInterval = .milliseconds(100)
            try await withManager(config) { manager in
                let error = await sessionError {
                    try await manager.reconfigure(.init(nodes: "n1:127.0.0.1:\(servers[0].port),n2:127.0.0.1:\(servers[2].port)"))
                }
                #expect(error?.code == .invalidConfiguration)
                #expect(error?.message.contains("new id") == true)
                #expect(manager.runtimeView.nodes == "n1:127.0.0.1:\(servers[0].port),n2:127.0.0.1:\(servers[1].port)", "nothing applied")
                let moved = try await manager.reconfigure(.init(nodes: "n1:127.0.0.1:\(servers[0].port),n3:127.0.0.1:\(servers[2].port)"))
                #expect(moved.drainingNodes == ["n2"])
                // While n2 drains, its id keeps its old address too.
                let again = await sessionError {
                    try await manager.reconfigure(.init(nodes: "n1:127.0.0.1:\(servers[0].port),n2:127.0.0.1:\(servers[2].port)"))
                }
                #expect(again?.code == .invalidConfiguration)
            }
        }
    }

    /// A `uriPattern` that may come over HTTP is limited to a safe subset (no backreferences, no
    /// lookaround, no nested quantifiers: the constructs whose matching time can explode), and a
    /// path over the length cap never matches.
    @Test func runTimePatternsAreLimitedToASafeSubset() async throws {
        for unsafe in ["(a+)+$", "(a|aa)*b*(c*)*", "((ab)*)+", "(x+x+)+y", "(.*)\\1", "/(?=admin).*", "/(?<!x).*", "(a{2,})+", "(" , "[a-"] {
            #expect(throws: SessionError.self, "\(unsafe)") { try PathPattern.checkSafe(unsafe) }
        }
        for safe in ["/cart/.*", "/(cart|checkout)/.+", "(?:/api)?/orders/[0-9]+", "/a+b*c?", "/(ab)+", "/[(+*]+", "/x{1,3}/(?i:admin)"] {
            #expect(throws: Never.self, "\(safe)") { try PathPattern.checkSafe(safe) }
        }
        #expect(throws: SessionError.self) { try PathPattern.checkSafe("/" + String(repeating: "a", count: 300)) }

        try await withMemcachedServers(count: 1) { servers in
            try await withManager(try configuration(servers)) { manager in
                let error = await sessionError { try await manager.reconfigure(.init(locking: "uriPattern:(a+)+$")) }
                #expect(error?.code == .invalidConfiguration)
                #expect(manager.runtimeView.locking == "none", "nothing applied")
                try await manager.reconfigure(.init(locking: "uriPattern:/.*"))
                #expect(manager.store.locks.locksRequest(onPath: "/cart"))
                #expect(!manager.store.locks.locksRequest(onPath: "/" + String(repeating: "a", count: PathPattern.maximumPathLength)), "over the cap: not matched")
            }
        }
    }

    @Test func lockingAndEnabledChangeAtRunTime() async throws {
        try await withMemcachedServers(count: 1) { servers in
            try await withManager(try configuration(servers)) { manager in
                var browser = Browser()
                try await manager.increment(&browser)
                #expect(manager.statistics.value(of: .locksAcquired) == 0)
                try await manager.reconfigure(.init(locking: "all"))
                try await manager.increment(&browser)
                #expect(manager.statistics.value(of: .locksAcquired) == 1)
                try await manager.reconfigure(.init(locking: "uriPattern:/cart/.*"))
                try await manager.increment(&browser)
                #expect(manager.statistics.value(of: .locksAcquired) == 1)
                // Invalid changes are refused whole.
                await #expect(throws: SessionError.self) { try await manager.reconfigure(.init(locking: "sometimes")) }
                await #expect(throws: SessionError.self) { try await manager.reconfigure(.init(failoverNodes: ["n1"])) }
                await #expect(throws: SessionError.self) { try await manager.reconfigure(.init(nodes: "bad node list")) }
                #expect(manager.runtimeView.locking == "uriPattern(/cart/.*)")
                // Disabled: sessions live in this instance's memory, memcached is not touched.
                try await manager.reconfigure(.init(enabled: false))
                #expect(!manager.isEnabled)
                var local = Browser()
                #expect(try await manager.increment(&local) == 1)
                #expect(try await manager.increment(&local) == 2)
            }
        }
    }
}

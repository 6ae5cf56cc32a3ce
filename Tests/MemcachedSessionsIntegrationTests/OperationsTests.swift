import Foundation
import HTTPTypes
import Memcached
import MemcachedSessionsOperations
import MemcachedTestRig
import NIOCore
import Synchronization
import Testing

@testable import MemcachedSessions

@Suite("Operations: reconfiguration, status, management endpoints", .serialized)
struct OperationsTests {
    /// A checked /counter load: each worker owns its sessions and checks every count.
    final class CheckedLoad: Sendable {
        let book: SessionBook
        let mismatches = Mutex<[String]>([])
        let failures = Mutex<[String]>([])
        let requests = Atomic<Int>(0)
        let stop = Atomic<Bool>(false)

        init(book: SessionBook) { self.book = book }

        func run(_ manager: @escaping @Sendable () -> SessionManager, workers: Int) async {
            await withTaskGroup(of: Void.self) { group in
                for worker in 0..<workers {
                    group.addTask {
                        var index = worker
                        while !self.stop.load(ordering: .relaxed) {
                            var entry = self.book[index]
                            do {
                                let count = try await manager().increment(&entry.browser)
                                if count != entry.count + 1 {
                                    self.mismatches.withLock { $0.append("session \(index): \(count) after \(entry.count)") }
                                }
                                entry.count = count
                                self.book.update(index, entry)
                                self.requests.add(1, ordering: .relaxed)
                            } catch {
                                // Bounded: a load left running by a failed test must not grow without end.
                                let count = self.failures.withLock { failures in
                                    if failures.count < 100 { failures.append("session \(index): \(error)") }
                                    return failures.count
                                }
                                if count >= 100 { return }
                            }
                            index += workers
                            if index >= self.book.count { index = worker }
                        }
                    }
                }
            }
        }
    }

    @Test func nodesChangeUnderLoadWithoutLosingSessions() async throws {
        try await withMemcachedServers(count: 4) { servers in
            let initial = "n1:127.0.0.1:\(servers[0].port),n2:127.0.0.1:\(servers[1].port),n3:127.0.0.1:\(servers[2].port)"
            var config = try SessionManager.Configuration(nodes: initial)
            config.memcached.probeInterval = .milliseconds(100)
            try await withManager(config) { manager in
                let book = try await FailoverTests.createSessions(manager, count: 60, readOnlyEvery: 1000)
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
                try await FailoverTests.verifyAndAdvance(manager, book)
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

    #if Operations
    @Test func managementEndpointsNeedTheTokenAndShowNoSessionData() async throws {
        try await withMemcachedServers(count: 2) { servers in
            try await withManager(try configuration(servers)) { manager in
                var browser = Browser()
                try await manager.request(&browser) { access in
                    let session = try await access.loadOrCreate()
                    try session.set("secret", "attribute-value-never-shown")
                }
                let endpoints = try ManagementEndpoints(manager: manager, token: "0123456789abcdef-token", instance: "test-1")
                #expect(throws: SessionError.self) { _ = try ManagementEndpoints(manager: manager, token: "short", instance: "x") }
                func fields(_ authorization: String?) -> HTTPFields {
                    var fields = HTTPFields()
                    if let authorization { fields[.authorization] = authorization }
                    return fields
                }
                for authorization in [nil, "Bearer wrong-token-0123456789", "0123456789abcdef-token", "Basic 0123456789abcdef-token"] {
                    let denied = await endpoints.respond(to: .status, method: .get, headerFields: fields(authorization), body: nil)
                    #expect(denied.status == .unauthorized)
                    #expect(denied.headerFields[.wwwAuthenticate] == "Bearer")
                }
                let bearer = fields("Bearer 0123456789abcdef-token")
                let status = await endpoints.respond(to: .status, method: .get, headerFields: bearer, body: nil)
                #expect(status.status == .ok)
                #expect(status.headerFields[.cacheControl] == "no-store")
                let decoded = try JSONDecoder().decode(SessionManager.Status.self, from: Data(status.text.utf8))
                #expect(decoded.nodes.map(\.id) == ["n1", "n2"])
                #expect(decoded.statistics.counters["sessions_created"] == 1)
                let page = await endpoints.respond(to: .page, method: .get, headerFields: bearer, body: nil)
                #expect(page.status == .ok && page.headerFields[.contentType]?.hasPrefix("text/html") == true)
                #expect(page.text.contains("<svg") && page.text.contains("http-equiv=\"refresh\""))
                for body in [status.text, page.text] {
                    #expect(!body.contains(browser.id!.token.description), "no session id")
                    #expect(!body.contains("attribute-value-never-shown"), "no attribute value")
                }
                // Reconfiguration over the endpoint.
                let changed = await endpoints.respond(
                    to: .config, method: .put, headerFields: bearer, body: ByteBuffer(string: #"{"locking":"auto"}"#))
                #expect(changed.status == .ok)
                #expect(manager.lockingMode == .auto)
                let bad = await endpoints.respond(
                    to: .config, method: .put, headerFields: bearer, body: ByteBuffer(string: #"{"locking":"never"}"#))
                #expect(bad.status == .badRequest && bad.text.contains("locking mode"))
                let garbage = await endpoints.respond(to: .config, method: .put, headerFields: bearer, body: ByteBuffer(string: "]["))
                #expect(garbage.status == .badRequest)
                let wrongMethod = await endpoints.respond(to: .status, method: .delete, headerFields: bearer, body: nil)
                #expect(wrongMethod.status == .methodNotAllowed && wrongMethod.headerFields[.allow] == "GET")
            }
        }
    }
    #endif

    @Test func statusHistoryTracksRatesAndNodeEvents() async throws {
        try await withMemcachedServers(count: 2) { servers in
            var config = try configuration(servers)
            config.memcached.failureThreshold = 1
            try await withManager(config) { manager in
                var browsers = [Browser](repeating: Browser(), count: 20)
                for round in 0..<3 {
                    for index in browsers.indices { try await manager.increment(&browsers[index]) }
                    _ = round
                }
                try await eventually("two samples") { manager.history.samples.count >= 2 }
                try await eventually("a sample with traffic") {
                    for index in browsers.indices { try await manager.increment(&browsers[index]) }
                    return manager.history.samples.contains { $0.requestsPerSecond > 0 && $0.writesPerSecond > 0 }
                }
                try await servers[1].kill()
                for index in browsers.indices { _ = try? await manager.increment(&browsers[index]) }
                try await eventually("node-down event") { manager.events.recent.contains { $0.kind == .nodeDown } }
                try await servers[1].restart()
                try await eventually(timeout: .seconds(15), "node-up event") { manager.events.recent.contains { $0.kind == .nodeUp } }
                #expect(manager.events.recent.contains { $0.kind == .failover })
                #expect(
                    manager.events.recent.allSatisfy { event in !browsers.contains { event.message.contains($0.id!.token.description) } })
            }
        }
    }
}

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

@Suite("Status and management endpoints", .serialized)
struct OperationsStatusTests {
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

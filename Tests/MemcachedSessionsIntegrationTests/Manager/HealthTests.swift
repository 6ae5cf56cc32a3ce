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

@Suite("Health and the unavailable policy")
struct HealthTests {
    @Test func unavailablePolicyDecidesWhenNoNodeAnswers() async throws {
        try await withMemcachedServers(count: 1) { servers in
            for policy in [SessionManager.UnavailablePolicy.fail, .startNewSession] {
                if servers[0].pid == nil { try await servers[0].restart() }
                let config = try configuration(servers) {
                    $0.unavailablePolicy = policy
                    $0.memcached.requestTimeout = .milliseconds(300)
                }
                try await withManager(config) { manager in
                    var browser = Browser()
                    try await manager.increment(&browser)
                    try await servers[0].kill()
                    let error = await sessionError { _ = try await manager.readCount(&browser) }
                    switch policy {
                    case .fail:
                        #expect(error?.code == .unavailable, "a dead node is never read as 'no session'")
                        #expect(browser.cookie != nil, "the user keeps the cookie")
                    case .startNewSession:
                        #expect(error == nil)
                    }
                    #expect(manager.statistics.value(of: .unavailable) >= 1)
                }
            }
        }
    }

    /// Sticky, no node answering: the health check says yes while memory can take a new session
    /// (written sessions are evicted to make room; before, a memory full of them said no), and no
    /// once none would fit (every new session is refused then).
    @Test func theStickyHealthCheckCountsRoomNotEntries() async throws {
        try await withMemcachedServers(count: 1) { servers in
            let config = try configuration(servers, mode: .sticky) {
                $0.sticky.localSessionLimit = 32
                $0.memcached.requestTimeout = .milliseconds(300)
                $0.memcached.failureThreshold = 1
                $0.sticky.asynchronousSaving = false
            }
            try await withManager(config) { manager in
                var made = 0
                while manager.sticky.localStore.count < 32, made < 2_000 {
                    var browser = Browser()
                    try await manager.increment(&browser)
                    made += 1
                }
                #expect(manager.sticky.localStore.count == 32, "memory full of written sessions")
                try await servers[0].kill()
                var probe = Browser()
                try await manager.increment(&probe)  // finds the node down; kept in memory, unsaved
                let topology = manager.topology
                #expect(!topology.order.contains { topology.isAvailable($0) })
                #expect(manager.canServeSessions, "written sessions make room")
                var attempts = 0
                while manager.canServeSessions, attempts < 2_000 {
                    var browser = Browser()
                    _ = try? await manager.increment(&browser)
                    attempts += 1
                }
                #expect(!manager.canServeSessions, "memory full of unsaved sessions")
                for _ in 0..<20 {
                    var browser = Browser()
                    await #expect(throws: SessionError.self) { try await manager.increment(&browser) }
                }
            }
        }
    }
}

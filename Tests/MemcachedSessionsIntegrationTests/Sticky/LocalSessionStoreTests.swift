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

@Suite("The sticky instance's memory: bounded, expiring")
struct LocalSessionStoreTests {
    /// Sticky, every node down: sessions live in memory only, and memory is bounded. At the bound
    /// new sessions are refused with a typed error (503 through the adapters); the unsaved ones
    /// are never dropped, and are written once memcached is back, which frees room again.
    @Test func localMemoryIsBoundedWhileMemcachedIsDown() async throws {
        try await withMemcachedServers(count: 1) { servers in
            let config = try configuration(servers, mode: .sticky) {
                $0.sticky.localSessionLimit = 32
                $0.memcached.requestTimeout = .milliseconds(300)
                $0.memcached.failureThreshold = 1
            }
            try await withManager(config) { manager in
                try await servers[0].kill()
                var kept: [Browser] = []
                var refused = 0
                for _ in 0..<100 {
                    var browser = Browser()
                    do {
                        #expect(try await manager.increment(&browser) == 1)
                        kept.append(browser)
                    } catch let error as SessionError {
                        #expect(error.code == .localStoreFull, "\(error)")
                        #expect(browser.cookie == nil, "a refused session gets no cookie")
                        refused += 1
                    }
                }
                #expect(refused > 0)
                #expect(kept.count <= 32)
                #expect(manager.sticky.localStore.count <= 32)
                #expect(manager.statistics.value(of: .localStoreRefusals) == refused)
                // Nothing unsaved was dropped: every kept session still counts on.
                for index in kept.indices { #expect(try await manager.increment(&kept[index]) == 2) }

                try await servers[0].restart()
                // Waits for what frees room, not for a first new session to fit: that one can
                // push a written copy out of a shard whose other entry is still unsaved, and
                // reading that copy back then finds no room (the first fresh-clone CI run of
                // 2026-12-02, under load).
                try await eventually(timeout: .seconds(20), "the unsaved sessions are written") {
                    manager.sticky.writer.pendingCount == 0 && !manager.sticky.localStore.allSessions.contains { $0.hasUnsavedChanges }
                }
                var fresh = Browser()
                #expect(try await manager.increment(&fresh) == 1, "room again")
                for index in kept.indices { #expect(try await manager.readCount(&kept[index]) == 2) }
            }
        }
    }

    @Test func stickyIdleAndAbsoluteExpiry() async throws {
        try await withMemcachedServers(count: 1) { servers in
            try await withManager(try configuration(servers, mode: .sticky) { $0.timeouts.idle = .seconds(1) }) { manager in
                var browser = Browser()
                try await manager.increment(&browser)
                #expect(try await manager.readCount(&browser) == 1)
                // No request for well past the idle timeout (1 s, plus memcached's one-second clock and
                // the asynchronous save's window): gone from memory and from memcached. A check
                // any earlier would itself be a request that keeps the session alive.
                try await Task.sleep(for: .milliseconds(3500))
                #expect(try await manager.readCount(&browser) == 0, "idle past its timeout: gone")
            }
            try await withManager(try configuration(servers, mode: .sticky) { $0.timeouts.absolute = .seconds(1) }) { manager in
                var browser = Browser()
                try await manager.increment(&browser)
                let start = ContinuousClock.now
                while ContinuousClock.now - start < .seconds(4), try await manager.readCount(&browser) != 0 {
                    try await Task.sleep(for: .milliseconds(100))
                }
                #expect(try await manager.readCount(&browser) == 0)
                #expect(ContinuousClock.now - start < .seconds(3))
            }
        }
    }
}

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

@Suite("Auto and pattern locking")
struct ReadOnlyPathsTests {
    @Test func autoLockingLearnsReadOnlyPaths() async throws {
        try await withMemcachedServers(count: 1) { servers in
            try await withManager(try configuration(servers) { $0.locking.mode = .auto }) { manager in
                var browser = Browser()
                try await manager.increment(&browser)
                let afterCreate = manager.statistics.value(of: .locksAcquired)
                #expect(try await manager.readCount(&browser, path: "/read") == 1)
                #expect(manager.statistics.value(of: .locksAcquired) == afterCreate + 1, "unknown paths lock")
                for _ in 0..<5 { #expect(try await manager.readCount(&browser, path: "/read") == 1) }
                #expect(manager.statistics.value(of: .locksAcquired) == afterCreate + 1, "a read-only path runs unlocked")
                #expect(manager.statistics.value(of: .requestsUnlockedReadOnly) == 5)
                // The same path with a query string is the same path.
                _ = manager.beginRequest(path: "/read", sessionCookie: nil)
                // A write on that path: locked again from then on.
                #expect(try await manager.increment(&browser, path: "/read") == 2)
                #expect(try await manager.readCount(&browser, path: "/read") == 2)
                #expect(manager.statistics.value(of: .locksAcquired) == afterCreate + 2)
                // Writing paths always lock.
                try await manager.increment(&browser)
                try await manager.increment(&browser)
                #expect(manager.statistics.value(of: .locksAcquired) == afterCreate + 4)
            }
        }
    }

    @Test func uriPatternLocksOnlyMatchingPaths() async throws {
        try await withMemcachedServers(count: 1) { servers in
            try await withManager(try configuration(servers) { $0.locking.mode = .uriPattern("/cart/.*") }) { manager in
                var browser = Browser()
                try await manager.increment(&browser, path: "/home")
                try await manager.increment(&browser, path: "/home")
                #expect(manager.statistics.value(of: .locksAcquired) == 0)
                try await manager.increment(&browser, path: "/cart/add")
                #expect(manager.statistics.value(of: .locksAcquired) == 1)
            }
        }
    }
}

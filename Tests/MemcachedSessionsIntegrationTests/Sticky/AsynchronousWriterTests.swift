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
import NIOPosix
import ServiceLifecycle
import Synchronization
import Testing
import Tracing

@_spi(Simulation) @testable import MemcachedSessions

@Suite("Asynchronous saving")
struct AsynchronousWriterTests {
    @Test func asynchronousSavesCoalesceWithinTheirWindow() async throws {
        try await withMemcachedServers(count: 1) { servers in
            let config = try configuration(servers, mode: .sticky) {
                $0.route = "a"
                $0.sticky.saveDelay = .milliseconds(400)
            }
            try await withManager(config) { manager in
                try await withInspector(servers) { inspector in
                    var browser = Browser()
                    try await manager.increment(&browser)
                    try await eventually("first write") { manager.statistics.value(of: .writes) == 1 }
                    let before = try await commandCounts(inspector)
                    for expected in 2...21 { #expect(try await manager.increment(&browser) == expected) }
                    // Twenty changes within the window: written once, with the last state.
                    let id = try #require(browser.id)
                    try await eventually("the window passed and the write landed") {
                        guard let stored = try await inspector.node("n1").get(manager.keys(for: id.token).primary) else { return false }
                        let record = try BinarySessionCodec().decodeSession(from: stored.value)
                        return try BinarySessionCodec().decodeValue(Int.self, from: record.attributes["count"]!) == 21
                    }
                    let writes = try await commandCounts(inspector) - before
                    #expect(writes.sets <= 2, "\(writes)")
                }
            }
        }
    }

    /// The manager's background work runs on an event loop of the group its own client's
    /// connections run on (no hop between a reply and the work resuming): an asynchronous save's
    /// batch encodes the session there. Over a caller's client (which may run on another group)
    /// it runs on Swift's pool: the control.
    @Test(arguments: [true, false])
    func asynchronousSavesRunOnAnEventLoopOfTheManagersGroup(ownClient: Bool) async throws {
        final class WhereEncoded: SessionCodec {
            let base = BinarySessionCodec()
            /// For each background encode: whether it ran on an event loop.
            let onLoop = Mutex<[Bool]>([])
            func encodeSession(_ record: SessionRecord, into buffer: inout ByteBuffer) throws(SessionCodecError) {
                if SessionManager.isBackgroundWork {
                    let loop = MultiThreadedEventLoopGroup.currentEventLoop != nil
                    onLoop.withLock { $0.append(loop) }
                }
                try base.encodeSession(record, into: &buffer)
            }
            func decodeSession(from buffer: ByteBuffer) throws(SessionCodecError) -> SessionRecord {
                try base.decodeSession(from: buffer)
            }
            func encodeValue<Value: Encodable>(_ value: Value) throws(SessionCodecError) -> ByteBuffer {
                try base.encodeValue(value)
            }
            func decodeValue<Value: Decodable>(_ type: Value.Type, from bytes: ByteBuffer) throws(SessionCodecError) -> Value {
                try base.decodeValue(type, from: bytes)
            }
        }
        try await withMemcachedServers(count: 2) { servers in
            let codec = WhereEncoded()
            let config = try configuration(servers, mode: .sticky) {
                $0.route = "a"
                $0.codec = codec
            }
            let manager: SessionManager
            var services: [@Sendable () async throws -> Void] = []
            if ownClient {
                manager = try SessionManager(configuration: config)
            } else {
                let client = try MemcachedClient(configuration: config.memcached)
                manager = try SessionManager(configuration: config, client: client)
                services.append { try await client.run() }
            }
            services.append { try await manager.run() }
            try await whileRunning(services) {
                var browser = Browser()
                for expected in 1...3 {
                    #expect(try await manager.increment(&browser) == expected)
                    try await eventually("the asynchronous save") { manager.statistics.value(of: .writes) == expected }
                }
                let encodes = codec.onLoop.withLock { $0 }
                #expect(encodes.count >= 3)
                #expect(encodes.allSatisfy { $0 == ownClient }, "\(encodes)")
            }
        }
    }

    @Test func gracefulShutdownFlushesQueuedWrites() async throws {
        try await withMemcachedServers(count: 2) { servers in
            let manager = try SessionManager(configuration: try configuration(servers, mode: .sticky) { $0.route = "a" })
            let group = ServiceGroup(
                configuration: .init(services: [manager], gracefulShutdownSignals: [], logger: Logger(label: "test")))
            // Structured: whatever happens, the service group stops before the test goes on.
            let browsers = try await withThrowingTaskGroup(of: Void.self) { tasks in
                tasks.addTask { try await group.run() }
                var browsers = [Browser](repeating: Browser(), count: 200)
                do {
                    for index in browsers.indices {
                        for _ in 0..<3 { try await manager.increment(&browsers[index]) }
                    }
                } catch {
                    tasks.cancelAll()
                    throw error
                }
                await group.triggerGracefulShutdown()
                try await tasks.waitForAll()
                return browsers
            }
            // Every queued write reached memcached: another instance reads every final count.
            try await withManager(try configuration(servers, mode: .sticky) { $0.route = "b" }) { (other: SessionManager) async throws in
                for index in browsers.indices {
                    var browser = browsers[index]
                    let count = try await other.readCount(&browser)
                    #expect(count == 3, "session \(index) has \(count)")
                }
            }
        }
    }

    /// Seed 1146: the previous owner's queued write, due just before it read the takeover notice,
    /// landed after the new owner had read the copy: the browser saw its count go back, then come
    /// back. The takeover now waits until the previous owner has read the notice (nothing of the
    /// session queued or in flight there any more), and reads the copy after that.
    @Test func aQueuedWriteOfThePreviousOwnerLandsBeforeTheTakeoverReads() async throws {
        try await withMemcachedServers(count: 1) { servers in
            // A reads its notices every 900 ms (not 250): its queued write (due 100 ms after the
            // change) always comes first.
            let slowNotices = StretchingClock { $0 == StickyLifecycle.noticeInterval ? .milliseconds(900) : nil }
            let a = try sticky(servers, route: "a", asynchronous: true)
            let b = try sticky(servers, route: "b", asynchronous: true)
            try await withManagers([(a, slowNotices), (b, SystemSessionClock())]) { managers in
                let (a, b) = (managers[0], managers[1])
                try await withInspector(servers) { inspector in
                    var browser = Browser()
                    try await a.increment(&browser)
                    let keys = a.keys(for: try #require(browser.id).token)
                    try await eventually("the first count written") { try await storedCount(inspector, "n1", keys.primary) == 1 }
                    // Right after A read its notices: the next read is 900 ms away.
                    let last = a.sticky.notices.lastReadAt
                    try await eventually("A read its notices") { a.sticky.notices.lastReadAt != last }
                    #expect(try await a.increment(&browser) == 2)  // queued
                    var atB = browser
                    let seen = try await b.readCount(&atB)
                    try await eventually("A has read the notice and written what it had") {
                        a.statistics.value(of: .noticesRead) == 1 && a.sticky.writer.pendingCount == 0
                    }
                    #expect(try await storedCount(inspector, "n1", keys.primary) == seen, "B served what memcached kept")
                    #expect(seen == 2)
                }
            }
        }
    }
}

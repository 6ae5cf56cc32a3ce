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

// Helpers shared by the suites (loads, barriers, codecs, configurations).

// From the former BadInputTests.swift.
/// A second codec, to prove codecs are pluggable: the whole session as one JSON document, values
/// as base64 of their JSON.
struct JSONDocumentCodec: SessionCodec {
    struct Document: Codable {
        var created: Int64
        var accessed: Int64
        var idle: Int64
        var absolute: Int64
        var version: UInt64
        var attributes: [String: String]
    }

    func encodeSession(_ record: SessionRecord, into buffer: inout ByteBuffer) throws(SessionCodecError) {
        let metadata = record.metadata
        let document = Document(
            created: metadata.createdAt, accessed: metadata.lastAccessedAt, idle: metadata.idleTimeoutSeconds,
            absolute: metadata.absoluteTimeoutSeconds, version: metadata.version,
            attributes: record.attributes.mapValues { Data($0.readableBytesView).base64EncodedString() })
        do {
            buffer.writeBytes(try JSONEncoder().encode(document))
        } catch {
            throw SessionCodecError("encoding: \(error)")
        }
    }

    func decodeSession(from buffer: ByteBuffer) throws(SessionCodecError) -> SessionRecord {
        do {
            let document = try JSONDecoder().decode(Document.self, from: Data(buffer.readableBytesView))
            var attributes: [String: ByteBuffer] = [:]
            for (name, base64) in document.attributes {
                guard let data = Data(base64Encoded: base64) else { throw SessionCodecError("bad base64") }
                attributes[name] = ByteBuffer(bytes: data)
            }
            return SessionRecord(
                metadata: SessionMetadata(
                    createdAt: document.created, lastAccessedAt: document.accessed, idleTimeoutSeconds: document.idle,
                    absoluteTimeoutSeconds: document.absolute, version: document.version),
                attributes: attributes)
        } catch let error as SessionCodecError {
            throw error
        } catch {
            throw SessionCodecError("not a JSON session document")
        }
    }

    func encodeValue<Value: Encodable>(_ value: Value) throws(SessionCodecError) -> ByteBuffer {
        try JSONValueCoding.encode(value)
    }

    func decodeValue<Value: Decodable>(_ type: Value.Type, from bytes: ByteBuffer) throws(SessionCodecError) -> Value {
        try JSONValueCoding.decode(type, from: bytes)
    }
}

// From the former ConcurrencyTests.swift.
/// Lets `count` tasks wait for each other.
actor Barrier {
    private let count: Int
    private var arrived = 0
    private var waiting: [CheckedContinuation<Void, Never>] = []

    init(count: Int) { self.count = count }

    func arriveAndWait() async {
        arrived += 1
        if arrived >= count {
            for continuation in waiting { continuation.resume() }
            waiting = []
            return
        }
        await withCheckedContinuation { waiting.append($0) }
    }
}

// From the former FailoverTests.swift.
/// What a load generator knows: each session's cookie and its last acknowledged count.
final class SessionBook: Sendable {
    struct Entry: Sendable {
        var browser: Browser
        var count: Int
        var readOnly: Bool
        /// Its last increment failed with "may not have been saved" (its write was in flight when
        /// the node died): the next read shows the count before it or after it.
        var uncertain = false
    }

    let entries: Mutex<[Entry]>

    init(_ entries: [Entry]) { self.entries = Mutex(entries) }

    subscript(index: Int) -> Entry {
        get { entries.withLock { $0[index] } }
    }

    func update(_ index: Int, _ entry: Entry) { entries.withLock { $0[index] = entry } }
    var count: Int { entries.withLock { $0.count } }
}

// From the former FailoverTests.swift.
/// Creates `count` sessions through `manager`, with `concurrency` parallel browsers.
func createSessions(_ manager: SessionManager, count: Int, readOnlyEvery: Int) async throws -> SessionBook {
    let book = SessionBook((0..<count).map { SessionBook.Entry(browser: Browser(), count: 0, readOnly: $0 % readOnlyEvery == 0) })
    try await runAll(book, concurrency: 50) { index, entry in
        var entry = entry
        entry.count = try await manager.increment(&entry.browser)
        return entry
    }
    return book
}

// From the former FailoverTests.swift.
/// Runs `step` over every entry with `concurrency` workers.
func runAll(
    _ book: SessionBook, concurrency: Int,
    _ step: @escaping @Sendable (Int, SessionBook.Entry) async throws -> SessionBook.Entry
) async throws {
    let next = LockedBox<Int>(0)
    try await withThrowingTaskGroup(of: Void.self) { group in
        for _ in 0..<concurrency {
            group.addTask {
                while true {
                    let index = next.withLock { value in
                        defer { value += 1 }
                        return value
                    }
                    guard index < book.count else { return }
                    book.update(index, try await step(index, book[index]))
                }
            }
        }
        try await group.waitForAll()
    }
}

// From the former FailoverTests.swift.
/// Every session reads back its last acknowledged count; modifiable sessions take one more
/// increment, acknowledged.
/// One round: every session read (its last acknowledged count) and, unless read-only,
/// incremented. `whileANodeDies`: an increment whose write was in flight when its node died
/// may fail with `unavailable` ("may not have been saved"): then the next read shows either
/// count, never another.
func verifyAndAdvance(_ manager: SessionManager, _ book: SessionBook, whileANodeDies: Bool = false) async throws {
    try await runAll(book, concurrency: 50) { index, entry in
        var entry = entry
        let read = try await manager.readCount(&entry.browser)
        if entry.uncertain {
            #expect(read == entry.count || read == entry.count + 1, "session \(index) read \(read) around \(entry.count)")
            entry.count = read
            entry.uncertain = false
        } else {
            #expect(read == entry.count, "session \(index) read \(read), last acknowledged \(entry.count)")
        }
        if !entry.readOnly {
            do {
                let next = try await manager.increment(&entry.browser)
                #expect(next == entry.count + 1, "session \(index) counted \(next) after \(entry.count)")
                entry.count = next
            } catch let error as SessionError where whileANodeDies && error.code == .unavailable {
                entry.uncertain = true
            }
        }
        return entry
    }
}

/// A session started on `manager` with one increment (count 1): the browser, its id and keys.
func startedSession(_ manager: SessionManager) async throws -> (Browser, MemcachedSessionID, SessionKeys) {
    var browser = Browser()
    try await manager.increment(&browser)
    let id = try #require(browser.id)
    return (browser, id, manager.keys(for: id.token))
}

/// The session at `keys` as it is on n1, living on `node` too (a primary a move left there, for
/// 60 s); with `someoneElsesLock`, another request holding its lock there. Returns the copy.
func livingElsewhere(
    _ keys: SessionKeys, on node: String, someoneElsesLock: Bool, _ inspector: MemcachedClient
) async throws -> MemcachedItem {
    let there = try inspector.node(node)
    let copy = try #require(try await inspector.node("n1").get(keys.primary))
    _ = try await there.set(keys.primary, value: copy.value, ttl: .seconds(60), flags: copy.flags)
    if someoneElsesLock {
        #expect(try await there.add(keys.lock, value: ByteBuffer(string: "someone-else"), ttl: .seconds(30)))
    }
    return copy
}

// From the former LockTrustTests.swift.
/// Runs a locked request that sets `count` to 100 while `meanwhile` runs with the request
/// holding its lock (loaded, not ended). Returns the request's error, if any.
func lockedRequest(
    _ manager: SessionManager, _ browser: Browser, setting value: Int = 100, meanwhile: () async throws -> Void
) async throws -> SessionError? {
    let holding = Barrier(count: 2)
    let finish = Barrier(count: 2)
    let request = Task {
        var mine = browser
        return await sessionError {
            try await manager.request(&mine) { access in
                let session = try #require(try await access.load())
                await holding.arriveAndWait()
                await finish.arriveAndWait()
                try session.set("count", value)
            }
        }
    }
    await holding.arriveAndWait()
    do {
        try await meanwhile()
    } catch {
        await finish.arriveAndWait()
        _ = await request.value
        throw error
    }
    await finish.arriveAndWait()
    return await request.value
}

// From the former LockTrustTests.swift.
/// Another instance's lock in place of ours (ours expired and was taken).
func stealLock(_ inspector: MemcachedClient, node: String, key: String) async throws {
    _ = try await inspector.node(node).delete(key)
    try await inspector.node(node).set(key, value: ByteBuffer(string: "someone-else"), ttl: .seconds(30))
}

// From the former LockTrustTests.swift.
/// n1 behind a fault proxy, n2 its backup (a failover node, so new sessions go to n1).
func withProxiedPair(
    _ body: (_ proxy: FaultProxy, _ config: SessionManager.Configuration, _ servers: [MemcachedServer]) async throws -> Void
) async throws {
    try await withMemcachedServers(count: 2) { servers in
        let proxy = try await FaultProxy.start(port: servers[0].port)
        defer { proxy.stop() }
        var config = try SessionManager.Configuration(nodes: "n1:\(proxy.hostAndPort),n2:\(servers[1].hostAndPort)")
        config.mode = .nonSticky
        config.failoverNodes = ["n2"]
        config.locking.mode = .all
        config.memcached.probeInterval = .milliseconds(100)
        config.memcached.requestTimeout = .seconds(5)
        // Up (a cut fails the lock and the read, and background polls may fail too).
        config.memcached.failureThreshold = 10
        try await body(proxy, config, servers)
    }
}

// From the former OperationsTests.swift.
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

// From the former RestartTrustTests.swift.
/// Every new session on n1 (n2 only takes over), so every backup on n2.
func configuration(n1: String, n2: String) throws -> SessionManager.Configuration {
    var config = try SessionManager.Configuration(nodes: "n1:\(n1),n2:\(n2)")
    config.mode = .nonSticky
    config.failoverNodes = ["n2"]
    config.memcached.probeInterval = .milliseconds(100)
    config.memcached.requestTimeout = .seconds(5)
    return config
}

// From the former StickyTrustTests.swift.
func sticky(_ servers: [MemcachedServer], route: String, asynchronous: Bool = false, delay: Duration = .milliseconds(100))
    throws -> SessionManager.Configuration
{
    try configuration(servers, mode: .sticky) {
        $0.route = route
        $0.sticky.asynchronousSaving = asynchronous
        $0.sticky.saveDelay = delay
    }
}

// From the former StickyTrustTests.swift.
/// Reaches the restarted node on every pooled connection (each old one fails once).
func reconnect(_ manager: SessionManager, _ nodeID: String) async throws {
    try await eventually("\(nodeID) answers on every connection") {
        guard let node = manager.topology.node(nodeID) else { return false }
        for _ in 0..<32 {
            guard (try? await node.execute(.get("probe"))) != nil else { return false }
        }
        return manager.topology.isReachable(nodeID)
    }
}

// From the former StickyTrustTests.swift.
func storedCount(_ inspector: MemcachedClient, _ nodeID: String, _ key: String) async throws -> Int? {
    guard let item = try await inspector.node(nodeID).get(key), item.flags != SessionManager.tombstoneFlags else { return nil }
    let record = try BinarySessionCodec().decodeSession(from: item.value)
    return record.attributes["count"].flatMap { Int(String(buffer: $0)) }
}

/// Two instances over one pair of real servers (``configuration(n1:n2:)``: sessions start on n1,
/// n2 holds their backups). Each instance reaches each node directly, or through a `FaultProxy`
/// of its own where `proxied` names the pair (instance 0 or 1, node 0 or 1); `configure` adjusts
/// each instance's configuration. The body gets the running managers, the proxies in the order
/// `proxied` names them, the servers and an inspector.
func withTwoInstances(
    proxied: [(instance: Int, node: Int)],
    configure: (_ instance: Int, _ configuration: inout SessionManager.Configuration) -> Void,
    _ body: (_ managers: [SessionManager], _ proxies: [FaultProxy], _ servers: [MemcachedServer], _ inspector: MemcachedClient) async throws -> Void
) async throws {
    try await withMemcachedServers(count: 2) { servers in
        var proxies: [FaultProxy] = []
        defer { for proxy in proxies { proxy.stop() } }
        for (_, node) in proxied { proxies.append(try await FaultProxy.start(port: servers[node].port)) }
        var configurations: [SessionManager.Configuration] = []
        for instance in 0..<2 {
            let address = { (node: Int) in
                proxied.firstIndex { $0 == (instance, node) }.map { proxies[$0].hostAndPort } ?? servers[node].hostAndPort
            }
            var configuration = try configuration(n1: address(0), n2: address(1))
            configure(instance, &configuration)
            configurations.append(configuration)
        }
        try await withManagers(configurations) { managers in
            try await withInspector(servers) { inspector in try await body(managers, proxies, servers, inspector) }
        }
    }
}

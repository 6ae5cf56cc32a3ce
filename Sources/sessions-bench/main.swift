// Benchmark of the session manager alone (no web framework) against real memcached.
//
//   sessions-bench --nodes n1:127.0.0.1:21211,n2:127.0.0.1:21212 [--requests 10000] [--duration 5] [--concurrency 64]
//   sessions-bench --sealing-cost [--requests 100000]
//
// For each mode (non-sticky, sticky with synchronous saves, sticky with asynchronous saves) it
// 1. runs `--requests` requests of each kind one after another (new session, read-only,
//    modifying) and divides memcached's own counter deltas (cmd_get, cmd_touch, cmd_set, deletes,
//    summed over the nodes) by the number of requests, next to the round trips the requests
//    waited for (the manager's `memcached_round_trips` counter);
// 2. runs `--concurrency` concurrent request loops for `--duration` seconds per kind and reports
//    requests per second (sessions loaded and saved per second).
// Prints a Markdown table; scripts/bench-sessions pins memcached and this process to CPUs and
// writes the table to docs/benchmarks/session-manager.md.
import Crypto
import Foundation
import Memcached
import MemcachedSessions
import NIOCore

struct Options {
    var nodes = ""
    var requests = 10_000
    var duration = 5.0
    var concurrency = 64
    var sealingCost = false

    init(_ arguments: [String]) {
        var iterator = arguments.dropFirst().makeIterator()
        while let flag = iterator.next() {
            if flag == "--sealing-cost" {
                sealingCost = true
                continue
            }
            let value = iterator.next() ?? ""
            switch flag {
            case "--nodes": nodes = value
            case "--requests": requests = Int(value) ?? requests
            case "--duration": duration = Double(value) ?? duration
            case "--concurrency": concurrency = Int(value) ?? concurrency
            default:
                FileHandle.standardError.write(Data("unknown option \(flag)\n".utf8))
                exit(2)
            }
        }
        if nodes.isEmpty, !sealingCost {
            FileHandle.standardError.write(Data("--nodes n1:host:port,... is required\n".utf8))
            exit(2)
        }
    }
}

let options = Options(CommandLine.arguments)
let profile = String(repeating: "p", count: 1024)

/// The CPU cost of sealing, per session of the workload's size (a count and a 1 KiB profile):
/// encode, encode + seal, decode, open + decode, each timed over `--requests` iterations.
func sealingCost() throws {
    let codec = BinarySessionCodec()
    let record = SessionRecord(
        metadata: SessionMetadata(createdAt: 1, lastAccessedAt: 2, idleTimeoutSeconds: 1800, absoluteTimeoutSeconds: 0, version: 7),
        attributes: ["count": ByteBuffer(string: "42"), "profile": ByteBuffer(string: "\"\(profile)\"")])
    let sealer = SessionSealer(ring: try SessionKeyRing(current: .generate()))
    let key = SessionKeys(token: MemcachedSessionID.generate(nodeID: "n1", route: nil).token, prefix: "msm:").primary
    let allocator = ByteBufferAllocator()
    var plain = ByteBuffer()
    try codec.encodeSession(record, into: &plain)
    let sealed = try sealer.seal(plain, forKey: key, allocator: allocator)
    let n = options.requests
    func time(_ body: () throws -> Void) rethrows -> Double {
        for _ in 0..<min(n, 1000) { try body() }  // warm-up
        let start = ContinuousClock.now
        for _ in 0..<n { try body() }
        let elapsed = ContinuousClock.now - start
        return Double(elapsed.components.seconds) * 1e9 / Double(n) + Double(elapsed.components.attoseconds) / 1e9 / Double(n)
    }
    var sink = 0
    let encode = try time {
        var buffer = allocator.buffer(capacity: 1200)
        try codec.encodeSession(record, into: &buffer)
        sink &+= buffer.readableBytes
    }
    let encodeSeal = try time {
        var buffer = allocator.buffer(capacity: 1200)
        try codec.encodeSession(record, into: &buffer)
        sink &+= try sealer.seal(buffer, forKey: key, allocator: allocator).readableBytes
    }
    let decode = try time { sink &+= try codec.decodeSession(from: plain).attributes.count }
    let openDecode = try time {
        sink &+= try codec.decodeSession(from: try sealer.open(sealed, forKey: key).plaintext).attributes.count
    }
    if ProcessInfo.processInfo.environment["SEALING_PARTS"] != nil {
        let ringKey = SymmetricKey(size: .bits256)
        let salt = [UInt8](repeating: 7, count: 16)
        let info = Array("msm session seal v1".utf8)
        let body = Array(plain.readableBytesView)
        let random = time {
            var generator = SystemRandomNumberGenerator()
            var bytes = [UInt8](repeating: 0, count: 16)
            for index in bytes.indices { bytes[index] = UInt8.random(in: 0...255, using: &generator) }
            sink &+= Int(bytes[0])
        }
        let hkdf = time {
            let derived = HKDF<SHA256>.deriveKey(inputKeyMaterial: ringKey, salt: salt, info: info, outputByteCount: 32)
            sink &+= derived.bitCount
        }
        let gcm = try time { sink &+= try AES.GCM.seal(body, using: ringKey, nonce: AES.GCM.Nonce()).ciphertext.count }
        let nonce = time { sink &+= AES.GCM.Nonce().withUnsafeBytes { Int($0[0]) } }
        let twoWords = time {
            var generator = SystemRandomNumberGenerator()
            sink &+= Int(truncatingIfNeeded: generator.next() ^ generator.next())
        }
        let hmac = time { sink &+= HMAC<SHA256>.authenticationCode(for: salt, using: ringKey).byteCount }
        print("parts: nonce \(Int(nonce)) ns, 2 random words \(Int(twoWords)) ns, one HMAC \(Int(hmac)) ns")
        print("parts: 16 random bytes \(Int(random)) ns, HKDF \(Int(hkdf)) ns, AES-GCM seal \(Int(gcm)) ns")
    }
    print("| step (session of \(plain.readableBytes) bytes, sealed \(sealed.readableBytes)) | ns per session | added by sealing |")
    print("| --- | ---: | ---: |")
    print("| encode | \(Int(encode)) | - |")
    print("| encode + seal | \(Int(encodeSeal)) | \(Int(encodeSeal - encode)) |")
    print("| decode | \(Int(decode)) | - |")
    print("| open + decode | \(Int(openDecode)) | \(Int(openDecode - decode)) |")
    if sink == 42 { print("") }
}

if options.sealingCost {
    try sealingCost()
    exit(0)
}

/// One request the way an adapter runs it.
func request(_ manager: SessionManager, cookie: String?, _ handler: (SessionAccess) async throws -> Void) async throws -> String? {
    let access = manager.beginRequest(path: "/bench", sessionCookie: cookie)
    try await handler(access)
    switch try await manager.endRequest(access).cookie {
    case .unchanged: return cookie
    case .set(let id): return id.description
    case .clear: return nil
    }
}

func newSession(_ manager: SessionManager) async throws -> String? {
    try await request(manager, cookie: nil) { access in
        let session = try access.create()
        try session.set("count", 1)
        try session.set("profile", profile)
    }
}

func readOnly(_ manager: SessionManager, _ cookie: String?) async throws -> String? {
    try await request(manager, cookie: cookie) { access in
        _ = try await access.load()?["count", as: Int.self]
    }
}

func modify(_ manager: SessionManager, _ cookie: String?) async throws -> String? {
    try await request(manager, cookie: cookie) { access in
        let session = try await access.loadOrCreate()
        try session.set("count", (session["count", as: Int.self] ?? 0) + 1)
    }
}

struct Counts {
    var gets = 0, touches = 0, sets = 0, deletes = 0
    static func - (a: Counts, b: Counts) -> Counts {
        Counts(gets: a.gets - b.gets, touches: a.touches - b.touches, sets: a.sets - b.sets, deletes: a.deletes - b.deletes)
    }
}

func counts(_ client: MemcachedClient) async throws -> Counts {
    var total = Counts()
    for node in client.allNodes {
        let stats = try await node.stats()
        func value(_ name: String) -> Int { Int(stats.first { $0.name == name }?.value ?? "0") ?? 0 }
        total.gets += value("cmd_get")
        total.touches += value("cmd_touch")
        total.sets += value("cmd_set")
        total.deletes += value("delete_hits") + value("delete_misses")
    }
    return total
}

struct Row {
    var mode: String
    var kind: String
    var getsPerRequest: Double
    var touchesPerRequest: Double
    var setsPerRequest: Double
    var deletesPerRequest: Double
    var waitedPerRequest: Double
    var requestsPerSecond: Double
}

func waitForWrites(_ manager: SessionManager) async throws {
    while manager.pendingAsynchronousWrites > 0 { try await Task.sleep(for: .milliseconds(5)) }
    try await Task.sleep(for: .milliseconds(50))  // the last batch in flight
}

func run(mode: String, configure: (inout SessionManager.Configuration) -> Void) async throws -> [Row] {
    var configuration = try SessionManager.Configuration(nodes: options.nodes)
    let slug = String(mode.unicodeScalars.filter { CharacterSet.alphanumerics.contains($0) }.map(Character.init))
    configuration.keyPrefix = "bench-\(slug)-\(UInt32.random(in: 0...UInt32.max)):"
    configuration.route = "b1"
    configure(&configuration)
    let manager = try SessionManager(configuration: configuration)
    let inspector = try MemcachedClient(configuration: configuration.memcached)
    return try await withThrowingTaskGroup(of: Void.self) { group in
        group.addTask { try await manager.run() }
        group.addTask { try await inspector.run() }
        defer { group.cancelAll() }
        var rows: [Row] = []
        var cookies: [String?] = []
        cookies.reserveCapacity(options.requests)

        func measure(_ kind: String, _ body: (Int) async throws -> Void) async throws {
            let before = try await counts(inspector)
            let waitedBefore = manager.statistics.value(of: .memcachedRoundTrips)
            for index in 0..<options.requests { try await body(index) }
            try await waitForWrites(manager)
            let delta = try await counts(inspector) - before
            let waited = manager.statistics.value(of: .memcachedRoundTrips) - waitedBefore
            let n = Double(options.requests)
            rows.append(
                Row(
                    mode: mode, kind: kind, getsPerRequest: Double(delta.gets) / n, touchesPerRequest: Double(delta.touches) / n,
                    setsPerRequest: Double(delta.sets) / n, deletesPerRequest: Double(delta.deletes) / n,
                    waitedPerRequest: Double(waited) / n, requestsPerSecond: 0))
        }

        try await measure("new session") { _ in cookies.append(try await newSession(manager)) }
        try await measure("read-only") { index in _ = try await readOnly(manager, cookies[index]) }
        try await measure("modifying") { index in cookies[index] = try await modify(manager, cookies[index]) }

        // Throughput: concurrent loops, each over its own slice of sessions.
        let shared = cookies
        for (index, kind) in ["read-only", "modifying"].enumerated() {
            let deadline = ContinuousClock.now + .seconds(options.duration)
            let total = try await withThrowingTaskGroup(of: Int.self) { loops in
                for loop in 0..<options.concurrency {
                    loops.addTask {
                        var done = 0
                        var slot = loop
                        var mine = shared
                        while ContinuousClock.now < deadline {
                            if kind == "read-only" {
                                _ = try await readOnly(manager, mine[slot])
                            } else {
                                mine[slot] = try await modify(manager, mine[slot])
                            }
                            done += 1
                            slot += options.concurrency
                            if slot >= mine.count { slot = loop }
                        }
                        return done
                    }
                }
                var total = 0
                for try await done in loops { total += done }
                return total
            }
            rows[rows.count - 2 + index].requestsPerSecond = Double(total) / options.duration
            try await waitForWrites(manager)
        }
        return rows
    }
}

var rows: [Row] = []
rows += try await run(mode: "non-sticky") { $0.mode = .nonSticky }
let benchKeys = try SessionKeyRing(current: .generate())
let benchSecret = try StorageKeySecret(SymmetricKey(size: .bits256))
rows += try await run(mode: "non-sticky, sealed") {
    $0.mode = .nonSticky
    $0.sealing.keys = benchKeys
    $0.sealing.storageKeySecret = benchSecret
}
rows += try await run(mode: "sticky, synchronous saves") {
    $0.mode = .sticky
    $0.sticky.asynchronousSaving = false
}
rows += try await run(mode: "sticky, asynchronous saves") {
    $0.mode = .sticky
    $0.sticky.asynchronousSaving = true
}

func f(_ value: Double) -> String { String(format: "%.2f", value) }
print(
    "| mode | request | waited round trips | mg (get) | mg with TTL (touch) | ms (set) | md (delete) | requests/s (\(options.concurrency) concurrent) |"
)
print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |")
for row in rows {
    let rate = row.requestsPerSecond > 0 ? String(format: "%.0f", row.requestsPerSecond) : "-"
    print(
        "| \(row.mode) | \(row.kind) | \(f(row.waitedPerRequest)) | \(f(row.getsPerRequest)) | \(f(row.touchesPerRequest)) | \(f(row.setsPerRequest)) | \(f(row.deletesPerRequest)) | \(rate) |"
    )
}

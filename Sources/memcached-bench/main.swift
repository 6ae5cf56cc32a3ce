// Throughput benchmark of the Memcached client through its public API, against a running memcached.
//
//   memcached-bench --server 127.0.0.1:11211 --op get --concurrency 256 --duration 10
//
// Prints one line `RESULT op=get concurrency=256 ops=... seconds=... ops_per_s=... misses=0 errors=0`.
// `--executor loop` runs each request task with a task executor preference for an event loop
// (`EventLoopExecutor`, as the session layer runs request handlers), so a request and its
// connection share a thread and a reply resumes its task without a hop; `eventloop` installs NIO's
// event loops as Swift's global executor instead (their jobs then run as the loop's serial executor,
// and every call into a nonisolated async function switches executors: about five extra
// enqueues a request); `global` (the default) uses Swift's cooperative pool, as an application
// that configures nothing does. `--event-loops N` sizes NIO's singleton group (default: NIO's, one
// per core, which ignores `taskset`). `--batch B` sends the requests in flight as batches of B
// through the public pipelining API (`client.executeBatch`): concurrency/B tasks, each a closed loop
// of batches, the shape of the C reference client (one batch of in-flight/connections commands per
// connection). scripts/bench-client runs the full matrix against the pipelined C reference client
// (scripts/bench/refclient.c) and memaslap in one run.
import Memcached
import NIOCore
import NIOPosix
import NIOSSL

#if canImport(Glibc)
    import Glibc
#endif

struct Options {
    var server = "127.0.0.1:11211"
    var op = "get"
    var concurrency = 16
    var duration = 10.0
    var keys = 10_000
    var keySize = 48
    var valueSize = 1_100
    var connections = 2
    var executor = "global"
    var eventLoops: Int? = nil
    var mode = MemcachedProtocolMode.meta
    var populate = true
    /// Requests per `executeBatch` call (1: one `get`/`set` call per request).
    var batch = 1
    /// TLS to the server, trusting this CA file (memcached -Z).
    var tlsCAFile: String? = nil

    init(_ arguments: [String]) {
        var iterator = arguments.dropFirst().makeIterator()
        while let flag = iterator.next() {
            let value = iterator.next() ?? ""
            switch flag {
            case "--server": server = value
            case "--op": op = value
            case "--concurrency": concurrency = Int(value) ?? concurrency
            case "--duration": duration = Double(value) ?? duration
            case "--keys": keys = Int(value) ?? keys
            case "--key-size": keySize = Int(value) ?? keySize
            case "--value-size": valueSize = Int(value) ?? valueSize
            case "--connections": connections = Int(value) ?? connections
            case "--executor": executor = value
            case "--event-loops": eventLoops = Int(value).flatMap { $0 > 0 ? $0 : nil } ?? eventLoops
            case "--mode": mode = MemcachedProtocolMode(rawValue: value) ?? mode
            case "--populate": populate = value != "no"
            case "--tls-ca-file": tlsCAFile = value
            case "--batch": batch = Int(value).flatMap { $0 > 0 ? $0 : nil } ?? batch
            default:
                print("unknown option \(flag)")
                exit(2)
            }
        }
    }
}

let options = Options(CommandLine.arguments)
guard options.concurrency % options.batch == 0 else {
    print("--concurrency \(options.concurrency) is not a multiple of --batch \(options.batch)")
    exit(2)
}
guard ["global", "eventloop", "loop"].contains(options.executor) else {
    print("unknown executor \(options.executor) (global, eventloop or loop)")
    exit(2)
}
if let loops = options.eventLoops {
    NIOSingletons.groupLoopCountSuggestion = loops
}
if options.executor == "eventloop" {
    guard NIOSingletons.unsafeTryInstallSingletonPosixEventLoopGroupAsConcurrencyGlobalExecutor() else {
        print("could not install the event loop as global executor")
        exit(1)
    }
}

func key(_ index: Int) -> String {
    let prefix = "bench:"
    let digits = String(index)
    return prefix + String(repeating: "0", count: max(0, options.keySize - prefix.count - digits.count)) + digits
}

var configuration = try MemcachedClient.Configuration(nodes: "b1:\(options.server)")
configuration.connectionsPerNode = options.connections
configuration.protocolMode = options.mode
configuration.requestTimeout = .seconds(5)
if let caFile = options.tlsCAFile {
    var tls = TLSConfiguration.makeClientConfiguration()
    tls.trustRoots = .file(caFile)
    configuration.tls = try .enable(tls, serverName: nil)
}
let client = try MemcachedClient(configuration: configuration)
let keys = (0..<options.keys).map(key)
let value = ByteBuffer(repeating: UInt8(ascii: "v"), count: options.valueSize)

if options.populate {
    for chunk in stride(from: 0, to: keys.count, by: 500) {
        let batch = keys[chunk..<min(chunk + 500, keys.count)].map { MemcachedRequest.store($0, value: value) }
        for result in await client.executeBatch(batch) { _ = try result.get() }
    }
}

let deadline = ContinuousClock.now + .milliseconds(Int(options.duration * 1000))
let start = ContinuousClock.now
// `--executor loop`: each worker task prefers an event loop's executor, round robin over the group.
let loopExecutors = MultiThreadedEventLoopGroup.singleton.makeIterator().map { EventLoopExecutor.for($0) }
let totals = try await withThrowingTaskGroup(of: (ops: Int, misses: Int, errors: Int).self) { group in
    for worker in 0..<options.concurrency / options.batch {
        let preferred: (any TaskExecutor)? = options.executor == "loop" ? loopExecutors[worker % loopExecutors.count] : nil
        group.addTask(executorPreference: preferred) {
            var ops = 0
            var misses = 0
            var errors = 0
            var index = (worker * 7919) % keys.count
            if options.batch > 1 {
                var requests: [MemcachedRequest] = []
                requests.reserveCapacity(options.batch)
                while ContinuousClock.now < deadline {
                    requests.removeAll(keepingCapacity: true)
                    for _ in 0..<options.batch {
                        requests.append(options.op == "get" ? .get(keys[index]) : .store(keys[index], value: value))
                        index += 1
                        if index == keys.count { index = 0 }
                    }
                    for result in await client.executeBatch(requests) {
                        switch result {
                        case .success(.item(nil)): misses += 1
                        case .success: break
                        case .failure: errors += 1
                        }
                    }
                    ops += options.batch
                }
                return (ops, misses, errors)
            }
            while true {
                // Check the clock every 64 operations: reading it per request would be measured too.
                if ops & 63 == 0, ContinuousClock.now >= deadline { break }
                do {
                    if options.op == "get" {
                        if try await client.get(keys[index]) == nil { misses += 1 }
                    } else {
                        try await client.set(keys[index], value: value)
                    }
                } catch {
                    errors += 1
                }
                ops += 1
                index += 1
                if index == keys.count { index = 0 }
            }
            return (ops, misses, errors)
        }
    }
    var total = (ops: 0, misses: 0, errors: 0)
    for try await part in group {
        total.ops += part.ops
        total.misses += part.misses
        total.errors += part.errors
    }
    return total
}
let elapsed = ContinuousClock.now - start
let seconds = Double(elapsed.components.seconds) + Double(elapsed.components.attoseconds) / 1e18
print(
    "RESULT op=\(options.op) concurrency=\(options.concurrency) executor=\(options.executor) "
        + "event_loops=\(NIOSingletons.groupLoopCountSuggestion) mode=\(options.mode) "
        + "connections=\(options.connections) batch=\(options.batch) ops=\(totals.ops) seconds=\((seconds * 1000).rounded() / 1000) "
        + "ops_per_s=\(Int(Double(totals.ops) / seconds)) misses=\(totals.misses) errors=\(totals.errors)")

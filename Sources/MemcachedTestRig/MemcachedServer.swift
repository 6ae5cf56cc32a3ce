import Foundation
import NIOConcurrencyHelpers

/// A real `memcached` process on a free loopback port, for tests and benchmarks.
///
/// Started with `-U 0` (no UDP) on 127.0.0.1 only. ``kill()`` sends SIGKILL (a crash, as a failover
/// test wants), ``restart()`` starts it again on the same port, ``stop()`` ends it. Every process is
/// ended by PID, and its PID is also written to `$MEMCACHED_RIG_PIDFILE` (when set) so that a test
/// runner can clean up after a crashed test process.
public final class MemcachedServer: Sendable {
    public let port: Int
    public let memoryMegabytes: Int
    public let itemSizeLimit: Int
    public let extraArguments: [String]
    private let process = NIOLockedValueBox<Process?>(nil)

    /// The binary: `$MEMCACHED_BIN`, else `memcached` from the usual places.
    public static var binary: String? {
        if let path = ProcessInfo.processInfo.environment["MEMCACHED_BIN"] { return path }
        for path in ["/usr/bin/memcached", "/usr/local/bin/memcached", "/usr/sbin/memcached", "/opt/homebrew/bin/memcached"]
        where FileManager.default.isExecutableFile(atPath: path) {
            return path
        }
        return nil
    }

    /// Starts memcached on a free port and waits until it accepts connections.
    public init(
        memoryMegabytes: Int = 64, itemSizeLimit: Int = 1024 * 1024, extraArguments: [String] = [],
        startTimeout: Duration = .seconds(10)
    ) async throws {
        self.memoryMegabytes = memoryMegabytes
        self.itemSizeLimit = itemSizeLimit
        self.extraArguments = extraArguments
        var lastError: (any Error)?
        for _ in 0..<5 {
            let candidate = try FreePort.find()
            do {
                let task = try await Self.launch(
                    port: candidate, memoryMegabytes: memoryMegabytes, itemSizeLimit: itemSizeLimit,
                    extraArguments: extraArguments, timeout: startTimeout)
                self.port = candidate
                self.process.withLockedValue { $0 = task }
                return
            } catch {
                lastError = error
            }
        }
        throw lastError ?? RigError("could not start memcached")
    }

    /// `host:port` of the server.
    public var hostAndPort: String { "127.0.0.1:\(port)" }

    /// The PID of the running process, if any.
    public var pid: Int32? {
        process.withLockedValue { $0.flatMap { $0.isRunning ? $0.processIdentifier : nil } }
    }

    /// Freezes the process (`SIGSTOP`) and waits until every one of its threads has stopped: `kill`
    /// returns before a thread running on another core is stopped, and a request sent in that
    /// moment would still be answered (seen once in ten runs under load).
    public func freeze(timeout: Duration = .seconds(5)) async throws {
        guard let pid else { throw RigError("memcached is not running") }
        Foundation.kill(pid, SIGSTOP)
        let deadline = ContinuousClock.now + timeout
        while !Self.isStopped(pid) {
            guard ContinuousClock.now < deadline else { throw RigError("memcached \(pid) did not stop within \(timeout)") }
            try await Task.sleep(for: .milliseconds(1))
        }
    }

    /// Thaws a frozen process (`SIGCONT`).
    public func thaw() {
        // Not `pid`, which asks whether the process runs: a stopped one must be reached too.
        if let pid = process.withLockedValue({ $0?.processIdentifier }) { Foundation.kill(pid, SIGCONT) }
    }

    /// Whether every thread of `pid` is stopped (state `T` in `/proc/PID/task/TID/stat`).
    static func isStopped(_ pid: Int32) -> Bool {
        guard let threads = try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task"), !threads.isEmpty else {
            return false
        }
        for thread in threads {
            guard let stat = try? String(contentsOfFile: "/proc/\(pid)/task/\(thread)/stat", encoding: .utf8),
                let close = stat.lastIndex(of: ")")
            else { return false }
            // `pid (comm) S ...`: the state follows the command's closing parenthesis.
            let state = stat[stat.index(after: close)...].drop { $0 == " " }.first
            if state != "T" && state != "t" { return false }
        }
        return true
    }

    /// Kills the process with SIGKILL and waits until it is gone.
    public func kill() async throws {
        try await signalAndWait(SIGKILL)
    }

    /// Stops the process with SIGTERM (SIGKILL after 5 s) and waits until it is gone.
    public func stop() async throws {
        try await signalAndWait(SIGTERM)
    }

    /// Starts the server again on the same port, empty: after ``kill()`` or ``stop()``, or killing
    /// the running process first (a second one would find the port taken, and the first would be
    /// left running).
    public func restart(timeout: Duration = .seconds(10)) async throws {
        try await kill()
        let task = try await Self.launch(
            port: port, memoryMegabytes: memoryMegabytes, itemSizeLimit: itemSizeLimit, extraArguments: extraArguments,
            timeout: timeout)
        process.withLockedValue { $0 = task }
    }

    /// Stops the process synchronously; used at the end of a test when nothing else did it.
    public func terminate() {
        let running = process.withLockedValue { process -> Process? in
            defer { process = nil }
            return process
        }
        guard let running, running.isRunning else { return }
        Foundation.kill(running.processIdentifier, SIGKILL)
        running.waitUntilExit()
        PIDFile.remove(running.processIdentifier)
    }

    deinit {
        terminate()
    }

    private static func launch(
        port: Int, memoryMegabytes: Int, itemSizeLimit: Int, extraArguments: [String], timeout: Duration
    ) async throws -> Process {
        guard let binary = binary else {
            throw RigError("memcached is not installed (apt-get install memcached), or set MEMCACHED_BIN")
        }
        let task = Process()
        task.executableURL = URL(fileURLWithPath: binary)
        var arguments = [
            "-l", "127.0.0.1", "-p", "\(port)", "-U", "0", "-m", "\(memoryMegabytes)", "-t", "2", "-c", "1024",
            "-I", "\(itemSizeLimit)",
        ]
        if getuid() == 0 { arguments += ["-u", "nobody"] }
        task.arguments = arguments + extraArguments
        task.standardOutput = FileHandle.nullDevice
        task.standardError = FileHandle.nullDevice
        try task.run()
        PIDFile.add(task.processIdentifier)
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if !task.isRunning {
                PIDFile.remove(task.processIdentifier)
                throw RigError("memcached exited at start (status \(task.terminationStatus)); port \(port) may be taken")
            }
            if FreePort.accepts(port: port) { return task }
            try await Task.sleep(for: .milliseconds(20))
        }
        Foundation.kill(task.processIdentifier, SIGKILL)
        task.waitUntilExit()
        PIDFile.remove(task.processIdentifier)
        throw RigError("memcached did not accept connections on port \(port) within \(timeout)")
    }

    private func signalAndWait(_ signal: Int32) async throws {
        guard let running = process.withLockedValue({ $0 }), running.isRunning else { return }
        Foundation.kill(running.processIdentifier, signal)
        let deadline = ContinuousClock.now + .seconds(5)
        while running.isRunning {
            if ContinuousClock.now > deadline {
                Foundation.kill(running.processIdentifier, SIGKILL)
            }
            try await Task.sleep(for: .milliseconds(10))
        }
        // The port must be free before a restart binds it again.
        let closed = ContinuousClock.now + .seconds(5)
        while FreePort.accepts(port: port), ContinuousClock.now < closed {
            try await Task.sleep(for: .milliseconds(10))
        }
        PIDFile.remove(running.processIdentifier)
    }
}

/// Starts several memcached servers and stops them all when the body returns or throws.
public func withMemcachedServers<Result>(
    count: Int, memoryMegabytes: Int = 64, itemSizeLimit: Int = 1024 * 1024,
    _ body: ([MemcachedServer]) async throws -> Result
) async throws -> Result {
    var servers: [MemcachedServer] = []
    defer { for server in servers { server.terminate() } }
    for _ in 0..<count {
        servers.append(try await MemcachedServer(memoryMegabytes: memoryMegabytes, itemSizeLimit: itemSizeLimit))
    }
    return try await body(servers)
}

public struct RigError: Error, CustomStringConvertible {
    public let description: String
    public init(_ description: String) { self.description = description }
}

enum PIDFile {
    private static let lock = NIOLock()
    private static var path: String? { ProcessInfo.processInfo.environment["MEMCACHED_RIG_PIDFILE"] }

    static func add(_ pid: Int32) {
        guard let path else { return }
        lock.withLock {
            if let handle = FileHandle(forWritingAtPath: path)
                ?? {
                    _ = FileManager.default.createFile(atPath: path, contents: nil)
                    return FileHandle(forWritingAtPath: path)
                }()
            {
                handle.seekToEndOfFile()
                handle.write(Data("\(pid)\n".utf8))
                try? handle.close()
            }
        }
    }

    static func remove(_ pid: Int32) {
        guard let path else { return }
        lock.withLock {
            guard let text = try? String(contentsOfFile: path, encoding: .utf8) else { return }
            let kept = text.split(separator: "\n").filter { $0 != "\(pid)" }.map { $0 + "\n" }.joined()
            try? kept.write(toFile: path, atomically: true, encoding: .utf8)
        }
    }
}

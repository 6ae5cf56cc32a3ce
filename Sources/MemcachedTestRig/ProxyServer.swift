import Foundation
import NIOConcurrencyHelpers

/// A real memcached-protocol proxy in front of memcached servers, for tests of text mode: twemproxy
/// (Debian's `nutcracker`), which speaks the classic text protocol only (no meta commands), has no
/// `gat`/`gats` and no `stats` (it answers both by closing the connection), and spreads keys over
/// its servers by ketama itself. On a free loopback port, ended by PID (also recorded in
/// `$MEMCACHED_RIG_PIDFILE`).
public final class ProxyServer: Sendable {
    public let port: Int
    private let process: NIOLockedValueBox<Process?>
    private let directory: URL

    /// The binary: `$NUTCRACKER_BIN`, else `nutcracker` from the usual places.
    public static var binary: String? {
        if let path = ProcessInfo.processInfo.environment["NUTCRACKER_BIN"] { return path }
        for path in ["/usr/sbin/nutcracker", "/usr/bin/nutcracker", "/usr/local/bin/nutcracker", "/usr/local/sbin/nutcracker"]
        where FileManager.default.isExecutableFile(atPath: path) {
            return path
        }
        return nil
    }

    /// Starts the proxy in front of `servers` and waits until it accepts connections.
    public init(servers: [MemcachedServer], timeout: Duration = .seconds(10)) async throws {
        guard let binary = Self.binary else {
            throw RigError("nutcracker (twemproxy) is not installed (apt-get install nutcracker), or set NUTCRACKER_BIN")
        }
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("msm-proxy-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        self.directory = directory
        var lastError: (any Error)?
        for _ in 0..<5 {
            let port = try FreePort.find()
            // A server that fails is not ejected (auto_eject_hosts false): its keys fail, as a
            // node of our own would, instead of silently moving to another server.
            let configuration = """
                pool:
                  listen: 127.0.0.1:\(port)
                  hash: fnv1a_64
                  distribution: ketama
                  timeout: 1000
                  preconnect: false
                  auto_eject_hosts: false
                  servers:
                \(servers.map { "   - 127.0.0.1:\($0.port):1" }.joined(separator: "\n"))

                """
            let path = directory.appendingPathComponent("nutcracker-\(port).yml")
            try configuration.write(to: path, atomically: true, encoding: .utf8)
            let task = Process()
            task.executableURL = URL(fileURLWithPath: binary)
            // Its own stats listener on a free loopback port too (22222 by default: two proxies at
            // once would clash).
            task.arguments = [
                "-c", path.path, "-a", "127.0.0.1", "-s", "\(try FreePort.find())", "-o", directory.appendingPathComponent("nutcracker.log").path,
            ]
            task.standardOutput = FileHandle.nullDevice
            task.standardError = FileHandle.nullDevice
            try task.run()
            PIDFile.add(task.processIdentifier)
            let deadline = ContinuousClock.now + timeout
            while ContinuousClock.now < deadline, task.isRunning, !FreePort.accepts(port: port) {
                try await Task.sleep(for: .milliseconds(20))
            }
            if task.isRunning, FreePort.accepts(port: port) {
                self.port = port
                self.process = NIOLockedValueBox(task)
                return
            }
            if task.isRunning { Foundation.kill(task.processIdentifier, SIGKILL) }
            task.waitUntilExit()
            PIDFile.remove(task.processIdentifier)
            lastError = RigError("nutcracker did not accept connections on port \(port)")
        }
        throw lastError ?? RigError("could not start nutcracker")
    }

    /// `host:port` of the proxy.
    public var hostAndPort: String { "127.0.0.1:\(port)" }

    /// Ends the proxy.
    public func terminate() {
        let running = process.withLockedValue { process -> Process? in
            defer { process = nil }
            return process
        }
        if let running, running.isRunning {
            Foundation.kill(running.processIdentifier, SIGKILL)
            running.waitUntilExit()
            PIDFile.remove(running.processIdentifier)
        }
        try? FileManager.default.removeItem(at: directory)
    }

    deinit {
        terminate()
    }
}

/// Starts `count` memcached servers and a proxy in front of them; stops them all when the body
/// returns or throws.
public func withProxiedMemcachedServers<Result>(
    count: Int, _ body: (ProxyServer, [MemcachedServer]) async throws -> Result
) async throws -> Result {
    try await withMemcachedServers(count: count) { servers in
        let proxy = try await ProxyServer(servers: servers)
        defer { proxy.terminate() }
        return try await body(proxy, servers)
    }
}

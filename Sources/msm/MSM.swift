#if Tools
import ArgumentParser
import Foundation
import Logging
import MSMApp
import MemcachedSessions
import NIOCore
import NIOPosix

@main
enum Entry {
    /// Where `msm serve` runs Swift concurrency's jobs. With Vapor, or with one event loop: on
    /// NIO's loops (NIO installed as the global executor), so that a request's task, its HTTP
    /// channel and its memcached connection share a thread and nothing hops. Hummingbird with
    /// several loops: on Swift's own pool, the session middleware moving each handler to its
    /// channel's loop (a task executor preference), because with NIO installed globally every
    /// Hummingbird connection task would run on the loop that accepted it, crossing loops on every
    /// read and write (measured: a p99 several times worse). Override with
    /// `MSM_GLOBAL_EXECUTOR=nio|swift`. This must happen before any async work, hence a
    /// synchronous entry point.
    static func main() {
        let arguments = CommandLine.arguments.dropFirst()
        if arguments.first == "serve" {
            var loops = ProcessInfo.processInfo.environment["NIO_SINGLETON_GROUP_LOOP_COUNT"].flatMap { Int($0) } ?? System.coreCount
            if let index = arguments.firstIndex(of: "--event-loops"), index + 1 < arguments.endIndex,
                let count = Int(arguments[index + 1]), count > 0
            {
                NIOSingletons.groupLoopCountSuggestion = count
                loops = count
            }
            // Vapor creates each request's task from its channel's loop, so there the tasks stay
            // with their channels at any loop count (measured: 5.3k against 3.7k req/s).
            // Both spellings argument-parser accepts: `--framework vapor` and `--framework=vapor`.
            let vapor =
                arguments.contains("--framework=vapor")
                || (arguments.firstIndex(of: "--framework").map { $0 + 1 < arguments.endIndex && arguments[$0 + 1] == "vapor" } ?? false)
            let choice = ProcessInfo.processInfo.environment["MSM_GLOBAL_EXECUTOR"]
            if choice == "nio" || (choice == nil && (loops == 1 || vapor)) {
                _ = NIOSingletons.unsafeTryInstallSingletonPosixEventLoopGroupAsConcurrencyGlobalExecutor()
            }
        }
        // The command may need the main actor: serve the main queue rather than block this thread.
        Task {
            exit(await run())
        }
        dispatchMain()
    }

    /// Runs the command; exit codes: 0 all well, 1 bad input or usage, 2 some node unreachable,
    /// 3 session not found (ArgumentParser's own usage errors, 64, become 1).
    static func run() async -> Int32 {
        do {
            var command = try MSM.parseAsRoot()
            if var asyncCommand = command as? any AsyncParsableCommand {
                try await asyncCommand.run()
            } else {
                try command.run()
            }
            return 0
        } catch {
            let code = MSM.exitCode(for: error)
            let message = MSM.fullMessage(for: error)
            if code == .success {
                if !message.isEmpty { print(message) }
                return 0
            }
            if !message.isEmpty { FileHandle.standardError.write(Data((message + "\n").utf8)) }
            return code == .validationFailure ? 1 : code.rawValue
        }
    }
}

struct MSM: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "msm",
        abstract: "Highly available HTTP sessions in memcached: demo cluster, app server, and tools for memcached clusters.",
        subcommands: [Demo.self, Serve.self, Stats.self, Nodes.self, SessionCommand.self, Config.self]
    )
}

extension SessionManager.LockingMode: ExpressibleByArgument {
    public init?(argument: String) {
        try? self.init(parsing: argument)
    }
}

extension ServeOptions.Framework: ExpressibleByArgument {}
extension ServeOptions.Mode: ExpressibleByArgument {}
extension SessionManager.UnavailablePolicy: ExpressibleByArgument {}

struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run one app instance with the session-counter endpoints (/counter, /read, /hello) on 127.0.0.1.")

    @Option(help: "hummingbird or vapor.")
    var framework: ServeOptions.Framework = .hummingbird

    @Option(help: "sticky, non-sticky, or memory (sessions in this instance's memory only).")
    var mode: ServeOptions.Mode = .nonSticky

    @Option(help: "Non-sticky locking: none, all, auto, or uriPattern:<regex>.")
    var locking: SessionManager.LockingMode = .none

    @Option(help: "Memcached nodes: n1:host:port,n2:host:port (spaces or commas).")
    var nodes: String = "n1:127.0.0.1:11211"

    @Option(help: "Port on 127.0.0.1.")
    var port: Int = 8080

    @Option(help: "Event loops (default: NIO's, one per core).")
    var eventLoops: Int?

    @Option(help: "This instance's route (sticky set-ups: appended to session ids for the load balancer).")
    var route: String?

    @Option(help: "A name for this instance (shown on the home page).")
    var instance: String = "app"

    @Flag(help: "Sticky mode: save before the response instead of asynchronously.")
    var syncSaves = false

    @Option(help: "Sticky asynchronous saving: milliseconds a change may wait to be written (default 250).")
    var saveDelayMs: Int?

    @Option(help: "When no memcached node answers: fail (503) or startNewSession.")
    var unavailable: SessionManager.UnavailablePolicy = .fail

    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical.")
    var logLevel: String = "warning"

    @Option(
        help: "Enables the management endpoints (/_msm/status, /_msm/, /_msm/config) behind this bearer token (or MSM_MANAGEMENT_TOKEN).")
    var managementToken: String?

    @Flag(help: "Serves Prometheus metrics at /metrics.")
    var metrics = false

    @Flag(help: "/metrics requires the management token too.")
    var metricsRequireToken = false

    func validate() throws {
        guard (1...65535).contains(port) else { throw ValidationError("--port must be 1 to 65535") }
        if let eventLoops, eventLoops < 1 { throw ValidationError("--event-loops must be at least 1") }
        guard Logger.Level(rawValue: logLevel) != nil else { throw ValidationError("unknown --log-level \(logLevel)") }
    }

    func run() async throws {
        var options = ServeOptions()
        options.framework = framework
        options.mode = mode
        options.locking = locking
        options.nodes = nodes
        options.port = port
        options.eventLoops = eventLoops
        options.route = route
        options.instance = instance
        options.synchronousSaves = syncSaves
        options.asynchronousSaveDelay = saveDelayMs.map { .milliseconds($0) }
        options.unavailablePolicy = unavailable
        options.logLevel = Logger.Level(rawValue: logLevel) ?? .warning
        options.managementToken = managementToken ?? ProcessInfo.processInfo.environment["MSM_MANAGEMENT_TOKEN"]
        options.metrics = metrics
        options.metricsRequireToken = metricsRequireToken
        if metricsRequireToken, options.managementToken == nil {
            throw ValidationError("--metrics-require-token needs --management-token")
        }
        do {
            _ = try options.sessionConfiguration()
        } catch {
            throw ValidationError(error.message)
        }
        try await AppServer.run(options)
    }
}

struct Demo: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run a demo cluster: 3 memcached nodes, 3 app instances and nginx on 127.0.0.1:8080, until Ctrl-C.")

    @Flag(help: "Sticky sessions: nginx routes by the session id's route suffix, apps save synchronously.")
    var sticky = false

    @Flag(help: "Restart a process that dies (by default nothing is restarted).")
    var respawn = false

    @Option(help: "Where cluster.json, the nginx configuration and the logs go.")
    var stateDirectory: String = ".msm-demo"

    @Option(help: "nginx's port on 127.0.0.1.")
    var port: Int = 8080

    @Option(help: "First memcached port (n1; n2 and n3 follow).")
    var memcachedPort: Int = 21211

    @Option(help: "First app port (app1; app2 and app3 follow).")
    var appPort: Int = 18081

    func run() throws {
        var options = DemoOptions(msmBinary: Self.executablePath())
        options.sticky = sticky
        options.respawn = respawn
        options.stateDirectory = stateDirectory
        options.port = port
        options.memcachedBasePort = memcachedPort
        options.appBasePort = appPort
        do {
            try DemoCluster(options: options).run()
        } catch let error as DemoError {
            FileHandle.standardError.write(Data("msm demo: \(error)\n".utf8))
            throw ExitCode(1)
        }
    }

    static func executablePath() -> String {
        (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/exe")) ?? CommandLine.arguments[0]
    }
}
#endif

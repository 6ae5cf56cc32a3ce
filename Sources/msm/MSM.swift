#if Tools
import ArgumentParser
import Foundation
import Logging
import Configuration
import MSMApp
import Memcached
import MemcachedSessions
import NIOCore
import NIOPosix

@main
enum Entry {
    /// Where `msm serve` runs Swift concurrency's jobs. With Hummingbird, on Swift's own pool,
    /// each connection's task bound to its channel's event loop from its first request
    /// (`HTTPServerBuilder.http1OnChannelEventLoop()`), and the session manager's background work
    /// to one loop: a request's task, its HTTP channel and its memcached connection share a thread,
    /// with no hop and no executor switch (NIO installed as the global executor would run each job
    /// as the loop's serial executor, every call into a nonisolated async function then a switch
    /// through the loop's task queue: 312,050 instructions a sticky `/read` against 172,578, see
    /// docs/benchmarks/instructions.md). With Vapor, which starts each request's task itself, on
    /// NIO's loops (NIO installed as the global executor), so that the task starts on its
    /// channel's loop. Override with `MSM_GLOBAL_EXECUTOR=nio|swift`; `MSM_CONNECTION_TASKS=global`
    /// runs Hummingbird's connections as Hummingbird does by default (to measure the difference).
    /// This must happen before any async work, hence a synchronous entry point.
    static func main() {
        let arguments = Array(CommandLine.arguments.dropFirst())
        if arguments.first == "serve" {
            // The two settings read before anything runs, from the flag, the environment or the
            // --config file as every setting is (``Settings``).
            func setting(_ name: String) -> String? {
                if let index = arguments.firstIndex(of: "--\(name)"), index + 1 < arguments.endIndex { return arguments[index + 1] }
                if let inline = arguments.first(where: { $0.hasPrefix("--\(name)=") }) { return String(inline.dropFirst(name.count + 3)) }
                if let value = ProcessInfo.processInfo.environment[Settings.environmentName(name)] { return value }
                let file = arguments.firstIndex(of: "--config").flatMap { $0 + 1 < arguments.endIndex ? arguments[$0 + 1] : nil }
                guard let file, let data = FileManager.default.contents(atPath: file),
                    let object = try? JSONSerialization.jsonObject(with: data) as? [String: Any], let value = object[name]
                else { return nil }
                return "\(value)"
            }
            let loops = ProcessInfo.processInfo.environment["NIO_SINGLETON_GROUP_LOOP_COUNT"].flatMap { Int($0) } ?? System.coreCount
            if let count = setting("event-loops").flatMap({ Int($0) }), count > 0 {
                NIOSingletons.groupLoopCountSuggestion = count
            } else if ProcessInfo.processInfo.environment["NIO_SINGLETON_GROUP_LOOP_COUNT"] == nil,
                let allowed = allowedCPUCount(), allowed < loops
            {
                // NIO counts the machine's cores (and cgroup limits), not the CPUs this process may
                // run on: a server pinned to one core (`taskset -c 0`) would run two loops that take
                // turns on it. One loop per CPU it may use (measured: one loop on one core serves
                // more requests than two, see docs/benchmarks/end-to-end.md).
                NIOSingletons.groupLoopCountSuggestion = allowed
            }
            // Vapor creates each request's task from its channel's loop, so there the tasks stay
            // with their channels at any loop count (measured: 5.3k against 3.7k req/s).
            let vapor = setting("framework") == "vapor"
            let choice = ProcessInfo.processInfo.environment["MSM_GLOBAL_EXECUTOR"]
            if choice == "nio" || (choice == nil && vapor) {
                _ = NIOSingletons.unsafeTryInstallSingletonPosixEventLoopGroupAsConcurrencyGlobalExecutor()
            }
        }
        // The command may need the main actor: serve the main queue rather than block this thread.
        Task {
            exit(await run())
        }
        dispatchMain()
    }

    /// How many CPUs this process may run on (its affinity mask, as `taskset` sets it), from
    /// `/proc/self/status`; nil where that is not known.
    static func allowedCPUCount() -> Int? {
        guard let status = try? String(contentsOfFile: "/proc/self/status", encoding: .utf8),
            let line = status.split(separator: "\n").first(where: { $0.hasPrefix("Cpus_allowed_list:") })
        else { return nil }
        return cpuCount(list: line.dropFirst("Cpus_allowed_list:".count))
    }

    /// The number of CPUs in a Linux CPU list (`0`, `0-3`, `0,2-3`); nil when it does not parse.
    static func cpuCount(list: Substring) -> Int? {
        var count = 0
        for range in list.split(separator: ",") {
            let bounds = range.split(separator: "-", omittingEmptySubsequences: false)
                .map { Int($0.trimmingCharacters(in: .whitespaces)) }
            switch bounds.count {
            case 1:
                guard bounds[0] != nil else { return nil }
                count += 1
            case 2:
                guard let low = bounds[0], let high = bounds[1], high >= low else { return nil }
                count += high - low + 1
            default:
                return nil
            }
        }
        return count > 0 ? count : nil
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
        subcommands: [Demo.self, Serve.self, Stats.self, Nodes.self, SessionCommand.self, Config.self, Keygen.self]
    )
}

extension SessionManager.LockingMode: ExpressibleByArgument {
    public init?(argument: String) {
        try? self.init(parsing: argument)
    }
}

extension ServeOptions.Framework: ExpressibleByArgument {}
extension MemcachedProtocolMode: ExpressibleByArgument {}
extension ServeOptions.Mode: ExpressibleByArgument {}
extension SessionManager.UnavailablePolicy: ExpressibleByArgument {}

struct Serve: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run one app instance (the session-counter endpoints) on a port: for benchmarks and the demo.",
        discussion: """
            Every option can also come from the environment (MSM_ and the option's name in upper \
            snake case: --save-delay-ms is MSM_SAVE_DELAY_MS) or from the JSON file of --config (the \
            options' names as keys); the flag wins over the environment, which wins over the file. \
            The management token comes from MSM_MANAGEMENT_TOKEN, the file, or --management-token-file: \
            never from a flag's value, which shows in ps.

            Two environment variables, not options, change how requests are scheduled (to measure \
            the difference): MSM_CONNECTION_TASKS=global runs Hummingbird's own .http1(), each \
            connection's task on Swift's pool, instead of on its channel's event loop; \
            MSM_GLOBAL_EXECUTOR=nio|swift picks Swift's global executor (default: swift with \
            Hummingbird, nio with Vapor).
            """)

    @Option(help: "A JSON file of settings, the options' names as keys.")
    var config: String?

    @Option(help: "hummingbird or vapor (default hummingbird).")
    var framework: ServeOptions.Framework?

    @Option(help: "sticky, non-sticky, or memory (sessions in this instance's memory only; default non-sticky).")
    var mode: ServeOptions.Mode?

    @Option(help: "Non-sticky locking: none, all, auto, or uriPattern:<regex> (default none).")
    var locking: String?

    @Option(help: "Memcached nodes: n1:host:port,n2:host:port (spaces or commas; default n1:127.0.0.1:11211).")
    var nodes: String?

    @Option(name: .customLong("protocol"), help: "meta, or text for memcached-protocol stores and proxies without meta commands (default meta).")
    var protocolMode: MemcachedProtocolMode?

    @Option(help: "Port on 127.0.0.1 (default 8080).")
    var port: Int?

    @Option(help: "Event loops (default: one per CPU this process may run on, e.g. 1 under taskset -c 0).")
    var eventLoops: Int?

    @Option(help: "This instance's route (sticky set-ups: appended to session ids for the load balancer).")
    var route: String?

    @Option(help: "A name for this instance (shown on the home page; default app).")
    var instance: String?

    @Flag(inversion: .prefixedNo, help: "Sticky mode: save before the response instead of asynchronously.")
    var syncSaves: Bool?

    @Option(help: "Sticky asynchronous saving: milliseconds a change may wait to be written (default 250).")
    var saveDelayMs: Int?

    @Option(help: "When no memcached node answers: fail (503) or startNewSession (default fail).")
    var unavailable: SessionManager.UnavailablePolicy?

    @Option(help: "Log level: trace, debug, info, notice, warning, error, critical (default warning).")
    var logLevel: String?

    @Option(help: "A file holding the management endpoints' bearer token (/_msm/status, /_msm/, /_msm/config).")
    var managementTokenFile: String?

    @Option(help: ArgumentHelp("Deprecated: the token shows in ps; use MSM_MANAGEMENT_TOKEN or --management-token-file.", visibility: .hidden))
    var managementToken: String?

    @Flag(inversion: .prefixedNo, help: "Serves Prometheus metrics at /metrics.")
    var metrics: Bool?

    @Flag(inversion: .prefixedNo, help: "/metrics answers without the management token (by default it requires it whenever a token is set).")
    var metricsPublic: Bool?

    @Flag(help: ArgumentHelp("Deprecated: /metrics requires the management token by default.", visibility: .hidden))
    var metricsRequireToken = false

    @Flag(
        inversion: .prefixedNo,
        help: "The session cookie without Secure, for plain-HTTP development only (msm demo sets it; by default the cookie is Secure).")
    var insecureCookie: Bool?

    @Flag(
        inversion: .prefixedNo,
        help: "Exports tracing spans over OTLP/HTTP (swift-otel); the OTEL_EXPORTER_OTLP_* variables set the endpoint (default http://localhost:4318).")
    var otel: Bool?

    @OptionGroup var security: SecurityOptions

    @OptionGroup var sealing: SealingOptions

    /// The settings, each from its flag, the environment, the --config file, or its default.
    func options() async throws -> ServeOptions {
        var flags: [String: ConfigValue] = [:]
        flags.flag("framework", framework)
        flags.flag("mode", mode)
        flags.flag("locking", locking)
        flags.flag("nodes", nodes)
        flags.flag("protocol", protocolMode)
        flags.flag("port", port)
        flags.flag("event-loops", eventLoops)
        flags.flag("route", route)
        flags.flag("instance", instance)
        flags.flag("sync-saves", syncSaves)
        flags.flag("save-delay-ms", saveDelayMs)
        flags.flag("unavailable", unavailable)
        flags.flag("log-level", logLevel)
        flags.flag("metrics", metrics)
        flags.flag("metrics-public", metricsPublic)
        flags.flag("insecure-cookie", insecureCookie)
        flags.flag("otel", otel)
        security.record(into: &flags)
        sealing.record(into: &flags)
        let settings = try await Settings(flags: flags, configFile: config)
        var options = ServeOptions()
        options.sealing = try SealingOptions.sealing(settings)
        options.tls = try SecurityOptions.configuration(settings)
        options.authentication = try security.authentication(settings)
        options.framework = try settings.value("framework") ?? options.framework
        options.mode = try settings.value("mode") ?? options.mode
        options.locking = try settings.value("locking", as: SessionManager.LockingMode.self) ?? options.locking
        options.nodes = try settings.string("nodes") ?? options.nodes
        options.protocolMode = try settings.value("protocol") ?? options.protocolMode
        options.port = try settings.int("port") ?? options.port
        options.eventLoops = try settings.int("event-loops")
        options.route = try settings.string("route")
        options.instance = try settings.string("instance") ?? options.instance
        options.synchronousSaves = try settings.bool("sync-saves") ?? options.synchronousSaves
        options.asynchronousSaveDelay = try settings.int("save-delay-ms").map { .milliseconds($0) }
        options.unavailablePolicy = try settings.value("unavailable") ?? options.unavailablePolicy
        let level = try settings.string("log-level") ?? "warning"
        guard let logLevel = Logger.Level(rawValue: level) else { throw ValidationError("unknown log level \(level)") }
        options.logLevel = logLevel
        options.metrics = try settings.bool("metrics") ?? options.metrics
        options.metricsPublic = try settings.bool("metrics-public") ?? options.metricsPublic
        options.insecureCookie = try settings.bool("insecure-cookie") ?? options.insecureCookie
        let requireTokenSetting = try settings.bool("metrics-require-token")
        let requiresToken = metricsRequireToken || requireTokenSetting == true
        if metricsRequireToken || requireTokenSetting != nil {
            note("msm serve: --metrics-require-token is deprecated: /metrics requires the management token by default (--metrics-public opts out)")
        }
        options.openTelemetry = try settings.bool("otel") ?? options.openTelemetry
        if let managementTokenFile {
            options.managementToken = try readSecretFile(managementTokenFile, flag: "management-token-file")
        } else if let managementToken {
            note("msm serve: --management-token is deprecated (its value shows in ps): use MSM_MANAGEMENT_TOKEN or --management-token-file")
            options.managementToken = managementToken
        } else {
            options.managementToken = try settings.secret("management-token")
        }
        guard (1...65535).contains(options.port) else { throw ValidationError("port must be 1 to 65535") }
        if let loops = options.eventLoops, loops < 1 { throw ValidationError("event-loops must be at least 1") }
        if requiresToken, options.managementToken == nil {
            throw ValidationError("metrics-require-token needs a management token")
        }
        if options.metrics, options.metricsPublic || options.managementToken == nil {
            note("msm serve: /metrics is public (no management token, or --metrics-public): anyone who can reach this port reads the metrics")
        }
        do {
            _ = try options.sessionConfiguration()
        } catch {
            throw ValidationError(error.message)
        }
        return options
    }

    func run() async throws {
        try await AppServer.run(try await options())
    }
}

struct Demo: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run a demo cluster: 3 memcached nodes, 3 app instances and nginx on 127.0.0.1:8080, until Ctrl-C.",
        discussion: """
            Every option can also come from the environment (MSM_ and the option's name in upper \
            snake case: --state-directory is MSM_STATE_DIRECTORY) or from the JSON file of --config \
            (the options' names as keys); the flag wins over the environment, which wins over the file.
            """)

    @Option(help: "A JSON file of settings, the options' names as keys.")
    var config: String?

    @Flag(inversion: .prefixedNo, help: "Sticky sessions: nginx routes by the session id's route suffix, apps save synchronously.")
    var sticky: Bool?

    @Flag(inversion: .prefixedNo, help: "Restart a process that dies (by default nothing is restarted).")
    var respawn: Bool?

    @Option(name: .customLong("protocol"), help: "The apps' memcached protocol: meta, or text (default meta).")
    var protocolMode: MemcachedProtocolMode?

    @Option(help: "Where cluster.json, the nginx configuration and the logs go (default .msm-demo).")
    var stateDirectory: String?

    @Option(help: "nginx's port on 127.0.0.1 (default 8080).")
    var port: Int?

    @Option(help: "First memcached port (n1; n2 and n3 follow; default 21211).")
    var memcachedPort: Int?

    @Option(help: "First app port (app1; app2 and app3 follow; default 18081).")
    var appPort: Int?

    @Flag(inversion: .prefixedNo, help: "The apps export tracing spans over OTLP/HTTP (msm serve --otel; OTEL_* variables set the endpoint).")
    var otel: Bool?

    @Option(help: "The apps seal sessions with the keys of this file (msm serve --session-keys-file).")
    var sessionKeysFile: String?

    @Option(help: "The apps' storage keys are an HMAC under the secret of this file (msm serve --key-secret-file).")
    var keySecretFile: String?

    @Flag(
        inversion: .prefixedNo,
        help: "memcached serves TLS only, with certificates the demo makes in <state>/tls (openssl); the apps trust its CA.")
    var tls: Bool?

    func run() async throws {
        var flags: [String: ConfigValue] = [:]
        flags.flag("sticky", sticky)
        flags.flag("respawn", respawn)
        flags.flag("protocol", protocolMode)
        flags.flag("state-directory", stateDirectory)
        flags.flag("port", port)
        flags.flag("memcached-port", memcachedPort)
        flags.flag("app-port", appPort)
        flags.flag("otel", otel)
        flags.flag("session-keys-file", sessionKeysFile)
        flags.flag("key-secret-file", keySecretFile)
        flags.flag("tls", tls)
        let settings = try await Settings(flags: flags, configFile: config)
        var options = DemoOptions(msmBinary: Self.executablePath())
        // Checked here (a clear error before anything starts); the apps read the files themselves.
        _ = try SealingOptions.sealing(
            keysFile: try settings.string("session-keys-file"), secretFile: try settings.string("key-secret-file"),
            acceptUnsealedUntil: nil, writeUnsealed: false)
        options.sessionKeysFile = try settings.string("session-keys-file").map { URL(fileURLWithPath: $0).path }
        options.keySecretFile = try settings.string("key-secret-file").map { URL(fileURLWithPath: $0).path }
        options.sticky = try settings.bool("sticky") ?? options.sticky
        options.respawn = try settings.bool("respawn") ?? options.respawn
        options.protocolMode = try settings.value("protocol") ?? options.protocolMode
        options.stateDirectory = try settings.string("state-directory") ?? options.stateDirectory
        options.port = try settings.int("port") ?? options.port
        options.memcachedBasePort = try settings.int("memcached-port") ?? options.memcachedBasePort
        options.appBasePort = try settings.int("app-port") ?? options.appBasePort
        options.openTelemetry = try settings.bool("otel") ?? options.openTelemetry
        options.tls = try settings.bool("tls") ?? options.tls
        for (name, value) in [("port", options.port), ("memcached-port", options.memcachedBasePort), ("app-port", options.appBasePort)]
        where !(1...65533).contains(value) {
            throw ValidationError("\(name) must be 1 to 65533")
        }
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

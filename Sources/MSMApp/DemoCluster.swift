#if Tools
import Foundation
import Memcached
import MemcachedSessions
import MemcachedTestRig
import Synchronization

#if canImport(Glibc)
    import Glibc
#endif

/// Set by the SIGINT/SIGTERM handler (an atomic store is async-signal-safe).
private let demoStopRequested = Atomic<Bool>(false)

/// `msm demo`: three memcached nodes, three app instances and nginx in front of them, all on
/// loopback, all child processes of this one; stopped together on Ctrl-C or SIGTERM.
public struct DemoOptions: Sendable {
    public var sticky = false
    public var respawn = false
    /// Each app exports its tracing spans over OTLP/HTTP (`msm serve --otel`).
    public var openTelemetry = false
    /// The apps seal sessions with this key file (`msm serve --session-keys-file`).
    public var sessionKeysFile: String? = nil
    /// The apps' storage-key secret file (`msm serve --key-secret-file`).
    public var keySecretFile: String? = nil
    /// memcached serves TLS only (`-Z`), with a CA and a certificate for 127.0.0.1 the demo makes
    /// in `<state>/tls` with `openssl`; the apps trust that CA (`msm serve --tls-ca-file`).
    public var tls = false
    public var stateDirectory = ".msm-demo"
    public var port = 8080
    public var memcachedBasePort = 21211
    public var appBasePort = 18081
    /// The apps' memcached protocol.
    public var protocolMode: MemcachedProtocolMode = .meta
    /// The `msm` binary that runs the app instances (`msm serve`).
    public var msmBinary: String
    public var memcachedBinary = "/usr/bin/memcached"
    public var nginxBinary = "/usr/sbin/nginx"

    public init(msmBinary: String) {
        self.msmBinary = msmBinary
    }
}

public enum DemoError: Error, CustomStringConvertible {
    case portTaken(Int, String)
    case missingProgram(String, String)
    case startFailed(String)

    public var description: String {
        switch self {
        case .portTaken(let port, let what):
            return "port \(port) (for \(what)) is already taken on 127.0.0.1: stop whatever uses it (another demo?) and retry"
        case .missingProgram(let path, let package):
            return "\(path) not found: install it with  apt-get install -y \(package)"
        case .startFailed(let why):
            return "could not start the cluster: \(why)"
        }
    }
}

/// A child process of the demo.
final class DemoProcess: Sendable {
    let role: String
    let id: String
    let address: String
    let executable: String
    let arguments: [String]
    let logPath: String
    let process = Mutex<Process?>(nil)
    /// Signal the child gets if this process dies without stopping it (even by SIGKILL), via
    /// `setpriv --pdeathsig`, which execs the server: its PID stays the server's own.
    let parentDeathSignal: String
    let environment: [String: String]

    init(
        role: String, id: String, address: String, executable: String, arguments: [String], logPath: String,
        parentDeathSignal: String = "TERM", environment: [String: String] = [:]
    ) {
        self.parentDeathSignal = parentDeathSignal
        self.environment = environment
        self.role = role
        self.id = id
        self.address = address
        self.executable = executable
        self.arguments = arguments
        self.logPath = logPath
    }

    var pid: Int32? { process.withLock { $0.map { $0.processIdentifier } } }
    var isRunning: Bool { process.withLock { $0?.isRunning ?? false } }

    func start() throws {
        let task = Process()
        if FileManager.default.isExecutableFile(atPath: "/usr/bin/setpriv") {
            task.executableURL = URL(fileURLWithPath: "/usr/bin/setpriv")
            task.arguments = ["--pdeathsig", parentDeathSignal, "--", executable] + arguments
        } else {
            task.executableURL = URL(fileURLWithPath: executable)
            task.arguments = arguments
        }
        _ = FileManager.default.createFile(atPath: logPath, contents: nil)
        let log = try FileHandle(forWritingTo: URL(fileURLWithPath: logPath))
        log.seekToEndOfFile()
        task.standardOutput = log
        task.standardError = log
        task.standardInput = FileHandle.nullDevice
        if !environment.isEmpty {
            task.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        }
        try task.run()
        process.withLock { $0 = task }
    }

    /// SIGTERM, then SIGKILL after `grace`; waits until it is gone.
    func stop(grace: TimeInterval = 5) {
        guard let task = process.withLock({ $0 }), task.isRunning else { return }
        kill(task.processIdentifier, SIGTERM)
        let deadline = Date().addingTimeInterval(grace)
        while task.isRunning, Date() < deadline { usleep(20_000) }
        if task.isRunning {
            kill(task.processIdentifier, SIGKILL)
            task.waitUntilExit()
        }
    }
}

public final class DemoCluster: Sendable {
    let options: DemoOptions
    let processes: [DemoProcess]
    /// The apps' management token (their `/_msm/` pages), written to `<state>/management-token`.
    let managementToken: String

    static let memcachedIDs = ["n1", "n2", "n3"]
    static let appIDs = ["app1", "app2", "app3"]
    static let routes = ["a1", "a2", "a3"]

    public init(options: DemoOptions) {
        self.options = options
        self.managementToken = MemcachedSessionID.Token.random().description + MemcachedSessionID.Token.random().description
        let state = options.stateDirectory
        var processes: [DemoProcess] = []
        let nodes = Self.memcachedIDs.enumerated().map { "\($1):127.0.0.1:\(options.memcachedBasePort + $0)" }.joined(separator: ",")
        for (index, id) in Self.memcachedIDs.enumerated() {
            let port = options.memcachedBasePort + index
            var arguments = ["-l", "127.0.0.1", "-p", "\(port)", "-U", "0", "-m", "64", "-c", "1024"]
            if getuid() == 0 { arguments += ["-u", "nobody"] }
            if options.tls {
                arguments += ["-Z", "-o", "ssl_chain_cert=\(Self.tlsDirectory(state))/server.pem,ssl_key=\(Self.tlsDirectory(state))/server.key"]
            }
            processes.append(
                DemoProcess(
                    role: "memcached", id: id, address: "127.0.0.1:\(port)", executable: options.memcachedBinary, arguments: arguments,
                    logPath: "\(state)/\(id).log", parentDeathSignal: "KILL"))
        }
        for (index, id) in Self.appIDs.enumerated() {
            let port = options.appBasePort + index
            var arguments = [
                "serve", "--framework", "hummingbird", "--mode", options.sticky ? "sticky" : "non-sticky", "--nodes", nodes,
                "--port", "\(port)", "--instance", id, "--log-level", "notice", "--metrics", "--protocol", options.protocolMode.rawValue,
                // nginx listens on plain HTTP: a Secure cookie would not come back from a browser
                // on another host name than localhost.
                "--insecure-cookie",
            ]
            if options.sticky { arguments += ["--route", Self.routes[index], "--sync-saves"] }
            if options.openTelemetry { arguments += ["--otel"] }
            if let file = options.sessionKeysFile { arguments += ["--session-keys-file", file] }
            if let file = options.keySecretFile { arguments += ["--key-secret-file", file] }
            if options.tls { arguments += ["--tls-ca-file", "\(Self.tlsDirectory(state))/ca.pem"] }
            processes.append(
                DemoProcess(
                    role: "app", id: id, address: "127.0.0.1:\(port)", executable: options.msmBinary, arguments: arguments,
                    logPath: "\(state)/\(id).log", environment: ["MSM_MANAGEMENT_TOKEN": managementToken]))
        }
        let statePath = URL(fileURLWithPath: state).standardizedFileURL.path
        processes.append(
            DemoProcess(
                role: "nginx", id: "nginx", address: "127.0.0.1:\(options.port)", executable: options.nginxBinary,
                arguments: ["-p", "\(statePath)/nginx/", "-c", "\(statePath)/nginx/nginx.conf", "-e", "\(statePath)/nginx/error.log"],
                logPath: "\(state)/nginx.log"))
        self.processes = processes
    }

    /// Where `--tls` keeps its CA and server certificate (absolute: memcached reads them).
    static func tlsDirectory(_ state: String) -> String {
        URL(fileURLWithPath: state).standardizedFileURL.path + "/tls"
    }

    /// A CA and a server certificate for 127.0.0.1 and localhost (EC P-256, ten years), made with
    /// `openssl` once per state directory; readable by `nobody`, whom memcached runs as under root.
    func makeCertificates() throws {
        let directory = Self.tlsDirectory(options.stateDirectory)
        let fileManager = FileManager.default
        if fileManager.fileExists(atPath: directory + "/server.pem") { return }
        try fileManager.createDirectory(atPath: directory, withIntermediateDirectories: true)
        func openssl(_ arguments: [String]) throws {
            let task = Process()
            task.executableURL = URL(fileURLWithPath: "/usr/bin/openssl")
            task.arguments = arguments
            task.currentDirectoryURL = URL(fileURLWithPath: directory)
            task.standardOutput = FileHandle.nullDevice
            task.standardError = FileHandle.nullDevice
            do { try task.run() } catch { throw DemoError.missingProgram("/usr/bin/openssl", "openssl") }
            task.waitUntilExit()
            guard task.terminationStatus == 0 else { throw DemoError.startFailed("openssl \(arguments[0]) failed making the TLS certificates") }
        }
        let curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        try openssl(["req", "-x509"] + curve + ["-keyout", "ca.key", "-out", "ca.pem", "-days", "3650", "-subj", "/CN=msm demo ca"])
        try openssl(["req"] + curve + ["-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=msm demo memcached"])
        try "subjectAltName=IP:127.0.0.1,DNS:localhost\n".write(toFile: directory + "/server.ext", atomically: true, encoding: .utf8)
        try openssl([
            "x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial", "-out", "server.pem", "-days", "3650",
            "-extfile", "server.ext",
        ])
        chmod(directory, 0o755)
        // memcached reads them as nobody (it drops privileges under root): the state directory
        // must let it through (a temporary one is 0700).
        if getuid() == 0, let attributes = try? fileManager.attributesOfItem(atPath: options.stateDirectory),
            let mode = (attributes[.posixPermissions] as? NSNumber)?.uint16Value
        {
            chmod(options.stateDirectory, mode_t(mode | 0o011))
        }
        for name in try fileManager.contentsOfDirectory(atPath: directory) where name != "ca.key" {
            chmod(directory + "/" + name, 0o644)
        }
    }

    /// The nginx configuration: round robin (non-sticky), or routing by the session id's route
    /// suffix with the other instances as backups (sticky: MSM's jvmRoute scheme with failover).
    func nginxConfiguration() -> String {
        let apps = processes.filter { $0.role == "app" }
        let statePath = URL(fileURLWithPath: options.stateDirectory).standardizedFileURL.path + "/nginx"
        var upstreams = "    upstream msm_all {\n"
        for app in apps { upstreams += "        server \(app.address) max_fails=1 fail_timeout=2s;\n" }
        upstreams += "        keepalive 32;\n    }\n"
        var routing = "proxy_pass http://msm_all;"
        if options.sticky {
            var map = "    map $cookie_SESSION_ID $msm_backend {\n        default msm_all;\n"
            for (index, app) in apps.enumerated() {
                let route = Self.routes[index]
                map += "        \"~\\.\(route)$\" msm_\(route);\n"
                upstreams += "    upstream msm_\(route) {\n        server \(app.address) max_fails=1 fail_timeout=2s;\n"
                for other in apps where other !== app {
                    upstreams += "        server \(other.address) backup;\n"
                }
                upstreams += "        keepalive 16;\n    }\n"
            }
            map += "    }\n"
            upstreams = map + upstreams
            routing = "proxy_pass http://$msm_backend;"
        }
        return """
            # Written by msm demo; nginx runs in the foreground as a child of msm.
            daemon off;
            master_process on;
            worker_processes 1;
            pid \(statePath)/nginx.pid;
            error_log \(statePath)/error.log warn;
            events { worker_connections 1024; }
            http {
                access_log off;
                client_body_temp_path \(statePath)/tmp/client;
                proxy_temp_path \(statePath)/tmp/proxy;
                fastcgi_temp_path \(statePath)/tmp/fastcgi;
                uwsgi_temp_path \(statePath)/tmp/uwsgi;
                scgi_temp_path \(statePath)/tmp/scgi;
            \(upstreams)
                server {
                    listen 127.0.0.1:\(options.port);
                    location / {
                        \(routing)
                        proxy_http_version 1.1;
                        proxy_set_header Connection "";
                        proxy_set_header Host $host;
                        proxy_connect_timeout 1s;
                        proxy_read_timeout 10s;
                        proxy_next_upstream error timeout http_502;
                        proxy_next_upstream_tries 3;
                        proxy_max_temp_file_size 0;
                    }
                }
            }

            """
    }

    /// The layout, in the documented shape.
    func layoutJSON() -> String {
        let entries = processes.map { process in
            "{\"role\": \"\(process.role)\", \"id\": \"\(process.id)\", \"address\": \"\(process.address)\", \"pid\": \(process.pid ?? -1)}"
        }
        return "{\"processes\": [\n  " + entries.joined(separator: ",\n  ") + "\n]}\n"
    }

    func writeLayout() throws {
        let path = options.stateDirectory + "/cluster.json"
        let temporary = path + ".tmp"
        try layoutJSON().write(toFile: temporary, atomically: false, encoding: .utf8)
        if rename(temporary, path) != 0 { throw DemoError.startFailed("cannot write \(path)") }
    }

    func waitUntilListening(_ process: DemoProcess, timeout: TimeInterval = 30) throws {
        let port = Int(process.address.split(separator: ":").last!)!  // addresses are built above as host:port
        let deadline = Date().addingTimeInterval(timeout)
        while Date() < deadline {
            if demoStopRequested.load(ordering: .relaxed) { throw DemoError.startFailed("interrupted") }
            if FreePort.accepts(port: port) { return }
            if !process.isRunning {
                throw DemoError.startFailed("\(process.role) \(process.id) exited at start; see \(process.logPath)")
            }
            usleep(50_000)
        }
        throw DemoError.startFailed("\(process.role) \(process.id) did not listen on \(process.address) within \(Int(timeout)) s")
    }

    /// Starts everything, prints the layout, and supervises until SIGINT or SIGTERM.
    public func run() throws {
        let fileManager = FileManager.default
        for (path, package) in [(options.memcachedBinary, "memcached"), (options.nginxBinary, "nginx"), (options.msmBinary, "(build msm)")]
        where !fileManager.isExecutableFile(atPath: path) {
            throw DemoError.missingProgram(path, package)
        }
        cleanUpAfterAKilledDemo()
        for process in processes {
            let port = Int(process.address.split(separator: ":").last!)!  // built above as host:port
            if !FreePort.isFree(port) { throw DemoError.portTaken(port, "\(process.role) \(process.id)") }
        }
        let nginxState = options.stateDirectory + "/nginx"
        for directory in [options.stateDirectory, nginxState, nginxState + "/tmp"] {
            try fileManager.createDirectory(atPath: directory, withIntermediateDirectories: true)
        }
        if getuid() == 0 {
            // nginx's workers run as nobody: let them use the temporary directories.
            chmod(nginxState + "/tmp", 0o777)
        }
        try nginxConfiguration().write(toFile: nginxState + "/nginx.conf", atomically: true, encoding: .utf8)
        if options.tls { try makeCertificates() }
        let tokenPath = options.stateDirectory + "/management-token"
        try managementToken.write(toFile: tokenPath, atomically: true, encoding: .utf8)
        chmod(tokenPath, 0o600)

        // Ctrl-C and SIGTERM stop the cluster: the handler only sets a flag the loop below reads.
        for signalNumber in [SIGINT, SIGTERM] {
            signal(signalNumber) { _ in demoStopRequested.store(true, ordering: .relaxed) }
        }

        do {
            for process in processes where process.role == "memcached" {
                try process.start()
                try waitUntilListening(process)
            }
            for process in processes where process.role == "app" { try process.start() }
            for process in processes where process.role == "app" { try waitUntilListening(process, timeout: 60) }
            let nginx = processes.first { $0.role == "nginx" }!  // always built above
            try nginx.start()
            try waitUntilListening(nginx)
            try writeLayout()
        } catch {
            stopAll()
            throw error
        }

        print(layoutJSON(), terminator: "")
        print(
            """

            msm demo: \(options.sticky ? "sticky (routes by session id suffix, synchronous saves)" : "non-sticky (round robin)") cluster on http://127.0.0.1:\(options.port)/
            layout written to \(options.stateDirectory)/cluster.json; logs in \(options.stateDirectory)/; Ctrl-C stops everything.
            each app's status page and metrics (token in \(options.stateDirectory)/management-token):
              curl -H "Authorization: Bearer \(managementToken)" http://127.0.0.1:\(options.appBasePort)/_msm/status
              http://127.0.0.1:\(options.appBasePort)/_msm/ and http://127.0.0.1:\(options.appBasePort)/metrics (same header)
            session cookies are not Secure (msm serve --insecure-cookie): this demo serves plain HTTP. Behind HTTPS,
            leave them Secure (the default).
            """)
        if options.tls {
            print("memcached speaks TLS only (-Z); the apps trust the CA in \(Self.tlsDirectory(options.stateDirectory))/ca.pem")
        }
        fflush(nil)

        var announced: Set<String> = []
        while !demoStopRequested.load(ordering: .relaxed) {
            usleep(100_000)
            for process in processes where !process.isRunning {
                let key = "\(process.role)/\(process.id)/\(process.pid ?? -1)"
                if options.respawn {
                    print("msm demo: \(process.role) \(process.id) exited; restarting it (--respawn)")
                    do {
                        try process.start()
                        try writeLayout()
                    } catch {
                        print("msm demo: could not restart \(process.id): \(error)")
                    }
                } else if !announced.contains(key) {
                    announced.insert(key)
                    print("msm demo: \(process.role) \(process.id) (pid \(process.pid ?? -1)) exited; the cluster keeps serving without it")
                }
                fflush(nil)
            }
        }
        print("\nmsm demo: stopping")
        stopAll()
        try? fileManager.removeItem(atPath: options.stateDirectory + "/cluster.json")
        print("msm demo: stopped")
    }

    /// A demo killed with SIGKILL cannot stop its children; apps and nginx die with it (parent-death
    /// signal), but memcached drops privileges at start, which clears that signal. So a new demo
    /// in the same state directory ends what the previous one's layout lists, if it is still that
    /// program on that address, before it checks its ports.
    func cleanUpAfterAKilledDemo() {
        let path = options.stateDirectory + "/cluster.json"
        guard let data = FileManager.default.contents(atPath: path),
            let layout = try? JSONSerialization.jsonObject(with: data) as? [String: Any],
            let entries = layout["processes"] as? [[String: Any]]
        else { return }
        for entry in entries {
            guard let pid = entry["pid"] as? Int, pid > 1, let role = entry["role"] as? String,
                let address = entry["address"] as? String, let port = address.split(separator: ":").last,
                let command = try? String(contentsOfFile: "/proc/\(pid)/cmdline", encoding: .utf8)
            else { continue }
            let program = ["memcached": "memcached", "nginx": "nginx", "app": "msm"][role] ?? "?"
            let arguments = command.split(separator: "\0")
            guard arguments.first.map({ $0.hasSuffix(program) || $0.hasPrefix("nginx") }) == true,
                role == "nginx" || arguments.contains(Substring(port))
            else { continue }
            print("msm demo: ending \(role) \(entry["id"] ?? "") (pid \(pid)) left by a demo that was killed")
            kill(Int32(pid), SIGKILL)
        }
        usleep(200_000)
        try? FileManager.default.removeItem(atPath: path)
    }

    func stopAll() {
        // The balancer first, then the apps (they flush their writes), then memcached.
        for role in ["nginx", "app", "memcached"] {
            let group = processes.filter { $0.role == role }
            let threads = group.map { process in
                let thread = Thread { process.stop() }
                thread.start()
                return thread
            }
            _ = threads
            let deadline = Date().addingTimeInterval(8)
            while group.contains(where: { $0.isRunning }), Date() < deadline { usleep(20_000) }
            for process in group where process.isRunning {
                if let pid = process.pid { kill(pid, SIGKILL) }
            }
        }
    }
}
#endif

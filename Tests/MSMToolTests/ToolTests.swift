#if Tools
import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
import Memcached
import MemcachedSessions
import MemcachedTestRig
import Testing

/// Runs the `msm` binary built next to the tests, as a person would from a shell.
func msm(_ arguments: [String], environment: [String: String] = [:]) throws -> (code: Int32, output: String, errors: String) {
    let directory = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
    var binary = directory.appendingPathComponent("msm")
    if !FileManager.default.isExecutableFile(atPath: binary.path) {
        // Under `swift test` the first argument may be the xctest bundle inside the build folder.
        binary = directory.deletingLastPathComponent().appendingPathComponent("msm")
    }
    let process = Process()
    process.executableURL = binary
    process.arguments = arguments
    process.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
    let output = Pipe()
    let errors = Pipe()
    process.standardOutput = output
    process.standardError = errors
    try process.run()
    let out = output.fileHandleForReading.readDataToEndOfFile()
    let err = errors.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    return (process.terminationStatus, String(decoding: out, as: UTF8.self), String(decoding: err, as: UTF8.self))
}

func nodes(_ servers: [MemcachedServer]) -> String { servers.nodeList }

/// A GET, as a browser or a scraper sends it: the status and the body.
/// No cookie jar: each request is a new browser (two instances on 127.0.0.1 would share cookies).
let cookielessSession: URLSession = {
    let configuration = URLSessionConfiguration.ephemeral
    configuration.httpCookieStorage = nil
    configuration.httpShouldSetCookies = false
    return URLSession(configuration: configuration)
}()

func get(_ url: String, token: String? = nil) async throws -> (status: Int, body: String, setCookie: String?, cacheControl: String?) {
    var request = URLRequest(url: URL(string: url)!)
    if let token { request.setValue("Bearer \(token)", forHTTPHeaderField: "Authorization") }
    let (data, response) = try await cookielessSession.data(for: request)
    let http = response as? HTTPURLResponse
    return (
        http?.statusCode ?? 0, String(decoding: data, as: UTF8.self), http?.value(forHTTPHeaderField: "Set-Cookie"),
        http?.value(forHTTPHeaderField: "Cache-Control")
    )
}

/// A port nothing listens on.
func deadPort() throws -> Int { try FreePort.find() }

@Suite("The msm tool, run as a person would", .serialized)
struct ToolTests {
    @Test func helpAndUsageErrors() throws {
        let help = try msm(["--help"])
        #expect(help.code == 0)
        for command in ["demo", "serve", "stats", "nodes", "session", "config"] { #expect(help.output.contains(command)) }
        for command in [
            ["stats", "--help"], ["nodes", "--help"], ["session", "show", "--help"], ["session", "delete", "--help"], ["session", "revoke", "--help"], ["config", "--help"],
        ] {
            let result = try msm(command)
            #expect(result.code == 0, "\(command)")
            #expect(result.output.contains("USAGE"), "\(command)")
        }
        #expect(try msm(["stats", "--no-such-option"]).code == 1)
        #expect(try msm(["no-such-command"]).code == 1)
        #expect(try msm(["stats", "--nodes", "n1:127.0.0.1"]).code == 1, "a malformed node list is bad input")
    }

    @Test func nodesAndStatsAgainstRealMemcached() async throws {
        try await withMemcachedServers(count: 2) { servers in
            let client = try MemcachedClient(configuration: .init(nodes: nodes(servers)))
            for index in 0..<37 { try await client.set("item\(index)", value: "v") }

            let checked = try msm(["nodes", "--nodes", nodes(servers)])
            #expect(checked.code == 0, "\(checked.errors)")
            #expect(checked.output.contains("n1") && checked.output.contains("n2") && checked.output.contains("up"))
            #expect(checked.output.contains("1.6"), "the memcached version")

            let stats = try msm(["stats", "--nodes", nodes(servers)])
            #expect(stats.code == 0)
            let lines = stats.output.split(separator: "\n").map(String.init)
            #expect(lines.first?.hasPrefix("stat") == true)
            let items = try #require(lines.first { $0.hasPrefix("curr_items ") })
            let counts = items.split(separator: " ", omittingEmptySubsequences: true).dropFirst().compactMap { Int($0) }
            #expect(counts.count == 2 && counts.reduce(0, +) == 37, "plain numbers per node: \(items)")

            let json = try msm(["stats", "--nodes", nodes(servers), "--json"])
            let decoded = try JSONSerialization.jsonObject(with: Data(json.output.utf8)) as? [String: Any]
            #expect((decoded?["nodes"] as? [String: Any])?.count == 2)

            let settings = try msm(["stats", "--group", "settings", "--nodes", nodes(servers)])
            #expect(settings.code == 0 && settings.output.contains("item_size_max"))
            #expect(try msm(["stats", "--group", "bogus", "--nodes", nodes(servers)]).code == 1)

            // One node unreachable: the others are still shown, exit code 2.
            let withDead = nodes(servers) + ",n3:127.0.0.1:\(try deadPort())"
            let partial = try msm(["stats", "--nodes", withDead, "--timeout-ms", "300"])
            #expect(partial.code == 2)
            #expect(partial.output.contains("unreachable") && partial.output.contains("curr_items"))
            #expect(partial.errors.contains("n3"))
            #expect(try msm(["nodes", "--nodes", withDead, "--timeout-ms", "300"]).code == 2)
        }
    }

    /// `msm session revoke --principal` ends every session of a user, as invalidateAll does;
    /// with the index's nodes unreachable it says so (exit 2) and ends nothing.
    @Test func sessionRevokeEndsEverySessionOfAPrincipal() async throws {
        try await withMemcachedServers(count: 2) { servers in
            var configuration = try SessionManager.Configuration(nodes: nodes(servers))
            configuration.mode = .nonSticky
            let manager = try SessionManager(configuration: configuration)
            var ids: [MemcachedSessionID] = []
            for _ in 0..<2 {
                let access = manager.beginRequest(path: "/login", sessionCookie: nil)
                let session = try access.create()
                try session.setPrincipal("kate")
                guard case .set(let id) = try await manager.endRequest(access).cookie else {
                    Issue.record("no cookie")
                    return
                }
                ids.append(id)
            }
            let revoked = try msm(["session", "revoke", "--principal", "kate", "--nodes", nodes(servers)])
            #expect(revoked.code == 0, "\(revoked.errors)")
            #expect(revoked.output.contains("ended 2 sessions"))
            for id in ids { #expect(try msm(["session", "show", id.description, "--nodes", nodes(servers)]).code == 3) }
            let again = try msm(["session", "revoke", "--principal", "kate", "--nodes", nodes(servers), "--json"])
            #expect(again.code == 0)
            #expect(again.output.contains(#""ended" : 0"#) || again.output.contains(#""ended":0"#))
            let dead = "n1:127.0.0.1:\(try deadPort()),n2:127.0.0.1:\(try deadPort())"
            let unreachable = try msm(["session", "revoke", "--principal", "kate", "--nodes", dead, "--timeout-ms", "300"])
            #expect(unreachable.code == 2)
            #expect(unreachable.output.contains("ended 0 sessions"))
            #expect(!unreachable.errors.contains("kate"))
        }
    }

    @Test func sessionShowAndDelete() async throws {
        try await withMemcachedServers(count: 2) { servers in
            var configuration = try SessionManager.Configuration(nodes: nodes(servers))
            configuration.mode = .nonSticky
            let manager = try SessionManager(configuration: configuration)
            let access = manager.beginRequest(path: "/", sessionCookie: nil)
            let session = try access.create()
            try session.set("user", "alice-personal-data")
            try session.set("count", 42)
            let action = try await manager.endRequest(access)
            guard case .set(let id) = action.cookie else {
                Issue.record("no cookie")
                return
            }
            let shown = try msm(["session", "show", id.description, "--nodes", nodes(servers)])
            #expect(shown.code == 0, "\(shown.errors)")
            #expect(shown.output.contains("user") && shown.output.contains("count") && shown.output.contains("version"))
            #expect(!shown.output.contains("alice-personal-data"), "values only with --values")
            let withValues = try msm(["session", "show", id.description, "--nodes", nodes(servers), "--values"])
            #expect(withValues.output.contains("alice-personal-data"))
            let json = try msm(["session", "show", id.description, "--nodes", nodes(servers), "--json"])
            let decoded = try JSONSerialization.jsonObject(with: Data(json.output.utf8)) as? [String: Any]
            #expect((decoded?["attributes"] as? [[String: Any]])?.count == 2)

            #expect(try msm(["session", "show", "not-a-session-id", "--nodes", nodes(servers)]).code == 1)
            let unknown = MemcachedSessionID.generate(nodeID: "n1", route: nil)
            let missing = try msm(["session", "show", unknown.description, "--nodes", nodes(servers)])
            #expect(missing.code == 3)
            #expect(
                try msm(["session", "show", MemcachedSessionID.generate(nodeID: "n9", route: nil).description, "--nodes", nodes(servers)]).code == 1)

            let deleted = try msm(["session", "delete", id.description, "--nodes", nodes(servers)])
            #expect(deleted.code == 0)
            #expect(try msm(["session", "show", id.description, "--nodes", nodes(servers)]).code == 3)
            #expect(try msm(["session", "delete", id.description, "--nodes", nodes(servers)]).code == 3)
        }
    }

    /// `msm keygen` prints keys; `msm session show|delete` read sealed sessions under keyed
    /// storage keys with the applications' key and secret files, and not without them.
    @Test func keygenAndSealedSessions() async throws {
        let generated = try msm(["keygen"])
        #expect(generated.code == 0)
        let key = generated.output.trimmingCharacters(in: .whitespacesAndNewlines)
        #expect(Data(base64Encoded: key)?.count == 32)
        #expect(generated.errors.contains("key id") && !generated.errors.contains(key), "the key id on stderr, never the key")
        #expect(try msm(["keygen"]).output != generated.output)
        let secretText = try msm(["keygen"]).output
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("msm-keys-\(UUID().uuidString)")
        try FileManager.default.createDirectory(at: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(at: directory) }
        let keysFile = directory.appendingPathComponent("session-keys").path
        let secretFile = directory.appendingPathComponent("key-secret").path
        try "\(key)\n".write(toFile: keysFile, atomically: true, encoding: .utf8)
        try secretText.write(toFile: secretFile, atomically: true, encoding: .utf8)

        try await withMemcachedServers(count: 2) { servers in
            var configuration = try SessionManager.Configuration(nodes: nodes(servers))
            configuration.sealing.keys = try SessionKeyRing(keyFile: key)
            configuration.sealing.storageKeySecret = try StorageKeySecret(secretFile: secretText)
            let manager = try SessionManager(configuration: configuration)
            let access = manager.beginRequest(path: "/", sessionCookie: nil)
            try access.create().set("user", "alice-personal-data")
            guard case .set(let id) = try await manager.endRequest(access).cookie else {
                Issue.record("no cookie")
                return
            }
            let sealing = ["--session-keys-file", keysFile, "--key-secret-file", secretFile]
            let shown = try msm(["session", "show", id.description, "--nodes", nodes(servers), "--values"] + sealing)
            #expect(shown.code == 0, "\(shown.errors)")
            #expect(shown.output.contains("alice-personal-data"))
            // Without the secret the keys are elsewhere; without the key ring the copies do not decode.
            #expect(try msm(["session", "show", id.description, "--nodes", nodes(servers)]).code == 3)
            let unopened = try msm(["session", "show", id.description, "--nodes", nodes(servers), "--key-secret-file", secretFile])
            #expect(unopened.code == 3 && unopened.errors.contains("sealed"), "\(unopened.errors)")
            // Bad key files are usage errors that never print a key.
            try "not a key\n".write(toFile: keysFile + ".bad", atomically: true, encoding: .utf8)
            let bad = try msm(["session", "show", id.description, "--nodes", nodes(servers), "--session-keys-file", keysFile + ".bad"])
            #expect(bad.code != 0 && bad.errors.contains("not base64"), "\(bad.errors)")
            #expect(try msm(["session", "delete", id.description, "--nodes", nodes(servers)] + sealing).code == 0)
            #expect(try msm(["session", "show", id.description, "--nodes", nodes(servers)] + sealing).code == 3)
        }
    }

    /// `msm session delete` ends a session the way a logout does: a sticky instance that still
    /// holds it in memory stops serving it at its next check, and does not write it back (a bare
    /// delete looked like a copy lost by a restart, which the instance restored from memory).
    @Test func sessionDeleteIsNotUndoneByAStickyInstance() async throws {
        try await withMemcachedServers(count: 2) { servers in
            var configuration = try SessionManager.Configuration(nodes: nodes(servers))
            configuration.mode = .sticky
            configuration.route = "a"
            configuration.sticky.asynchronousSaving = false
            configuration.sticky.touchInterval = .milliseconds(200)
            let manager = try SessionManager(configuration: configuration)
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await manager.run() }
                func count(_ cookie: String, increment: Bool) async throws -> Int {
                    let access = manager.beginRequest(path: "/counter", sessionCookie: cookie)
                    let session = try await access.load()
                    let value = session?["count", as: Int.self] ?? 0
                    if increment, let session { try session.set("count", value + 1) }
                    _ = try await manager.endRequest(access)
                    return increment && session != nil ? value + 1 : value
                }
                let access = manager.beginRequest(path: "/", sessionCookie: nil)
                try access.create().set("count", 1)
                guard case .set(let id) = try await manager.endRequest(access).cookie else {
                    Issue.record("no cookie")
                    return
                }
                let cookie = id.description
                #expect(try await count(cookie, increment: true) == 2)

                let deleted = try msm(["session", "delete", cookie, "--nodes", nodes(servers)])
                #expect(deleted.code == 0, "\(deleted.errors)")
                // Within one check interval the instance sees the tombstone and drops its copy.
                try await eventually("the sticky instance stops serving the deleted session") {
                    try await count(cookie, increment: true) == 0
                }
                let shown = try msm(["session", "show", cookie, "--nodes", nodes(servers)])
                #expect(shown.code == 3, "nothing written back: \(shown.output)")
                #expect(try await count(cookie, increment: false) == 0)
                group.cancelAll()
            }
        }
    }

    /// The inspection commands in text mode through a memcached-protocol proxy (twemproxy): what
    /// it answers works, `stats` (which it would answer by closing the connection) is refused with
    /// a clear message and never sent.
    @Test func theToolsInTextModeThroughAProxy() async throws {
        try await withProxiedMemcachedServers(count: 2) { proxy, servers in
            let node = "p1:\(proxy.hostAndPort)"
            let nodesOutput = try msm(["nodes", "--nodes", node, "--protocol", "text", "--json"])
            #expect(nodesOutput.code == 0, "\(nodesOutput.errors)")
            let stats = try msm(["stats", "--nodes", node, "--protocol", "text"])
            #expect(stats.code == 2 && stats.errors.contains("does not answer stats"), "\(stats.errors)")
            // A session written through the proxy by an instance in text mode, inspected and ended.
            var configuration = try SessionManager.Configuration(nodes: node)
            configuration.memcached.protocolMode = .text
            let manager = try SessionManager(configuration: configuration)
            let cookie: String = try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await manager.run() }
                defer { group.cancelAll() }
                let access = manager.beginRequest(path: "/", sessionCookie: nil)
                try await access.loadOrCreate().set("count", 7)
                guard case .set(let id) = try await manager.endRequest(access).cookie else { throw RigError("no cookie") }
                return id.description
            }
            let shown = try msm(["session", "show", cookie, "--nodes", node, "--protocol", "text", "--values"])
            #expect(shown.code == 0 && shown.output.contains("count"), "\(shown.errors)")
            let deleted = try msm(["session", "delete", cookie, "--nodes", node, "--protocol", "text"])
            #expect(deleted.code == 0, "\(deleted.errors)")
            #expect(try msm(["session", "show", cookie, "--nodes", node, "--protocol", "text"]).code == 3)
            _ = servers
        }
    }

    /// Starts `msm serve` with `arguments` and `environment`, waits until it listens on `port`.
    /// With `pinnedTo`, under `taskset -c CPUS` (which runs msm in its own process).
    func serve(_ arguments: [String], environment: [String: String] = [:], port: Int, pinnedTo cpus: String? = nil) async throws
        -> Process
    {
        let server = Process()
        var executable = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent().appendingPathComponent("msm")
        if !FileManager.default.isExecutableFile(atPath: executable.path) {
            executable = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
                .deletingLastPathComponent()
                .appendingPathComponent("msm")
        }
        server.executableURL = executable
        server.arguments = ["serve"] + arguments
        if let cpus {
            server.executableURL = URL(fileURLWithPath: "/usr/bin/taskset")
            server.arguments = ["-c", cpus, executable.path, "serve"] + arguments
        }
        server.environment = ProcessInfo.processInfo.environment.merging(environment) { $1 }
        server.standardOutput = FileHandle.nullDevice
        server.standardError = FileHandle.nullDevice
        try server.run()
        let deadline = ContinuousClock.now + .seconds(30)
        while ContinuousClock.now < deadline, !FreePort.accepts(port: port), server.isRunning { try await Task.sleep(for: .milliseconds(50)) }
        return server
    }

    /// `msm serve` runs one event loop per CPU it may run on: pinned to one core (`taskset -c 0`),
    /// one loop (and NIO's loop as the executor), not NIO's one per core of the machine, which
    /// would make two loops take turns on that core. Counted from the process's threads.
    @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/bin/taskset") && ProcessInfo.processInfo.activeProcessorCount > 1
            && ProcessInfo.processInfo.environment["NIO_SINGLETON_GROUP_LOOP_COUNT"] == nil))
    func servePinnedToOneCoreRunsOneEventLoop() async throws {
        func loopThreads(_ pid: Int32) throws -> Int {
            let tasks = try FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/task")
            return tasks.filter { task in
                ((try? String(contentsOfFile: "/proc/\(pid)/task/\(task)/comm", encoding: .utf8)) ?? "").hasPrefix("NIO-SGLTN")
            }.count
        }
        var counts: [Int] = []
        for pinned in [true, false] {
            let port = try FreePort.find()
            let server = try await serve(["--mode", "memory", "--port", "\(port)", "--insecure-cookie"], port: port, pinnedTo: pinned ? "0" : nil)
            defer {
                server.terminate()
                server.waitUntilExit()
            }
            #expect(try await get("http://127.0.0.1:\(port)/counter").status == 200)
            counts.append(try loopThreads(server.processIdentifier))
        }
        #expect(counts[0] == 1, "pinned to one core: \(counts[0]) event loops")
        #expect(counts[1] > 1, "not pinned: NIO's one per core (\(counts[1]))")
    }

    @Test func configChangesARunningInstance() async throws {
        try await withMemcachedServers(count: 2) { servers in
            let port = try FreePort.find()
            let token = "tool-test-token-0123456789"
            let server = try await serve(
                ["--nodes", nodes(servers), "--port", "\(port)", "--metrics"], environment: ["MSM_MANAGEMENT_TOKEN": token], port: port)
            defer {
                server.terminate()
                server.waitUntilExit()
            }
            let instance = "http://127.0.0.1:\(port)"
            let tokenFile = FileManager.default.temporaryDirectory.appendingPathComponent("msm-token-\(port)")
            try (token + "\n").write(to: tokenFile, atomically: true, encoding: .utf8)
            defer { try? FileManager.default.removeItem(at: tokenFile) }

            let shown = try msm(["config", "--instance", instance, "--token-file", tokenFile.path])
            #expect(shown.code == 0, "\(shown.errors)")
            #expect(shown.output.contains("locking         none"))
            let changed = try msm(["config", "--instance", instance, "--token-file", tokenFile.path, "--locking", "all"])
            #expect(changed.code == 0)
            #expect(changed.output.contains("locking         all"))
            let json = try msm(
                ["config", "--instance", instance, "--locking", "auto", "--json"], environment: ["MSM_MANAGEMENT_TOKEN": token])
            #expect(json.code == 0 && json.output.contains("\"locking\":\"auto\""))
            // The old flag still works, with a warning: its value shows in ps.
            let deprecated = try msm(["config", "--instance", instance, "--token", token])
            #expect(deprecated.code == 0 && deprecated.errors.contains("deprecated"))
            #expect(try msm(["config", "--instance", instance], environment: ["MSM_MANAGEMENT_TOKEN": "wrong-token-0123456789"]).code == 1)
            #expect(
                try msm(["config", "--instance", instance, "--locking", "never"], environment: ["MSM_MANAGEMENT_TOKEN": token]).code == 1)
            #expect(try msm(["config", "--instance", "http://127.0.0.1:\(try deadPort())"], environment: ["MSM_MANAGEMENT_TOKEN": token]).code == 2)
            #expect(try msm(["config", "--instance", "not a url"], environment: ["MSM_MANAGEMENT_TOKEN": token]).code == 1)
        }
    }

    /// `msm serve` takes each setting from its flag, else the environment (`MSM_...`), else the
    /// `--config` JSON file, else the default; a value that does not parse is an error, never a
    /// default; a secret given as a flag's value works but is deprecated.
    @Test func serveSettingsComeFromFlagsTheEnvironmentAndAFile() async throws {
        try await withMemcachedServers(count: 2) { servers in
            let port = try FreePort.find()
            let token = "settings-token-0123456789"
            let file = FileManager.default.temporaryDirectory.appendingPathComponent("msm-settings-\(port).json")
            let settings: [String: Any] = [
                "nodes": "n1:127.0.0.1:\(try deadPort())",  // the environment's wins
                "locking": "all", "instance": "from-file", "metrics": true,
                "port": 1,  // the environment's wins
            ]
            try JSONSerialization.data(withJSONObject: settings).write(to: file)
            defer { try? FileManager.default.removeItem(at: file) }
            let server = try await serve(
                ["--config", file.path, "--instance", "from-flag"],
                environment: ["MSM_NODES": nodes(servers), "MSM_PORT": "\(port)", "MSM_MANAGEMENT_TOKEN": token], port: port)
            defer {
                server.terminate()
                server.waitUntilExit()
            }
            #expect(server.isRunning && FreePort.accepts(port: port), "listening on the environment's port")
            let view = try msm(["config", "--instance", "http://127.0.0.1:\(port)", "--json"], environment: ["MSM_MANAGEMENT_TOKEN": token])
            #expect(view.code == 0, "\(view.errors)")
            #expect(view.output.contains("\"locking\":\"all\""), "from the file")
            #expect(view.output.contains("127.0.0.1:\(servers[0].port)"), "the environment's nodes")
            let status = try await get("http://127.0.0.1:\(port)/_msm/status", token: token)
            #expect(status.status == 200 && status.body.contains(#""instance":"from-flag""#), "the flag beats the file")
            #expect(try await get("http://127.0.0.1:\(port)/metrics").status == 401, "metrics behind the management token by default")
            #expect(try await get("http://127.0.0.1:\(port)/metrics", token: token).status == 200)
            // --metrics-public (here from the environment) opts out; the cookie is Secure unless
            // --insecure-cookie.
            let publicPort = try FreePort.find()
            let publicServer = try await serve(
                ["--nodes", nodes(servers), "--port", "\(publicPort)", "--metrics", "--insecure-cookie"],
                environment: ["MSM_MANAGEMENT_TOKEN": token, "MSM_METRICS_PUBLIC": "true"], port: publicPort)
            defer {
                publicServer.terminate()
                publicServer.waitUntilExit()
            }
            #expect(try await get("http://127.0.0.1:\(publicPort)/metrics").status == 200)
            let insecure = try await get("http://127.0.0.1:\(publicPort)/counter")
            #expect(insecure.setCookie.map { !$0.contains("Secure") } == true, "\(insecure.setCookie ?? "no cookie")")
            let secure = try await get("http://127.0.0.1:\(port)/counter")
            #expect(secure.setCookie?.contains("; Secure") == true, "\(secure.setCookie ?? "no cookie")")
            #expect(secure.cacheControl == "no-store", "a response that sets the cookie is not cached")
            // Errors: a value that does not parse, a file that is not there.
            let badPort = try msm(["serve", "--nodes", nodes(servers)], environment: ["MSM_PORT": "eighty"])
            #expect(badPort.code == 1 && badPort.errors.contains("port"), "\(badPort.errors)")
            let badFlag = try msm(["serve", "--config", "/nonexistent/msm.json"])
            #expect(badFlag.code == 1 && badFlag.errors.contains("--config"), "\(badFlag.errors)")
            let deprecated = try msm(["serve", "--management-token", token, "--port", "0"])
            #expect(deprecated.code == 1 && deprecated.errors.contains("deprecated"), "\(deprecated.errors)")
        }
    }
}
#endif

extension ToolTests {
    /// `msm nodes` over TLS and with authentication; each failure exits 2 and says why, never
    /// showing the password.
    @Test func nodesOverTLSAndWithAuthentication() async throws {
        let certificates = try TestCertificates.make()
        defer { certificates.remove() }
        let tlsServer = try await MemcachedServer(extraArguments: TestCertificates.memcachedArguments(certificates.server))
        defer { tlsServer.terminate() }
        let node = "n1:127.0.0.1:\(tlsServer.port)"
        let trusted = try msm(["nodes", "--nodes", node, "--tls-ca-file", certificates.caFile, "--timeout-ms", "2000"])
        #expect(trusted.code == 0 && trusted.output.contains("up"), "\(trusted.errors)")
        let untrusted = try msm(["nodes", "--nodes", node, "--tls-ca-file", certificates.otherCAFile, "--timeout-ms", "2000"])
        #expect(untrusted.code == 2 && untrusted.errors.contains("not trusted"), "\(untrusted.errors)")
        let plain = try msm(["nodes", "--nodes", node, "--timeout-ms", "2000"])
        #expect(plain.code == 2, "a TLS server, a plain client: \(plain.errors)")

        let passwordFile = FileManager.default.temporaryDirectory.appendingPathComponent("msm-auth-\(UUID().uuidString)").path
        try "alice:tool-password-42\n".write(toFile: passwordFile + ".authfile", atomically: true, encoding: .utf8)
        try FileManager.default.setAttributes([.posixPermissions: 0o644], ofItemAtPath: passwordFile + ".authfile")
        defer { try? FileManager.default.removeItem(atPath: passwordFile + ".authfile") }
        defer { try? FileManager.default.removeItem(atPath: passwordFile) }
        let authServer = try await MemcachedServer(extraArguments: ["-Y", passwordFile + ".authfile"])
        defer { authServer.terminate() }
        let authNode = "n1:127.0.0.1:\(authServer.port)"
        try "tool-password-42\n".write(toFile: passwordFile, atomically: true, encoding: .utf8)
        let good = try msm(["nodes", "--nodes", authNode, "--auth-user", "alice", "--auth-password-file", passwordFile])
        #expect(good.code == 0, "\(good.errors)")
        let fromEnvironment = try msm(
            ["stats", "--nodes", authNode, "--auth-user", "alice"], environment: ["MSM_AUTH_PASSWORD": "tool-password-42"])
        #expect(fromEnvironment.code == 0, "\(fromEnvironment.errors)")
        try "wrong-password-43\n".write(toFile: passwordFile, atomically: true, encoding: .utf8)
        let bad = try msm(["nodes", "--nodes", authNode, "--auth-user", "alice", "--auth-password-file", passwordFile])
        #expect(bad.code == 2 && bad.errors.contains("refused the credentials"), "\(bad.errors)")
        #expect(!(bad.output + bad.errors).contains("wrong-password-43"))
        let noPassword = try msm(["nodes", "--nodes", authNode, "--auth-user", "alice"])
        #expect(noPassword.code != 0 && noPassword.code != 2 && noPassword.errors.contains("auth-password-file"), "\(noPassword.errors)")
    }
}

#if Tools
import ArgumentParser
import AsyncHTTPClient
import Foundation
import Memcached
import MemcachedSessions
import NIOCore
import NIOFoundationCompat

/// Exit codes of the tools: 0 all well, 1 bad input or usage, 2 some node (or instance)
/// unreachable, 3 session not found.
enum ToolExit {
    static let badInput = ExitCode(1)
    static let unreachable = ExitCode(2)
    static let notFound = ExitCode(3)
}

/// Writes a line to standard error (progress and diagnostics; results go to standard output).
func note(_ text: String) {
    FileHandle.standardError.write(Data((text + "\n").utf8))
}

/// `--nodes`, shared by the tools that talk to memcached directly.
struct NodeOptions: ParsableArguments {
    @Option(help: "Memcached nodes: n1:host:port,n2:host:port (spaces or commas).")
    var nodes: String = "n1:127.0.0.1:11211"

    @Option(name: .customLong("protocol"), help: "meta, or text for memcached-protocol stores and proxies without meta commands.")
    var protocolMode: MemcachedProtocolMode = .meta

    @Option(help: "How long to wait for each node, in milliseconds.")
    var timeoutMs: Int = 1000

    @Flag(help: "Machine-readable JSON output.")
    var json = false

    @OptionGroup var security: SecurityOptions

    func client() throws -> MemcachedClient {
        do {
            return try MemcachedClient(configuration: try clientConfiguration())
        } catch let error as MemcachedError {
            note("msm: \(error.message)")
            throw ToolExit.badInput
        }
    }

    func clientConfiguration() throws -> MemcachedClient.Configuration {
        let tls = try security.configuration()
        let authentication = try security.authentication()
        do {
            var configuration = try MemcachedClient.Configuration(nodes: nodes)
            configuration.protocolMode = protocolMode
            configuration.tls = tls
            configuration.authentication = authentication
            configuration.requestTimeout = .milliseconds(timeoutMs)
            configuration.connectTimeout = .milliseconds(timeoutMs)
            configuration.failureThreshold = 1000
            return configuration
        } catch {
            note("msm: \(error.message)")
            throw ToolExit.badInput
        }
    }
}

func printJSON(_ value: some Encodable) {
    let encoder = JSONEncoder()
    encoder.outputFormatting = [.prettyPrinted, .sortedKeys]
    if let data = try? encoder.encode(value) { print(String(decoding: data, as: UTF8.self)) }
}

/// An aligned text table.
func table(_ header: [String], _ rows: [[String]]) -> String {
    var widths = header.map(\.count)
    for row in rows {
        for (index, cell) in row.enumerated() where index < widths.count { widths[index] = max(widths[index], cell.count) }
    }
    func line(_ cells: [String]) -> String {
        cells.enumerated().map { index, cell in
            index == cells.count - 1 ? cell : cell.padding(toLength: widths[index], withPad: " ", startingAt: 0)
        }.joined(separator: "  ")
    }
    return ([line(header)] + rows.map(line)).joined(separator: "\n")
}

struct Stats: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Each node's memcached statistics side by side (memcached's own names and numbers).")

    @OptionGroup var options: NodeOptions

    @Option(help: "general, slabs, items, settings, sizes or conns.")
    var group: String = "general"

    func run() async throws {
        let statsGroup: MemcachedStatsGroup
        switch group {
        case "general": statsGroup = .general
        case "slabs": statsGroup = .slabs
        case "items": statsGroup = .items
        case "settings": statsGroup = .settings
        case "sizes": statsGroup = .sizes
        case "conns": statsGroup = .conns
        default:
            note("msm stats: unknown group '\(group)' (general, slabs, items, settings, sizes, conns)")
            throw ToolExit.badInput
        }
        let client = try options.client()
        var results: [(id: String, stats: [MemcachedStat]?)] = []
        for node in client.allNodes {
            do {
                let stats = try await node.stats(statsGroup)
                note("msm stats: \(node.id) (\(node.address.hostAndPort)): \(stats.count) values")
                results.append((node.id, stats))
            } catch where error.code == .unsupportedInProtocolMode {
                // A memcached-protocol proxy without stats (the command would close its connection).
                note("msm stats: \(node.id) (\(node.address.hostAndPort)) does not answer stats (a proxy?): ask the servers behind it")
                results.append((node.id, nil))
            } catch {
                note("msm stats: \(node.id) (\(node.address.hostAndPort)) unreachable: \(error.code)")
                results.append((node.id, nil))
            }
        }
        let unreachable = results.filter { $0.stats == nil }.map(\.id)
        if options.json {
            struct Output: Encodable {
                var group: String
                var nodes: [String: [String: String]]
                var unreachable: [String]
            }
            var nodes: [String: [String: String]] = [:]
            for (id, stats) in results {
                guard let stats else { continue }
                nodes[id] = Dictionary(stats.map { ($0.name, $0.value) }, uniquingKeysWith: { first, _ in first })
            }
            printJSON(Output(group: group, nodes: nodes, unreachable: unreachable))
        } else {
            var names: [String] = []
            var seen = Set<String>()
            for (_, stats) in results {
                for stat in stats ?? [] where seen.insert(stat.name).inserted { names.append(stat.name) }
            }
            let rows = names.map { name in
                [name]
                    + results.map { result in
                        guard let stats = result.stats else { return "unreachable" }
                        return stats.first { $0.name == name }?.value ?? "-"
                    }
            }
            print(table(["stat"] + results.map(\.id), rows))
        }
        if !unreachable.isEmpty { throw ToolExit.unreachable }
    }
}

struct Nodes: AsyncParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Checks each node: availability, version, round-trip latency.")

    @OptionGroup var options: NodeOptions

    func run() async throws {
        let client = try options.client()
        struct Row: Encodable {
            var id: String
            var address: String
            var available: Bool
            var version: String?
            var latencyMicroseconds: Int?
            var error: String?
        }
        var rows: [Row] = []
        for node in client.allNodes {
            do {
                let version = try await node.version()
                // A second round trip on the now open connection: the latency without the connect.
                let ping = ContinuousClock.now
                try await node.noop()
                let latency = ContinuousClock.now - ping
                let micros = Int(latency.components.seconds * 1_000_000 + latency.components.attoseconds / 1_000_000_000_000)
                rows.append(
                    Row(id: node.id, address: node.address.hostAndPort, available: true, version: version, latencyMicroseconds: micros))
                note("msm nodes: \(node.id) up")
            } catch {
                rows.append(Row(id: node.id, address: node.address.hostAndPort, available: false, error: "\(error.code)"))
                // The reason (a certificate not trusted, a name mismatch, a plaintext server,
                // credentials refused...): the client's messages carry no key, value or password.
                note("msm nodes: \(node.id) unreachable: \(error.code): \(error.message)")
            }
        }
        if options.json {
            printJSON(["nodes": rows])
        } else {
            print(
                table(
                    ["node", "address", "state", "version", "latency"],
                    rows.map { row in
                        [
                            row.id, row.address, row.available ? "up" : "unreachable (\(row.error ?? "?"))", row.version ?? "-",
                            row.latencyMicroseconds.map { "\($0) µs" } ?? "-",
                        ]
                    }))
        }
        if rows.contains(where: { !$0.available }) { throw ToolExit.unreachable }
    }
}

/// What `msm session show|delete` act on: a session id, the nodes, the key prefix.
struct SessionTarget: ParsableArguments {
    @Argument(help: "The session id (the cookie's value).")
    var id: String

    @OptionGroup var options: NodeOptions

    @Option(help: "The applications' key prefix (keyPrefix).")
    var keyPrefix: String = SessionManager.Configuration.defaultKeyPrefix

    @OptionGroup var sealing: SealingOptions

    /// The parsed id and its keys; a malformed id is bad input.
    func parse(command: String) throws -> (MemcachedSessionID, SessionKeys) {
        guard let sessionID = MemcachedSessionID(parsing: id) else {
            note(
                "msm session \(command): '\(id)' is not a session id (32 upper-case hex digits, '-', a node id, optionally '.' and a route)"
            )
            throw ToolExit.badInput
        }
        return (sessionID, SessionKeys(token: sessionID.token, prefix: keyPrefix, secret: try sealing.sealing().storageKeySecret))
    }
}

struct SessionCommand: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "session", abstract: "Inspect or delete a stored session, or revoke every session of a user.",
        subcommands: [Show.self, Delete.self, Revoke.self])

    struct Revoke: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract:
                "Ends every session of a principal (after a password change) on every node, as SessionManager.invalidateAll(principal:) does; prints how many.",
            discussion: "Exit 0 when the principal's index was read and emptied; 2 when it could not be (the count ended so far is printed).")

        @Option(help: "The principal whose sessions end (as the application named it with setPrincipal).")
        var principal: String

        @OptionGroup var options: NodeOptions

        @Option(help: "The applications' key prefix (keyPrefix).")
        var keyPrefix: String = SessionManager.Configuration.defaultKeyPrefix

        @OptionGroup var sealing: SealingOptions

        func run() async throws {
            var configuration = try SessionManager.Configuration(nodes: options.nodes)
            configuration.memcached = try options.clientConfiguration()
            configuration.keyPrefix = keyPrefix
            configuration.sealing = try sealing.sealing()
            let client = try MemcachedClient(configuration: configuration.memcached)
            let manager = try SessionManager(configuration: configuration, client: client)
            let outcome: Result<Int, SessionError> = await withTaskGroup(of: Void.self) { group in
                group.addTask { try? await client.run() }
                defer { group.cancelAll() }
                do throws(SessionError) {
                    return .success(try await manager.invalidateAll(principal: principal))
                } catch {
                    return .failure(error)
                }
            }
            switch outcome {
            case .success(let ended):
                if options.json { printJSON(["ended": ended]) } else { print("ended \(ended) session\(ended == 1 ? "" : "s")") }
            case .failure(let error):
                let ended = error.sessionsEnded ?? 0
                if options.json { printJSON(["ended": ended]) } else { print("ended \(ended) session\(ended == 1 ? "" : "s")") }
                note("msm session revoke: \(error.message)")
                throw ToolExit.unreachable
            }
        }
    }

    struct Show: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Decodes a stored session: metadata, attribute names and sizes (values with --values), and where its copies are.")

        @OptionGroup var target: SessionTarget
        var options: NodeOptions { target.options }

        @Flag(help: "Also print the attribute values (they may be personal data).")
        var values = false

        func run() async throws {
            let (sessionID, keys) = try target.parse(command: "show")
            let id = target.id
            let client = try options.client()
            guard (try? client.node(sessionID.nodeID)) != nil else {
                note("msm session show: the id names node '\(sessionID.nodeID)', which is not among --nodes")
                throw ToolExit.badInput
            }
            struct Copy: Encodable {
                var node: String
                var kind: String
                var bytes: Int
            }
            let inspection = await SessionManager.inspectStored(keys: keys, on: client, keyRing: try target.sealing.sealing().keys)
            func described(_ copy: StoredSessionInspection.Copy) -> Copy {
                let kind = copy.isPrimary ? "primary" : "backup"
                return Copy(node: copy.nodeID, kind: copy.isTombstone ? "\(kind) tombstone (invalidated)" : kind, bytes: copy.bytes)
            }
            let copies = inspection.copies.map(described)
            let unreachable = inspection.unreachableNodes
            for (node, error) in inspection.unreachable { note("msm session show: \(node) unreachable: \(error.code)") }
            if inspection.undecodable > 0 {
                note(
                    "msm session show: \(inspection.undecodable) cop\(inspection.undecodable == 1 ? "y" : "ies") not in the binary session format (another codec, damaged, sealed: --session-keys-file, or sealed with another key)"
                )
            }
            let invalidated = inspection.isInvalidated
            guard let (record, newestCopy) = inspection.newest else {
                note(
                    invalidated
                        ? "msm session show: the session was invalidated"
                        : "msm session show: no stored copy of this session\(unreachable.isEmpty ? "" : " on the nodes that answered")")
                throw unreachable.isEmpty || invalidated ? ToolExit.notFound : ToolExit.unreachable
            }
            let recordCopy: Copy? = described(newestCopy)
            let metadata = record.metadata
            func date(_ milliseconds: Int64) -> String {
                Date(timeIntervalSince1970: TimeInterval(milliseconds) / 1000).formatted(.iso8601)
            }
            struct Attribute: Encodable {
                var name: String
                var bytes: Int
                var value: String?
            }
            let attributes = record.attributes.sorted { $0.key < $1.key }.map { name, value in
                Attribute(name: name, bytes: value.readableBytes, value: values ? String(buffer: value) : nil)
            }
            if options.json {
                struct Output: Encodable {
                    var id: String
                    var createdAt: String
                    var lastAccessedAt: String
                    var idleTimeoutSeconds: Int64
                    var absoluteTimeoutSeconds: Int64
                    var version: UInt64
                    var decodedFrom: String
                    var attributes: [Attribute]
                    var copies: [Copy]
                    var unreachable: [String]
                }
                printJSON(
                    Output(
                        id: id, createdAt: date(metadata.createdAt), lastAccessedAt: date(metadata.lastAccessedAt),
                        idleTimeoutSeconds: metadata.idleTimeoutSeconds, absoluteTimeoutSeconds: metadata.absoluteTimeoutSeconds,
                        version: metadata.version, decodedFrom: "\(recordCopy?.node ?? "-") \(recordCopy?.kind ?? "-")",
                        attributes: attributes, copies: copies, unreachable: unreachable))
            } else {
                print("session        \(id)")
                print("created        \(date(metadata.createdAt))")
                print("last saved     \(date(metadata.lastAccessedAt))")
                print("idle timeout   \(metadata.idleTimeoutSeconds > 0 ? "\(metadata.idleTimeoutSeconds) s" : "none")")
                print("absolute       \(metadata.absoluteTimeoutSeconds > 0 ? "\(metadata.absoluteTimeoutSeconds) s" : "none")")
                print("version        \(metadata.version) (from \(recordCopy?.node ?? "-") \(recordCopy?.kind ?? "-"))")
                print("copies         " + copies.map { "\($0.node) \($0.kind) \($0.bytes) bytes" }.joined(separator: ", "))
                print("")
                print(
                    table(
                        values ? ["attribute", "bytes", "value"] : ["attribute", "bytes"],
                        attributes.map { values ? [$0.name, "\($0.bytes)", $0.value ?? ""] : [$0.name, "\($0.bytes)"] }))
            }
            if !unreachable.isEmpty { throw ToolExit.unreachable }
        }
    }

    struct Delete: AsyncParsableCommand {
        static let configuration = CommandConfiguration(
            abstract: "Ends a session as a logout does: every copy (primary, backups, lock) on every node, tombstoned.")

        @OptionGroup var target: SessionTarget
        var options: NodeOptions { target.options }

        func run() async throws {
            let (_, keys) = try target.parse(command: "delete")
            let id = target.id
            let client = try options.client()
            // Tombstones, as a logout leaves them: a sticky instance holding the session in
            // memory must not take a bare delete for a copy lost by a restart and write it back.
            let outcome = await SessionManager.invalidateStored(keys: keys, on: client)
            let deleted = outcome.copiesEnded
            let unreachable = outcome.unreachableNodes
            if options.json {
                printJSON(["deleted": "\(deleted)", "unreachable": unreachable.joined(separator: ",")])
            } else {
                print("deleted \(deleted) cop\(deleted == 1 ? "y" : "ies") of \(id)")
            }
            if !unreachable.isEmpty {
                note("msm session delete: unreachable: \(unreachable.joined(separator: ", "))")
                throw ToolExit.unreachable
            }
            if deleted == 0 { throw ToolExit.notFound }
        }
    }
}

struct Config: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Shows or changes a running instance's settings (nodes, failover nodes, locking, enabled) without a restart.")

    @Option(help: "The instance's base URL, e.g. http://127.0.0.1:18081")
    var instance: String

    @Option(help: "A file holding the instance's management token (or MSM_MANAGEMENT_TOKEN).")
    var tokenFile: String?

    @Option(help: ArgumentHelp("Deprecated: the token shows in ps; use MSM_MANAGEMENT_TOKEN or --token-file.", visibility: .hidden))
    var token: String?

    @Option(help: "New node list: n1:host:port,n2:host:port. Removed nodes drain; added nodes take new sessions.")
    var nodes: String?

    @Option(help: "New failover node ids, comma-separated (empty for none).")
    var failoverNodes: String?

    @Option(help: "New locking mode: none, all, auto or uriPattern:<regex>.")
    var locking: String?

    @Option(help: "Enable or disable memcached: true or false.")
    var enabled: Bool?

    @Flag(help: "Machine-readable JSON output.")
    var json = false

    func run() async throws {
        guard let base = URL(string: instance), base.scheme == "http" || base.scheme == "https", base.host != nil else {
            note("msm config: --instance must be an http(s) URL such as http://127.0.0.1:18081")
            throw ToolExit.badInput
        }
        if token != nil { note("msm config: --token is deprecated (its value shows in ps): use MSM_MANAGEMENT_TOKEN or --token-file") }
        var fromFile: String? = nil
        if let tokenFile {
            do {
                fromFile = try readSecretFile(tokenFile, flag: "token-file")
            } catch {
                note("msm config: \(error)")
                throw ToolExit.badInput
            }
        }
        guard let token = fromFile ?? token ?? ProcessInfo.processInfo.environment["MSM_MANAGEMENT_TOKEN"] else {
            note("msm config: a management token is needed (MSM_MANAGEMENT_TOKEN or --token-file)")
            throw ToolExit.badInput
        }
        let change = SessionManager.RuntimeChange(
            nodes: nodes,
            failoverNodes: failoverNodes.map { $0.split(whereSeparator: { $0 == "," || $0 == " " }).map(String.init) },
            locking: locking, enabled: enabled)
        let changes = change != SessionManager.RuntimeChange()
        var request = HTTPClientRequest(url: instance.trimmingCharacters(in: CharacterSet(charactersIn: "/")) + "/_msm/config")
        request.headers.add(name: "Authorization", value: "Bearer \(token)")
        if changes {
            request.method = .PUT
            request.headers.add(name: "Content-Type", value: "application/json")
            request.body = .bytes(ByteBuffer(data: try JSONEncoder().encode(change)))
            note("msm config: applying \(String(decoding: try JSONEncoder().encode(change), as: UTF8.self)) to \(instance)")
        }
        let client = HTTPClient(eventLoopGroupProvider: .singleton)
        let status: UInt
        let body: String
        do {
            let response = try await client.execute(request, timeout: .seconds(10))
            status = response.status.code
            body = String(buffer: try await response.body.collect(upTo: 1 << 20))
            try? await client.shutdown()
        } catch {
            try? await client.shutdown()
            note("msm config: \(instance) unreachable: \(error)")
            throw ToolExit.unreachable
        }
        guard status == 200 else {
            note("msm config: \(instance) answered \(status): \(body)")
            throw ToolExit.badInput
        }
        if json {
            print(body)
            return
        }
        guard let view = try? JSONDecoder().decode(SessionManager.RuntimeView.self, from: Data(body.utf8)) else {
            print(body)
            return
        }
        print("mode            \(view.mode)")
        print("nodes           \(view.nodes)")
        print("failover nodes  \(view.failoverNodes.isEmpty ? "-" : view.failoverNodes.joined(separator: ","))")
        print("draining        \(view.drainingNodes.isEmpty ? "-" : view.drainingNodes.joined(separator: ","))")
        print("locking         \(view.locking)")
        print("enabled         \(view.enabled)")
    }
}
#endif

import Foundation
import MemcachedTestRig
import NIOCore
import NIOSSL
import Testing

@testable import Memcached

/// TLS to real memcached processes (`-Z`, certificates made by `openssl` for each suite run).
@Suite("TLS to memcached", .serialized)
struct TLSTests {
    /// A client trusting `ca` (and presenting `client`), `host` as the node's address.
    static func tls(
        trusting ca: String, client: TestCertificates.Pair? = nil, serverName: String? = nil
    ) throws -> MemcachedClient.Configuration.TLS {
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.trustRoots = .file(ca)
        configuration.minimumTLSVersion = .tlsv12
        if let client {
            configuration.certificateChain = try NIOSSLCertificate.fromPEMFile(client.certificate).map { .certificate($0) }
            configuration.privateKey = .privateKey(try NIOSSLPrivateKey(file: client.key, format: .pem))
        }
        return try .enable(configuration, serverName: serverName)
    }

    /// TLS that checks nothing: only to read a test server's counters past its bad certificate.
    static func unverified() throws -> MemcachedClient.Configuration.TLS {
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.certificateVerification = .none
        return try .enable(configuration)
    }

    static func withTLSServer(
        _ pair: TestCertificates.Pair, requiringClientsOf clientCA: String? = nil, _ body: (MemcachedServer) async throws -> Void
    ) async throws {
        let server = try await MemcachedServer(extraArguments: TestCertificates.memcachedArguments(pair, requiringClientsOf: clientCA))
        defer { server.terminate() }
        try await body(server)
    }

    /// A client with `tls` on one node at `host`; `body` gets it and its node.
    static func withClient(
        port: Int, host: String = "127.0.0.1", tls: MemcachedClient.Configuration.TLS, mode: MemcachedProtocolMode = .meta,
        _ body: (MemcachedClient, MemcachedNodeClient) async throws -> Void
    ) async throws {
        var configuration = MemcachedClient.Configuration(nodes: [MemcachedNodeAddress(id: "n1", host: host, port: port)])
        configuration.protocolMode = mode
        configuration.tls = tls
        configuration.connectTimeout = .seconds(2)
        configuration.requestTimeout = .seconds(5)
        configuration.failureThreshold = 1
        configuration.probeInterval = .milliseconds(200)
        let client = try MemcachedClient(configuration: configuration)
        try await withThrowingTaskGroup(of: Void.self) { group in
            group.addTask { try await client.run() }
            defer { group.cancelAll() }
            try await body(client, try client.node("n1"))
        }
    }

    /// Every kind of command over TLS, in both protocols, by IP address and by name, pipelined.
    @Test(arguments: MemcachedProtocolMode.allCases)
    func everyCommandOverTLS(mode: MemcachedProtocolMode) async throws {
        let certificates = try TestCertificates.make()
        defer { certificates.remove() }
        try await Self.withTLSServer(certificates.server) { server in
            for host in ["127.0.0.1", "localhost"] {
                try await Self.withClient(port: server.port, host: host, tls: try Self.tls(trusting: certificates.caFile), mode: mode) {
                    client, node in
                    try await client.set("k", value: "v1")
                    #expect(try await client.get("k").map { String(buffer: $0.value) } == "v1")
                    #expect(try await client.add("k", value: ByteBuffer(string: "no")) == false)
                    let item = try #require(try await client.get("k"))
                    if let cas = item.cas {  // text mode's get carries none
                        #expect(try await client.compareAndSwap("k", value: ByteBuffer(string: "v2"), cas: cas) != .exists)
                    }
                    #expect(try await client.touch("k", ttl: .seconds(60)))
                    try await client.set("n", value: "5")
                    #expect(try await client.increment("n", by: 2) == 7)
                    #expect(try await client.delete("k") == .deleted)
                    #expect(try await client.get("k") == nil)
                    #expect(try await node.stats().contains { $0.name == "pid" })
                    // Many requests in flight on the pipelined connections, values past one TLS record.
                    let big = ByteBuffer(repeating: 0x61, count: 40_000)
                    try await withThrowingTaskGroup(of: Void.self) { group in
                        for index in 0..<200 {
                            group.addTask {
                                try await client.set("p\(index)", value: big)
                                let read = try await client.get("p\(index)")
                                #expect(read?.value == big)
                            }
                        }
                        try await group.waitForAll()
                    }
                }
            }
        }
    }

    /// A large pipelined batch of sets on one connection is answered in full. memcached before
    /// 1.6.39 leaves the tail of a TLS record decrypted inside OpenSSL when it reads a value past
    /// its read buffer, and answers nothing more until more bytes arrive: without the client's
    /// trailer record, the last sets of the batch time out (seen with 1.6.18: 200 sets of 1,100
    /// bytes in one write get about 190 replies).
    @Test(arguments: MemcachedProtocolMode.allCases)
    func aLargePipelinedBatchOfSetsIsAnsweredInFull(mode: MemcachedProtocolMode) async throws {
        let certificates = try TestCertificates.make()
        defer { certificates.remove() }
        try await Self.withTLSServer(certificates.server) { server in
            var configuration = MemcachedClient.Configuration(nodes: [MemcachedNodeAddress(id: "n1", host: "127.0.0.1", port: server.port)])
            configuration.protocolMode = mode
            configuration.tls = try Self.tls(trusting: certificates.caFile)
            configuration.connectionsPerNode = 1
            configuration.connectTimeout = .seconds(2)
            configuration.requestTimeout = .seconds(3)
            let client = try MemcachedClient(configuration: configuration)
            try await withThrowingTaskGroup(of: Void.self) { group in
                group.addTask { try await client.run() }
                defer { group.cancelAll() }
                let value = ByteBuffer(repeating: 0x62, count: 1_100)
                try await client.set("warm", value: value)
                for round in 0..<3 {
                    let failures = await withTaskGroup(of: Int.self) { batch in
                        for index in 0..<500 {
                            batch.addTask {
                                do {
                                    try await client.set("b\(round)-\(index)", value: value)
                                    return 0
                                } catch {
                                    return 1
                                }
                            }
                        }
                        return await batch.reduce(0, +)
                    }
                    #expect(failures == 0, "round \(round): \(failures) of 500 sets failed")
                }
                #expect(try await client.get("b2-499")?.value == value)
            }
        }
    }

    /// A configured server name: a certificate for `localhost` only, reached at 127.0.0.1, is
    /// accepted when the configuration names `localhost`.
    @Test func aConfiguredServerName() async throws {
        let certificates = try TestCertificates.make()
        defer { certificates.remove() }
        try await Self.withTLSServer(certificates.localhostOnly) { server in
            try await Self.withClient(port: server.port, tls: try Self.tls(trusting: certificates.caFile, serverName: "localhost")) {
                client, _ in
                try await client.set("k", value: "v")
            }
        }
    }

    /// Mutual TLS: a server that requires a client certificate signed by its CA serves a client that
    /// presents one, and refuses one that does not with a typed error, the node marked down.
    @Test func mutualTLS() async throws {
        let certificates = try TestCertificates.make()
        defer { certificates.remove() }
        try await Self.withTLSServer(certificates.server, requiringClientsOf: certificates.caFile) { server in
            try await Self.withClient(port: server.port, tls: try Self.tls(trusting: certificates.caFile, client: certificates.client)) {
                client, _ in
                try await client.set("k", value: "v")
                #expect(try await client.get("k") != nil)
            }
            try await Self.withClient(port: server.port, tls: try Self.tls(trusting: certificates.caFile)) { client, node in
                let error = await memcachedError { _ = try await client.get("k") }
                #expect(error?.code == .tlsFailed, "\(String(describing: error))")
                #expect(!node.isAvailable)
            }
        }
    }

    /// Each way a handshake can fail is a `tlsFailed` error saying why, within the connect timeout;
    /// the node is marked down, and the client does not hammer it (reconnections back off).
    @Test(arguments: ["wrong CA", "expired", "wrong name", "wrong server name", "plaintext server"])
    func aFailedHandshakeIsATypedErrorAndMarksTheNodeDown(_ fault: String) async throws {
        let certificates = try TestCertificates.make()
        defer { certificates.remove() }
        let trusted = try Self.tls(trusting: certificates.caFile)
        let (pair, tls, expected): (TestCertificates.Pair?, MemcachedClient.Configuration.TLS, String) =
            switch fault {
            case "wrong CA": (certificates.foreign, trusted, "not trusted")
            case "expired": (certificates.expired, trusted, "not trusted")
            case "wrong name": (certificates.wrongName, trusted, "name does not match")
            case "wrong server name":
                (certificates.localhostOnly, try Self.tls(trusting: certificates.caFile, serverName: "other.example"), "name does not match")
            default: (nil, trusted, "does not speak TLS")
            }
        let server = try await MemcachedServer(extraArguments: pair.map { TestCertificates.memcachedArguments($0) } ?? [])
        defer { server.terminate() }
        try await Self.withClient(port: server.port, tls: tls) { client, node in
            let started = ContinuousClock.now
            let error = await memcachedError { _ = try await client.get("k") }
            #expect(ContinuousClock.now - started < .seconds(2), "within the connect timeout")
            #expect(error?.code == .tlsFailed, "\(String(describing: error))")
            #expect(error?.message.contains(expected) == true, "\(String(describing: error))")
            #expect(!node.isAvailable, "marked down")
            // No retry storm: a second of requests makes a handful of connection attempts.
            let before = try await Self.connections(server, tls: pair == nil ? nil : try Self.unverified())
            let end = ContinuousClock.now + .seconds(1)
            var refused = 0
            while ContinuousClock.now < end {
                if await memcachedError({ _ = try await client.get("k") }) != nil { refused += 1 }
            }
            let after = try await Self.connections(server, tls: pair == nil ? nil : try Self.unverified())
            #expect(refused > 100, "requests fail fast: \(refused)")
            // One for the count itself; the probe every 200 ms, and a backed-off reconnection or two.
            #expect(after - before <= 10, "\(after - before) connections in a second")
        }
    }

    /// A TLS server behind a plain configuration: a typed error within the timeout, not a hang.
    @Test func aTLSServerBehindAPlainConfigurationFails() async throws {
        let certificates = try TestCertificates.make()
        defer { certificates.remove() }
        try await Self.withTLSServer(certificates.server) { server in
            try await Self.withClient(port: server.port, tls: .disable) { client, node in
                let started = ContinuousClock.now
                let error = await memcachedError { _ = try await client.get("k") }
                #expect(ContinuousClock.now - started < .seconds(5))
                #expect(error != nil && error!.isNodeFailure, "\(String(describing: error))")
                #expect(!node.isAvailable)
            }
        }
    }

    /// memcached's `total_connections`, read over a connection of its own (TLS with a client that
    /// trusts the server's CA, when `tls` is set).
    static func connections(_ server: MemcachedServer, tls: MemcachedClient.Configuration.TLS?) async throws -> Int {
        var total = 0
        try await withClient(port: server.port, tls: tls ?? .disable) { _, node in
            total = try await totalConnections(node)
        }
        return total
    }
}

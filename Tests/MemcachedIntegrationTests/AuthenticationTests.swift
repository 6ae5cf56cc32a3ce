import Foundation
import MemcachedTestRig
import NIOCore
import Testing

@testable import Memcached

/// memcached's text/meta authentication (`-Y authfile`) against real memcached processes.
@Suite("Authentication to memcached", .serialized)
struct AuthenticationTests {
    static let password = "correct-horse:battery-staple"

    /// A memcached requiring `alice` and ``password`` (the file removed when `body` ends).
    static func withAuthenticatingServer(
        extraArguments: [String] = [], _ body: (MemcachedServer) async throws -> Void
    ) async throws {
        let file = FileManager.default.temporaryDirectory.appendingPathComponent("msm-auth-\(UUID().uuidString)").path
        try "alice:\(password)\n".write(toFile: file, atomically: true, encoding: .utf8)
        try FileManager.default.setAttributes([.posixPermissions: 0o644], ofItemAtPath: file)  // memcached reads it as nobody
        defer { try? FileManager.default.removeItem(atPath: file) }
        let server = try await MemcachedServer(extraArguments: ["-Y", file] + extraArguments)
        defer { server.terminate() }
        try await body(server)
    }

    static func withClient(
        _ server: MemcachedServer, mode: MemcachedProtocolMode = .meta,
        authentication: MemcachedClient.Configuration.Authentication?,
        tls: MemcachedClient.Configuration.TLS = .disable,
        _ body: (MemcachedClient, MemcachedNodeClient) async throws -> Void
    ) async throws {
        var configuration = MemcachedClient.Configuration(nodes: [MemcachedNodeAddress(id: "n1", host: "127.0.0.1", port: server.port)])
        configuration.protocolMode = mode
        configuration.authentication = authentication
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

    /// Every connection authenticates first, reconnections after a restart included, in both protocols.
    @Test(arguments: MemcachedProtocolMode.allCases)
    func credentialsOnEveryConnection(mode: MemcachedProtocolMode) async throws {
        try await Self.withAuthenticatingServer { server in
            let alice = MemcachedClient.Configuration.Authentication(username: "alice", password: Self.password)
            try await Self.withClient(server, mode: mode, authentication: alice) { client, node in
                try await client.set("k", value: "v")
                #expect(try await client.get("k").map { String(buffer: $0.value) } == "v")
                #expect(try await node.stats().contains { $0.name == "pid" })
                try await server.restart()
                try await eventually("reconnected and authenticated again") {
                    (try? await client.set("k", value: "again")) != nil
                }
                #expect(try await client.get("k").map { String(buffer: $0.value) } == "again")
            }
        }
    }

    /// Wrong credentials: a typed error naming the user, never the password; the node marked down;
    /// no retry storm. No credentials at all: memcached's refusal, a typed error too.
    @Test func wrongOrMissingCredentials() async throws {
        try await Self.withAuthenticatingServer { server in
            let wrong = MemcachedClient.Configuration.Authentication(username: "alice", password: "not-the-password-1234")
            try await Self.withClient(server, authentication: wrong) { client, node in
                let started = ContinuousClock.now
                let error = await memcachedError { _ = try await client.get("k") }
                #expect(ContinuousClock.now - started < .seconds(2))
                #expect(error?.code == .authenticationFailed, "\(String(describing: error))")
                #expect(error?.message.contains("alice") == true)
                #expect(error.map { !"\($0)".contains("not-the-password-1234") } == true, "no password in the error")
                #expect(!node.isAvailable)
                let before = try await Self.connections(server)
                let end = ContinuousClock.now + .seconds(1)
                var refused = 0
                while ContinuousClock.now < end {
                    if await memcachedError({ _ = try await client.get("k") }) != nil { refused += 1 }
                }
                let after = try await Self.connections(server)
                #expect(refused > 100, "requests fail fast: \(refused)")
                #expect(after - before <= 10, "\(after - before) connections in a second")
            }
            try await Self.withClient(server, authentication: nil) { client, _ in
                let error = await memcachedError { _ = try await client.get("k") }
                #expect(error != nil && "\(error!)".contains("unauthenticated"), "\(String(describing: error))")
            }
        }
    }

    /// TLS and authentication together: the credentials go inside the TLS session.
    @Test func authenticationOverTLS() async throws {
        let certificates = try TestCertificates.make()
        defer { certificates.remove() }
        try await Self.withAuthenticatingServer(extraArguments: TestCertificates.memcachedArguments(certificates.server)) { server in
            let alice = MemcachedClient.Configuration.Authentication(username: "alice", password: Self.password)
            try await Self.withClient(server, authentication: alice, tls: try TLSTests.tls(trusting: certificates.caFile)) { client, _ in
                try await client.set("k", value: "v")
                #expect(try await client.get("k") != nil)
            }
        }
    }

    /// The password shows nowhere: not in the configuration's description or mirror; credentials
    /// that could break the command line are refused before anything is sent.
    @Test func thePasswordIsNeverShown() throws {
        let alice = MemcachedClient.Configuration.Authentication(username: "alice", password: "hunter2-secret")
        #expect(!"\(alice)".contains("hunter2"))
        #expect(!String(reflecting: alice).contains("hunter2"))
        var dumped = ""
        dump(alice, to: &dumped)
        #expect(!dumped.contains("hunter2"))
        var configuration = MemcachedClient.Configuration(nodes: [MemcachedNodeAddress(id: "n1", host: "127.0.0.1", port: 1)])
        configuration.authentication = alice
        #expect(!"\(configuration)".contains("hunter2") && !String(reflecting: configuration).contains("hunter2"))
        for (user, password) in [("alice", "a\r\nflush_all"), ("al ice", "x"), ("", "x"), ("alice", ""), ("alice", "two words")] {
            configuration.authentication = .init(username: user, password: password)
            #expect(throws: MemcachedError.self) { try configuration.validate() }
        }
    }

    static func connections(_ server: MemcachedServer) async throws -> Int {
        var total = 0
        let alice = MemcachedClient.Configuration.Authentication(username: "alice", password: password)
        try await withClient(server, authentication: alice) { _, node in
            total = Int(try await node.stats().first { $0.name == "total_connections" }?.value ?? "") ?? -1
        }
        return total
    }
}

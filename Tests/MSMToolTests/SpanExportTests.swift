#if Tools && OpenTelemetry
import Foundation
#if canImport(FoundationNetworking)
import FoundationNetworking
#endif
import Hummingbird
import Logging
import MemcachedTestRig
import Synchronization
import Testing

extension ToolTests {
    /// `msm serve --otel` sends its spans to an OTLP/HTTP collector (here a Hummingbird route that
    /// keeps the request bodies): the framework's request span, the session's load and save and
    /// their memcached round trips, named in the protobuf bodies, never the session's id. The batch
    /// delay is long: every span goes out at the graceful shutdown (SIGTERM), none is dropped.
    @Test(arguments: ["hummingbird", "vapor"])
    func serveExportsItsSpansOverOTLP(framework: String) async throws {
        let bodies = Mutex<[Data]>([])
        let router = Router()
        router.post("v1/traces") { request, _ -> Response in
            let body = try await request.body.collect(upTo: 16 << 20)
            bodies.withLock { $0.append(Data(body.readableBytesView)) }
            return Response(status: .ok)
        }
        let collectorPort = try FreePort.find()
        var quiet = Logger(label: "otlp-collector")
        quiet.logLevel = .critical  // its cancellation at the end is not news
        let collector = Application(
            router: router, configuration: .init(address: .hostname("127.0.0.1", port: collectorPort)), logger: quiet)
        let collecting = Task { try await collector.run() }
        defer { collecting.cancel() }
        try await eventually("the collector listens") { FreePort.accepts(port: collectorPort) }
        func received() -> Data { bodies.withLock { $0.reduce(into: Data()) { $0.append($1) } } }
        func contains(_ text: String) -> Bool { received().range(of: Data(text.utf8)) != nil }

        try await withMemcachedServers(count: 2) { servers in
            let port = try FreePort.find()
            let server = try await serve(
                ["--framework", framework, "--nodes", nodes(servers), "--port", "\(port)", "--otel", "--instance", "traced"],
                environment: [
                    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:\(collectorPort)/v1/traces",
                    "OTEL_BSP_SCHEDULE_DELAY": "600000",
                ],
                port: port)
            defer { if server.isRunning { server.terminate() } }
            // Two requests of one session: created and saved, then loaded and saved again. The
            // cookie is sent by hand (no cookie storage).
            let configuration = URLSessionConfiguration.ephemeral
            configuration.httpShouldSetCookies = false
            let browser = URLSession(configuration: configuration)
            var request = URLRequest(url: URL(string: "http://127.0.0.1:\(port)/counter")!)
            let (_, first) = try await browser.data(for: request)
            let setCookie = try #require((first as? HTTPURLResponse)?.value(forHTTPHeaderField: "Set-Cookie"))
            let cookie = String(setCookie.prefix { $0 != ";" })
            request.setValue(cookie, forHTTPHeaderField: "Cookie")
            let (body, _) = try await browser.data(for: request)
            #expect(String(decoding: body, as: UTF8.self) == "2")
            #expect(received().isEmpty, "batched for 10 minutes")
            server.terminate()
            server.waitUntilExit()
            #expect(server.terminationStatus == 0)
            try await eventually("the spans reached the collector") {
                contains("session.load") && contains("session.save") && contains("memcached ") && contains("/counter")
            }
            #expect(contains("traced"), "the instance's name is a resource attribute")
            let token = String(cookie.split(separator: "=", maxSplits: 1).last ?? "").prefix(32)
            #expect(token.count == 32 && !contains(String(token)), "no session id in any span")
        }
    }
}
#endif

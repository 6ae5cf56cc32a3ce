#if Operations
import HTTPTypes
import Logging
import MemcachedSessions
import MetricsTestKit
import NIOCore
import Synchronization
import Testing

@testable import MemcachedSessionsOperations

/// The endpoints' answers that need no memcached (the integration tests read and change a
/// running manager through them).
@Suite struct ManagementEndpointsTests {
    let manager: SessionManager
    let endpoints: ManagementEndpoints
    let token = "0123456789abcdef-token"

    init() throws {
        manager = try SessionManager(configuration: try SessionManager.Configuration(nodes: "n1:127.0.0.1:1"))
        endpoints = try ManagementEndpoints(manager: manager, token: token, instance: "unit")
    }

    func fields(_ authorization: String?) -> HTTPFields {
        var fields = HTTPFields()
        if let authorization { fields[.authorization] = authorization }
        return fields
    }

    @Test func everyEndpointNeedsTheToken() async {
        for endpoint in ManagementEndpoints.Endpoint.allCases {
            for method in endpoint.methods {
                let answer = await endpoints.respond(to: endpoint, method: method, headerFields: fields("Bearer not-the-token"), body: nil)
                #expect(answer.status == .unauthorized)
                #expect(!answer.text.contains(token))
            }
        }
    }

    @Test func aMethodAnEndpointDoesNotAnswerIsRefusedWithAllow() async {
        let answer = await endpoints.respond(to: .config, method: .delete, headerFields: fields("Bearer \(token)"), body: nil)
        #expect(answer.status == .methodNotAllowed)
        #expect(answer.headerFields[.allow] == "GET, PUT")
        #expect(answer.headerFields[.cacheControl] == "no-store")
    }

    @Test func theConfigurationIsShownAndAChangeWithoutABodyIsRefused() async {
        let view = await endpoints.respond(to: .config, method: .get, headerFields: fields("Bearer \(token)"), body: nil)
        #expect(view.status == .ok && view.text.contains(#""locking":"none""#))
        let empty = await endpoints.respond(to: .config, method: .put, headerFields: fields("Bearer \(token)"), body: nil)
        #expect(empty.status == .badRequest)
    }

    @Test func aTokenShorterThanSixteenCharactersIsRefused() {
        #expect(throws: SessionError.self) { _ = try ManagementEndpoints(manager: manager, token: "short-token", instance: "x") }
        #expect(throws: SessionError.self) { _ = try ManagementEndpoints(manager: manager, token: "has a space in it!", instance: "x") }
    }

    @Test func theMetricsPageIsPublicOrBehindItsToken() {
        let text = "msm_writes_total 3\n"
        let open = MetricsPage(token: nil) { text }
        let answer = open.respond(headerFields: fields(nil))
        #expect(answer.status == .ok && answer.text == text)
        #expect(answer.headerFields[.contentType] == MetricsPage.prometheusContentType)
        let guarded = MetricsPage(token: "metrics-token-0123456789") { text }
        #expect(guarded.respond(headerFields: fields(nil)).status == .unauthorized)
        #expect(guarded.respond(headerFields: fields("Bearer wrong")).status == .unauthorized)
        #expect(guarded.respond(headerFields: fields("Bearer metrics-token-0123456789")).text == text)
        #expect(guarded.unauthorized.count == 2)
    }

    /// Failed token attempts are counted per endpoint and logged, throttled, never with the token
    /// that was presented.
    @Test func failedTokenAttemptsAreCountedAndLoggedWithoutTheToken() async throws {
        let metrics = TestMetrics()
        let lines = CapturedLog()
        let logger = Logger(label: "test") { _ in lines }
        // A log interval no test run outlasts: one line for the whole burst, however slow the machine.
        let attempts = UnauthorizedAttempts(logger: logger, metricsFactory: metrics, logInterval: .seconds(3600))
        let endpoints = try ManagementEndpoints(manager: manager, token: token, instance: "unit", unauthorized: attempts)
        let guess = "guessed-token-abcdefgh"
        for _ in 0..<5 {
            _ = await endpoints.respond(to: .status, method: .get, headerFields: fields("Bearer \(guess)"), body: nil)
        }
        _ = await endpoints.respond(to: .config, method: .put, headerFields: fields(nil), body: nil)
        // The right token is not a failure.
        _ = await endpoints.respond(to: .status, method: .get, headerFields: fields("Bearer \(token)"), body: nil)
        #expect(endpoints.unauthorized.count == 6)
        #expect(try metrics.expectCounter("msm_management_unauthorized_total", [("endpoint", "status")]).totalValue == 5)
        #expect(try metrics.expectCounter("msm_management_unauthorized_total", [("endpoint", "config")]).totalValue == 1)
        // One line for the burst (throttled), and no token in it.
        let logged = lines.lines
        #expect(logged.count == 1, "\(logged)")
        #expect(logged.allSatisfy { !$0.contains(guess) && !$0.contains(token) })
        #expect(logged.first?.contains("msm.endpoint=status") == true)

        let page = MetricsPage(token: token, unauthorized: endpoints.unauthorized) { "" }
        _ = page.respond(headerFields: fields("Bearer \(guess)"))
        #expect(endpoints.unauthorized.count == 7)
        #expect(try metrics.expectCounter("msm_management_unauthorized_total", [("endpoint", "metrics")]).totalValue == 1)
    }
}

/// Every line logged, as text with its metadata.
final class CapturedLog: LogHandler, Sendable {
    private let stored = Mutex<[String]>([])
    var lines: [String] { stored.withLock { $0 } }
    var logLevel: Logger.Level {
        get { .trace }
        set {}
    }
    var metadata: Logger.Metadata {
        get { [:] }
        set {}
    }
    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { nil }
        set {}
    }
    func log(event: LogEvent) {
        let fields = (event.metadata ?? [:]).sorted { $0.key < $1.key }.map { "\($0.key)=\($0.value)" }.joined(separator: " ")
        stored.withLock { $0.append("\(event.message) \(fields)") }
    }
}
#endif

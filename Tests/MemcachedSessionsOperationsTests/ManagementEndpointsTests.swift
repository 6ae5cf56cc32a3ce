#if Operations
import HTTPTypes
import MemcachedSessions
import NIOCore
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
    }
}
#endif

#if Operations
import CoreMetrics
import Foundation
import HTTPTypes
import Logging
import MemcachedSessions
import NIOCore

/// An answer of the management endpoints or the metrics page, for an adapter to send.
public struct ManagementAnswer: Sendable {
    public var status: HTTPResponse.Status
    /// Always with `Content-Type` and `Cache-Control: no-store`.
    public var headerFields: HTTPFields
    public var body: ByteBuffer

    init(_ status: HTTPResponse.Status, contentType: String = "application/json", body: String, headerFields: HTTPFields = [:]) {
        self.status = status
        self.headerFields = headerFields
        self.headerFields[.contentType] = contentType
        self.headerFields[.cacheControl] = "no-store"
        self.body = ByteBuffer(string: body)
    }

    /// The response head.
    public var response: HTTPResponse { HTTPResponse(status: status, headerFields: headerFields) }

    /// The body as text (for tests and logs: it never holds a secret).
    public var text: String { String(buffer: body) }

    static let unauthorized = ManagementAnswer(
        .unauthorized, body: #"{"error":"a management token is required: Authorization: Bearer <token>"}"#,
        headerFields: [.wwwAuthenticate: "Bearer"])
}

/// The management endpoints of an app instance (MSM's JMX, over HTTP), framework-agnostic; each
/// framework adapter mounts them as a route group under ``pathPrefix``
/// (`router.addSessionManagement(_:)` in Hummingbird, `app.sessionManagement(_:)` in Vapor):
///
/// - `GET /_msm/`: an HTML page with charts (inline SVG, no external assets) that refreshes itself;
/// - `GET /_msm/status`: the same as JSON (mode, nodes with availability and latency, statistics,
///   the last minutes' samples, recent events);
/// - `GET /_msm/config`, `PUT /_msm/config` (JSON `SessionManager.RuntimeChange`): the run-time
///   settings, and changing them without a restart;
/// - `POST /_msm/principals/revoke` (JSON `{"principal": "alice"}`): ends every session of a
///   principal (`SessionManager.invalidateAll(principal:)`), answers `{"ended": N}`, or 503 with
///   the error and the count ended before it.
///
/// Every request must carry `Authorization: Bearer <token>`. Nothing here ever shows a session id
/// or an attribute value. The core keeps what these show (`SessionManager.status(instance:)`)
/// and what they change (`SessionManager.reconfigure(_:)`).
public struct ManagementEndpoints: Sendable {
    /// Where the endpoints are mounted.
    public static let pathPrefix = "/_msm"

    /// One endpoint, by its path under ``pathPrefix``.
    public enum Endpoint: String, Sendable, CaseIterable {
        /// `GET /_msm/`: the HTML status page.
        case page = ""
        /// `GET /_msm/status`: the status as JSON.
        case status
        /// `GET` and `PUT /_msm/config`: the run-time settings.
        case config
        /// `POST /_msm/principals/revoke`: every session of a principal ends.
        case revoke = "principals/revoke"

        /// The methods the endpoint answers.
        public var methods: [HTTPRequest.Method] {
            switch self {
            case .page, .status: [.get]
            case .config: [.get, .put]
            case .revoke: [.post]
            }
        }
    }

    public let manager: SessionManager
    public let instance: String
    private let token: BearerToken
    /// Requests refused for a missing or wrong token: counted and logged (never the token).
    public let unauthorized: UnauthorizedAttempts

    /// The largest `PUT /_msm/config` body read.
    public static let maximumBodySize = 64 * 1024

    /// - Throws: `SessionError.Code.invalidConfiguration` for a token shorter than 16 characters.
    ///   - unauthorized: where refused requests are counted and logged; by default with the
    ///     manager's logger and metrics factory (else the global one). Share it with the
    ///     ``MetricsPage`` so that one count and one throttled log line cover both.
    public init(
        manager: SessionManager, token: String, instance: String, unauthorized: UnauthorizedAttempts? = nil
    ) throws(SessionError) {
        guard token.utf8.count >= 16, token.utf8.allSatisfy({ $0 > 0x20 && $0 < 0x7F }) else {
            throw SessionError(code: .invalidConfiguration, message: "the management token must be at least 16 printable characters without spaces")
        }
        self.manager = manager
        self.token = BearerToken(token)
        self.instance = instance
        self.unauthorized =
            unauthorized ?? UnauthorizedAttempts(logger: manager.logger, metricsFactory: manager.metricsFactory ?? MetricsSystem.factory)
    }

    /// Whether the request's `Authorization` header carries the token (compared in constant time).
    public func isAuthorized(_ headerFields: HTTPFields) -> Bool {
        token.isPresented(in: headerFields[.authorization])
    }

    /// Answers one request to `endpoint`.
    public func respond(
        to endpoint: Endpoint, method: HTTPRequest.Method, headerFields: HTTPFields, body: ByteBuffer?
    ) async -> ManagementAnswer {
        guard isAuthorized(headerFields) else {
            switch endpoint {
            case .page: unauthorized.record(endpoint: .page)
            case .status: unauthorized.record(endpoint: .status)
            case .config: unauthorized.record(endpoint: .config)
            case .revoke: unauthorized.record(endpoint: .revoke)
            }
            return .unauthorized
        }
        switch (endpoint, method) {
        case (.page, .get):
            return ManagementAnswer(.ok, contentType: "text/html; charset=utf-8", body: StatusPage.render(manager.status(instance: instance)))
        case (.status, .get):
            return Self.json(manager.status(instance: instance))
        case (.config, .get):
            return Self.json(manager.runtimeView)
        case (.config, .put):
            guard let body, let change = try? JSONDecoder().decode(SessionManager.RuntimeChange.self, from: Data(body.readableBytesView))
            else {
                return ManagementAnswer(
                    .badRequest,
                    body: #"{"error":"expected a JSON object with any of: nodes (string), failoverNodes (array), locking (string), enabled (bool)"}"#)
            }
            do {
                return Self.json(try await manager.reconfigure(change))
            } catch {
                return ManagementAnswer(.badRequest, body: Self.errorJSON(error.message))
            }
        case (.revoke, .post):
            struct Revoke: Decodable { var principal: String }
            guard let body, let revoke = try? JSONDecoder().decode(Revoke.self, from: Data(body.readableBytesView)) else {
                return ManagementAnswer(.badRequest, body: #"{"error":"expected a JSON object with principal (string)"}"#)
            }
            do {
                let ended = try await manager.invalidateAll(principal: revoke.principal)
                return ManagementAnswer(.ok, body: #"{"ended":\#(ended)}"#)
            } catch {
                // The message never names the principal; the count says what was done.
                let status: HTTPResponse.Status = error.code == .principalIndexUnavailable ? .serviceUnavailable : .badRequest
                return ManagementAnswer(status, body: Self.errorJSON(error.message, ended: error.sessionsEnded ?? 0))
            }
        default:
            return ManagementAnswer(
                .methodNotAllowed, body: #"{"error":"method not allowed"}"#,
                headerFields: [.allow: endpoint.methods.map(\.rawValue).joined(separator: ", ")])
        }
    }

    static func json(_ value: some Encodable) -> ManagementAnswer {
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        guard let data = try? encoder.encode(value) else {
            return ManagementAnswer(.internalServerError, body: errorJSON("could not encode the response"))
        }
        return ManagementAnswer(.ok, body: String(decoding: data, as: UTF8.self))
    }

    static func errorJSON(_ message: String) -> String {
        let data = (try? JSONEncoder().encode(["error": message])) ?? Data(#"{"error":"error"}"#.utf8)
        return String(decoding: data, as: UTF8.self)
    }

    static func errorJSON(_ message: String, ended: Int) -> String {
        struct Failure: Encodable {
            var error: String
            var ended: Int
        }
        let encoder = JSONEncoder()
        encoder.outputFormatting = [.sortedKeys]
        let data = (try? encoder.encode(Failure(error: message, ended: ended))) ?? Data(#"{"error":"error"}"#.utf8)
        return String(decoding: data, as: UTF8.self)
    }
}

/// The metrics page (`GET /metrics`): whatever text the application's metrics backend exports
/// (Prometheus' text format with swift-prometheus, as `msm serve` does), behind a bearer token when
/// one is given. The library never bootstraps a metrics backend itself: that is the process's
/// choice (swift-metrics' `MetricsSystem.bootstrap`).
public struct MetricsPage: Sendable {
    /// Prometheus' text exposition format.
    public static let prometheusContentType = "text/plain; version=0.0.4; charset=utf-8"

    private let token: BearerToken?
    private let contentType: String
    private let render: @Sendable () -> String
    /// Requests refused for a missing or wrong token: counted and logged (never the token).
    public let unauthorized: UnauthorizedAttempts

    /// - Parameters:
    ///   - token: the bearer token requests must carry; nil: the page is public (say so
    ///     explicitly: `msm serve` puts it behind the management token unless `--metrics-public`).
    ///   - contentType: the format's content type (Prometheus' text format by default).
    ///   - unauthorized: where refused requests are counted and logged.
    ///   - render: the metrics in the backend's format, made anew for each request.
    public init(
        token: String?, contentType: String = Self.prometheusContentType, unauthorized: UnauthorizedAttempts = UnauthorizedAttempts(),
        render: @escaping @Sendable () -> String
    ) {
        self.token = token.map(BearerToken.init)
        self.contentType = contentType
        self.unauthorized = unauthorized
        self.render = render
    }

    /// Answers one `GET /metrics`.
    public func respond(headerFields: HTTPFields) -> ManagementAnswer {
        if let token, !token.isPresented(in: headerFields[.authorization]) {
            unauthorized.record(endpoint: .metrics)
            return .unauthorized
        }
        return ManagementAnswer(.ok, contentType: contentType, body: render())
    }
}
#endif

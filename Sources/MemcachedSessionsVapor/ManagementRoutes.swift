#if Vapor
import HTTPTypes
@_exported import MemcachedSessionsOperations
import Vapor

extension RoutesBuilder {
    /// Mounts the session manager's management endpoints (``ManagementEndpoints``: the status
    /// page, the JSON status, the run-time settings) as a route group at `/_msm`.
    ///
    /// ```swift
    /// app.sessionManagement(try ManagementEndpoints(manager: sessions, token: token, instance: "app1"))
    /// ```
    public func sessionManagement(_ endpoints: ManagementEndpoints) {
        let group = grouped(PathComponent(stringLiteral: String(ManagementEndpoints.pathPrefix.dropFirst())))
        for endpoint in ManagementEndpoints.Endpoint.allCases {
            let path = endpoint.rawValue.split(separator: "/").map { PathComponent(stringLiteral: String($0)) }
            for method in endpoint.methods {
                group.on(
                    HTTPMethod(rawValue: method.rawValue), path, body: .collect(maxSize: ByteCount(value: ManagementEndpoints.maximumBodySize))
                ) { request async -> Response in
                    let answer = await endpoints.respond(
                        to: endpoint, method: method, headerFields: VaporOperations.fields(of: request), body: request.body.data)
                    return VaporOperations.response(answer)
                }
            }
        }
    }

    /// Mounts the metrics page (``MetricsPage``) at `path` (`/metrics` by default).
    public func metrics(_ page: MetricsPage, path: [PathComponent] = ["metrics"]) {
        on(.GET, path) { request -> Response in
            VaporOperations.response(page.respond(headerFields: VaporOperations.fields(of: request)))
        }
    }

}

/// Between Vapor's requests and responses and the endpoints' (swift-http-types).
enum VaporOperations {
    /// The request's `Authorization` header, the only one the endpoints read.
    static func fields(of request: Request) -> HTTPFields {
        var fields = HTTPFields()
        if let authorization = request.headers.first(name: .authorization) { fields[.authorization] = authorization }
        return fields
    }

    static func response(_ answer: ManagementAnswer) -> Response {
        var headers = HTTPHeaders()
        for field in answer.headerFields { headers.add(name: field.name.rawName, value: field.value) }
        return Response(status: HTTPResponseStatus(statusCode: answer.status.code), headers: headers, body: .init(buffer: answer.body))
    }
}
#endif

#if Hummingbird
import HTTPTypes
import Hummingbird
@_exported import MemcachedSessionsOperations
import NIOCore

extension RouterMethods {
    /// Mounts the session manager's management endpoints (``ManagementEndpoints``: the status
    /// page, the JSON status, the run-time settings) as a route group at `/_msm`.
    ///
    /// ```swift
    /// router.addSessionManagement(try ManagementEndpoints(manager: sessions, token: token, instance: "app1"))
    /// ```
    @discardableResult
    public func addSessionManagement(_ endpoints: ManagementEndpoints) -> Self {
        let group = group(RouterPath(ManagementEndpoints.pathPrefix))
        for endpoint in ManagementEndpoints.Endpoint.allCases {
            for method in endpoint.methods {
                group.on(RouterPath(endpoint.rawValue), method: method) { request, _ -> Response in
                    var body: ByteBuffer? = nil
                    if method == .put || method == .post { body = try await request.body.collect(upTo: ManagementEndpoints.maximumBodySize) }
                    let answer = await endpoints.respond(to: endpoint, method: method, headerFields: request.headers, body: body)
                    return Response(status: answer.status, headers: answer.headerFields, body: .init(byteBuffer: answer.body))
                }
            }
        }
        return self
    }

    /// Mounts the metrics page (``MetricsPage``) at `path` (`/metrics` by default).
    @discardableResult
    public func addMetrics(_ page: MetricsPage, path: RouterPath = "metrics") -> Self {
        get(path) { request, _ -> Response in
            let answer = page.respond(headerFields: request.headers)
            return Response(status: answer.status, headers: answer.headerFields, body: .init(byteBuffer: answer.body))
        }
        return self
    }
}
#endif

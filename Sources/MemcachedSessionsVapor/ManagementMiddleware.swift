#if Vapor
import MemcachedSessions
import Vapor

/// Serves the session manager's management endpoints (`/_msm/status`, the `/_msm/` page,
/// `/_msm/config`; see ``MemcachedSessions/ManagementEndpoints``) in a Vapor application.
/// Requests to other paths pass through.
///
/// ```swift
/// app.middleware.use(MemcachedSessionManagementMiddleware(endpoints: try ManagementEndpoints(manager: sessions, token: token, instance: "app1")))
/// ```
public struct MemcachedSessionManagementMiddleware: AsyncMiddleware {
    public let endpoints: ManagementEndpoints?

    public init(endpoints: ManagementEndpoints?) {
        self.endpoints = endpoints
    }

    public func respond(to request: Request, chainingTo next: any AsyncResponder) async throws -> Response {
        let path = request.url.path
        guard let endpoints, ManagementEndpoints.handles(path: path) else {
            return try await next.respond(to: request)
        }
        var body: ByteBuffer? = nil
        if request.method == .PUT || request.method == .POST {
            body = try await request.body.collect(max: 64 * 1024).get()
        }
        let answer = await endpoints.respond(
            method: request.method.rawValue, path: path, authorization: request.headers.first(name: .authorization), body: body)
        var headers = HTTPHeaders([("Content-Type", answer.contentType)])
        for (name, value) in answer.headers { headers.add(name: name, value: value) }
        return Response(status: HTTPResponseStatus(statusCode: answer.status), headers: headers, body: .init(string: answer.body))
    }
}
#endif

#if Hummingbird
import HTTPTypes
import Hummingbird
import MemcachedSessions
import NIOCore

/// Serves the session manager's management endpoints (`/_msm/status`, the `/_msm/` page,
/// `/_msm/config`; see ``MemcachedSessions/ManagementEndpoints``) in a Hummingbird application.
/// Requests to other paths pass through. Without endpoints (no token configured) the paths are
/// not served at all (404 from the router).
///
/// ```swift
/// let endpoints = try ManagementEndpoints(manager: sessions, token: token, instance: "app1")
/// router.add(middleware: MemcachedSessionManagementMiddleware(endpoints: endpoints))
/// ```
public struct MemcachedSessionManagementMiddleware<Context: RequestContext>: RouterMiddleware {
    public let endpoints: ManagementEndpoints?

    public init(endpoints: ManagementEndpoints?) {
        self.endpoints = endpoints
    }

    public func handle(_ request: Request, context: Context, next: (Request, Context) async throws -> Response) async throws -> Response {
        let path = request.uri.path
        guard let endpoints, ManagementEndpoints.handles(path: path) else {
            return try await next(request, context)
        }
        var body: ByteBuffer? = nil
        if request.method == .put || request.method == .post {
            body = try await request.body.collect(upTo: 64 * 1024)
        }
        let answer = await endpoints.respond(
            method: request.method.rawValue, path: path, authorization: request.headers[.authorization], body: body)
        var headers: HTTPFields = [.contentType: answer.contentType]
        for (name, value) in answer.headers {
            if let field = HTTPField.Name(name) { headers.append(HTTPField(name: field, value: value)) }
        }
        return Response(
            status: HTTPResponse.Status(code: answer.status), headers: headers, body: .init(byteBuffer: ByteBuffer(string: answer.body)))
    }
}
#endif

#if Tools
import HTTPTypes
import Hummingbird
import Logging
import MemcachedSessions
import MemcachedSessionsHummingbird
import NIOCore

/// The example Hummingbird app: the session-counter endpoints and the demo's home page.
public enum HummingbirdApp {
    public typealias Context = BasicMemcachedSessionRequestContext

    /// What the app exposes besides the workload.
    public struct Operations: Sendable {
        /// The management endpoints (`/_msm/...`), nil when no token is configured.
        public var endpoints: ManagementEndpoints?
        /// `/metrics`: Prometheus text, behind its token when it has one (nil: not served).
        public var metrics: MetricsPage?

        public init(endpoints: ManagementEndpoints? = nil, metrics: Bool = false, metricsToken: String? = nil) {
            self.endpoints = endpoints
            // One count and one throttled log of refused tokens for the endpoints and the page.
            self.metrics =
                metrics
                ? MetricsPage(token: metricsToken, unauthorized: endpoints?.unauthorized ?? UnauthorizedAttempts()) { MetricsExport.text() }
                : nil
        }
    }

    /// The router: `/hello` without session machinery, everything else through the middleware.
    public static func router(
        manager: SessionManager, cookie: SessionCookie? = nil, instance: String, operations: Operations = .init(),
        tracing: Bool = false
    ) -> Router<Context> {
        let router = Router(context: Context.self)
        // A span per request (the global tracer's), the sessions' spans its children.
        if tracing { router.add(middleware: TracingMiddleware()) }
        // The framework's ceiling: no session middleware at all.
        router.get("hello") { _, _ -> String in "hello" }
        if let metrics = operations.metrics { router.addMetrics(metrics) }
        if let endpoints = operations.endpoints { router.addSessionManagement(endpoints) }
        router.addSessionHealthCheck(manager: manager)
        let sessions = router.group().add(middleware: MemcachedSessionMiddleware<Context>(manager: manager, cookie: cookie))
        sessions.get("counter") { _, context -> String in
            String(try await CounterWorkload.counter(context.memcachedSessions))
        }
        sessions.get("read") { _, context -> String in
            String(try await CounterWorkload.read(context.memcachedSessions))
        }
        sessions.get("/") { _, context -> Response in
            let session = try await context.memcachedSessions.load()
            return html(HomePage.render(session: session, instance: instance))
        }
        sessions.post("add") { _, context -> Response in
            _ = try await CounterWorkload.counter(context.memcachedSessions)
            return Response(status: .seeOther, headers: [.location: "/"])
        }
        sessions.post("logout") { _, context -> Response in
            try await context.memcachedSessions.invalidate()
            return Response(status: .seeOther, headers: [.location: "/"])
        }
        return router
    }

    static func html(_ text: String) -> Response {
        Response(
            status: .ok, headers: [.contentType: "text/html; charset=utf-8", .cacheControl: "no-store"],
            body: .init(byteBuffer: ByteBuffer(string: text)))
    }
}

/// The demo's home page: the session's attributes, which instance served the request, which
/// memcached node holds the session, and a button that adds one to the counter.
enum HomePage {
    static func escape(_ text: String) -> String { HTMLEscaping.escape(text) }

    static func render(session: MemcachedSession?, instance: String) -> String {
        var rows = ""
        if let session {
            for name in session.attributeNames.sorted() {
                let raw = session.encodedValue(of: name).map { String(buffer: $0) } ?? ""
                let shown = raw.count > 80 ? String(raw.prefix(77)) + "... (\(raw.utf8.count) bytes)" : raw
                rows += "<tr><td>\(escape(name))</td><td><code>\(escape(shown))</code></td></tr>\n"
            }
        }
        let node = session.map { escape($0.id.nodeID) } ?? "-"
        let count = session?["count", as: Int.self] ?? 0
        return """
            <!doctype html>
            <html lang="en"><head><meta charset="utf-8"><title>msm demo</title>
            <style>
            body { font: 16px/1.4 system-ui, sans-serif; margin: 2rem auto; max-width: 42rem; color: #222; }
            table { border-collapse: collapse; width: 100%; } td { border-bottom: 1px solid #ddd; padding: .3rem .5rem; }
            .facts span { display: inline-block; margin-right: 1.5rem; } button { font-size: 1rem; padding: .4rem 1rem; }
            code { word-break: break-all; }
            </style></head>
            <body>
            <h1>Session counter</h1>
            <p class="facts"><span>Served by <b id="instance">\(escape(instance))</b></span>
            <span>Session on memcached node <b id="node">\(node)</b></span>
            <span>Count <b id="count">\(count)</b></span></p>
            <form method="post" action="/add"><button type="submit">Add one</button></form>
            <h2>Attributes</h2>
            <table id="attributes">\(rows.isEmpty ? "<tr><td>no session yet</td></tr>" : rows)</table>
            <form method="post" action="/logout"><button type="submit">Log out</button></form>
            </body></html>
            """
    }
}
#endif

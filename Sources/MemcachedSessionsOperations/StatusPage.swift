#if Operations
import Foundation
import MemcachedSessions

/// Text made safe to put in HTML (element content or a quoted attribute).
public enum HTMLEscaping {
    public static func escape(_ text: String) -> String {
        var out = ""
        out.reserveCapacity(text.utf8.count)
        for character in text {
            switch character {
            case "&": out += "&amp;"
            case "<": out += "&lt;"
            case ">": out += "&gt;"
            case "\"": out += "&quot;"
            case "'": out += "&#39;"
            default: out.append(character)
            }
        }
        return out
    }
}

/// The HTML status page: plain HTML and inline SVG, no script, no external asset; refreshes itself
/// every five seconds.
enum StatusPage {
    static func escape(_ text: String) -> String { HTMLEscaping.escape(text) }

    static func number(_ value: Double) -> String {
        value >= 100 ? String(Int(value.rounded())) : String(format: "%.1f", value)
    }

    /// A line chart of one or more series over the samples' times.
    static func chart(id: String, title: String, unit: String, series: [(name: String, values: [Double])], times: [Int64]) -> String {
        let width = 560.0
        let height = 140.0
        let left = 44.0
        let bottom = 18.0
        let maximum = max(series.flatMap(\.values).max() ?? 0, 1)
        let colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e"]
        var svg = """
            <figure><figcaption>\(escape(title)) <small>(\(escape(unit)), last \(times.count) samples)</small></figcaption>
            <svg id="\(id)" width="\(Int(width))" height="\(Int(height))" viewBox="0 0 \(Int(width)) \(Int(height))" role="img" aria-label="\(escape(title))">
            <rect x="\(Int(left))" y="4" width="\(Int(width - left - 4))" height="\(Int(height - bottom - 4))" fill="#fafafa" stroke="#ccc"/>
            <text x="4" y="14" font-size="10">\(number(maximum))</text><text x="4" y="\(Int(height - bottom))" font-size="10">0</text>

            """
        let count = max(times.count - 1, 1)
        for (index, entry) in series.enumerated() {
            let points = entry.values.enumerated().map { position, value -> String in
                let x = left + (width - left - 4) * Double(position) / Double(count)
                let y = (height - bottom) - (height - bottom - 8) * value / maximum
                return String(format: "%.1f,%.1f", x, y)
            }.joined(separator: " ")
            let color = colors[index % colors.count]
            svg +=
                "<polyline class=\"series\" data-series=\"\(escape(entry.name))\" fill=\"none\" stroke=\"\(color)\" stroke-width=\"1.5\" points=\"\(points)\"/>\n"
            svg +=
                "<text x=\"\(Int(left) + 6 + index * 110)\" y=\"\(Int(height) - 4)\" font-size=\"10\" fill=\"\(color)\">\(escape(entry.name))</text>\n"
        }
        return svg + "</svg></figure>\n"
    }

    static func render(_ status: SessionManager.Status) -> String {
        let counters = status.statistics.counters
        func counter(_ name: String) -> Int { counters[name] ?? 0 }
        let requests = counter("requests_with_session") + counter("requests_without_session")
        let samples = status.history
        let times = samples.map(\.time)
        var nodeRows = ""
        for node in status.nodes {
            nodeRows += """
                <tr id="node-\(escape(node.id))"><td class="node-id">\(escape(node.id))</td><td>\(escape(node.address))</td><td>\(escape(node.role))</td>\
                <td class="\(node.available ? "up" : "down")">\(node.available ? "up" : "DOWN")</td><td>\(node.requests)</td><td>\(node.errors)</td>\
                <td>\(number(node.meanLatencyMicroseconds))</td><td>\(number(node.recentLatencyMicroseconds))</td></tr>

                """
        }
        var eventRows = ""
        for event in status.events.suffix(20).reversed() {
            let seconds = TimeInterval(event.time) / 1000
            let stamp = Date(timeIntervalSince1970: seconds).formatted(.iso8601)
            eventRows +=
                "<li><time>\(escape(stamp))</time> <b>\(escape(event.kind.rawValue))</b> \(escape(event.message))\(event.count > 1 ? " (×\(event.count))" : "")</li>\n"
        }
        let keyCounters = [
            "requests_with_session", "requests_without_session", "sessions_created", "sessions_loaded", "sessions_loaded_locally",
            "writes", "writes_skipped", "write_conflicts", "backup_writes", "backup_failures", "memcached_failovers",
            "app_server_failovers", "takeovers", "relocations", "locks_acquired", "lock_waits", "lock_failures", "unavailable",
            "corrupt_sessions",
        ]
        var counterRows = ""
        for name in keyCounters {
            counterRows += "<tr><td>\(name)</td><td id=\"counter-\(name)\">\(counter(name))</td></tr>\n"
        }
        let nodeIDs = status.nodes.map(\.id)
        var body = """
            <!doctype html>
            <html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="5">
            <title>msm status: \(escape(status.instance))</title>
            <style>
            body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5rem; color: #222; max-width: 1200px; }
            table { border-collapse: collapse; margin-bottom: 1rem; } td, th { border-bottom: 1px solid #ddd; padding: .2rem .6rem; text-align: left; }
            .up { color: #2a7; } .down { color: #c22; font-weight: bold; } .charts { display: flex; flex-wrap: wrap; gap: 1rem; }
            figure { margin: 0; } figcaption { font-weight: 600; } .summary span { margin-right: 1.5rem; }
            </style></head><body>
            <h1>Session manager status</h1>
            <p class="summary"><span>Instance <b id="instance">\(escape(status.instance))</b></span>
            <span>Mode <b id="mode">\(escape(status.mode))</b></span><span>Locking <b id="locking">\(escape(status.locking))</b></span>
            <span>Enabled <b id="enabled">\(status.enabled)</b></span><span>Route <b>\(escape(status.route ?? "-"))</b></span>
            <span>Requests <b id="requests-total">\(requests)</b></span><span>Local sessions <b>\(status.localSessions)</b></span>
            <span>Queued writes <b>\(status.pendingAsynchronousWrites)</b></span></p>
            <h2>Memcached nodes</h2>
            <table id="nodes"><tr><th>id</th><th>address</th><th>role</th><th>state</th><th>requests</th><th>errors</th><th>mean µs</th><th>recent µs</th></tr>
            \(nodeRows)</table>
            <h2>Last minutes</h2>
            <div class="charts">

            """
        body += chart(
            id: "chart-requests", title: "Requests", unit: "per second",
            series: [
                ("requests", samples.map(\.requestsPerSecond)), ("loads", samples.map(\.loadsPerSecond)),
                ("writes", samples.map(\.writesPerSecond)),
            ],
            times: times)
        body += chart(
            id: "chart-latency", title: "Session load and write latency", unit: "µs",
            series: [("load", samples.map(\.loadLatencyMicroseconds)), ("write", samples.map(\.writeLatencyMicroseconds))], times: times)
        body += chart(
            id: "chart-nodes", title: "Memcached latency per node", unit: "µs",
            series: nodeIDs.map { id in (id, samples.map { $0.nodeLatencyMicroseconds[id] ?? 0 }) }, times: times)
        body += chart(
            id: "chart-failovers", title: "Failovers and lock waits", unit: "per second",
            series: [("failovers", samples.map(\.failoversPerSecond)), ("lock waits", samples.map(\.lockWaitsPerSecond))], times: times)
        body += """
            </div>
            <h2>Counters</h2>
            <table id="counters">\(counterRows)</table>
            <h2>Recent events</h2>
            <ul id="events">\(eventRows.isEmpty ? "<li>none</li>" : eventRows)</ul>
            <p><small>JSON: <code>GET /_msm/status</code>. Refreshes every 5 s.</small></p>
            </body></html>
            """
        return body
    }
}
#endif

/// A memcached node: an id (used in session ids and for routing) and where it listens.
public struct MemcachedNodeAddress: Sendable, Hashable, CustomStringConvertible {
    public var id: String
    public var host: String
    public var port: Int

    public init(id: String, host: String, port: Int) {
        self.id = id
        self.host = host
        self.port = port
    }

    /// `n1:127.0.0.1:11211`
    public var description: String { "\(id):\(hostAndPort)" }

    /// `127.0.0.1:11211`, or `[::1]:11211` for an IPv6 address.
    public var hostAndPort: String {
        host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)"
    }

    /// Parses one entry: `id:host:port`, or `host:port` (the id is then `host:port`).
    /// IPv6 hosts are written in brackets: `n1:[::1]:11211`.
    public init(parsing entry: some StringProtocol) throws(MemcachedError) {
        let text = String(entry)
        func fail(_ why: String) -> MemcachedError {
            MemcachedError(code: .invalidConfiguration, message: "invalid memcached node '\(text)': \(why)")
        }
        var id: String?
        var hostPart: Substring
        var portPart: Substring
        if let open = text.firstIndex(of: "[") {
            guard let close = text[open...].firstIndex(of: "]") else { throw fail("unclosed '['") }
            let prefix = text[..<open]
            if !prefix.isEmpty {
                guard prefix.hasSuffix(":") else { throw fail("expected 'id:[host]:port'") }
                id = String(prefix.dropLast())
            }
            hostPart = text[text.index(after: open)..<close]
            let afterClose = text[text.index(after: close)...]
            guard afterClose.hasPrefix(":") else { throw fail("expected ':port' after ']'") }
            portPart = afterClose.dropFirst()
        } else {
            let parts = text.split(separator: ":", omittingEmptySubsequences: false)
            switch parts.count {
            case 2:
                hostPart = parts[0]
                portPart = parts[1]
            case 3:
                id = String(parts[0])
                hostPart = parts[1]
                portPart = parts[2]
            default:
                throw fail("expected 'id:host:port' or 'host:port'")
            }
        }
        guard !hostPart.isEmpty else { throw fail("empty host") }
        guard hostPart.allSatisfy({ $0.isLetter || $0.isNumber || $0 == "." || $0 == "-" || $0 == ":" || $0 == "_" }) else {
            throw fail("host '\(hostPart)' has characters a host name cannot have")
        }
        guard let port = Int(portPart), (1...65535).contains(port) else {
            throw fail("port '\(portPart)' is not a number from 1 to 65535")
        }
        let host = String(hostPart)
        let resolvedID = id ?? (host.contains(":") ? "[\(host)]:\(port)" : "\(host):\(port)")
        if let id {
            try Self.validate(id: id, entry: text)
        }
        self.init(id: resolvedID, host: host, port: port)
    }

    /// Parses a node list: entries separated by spaces, commas or both
    /// (`n1:127.0.0.1:21211,n2:127.0.0.1:21212` or `n1:127.0.0.1:21211 n2:127.0.0.1:21212`).
    /// Ids must be unique.
    public static func parseList(_ list: some StringProtocol) throws(MemcachedError) -> [MemcachedNodeAddress] {
        let entries = list.split(whereSeparator: { $0 == "," || $0 == " " || $0 == "\t" || $0 == "\n" })
        var nodes: [MemcachedNodeAddress] = []
        var seen = Set<String>()
        for entry in entries {
            let node = try MemcachedNodeAddress(parsing: entry)
            guard seen.insert(node.id).inserted else {
                throw MemcachedError(code: .invalidConfiguration, message: "node id '\(node.id)' appears twice in '\(list)'")
            }
            nodes.append(node)
        }
        return nodes
    }

    /// Node ids appear in session ids and metric labels: letters, digits, `_` and `-`, at most 32.
    static func validate(id: String, entry: String) throws(MemcachedError) {
        guard !id.isEmpty, id.utf8.count <= 32,
            id.utf8.allSatisfy({
                ($0 >= 0x30 && $0 <= 0x39) || ($0 >= 0x41 && $0 <= 0x5A) || ($0 >= 0x61 && $0 <= 0x7A) || $0 == 0x5F || $0 == 0x2D
            })
        else {
            throw MemcachedError(
                code: .invalidConfiguration,
                message: "invalid memcached node '\(entry)': the id '\(id)' must be 1 to 32 letters, digits, '_' or '-'")
        }
    }
}

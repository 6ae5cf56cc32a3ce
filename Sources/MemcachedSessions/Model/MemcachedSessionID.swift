/// A session id: 128 random bits, the memcached node that holds the session, and optionally the
/// route of the app instance that owns it (MSM's `jvmRoute`):
/// `602F7397FBE4D9932E59A9D0E52FE178-n1` or `602F7397FBE4D9932E59A9D0E52FE178-n1.app2`.
///
/// Parsing is strict: exactly 32 upper-case hex digits, `-`, a node id, optionally `.` and a
/// route (node ids and routes: 1 to 32 letters, digits, `_` or `-`). Anything else is not a
/// session id, and a request carrying it has no session.
public struct MemcachedSessionID: Sendable, Hashable, CustomStringConvertible {
    /// The 128 random bits: the session's identity. The node and route change when the session
    /// moves; the token does not (except on ``SessionAccess/regenerateID()``).
    public let token: Token
    /// The id of the memcached node that holds the session.
    public let nodeID: String
    /// The route of the instance that owns the session (sticky set-ups), if any.
    public let route: String?

    /// 128 bits from the system's cryptographically secure generator.
    public struct Token: Sendable, Hashable, CustomStringConvertible {
        public let high: UInt64
        public let low: UInt64

        public init(high: UInt64, low: UInt64) {
            self.high = high
            self.low = low
        }

        /// A new random token (`SystemRandomNumberGenerator`: getrandom(2) on Linux,
        /// arc4random on Darwin).
        public static func random() -> Token {
            var generator = SystemRandomNumberGenerator()
            return Token(high: generator.next(), low: generator.next())
        }

        /// 32 upper-case hex digits.
        public var description: String {
            String(unsafeUninitializedCapacity: 32) { buffer in
                Self.writeHex(high, into: buffer, at: 0)
                Self.writeHex(low, into: buffer, at: 16)
                return 32
            }
        }

        static let hexDigits: [UInt8] = Array("0123456789ABCDEF".utf8)

        private static func writeHex(_ value: UInt64, into buffer: UnsafeMutableBufferPointer<UInt8>, at offset: Int) {
            var value = value
            for index in stride(from: offset + 15, through: offset, by: -1) {
                buffer[index] = hexDigits[Int(value & 0xF)]
                value >>= 4
            }
        }

        /// The 16 bytes, big-endian.
        var bytes: [UInt8] {
            var result = [UInt8](repeating: 0, count: 16)
            for index in 0..<8 {
                result[index] = UInt8(truncatingIfNeeded: high >> (56 - 8 * UInt64(index)))
                result[8 + index] = UInt8(truncatingIfNeeded: low >> (56 - 8 * UInt64(index)))
            }
            return result
        }
    }

    public init(token: Token, nodeID: String, route: String? = nil) {
        self.token = token
        self.nodeID = nodeID
        self.route = route
    }

    /// A new session id on `nodeID` with a fresh random token.
    public static func generate(nodeID: String, route: String?) -> MemcachedSessionID {
        MemcachedSessionID(token: .random(), nodeID: nodeID, route: route)
    }

    /// The same session on another node (relocation after a node failure).
    public func relocated(to nodeID: String) -> MemcachedSessionID {
        MemcachedSessionID(token: token, nodeID: nodeID, route: route)
    }

    /// The same session owned by another instance (sticky takeover).
    public func routed(to route: String?) -> MemcachedSessionID {
        MemcachedSessionID(token: token, nodeID: nodeID, route: route)
    }

    public var description: String {
        var text = token.description
        text.reserveCapacity(34 + nodeID.utf8.count + (route?.utf8.count ?? -1) + 1)
        text += "-"
        text += nodeID
        if let route {
            text += "."
            text += route
        }
        return text
    }

    /// Parses a session id strictly; `nil` for anything that is not one.
    public init?(parsing text: some StringProtocol) {
        var text = String(text)
        let parsed: MemcachedSessionID? = text.withUTF8 { bytes in
            // 32 hex + "-" + node (1...32) [+ "." + route (1...32)]
            guard bytes.count >= 34, bytes.count <= 32 + 1 + 32 + 1 + 32 else { return nil }
            var high: UInt64 = 0
            var low: UInt64 = 0
            for index in 0..<32 {
                let byte = bytes[index]
                let nibble: UInt64
                switch byte {
                case UInt8(ascii: "0")...UInt8(ascii: "9"): nibble = UInt64(byte - UInt8(ascii: "0"))
                case UInt8(ascii: "A")...UInt8(ascii: "F"): nibble = UInt64(byte - UInt8(ascii: "A") + 10)
                default: return nil
                }
                if index < 16 { high = high << 4 | nibble } else { low = low << 4 | nibble }
            }
            guard bytes[32] == UInt8(ascii: "-") else { return nil }
            var dot: Int? = nil
            for index in 33..<bytes.count where bytes[index] == UInt8(ascii: ".") {
                dot = index
                break
            }
            let nodeEnd = dot ?? bytes.count
            let node = UnsafeBufferPointer(rebasing: bytes[33..<nodeEnd])
            guard Self.isValidComponent(node) else { return nil }
            var route: String? = nil
            if let dot {
                let routeBytes = UnsafeBufferPointer(rebasing: bytes[(dot + 1)...])
                guard Self.isValidComponent(routeBytes) else { return nil }
                route = String(decoding: routeBytes, as: UTF8.self)
            }
            return MemcachedSessionID(
                token: Token(high: high, low: low), nodeID: String(decoding: node, as: UTF8.self), route: route)
        }
        guard let parsed else { return nil }
        self = parsed
    }

    /// Node ids and routes: 1 to 32 of `A-Z a-z 0-9 _ -`.
    static func isValidComponent(_ text: String) -> Bool {
        var text = text
        return text.withUTF8 { isValidComponent($0) }
    }

    static func isValidComponent(_ bytes: UnsafeBufferPointer<UInt8>) -> Bool {
        guard !bytes.isEmpty, bytes.count <= 32 else { return false }
        for byte in bytes {
            switch byte {
            case UInt8(ascii: "0")...UInt8(ascii: "9"), UInt8(ascii: "A")...UInt8(ascii: "Z"),
                UInt8(ascii: "a")...UInt8(ascii: "z"), UInt8(ascii: "_"), UInt8(ascii: "-"):
                continue
            default:
                return false
            }
        }
        return true
    }
}

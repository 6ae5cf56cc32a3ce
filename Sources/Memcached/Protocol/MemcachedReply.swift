import NIOCore

/// One reply frame read off the wire, before it is matched to a request.
///
/// The decoder is context-free: it recognises every reply line memcached sends in either protocol and
/// reads the data block after `VA` and `VALUE`. Which request a reply belongs to, and whether it is
/// acceptable for it, is the connection state machine's business.
struct MemcachedReply: Sendable, Hashable {
    enum Status: Sendable, Hashable {
        // meta protocol
        case metaValue  // VA <size> <flags>
        case metaHeader  // HD
        case metaMiss  // EN
        case metaNotFound  // NF
        case metaNotStored  // NS
        case metaExists  // EX
        case metaNoop  // MN
        // text protocol
        case textValue  // VALUE <key> <flags> <bytes> [<cas>]
        case end
        case stored
        case notStored
        case exists
        case notFound
        case deleted
        case touched
        case ok
        case version
        case stat
        case number
        // errors, either protocol
        case error
        case clientError
        case serverError
    }

    var status: Status
    var opaque: UInt32? = nil
    var cas: UInt64? = nil
    var flags: UInt32? = nil
    /// Remaining TTL in seconds (`t` flag; -1: never expires).
    var timeToLive: Int? = nil
    /// incr/decr reply in text mode.
    var number: UInt64? = nil
    var value: ByteBuffer? = nil
    /// The version string, the server's error message, or a stat's name.
    var text: String? = nil
    /// A stat's value.
    var statValue: String? = nil
    /// The key of a text `VALUE` line.
    var key: String? = nil

    init(_ status: Status) { self.status = status }

    var isError: Bool {
        switch status {
        case .error, .clientError, .serverError: return true
        default: return false
        }
    }
}

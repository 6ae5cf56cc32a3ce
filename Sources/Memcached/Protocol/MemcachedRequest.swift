import NIOCore

/// Which wire protocol the client speaks.
public enum MemcachedProtocolMode: String, Sendable, Hashable, CaseIterable {
    /// memcached's meta protocol (`mg`, `ms`, `md`, `ma`, `mn`): opaque tokens on every reply, quiet
    /// writes, conditional deletes, get-and-touch in one command. Needs memcached 1.6.10 or later.
    case meta
    /// The classic text protocol (`get`/`gets`/`gat`/`set`/`cas`/`delete`/`touch`/`incr`), for
    /// memcached-protocol stores and proxies without meta commands. Calls that need meta mode
    /// (conditional delete, counters with an initial value, quiet writes with error reporting)
    /// either fall back as documented on the call or fail with
    /// ``MemcachedError/Code/unsupportedInProtocolMode``.
    case text
}

/// How a storage command treats an existing item.
public enum MemcachedStoreMode: String, Sendable, Hashable {
    /// Store unconditionally.
    case set
    /// Store only if the key does not exist.
    case add
    /// Store only if the key exists.
    case replace
    /// Append to an existing value (flags and TTL are left as they are).
    case append
    /// Prepend to an existing value (flags and TTL are left as they are).
    case prepend
}

/// An item read from memcached.
public struct MemcachedItem: Sendable, Hashable {
    /// The stored bytes.
    public var value: ByteBuffer
    /// The client flags stored with the item.
    public var flags: UInt32
    /// The item's CAS unique, for a later conditional write.
    public var cas: UInt64?
    /// Seconds the item has left (-1: never expires), when the read asked for it
    /// (``MemcachedRequest/get(_:touch:withTimeToLive:)``, meta mode only); nil otherwise.
    public var timeToLive: Int?

    public init(value: ByteBuffer, flags: UInt32 = 0, cas: UInt64? = nil, timeToLive: Int? = nil) {
        self.value = value
        self.flags = flags
        self.cas = cas
        self.timeToLive = timeToLive
    }

    /// The value as UTF-8 text.
    public var string: String { String(buffer: value) }
}

/// The outcome of a storage command.
public enum MemcachedStoreResult: Sendable, Hashable {
    /// Stored. In meta mode the item's new CAS unique is returned; in text mode it is `nil`.
    case stored(cas: UInt64?)
    /// Not stored because the mode's condition failed (`add` on an existing key, `replace` or
    /// `append` on a missing one).
    case notStored
    /// A CAS write found another CAS unique: someone changed the item since it was read.
    case exists
    /// A CAS write found no item.
    case notFound

    /// Whether the value was stored.
    public var isStored: Bool {
        if case .stored = self { return true }
        return false
    }
}

/// The outcome of a delete.
public enum MemcachedDeleteResult: Sendable, Hashable {
    case deleted
    case notFound
    /// A conditional delete found another CAS unique: the item was not deleted.
    case exists
}

/// One `STAT name value` line.
public struct MemcachedStat: Sendable, Hashable {
    public var name: String
    public var value: String

    public init(name: String, value: String) {
        self.name = name
        self.value = value
    }
}

/// Which `stats` group to ask a node for.
public struct MemcachedStatsGroup: Sendable, Hashable, CustomStringConvertible {
    let argument: String?
    /// `stats`: the general counters.
    public static let general = MemcachedStatsGroup(argument: nil)
    /// `stats slabs`.
    public static let slabs = MemcachedStatsGroup(argument: "slabs")
    /// `stats items`.
    public static let items = MemcachedStatsGroup(argument: "items")
    /// `stats settings`.
    public static let settings = MemcachedStatsGroup(argument: "settings")
    /// `stats sizes`.
    public static let sizes = MemcachedStatsGroup(argument: "sizes")
    /// `stats conns`.
    public static let conns = MemcachedStatsGroup(argument: "conns")

    public var description: String { argument ?? "general" }
}

/// A command for a memcached node, built with the static functions below and run with
/// ``MemcachedCommandRunner/execute(_:)``.
public struct MemcachedRequest: Sendable {
    /// What the request asks the server to do. Public for implementations of
    /// ``MemcachedNodeCommandRunner`` other than the client's own (a simulated cluster in tests).
    public enum Command: Sendable {
        case get(key: String, value: Bool, touch: MemcachedTTL?)
        case store(key: String, value: ByteBuffer, flags: UInt32, ttl: MemcachedTTL, mode: MemcachedStoreMode, cas: UInt64?)
        case delete(key: String, cas: UInt64?)
        case touch(key: String, ttl: MemcachedTTL)
        case arithmetic(key: String, delta: UInt64, increment: Bool, initial: UInt64?, ttl: MemcachedTTL)
        case noop
        case version
        case stats(MemcachedStatsGroup)
    }

    public internal(set) var command: Command
    /// Quiet writes ask the server for no reply unless something fails (meta mode); the client
    /// still learns the outcome from the next reply on the connection and completes the call then.
    /// Ignored in text mode, where the write is acknowledged as usual.
    public var quiet: Bool = false
    /// Overrides the client's request timeout for this request.
    public var timeout: Duration?
    /// A get also returns the item's remaining TTL (meta mode only; ignored in text mode).
    public var returnsTimeToLive = false
    /// Whether cancelling the calling task fails the request at once (the default). Writes that
    /// must complete even when the task that issued them is cancelled (a lock release, the save at
    /// the end of a web request whose client went away) set it to false; they still end at their
    /// deadline.
    public var honorsCancellation = true
    /// Requests with the same affinity go over the same connection of a node, so they reach the
    /// server in the order they were sent (different connections may overtake each other): the
    /// first connection of the event loop the affinity picks (see
    /// ``MemcachedClient/Configuration/connectionsPerNode``).
    public var connectionAffinity: Int?
    /// The request may wait up to the client's ``MemcachedClient/Configuration/coalescingWindow``
    /// before it is written, so that it leaves in one write with other requests: for writes whose
    /// outcome nobody waits for (a backup copy). Any request that cannot wait flushes it at once.
    public var coalesces = false
    /// Sent only over a connection the node opened at or before this generation
    /// (``MemcachedNodeClient/connectionGeneration``, read before an earlier request); over a newer
    /// one it fails with ``MemcachedError/Code/connectionChanged`` before anything is sent.
    ///
    /// For a CAS unique remembered from one request to a later one: memcached counts CAS uniques
    /// from the start again when it restarts, so an old one could name another item's state there.
    /// A restart closes every connection opened before it, so a connection opened before the
    /// earlier request and still open reaches the same run of the server.
    public var connectionGenerationLimit: UInt64?

    init(_ command: Command) { self.command = command }

    /// Reads an item (value, flags and CAS). With `touch`, also sets a new TTL in the same round trip
    /// (`mg <key> v T<ttl>` in meta mode, `gats` in text mode).
    public static func get(_ key: String, touch: MemcachedTTL? = nil) -> MemcachedRequest {
        MemcachedRequest(.get(key: key, value: true, touch: touch))
    }

    /// Reads an item's flags, CAS unique and remaining TTL without its value (`mg <key> f c t`).
    /// The item's ``MemcachedItem/value`` is empty. In text mode, which cannot leave the value out,
    /// it is a `gets` (the value comes too) and the TTL is unknown.
    public static func getMetadata(_ key: String) -> MemcachedRequest {
        var request = MemcachedRequest(.get(key: key, value: false, touch: nil))
        request.returnsTimeToLive = true
        return request
    }

    /// Reads an item and its remaining TTL (``MemcachedItem/timeToLive``; meta mode only, nil in text mode).
    public static func get(_ key: String, touch: MemcachedTTL? = nil, withTimeToLive: Bool) -> MemcachedRequest {
        var request = MemcachedRequest(.get(key: key, value: true, touch: touch))
        request.returnsTimeToLive = withTimeToLive
        return request
    }

    /// Stores a value. With `cas`, only if the item's CAS unique still equals it.
    /// In text mode a CAS write must use mode ``MemcachedStoreMode/set`` (the `cas` command).
    public static func store(
        _ key: String, value: ByteBuffer, mode: MemcachedStoreMode = .set, ttl: MemcachedTTL = .never,
        flags: UInt32 = 0, cas: UInt64? = nil, quiet: Bool = false
    ) -> MemcachedRequest {
        var request = MemcachedRequest(.store(key: key, value: value, flags: flags, ttl: ttl, mode: mode, cas: cas))
        request.quiet = quiet
        return request
    }

    /// Deletes an item; with `cas`, only if its CAS unique still equals it (meta mode only).
    public static func delete(_ key: String, cas: UInt64? = nil, quiet: Bool = false) -> MemcachedRequest {
        var request = MemcachedRequest(.delete(key: key, cas: cas))
        request.quiet = quiet
        return request
    }

    /// Sets a new TTL without reading the value.
    public static func touch(_ key: String, ttl: MemcachedTTL) -> MemcachedRequest {
        MemcachedRequest(.touch(key: key, ttl: ttl))
    }

    /// Adds `delta` to a decimal counter. With `initial` (meta mode only), a missing counter is
    /// created with that value and `ttl`. Decrementing stops at 0, as memcached does.
    public static func arithmetic(
        _ key: String, delta: UInt64, increment: Bool = true, initial: UInt64? = nil, ttl: MemcachedTTL = .never
    ) -> MemcachedRequest {
        MemcachedRequest(.arithmetic(key: key, delta: delta, increment: increment, initial: initial, ttl: ttl))
    }

    /// A no-op that is answered in order: proves the connection is alive and everything before it
    /// was processed (`mn`; `version` in text mode).
    public static var noop: MemcachedRequest { MemcachedRequest(.noop) }
    /// The server's version string.
    public static var version: MemcachedRequest { MemcachedRequest(.version) }
    /// A node's statistics.
    public static func stats(_ group: MemcachedStatsGroup = .general) -> MemcachedRequest {
        MemcachedRequest(.stats(group))
    }

    /// The key the request is about, if any (used to pick a node).
    public var key: String? {
        switch command {
        case .get(let key, _, _), .store(let key, _, _, _, _, _), .delete(let key, _), .touch(let key, _),
            .arithmetic(let key, _, _, _, _):
            return key
        case .noop, .version, .stats:
            return nil
        }
    }

    /// Validates the request for `mode` and replaces its key by the wire key. Nothing is sent for a
    /// request that fails here.
    func prepared(
        mode: MemcachedProtocolMode, keyEncoding: MemcachedKeyEncoding, itemSizeLimit: Int
    ) throws(MemcachedError) -> MemcachedRequest {
        try rewrittenForWire(mode: mode, keyEncoding: keyEncoding, itemSizeLimit: itemSizeLimit) ?? self
    }

    /// Whether a meta-mode request with plain keys goes as it is (checked): a read, a write or a
    /// delete. (The command alone is matched: a match on `self.command` binds the payload from a
    /// copy of the whole request.)
    private static func goesAsIs(
        _ command: borrowing Command, quiet: Bool, itemSizeLimit: Int
    ) throws(MemcachedError) -> Bool {
        switch command {
        case .get(let key, _, _) where !quiet:
            try MemcachedKey.validate(key)
            return true
        case .store(let key, let value, _, _, _, _):
            try MemcachedKey.validate(key)
            try checkItemSize(valueBytes: value.readableBytes, wireKey: key, limit: itemSizeLimit)
            return true
        case .delete(let key, _):
            try MemcachedKey.validate(key)
            return true
        default:
            return false
        }
    }

    /// ``prepared(mode:keyEncoding:itemSizeLimit:)``, or nil when the request goes as it is: the
    /// usual case (meta mode, plain keys, a read, a write or a delete) is checked, not copied (a
    /// request's copy retains its key and value, and the client's hot path would copy each request
    /// several times).
    func rewrittenForWire(
        mode: MemcachedProtocolMode, keyEncoding: MemcachedKeyEncoding, itemSizeLimit: Int
    ) throws(MemcachedError) -> MemcachedRequest? {
        if mode == .meta, !keyEncoding.isBase64, try Self.goesAsIs(command, quiet: quiet, itemSizeLimit: itemSizeLimit) {
            return nil
        }
        var copy = self
        switch command {
        case .get(let key, let value, let touch):
            copy.quiet = false  // a quiet mg hides misses, not hits: no use for it here
            // The usual case (a plain key, meta mode, or a read with its value) keeps the command as
            // it is: no rebuilt enum, no extra retain and release of its key per request.
            if !keyEncoding.isBase64, value || mode == .meta {
                try MemcachedKey.validate(key)
                return copy
            }
            // Text mode: a metadata read is a `gets` (the value comes too; see ``getMetadata(_:)``).
            copy.command = .get(key: try MemcachedKey.wireKey(key, encoding: keyEncoding), value: value || mode == .text, touch: touch)
        case .store(let key, let value, let flags, let ttl, let storeMode, let cas):
            let wireKey = try MemcachedKey.wireKey(key, encoding: keyEncoding)
            try Self.checkItemSize(valueBytes: value.readableBytes, wireKey: wireKey, limit: itemSizeLimit)
            if mode == .text, cas != nil, storeMode != .set {
                throw MemcachedError.unsupported("a CAS write in mode \(storeMode) needs the meta protocol")
            }
            if keyEncoding.isBase64 {
                copy.command = .store(key: wireKey, value: value, flags: flags, ttl: ttl, mode: storeMode, cas: cas)
            }
        case .delete(let key, let cas):
            if mode == .text, cas != nil {
                throw MemcachedError.unsupported("a conditional delete needs the meta protocol")
            }
            copy.command = .delete(key: try MemcachedKey.wireKey(key, encoding: keyEncoding), cas: cas)
        case .touch(let key, let ttl):
            copy.command = .touch(key: try MemcachedKey.wireKey(key, encoding: keyEncoding), ttl: ttl)
            copy.quiet = false
        case .arithmetic(let key, let delta, let increment, let initial, let ttl):
            if mode == .text, initial != nil {
                throw MemcachedError.unsupported("a counter with an initial value needs the meta protocol")
            }
            copy.command = .arithmetic(
                key: try MemcachedKey.wireKey(key, encoding: keyEncoding), delta: delta, increment: increment,
                initial: initial, ttl: ttl)
            copy.quiet = false
        case .noop, .version, .stats:
            copy.quiet = false
        }
        if mode == .text { copy.quiet = false }
        return copy
    }

    /// memcached's item_size_max covers the item header, the key and the value; 64 bytes is a safe
    /// bound for the header and suffix on 64-bit builds.
    private static func checkItemSize(valueBytes: Int, wireKey: String, limit: Int) throws(MemcachedError) {
        if valueBytes + wireKey.utf8.count + 64 > limit {
            throw MemcachedError(
                code: .valueTooLarge, message: "value of \(valueBytes) bytes exceeds the item size limit of \(limit) bytes")
        }
    }
}

/// A reply to one ``MemcachedRequest``.
public enum MemcachedResponse: Sendable, Hashable {
    /// A get: the item, or `nil` for a miss.
    case item(MemcachedItem?)
    /// A store.
    case stored(MemcachedStoreResult)
    /// A delete.
    case deleted(MemcachedDeleteResult)
    /// A touch: whether the item existed.
    case touched(Bool)
    /// An increment or decrement: the new value, or `nil` when the counter does not exist.
    case counter(UInt64?)
    /// A no-op.
    case noop
    /// The server's version string.
    case version(String)
    /// A node's statistics, in the server's order.
    case stats([MemcachedStat])
}

extension MemcachedRequest.Command {
    /// Whether the command names a key (noop, version and stats go to a node).
    var hasKey: Bool {
        switch self {
        case .get, .store, .delete, .touch, .arithmetic: return true
        case .noop, .version, .stats: return false
        }
    }
}

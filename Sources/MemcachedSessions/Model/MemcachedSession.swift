import NIOCore
import Synchronization

/// When a session was created and used, how long it may live, and its version.
public struct SessionMetadata: Sendable, Hashable {
    /// Creation time, milliseconds since 1970.
    public var createdAt: Int64
    /// The last request that used the session and saved it, milliseconds since 1970. (Requests that
    /// only read the session slide its memcached TTL without rewriting it.)
    public var lastAccessedAt: Int64
    /// Idle timeout in seconds; 0 means the session never expires from inactivity. Kept within
    /// 0 to ``maximumTimeoutSeconds`` (larger values are clamped, negative ones mean none).
    public var idleTimeoutSeconds: Int64 {
        didSet { idleTimeoutSeconds = Self.clamped(idleTimeoutSeconds) }
    }
    /// Absolute lifetime in seconds from creation; 0 means none. Clamped like the idle timeout.
    public var absoluteTimeoutSeconds: Int64 {
        didSet { absoluteTimeoutSeconds = Self.clamped(absoluteTimeoutSeconds) }
    }
    /// Incremented by every save: the newest of several copies wins.
    public var version: UInt64

    /// The longest timeout a session can have: ten years (as the configuration allows). Longer
    /// ones are clamped to it, so that no timeout arithmetic (deadlines in nanoseconds, expiry
    /// times in milliseconds, memcached TTLs) can overflow.
    public static let maximumTimeoutSeconds: Int64 = 10 * 366 * 24 * 3600

    static func clamped(_ seconds: Int64) -> Int64 { min(max(seconds, 0), maximumTimeoutSeconds) }

    public init(
        createdAt: Int64, lastAccessedAt: Int64, idleTimeoutSeconds: Int64, absoluteTimeoutSeconds: Int64, version: UInt64
    ) {
        self.createdAt = createdAt
        self.lastAccessedAt = lastAccessedAt
        self.idleTimeoutSeconds = Self.clamped(idleTimeoutSeconds)
        self.absoluteTimeoutSeconds = Self.clamped(absoluteTimeoutSeconds)
        self.version = version
    }

    /// The idle timeout, or nil for none.
    public var idleTimeout: Duration? {
        idleTimeoutSeconds > 0 ? .seconds(idleTimeoutSeconds) : nil
    }

    /// The absolute timeout, or nil for none.
    public var absoluteTimeout: Duration? {
        absoluteTimeoutSeconds > 0 ? .seconds(absoluteTimeoutSeconds) : nil
    }

    /// Whether the absolute lifetime is over at `now` (milliseconds since 1970).
    func isPastAbsoluteTimeout(now: Int64) -> Bool {
        guard let end = absoluteEndMillis else { return false }
        return now >= end
    }

    /// When the absolute lifetime ends (milliseconds since 1970), or nil for none. Saturates
    /// rather than overflowing, whatever a codec decoded.
    var absoluteEndMillis: Int64? {
        guard absoluteTimeoutSeconds > 0 else { return nil }
        let (end, overflow) = createdAt.addingReportingOverflow(absoluteTimeoutSeconds * 1000)
        return overflow ? .max : end
    }
}

/// What a codec turns into bytes: the metadata and each stored attribute's encoded value.
public struct SessionRecord: Sendable, Hashable {
    public var metadata: SessionMetadata
    /// Attribute name to the attribute codec's bytes.
    public var attributes: [String: ByteBuffer]

    public init(metadata: SessionMetadata, attributes: [String: ByteBuffer]) {
        self.metadata = metadata
        self.attributes = attributes
    }
}

extension SessionRecord {
    /// What a copy changed since `base`, a copy it descends from: each attribute whose value
    /// differs (nil: removed since), and the idle timeout when it differs.
    struct Changes: Sendable, Equatable {
        var attributes: [String: ByteBuffer?]
        var idleTimeoutSeconds: Int64?

        var isEmpty: Bool { attributes.isEmpty && idleTimeoutSeconds == nil }
    }

    /// This copy's changes since `base` (see ``Changes``): what a three-way merge carries over.
    func changes(since base: SessionRecord) -> Changes {
        var changed: [String: ByteBuffer?] = [:]
        for (name, value) in attributes where base.attributes[name] != value {
            changed.updateValue(value, forKey: name)
        }
        for name in base.attributes.keys where attributes[name] == nil {
            changed.updateValue(nil, forKey: name)
        }
        let idle = metadata.idleTimeoutSeconds
        return Changes(attributes: changed, idleTimeoutSeconds: idle != base.metadata.idleTimeoutSeconds ? idle : nil)
    }
}

/// A session's change the principal index must learn: the entry to remove and the one to add
/// (principal attribute bytes, token).
struct PrincipalIndexChange: Sendable {
    var old: (principal: ByteBuffer, token: MemcachedSessionID.Token)?
    var new: (principal: ByteBuffer, token: MemcachedSessionID.Token)?
    var createdAt: Int64
    var nodeID: String
    var route: String?
}

enum PrincipalIndexWork: Sendable {
    case changed(PrincipalIndexChange)
    /// The session ended while indexed under this principal and token.
    case ended(principal: ByteBuffer, token: MemcachedSessionID.Token)
}

/// One user's session: named attributes with typed `Codable` access, and metadata.
///
/// Values are encoded when set and decoded when read, so a `MemcachedSession` only ever holds bytes: change
/// an attribute by setting it again (mutating an object read from it changes nothing). Setting a
/// value whose encoding equals the stored one is not a change, and a session with no change is
/// not written back.
///
/// Thread-safe; in sticky mode concurrent requests of one user share the instance's copy.
public final class MemcachedSession: Sendable {
    struct State: Sendable {
        var id: MemcachedSessionID
        var metadata: SessionMetadata
        var attributes: [String: ByteBuffer]
        /// Attributes excluded by the attribute filter: kept for this copy, never stored.
        var transient: [String: ByteBuffer] = [:]
        /// Changes not yet in memcached, by attribute (nil: removed). A CAS conflict re-applies
        /// exactly these onto the newer stored copy.
        var changes: [String: ByteBuffer?] = [:]
        var metadataChanged = false
        /// The session moved (new node or new id): the next save writes it in full with an add,
        /// since the CAS unique of the old place means nothing at the new one.
        var moved = false
        /// The stored copy's CAS unique this state derives from; nil when never stored.
        var casUnique: UInt64?
        var isNew: Bool
        /// A save was sent (acknowledged or not): a copy may be in memcached even while the
        /// session is still new (an add whose reply was lost).
        var saveSent = false
        var invalidated = false
        var invalidatedElsewhere = false
        /// Sticky: the route of the instance this one took the session over from.
        var takenOverFrom: String?
        /// Sticky: another instance took the session over; this copy is dead here (its queued
        /// asynchronous write is dropped, as an app-server failover would).
        var takenOver = false
        /// Bumped by every change: a save that raced a change knows to keep the change pending.
        var generation: UInt64 = 0
        /// The memcached keys of the current token (a SHA-256 away from the token: computed once).
        var keys: SessionKeys?
        /// What the principal index holds for this session: the principal attribute's bytes and
        /// the token as the session was loaded, or as this instance last indexed it.
        var indexedPrincipal: ByteBuffer?
        var indexedToken: MemcachedSessionID.Token
        var indexedRoute: String?
    }

    let state: Mutex<State>
    let codec: any SessionCodec

    /// The CAS unique of the stored copy this session derives from (nil when never stored, or
    /// moved: its next save is an add).
    var storedCasUnique: UInt64? { state.withLock { $0.moved ? nil : $0.casUnique } }
    let attributeFilter: PathPattern?
    /// The version of the stored copy this session object was made from (0: a new session). A
    /// sticky instance's ownership notice names the version its sender read: a copy taken at a
    /// later version was taken after the notice was sent, and stays.
    let acquiredVersion: UInt64

    init(
        id: MemcachedSessionID, record: SessionRecord, casUnique: UInt64?, isNew: Bool, codec: any SessionCodec,
        attributeFilter: PathPattern?
    ) {
        self.state = Mutex(
            State(
                id: id, metadata: record.metadata, attributes: record.attributes, casUnique: casUnique, isNew: isNew,
                indexedPrincipal: record.attributes[Self.principalAttribute], indexedToken: id.token, indexedRoute: id.route))
        self.codec = codec
        self.attributeFilter = attributeFilter
        self.acquiredVersion = isNew ? 0 : record.metadata.version
    }

    /// The session's current id (it changes when the session moves to another node, is taken over
    /// by another instance, or on ``SessionAccess/regenerateID()``).
    public var id: MemcachedSessionID { state.withLock { $0.id } }

    /// Creation time, last saved access, timeouts and version.
    public var metadata: SessionMetadata { state.withLock { $0.metadata } }

    /// Whether the session was created by this request (or has never been stored yet).
    public var isNew: Bool { state.withLock { $0.isNew } }

    /// Whether memcached may hold a copy: the session was stored, or a save of it was sent (its
    /// outcome unknown). A logout then writes tombstones.
    var mayBeStored: Bool { state.withLock { !$0.isNew || $0.saveSent } }

    /// Whether ``invalidate()`` was called.
    public var isInvalidated: Bool { state.withLock { $0.invalidated } }

    /// The names of the session's attributes.
    public var attributeNames: [String] {
        state.withLock { Array($0.attributes.keys) + Array($0.transient.keys) }
    }

    /// Whether an attribute exists.
    public func contains(_ name: String) -> Bool {
        state.withLock { $0.attributes[name] != nil || $0.transient[name] != nil }
    }

    /// An attribute decoded as `type`, or nil when there is none.
    /// - Throws: ``SessionError/Code/decodingFailed`` when the stored value is not a `type`.
    public func get<Value: Decodable>(_ name: String, as type: Value.Type = Value.self) throws(SessionError) -> Value? {
        guard let bytes = state.withLock({ $0.attributes[name] ?? $0.transient[name] }) else { return nil }
        do {
            return try codec.decodeValue(type, from: bytes)
        } catch {
            throw SessionError(code: .decodingFailed, message: "attribute '\(name)' is not a \(Value.self): \(error.reason)")
        }
    }

    /// An attribute decoded as `type`; nil when there is none or it is not a `type`.
    public subscript<Value: Decodable>(_ name: String, as type: Value.Type) -> Value? {
        try? get(name, as: type)
    }

    /// The raw encoded bytes of an attribute (for tools; values are whatever the codec wrote).
    public func encodedValue(of name: String) -> ByteBuffer? {
        state.withLock { $0.attributes[name] ?? $0.transient[name] }
    }

    /// Sets an attribute.
    /// - Throws: ``SessionError/Code/encodingFailed`` when the value cannot be encoded,
    ///   ``SessionError/Code/invalidated`` after ``invalidate()``.
    public func set<Value: Encodable>(_ name: String, _ value: Value) throws(SessionError) {
        let bytes: ByteBuffer
        do {
            bytes = try codec.encodeValue(value)
        } catch {
            throw SessionError(code: .encodingFailed, message: "attribute '\(name)' could not be encoded: \(error.reason)")
        }
        try setEncoded(name, bytes)
    }

    /// Sets an attribute from bytes already in the codec's format.
    public func setEncoded(_ name: String, _ bytes: ByteBuffer) throws(SessionError) {
        let stored = attributeFilter.map { $0.matches(name) } ?? true
        try state.withLock { state throws(SessionError) in
            guard !state.invalidated else { throw SessionError(code: .invalidated, message: "the session was invalidated") }
            if !stored {
                state.transient[name] = bytes
                return
            }
            if state.attributes[name] == bytes { return }
            state.attributes[name] = bytes
            state.changes[name] = .some(bytes)
            state.generation &+= 1
        }
    }

    /// Removes an attribute.
    public func remove(_ name: String) {
        state.withLock { state in
            if state.transient.removeValue(forKey: name) != nil { return }
            guard !state.invalidated, state.attributes.removeValue(forKey: name) != nil else { return }
            state.changes[name] = .some(nil)
            state.generation &+= 1
        }
    }

    /// The reserved attribute that holds the session's principal.
    public static let principalAttribute = "msm.principal"
    /// The longest principal, in UTF-8 bytes.
    public static let maximumPrincipalLength = 256

    /// The user this session belongs to (set after a login with ``setPrincipal(_:)``), or nil.
    /// ``SessionManager/invalidateAll(principal:)`` ends every session of a principal.
    public var principal: String? {
        guard let bytes = state.withLock({ $0.attributes[Self.principalAttribute] }) else { return nil }
        return try? codec.decodeValue(String.self, from: bytes)
    }

    /// Names the user this session belongs to (after a login), or none (nil). At the end of the
    /// request the session is entered in that principal's index in memcached (and removed from
    /// the previous principal's), so that ``SessionManager/invalidateAll(principal:)`` can end it.
    /// Stored as the attribute ``principalAttribute`` (never filtered out).
    /// - Throws: ``SessionError/Code/invalidArgument`` for an empty principal or one longer than
    ///   ``maximumPrincipalLength`` bytes; ``SessionError/Code/invalidated`` after ``invalidate()``.
    public func setPrincipal(_ principal: String?) throws(SessionError) {
        var bytes: ByteBuffer? = nil
        if let principal {
            guard !principal.isEmpty, principal.utf8.count <= Self.maximumPrincipalLength else {
                throw SessionError(
                    code: .invalidArgument, message: "a principal must be 1 to \(Self.maximumPrincipalLength) bytes of UTF-8")
            }
            do {
                bytes = try codec.encodeValue(principal)
            } catch {
                throw SessionError(code: .encodingFailed, message: "the principal could not be encoded: \(error.reason)")
            }
        }
        let name = Self.principalAttribute
        try state.withLock { state throws(SessionError) in
            guard !state.invalidated else { throw SessionError(code: .invalidated, message: "the session was invalidated") }
            if state.attributes[name] == bytes { return }
            state.attributes[name] = bytes
            state.changes[name] = .some(bytes)
            state.generation &+= 1
        }
    }

    /// What the principal index has not seen yet, in one look: a change (a login, a logout of
    /// the principal that keeps the session, a new id), or the session's end (a logout) while it
    /// is indexed; nil when there is nothing.
    func principalIndexWork() -> PrincipalIndexWork? {
        state.withLock { state in
            let now = state.attributes[Self.principalAttribute]
            if state.invalidated {
                return state.indexedPrincipal.map { .ended(principal: $0, token: state.indexedToken) }
            }
            // A new token (a login's new id) or a new route (a sticky takeover): the entry follows.
            guard now != state.indexedPrincipal || (now != nil && (state.id.token != state.indexedToken || state.id.route != state.indexedRoute))
            else { return nil }
            return .changed(
                PrincipalIndexChange(
                    old: state.indexedPrincipal.map { ($0, state.indexedToken) }, new: now.map { ($0, state.id.token) },
                    createdAt: state.metadata.createdAt, nodeID: state.id.nodeID, route: state.id.route))
        }
    }

    /// Sticky: the principal index's entry for this session names another instance's route (a
    /// takeover whose index update failed, tried again at each request until it lands). A
    /// revocation would notify that instance, not this one: until the entry follows, this
    /// instance checks the stored copy (where a revocation's tombstone lands) before serving it.
    var indexNamesAnotherRoute: Bool {
        state.withLock { state in
            guard let principal = state.attributes[Self.principalAttribute], state.indexedPrincipal == principal,
                state.indexedToken == state.id.token
            else { return false }
            return state.indexedRoute != state.id.route
        }
    }

    /// Sticky takeover: the principal index's entry (if any) still names `route`, the previous
    /// owner's; the end of the request moves it to this instance's (``principalIndexWork()``).
    func markIndexedRoute(_ route: String?) {
        state.withLock { state in
            if state.indexedToken == state.id.token { state.indexedRoute = route }
        }
    }

    /// The principal index no longer holds this session (its logout removed the entry).
    func markUnindexed() {
        state.withLock { $0.indexedPrincipal = nil }
    }

    /// The principal index now holds `change`'s new state.
    func markIndexed(_ change: PrincipalIndexChange) {
        state.withLock { state in
            state.indexedPrincipal = change.new?.principal
            if let token = change.new?.token {
                state.indexedToken = token
                state.indexedRoute = change.route
            }
        }
    }


    /// Sets this session's idle timeout (e.g. longer for "remember me"); zero or less: never
    /// expires from inactivity.
    ///
    /// Timeouts longer than ``SessionMetadata/maximumTimeoutSeconds`` (ten years) are clamped to it.
    public func setIdleTimeout(_ timeout: Duration) {
        let seconds = SessionMetadata.clamped(timeout.components.seconds)
        state.withLock { state in
            guard state.metadata.idleTimeoutSeconds != seconds else { return }
            state.metadata.idleTimeoutSeconds = seconds
            state.metadataChanged = true
            state.generation &+= 1
        }
    }

    /// Ends the session: every copy (memcached primary and backup, its lock, this instance's
    /// memory) is removed at the end of the request, and the cookie is cleared.
    public func invalidate() {
        invalidate(byAnotherRequest: false)
    }

    /// Ends the session; `byAnotherRequest`: the manager found it ended elsewhere (its stored
    /// copy deleted by a logout on another instance), so this request must not clear the cookie.
    func invalidate(byAnotherRequest: Bool) {
        state.withLock { state in
            if !state.invalidated { state.invalidatedElsewhere = byAnotherRequest }
            state.invalidated = true
            state.generation &+= 1
        }
    }

    /// Ends the session as ``invalidate(byAnotherRequest:)`` does, but only while it still has
    /// `token`: a concurrent request of this instance may have given it a new id (a login) since
    /// the copy that said "ended" was read, and the old id's end is not the new one's. Returns
    /// whether it ended the session.
    @discardableResult
    func invalidate(byAnotherRequest: Bool, ifToken token: MemcachedSessionID.Token) -> Bool {
        state.withLock { state in
            guard state.id.token == token else { return false }
            if !state.invalidated { state.invalidatedElsewhere = byAnotherRequest }
            state.invalidated = true
            state.generation &+= 1
            return true
        }
    }

    /// Whether the manager found the session ended elsewhere (not by this instance's requests).
    var wasInvalidatedElsewhere: Bool { state.withLock { $0.invalidatedElsewhere } }

    /// Sticky: the route this instance took the session over from (nil: it was never another's).
    var takenOverFrom: String? {
        get { state.withLock { $0.takenOverFrom } }
        set { state.withLock { $0.takenOverFrom = newValue } }
    }
    var isTakenOver: Bool { state.withLock { $0.takenOver } }

    /// The state as it is (no version bump, no access), for writing a lost copy back.
    var currentRecord: SessionRecord { state.withLock { SessionRecord(metadata: $0.metadata, attributes: $0.attributes) } }

    /// The stored copy's CAS unique changed (this instance wrote it back as it was).
    func setStoredCasUnique(_ cas: UInt64?, ifVersion version: UInt64) {
        state.withLock { state in
            if state.metadata.version == version { state.casUnique = cas }
        }
    }

    /// A copy of a session this instance has ended meanwhile: served as ended.
    func endedHere() -> MemcachedSession {
        invalidate(byAnotherRequest: true)
        return self
    }
    func markTakenOver() { state.withLock { $0.takenOver = true } }

    // MARK: - for the manager

    /// A session this request created that holds no attribute: never written to memcached and
    /// given no cookie (a visitor who never logs in or puts anything in a session costs nothing).
    var isEmptyNew: Bool {
        state.withLock { $0.isNew && !$0.saveSent && $0.attributes.isEmpty && $0.transient.isEmpty }
    }

    /// Whether there is anything to save.
    var hasUnsavedChanges: Bool {
        state.withLock { !$0.changes.isEmpty || $0.metadataChanged || $0.isNew || $0.moved }
    }

    struct Snapshot {
        var id: MemcachedSessionID
        var record: SessionRecord
        var casUnique: UInt64?
        var changes: [String: ByteBuffer?]
        var metadataChanged: Bool
        var isNew: Bool
        var moved: Bool
        var generation: UInt64
    }

    /// The state to save, with the version and access time it will be saved with.
    func snapshotForSave(now: Int64) -> Snapshot {
        state.withLock { state in
            state.saveSent = true
            var metadata = state.metadata
            metadata.version &+= 1
            metadata.lastAccessedAt = max(metadata.lastAccessedAt, now)
            return Snapshot(
                id: state.id, record: SessionRecord(metadata: metadata, attributes: state.attributes),
                casUnique: state.casUnique, changes: state.changes, metadataChanged: state.metadataChanged,
                isNew: state.isNew, moved: state.moved, generation: state.generation)
        }
    }

    /// Records a successful save of `snapshot` (possibly merged into `saved`): changes made since
    /// the snapshot stay pending.
    func markSaved(_ snapshot: Snapshot, saved record: SessionRecord, casUnique: UInt64?) {
        state.withLock { state in
            // Saved under an id the session no longer has (a login gave it a new one meanwhile),
            // or on a node it has left (a concurrent request moved it meanwhile): nothing of it
            // is saved where the session is now (the simulation, seed 14589).
            guard state.id.token == snapshot.id.token, state.id.nodeID == snapshot.id.nodeID else { return }
            // Acknowledged after a newer save of this copy was (two requests of a sticky session
            // on one instance save the shared copy concurrently; their replies' tasks may resume
            // in either order): the newer one holds everything this one saved and set the state
            // past it. Applying this one now would take the copy back to the older record and CAS
            // unique (the simulation, sticky-sync seed 657: an attribute a concurrent request set
            // vanished from memory, while memcached had it).
            // (By version, not CAS unique: text mode's writes return none.)
            guard record.metadata.version > state.metadata.version else { return }
            state.casUnique = casUnique
            state.isNew = false
            state.moved = false
            if state.generation == snapshot.generation {
                state.attributes = record.attributes
                state.metadata = record.metadata
                state.changes = [:]
                state.metadataChanged = false
            } else {
                // Changes raced the save: keep them, and take what the save merged in underneath.
                var attributes = record.attributes
                for (name, change) in state.changes where snapshot.changes[name] == nil || snapshot.changes[name]! != change {
                    attributes[name] = change
                }
                let pending = state.changes.filter { snapshot.changes[$0.key] == nil || snapshot.changes[$0.key]! != $0.value }
                state.attributes = attributes
                state.changes = pending
                let idle = state.metadataChanged ? state.metadata.idleTimeoutSeconds : record.metadata.idleTimeoutSeconds
                state.metadata = record.metadata
                state.metadata.idleTimeoutSeconds = idle
            }
        }
    }

    /// Replaces the state with a stored copy newer than it, unless it has changes of its own
    /// (which its next save merges onto the stored copy): one look, so that a change a concurrent
    /// request makes between the check and the replacement is not lost. Returns whether it did.
    func replaceIfNewerAndUnchanged(with record: SessionRecord, casUnique: UInt64?) -> Bool {
        state.withLock { state in
            guard record.metadata.version > state.metadata.version, state.changes.isEmpty, !state.metadataChanged, !state.isNew,
                !state.moved
            else { return false }
            state.metadata = record.metadata
            state.attributes = record.attributes
            state.casUnique = casUnique
            state.changes = [:]
            state.metadataChanged = false
            state.isNew = false
            return true
        }
    }

    func setID(_ id: MemcachedSessionID) {
        state.withLock { state in
            if state.id.token != id.token { state.keys = nil }
            state.id = id
        }
    }

    /// The memcached keys of the session's current token, computed once; again after a
    /// storage-key switch (keys keyed from a time on) when `followsSwitch`. Keyed keys never go
    /// back to unkeyed ones (a session found under its keyed keys just before the switch).
    func keys(prefix: String, secret: StorageKeySecret? = nil, followsSwitch: Bool = false) -> SessionKeys {
        if let (keys, token) = state.withLock({ state in state.keys.map { ($0, state.id.token) } }), keys.token == token,
            !followsSwitch || keys.isKeyed || secret == nil
        {
            return keys
        }
        let token = id.token
        let keys = SessionKeys(token: token, prefix: prefix, secret: secret)
        state.withLock { state in
            if state.id.token == token { state.keys = keys }
        }
        return keys
    }

    func cacheKeys(_ keys: SessionKeys) {
        state.withLock { state in
            if state.id.token == keys.token { state.keys = keys }
        }
    }

    /// Marks the whole session as changed: it must be written in full to a new place.
    /// The session moved (relocated, recovered from a backup, a new id): its next save writes it
    /// in full at the new place, with an add. Only the request's own changes count as changes: if
    /// the add finds a copy there (a concurrent request recovered it first), the merge re-applies
    /// just those, not the whole, possibly older, copy this request recovered.
    func markAllChanged() {
        state.withLock { state in
            state.moved = true
            state.generation &+= 1
        }
    }
}

extension MemcachedSession {
    /// A fork's merge: `saved` (the copy a save wrote, with `snapshot`'s changes) and `fork` (the
    /// other copy of its version) diverged from one copy; `current` is the primary now (`saved`,
    /// `fork`, or a copy a later write made from either). Each attribute the two copies disagree
    /// on gets the side that changed it (the save's, when `snapshot` changed it; the fork's,
    /// otherwise) unless `current` holds neither copy's value (a later write changed it: that
    /// write stands). Not told apart: a later write that set such an attribute back to the value
    /// of the side that did not change it (it is taken for that side's copy, and the change
    /// applied over it).
    static func merge(
        _ snapshot: Snapshot, saved: SessionRecord, fork: SessionRecord, onto current: SessionRecord, now: Int64
    ) -> SessionRecord {
        var merged = current
        for name in Set(saved.attributes.keys).union(fork.attributes.keys) {
            let ours = saved.attributes[name]
            let theirs = fork.attributes[name]
            guard ours != theirs else { continue }
            let present = current.attributes[name]
            if snapshot.changes[name] != nil {
                if present == theirs { merged.attributes[name] = ours }
            } else if present == ours {
                merged.attributes[name] = theirs
            }
        }
        let (ours, theirs, present) = (saved.metadata.idleTimeoutSeconds, fork.metadata.idleTimeoutSeconds, current.metadata.idleTimeoutSeconds)
        if ours != theirs {
            if snapshot.metadataChanged {
                if present == theirs { merged.metadata.idleTimeoutSeconds = ours }
            } else if present == ours {
                merged.metadata.idleTimeoutSeconds = theirs
            }
        }
        merged.metadata.version = max(current.metadata.version, saved.metadata.version, fork.metadata.version) &+ 1
        merged.metadata.lastAccessedAt = max(current.metadata.lastAccessedAt, fork.metadata.lastAccessedAt, now)
        return merged
    }

    /// Applies the changes of `snapshot` onto a newer stored `record` (CAS conflict resolution).
    static func merge(_ snapshot: Snapshot, onto stored: SessionRecord, now: Int64) -> SessionRecord {
        var merged = stored
        for (name, change) in snapshot.changes {
            merged.attributes[name] = change
        }
        if snapshot.metadataChanged {
            merged.metadata.idleTimeoutSeconds = snapshot.record.metadata.idleTimeoutSeconds
        }
        merged.metadata.version = max(stored.metadata.version, snapshot.record.metadata.version - 1) &+ 1
        merged.metadata.lastAccessedAt = max(stored.metadata.lastAccessedAt, now)
        return merged
    }
}

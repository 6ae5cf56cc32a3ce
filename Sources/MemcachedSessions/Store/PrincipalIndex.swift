import Crypto
import Logging
import Memcached
import NIOCore

/// One session in a principal's index: its token digest (never the token), the node it was on
/// when indexed, when it was created, and (sticky mode) the route of the instance that held it,
/// which a revocation tells at once.
struct PrincipalIndexEntry: Sendable, Hashable {
    var digest: String
    var nodeID: String
    var createdAt: Int64
    var route: String?
}

/// Every session of a principal (a user), so that all of them can be ended at once
/// (``SessionManager/invalidateAll(principal:)``, after a password change).
///
/// - Key: `<prefix>p:<32 hex of HMAC-SHA256(principal)>`, under the storage key secret when one
///   is set (else a SHA-256 with a fixed label): a dump of memcached's keys names nobody.
/// - Place: the node the key's digest picks in the configured order; a backup on the next node,
///   under `<prefix>q:<same>`.
/// - Value: a version and the entries, oldest first (`<digest> <node> <created ms> <route or .>`); sealed (bound to the index key) when
///   sealing keys are set. Token digests only, never tokens.
/// - Updates: the newer copy (by version) is the base; the primary is the one authority while its
///   node answers, written with CAS (an add when it has no copy), retried on a conflict with
///   jittered backoff, bounded; the backup is then overwritten with the same bytes. Only when the
///   primary's node does not answer is the backup the authority. (Two authorities at once, the
///   primary for one update and a backup newer than it for another, lost entries: one update's CAS
///   on the primary and the other's plain copy over it.) A node that comes back with an older copy
///   is outvoted by the version.
struct PrincipalIndex: SessionManagerPart {
    let context: SessionContext
    let store: SessionStore

    static let header = "msm-principals 1 "
    static let maximumAttempts = 16

    struct Located: Sendable {
        var primaryKey: String
        var backupKey: String
        var primaryNode: String
        var backupNode: String?
    }

    /// The index's keys and nodes for a principal (its attribute bytes as the codec wrote them),
    /// keyed as storage keys are (``SessionContext/storageKeySecret``).
    func locate(_ principal: ByteBuffer) -> Located {
        locate(principal, secret: context.storageKeySecret)
    }

    /// After a storage-key switch (``SessionManager/Configuration/Sealing/keyedStorageKeysFrom``),
    /// where the index was kept before it (unkeyed); nil otherwise.
    func locateBeforeSwitch(_ principal: ByteBuffer) -> Located? {
        guard configuration.sealing.keyedStorageKeysFrom != nil, context.storageKeySecret != nil else { return nil }
        return locate(principal, secret: nil)
    }

    /// In the minute before a storage-key switch (``SessionContext/isShortOfKeySwitch``), where
    /// instances whose clocks are past it keep the index (keyed); nil otherwise.
    func locateAfterSwitch(_ principal: ByteBuffer) -> Located? {
        guard context.isShortOfKeySwitch, let secret = configuration.sealing.storageKeySecret else { return nil }
        return locate(principal, secret: secret)
    }

    private func locate(_ principal: ByteBuffer, secret: StorageKeySecret?) -> Located {
        let bytes = Array(principal.readableBytesView)
        let digest: [UInt8] =
            if let secret {
                secret.digest(Array("msm principal|".utf8) + bytes)
            } else {
                Array(SHA256.hash(data: Array("msm principal|".utf8) + bytes))
            }
        let hex = SessionKeys.hex(digest.prefix(16))
        let order = topology.order.filter { !topology.isDraining($0) }
        let nodes = order.isEmpty ? topology.order : order
        let start = Int(digest[0]) << 8 | Int(digest[1])
        let primary = nodes[start % nodes.count]
        let backup = nodes.count > 1 ? nodes[(start + 1) % nodes.count] : nil
        return Located(
            primaryKey: configuration.keyPrefix + "p:" + hex, backupKey: configuration.keyPrefix + "q:" + hex, primaryNode: primary,
            backupNode: backup)
    }

    // MARK: - the stored form

    struct Contents: Sendable, Equatable {
        var version: UInt64
        var entries: [PrincipalIndexEntry]
    }

    enum Read: Sendable {
        case found(Contents, cas: UInt64?)
        case missing
        case unreachable
    }

    private func associatedData(_ key: String) -> [UInt8] {
        Array("msm principal index|".utf8) + SessionSealer.associatedData(forKey: key)
    }

    func encode(_ contents: Contents, key: String) throws(SessionError) -> ByteBuffer {
        var text = Self.header + String(contents.version) + "\n"
        for entry in contents.entries { text += "\(entry.digest) \(entry.nodeID) \(entry.createdAt) \(entry.route ?? ".")\n" }
        let plain = store.byteBufferAllocator.buffer(string: text)
        guard let sealer = context.sealer, !configuration.sealing.writesUnsealed else { return plain }
        return try sealer.seal(plain, associatedData: associatedData(key), allocator: store.byteBufferAllocator)
    }

    /// The contents, or nil for bytes that are neither a valid index nor one that opens.
    func decode(_ bytes: ByteBuffer, key: String) -> Contents? {
        var plain = bytes
        if let sealer = context.sealer, SessionSealer.isSealed(bytes) {
            guard let opened = try? sealer.open(bytes, associatedData: associatedData(key)) else {
                statistics.count(.sealedOpenFailures)
                return nil
            }
            plain = opened.plaintext
        } else if context.sealer != nil, !store.acceptsUnsealed {
            statistics.count(.unsealedRefused)
            return nil
        }
        guard let text = plain.getString(at: plain.readerIndex, length: plain.readableBytes), text.hasPrefix(Self.header) else {
            return nil
        }
        var lines = text.dropFirst(Self.header.count).split(separator: "\n", omittingEmptySubsequences: false)
        guard lines.last == "" else { return nil }
        lines.removeLast()
        guard let first = lines.first, let version = UInt64(first) else { return nil }
        var entries: [PrincipalIndexEntry] = []
        for line in lines.dropFirst() {
            let fields = line.split(separator: " ", omittingEmptySubsequences: false)
            guard fields.count == 4, SessionKeys.isDigest(fields[0]), !fields[1].isEmpty, let created = Int64(fields[2]), !fields[3].isEmpty
            else {
                return nil
            }
            entries.append(
                PrincipalIndexEntry(
                    digest: String(fields[0]), nodeID: String(fields[1]), createdAt: created, route: fields[3] == "." ? nil : String(fields[3])))
        }
        return Contents(version: version, entries: entries)
    }

    func read(key: String, on nodeID: String?) async -> Read {
        guard let nodeID, let node = topology.node(nodeID) else { return .unreachable }
        countRoundTrip()
        do throws(MemcachedError) {
            guard case .item(let item) = try await node.execute(prepared(.get(key))) else { return .unreachable }
            guard let item else { return .missing }
            guard let contents = decode(item.value, key: key) else {
                // Tampered, foreign or corrupt: unusable, and nothing says which sessions it held.
                logger.warning("a principal index that does not open or parse was ignored", metadata: ["memcached.node": "\(nodeID)"])
                return .missing
            }
            return .found(contents, cas: item.cas)
        } catch {
            return .unreachable
        }
    }

    /// Both copies, read in parallel.
    func readBoth(_ located: Located) async -> (primary: Read, backup: Read) {
        async let primary = read(key: located.primaryKey, on: located.primaryNode)
        // A single node has no backup: nothing to read there, which is not a node down.
        async let backup = located.backupNode == nil ? Read.missing : read(key: located.backupKey, on: located.backupNode)
        return await (primary, backup)
    }

    /// What the two copies say.
    enum Newest: Sendable {
        /// Neither node answered.
        case noAnswer
        /// No copy (`primaryAnswered`: the primary's node answered).
        case none(primaryAnswered: Bool)
        /// The newer copy (the primary on a tie), with its CAS unique.
        case found(Contents, fromPrimary: Bool, cas: UInt64?)
    }

    static func newest(_ primary: Read, _ backup: Read) -> Newest {
        switch (primary, backup) {
        case (.unreachable, .unreachable): return .noAnswer
        case (.found(let p, let pc), .found(let b, let bc)):
            return b.version > p.version ? .found(b, fromPrimary: false, cas: bc) : .found(p, fromPrimary: true, cas: pc)
        case (.found(let p, let pc), _): return .found(p, fromPrimary: true, cas: pc)
        case (_, .found(let b, let bc)): return .found(b, fromPrimary: false, cas: bc)
        case (.unreachable, _): return .none(primaryAnswered: false)
        default: return .none(primaryAnswered: true)
        }
    }

    // MARK: - updates

    enum UpdateOutcome: Sendable {
        /// Written; `dropped`: entries taken out to make room (to be ended).
        case written(dropped: [PrincipalIndexEntry])
        /// `mutate` refused the change (a login past the concurrent-session limit).
        case refused
    }

    /// Applies `mutate` to the index (CAS on the authority, then the other copy). `mutate` gets
    /// the entries and returns the new ones and those it dropped, or nil to refuse the change.
    /// Past the index limit the oldest entries are dropped too (returned, to be ended).
    /// - Throws: ``SessionError/Code/principalIndexUnavailable`` when no copy could be read or
    ///   written, or the CAS kept conflicting.
    func update(
        _ located: Located,
        mutate: ([PrincipalIndexEntry]) async -> (entries: [PrincipalIndexEntry], dropped: [PrincipalIndexEntry])?
    ) async throws(SessionError) -> UpdateOutcome {
        for attempt in 0..<Self.maximumAttempts {
            if attempt > 0 {
                // Contention (many logins of one principal at once): back off, jittered, so that
                // each round lets one through instead of all colliding again.
                let base = Double(1_000_000 << min(attempt - 1, 5))
                try? await clock.sleep(for: .nanoseconds(Int64(base * (0.5 + context.unitRandom()))))
            }
            let (primary, backup) = await readBoth(located)
            let base: Contents
            switch Self.newest(primary, backup) {
            case .noAnswer:
                throw Self.unavailable("neither node of the principal index answered", ended: nil)
            case .none:
                base = Contents(version: 0, entries: [])
            case .found(let contents, _, _):
                base = contents
            }
            // The primary is the authority whenever its node answered (CAS over its copy, or an
            // add when it has none); the backup only when it did not.
            let toPrimary: Bool
            let cas: UInt64?
            switch (primary, backup) {
            case (.found(_, let unique), _): (toPrimary, cas) = (true, unique)
            case (.missing, _): (toPrimary, cas) = (true, nil)
            case (.unreachable, .found(_, let unique)): (toPrimary, cas) = (located.backupNode == nil, unique)
            case (.unreachable, _): (toPrimary, cas) = (located.backupNode == nil, nil)
            }
            guard var (entries, dropped) = await mutate(base.entries) else { return .refused }
            let limit = max(1, configuration.principals.indexLimit)
            if entries.count > limit {
                let excess = entries.count - limit
                dropped += entries.prefix(excess)
                entries.removeFirst(excess)
            }
            if entries == base.entries { return .written(dropped: dropped) }
            let contents = Contents(version: base.version &+ 1, entries: entries)
            let (key, nodeID) = toPrimary ? (located.primaryKey, located.primaryNode) : (located.backupKey, located.backupNode!)
            let ttl = indexTTL()
            let written = await store.writeStored(
                key: key, on: nodeID, bytes: try encode(contents, key: key), ttl: ttl, casUnique: cas, add: cas == nil)
            switch written {
            case .stored:
                let (otherKey, otherNode) = toPrimary ? (located.backupKey, located.backupNode) : (located.primaryKey, located.primaryNode)
                if let otherNode, let bytes = try? encode(contents, key: otherKey) {
                    _ = await store.writeStored(key: otherKey, on: otherNode, bytes: bytes, ttl: ttl, casUnique: nil, add: false)
                }
                return .written(dropped: dropped)
            case .conflict, .gone:
                statistics.count(.principalIndexConflicts)
                continue
            case .tooLarge(let error):
                throw Self.unavailable("the principal index is larger than the item size limit (\(error.code))", ended: nil)
            case .unreachable(let error):
                throw Self.unavailable("the principal index could not be written (\(error.code))", ended: nil)
            }
        }
        throw Self.unavailable("the principal index kept changing under this update", ended: nil)
    }

    /// How long the index lives: an hour past the longest a session can (the absolute timeout);
    /// with none, it never expires (an index that expired would leave live sessions that
    /// ``SessionManager/invalidateAll(principal:)`` cannot find).
    func indexTTL() -> MemcachedTTL {
        guard let absolute = configuration.timeouts.absolute else { return .never }
        return .seconds(Int(absolute.components.seconds) + 3600)
    }

    static func unavailable(_ message: String, ended: Int?) -> SessionError {
        var error = SessionError(code: .principalIndexUnavailable, message: message)
        error.sessionsEnded = ended
        return error
    }
}

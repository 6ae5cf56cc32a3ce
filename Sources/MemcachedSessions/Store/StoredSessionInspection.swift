import Memcached
import NIOCore

extension SessionMetadata {
    /// "The newest copy wins", the rule every search of a session's copies follows (a recovery,
    /// a restore, `msm session show`): the higher version; on equal versions a primary over a
    /// backup, since the primary is where the session lives.
    public func supersedes(_ other: SessionMetadata, asPrimary: Bool, otherIsPrimary: Bool) -> Bool {
        version > other.version || (version == other.version && asPrimary && !otherIsPrimary)
    }
}

/// What ``SessionManager/inspectStored(keys:on:codec:keyRing:)`` found of a session on every node.
public struct StoredSessionInspection: Sendable {
    /// One stored item under the session's primary or backup key.
    public struct Copy: Sendable, Hashable {
        public var nodeID: String
        public var isPrimary: Bool
        /// A logout's (or `msm session delete`'s) mark: the session was invalidated.
        public var isTombstone: Bool
        public var bytes: Int
    }

    /// Every item found, in node order, primary before backup.
    public var copies: [Copy] = []
    /// The newest decodable copy (``SessionMetadata/supersedes(_:asPrimary:otherIsPrimary:)``)
    /// and where it is; nil when there is none.
    public var newest: (record: SessionRecord, copy: Copy)?
    /// Whether some node holds a tombstone: the session was logged out.
    public var isInvalidated: Bool { copies.contains(where: \.isTombstone) }
    /// Nodes that did not answer, with the first error each gave: copies there are unknown.
    public var unreachable: [(nodeID: String, error: MemcachedError)] = []
    public var unreachableNodes: [String] { unreachable.map(\.nodeID) }
    /// Copies whose bytes `codec` could not decode, or (with a key ring) that did not open or were
    /// not sealed (left as they are).
    public var undecodable = 0
}

extension SessionManager {
    /// Reads a stored session from outside any instance (`msm session show`): both keys on every
    /// node, the newest copy decoded with `codec` (the applications' codec) after opening it with
    /// `keyRing` when the applications seal their sessions (unsealed copies are then read too, as
    /// in a rolling upgrade), nothing changed.
    public static func inspectStored(
        keys: SessionKeys, on client: MemcachedClient, codec: any SessionCodec = BinarySessionCodec(),
        keyRing: SessionKeyRing? = nil
    ) async -> StoredSessionInspection {
        let sealer = keyRing.map { SessionSealer(ring: $0) }
        var inspection = StoredSessionInspection()
        for node in client.allNodes {
            var primary = MemcachedRequest.get(keys.primary)
            var backup = MemcachedRequest.get(keys.backup)
            primary.honorsCancellation = false
            backup.honorsCancellation = false
            let results = await node.executeBatch([primary, backup])
            for (isPrimary, result) in zip([true, false], results) {
                switch result {
                case .success(.item(let item?)):
                    let tombstone = item.flags == tombstoneFlags
                    let copy = StoredSessionInspection.Copy(
                        nodeID: node.id, isPrimary: isPrimary, isTombstone: tombstone, bytes: tombstone ? 0 : item.value.readableBytes)
                    inspection.copies.append(copy)
                    guard !tombstone else { continue }
                    var envelope = item.value
                    if let sealer, SessionSealer.isSealed(item.value), let opened = try? sealer.open(item.value, forKey: isPrimary ? keys.primary : keys.backup) {
                        envelope = opened.plaintext
                    }
                    guard let record = try? codec.decodeSession(from: envelope) else {
                        inspection.undecodable += 1
                        continue
                    }
                    if let newest = inspection.newest,
                        !record.metadata.supersedes(newest.record.metadata, asPrimary: isPrimary, otherIsPrimary: newest.copy.isPrimary)
                    {
                        continue
                    }
                    inspection.newest = (record, copy)
                case .success:
                    break
                case .failure(let error):
                    if !inspection.unreachableNodes.contains(node.id) { inspection.unreachable.append((node.id, error)) }
                }
            }
        }
        return inspection
    }
}

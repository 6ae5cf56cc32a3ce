import Synchronization
import Memcached
import NIOCore
import Testing

@testable import MemcachedSessions

@Suite("Session model, configuration and placement")
struct SessionModelTests {
    static func session(_ attributes: [String: ByteBuffer] = [:], filter: String? = nil, casUnique: UInt64? = 9) throws -> MemcachedSession {
        MemcachedSession(
            id: .generate(nodeID: "n1", route: nil),
            record: SessionRecord(
                metadata: SessionMetadata(createdAt: 1, lastAccessedAt: 1, idleTimeoutSeconds: 60, absoluteTimeoutSeconds: 0, version: 3),
                attributes: attributes),
            casUnique: casUnique, isNew: false, codec: BinarySessionCodec(),
            attributeFilter: try filter.map { pattern throws(SessionError) in try PathPattern(pattern, setting: "test") })
    }

    @Test func typedAccessAndDirtyTracking() throws {
        let session = try Self.session()
        #expect(!session.hasUnsavedChanges)
        try session.set("count", 1)
        #expect(session["count", as: Int.self] == 1)
        #expect(session.hasUnsavedChanges)
        #expect(throws: SessionError.self) { _ = try session.get("count", as: String.self) }
        #expect(session["count", as: String.self] == nil)
        #expect(session["missing", as: Int.self] == nil)

        // Saved: no pending change; setting an equal value is not a change.
        let snapshot = session.snapshotForSave(now: 5)
        session.markSaved(snapshot, saved: snapshot.record, casUnique: 10)
        #expect(!session.hasUnsavedChanges)
        #expect(session.metadata.version == 4)
        try session.set("count", 1)
        #expect(!session.hasUnsavedChanges)
        try session.set("count", 2)
        #expect(session.hasUnsavedChanges)
        session.remove("count")
        #expect(session["count", as: Int.self] == nil)
    }

    @Test func changesDuringASaveStayPending() throws {
        let session = try Self.session()
        try session.set("a", 1)
        let snapshot = session.snapshotForSave(now: 5)
        try session.set("b", 2)  // lands while the save is in flight
        session.markSaved(snapshot, saved: snapshot.record, casUnique: 10)
        #expect(session.hasUnsavedChanges)
        #expect(session["a", as: Int.self] == 1)
        #expect(session["b", as: Int.self] == 2)
        let next = session.snapshotForSave(now: 6)
        #expect(next.changes.keys.sorted() == ["b"])
    }

    /// The simulation, seed 14589: a save that landed on the node a concurrent request had just
    /// moved the session off counted as saved, and its change never reached the new node.
    @Test func aSaveOnANodeTheSessionLeftSavesNothing() throws {
        let session = try Self.session()
        try session.set("a", 1)
        let snapshot = session.snapshotForSave(now: 5)
        session.setID(session.id.relocated(to: "n2"))  // moved by a concurrent request meanwhile
        session.markSaved(snapshot, saved: snapshot.record, casUnique: 10)
        #expect(session.hasUnsavedChanges)
        #expect(session.snapshotForSave(now: 6).changes.keys.sorted() == ["a"])
    }

    /// Two requests of a sticky session on one instance save the shared copy concurrently; the
    /// later save's acknowledgement is applied first (their tasks may resume in either order).
    /// The earlier one's, applied after, must not take the copy back to its older record and CAS
    /// unique (the simulation, sticky-sync seed 657: an attribute vanished from memory).
    @Test(arguments: [true, false])
    func anOlderSavesAcknowledgementAfterANewerOneChangesNothing(meta: Bool) throws {
        // Text mode: writes return no CAS unique.
        let session = try Self.session(casUnique: meta ? 9 : nil)
        try session.set("a", 1)
        let first = session.snapshotForSave(now: 5)  // version 4: a
        try session.set("b", 2)
        let second = session.snapshotForSave(now: 6)  // version 4: a and b
        // The first landed as version 4; the second met it, merged, landed as version 5.
        var merged = second.record
        merged.metadata.version = 5
        session.markSaved(second, saved: merged, casUnique: meta ? 12 : nil)
        session.markSaved(first, saved: first.record, casUnique: meta ? 11 : nil)
        #expect(session["a", as: Int.self] == 1)
        #expect(session["b", as: Int.self] == 2, "not taken back to the first save's record")
        #expect(session.storedCasUnique == (meta ? 12 : nil))
        #expect(session.metadata.version == 5)
        #expect(!session.hasUnsavedChanges)
    }

    /// A newer stored copy replaces the local one only while it has no change of its own, in
    /// one look (a change made between a check and the replacement would be lost; this test, on
    /// one thread, checks what is replaced when, not the race).
    @Test func aNewerStoredCopyReplacesOnlyAnUnchangedLocalOne() throws {
        let codec = BinarySessionCodec()
        let session = try Self.session()
        var newer = SessionRecord(
            metadata: SessionMetadata(createdAt: 1, lastAccessedAt: 8, idleTimeoutSeconds: 60, absoluteTimeoutSeconds: 0, version: 4),
            attributes: ["c": try codec.encodeValue(7)])
        try session.set("a", 1)
        #expect(!session.replaceIfNewerAndUnchanged(with: newer, casUnique: 20))
        #expect(session["a", as: Int.self] == 1)
        let snapshot = session.snapshotForSave(now: 5)
        session.markSaved(snapshot, saved: snapshot.record, casUnique: 10)  // version 4 now
        #expect(!session.replaceIfNewerAndUnchanged(with: newer, casUnique: 20), "not newer")
        newer.metadata.version = 5
        #expect(session.replaceIfNewerAndUnchanged(with: newer, casUnique: 20))
        #expect(session["c", as: Int.self] == 7)
        #expect(session["a", as: Int.self] == nil)
        #expect(session.storedCasUnique == 20)
    }

    @Test func mergeReappliesOnlyOwnChanges() throws {
        let codec = BinarySessionCodec()
        let session = try Self.session(["a": try codec.encodeValue(1), "b": try codec.encodeValue(1), "gone": try codec.encodeValue(0)])
        try session.set("a", 2)
        session.remove("gone")
        let snapshot = session.snapshotForSave(now: 10)
        // Meanwhile another request stored b = 5 and c = 7 (version 4).
        let stored = SessionRecord(
            metadata: SessionMetadata(createdAt: 1, lastAccessedAt: 8, idleTimeoutSeconds: 60, absoluteTimeoutSeconds: 0, version: 4),
            attributes: [
                "a": try codec.encodeValue(1), "b": try codec.encodeValue(5), "c": try codec.encodeValue(7),
                "gone": try codec.encodeValue(0),
            ])
        let merged = MemcachedSession.merge(snapshot, onto: stored, now: 10)
        #expect(try codec.decodeValue(Int.self, from: merged.attributes["a"]!) == 2)
        #expect(try codec.decodeValue(Int.self, from: merged.attributes["b"]!) == 5)
        #expect(try codec.decodeValue(Int.self, from: merged.attributes["c"]!) == 7)
        #expect(merged.attributes["gone"] == nil)
        #expect(merged.metadata.version == 5)
    }

    /// A fork's merge: the save's copy and the other copy of its version disagree on the save's
    /// own change (`a`), on the other copy's (`f`, and `x`, which the other removed), and on an
    /// attribute a later write changed since (`d`). Onto a current copy made from the save's, the
    /// other side's changes come in, the later write's stands; onto the other copy itself, the
    /// save's own change comes in.
    @Test func aForksMergeTakesEachSidesChangesAndKeepsALaterWrites() throws {
        let codec = BinarySessionCodec()
        func value(_ number: Int) throws -> ByteBuffer { try codec.encodeValue(number) }
        let session = try Self.session(["a": try value(1), "f": try value(1), "x": try value(1), "d": try value(1)])
        try session.set("a", 2)
        let snapshot = session.snapshotForSave(now: 10)
        let saved = snapshot.record  // a 2, f 1, x 1, d 1
        var fork = saved
        fork.attributes = ["a": try value(1), "f": try value(3), "d": try value(4)]  // f changed, x removed, d changed
        // A later write over the save's copy changed d (to 9) and added e.
        var later = saved
        later.attributes["d"] = try value(9)
        later.attributes["e"] = try value(5)
        later.metadata.version += 1
        let merged = MemcachedSession.merge(snapshot, saved: saved, fork: fork, onto: later, now: 20)
        #expect(try codec.decodeValue(Int.self, from: merged.attributes["a"]!) == 2, "the save's own change")
        #expect(try codec.decodeValue(Int.self, from: merged.attributes["f"]!) == 3, "the other copy's change")
        #expect(merged.attributes["x"] == nil, "the other copy's removal")
        #expect(try codec.decodeValue(Int.self, from: merged.attributes["d"]!) == 9, "the later write's change stands")
        #expect(try codec.decodeValue(Int.self, from: merged.attributes["e"]!) == 5)
        #expect(merged.metadata.version == later.metadata.version + 1)
        // Onto the other copy itself: the save's change comes in, the other's stay.
        let ontoFork = MemcachedSession.merge(snapshot, saved: saved, fork: fork, onto: fork, now: 20)
        #expect(try codec.decodeValue(Int.self, from: ontoFork.attributes["a"]!) == 2)
        #expect(try codec.decodeValue(Int.self, from: ontoFork.attributes["f"]!) == 3)
        #expect(ontoFork.attributes["x"] == nil)
        #expect(try codec.decodeValue(Int.self, from: ontoFork.attributes["d"]!) == 4)
        #expect(ontoFork.metadata.version == saved.metadata.version + 1)
    }

    /// A copy's changes since a copy it descends from (the move's merges): an attribute changed,
    /// one added, one removed, and the idle timeout; an unchanged attribute is not one.
    @Test func aCopysChangesSinceItsBase() throws {
        let codec = BinarySessionCodec()
        func value(_ number: Int) throws -> ByteBuffer { try codec.encodeValue(number) }
        let base = SessionRecord(
            metadata: SessionMetadata(createdAt: 1, lastAccessedAt: 1, idleTimeoutSeconds: 60, absoluteTimeoutSeconds: 0, version: 3),
            attributes: ["same": try value(1), "changed": try value(1), "removed": try value(1)])
        #expect(base.changes(since: base).isEmpty)
        var copy = base
        copy.attributes["changed"] = try value(2)
        copy.attributes["added"] = try value(3)
        copy.attributes["removed"] = nil
        copy.metadata.version = 7
        copy.metadata.lastAccessedAt = 9
        let changes = copy.changes(since: base)
        #expect(changes.attributes.count == 3)
        #expect(changes.attributes["changed"] == .some(try value(2)))
        #expect(changes.attributes["added"] == .some(try value(3)))
        #expect(changes.attributes["removed"] == .some(nil), "a removal is a change to nothing")
        #expect(changes.attributes["same"] == nil)
        #expect(changes.idleTimeoutSeconds == nil, "version and access time are not changes")
        copy.metadata.idleTimeoutSeconds = 600
        #expect(copy.changes(since: base).idleTimeoutSeconds == 600)
        #expect(base.changes(since: copy).attributes["added"] == .some(nil))
    }

    @Test func attributeFilterKeepsOthersForTheRequestOnly() throws {
        let session = try Self.session(filter: "^(user|cart)$")
        try session.set("user", "ann")
        try session.set("scratch", "temporary")
        #expect(session["scratch", as: String.self] == "temporary")
        let snapshot = session.snapshotForSave(now: 1)
        #expect(snapshot.record.attributes.keys.sorted() == ["user"])
    }

    @Test func invalidatedSessionsRefuseWrites() throws {
        let session = try Self.session()
        session.invalidate()
        #expect(throws: SessionError.self) { try session.set("x", 1) }
    }

    /// The simulation, seed 1571: a request that found the old id ended (a tombstone) while a
    /// concurrent login of the same instance had given the shared copy a new id ended the login's
    /// session too, and the login's response cleared its own cookie.
    @Test func anEndFoundUnderAnOldIdLeavesTheNewIdAlone() throws {
        let session = try Self.session()
        let old = session.id
        session.setID(.generate(nodeID: "n1", route: nil))
        #expect(!session.invalidate(byAnotherRequest: false, ifToken: old.token))
        #expect(!session.isInvalidated)
        #expect(session.invalidate(byAnotherRequest: true, ifToken: session.id.token))
        #expect(session.isInvalidated && session.wasInvalidatedElsewhere)
    }

    /// The simulation, seed 87: a session whose first save was sent may be stored even while new.
    @Test func aSessionWhoseFirstSaveWasSentMayBeStored() throws {
        let session = MemcachedSession(
            id: .generate(nodeID: "n1", route: nil), record: SessionRecord(
                metadata: SessionMetadata(createdAt: 1, lastAccessedAt: 1, idleTimeoutSeconds: 60, absoluteTimeoutSeconds: 0, version: 0),
                attributes: [:]),
            casUnique: nil, isNew: true, codec: BinarySessionCodec(), attributeFilter: nil)
        #expect(!session.mayBeStored)
        _ = session.snapshotForSave(now: 2)
        #expect(session.mayBeStored && session.isNew)
    }

    @Test func configurationErrorsNameTheSetting() throws {
        func error(_ configure: (inout SessionManager.Configuration) throws -> Void) throws -> String? {
            var configuration = try SessionManager.Configuration(nodes: "n1:127.0.0.1:1 n2:127.0.0.1:2")
            try configure(&configuration)
            do {
                try configuration.validate()
                return nil
            } catch {
                #expect(error.code == .invalidConfiguration)
                return error.message
            }
        }
        #expect(try error { _ in } == nil)
        #expect(try error { $0.failoverNodes = ["n9"] }?.contains("failover node 'n9'") == true)
        #expect(try error { $0.failoverNodes = ["n1", "n2"] }?.contains("at least one must be a primary") == true)
        #expect(try error { $0.locking.mode = .uriPattern("(") }?.contains("locking uriPattern") == true)
        #expect(try error { $0.ignoredPathPattern = "[" }?.contains("ignoredPathPattern") == true)
        #expect(
            try error {
                $0.mode = .sticky; $0.locking.mode = .all
            }?.contains("non-sticky") == true)
        #expect(try error { $0.keyPrefix = "has space" }?.contains("keyPrefix") == true)
        #expect(try error { $0.route = "bad.route" }?.contains("route") == true)
        #expect(try error { $0.locking.expiry = .milliseconds(10) }?.contains("locking.expiry") == true)
        #expect(try error { $0.timeouts.absolute = .zero }?.contains("timeouts.absolute") == true)

        #expect(throws: SessionError.self) { _ = try SessionManager.Configuration(nodes: "n1:127.0.0.1") }
        #expect(throws: SessionError.self) { _ = try SessionManager.Configuration(nodes: "n1:h:1,n1:h:2") }
        // A single host:port becomes node n1; several need ids.
        #expect(try SessionManager.Configuration(nodes: "127.0.0.1:11211").memcached.nodes.map(\.id) == ["n1"])
        var unnamed = try SessionManager.Configuration(nodes: "127.0.0.1:1 127.0.0.1:2")
        unnamed.mode = .nonSticky
        #expect(throws: SessionError.self) { try unnamed.validate() }
        #expect(try SessionManager.LockingMode(parsing: "uriPattern:/cart.*") == .uriPattern("/cart.*"))
        #expect(throws: SessionError.self) { _ = try SessionManager.LockingMode(parsing: "sometimes") }
    }

    @Test func placementIsBoundedAndSkipsDownNodes() throws {
        let client = try MemcachedClient(
            configuration: .init(nodes: "n1:127.0.0.1:1 n2:127.0.0.1:2 n3:127.0.0.1:3 f1:127.0.0.1:4"))
        let topology = NodeTopology(nodes: client, failoverNodes: ["f1"], clock: SystemSessionClock())
        // All up (a new client assumes so): round robin over the primaries, never the failover.
        let placed = Set((0..<30).map { _ in topology.placeNew() })
        #expect(placed == ["n1", "n2", "n3"])
        #expect(topology.nextAvailable(after: "n1") == "n2")
        #expect(topology.nextAvailable(after: "n3") == "n1")
        #expect(topology.nextAvailable(after: "n1", excluding: ["n2", "n3"]) == "f1")
        #expect(topology.nextAvailable(after: "n1", excluding: ["n2", "n3", "f1"]) == nil)
        #expect(topology.nextAvailable(after: "unknown") == "n1")
    }

    @Test func readOnlyPathsAreLearnedAndBounded() {
        let paths = ReadOnlyPaths(limit: 10)
        #expect(!paths.isReadOnly("/read"))
        paths.record("/read", modified: false)
        #expect(paths.isReadOnly("/read"))
        paths.record("/read", modified: true)
        #expect(!paths.isReadOnly("/read"))
        for index in 0..<1000 { paths.record("/p\(index)", modified: false) }
        #expect(paths.count <= 10)
    }

    @Test func backupMemoRefreshesOncePerWindowPerNode() {
        let clock = ManualClock()
        let memo = BackupMemo(limit: 100, clock: clock)
        #expect(memo.needsRefresh("k", node: "n2", window: .seconds(10)))
        memo.record("k", node: "n2")
        clock.advance(by: .seconds(5))
        #expect(!memo.needsRefresh("k", node: "n2", window: .seconds(10)))
        #expect(memo.needsRefresh("k", node: "n3", window: .seconds(10)))
        clock.advance(by: .seconds(5))
        #expect(memo.needsRefresh("k", node: "n2", window: .seconds(10)))
    }

    /// The memo's last acknowledged write: handed back on the same node while recent, never for
    /// another node or after the node changed, and a write keeps the refresh time of its node.
    @Test func backupMemoHandsBackRecentWritesOnTheSameNode() {
        let clock = ManualClock()
        let memo = BackupMemo(limit: 100, clock: clock)
        #expect(memo.record("k", node: "n2") == nil, "nothing written yet")
        clock.advance(by: .seconds(3))
        memo.wrote("k", node: "n2", cas: 7, flags: 1, generation: 4)
        // The write did not move the refresh time (3 s ago): 8 s later a 10 s window is up.
        clock.advance(by: .seconds(8))
        #expect(memo.needsRefresh("k", node: "n2", window: .seconds(10)))
        let written = memo.record("k", node: "n2")
        #expect(written?.cas == 7 && written?.flags == 1 && written?.generation == 4)
        #expect(memo.record("k", node: "n3") == nil, "another node's write is not this one's")
        #expect(memo.record("k", node: "n2") == nil, "forgotten once the key went to another node")
        memo.wrote("k", node: "n2", cas: 9, flags: 2, generation: 5)
        clock.advance(by: .seconds(31))
        #expect(memo.record("k", node: "n2") == nil, "older than the written lifetime")
        // A write on a node the key did not name: refreshed now, written remembered.
        memo.wrote("w", node: "n1", cas: 3, flags: 1, generation: 1)
        #expect(!memo.needsRefresh("w", node: "n1", window: .seconds(10)))
        #expect(memo.record("w", node: "n1")?.cas == 3)
        memo.forgetWrites(on: "n1")
        #expect(memo.record("w", node: "n1") == nil)
        // Bounded: 8 shards of at least 16 keys.
        for index in 0..<10_000 { memo.record("key\(index)", node: "n1") }
        var kept = 0
        for index in 0..<10_000 where !memo.needsRefresh("key\(index)", node: "n1", window: .seconds(10)) { kept += 1 }
        #expect(kept > 0 && kept <= 8 * 16)
    }

    @Test func localStoreExpiresAndStaysBounded() throws {
        let store = LocalSessionStore(capacity: 64)
        let session = try Self.session()
        let token = session.id.token
        store.put(session, token: token, now: 1_000, refreshed: .now())
        #expect(store.access(token, now: 2_000) != nil)
        #expect(store.access(token, now: 2_000 + 60_000) == nil)  // idle 60 s
        for _ in 0..<1_000 {
            let other = try Self.session()
            store.put(other, token: other.id.token, now: 5_000, refreshed: .now())
        }
        #expect(store.count <= 64)
    }
}

/// A clock that moves only when told to: unit tests drive time explicitly.
final class ManualClock: SessionClock {
    private let state = Mutex<(monotonic: NIODeadline, wall: Int64)>((.uptimeNanoseconds(1_000_000_000), 1_800_000_000_000))

    func now() -> NIODeadline { state.withLock { $0.monotonic } }
    func wallMilliseconds() -> Int64 { state.withLock { $0.wall } }
    func advance(by duration: Duration) {
        let nanoseconds = duration.components.seconds * 1_000_000_000 + duration.components.attoseconds / 1_000_000_000
        state.withLock { state in
            state.monotonic = state.monotonic + .nanoseconds(nanoseconds)
            state.wall += nanoseconds / 1_000_000
        }
    }
    func sleep(for duration: Duration) async throws {
        Issue.record("a unit test's manual clock does not sleep")
    }
}

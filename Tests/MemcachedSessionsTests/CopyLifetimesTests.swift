import Testing
import NIOCore

@testable import MemcachedSessions

@Suite struct CopyLifetimesTests {
    @Test func theRefreshWindowIsAQuarterOfTheIdleTimeoutBetweenASecondAndFiveMinutes() {
        #expect(CopyLifetimes.refreshWindowSeconds(idle: 2) == 1)
        #expect(CopyLifetimes.refreshWindowSeconds(idle: 12) == 3)
        #expect(CopyLifetimes.refreshWindowSeconds(idle: 1200) == 300)
        #expect(CopyLifetimes.refreshWindowSeconds(idle: 86_400) == 300)
        #expect(CopyLifetimes.refreshWindowSeconds(idle: 0) == 300, "no idle timeout")
        #expect(CopyLifetimes.refreshWindowSeconds(idle: -1) == 300)
    }

    @Test func theHorizonIsTheIdleTimeoutPlusTwoWindows() {
        #expect(CopyLifetimes.horizonSeconds(idle: 12) == 18)
        #expect(CopyLifetimes.horizonSeconds(idle: 1800) == 2400)
        #expect(CopyLifetimes.horizonSeconds(idle: 0) == 86_400 + 600, "a day for sessions without an idle timeout")
    }

    /// memcached's clock ticks once a second (an item stored for `n` seconds lives between `n - 1`
    /// and `n`): a primary is stored for its idle timeout plus one second, so that it lives at
    /// least its idle timeout; the absolute timeout's remainder, rounded up, caps it.
    @Test func aPrimaryIsStoredForItsIdleTimeoutPlusASecondCappedByItsAbsoluteTimeout() {
        func metadata(idle: Int64, absolute: Int64 = 0, createdAt: Int64 = 0) -> SessionMetadata {
            SessionMetadata(
                createdAt: createdAt, lastAccessedAt: createdAt, idleTimeoutSeconds: idle, absoluteTimeoutSeconds: absolute,
                version: 1)
        }
        #expect(SessionStore.primaryTTLSeconds(metadata(idle: 12), now: 0) == 13)
        #expect(SessionStore.primaryTTLSeconds(metadata(idle: 1800), now: 5_000_000) == 1801)
        #expect(SessionStore.primaryTTLSeconds(metadata(idle: 12, absolute: 60), now: 0) == 13)
        #expect(SessionStore.primaryTTLSeconds(metadata(idle: 12, absolute: 60), now: 54_500) == 6, "5.5 s left: rounded up")
        #expect(SessionStore.primaryTTLSeconds(metadata(idle: 12, absolute: 60), now: 61_000) == 1, "past it: the shortest TTL")
        #expect(SessionStore.primaryTTLSeconds(metadata(idle: 0, absolute: 60), now: 10_000) == 50, "no idle timeout: what is left")
        #expect(SessionStore.primaryTTLSeconds(metadata(idle: 0), now: 0) == nil, "never expires")
        // The backup outlives the primary by two refresh windows (a quarter of the idle timeout each).
        #expect(SessionStore.backupTTLSeconds(metadata(idle: 12), now: 0) == 19, "13 + 2 × 3")
        #expect(SessionStore.backupTTLSeconds(metadata(idle: 0), now: 0) == nil)
    }

    @Test func aTombstoneOutlivesTheLongerOfTheDefaultsAndTheSessionsCopies() {
        #expect(CopyLifetimes.tombstoneSeconds(defaultIdle: 60, sessionIdle: nil) == 60 + 30 + 60)
        #expect(CopyLifetimes.tombstoneSeconds(defaultIdle: 60, sessionIdle: 30) == 60 + 30 + 60, "a shorter one: the default")
        #expect(CopyLifetimes.tombstoneSeconds(defaultIdle: 60, sessionIdle: 3600) == 3600 + 600 + 60)
        #expect(CopyLifetimes.tombstoneSeconds(defaultIdle: 60, sessionIdle: 0) == 86_400 + 600 + 60, "none: a day")
        #expect(CopyLifetimes.tombstoneSeconds(defaultIdle: 60, sessionIdle: 10 * 365 * 86_400) == 30 * 86_400, "memcached's longest relative TTL")
    }
}

@Suite struct NewestCopyTests {
    func metadata(_ version: UInt64) -> SessionMetadata {
        SessionMetadata(createdAt: 0, lastAccessedAt: 0, idleTimeoutSeconds: 60, absoluteTimeoutSeconds: 0, version: version)
    }

    @Test func theHigherVersionWinsAndOnEqualVersionsThePrimary() {
        #expect(metadata(5).supersedes(metadata(4), asPrimary: false, otherIsPrimary: true))
        #expect(!metadata(4).supersedes(metadata(5), asPrimary: true, otherIsPrimary: false))
        #expect(metadata(5).supersedes(metadata(5), asPrimary: true, otherIsPrimary: false))
        #expect(!metadata(5).supersedes(metadata(5), asPrimary: false, otherIsPrimary: true))
        #expect(!metadata(5).supersedes(metadata(5), asPrimary: true, otherIsPrimary: true), "the first of equals stays")
        #expect(!metadata(5).supersedes(metadata(5), asPrimary: false, otherIsPrimary: false))
    }
}

@Suite struct LeftoverCopiesTests {
    private func record(version: UInt64) -> SessionRecord {
        SessionRecord(
            metadata: SessionMetadata(createdAt: 0, lastAccessedAt: 0, idleTimeoutSeconds: 60, absoluteTimeoutSeconds: 0, version: version),
            attributes: [:])
    }

    private func merge(baseVersion: UInt64, home: String = "n2") -> LeftoverCopies.StrayMerge {
        LeftoverCopies.StrayMerge(
            base: record(version: baseVersion), keys: SessionKeys(token: .random(), prefix: "msm:"), home: home, backupNode: "n2",
            waitsForHomeUntil: .now() + TimeAmount.seconds(60))
    }

    /// Two backup touches left for one copy fold into one with the later end; the version they
    /// name stays only when both name it (a slide's touch, which does not know it, makes it
    /// unknown: such a touch never ends a copy).
    @Test func twoBackupTouchesFoldIntoTheLaterEnd() throws {
        let leftovers = LeftoverCopies()
        func touch(_ flags: UInt32?, _ end: Int64) -> LeftoverCopies.Action {
            .backupTouch(flags: flags, expiresAt: end, primaryKey: "p", primaryNode: "n1")
        }
        leftovers.add(.init(nodeID: "n2", key: "b", action: touch(5, 2_000)))
        leftovers.add(.init(nodeID: "n2", key: "b", action: touch(5, 1_000)))
        #expect(leftovers.take(nodeID: "n2").map(\.action) == [touch(5, 2_000)], "an earlier end never shortens a later one")
        leftovers.add(.init(nodeID: "n2", key: "b", action: touch(5, 1_000)))
        leftovers.add(.init(nodeID: "n2", key: "b", action: touch(nil, 3_000)))
        #expect(leftovers.take(nodeID: "n2").map(\.action) == [touch(nil, 3_000)])
        leftovers.add(.init(nodeID: "n2", key: "b", action: touch(5, 1_000)))
        leftovers.add(.init(nodeID: "n2", key: "b", action: touch(6, 500)))
        #expect(leftovers.take(nodeID: "n2").map(\.action) == [touch(nil, 1_000)], "two versions: neither is known")
    }

    /// A backup write waiting for a copy sets its end itself: a touch of its version or older
    /// does not take its place (the write would be lost), a touch of a newer version does (that
    /// version's write landed). A tombstone waiting stays before any touch.
    @Test func aBackupTouchNeverTakesThePlaceOfANewerWriteOrATombstone() throws {
        let leftovers = LeftoverCopies()
        let write = LeftoverCopies.Action.backup(bytes: ByteBuffer(), flags: 5, expiresAt: 9_000, primaryKey: "p", primaryNode: "n1")
        func touch(_ flags: UInt32?) -> LeftoverCopies.Action {
            .backupTouch(flags: flags, expiresAt: 1_000, primaryKey: "p", primaryNode: "n1")
        }
        for flags: UInt32 in [4, 5] {
            leftovers.add(.init(nodeID: "n2", key: "b", action: write))
            leftovers.add(.init(nodeID: "n2", key: "b", action: touch(flags)))
            #expect(leftovers.take(nodeID: "n2").map(\.action) == [write])
        }
        leftovers.add(.init(nodeID: "n2", key: "b", action: write))
        leftovers.add(.init(nodeID: "n2", key: "b", action: touch(6)))
        #expect(leftovers.take(nodeID: "n2").map(\.action) == [touch(6)])
        leftovers.add(.init(nodeID: "n2", key: "b", action: .tombstone(ttlSeconds: 60)))
        leftovers.add(.init(nodeID: "n2", key: "b", action: touch(6)))
        #expect(leftovers.take(nodeID: "n2").map(\.action) == [.tombstone(ttlSeconds: 60)])
    }

    /// A second move's old copy (a recovery from a copy it cannot merge from) keeps the first
    /// move's pending merge, with the higher bound: dropping it would lose the write it waits for.
    @Test func aSecondOldCopyEntryKeepsTheFirstsMergeAndTakesTheHigherBound() throws {
        let leftovers = LeftoverCopies()
        let first = merge(baseVersion: 4)
        leftovers.add(.init(nodeID: "n1", key: "k", action: .deleteUnlessNewer(version: 5, merge: first)))
        leftovers.add(.init(nodeID: "n1", key: "k", action: .deleteUnlessNewer(version: 6, merge: nil)))
        let entries = leftovers.take(nodeID: "n1")
        try #require(entries.count == 1)
        #expect(entries[0].action == .deleteUnlessNewer(version: 6, merge: first))
    }

    /// What a move merged itself moves the pending merge's base on, never back.
    @Test func aMergeBaseMovesOnOnly() throws {
        let leftovers = LeftoverCopies()
        let pending = merge(baseVersion: 4)
        leftovers.add(.init(nodeID: "n1", key: "k", action: .deleteUnlessNewer(version: 5, merge: pending)))
        let now = NIODeadline.now()
        leftovers.advanceMergeBase(primaryKey: pending.keys.primary, home: pending.home, to: record(version: 6), until: now + .seconds(60))
        leftovers.advanceMergeBase(primaryKey: pending.keys.primary, home: pending.home, to: record(version: 5), until: now + .seconds(60))
        let entries = leftovers.take(nodeID: "n1")
        guard case .deleteUnlessNewer(5, let merge?) = try #require(entries.first).action else {
            Issue.record("the entry lost its merge: \(entries)")
            return
        }
        #expect(merge.base.metadata.version == 6)
    }

    /// An entry a pass took, its base advanced meanwhile (the move merged the change itself),
    /// then put back by the pass: the advanced base stays. The older base would merge again what
    /// the move merged itself. A watch of the same session is raised too; a pending merge is not
    /// (its change is its base's successor; one the floor holds is not queued at all).
    @Test func anEntryPutBackKeepsTheAdvancedBase() throws {
        let leftovers = LeftoverCopies()
        let first = merge(baseVersion: 4)
        let primaryKey = first.keys.primary
        leftovers.add(.init(nodeID: "n1", key: primaryKey, action: .deleteUnlessNewer(version: 5, merge: first)))
        let taken = try #require(leftovers.take(nodeID: "n1").first)
        let now = NIODeadline.now()
        leftovers.advanceMergeBase(primaryKey: first.keys.primary, home: first.home, to: record(version: 6), until: now + .seconds(60))
        leftovers.add(taken)
        var pending = first
        pending.pending = record(version: 7)
        leftovers.add(.init(nodeID: "n2", key: LeftoverCopies.watchKey(primaryKey), action: .watchBackup(first)))
        leftovers.add(.init(nodeID: "n2", key: LeftoverCopies.watchKey(primaryKey, pending: true), action: .watchBackup(pending)))
        guard case .deleteUnlessNewer(5, let merge?) = try #require(leftovers.take(nodeID: "n1").first).action else {
            Issue.record("the entry lost its merge")
            return
        }
        #expect(merge.base.metadata.version == 6)
        let watches = leftovers.take(nodeID: "n2")
        #expect(watches.count == 2, "a watch and a pending merge never fold into one")
        for watch in watches {
            guard case .watchBackup(let merge) = watch.action else { continue }
            #expect(merge.base.metadata.version == (merge.pending == nil ? 6 : 4))
        }
    }

    /// A floor is its session's at one new place: a later move of the session elsewhere (another
    /// line of copies) keeps its own base.
    @Test func aFloorIsOneNewPlaces() throws {
        let leftovers = LeftoverCopies()
        let here = merge(baseVersion: 4)
        var elsewhere = here
        elsewhere.home = "n3"
        let now = NIODeadline.now()
        leftovers.advanceMergeBase(primaryKey: here.keys.primary, home: here.home, to: record(version: 6), until: now + .seconds(60))
        leftovers.add(.init(nodeID: "n1", key: here.keys.primary, action: .deleteUnlessNewer(version: 5, merge: elsewhere)))
        guard case .deleteUnlessNewer(5, let merge?) = try #require(leftovers.take(nodeID: "n1").first).action else {
            Issue.record("the entry lost its merge")
            return
        }
        #expect(merge.base.metadata.version == 4)
        #expect(leftovers.floor(of: here)?.metadata.version == 6)
        #expect(leftovers.floor(of: elsewhere) == nil)
    }

    /// A watch of a backup waits under its own key: a copy's delete for the same session on the
    /// same node neither takes its place nor is taken by it (each would undo the other: a copy
    /// never deleted, or a missed write never merged).
    @Test func aWatchAndADeleteOfOneSessionStaySeparate() throws {
        let leftovers = LeftoverCopies()
        let watch = merge(baseVersion: 4)
        let primaryKey = watch.keys.primary
        leftovers.add(.init(nodeID: "n2", key: LeftoverCopies.watchKey(primaryKey), action: .watchBackup(watch)))
        leftovers.add(.init(nodeID: "n2", key: primaryKey, action: .deleteUnlessNewer(version: 7, merge: nil)))
        let entries = leftovers.take(nodeID: "n2")
        #expect(entries.count == 2)
        #expect(entries.contains { $0.key == primaryKey && $0.action == .deleteUnlessNewer(version: 7, merge: nil) })
        #expect(entries.contains { $0.action == .watchBackup(watch) })
    }

    /// A floor lasts until its deadline (the moves' minute): past it, a merge of the session at
    /// that place (a later move's, back to the same node) keeps its own base, and the floor no
    /// longer drops a pending merge.
    @Test func aFloorPastItsDeadlineIsNotApplied() throws {
        let clock = ManualClock()
        let leftovers = LeftoverCopies(clock: clock)
        let later = merge(baseVersion: 4)
        leftovers.advanceMergeBase(
            primaryKey: later.keys.primary, home: later.home, to: record(version: 6), until: clock.now() + .seconds(60))
        #expect(leftovers.floor(of: later)?.metadata.version == 6)
        clock.advance(by: .seconds(61))
        #expect(leftovers.floor(of: later) == nil)
        leftovers.add(.init(nodeID: "n1", key: later.keys.primary, action: .deleteUnlessNewer(version: 5, merge: later)))
        guard case .deleteUnlessNewer(5, let merge?) = try #require(leftovers.take(nodeID: "n1").first).action else {
            Issue.record("the entry lost its merge")
            return
        }
        #expect(merge.base.metadata.version == 4)
    }

    /// At the bound, a new session's floor takes the place of the one ending first (not the
    /// oldest), and says so (counted by the store as a leftover dropped); a floor raised again
    /// takes no room.
    @Test func floorsAreBoundedAndTheOneEndingFirstGoes() {
        let clock = ManualClock()
        let leftovers = LeftoverCopies(floorLimit: 2, clock: clock)
        let oldest = merge(baseVersion: 4), endsFirst = merge(baseVersion: 4), third = merge(baseVersion: 4)
        func advance(_ merge: LeftoverCopies.StrayMerge, to version: UInt64, for seconds: Int64) -> Int {
            leftovers.advanceMergeBase(
                primaryKey: merge.keys.primary, home: "n2", to: record(version: version), until: clock.now() + .seconds(seconds))
        }
        #expect(advance(oldest, to: 5, for: 60) == 0)
        #expect(advance(endsFirst, to: 5, for: 30) == 0)
        #expect(advance(endsFirst, to: 6, for: 30) == 0)
        #expect(advance(third, to: 5, for: 60) == 1)
        #expect(leftovers.floor(of: endsFirst) == nil, "the one ending first went")
        #expect(leftovers.floor(of: oldest)?.metadata.version == 5)
        #expect(leftovers.floor(of: third)?.metadata.version == 5)
        clock.advance(by: .seconds(61))
        #expect(advance(endsFirst, to: 7, for: 60) == 0, "floors past their deadline make room without counting")
    }

    /// A move's merge left pending after another merge of the session at that place already wrote
    /// its copy (the floor holds it) is not queued: the floor ends a minute after its merge,
    /// possibly before the pending merge's deadline, and must not leave it to merge again then. A
    /// newer pending copy is queued.
    @Test func aPendingMergeTheFloorHoldsIsNotQueued() throws {
        let clock = ManualClock()
        let leftovers = LeftoverCopies(clock: clock)
        var pending = merge(baseVersion: 4)
        leftovers.advanceMergeBase(
            primaryKey: pending.keys.primary, home: pending.home, to: record(version: 6), until: clock.now() + .seconds(60))
        clock.advance(by: .seconds(20))
        pending.waitsForHomeUntil = clock.now() + .seconds(60)
        pending.pending = record(version: 6)
        leftovers.add(.init(nodeID: "n2", key: LeftoverCopies.watchKey(pending.keys.primary, pending: true), action: .watchBackup(pending)))
        #expect(leftovers.take(nodeID: "n2").isEmpty, "merged already")
        pending.pending = record(version: 7)
        leftovers.add(.init(nodeID: "n2", key: LeftoverCopies.watchKey(pending.keys.primary, pending: true), action: .watchBackup(pending)))
        #expect(leftovers.take(nodeID: "n2").count == 1, "a newer copy is merged")
    }

    /// A floor raised again to a copy it holds keeps the later deadline.
    @Test func aFloorRaisedAgainKeepsTheLaterDeadline() {
        let clock = ManualClock()
        let leftovers = LeftoverCopies(clock: clock)
        let merge = merge(baseVersion: 4)
        leftovers.advanceMergeBase(primaryKey: merge.keys.primary, home: merge.home, to: record(version: 6), until: clock.now() + .seconds(60))
        leftovers.advanceMergeBase(primaryKey: merge.keys.primary, home: merge.home, to: record(version: 6), until: clock.now() + .seconds(90))
        leftovers.advanceMergeBase(primaryKey: merge.keys.primary, home: merge.home, to: record(version: 5), until: clock.now() + .seconds(30))
        clock.advance(by: .seconds(70))
        #expect(leftovers.floor(of: merge)?.metadata.version == 6)
        leftovers.advanceMergeBase(primaryKey: merge.keys.primary, home: merge.home, to: record(version: 5), until: clock.now() + .seconds(60))
        clock.advance(by: .seconds(21))
        #expect(leftovers.floor(of: merge) == nil, "an older copy does not keep it")
    }

    /// Two moves' pending merges for one session and place fold into one slot: the newer pending
    /// copy stays, whatever the bases.
    @Test func twoPendingMergesKeepTheNewerCopy() throws {
        let leftovers = LeftoverCopies()
        var first = merge(baseVersion: 4)
        first.pending = record(version: 7)
        var second = first
        second.pending = record(version: 5)
        let key = LeftoverCopies.watchKey(first.keys.primary, pending: true)
        leftovers.add(.init(nodeID: "n2", key: key, action: .watchBackup(first)))
        leftovers.add(.init(nodeID: "n2", key: key, action: .watchBackup(second)))
        var third = first
        third.pending = record(version: 8)
        leftovers.add(.init(nodeID: "n2", key: key, action: .watchBackup(third)))
        let entries = leftovers.take(nodeID: "n2")
        try #require(entries.count == 1)
        guard case .watchBackup(let kept) = entries[0].action else { return }
        #expect(kept.pending?.metadata.version == 8)
    }
}

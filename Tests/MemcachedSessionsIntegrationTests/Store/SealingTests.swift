import Crypto
import Foundation
import HTTPTypes
import Memcached
import MemcachedSessionsOperations
import MemcachedTestRig
import MetricsTestKit
import NIOCore
import Testing

@_spi(Simulation) @testable import MemcachedSessions

/// Sealed sessions against real memcached: what is stored, what an attacker with access to
/// memcached can and cannot do, key rotation and the rolling upgrade from unsealed sessions.
@Suite("Sealed sessions")
struct SealingTests {
    static let keyA = SessionSealingKey.generate()
    static let keyB = SessionSealingKey.generate()
    static let secret = try! StorageKeySecret(SymmetricKey(size: .bits256))

    func sealed(
        _ servers: [MemcachedServer], keys: [SessionSealingKey] = [keyA], secret: StorageKeySecret? = SealingTests.secret,
        _ configure: (inout SessionManager.Configuration) -> Void = { _ in }
    ) throws -> SessionManager.Configuration {
        try configuration(servers) {
            $0.sealing.keys = try! SessionKeyRing(current: keys[0], previous: Array(keys.dropFirst()))
            $0.sealing.storageKeySecret = secret
            configure(&$0)
        }
    }

    @Test func storedCopiesAreSealedUnderKeyedKeys() async throws {
        try await withMemcachedServers(count: 2) { servers in
            try await withManager(try sealed(servers)) { manager in
                try await withInspector(servers) { inspector in
                    var browser = Browser()
                    try await manager.increment(&browser)
                    #expect(try await manager.increment(&browser) == 2)
                    let id = try #require(browser.id)
                    let keys = manager.keys(for: id.token)
                    #expect(keys == SessionKeys(token: id.token, prefix: "msm:", secret: Self.secret))
                    let backupNode = id.nodeID == "n1" ? "n2" : "n1"
                    try await eventually("backup written") { try await inspector.node(backupNode).get(keys.backup) != nil }
                    for (node, key) in [(id.nodeID, keys.primary), (backupNode, keys.backup)] {
                        let item = try #require(try await inspector.node(node).get(key))
                        #expect(SessionSealer.isSealed(item.value))
                        #expect(SessionSealer.keyID(of: item.value) == Self.keyA.id)
                        let text = String(decoding: item.value.readableBytesView, as: UTF8.self)
                        #expect(!text.contains("count") && !text.contains("ppp"), "attribute names and values are encrypted")
                        #expect(throws: SessionCodecError.self) { try BinarySessionCodec().decodeSession(from: item.value) }
                    }
                    // Nothing under the unkeyed (SHA-256) key: a dump cannot be matched to the cookie.
                    let unkeyed = SessionKeys(token: id.token, prefix: "msm:")
                    #expect(try await inspector.node(id.nodeID).get(unkeyed.primary) == nil)
                    #expect(manager.statistics.snapshot().sealedOpensByKey == [Self.keyA.idText: 1])
                }
            }
        }
    }

    /// Where an operator reads the opens per key id before retiring a key (docs/operations.md,
    /// rotation step 3): `GET /_msm/status` and the metric `msm_sealed_opens_total{key_id}`.
    @Test func opensPerKeyShowInTheStatusAndTheMetrics() async throws {
        try await withMemcachedServers(count: 2) { servers in
            let metrics = TestMetrics()
            let manager = try SessionManager(configuration: try sealed(servers, keys: [Self.keyB, Self.keyA]), metricsFactory: metrics)
            try await whileRunning([{ try await manager.run() }]) {
                var browser = Browser()
                try await manager.increment(&browser)
                try await manager.increment(&browser)
                try await manager.increment(&browser)
                let token = "status-token-0123456789"
                let endpoints = try ManagementEndpoints(manager: manager, token: token, instance: "a")
                let answer = await endpoints.respond(
                    to: .status, method: .get, headerFields: [.authorization: "Bearer \(token)"], body: nil)
                #expect(answer.status == .ok)
                let json = try #require(try JSONSerialization.jsonObject(with: Data(answer.body.readableBytesView)) as? [String: Any])
                let statistics = try #require(json["statistics"] as? [String: Any])
                let opens = try #require(statistics["sealedOpensByKey"] as? [String: Int])
                #expect(opens == [Self.keyB.idText: 2, Self.keyA.idText: 0])
                let counter = try metrics.expectCounter("msm_sealed_opens_total", [("key_id", Self.keyB.idText)])
                #expect(counter.totalValue == 2)
                #expect(try metrics.expectCounter("msm_sealed_opens_total", [("key_id", Self.keyA.idText)]).totalValue == 0)
            }
        }
    }

    @Test func aCopyPlantedByWhoeverCanReachMemcachedReadsAsMissing() async throws {
        try await withMemcachedServers(count: 1) { servers in
            try await withManager(try sealed(servers)) { manager in
                try await withInspector(servers) { inspector in
                    var victim = Browser()
                    for _ in 0..<5 { try await manager.increment(&victim) }
                    var attacker = Browser()
                    try await manager.increment(&attacker)
                    let victimKeys = manager.keys(for: try #require(victim.id).token)
                    let attackerKeys = manager.keys(for: try #require(attacker.id).token)
                    let node = try inspector.node("n1")

                    // The victim's sealed copy, copied under the attacker's session: does not open.
                    let stolen = try #require(try await node.get(victimKeys.primary))
                    try await node.set(attackerKeys.primary, value: stolen.value, flags: stolen.flags)
                    #expect(try await manager.readCount(&attacker) == 0)
                    #expect(manager.statistics.value(of: .sealedOpenFailures) == 1)
                    try await eventually("the copy that did not open is deleted") { try await node.get(attackerKeys.primary) == nil }

                    // An unsealed forgery (count 1000) under the attacker's key: refused.
                    var forged = ByteBuffer()
                    try BinarySessionCodec().encodeSession(
                        SessionRecord(
                            metadata: SessionMetadata(
                                createdAt: 1, lastAccessedAt: Int64(Date().timeIntervalSince1970 * 1000), idleTimeoutSeconds: 600,
                                absoluteTimeoutSeconds: 0, version: 9),
                            attributes: ["count": ByteBuffer(string: "1000")]),
                        into: &forged)
                    try await node.set(attackerKeys.primary, value: forged, flags: stolen.flags)
                    #expect(try await manager.readCount(&attacker) == 0)
                    #expect(manager.statistics.value(of: .unsealedRefused) == 1)

                    // A copy sealed by another application's key: read as missing, left in place.
                    let foreign = SessionSealer(ring: try SessionKeyRing(current: .generate()))
                    try await node.set(
                        attackerKeys.primary,
                        value: try foreign.seal(forged, forKey: attackerKeys.primary, allocator: ByteBufferAllocator()),
                        flags: stolen.flags)
                    #expect(try await manager.readCount(&attacker) == 0)
                    #expect(manager.statistics.value(of: .sealedUnknownKeys) == 1)
                    #expect(try await node.get(attackerKeys.primary) != nil)

                    // The victim is untouched.
                    #expect(try await manager.readCount(&victim) == 5)
                }
            }
        }
    }

    /// With or without locking: a locked request seals again in the batch that releases its lock
    /// (no other request reads in between); an unlocked one in the background, racing the next
    /// write, which its CAS merge survives.
    @Test(arguments: [SessionManager.LockingMode.none, .all])
    func rotationSealsReadOnlySessionsAgainAndRetiresTheOldKey(locking: SessionManager.LockingMode) async throws {
        try await withMemcachedServers(count: 2) { servers in
            try await withInspector(servers) { inspector in
                var browser = Browser()
                try await withManager(try sealed(servers, keys: [Self.keyA]) { $0.locking.mode = locking }) { before in
                    for _ in 0..<3 { try await before.increment(&browser) }
                }
                let id = try #require(browser.id)
                // Step 1: every instance gets B as an older key; step 2: B current, A older.
                try await withManager(try sealed(servers, keys: [Self.keyB, Self.keyA]) { $0.locking.mode = locking }) { rotated in
                    let keys = rotated.keys(for: id.token)
                    #expect(try await rotated.readCount(&browser) == 3)
                    #expect(rotated.statistics.value(of: .sessionsResealed) == 1)
                    // The next write right away: it races the background write (no locking).
                    #expect(try await rotated.increment(&browser) == 4)
                    try await eventually("sealed with the current key") {
                        try await inspector.node(id.nodeID).get(keys.primary).map { SessionSealer.keyID(of: $0.value) } == Self.keyB.id
                    }
                    let backupNode = id.nodeID == "n1" ? "n2" : "n1"
                    try await eventually("the backup too") {
                        try await inspector.node(backupNode).get(keys.backup).map { SessionSealer.keyID(of: $0.value) } == Self.keyB.id
                    }
                    #expect(try await rotated.readCount(&browser) == 4)
                    // Locked: the write came after the reseal. Unlocked: it may have read the old
                    // copy before the background write landed (a second open with A, then its own
                    // write sealed with B).
                    let opensWithA = rotated.statistics.snapshot().sealedOpensByKey?[Self.keyA.idText] ?? 0
                    #expect(locking == .all ? opensWithA == 1 : (1...2).contains(opensWithA), "\(opensWithA)")
                    #expect(rotated.statistics.value(of: .sessionsResealed) == 1, "sealed again once")
                    #expect(rotated.statistics.value(of: .unavailable) == 0 && rotated.statistics.value(of: .lockFailures) == 0)
                }
                // A retired: the session lives on, on either copy.
                try await withManager(try sealed(servers, keys: [Self.keyB])) { (after: SessionManager) async throws in
                    #expect(try await after.readCount(&browser) == 4)
                    #expect(try await after.increment(&browser) == 5)
                }
            }
        }
    }

    @Test func aRollingUpgradeFromUnsealedSessionsLogsNobodyOut() async throws {
        try await withMemcachedServers(count: 2) { servers in
            let earlier = try configuration(servers)
            let step1 = try sealed(servers, secret: nil) { $0.sealing.writesUnsealed = true }
            let step2 = try sealed(servers, secret: nil) { $0.sealing.acceptUnsealedUntil = Date().addingTimeInterval(3600) }
            let done = try sealed(servers, secret: nil)
            try await withManagers([earlier, step1, step2, done]) { managers in
                let (earlier, step1, step2, done) = (managers[0], managers[1], managers[2], managers[3])
                var browser = Browser()
                var count = 0
                // A cluster of the earlier release and instances of step 1 (keys, still writing
                // unsealed): each request on the other kind of instance.
                for manager in [earlier, step1, earlier, step1] {
                    count += 1
                    #expect(try await manager.increment(&browser) == count)
                }
                // Step 2 (sealing, reading unsealed in the window) beside step 1.
                for manager in [step2, step1, step2, step1, step2] {
                    count += 1
                    #expect(try await manager.increment(&browser) == count)
                }
                // Done: only sealed copies are read, and this one is.
                #expect(try await done.readCount(&browser) == count)
                // A session written unsealed last is refused once the window is over, and a
                // read-only session seen in the window is sealed again in the background.
                var late = Browser()
                try await earlier.increment(&late)
                #expect(try await done.readCount(&late) == 0)
                var migrated = Browser()
                try await earlier.increment(&migrated)
                #expect(try await step2.readCount(&migrated) == 1)
                try await withInspector(servers) { inspector in
                    let id = try #require(migrated.id)
                    try await eventually("the unsealed copy sealed in the background") {
                        try await inspector.node(id.nodeID).get(step2.keys(for: id.token).primary).map { SessionSealer.isSealed($0.value) }
                            == true
                    }
                }
                #expect(try await done.readCount(&migrated) == 1)
            }
        }
    }

    /// Adding a storage-key secret to a running cluster: instances given the secret with a switch
    /// time still ahead compute the keys instances without it do, beside them; past the switch
    /// (every instance at once) a session is moved to its keyed keys at its first request in the
    /// window, the principal index kept before the switch still revokes, a logout in the window
    /// stays a logout; after the window only keyed keys are read.
    @Test(arguments: SessionManager.Mode.allCases)
    func aStorageKeySecretAddedToARunningClusterLogsNobodyOut(mode: SessionManager.Mode) async throws {
        try await withMemcachedServers(count: 2) { servers in
            let now = Date()
            func instance(_ route: String, _ configure: (inout SessionManager.Configuration) -> Void = { _ in }) throws
                -> SessionManager.Configuration
            {
                try configuration(servers, mode: mode) {
                    $0.route = route
                    $0.sticky.asynchronousSaving = false
                    configure(&$0)
                }
            }
            let earlier = try instance("e")
            let soon = try instance("s") {
                $0.sealing.storageKeySecret = Self.secret
                $0.sealing.keyedStorageKeysFrom = now.addingTimeInterval(3600)
            }
            // Its clock behind the others' by less than a minute: the switch is still ahead here.
            let lagging = try instance("l") {
                $0.sealing.storageKeySecret = Self.secret
                $0.sealing.keyedStorageKeysFrom = now.addingTimeInterval(30)
                $0.sealing.acceptUnkeyedUntil = now.addingTimeInterval(3600)
            }
            let switched = try instance("w") {
                $0.sealing.storageKeySecret = Self.secret
                $0.sealing.keyedStorageKeysFrom = now.addingTimeInterval(-1)
                $0.sealing.acceptUnkeyedUntil = now.addingTimeInterval(3600)
            }
            let done = try instance("d") {
                $0.sealing.storageKeySecret = Self.secret
                $0.sealing.keyedStorageKeysFrom = now.addingTimeInterval(-7200)
                $0.sealing.acceptUnkeyedUntil = now.addingTimeInterval(-3600)
            }
            try await withManagers([earlier, soon, switched, done, lagging]) { managers in
                let (earlier, soon, switched, done, lagging) = (managers[0], managers[1], managers[2], managers[3], managers[4])
                var browser = Browser()
                var count = 0
                // Before the switch: the same keys as instances without the secret.
                for manager in [earlier, soon, earlier, soon] {
                    count += 1
                    #expect(try await manager.increment(&browser) == count)
                }
                var late = Browser()
                try await soon.increment(&late)
                var alice = Browser()
                try await soon.login(&alice, as: "alice")
                var bob = Browser()
                try await earlier.login(&bob, as: "bob")
                var carol = Browser()
                try await soon.login(&carol, as: "carol")
                var dave = Browser()
                try await soon.login(&dave, as: "dave")
                let id = try #require(browser.id)
                let unkeyed = SessionKeys(token: id.token, prefix: "msm:")
                let keyed = SessionKeys(token: id.token, prefix: "msm:", secret: Self.secret)
                #expect(soon.keys(for: id.token) == unkeyed)
                #expect(switched.keys(for: id.token) == keyed)
                // Past the switch: moved at the first request, then read under the keyed key.
                for _ in 0..<3 {
                    count += 1
                    #expect(try await switched.increment(&browser) == count)
                }
                #expect(switched.statistics.value(of: .sessionsMovedToKeyedKeys) == 1)
                // An instance whose clock has not reached the switch yet finds the moved session
                // under its keyed key (its unkeyed copy reads as ended), and keeps it there.
                count += 1
                #expect(try await lagging.increment(&browser) == count)
                count += 1
                #expect(try await switched.increment(&browser) == count)
                let home = try #require(browser.id).nodeID
                try await withInspector(servers) { inspector in
                    #expect(try await inspector.node(home).get(keyed.primary) != nil)
                    try await eventually("the unkeyed copy ended") {
                        try await inspector.node(home).get(unkeyed.primary)?.flags == SessionManager.tombstoneFlags
                    }
                }
                // Alice logged in before the switch (her index unkeyed) and used the session since
                // (moved); a second login of hers after it. Revoking ends both.
                #expect(try await switched.hasSession(alice))
                // Still there at her next request (sticky: taken over by this instance, her entry
                // found in the index from before the switch and added to the keyed one, not ended
                // as a revoked takeover).
                #expect(try await switched.hasSession(alice))
                var alice2 = Browser()
                try await switched.login(&alice2, as: "alice")
                #expect(try await switched.invalidateAll(principal: "alice") == 2)
                #expect(try await switched.hasSession(alice) == false)
                #expect(try await switched.hasSession(alice2) == false)
                // Bob logs out in the window: the unkeyed copy cannot bring him back.
                try await switched.request(&bob, path: "/logout") { access in try await access.invalidate() }
                #expect(try await switched.hasSession(bob) == false)
                #expect(try await done.hasSession(bob) == false)
                // Dave, indexed before the switch, becomes Erin after it: revoking Dave ends nothing.
                try await switched.request(&dave, path: "/switch") { access in
                    try #require(try await access.load()).setPrincipal("erin")
                }
                #expect(try await switched.invalidateAll(principal: "dave") == 0)
                #expect(try await switched.hasSession(dave))
                #expect(try await switched.invalidateAll(principal: "erin") == 1)
                #expect(try await switched.hasSession(dave) == false)
                // After the window: the moved session is read; one not used in the window is gone.
                #expect(try await done.readCount(&browser) == count)
                #expect(try await done.readCount(&late) == 0)
                // Carol logged in before the switch and never came back: her index from before
                // the switch still revokes her, and her unkeyed copy reads as ended.
                #expect(try await soon.hasSession(carol))
                #expect(try await done.invalidateAll(principal: "carol") == 1)
                #expect(try await soon.hasSession(carol) == false)
            }
        }
    }

    /// A sticky takeover past the switch moves the session to its keyed keys, while the previous
    /// owner, its clock still short of the switch, holds it in memory under its unkeyed keys, with
    /// a write of it queued (asynchronous saving). The takeover's notice names both forms: the
    /// previous owner drops its copy and its queued write, as for any takeover (guarantees.md),
    /// rather than serve an old tab from memory and land the write, later, under the unkeyed key
    /// over the move's tombstone.
    @Test func aTakeoverThatMovesTheSessionReachesAPreviousOwnerShortOfTheSwitch() async throws {
        try await withMemcachedServers(count: 2) { servers in
            let now = Date()
            func instance(_ route: String, switchIn seconds: TimeInterval) throws -> SessionManager.Configuration {
                try configuration(servers, mode: .sticky) {
                    $0.route = route
                    $0.sticky.asynchronousSaving = true
                    $0.sticky.saveDelay = .seconds(1)
                    $0.sealing.storageKeySecret = Self.secret
                    $0.sealing.keyedStorageKeysFrom = now.addingTimeInterval(seconds)
                    $0.sealing.acceptUnkeyedUntil = now.addingTimeInterval(3600)
                }
            }
            try await withManagers([try instance("l", switchIn: 30), try instance("w", switchIn: -1)]) { managers in
                let (lagging, switched) = (managers[0], managers[1])
                try await withInspector(servers) { inspector in
                    var browser = Browser()
                    #expect(try await lagging.increment(&browser) == 1)
                    try await eventually("the first save landed") { lagging.statistics.value(of: .writes) == 1 }
                    #expect(try await lagging.increment(&browser) == 2)  // its save queued for a second
                    let oldTab = browser
                    let id = try #require(browser.id)
                    // The balancer moves the browser: the takeover moves the session to its keyed key.
                    let taken = try await switched.increment(&browser)
                    #expect(switched.statistics.value(of: .sessionsMovedToKeyedKeys) == 1)
                    #expect(lagging.statistics.value(of: .noticesRead) == 1, "the previous owner knew the notice was for its session")
                    #expect(taken == 2, "the queued change dropped with the takeover, as documented")
                    try await eventually("the previous owner's queue drained") { lagging.sticky.writer.pendingCount == 0 }
                    #expect(lagging.statistics.value(of: .writes) == 1, "no write of the session taken over")
                    let unkeyed = SessionKeys(token: id.token, prefix: "msm:")
                    #expect(try await inspector.node(id.nodeID).get(unkeyed.primary)?.flags == SessionManager.tombstoneFlags)
                    // A logout on the new owner: the old tab finds nothing on the previous one.
                    try await switched.request(&browser, path: "/logout") { access in try await access.invalidate() }
                    var old = oldTab
                    #expect(try await lagging.hasSession(old) == false)
                    #expect(try await lagging.readCount(&old) == 0)
                }
            }
        }
    }

    /// A revocation on an instance whose clock is still short of the switch, of a session that an
    /// instance past it took over (moved to its keyed keys, indexed in the keyed index): it reads
    /// the keyed index too and names every entry in both forms, so the new owner is told and stops
    /// serving the session before the revocation returns.
    @Test func aRevocationShortOfTheSwitchReachesASessionMovedPastIt() async throws {
        try await withMemcachedServers(count: 2) { servers in
            let now = Date()
            func instance(_ route: String, switchIn seconds: TimeInterval) throws -> SessionManager.Configuration {
                try configuration(servers, mode: .sticky) {
                    $0.route = route
                    $0.sticky.asynchronousSaving = false
                    $0.sealing.storageKeySecret = Self.secret
                    $0.sealing.keyedStorageKeysFrom = now.addingTimeInterval(seconds)
                    $0.sealing.acceptUnkeyedUntil = now.addingTimeInterval(3600)
                }
            }
            try await withManagers([try instance("l", switchIn: 30), try instance("w", switchIn: -1)]) { managers in
                let (lagging, switched) = (managers[0], managers[1])
                var alice = Browser()
                try await lagging.login(&alice, as: "alice")
                // Taken over past the switch: moved to its keyed keys, and into the keyed index;
                // the browser now holds the new owner's cookie (its memory serves it).
                try await switched.request(&alice, path: "/touch") { access in _ = try #require(try await access.load()) }
                #expect(switched.statistics.value(of: .sessionsMovedToKeyedKeys) == 1)
                #expect(try await switched.hasSession(alice))
                #expect(try await lagging.invalidateAll(principal: "alice") == 1)
                #expect(try await switched.hasSession(alice) == false, "the new owner stopped serving it")
                #expect(try await lagging.hasSession(alice) == false)
            }
        }
    }

    /// A storage-key transition's window: a session not yet moved whose node fails is recovered
    /// from its unkeyed backup, and lives on under its keyed keys.
    @Test func aSessionNotYetMovedSurvivesItsNodesFailureInTheWindow() async throws {
        try await withMemcachedServers(count: 3) { servers in
            let earlier = try configuration(servers)
            let switched = try configuration(servers) {
                $0.memcached.requestTimeout = .milliseconds(500)
                $0.memcached.failureThreshold = 1
                $0.sealing.storageKeySecret = Self.secret
                $0.sealing.keyedStorageKeysFrom = Date().addingTimeInterval(-1)
                $0.sealing.acceptUnkeyedUntil = Date().addingTimeInterval(3600)
            }
            try await withManagers([earlier, switched]) { managers in
                let (earlier, switched) = (managers[0], managers[1])
                try await withInspector(servers) { inspector in
                    var browser = Browser()
                    try await earlier.increment(&browser)
                    #expect(try await earlier.increment(&browser) == 2)
                    let id = try #require(browser.id)
                    let unkeyed = earlier.keys(for: id.token)
                    let backupNode = earlier.topology.nextAvailable(after: id.nodeID)!
                    try await eventually("the backup is written") { try await inspector.node(backupNode).get(unkeyed.backup) != nil }
                    try await servers[Int(id.nodeID.dropFirst())! - 1].kill()
                    #expect(try await switched.increment(&browser) == 3)
                    let moved = try #require(browser.id)
                    #expect(moved.nodeID != id.nodeID)
                    let keyed = switched.keys(for: moved.token)
                    #expect(keyed.isKeyed)
                    #expect(try await inspector.node(moved.nodeID).get(keyed.primary) != nil)
                    #expect(try await switched.increment(&browser) == 4)
                    // The unkeyed copies it was recovered from are ended: the failed node, back
                    // with its data, could not have its copy moved in as a second live one.
                    try await eventually("the unkeyed backup ended") {
                        try await inspector.node(backupNode).get(unkeyed.backup)?.flags == SessionManager.tombstoneFlags
                    }
                }
            }
        }
    }
}

#if canImport(Glibc)
import Glibc
#endif
import Foundation
import HTTPTypes
import InMemoryTracing
import Logging
import Memcached
import MemcachedSessionsOperations
import MemcachedTestRig
import NIOCore
import ServiceLifecycle
import Synchronization
import Testing
import Tracing

@_spi(Simulation) @testable import MemcachedSessions

@Suite("Backups")
struct BackupsTests {
    @Test func anOlderBackupArrivingLateLeavesTheNewerOneAlone() async throws {
        try await withMemcachedServers(count: 2) { servers in
            let config = try configuration(servers)
            try await withManager(config) { manager in
                try await withInspector(servers) { inspector in
                    var browser = Browser()
                    try await manager.increment(&browser)
                    let id = try #require(browser.id)
                    let keys = manager.keys(for: id.token)
                    let backupNode = id.nodeID == "n1" ? "n2" : "n1"
                    let first = try #require(try await inspector.node(id.nodeID).get(keys.primary))
                    let firstRecord = try BinarySessionCodec().decodeSession(from: first.value)
                    for _ in 0..<3 { try await manager.increment(&browser) }
                    let latest = try #require(try await inspector.node(id.nodeID).get(keys.primary))
                    try await eventually("the latest backup written") {
                        try await inspector.node(backupNode).get(keys.backup)?.value == latest.value
                    }
                    // The first save's backup, arriving now.
                    await manager.store.writeBackup(
                        keys: keys, primaryNode: id.nodeID, bytes: first.value, metadata: firstRecord.metadata,
                        now: manager.context.currentTimeMillis())
                    try await eventually("the late backup looked at the copy there") {
                        manager.statistics.value(of: .backupsOutdated) == 1
                    }
                    #expect(try await inspector.node(backupNode).get(keys.backup)?.value == latest.value, "left alone")
                }
            }
        }
    }

    /// The simulation, seed 1038: a write whose reply was lost (its node frozen) landed at the
    /// thaw, and the browser read it; its backup, never written, stayed one version behind, and
    /// an eviction of the primary then brought the older count back. The read that finds the
    /// primary ahead of the backup brings the backup up to it.
    @Test func aBackupLeftBehindByAWriteWithALostReplyCatchesUpAtTheNextRead() async throws {
        try await withMemcachedServers(count: 2) { servers in
            let config = try configuration(servers) {
                $0.memcached.requestTimeout = .seconds(1)
            }
            try await withManager(config) { manager in
                try await withInspector(servers) { inspector in
                    var browser = Browser()
                    #expect(try await manager.increment(&browser) == 1)
                    let id = try #require(browser.id)
                    let keys = manager.keys(for: id.token)
                    let backupNode = id.nodeID == "n1" ? "n2" : "n1"
                    try await eventually("the first backup, and the nodes' boot times known") {
                        try await inspector.node(backupNode).get(keys.backup)?.flags == 1
                            && manager.store.nodeRestarts.knows("n1") && manager.store.nodeRestarts.knows("n2")
                    }
                    // A write whose reply is lost: the node freezes between the read and the write.
                    let access = manager.beginRequest(path: "/counter", sessionCookie: browser.cookie)
                    try #require(try await access.load()).set("count", 2)
                    let home = servers[Int(id.nodeID.dropFirst())! - 1]
                    try await home.freeze()  // every thread stopped before the write is sent
                    await #expect(throws: SessionError.self, "no answer: it may not have been saved") {
                        try await manager.endRequest(access)
                    }
                    home.thaw()  // the write lands now
                    try await eventually("the node back") { manager.topology.isAvailable(id.nodeID) }
                    #expect(try await manager.readCount(&browser) == 2, "the late write, read")
                    try await eventually("the backup caught up with the copy read") {
                        try await inspector.node(backupNode).get(keys.backup)?.flags == 2
                    }
                    // The primary's node restarted empty (the seed lost it to an eviction): the
                    // backup has what the browser read.
                    let primary = Int(id.nodeID.dropFirst())! - 1
                    try await servers[primary].kill()
                    try await servers[primary].restart()
                    try await eventually("restart noticed") { manager.store.missMayBeRestart(on: id.nodeID) }
                    #expect(try await manager.readCount(&browser) == 2)
                }
            }
        }
    }

    /// A session whose requests keep coming to one instance has its backup written with the CAS
    /// unique of that instance's last backup write: one round trip (`ms`), not a read (`mg`) and
    /// a write. Three round trips a request: the read, the write and the backup write.
    @Test func aSessionKeptOnOneInstanceHasItsBackupWrittenInOneRoundTrip() async throws {
        try await withMemcachedServers(count: 2) { servers in
            let config = try configuration(servers)
            try await withManager(config) { manager in
                try await withInspector(servers) { inspector in
                    var browser = Browser()
                    try await manager.increment(&browser)
                    let id = try #require(browser.id)
                    let keys = manager.keys(for: id.token)
                    let backupNode = id.nodeID == "n1" ? "n2" : "n1"
                    for count in 2...4 {
                        let before = manager.statistics.value(of: .memcachedRoundTrips)
                        #expect(try await manager.increment(&browser) == count)
                        #expect(manager.statistics.value(of: .memcachedRoundTrips) - before == 3)
                        let primary = try #require(try await inspector.node(id.nodeID).get(keys.primary))
                        let backup = try #require(try await inspector.node(backupNode).get(keys.backup))
                        #expect(backup.value == primary.value, "the backup has the latest write")
                        #expect(backup.flags == UInt32(count))
                    }
                    #expect(manager.statistics.value(of: .backupsWrittenWithoutRead) == 3)
                    // A node seen to restart counts its CAS uniques from the start again: the
                    // next backup write there reads first.
                    await manager.store.nodeRestarted(backupNode)
                    #expect(try await manager.increment(&browser) == 5)
                    #expect(manager.statistics.value(of: .backupsWrittenWithoutRead) == 3)
                    #expect(try await inspector.node(backupNode).get(keys.backup)?.flags == 5)
                }
            }
        }
    }

    /// The one-round-trip backup write goes only over a connection opened before the write whose
    /// CAS unique it uses: after the backup node's connections were cut (as a restart of memcached
    /// would, which counts CAS uniques from the start again), it is not sent and the backup is
    /// read first; the write after that is one round trip again.
    @Test func aBackupWriteWithARememberedCASUniqueNeedsTheConnectionItCameOn() async throws {
        try await withMemcachedServers(count: 2) { servers in
            let proxy = try await FaultProxy.start(port: servers[1].port)
            defer { proxy.stop() }
            let config = try configuration(n1: servers[0].hostAndPort, n2: proxy.hostAndPort)
            try await withManager(config) { manager in
                try await withInspector(servers) { inspector in
                    // A session stored on n1, its backup on n2 (behind the proxy).
                    var browser = Browser()
                    for _ in 0..<64 {
                        browser = Browser()
                        try await manager.increment(&browser)
                        if browser.id?.nodeID == "n1" { break }
                    }
                    let id = try #require(browser.id)
                    try #require(id.nodeID == "n1")
                    let keys = manager.keys(for: id.token)
                    #expect(try await manager.increment(&browser) == 2)
                    let fast = manager.statistics.value(of: .backupsWrittenWithoutRead)
                    #expect(fast >= 1)
                    proxy.dropConnections()
                    #expect(try await manager.increment(&browser) == 3)
                    #expect(manager.statistics.value(of: .backupsWrittenWithoutRead) == fast, "not sent over a new connection")
                    #expect(manager.statistics.value(of: .backupFailures) == 0, "not sent (a send on the closed connection fails)")
                    try await eventually("the backup written after a read") {
                        try await inspector.node("n2").get(keys.backup)?.flags == 3
                    }
                    #expect(try await manager.increment(&browser) == 4)
                    #expect(manager.statistics.value(of: .backupsWrittenWithoutRead) == fast + 1)
                    #expect(try await inspector.node("n2").get(keys.backup)?.flags == 4)
                }
            }
        }
    }

    /// Another instance's logout puts a tombstone where this instance's last backup write was:
    /// its next backup write (a save that raced the logout) is not sent with the old CAS unique
    /// blindly; it reads, finds the tombstone, and leaves it.
    @Test func aTombstoneWrittenElsewhereStopsTheOneRoundTripBackupWrite() async throws {
        try await withMemcachedServers(count: 2) { servers in
            let config = try configuration(servers)
            try await withManagers([config, config]) { managers in
                let (a, b) = (managers[0], managers[1])
                try await withInspector(servers) { inspector in
                    var browser = Browser()
                    try await a.increment(&browser)
                    try await a.increment(&browser)
                    #expect(a.statistics.value(of: .backupsWrittenWithoutRead) == 1)
                    let id = try #require(browser.id)
                    let keys = a.keys(for: id.token)
                    let backupNode = id.nodeID == "n1" ? "n2" : "n1"
                    let stored = try #require(try await inspector.node(id.nodeID).get(keys.primary))
                    var record = try BinarySessionCodec().decodeSession(from: stored.value)
                    try await b.request(&browser) { access in try #require(try await access.load()).invalidate() }
                    #expect(try await inspector.node(backupNode).get(keys.backup)?.flags == SessionManager.tombstoneFlags)
                    record.metadata.version += 1
                    await a.store.writeBackup(
                        keys: keys, primaryNode: id.nodeID, bytes: stored.value, metadata: record.metadata, now: a.context.currentTimeMillis())
                    #expect(a.statistics.value(of: .backupsWrittenWithoutRead) == 1)
                    #expect(a.statistics.value(of: .backupsOutdated) == 1)
                    #expect(try await inspector.node(backupNode).get(keys.backup)?.flags == SessionManager.tombstoneFlags)
                }
            }
        }
    }

    /// Off (for proxies that keep connections across a restart behind them), every backup write
    /// reads first.
    @Test func theOneRoundTripBackupWriteCanBeTurnedOff() async throws {
        try await withMemcachedServers(count: 2) { servers in
            let config = try configuration(servers) { $0.reusesBackupCAS = false }
            try await withManager(config) { manager in
                var browser = Browser()
                for count in 1...3 {
                    let value = try await manager.increment(&browser)
                    #expect(value == count)
                }
                #expect(manager.statistics.value(of: .backupsWrittenWithoutRead) == 0)
                #expect(manager.statistics.value(of: .backupWrites) == 3)
            }
        }
    }

    /// The one-round-trip backup write lands only over this instance's own last write: after
    /// another instance wrote the backup, it fails, and the read-then-write rounds decide, which
    /// never go back (here: a newer backup stays).
    @Test func aBackupWrittenElsewhereSinceIsReadBeforeItIsReplaced() async throws {
        try await withMemcachedServers(count: 2) { servers in
            let config = try configuration(servers)
            try await withManagers([config, config]) { managers in
                let (a, b) = (managers[0], managers[1])
                try await withInspector(servers) { inspector in
                    var browser = Browser()
                    try await a.increment(&browser)
                    try await a.increment(&browser)  // a's second backup write: over its first
                    #expect(a.statistics.value(of: .backupsWrittenWithoutRead) == 1)
                    let id = try #require(browser.id)
                    let keys = a.keys(for: id.token)
                    let backupNode = id.nodeID == "n1" ? "n2" : "n1"
                    #expect(try await b.increment(&browser) == 3)  // b wrote the backup since
                    #expect(try await a.increment(&browser) == 4)
                    #expect(a.statistics.value(of: .backupsWrittenWithoutRead) == 1, "a read the backup first")
                    let primary = try #require(try await inspector.node(id.nodeID).get(keys.primary))
                    #expect(try await inspector.node(backupNode).get(keys.backup)?.value == primary.value)

                    // A newer backup than a's next write: a's write must not replace it.
                    try await inspector.node(backupNode).set(keys.backup, value: ByteBuffer(string: "newer"), flags: 9)
                    #expect(try await a.increment(&browser) == 5)
                    #expect(a.statistics.value(of: .backupsWrittenWithoutRead) == 1)
                    #expect(a.statistics.value(of: .backupsOutdated) == 1)
                    let left = try #require(try await inspector.node(backupNode).get(keys.backup))
                    #expect(left.flags == 9 && left.value == ByteBuffer(string: "newer"), "the newer backup left alone")
                }
            }
        }
    }

    @Test func aBackupWriteNeverReplacesATombstone() async throws {
        try await withMemcachedServers(count: 2) { servers in
            let config = try configuration(servers)
            try await withManager(config) { manager in
                try await withInspector(servers) { inspector in
                    var browser = Browser()
                    try await manager.increment(&browser)
                    let id = try #require(browser.id)
                    let keys = manager.keys(for: id.token)
                    let backupNode = id.nodeID == "n1" ? "n2" : "n1"
                    let stored = try #require(try await inspector.node(id.nodeID).get(keys.primary))
                    var record = try BinarySessionCodec().decodeSession(from: stored.value)
                    try await manager.request(&browser) { access in try #require(try await access.load()).invalidate() }
                    #expect(try await inspector.node(backupNode).get(keys.backup)?.flags == SessionManager.tombstoneFlags)
                    // A save that raced the logout sends its (newer-versioned) backup only now.
                    record.metadata.version += 10
                    await manager.store.writeBackup(
                        keys: keys, primaryNode: id.nodeID, bytes: stored.value, metadata: record.metadata, now: manager.context.currentTimeMillis())
                    try await eventually("the backup write looked at the copy there") {
                        manager.statistics.value(of: .backupsOutdated) == 1
                    }
                    #expect(try await inspector.node(backupNode).get(keys.backup)?.flags == SessionManager.tombstoneFlags)
                }
            }
        }
    }

    @Test func theBackupIsWrittenBeforeTheResponse() async throws {
        try await withMemcachedServers(count: 2) { servers in
            // The backup node answers late: a backup not waited for lands after the response.
            let proxy = try await FaultProxy.start(port: servers[1].port)
            defer { proxy.stop() }
            let config = try configuration(n1: servers[0].hostAndPort, n2: proxy.hostAndPort)
            try await withManager(config) { manager in
                try await withInspector(servers) { inspector in
                    var browser = Browser()
                    try await manager.increment(&browser)
                    proxy.update { $0.delay = .milliseconds(300) }
                    #expect(try await manager.increment(&browser) == 2)
                    let keys = manager.keys(for: try #require(browser.id).token)
                    let primary = try #require(try await inspector.node("n1").get(keys.primary))
                    // Read at once, not eventually: the response came after the backup.
                    #expect(try await inspector.node("n2").get(keys.backup)?.value == primary.value, "backup written before the response")
                    proxy.update { $0.delay = .zero }
                    // The primary restarted empty: the acknowledged count comes back from the backup.
                    try await servers[0].kill()
                    try await servers[0].restart()
                    try await eventually("the manager uses n1 again") { manager.topology.isReachable("n1") }
                    #expect(try await manager.readCount(&browser) == 2)
                }
            }
        }
    }

    /// A backup write racing a logout can land after the logout's tombstone on the backup key
    /// (backups are unconditional, nobody waits for them). The logout's tombstones on the primary
    /// key of every node still outrank it: when the session's node later fails, neither recovery
    /// nor restore brings the logged-out session back.
    @Test(arguments: [false, true])
    func aBackupLandingAfterALogoutDoesNotBringItBack(restart: Bool) async throws {
        try await withMemcachedServers(count: 3) { servers in
            let config = try configuration(servers) {
                $0.memcached.requestTimeout = .milliseconds(500)
                $0.memcached.failureThreshold = 1
            }
            try await withManager(config) { manager in
                try await withInspector(servers) { inspector in
                    var browser = Browser()
                    try await manager.increment(&browser)
                    let id = try #require(browser.id)
                    let keys = manager.keys(for: id.token)
                    let backupNode = try inspector.node(manager.topology.nextAvailable(after: id.nodeID)!)
                    try await eventually("the backup is written") { try await backupNode.get(keys.backup) != nil }
                    let copy = try #require(try await backupNode.get(keys.backup))
                    try await eventually("the boot times are known") { manager.store.nodeRestarts.knows(id.nodeID) }
                    let old = browser
                    try await manager.request(&browser, path: "/logout") { access in try await access.invalidate() }
                    // The racing backup write lands last.
                    try await backupNode.set(keys.backup, value: copy.value, ttl: .seconds(60))
                    let home = servers[Int(id.nodeID.dropFirst())! - 1]
                    try await home.kill()
                    if restart {
                        try await home.restart()
                        try await eventually("the restart is seen") { manager.store.missMayBeRestart(on: id.nodeID) }
                    }
                    var stale = old
                    #expect(try await manager.readCount(&stale) == 0, "the logged-out session stays ended")
                }
            }
        }
    }

    /// A session idle past its timeout must not come back from its backup, which outlives the
    /// primary by two refresh windows, when the primary's node is dead (recovery) or restarted
    /// empty (restore). Both paths used to check only the absolute timeout.
    @Test(arguments: [false, true])
    func anIdleExpiredSessionDoesNotComeBackFromItsBackup(restart: Bool) async throws {
        try await withMemcachedServers(count: 2) { servers in
            // Idle 12 s: refresh window 3 s, backup TTL 18 s.
            try await withManager(try configuration(servers) { $0.timeouts.idle = .seconds(12) }) { manager in
                try await withInspector(servers) { inspector in
                    var browser = Browser()
                    try await manager.increment(&browser)
                    let id = try #require(browser.id)
                    let keys = manager.keys(for: id.token)
                    let primary = Int(id.nodeID.dropFirst())! - 1
                    let backupNode = try inspector.node(id.nodeID == "n1" ? "n2" : "n1")
                    func backupTTL() async throws -> Int? {
                        guard case .item(let item?) = try await backupNode.execute(.getMetadata(keys.backup)) else { return nil }
                        return item.timeToLive
                    }
                    try await eventually("a backup exists") { try await backupTTL() != nil }
                    // Idle past 12 s, with the backup still there (less than a window left).
                    try await eventually(timeout: .seconds(30), "the session is idle past its timeout") {
                        guard let left = try await backupTTL() else { return false }
                        return left <= 3
                    }
                    // A session within its timeout on the same node, which must come back: the
                    // idle one's absence is the timeout's, not a recovery that never works. New
                    // sessions go round-robin over the two nodes: one of the next two is there.
                    var fresh = Browser()
                    for _ in 0..<2 where fresh.id?.nodeID != id.nodeID {
                        fresh = Browser()
                        try await manager.increment(&fresh)
                    }
                    let freshID = try #require(fresh.id)
                    try #require(freshID.nodeID == id.nodeID, "a second session on the same node")
                    let freshBackup = manager.keys(for: freshID.token).backup
                    try await eventually("the fresh session's backup exists") {
                        guard case .item(let item?) = try await backupNode.execute(.getMetadata(freshBackup)) else { return false }
                        return item.timeToLive != nil
                    }
                    if restart {
                        try await servers[primary].kill()
                        try await servers[primary].restart()
                        // The manager knows the node restarted: a miss there looks for the backup.
                        try await eventually("the restart is seen") { manager.store.missMayBeRestart(on: id.nodeID) }
                    } else {
                        try await servers[primary].kill()
                    }
                    #expect(try await backupTTL() != nil, "the backup is still there")
                    #expect(try await manager.readCount(&browser) == 0, "idle-expired: gone, not restored from the backup")
                    #expect(try await manager.readCount(&fresh) == 1, "within its timeout: restored from the backup")
                }
            }
        }
    }

    /// A backup write to a stalled node gets no answer and is left for later; the node applies
    /// the write when its connection moves again, with its whole TTL counted from then, so the
    /// backup would outlive its session by the stall (and a restore could bring the session back
    /// idle past its timeout: the simulation, seed 6911). The write left for later gives that copy
    /// its original end back. (A node frozen with `SIGSTOP` stamps what it buffered with the
    /// clock it stopped with: the stall is the network's.)
    @Test func aBackupWriteThatLandsLateGetsItsOriginalEndBack() async throws {
        try await withStalledBackupNode { node, browser in
            let manager = node.manager
            node.stall()
            let written = ContinuousClock.now
            #expect(try await manager.increment(&browser) == 2, "answered without the backup node")
            // Stalled for 4 s in all: the held write lands 4 s late.
            try await Task.sleep(until: written + .seconds(4))
            node.proxy.resume()
            try await eventually("the late write landed") { try await node.backup()?.flags == 2 }
            try await eventually(timeout: .seconds(15), "its end back where it was") {
                guard let left = try await node.backup()?.timeToLive else { return false }
                // 31 s from the write, not from the resume (memcached's clock ticks once a
                // second; one more for the time between the write and `written`).
                let elapsed = Int((ContinuousClock.now - written).components.seconds)
                return left <= 31 - elapsed + 2
            }
            #expect(try await manager.readCount(&browser) == 2)
        }
    }

    /// The same for a read's backup touch: a touch the stalled node did not answer lands when its
    /// connection moves again, with its whole TTL counted from then, and the backup would outlive
    /// its session by the stall (the simulation, non-sticky seed 208438: after the primary was
    /// evicted, a request 14 s idle found a 10 s session again). Left for later, it gives the
    /// copy it touched its original end back. So does the touch of a request that carried the
    /// cookie but never opened the session (its TTLs slid without reading the value).
    @Test(arguments: [true, false])
    func aBackupTouchThatLandsLateGetsItsOriginalEndBack(opened: Bool) async throws {
        try await withStalledBackupNode { node, browser in
            let manager = node.manager
            node.stall()
            let touches = manager.statistics.value(of: .backupTouches)
            let read = try await node.readSendingABackupTouch(&browser, opened: opened)
            // Stalled for 4 s in all: the held touch lands 4 s late.
            try await Task.sleep(until: read + .seconds(4))
            node.proxy.resume()
            try await eventually("the touch left for later sent again") {
                manager.statistics.value(of: .backupTouches) >= touches + 2
            }
            try await eventually(timeout: .seconds(15), "its end back where it was") {
                guard let left = try await node.backup()?.timeToLive else { return false }
                // 31 s from the read, not from the resume (memcached's clock ticks once a
                // second; one more for the time between the read and `read`).
                let elapsed = Int((ContinuousClock.now - read).components.seconds)
                return left <= 31 - elapsed + 2
            }
            #expect(try await manager.readCount(&browser) == 1)
        }
    }

    /// A read on another instance slid the session while the touch waited for the stalled node:
    /// the correction never shortens the backup below the end the session's primary allows now
    /// (a backup ending before its primary would lose the session at a failover). Two rules see
    /// to it: the primary's end read before the correcting touch, and a slide seen after it;
    /// either one alone passes this test, with both removed it fails.
    @Test func aBackupTouchLeftForLaterKeepsTheEndOfASlideElsewhere() async throws {
        try await withStalledBackupNode { node, browser in
            let manager = node.manager
            node.stall()
            let read = try await node.readSendingABackupTouch(&browser, opened: true)
            // 9 s on, the other instance (n2 direct) reads the session: it slides the primary
            // (20 s) and touches the backup (31 s).
            try await Task.sleep(until: read + .seconds(9))
            let elsewhere = node.elsewhere
            let elsewhereTouches = elsewhere.statistics.value(of: .backupTouches)
            let slid = ContinuousClock.now
            #expect(try await elsewhere.readCount(&browser) == 1)
            try await eventually("the slide's touch") { elsewhere.statistics.value(of: .backupTouches) > elsewhereTouches }
            let cleaned = manager.statistics.value(of: .leftoversCleaned)
            node.proxy.resume()
            try await eventually("the touch left for later dealt with") {
                manager.statistics.value(of: .leftoversCleaned) > cleaned
            }
            let left = try #require(try await node.backup()?.timeToLive)
            // Not the 31 s the stalled touch meant from `read` (22 s from `slid`): what the slide
            // gave it, 31 s from `slid` (memcached's clock ticks once a second; one more for the
            // time between the slide and `slid`).
            let elapsed = Int((ContinuousClock.now - slid).components.seconds)
            #expect(left >= 31 - elapsed - 2, "the backup ends with the session, not before: \(left) s left")
        }
    }

    /// The session's primary node silent when the touch's node answers again: the correction
    /// waits for it (the backup may be all the session has; it is not shortened blind) and is
    /// made once the primary answers, while the touch's end is ahead.
    @Test func aBackupTouchLeftForLaterWaitsForThePrimarysNode() async throws {
        try await withStalledBackupNode { node, browser in
            let manager = node.manager
            node.stall()
            let read = try await node.readSendingABackupTouch(&browser, opened: true)
            try await node.servers[0].freeze()
            defer { node.servers[0].thaw() }  // (thawed below; also when an expectation throws)
            try await eventually("n1 is seen down") { !manager.topology.isReachable("n1") }
            try await Task.sleep(until: read + .seconds(4))
            node.proxy.resume()
            try await eventually("n2 is seen again") { manager.topology.isReachable("n2") }
            let queued = manager.statistics.value(of: .leftoversQueued)
            try await eventually("a pass with n1 silent puts the touch back") {
                manager.statistics.value(of: .leftoversQueued) > queued
            }
            // (A pass takes the entry out for as long as n1, marked down, takes to fail: no time.)
            #expect(manager.store.leftovers.count == 1)
            node.servers[0].thaw()
            try await eventually(timeout: .seconds(15), "its end back where it was") {
                guard let left = try await node.backup()?.timeToLive else { return false }
                let elapsed = Int((ContinuousClock.now - read).components.seconds)
                return left <= 31 - elapsed + 2
            }
            #expect(manager.store.leftovers.count == 0)
        }
    }

    /// A non-sticky instance over n1 (direct) and n2, the node of its backups, behind a
    /// `FaultProxy` that stalls on demand; idle 20 s (refresh window 5 s, backup TTL 31 s),
    /// answers within 1 s, nodes probed every 100 ms. One session is saved (count 1, its primary
    /// on n1, its first backup on n2). `elsewhere`: another instance, reaching n2 directly.
    private struct StalledBackupNode {
        let servers: [MemcachedServer]
        let manager: SessionManager
        let elsewhere: SessionManager
        let proxy: FaultProxy
        let keys: SessionKeys
        /// The backup copy's metadata on n2 (read directly).
        let backup: () async throws -> MemcachedItem?

        /// Nothing through the proxy moves from now on; what it holds lands at `proxy.resume()`.
        func stall() {
            proxy.update {
                $0.stalled = true
                $0.deliversAfterClientCloses = true
            }
        }

        /// A request of `manager` that refreshes the backup (a touch n2, stalled, does not
        /// answer), waiting until n2 is seen down; returns when it started.
        func readSendingABackupTouch(_ browser: inout Browser, opened: Bool) async throws -> ContinuousClock.Instant {
            manager.store.backupMemo.forget(keys.backup)
            let touches = manager.statistics.value(of: .backupTouches)
            let read = ContinuousClock.now
            if opened {
                #expect(try await manager.readCount(&browser) == 1, "answered without the backup node")
            } else {
                try await manager.request(&browser) { _ in }
            }
            try await eventually("the touch sent") { manager.statistics.value(of: .backupTouches) > touches }
            try await eventually("n2 is seen down") { !manager.topology.isReachable("n2") }
            return read
        }
    }

    private func withStalledBackupNode(_ body: (StalledBackupNode, inout Browser) async throws -> Void) async throws {
        try await withMemcachedServers(count: 2) { servers in
            let proxy = try await FaultProxy.start(port: servers[1].port)
            defer { proxy.stop() }
            func configuration(n2: String) throws -> SessionManager.Configuration {
                var config = try SessionManager.Configuration(nodes: "n1:\(servers[0].hostAndPort),n2:\(n2)")
                config.mode = .nonSticky
                config.failoverNodes = ["n2"]
                config.timeouts.idle = .seconds(20)
                config.memcached.requestTimeout = .seconds(1)
                config.memcached.probeInterval = .milliseconds(100)
                return config
            }
            let configurations = [try configuration(n2: proxy.hostAndPort), try configuration(n2: servers[1].hostAndPort)]
            try await withManagers(configurations) { managers in
                try await withInspector(servers) { inspector in
                    let manager = managers[0]
                    var browser = Browser()
                    #expect(try await manager.increment(&browser) == 1)
                    let id = try #require(browser.id)
                    #expect(id.nodeID == "n1")
                    let keys = manager.keys(for: id.token)
                    let backupNode = try inspector.node("n2")
                    let node = StalledBackupNode(servers: servers, manager: manager, elsewhere: managers[1], proxy: proxy, keys: keys) {
                        guard case .item(let item?) = try await backupNode.execute(.getMetadata(keys.backup)) else { return nil }
                        return item
                    }
                    try await eventually("the first backup") { try await node.backup()?.flags == 1 }
                    try await body(node, &browser)
                }
            }
        }
    }
}

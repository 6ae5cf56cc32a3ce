import Memcached
import MemcachedTestRig
import NIOCore
import Testing

@testable import MemcachedSessions

/// Backups of one session are sent by whichever instance saved it, over different connections:
/// a slow one may arrive after a newer one. It must not replace it (a failover of the primary
/// would then serve the older copy: a lost acknowledged write). Found by the simulation.
@Suite("Backups never go back")
struct BackupOrderTests {
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
}

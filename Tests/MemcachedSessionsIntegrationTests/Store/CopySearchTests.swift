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

@Suite("The newest-copy search")
struct CopySearchTests {
    /// `msm session show`'s reading, from the core: the newest copy wins by version, on equal
    /// versions the primary; undecodable bytes are counted, not shown; a tombstone says the
    /// session was logged out; nothing is changed.
    @Test func anInspectionFindsTheNewestCopyByTheRecoveriesRule() async throws {
        try await withMemcachedServers(count: 2) { servers in
            try await withInspector(servers) { client in
                let keys = SessionKeys(token: MemcachedSessionID.generate(nodeID: "n1", route: nil).token, prefix: "msm:")
                func bytes(version: UInt64, note: String) throws -> ByteBuffer {
                    var buffer = ByteBuffer()
                    try BinarySessionCodec().encodeSession(
                        SessionRecord(
                            metadata: SessionMetadata(
                                createdAt: 1, lastAccessedAt: 2, idleTimeoutSeconds: 60, absoluteTimeoutSeconds: 0, version: version),
                            attributes: ["note": ByteBuffer(string: note)]),
                        into: &buffer)
                    return buffer
                }
                func note(_ inspection: StoredSessionInspection) -> String? {
                    inspection.newest?.record.attributes["note"].map { String(buffer: $0) }
                }
                let n1 = try client.node("n1")
                let n2 = try client.node("n2")
                var inspection = await SessionManager.inspectStored(keys: keys, on: client)
                #expect(inspection.newest == nil && inspection.copies.isEmpty && !inspection.isInvalidated)

                try await n1.set(keys.primary, value: try bytes(version: 3, note: "primary 3"))
                try await n2.set(keys.backup, value: try bytes(version: 3, note: "backup 3"))
                inspection = await SessionManager.inspectStored(keys: keys, on: client)
                #expect(note(inspection) == "primary 3", "equal versions: the primary")
                #expect(inspection.copies.count == 2)

                try await n2.set(keys.backup, value: try bytes(version: 4, note: "backup 4"))
                try await n2.set(keys.primary, value: ByteBuffer(string: "not a session"))
                inspection = await SessionManager.inspectStored(keys: keys, on: client)
                #expect(note(inspection) == "backup 4", "a newer backup over an older primary")
                #expect(inspection.newest?.copy.nodeID == "n2" && inspection.newest?.copy.isPrimary == false)
                #expect(inspection.undecodable == 1)
                #expect(try await n2.get(keys.primary) != nil, "an inspection changes nothing")

                _ = await SessionManager.invalidateStored(keys: keys, on: client)
                inspection = await SessionManager.inspectStored(keys: keys, on: client)
                #expect(inspection.isInvalidated && inspection.newest == nil)
                #expect(inspection.unreachable.isEmpty)
            }
        }
    }
}

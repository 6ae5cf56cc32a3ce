import Foundation
import Memcached
import MemcachedTestRig
import NIOCore
import Testing

@testable import MemcachedSessions

/// A second codec, to prove codecs are pluggable: the whole session as one JSON document, values
/// as base64 of their JSON.
struct JSONDocumentCodec: SessionCodec {
    struct Document: Codable {
        var created: Int64
        var accessed: Int64
        var idle: Int64
        var absolute: Int64
        var version: UInt64
        var attributes: [String: String]
    }

    func encodeSession(_ record: SessionRecord, into buffer: inout ByteBuffer) throws(SessionCodecError) {
        let metadata = record.metadata
        let document = Document(
            created: metadata.createdAt, accessed: metadata.lastAccessedAt, idle: metadata.idleTimeoutSeconds,
            absolute: metadata.absoluteTimeoutSeconds, version: metadata.version,
            attributes: record.attributes.mapValues { Data($0.readableBytesView).base64EncodedString() })
        do {
            buffer.writeBytes(try JSONEncoder().encode(document))
        } catch {
            throw SessionCodecError("encoding: \(error)")
        }
    }

    func decodeSession(from buffer: ByteBuffer) throws(SessionCodecError) -> SessionRecord {
        do {
            let document = try JSONDecoder().decode(Document.self, from: Data(buffer.readableBytesView))
            var attributes: [String: ByteBuffer] = [:]
            for (name, base64) in document.attributes {
                guard let data = Data(base64Encoded: base64) else { throw SessionCodecError("bad base64") }
                attributes[name] = ByteBuffer(bytes: data)
            }
            return SessionRecord(
                metadata: SessionMetadata(
                    createdAt: document.created, lastAccessedAt: document.accessed, idleTimeoutSeconds: document.idle,
                    absoluteTimeoutSeconds: document.absolute, version: document.version),
                attributes: attributes)
        } catch let error as SessionCodecError {
            throw error
        } catch {
            throw SessionCodecError("not a JSON session document")
        }
    }

    func encodeValue<Value: Encodable>(_ value: Value) throws(SessionCodecError) -> ByteBuffer {
        try JSONValueCoding.encode(value)
    }

    func decodeValue<Value: Decodable>(_ type: Value.Type, from bytes: ByteBuffer) throws(SessionCodecError) -> Value {
        try JSONValueCoding.decode(type, from: bytes)
    }
}

@Suite("Bad input: ids, stored bytes, sizes")
struct BadInputTests {
    @Test func malformedAndForgedIDsAreNoSessionAndNeverAdopted() async throws {
        try await withMemcachedServers(count: 2) { servers in
            try await withManager(try configuration(servers)) { manager in
                try await withInspector(servers) { inspector in
                    let before = try await commandCounts(inspector)
                    let malformed = [
                        "garbage", "", String(repeating: "A", count: 100_000), "602F7397FBE4D9932E59A9D0E52FE178-n1\r\nflush_all",
                        "602F7397FBE4D9932E59A9D0E52FE178-n1 n2", "602f7397fbe4d9932e59a9d0e52fe178-n1", "../../../etc/passwd",
                    ]
                    for cookie in malformed {
                        var browser = Browser(cookie: cookie)
                        #expect(try await manager.readCount(&browser) == 0)
                        #expect(browser.cookie == cookie, "no Set-Cookie for a request that created nothing")
                    }
                    #expect(try await commandCounts(inspector) - before == CommandCounts(), "malformed ids cost no round trip")

                    // Well formed but never issued: no session, and a new session gets a new id.
                    let forged = MemcachedSessionID(token: .init(high: 0x0123_4567_89AB_CDEF, low: 42), nodeID: "n1")
                    var browser = Browser(cookie: forged.description)
                    #expect(try await manager.readCount(&browser) == 0)
                    #expect(try await manager.increment(&browser) == 1)
                    #expect(browser.id?.token != forged.token, "an id the server did not issue is never adopted")

                    // A node we do not have: "no session", not "unavailable".
                    var unknown = Browser(cookie: MemcachedSessionID.generate(nodeID: "n9", route: nil).description)
                    #expect(try await manager.readCount(&unknown) == 0)
                    #expect(manager.statistics.value(of: .unavailable) == 0)

                    // Someone else's route on a non-sticky instance is fine; the id still names the node.
                    var routed = Browser(cookie: browser.id!.routed(to: "elsewhere").description)
                    #expect(try await manager.readCount(&routed) == 1)
                }
            }
        }
    }

    @Test func corruptAndForeignStoredBytesAreMissingDeletedAndCounted() async throws {
        try await withMemcachedServers(count: 1) { servers in
            try await withManager(try configuration(servers)) { manager in
                try await withInspector(servers) { inspector in
                    for garbage in ["", "hello", "\r\nflush_all\r\n", "MS\u{1}\u{0}truncated", String(repeating: "\u{FF}", count: 5000)] {
                        var browser = Browser()
                        try await manager.increment(&browser)
                        let id = try #require(browser.id)
                        let key = manager.keys(for: id.token).primary
                        try await inspector.node(id.nodeID).set(key, value: ByteBuffer(string: garbage))
                        #expect(try await manager.readCount(&browser) == 0)
                        try await eventually("corrupt key deleted") { try await inspector.node(id.nodeID).get(key) == nil }
                    }
                    #expect(manager.statistics.value(of: .corruptSessions) == 5)
                }
            }
            // Bytes of another codec are foreign too.
            var browser = Browser()
            try await withManager(try configuration(servers) { $0.codec = JSONDocumentCodec() }) { (other: SessionManager) async throws in
                #expect(try await other.increment(&browser) == 1)
                #expect(try await other.increment(&browser) == 2)
                #expect(try await other.readCount(&browser) == 2, "the JSON document codec works end to end")
            }
            try await withManager(try configuration(servers)) { (manager: SessionManager) async throws in
                #expect(try await manager.readCount(&browser) == 0)
                #expect(manager.statistics.value(of: .corruptSessions) == 1)
            }
        }
    }

    @Test(arguments: SessionManager.Mode.allCases)
    func oversizedSessionsAreAClearErrorAndThePreviousCopyStays(mode: SessionManager.Mode) async throws {
        try await withMemcachedServers(count: 1) { servers in
            let config = try configuration(servers, mode: mode) { $0.sticky.asynchronousSaving = false }
            try await withManager(config) { manager in
                var browser = Browser()
                try await manager.increment(&browser)
                try await manager.increment(&browser)
                let error = await sessionError {
                    try await manager.request(&browser) { access in
                        let session = try #require(try await access.load())
                        try session.set("count", 3)
                        try session.set("huge", String(repeating: "x", count: 2 * 1024 * 1024))
                    }
                }
                #expect(error?.code == .sessionTooLarge)
                #expect(manager.statistics.value(of: .oversizedSessions) >= 1)
                // Memcached still has the previous copy (a second instance reads it).
                try await withManager(try configuration(servers, mode: mode) { $0.route = "other" }) {
                    (fresh: SessionManager) async throws in
                    var probe = browser
                    #expect(try await fresh.readCount(&probe) == 2)
                }
            }
        }
    }
}

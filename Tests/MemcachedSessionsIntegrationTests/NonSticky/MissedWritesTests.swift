import Memcached
import MemcachedTestRig
import NIOCore
import Testing

@_spi(Simulation) @testable import MemcachedSessions

/// A move that missed a write (the simulation, non-sticky seed 65295): one instance, cut off from
/// the session's node, moves the session from its backup while another instance, which still
/// reaches that node, saves a change there. Real servers; the cut and the slow path are proxies.
@Suite("Writes a move missed", .serialized)
struct MissedWritesTests {
    /// A's backup lands after B's write (and B's read of the backup it moved from). Once n1
    /// answers B again, its cleanup finds the old copy newer than that backup, reads the backup
    /// again, merges what it shows (A's change) into the session's new place, and deletes the
    /// old copy.
    @Test func aWriteTheOldNodeTookWhileTheSessionMovedIsMergedOnceItAnswers() async throws {
        // A reaches n2 through a proxy that holds its backup write; B reaches n1 through one
        // that cuts it off.
        try await withTwoInstances(proxied: [(instance: 0, node: 1), (instance: 1, node: 0)]) { instance, configuration in
            configuration.locking.mode = .none
            if instance == 0 {
                // A's backup write waits out the stall, however slow a loaded machine is.
                configuration.memcached.requestTimeout = .seconds(30)
            } else {
                configuration.memcached.requestTimeout = .milliseconds(500)
                configuration.memcached.failureThreshold = 2
            }
        } _: { managers, proxies, servers, inspector in
            let (a, b) = (managers[0], managers[1])
            let (slowBackup, cutOff) = (proxies[0], proxies[1])
            var browser = Browser()
            try await a.increment(&browser)
            let id = try #require(browser.id)
            try #require(id.nodeID == "n1")
            let keys = a.keys(for: id.token)
            try await eventually("the backup is on n2") { try await inspector.node("n2").get(keys.backup) != nil }

            // B: n1 does not answer it (twice), is marked down, and B is served from
            // the backup on n2.
            cutOff.update { $0.blackhole = true }
            let late = b.beginRequest(path: "/b", sessionCookie: browser.cookie)
            let session = try #require(try await late.load())
            #expect(!b.topology.isReachable("n1"))
            #expect(session.id.nodeID == "n2", "B moved the session to n2")
            #expect(b.statistics.value(of: .memcachedFailovers) == 1)

            // A saves its change on n1; its backup write is held on its way to n2.
            slowBackup.stall()
            let started = browser
            let aSaved = Task {
                var mine = started
                try await a.request(&mine, path: "/a") { access in try #require(try await access.load()).set("part0", "a") }
                return mine
            }
            try await eventually("A's write landed on n1") {
                guard let item = try await inspector.node("n1").get(keys.primary) else { return false }
                return try BinarySessionCodec().decodeSession(from: item.value).attributes["part0"] != nil
            }

            // B writes at the new place and reads the backup it moved from again:
            // nothing newer there yet.
            try session.set("part1", "b")
            let action = try await b.endRequest(late)
            guard case .set(let moved) = action.cookie else {
                Issue.record("B's response moved the session: \(action.cookie)")
                return
            }
            #expect(moved.nodeID == "n2")
            #expect(b.statistics.value(of: .backupForks) == 0, "B's read of the backup found nothing newer")

            // A's backup lands; then n1 answers B again.
            slowBackup.resume()
            #expect(try await aSaved.value.cookie == browser.cookie, "A was served where the session was")
            cutOff.clearFaults()
            try await eventually("B merged A's old copy into n2, and deleted it") {
                let oldCopy = try await inspector.node("n1").get(keys.primary)
                return b.statistics.value(of: .backupForks) == 1 && oldCopy == nil
            }

            var reader = Browser(cookie: moved.description)
            func parts() async throws -> [String?] {
                try await b.request(&reader, path: "/read") { access in
                    let session = try #require(try await access.load())
                    return [session["part0", as: String.self], session["part1", as: String.self]]
                }
            }
            #expect(try await parts() == ["a", "b"], "both changes in the primary")
            // n2 restarts empty: the session is read from its backup (on n1).
            try await eventually("the nodes' boot times are known") { b.store.nodeRestarts.knows("n2") }
            try await servers[1].kill()
            try await servers[1].restart()
            try await eventually("the restart is seen") { b.store.missMayBeRestart(on: "n2") }
            #expect(try await parts() == ["a", "b"], "both changes in the backup")
        }
    }
}

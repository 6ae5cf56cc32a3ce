import Memcached
import MemcachedTestRig
import NIOCore
import Testing

@testable import MemcachedSessions

/// Issue 9: the whole product in text mode through a real memcached-protocol proxy (twemproxy,
/// Debian's `nutcracker`) in front of two memcached servers, configured as one node id pointing at
/// the proxy. The proxy has no meta commands, no `gat`/`gats` and no `stats` (it closes the
/// connection on each): the client learns that on a connection of its own and falls back (a read
/// that slides the TTL is a `gets` and a `touch`; restarts are watched through a sentinel item).
/// This topology has no backup node: the proxy spreads keys itself.
@Suite("Text mode through a memcached-protocol proxy", .serialized)
struct TextModeThroughProxyTests {
    func configuration(
        _ proxy: ProxyServer, mode: SessionManager.Mode = .nonSticky, _ configure: (inout SessionManager.Configuration) -> Void = { _ in }
    ) throws -> SessionManager.Configuration {
        var configuration = try SessionManager.Configuration(nodes: "p1:\(proxy.hostAndPort)")
        configuration.memcached.protocolMode = .text
        configuration.memcached.probeInterval = .milliseconds(100)
        configuration.memcached.requestTimeout = .seconds(5)
        configuration.mode = mode
        configure(&configuration)
        return configuration
    }

    /// Waits until the client knows what the proxy answers.
    func capabilitiesKnown(_ manager: SessionManager) async throws {
        try await eventually("the proxy's text commands probed") {
            guard let node = manager.client.allNodes.first else { return false }
            return node.answersGetAndTouch != nil && node.answersStats != nil
        }
        let node = try #require(manager.client.allNodes.first)
        #expect(node.answersGetAndTouch == false && node.answersStats == false, "twemproxy has neither")
    }

    @Test func nonStickySessionsCountLogOutAndNeverCloseTheProxysConnections() async throws {
        try await withProxiedMemcachedServers(count: 2) { proxy, _ in
            try await withManager(try configuration(proxy)) { manager in
                try await capabilitiesKnown(manager)
                var browsers = [Browser](repeating: Browser(), count: 8)
                for round in 1...4 {
                    for index in browsers.indices { #expect(try await manager.increment(&browsers[index]) == round) }
                }
                for index in browsers.indices { #expect(try await manager.readCount(&browsers[index]) == 4) }
                let old = browsers[0]
                try await manager.request(&browsers[0], path: "/logout") { access in try await access.invalidate() }
                var stale = old
                #expect(try await manager.readCount(&stale) == 0, "logged out, through the proxy")
                let node = try #require(manager.client.allNodes.first)
                #expect(node.isAvailable)
                #expect(node.statistics.errors == 0, "no command the proxy refuses was sent (it would close the connection)")
                #expect(manager.statistics.value(of: .unavailable) == 0)
            }
        }
    }

    @Test func lockedRequestsThroughTheProxyAreSerializable() async throws {
        try await withProxiedMemcachedServers(count: 2) { proxy, _ in
            let locked = try configuration(proxy) { $0.locking.mode = .all }
            try await withManagers([locked, locked]) { managers in
                var browser = Browser()
                try await managers[0].increment(&browser)
                let first = browser
                try await withThrowingTaskGroup(of: Void.self) { group in
                    for index in 0..<20 {
                        group.addTask {
                            var tab = first
                            _ = try await managers[index % 2].increment(&tab)
                        }
                    }
                    try await group.waitForAll()
                }
                #expect(try await managers[0].readCount(&browser) == 21, "every increment counted once")
            }
        }
    }

    @Test func stickyTakeoverAndLogoutThroughTheProxy() async throws {
        try await withProxiedMemcachedServers(count: 2) { proxy, _ in
            func sticky(_ route: String) throws -> SessionManager.Configuration {
                try configuration(proxy, mode: .sticky) {
                    $0.route = route
                    $0.sticky.asynchronousSaving = false
                }
            }
            try await withManagers([try sticky("a"), try sticky("b")]) { managers in
                let (a, b) = (managers[0], managers[1])
                try await capabilitiesKnown(a)
                var browser = Browser()
                for _ in 0..<3 { try await a.increment(&browser) }
                let old = browser
                #expect(try await b.increment(&browser) == 4, "taken over by B")
                try await b.request(&browser, path: "/logout") { access in try await access.invalidate() }
                // A was told before the logout answered (notices, acknowledgements and heartbeats
                // through the proxy): the old cookie finds nothing there.
                var stale = old
                #expect(try await a.readCount(&stale) == 0)
                #expect(b.statistics.value(of: .noticesUnread) == 0)
                #expect(b.statistics.value(of: .noticesSent) >= 1)
                #expect(a.statistics.value(of: .noticesRead) == 1)
            }
        }
    }

    /// Without `stats`, a sticky instance learns that the servers behind the proxy lost their items
    /// from its sentinel item, and writes its sessions back from memory.
    @Test func aStickyInstanceRestoresWhatServersBehindTheProxyLost() async throws {
        try await withProxiedMemcachedServers(count: 2) { proxy, servers in
            let config = try configuration(proxy, mode: .sticky) {
                $0.route = "a"
                $0.sticky.asynchronousSaving = false
            }
            try await withManagers([config, try configuration(proxy, mode: .sticky) { $0.route = "b" }]) { managers in
                let (a, b) = (managers[0], managers[1])
                try await capabilitiesKnown(a)
                try await eventually("A watches p1 through its sentinel") { a.store.nodeRestarts.knows("p1") }
                var browser = Browser()
                for _ in 0..<3 { try await a.increment(&browser) }
                for server in servers { try await server.restart() }
                try await eventually(timeout: .seconds(15), "A wrote its session back") {
                    a.statistics.value(of: .sessionsRestored) >= 1
                }
                #expect(try await b.readCount(&browser) == 3, "read where A restored it")
            }
        }
    }
}

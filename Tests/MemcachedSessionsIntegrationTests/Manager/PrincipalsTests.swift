import Foundation
import HTTPTypes
import MemcachedSessionsOperations
import Memcached
import MemcachedTestRig
import NIOCore
import Testing

@_spi(Simulation) @testable import MemcachedSessions

extension SessionManager {
    /// A login: the session (new or not) gets a new id and the principal.
    func login(_ browser: inout Browser, as principal: String) async throws {
        try await request(&browser, path: "/login") { access in
            let session = try await access.loadOrCreate()
            try await access.regenerateID()
            try session.setPrincipal(principal)
            try session.set("count", 1)
        }
    }

    /// Whether the browser's cookie still names a live session here.
    func hasSession(_ browser: Browser) async throws -> Bool {
        var copy = browser
        return try await request(&copy, path: "/read") { access in try await access.load() != nil }
    }

    /// The principal's index as stored (the newer copy), or nil.
    func principalIndex(_ principal: String) async throws -> PrincipalIndex.Contents? {
        let index = principals.index
        let located = index.locate(try configuration.codec.encodeValue(principal))
        let (primary, backup) = await index.readBoth(located)
        guard case .found(let contents, _, _) = PrincipalIndex.newest(primary, backup) else { return nil }
        return contents
    }
}

@Suite("Sessions per principal: the index, its limits, revoking every session of a user")
struct PrincipalsTests {
    static func twoInstances(
        _ servers: [MemcachedServer], mode: SessionManager.Mode, _ configure: (inout SessionManager.Configuration) -> Void = { _ in }
    ) throws -> [SessionManager.Configuration] {
        try ["a1", "a2"].map { route in
            try configuration(servers, mode: mode) {
                $0.route = route
                $0.sticky.asynchronousSaving = false
                configure(&$0)
            }
        }
    }

    /// Alice logged in on two instances and Bob on one: revoking Alice on one instance ends both
    /// of hers (on the other instance too) and leaves Bob's.
    @Test(arguments: SessionManager.Mode.allCases)
    func invalidateAllEndsEverySessionOfAPrincipalOnEveryInstance(mode: SessionManager.Mode) async throws {
        try await withMemcachedServers(count: 2) { servers in
            // Sticky: the other instance holds Alice's session in memory and would serve it until
            // its next check against memcached (the touch interval, minutes): the revocation's
            // notice ends it before invalidateAll returns.
            try await withManagers(try Self.twoInstances(servers, mode: mode)) { managers in
                let (a, b) = (managers[0], managers[1])
                var alice1 = Browser()
                var alice2 = Browser()
                var bob = Browser()
                try await a.login(&alice1, as: "alice")
                try await b.login(&alice2, as: "alice")
                try await a.login(&bob, as: "bob")
                #expect(try await a.principalIndex("alice")?.entries.count == 2)
                #expect(try await a.invalidateAll(principal: "alice") == 2)
                #expect(try await a.hasSession(alice1) == false, "the revoking instance ends its own at once")
                #expect(try await b.hasSession(alice2) == false, "the other instance stopped serving it before the answer")
                #expect(try await a.hasSession(bob))
                #expect(try await a.principalIndex("alice")?.entries.isEmpty == true)
                #expect(a.statistics.value(of: .sessionsRevoked) == 2)
                // Nothing left to end.
                #expect(try await b.invalidateAll(principal: "alice") == 0)
            }
        }
    }

    /// A login whose index update fails (here: the index outgrew memcached's item size limit) is
    /// ended and the request fails with a typed error: a session the index does not hold could not
    /// be revoked with the others. The logins indexed before it are untouched.
    @Test func aLoginTheIndexCannotHoldIsEndedAndFails() async throws {
        try await withMemcachedServers(count: 1) { servers in
            try await withManager(try configuration(servers) { $0.memcached.itemSizeLimit = 1024 }) { manager in
                var indexed: [MemcachedSessionID] = []
                var refused: MemcachedSessionID?
                for _ in 0..<60 {
                    let access = manager.beginRequest(path: "/login", sessionCookie: nil)
                    let session = try await access.loadOrCreate()
                    try session.setPrincipal("frank")
                    try session.set("count", 1)
                    let id = session.id
                    do {
                        _ = try await manager.endRequest(access)
                        indexed.append(id)
                    } catch let error as SessionError {
                        #expect(error.code == .principalIndexUnavailable)
                        refused = id
                        break
                    }
                }
                let ended = try #require(refused, "the index never outgrew the item size limit")
                #expect(indexed.count >= 5)
                #expect(try await manager.hasSession(Browser(cookie: ended.description)) == false, "the refused login's session is ended")
                #expect(manager.statistics.value(of: .principalIndexFailures) == 1)
                #expect(try await manager.principalIndex("frank")?.entries.count == indexed.count)
                for id in indexed { #expect(try await manager.hasSession(Browser(cookie: id.description))) }
            }
        }
    }

    /// No index for a principal on a node that has evicted items: it may have been dropped, so
    /// revoking is a typed error (with the count ended: none), never a silent "0 sessions". On a
    /// node that never evicted, no index means no session. One node: no backup to read.
    @Test func aMissingIndexOnANodeThatEvictedIsATypedError() async throws {
        try await withMemcachedServers(count: 1, memoryMegabytes: 2) { servers in
            try await withManager(try configuration(servers)) { manager in
                #expect(try await manager.invalidateAll(principal: "gina") == 0)
                try await withInspector(servers) { inspector in
                    let filler = String(repeating: "f", count: 100_000)
                    for index in 0..<100 { try await inspector.set("filler:\(index)", value: filler) }
                    let evictions = try await inspector.node("n1").stats().first { $0.name == "evictions" }?.value
                    #expect(Int(evictions ?? "0") ?? 0 > 0, "the node evicted")
                }
                do {
                    _ = try await manager.invalidateAll(principal: "gina")
                    Issue.record("a missing index on a node that evicted was read as no session")
                } catch let error as SessionError {
                    #expect(error.code == .principalIndexUnavailable)
                    #expect(error.sessionsEnded == 0)
                }
            }
        }
    }

    /// Logins of one principal at once on two instances, many more than the CAS's attempts: the
    /// updates lose none. (Two authorities, the primary for one update and a backup that looked
    /// newer for another, lost entries here under load.)
    @Test(arguments: [10, 40])
    func concurrentLoginsOnTwoInstancesAreAllIndexed(logins: Int) async throws {
        try await withMemcachedServers(count: 2) { servers in
            try await withManagers(try Self.twoInstances(servers, mode: .nonSticky)) { managers in
                let browsers = try await withThrowingTaskGroup(of: Browser.self) { group in
                    for index in 0..<logins {
                        group.addTask {
                            var browser = Browser()
                            try await managers[index % 2].login(&browser, as: "carol")
                            return browser
                        }
                    }
                    return try await group.reduce(into: [Browser]()) { $0.append($1) }
                }
                #expect(try await managers[0].principalIndex("carol")?.entries.count == logins)
                #expect(try await managers[1].invalidateAll(principal: "carol") == logins)
                for browser in browsers { #expect(try await managers[0].hasSession(browser) == false) }
            }
        }
    }

    /// A logout takes its entry out; a new id replaces it; a change of principal moves it.
    @Test(arguments: SessionManager.Mode.allCases)
    func logoutsNewIDsAndChangesKeepTheIndexExact(mode: SessionManager.Mode) async throws {
        try await withMemcachedServers(count: 2) { servers in
            try await withManager(try configuration(servers, mode: mode) { $0.sticky.asynchronousSaving = false }) { manager in
                var first = Browser()
                var second = Browser()
                try await manager.login(&first, as: "dave")
                try await manager.login(&second, as: "dave")
                let digest = { (browser: Browser) in manager.keys(for: browser.id!.token).digest }
                #expect(try await manager.principalIndex("dave")?.entries.map(\.digest) == [digest(first), digest(second)])
                // A new id: the entry follows it.
                try await manager.request(&second) { access in try await access.regenerateID() }
                #expect(try await manager.principalIndex("dave")?.entries.map(\.digest) == [digest(first), digest(second)])
                // Another user on the same session: out of dave's index, into erin's.
                try await manager.request(&second) { access in try #require(try await access.load()).setPrincipal("erin") }
                #expect(try await manager.principalIndex("dave")?.entries.map(\.digest) == [digest(first)])
                #expect(try await manager.principalIndex("erin")?.entries.map(\.digest) == [digest(second)])
                // A logout.
                try await manager.request(&first) { access in try await access.invalidate() }
                #expect(try await manager.principalIndex("dave")?.entries.isEmpty == true)
                #expect(try await manager.invalidateAll(principal: "erin") == 1)
                #expect(try await manager.hasSession(second) == false)
            }
        }
    }

    /// What memcached holds names nobody: the index key is a keyed digest, its value holds token
    /// digests only (and is sealed when sealing is on).
    @Test(arguments: [false, true])
    func theIndexNamesNobodyAndHoldsNoToken(sealed: Bool) async throws {
        try await withMemcachedServers(count: 2) { servers in
            let configuration = try configuration(servers) {
                if sealed {
                    $0.sealing.keys = try! SessionKeyRing(current: SealingTests.keyA)
                    $0.sealing.storageKeySecret = SealingTests.secret
                }
            }
            try await withManager(configuration) { manager in
                try await withInspector(servers) { inspector in
                    var browser = Browser()
                    try await manager.login(&browser, as: "frank@example.com")
                    let located = manager.principals.index.locate(try configuration.codec.encodeValue("frank@example.com"))
                    #expect(!located.primaryKey.contains("frank"))
                    for (key, node) in [(located.primaryKey, located.primaryNode), (located.backupKey, located.backupNode!)] {
                        let item = try #require(try await inspector.node(node).get(key))
                        let text = String(decoding: item.value.readableBytesView, as: UTF8.self)
                        #expect(!text.contains("frank"))
                        #expect(!text.lowercased().contains(browser.id!.token.description.lowercased()))
                        #expect(text.hasPrefix(PrincipalIndex.header) == !sealed)
                    }
                }
            }
        }
    }

    /// Past the index bound the oldest sessions are logged out, never silently forgotten.
    @Test func pastTheIndexLimitTheOldestAreLoggedOut() async throws {
        try await withMemcachedServers(count: 2) { servers in
            try await withManager(try configuration(servers) { $0.principals.indexLimit = 3 }) { manager in
                var browsers: [Browser] = []
                for _ in 0..<4 {
                    var browser = Browser()
                    try await manager.login(&browser, as: "gina")
                    browsers.append(browser)
                }
                #expect(try await manager.hasSession(browsers[0]) == false)
                for browser in browsers.dropFirst() { #expect(try await manager.hasSession(browser)) }
                #expect(manager.statistics.value(of: .principalLimitLogouts) == 1)
                #expect(try await manager.invalidateAll(principal: "gina") == 3)
            }
        }
    }

    /// The concurrent session limit: the oldest logged out, or the new login refused (its session
    /// ended, a typed error). Sessions ended otherwise do not count.
    @Test(arguments: [SessionManager.Configuration.Principals.LimitPolicy.logOutOldest, .refuseNewLogin])
    func theConcurrentSessionLimit(policy: SessionManager.Configuration.Principals.LimitPolicy) async throws {
        try await withMemcachedServers(count: 2) { servers in
            let configuration = try configuration(servers) {
                $0.principals.concurrentSessionLimit = 2
                $0.principals.whenLimitReached = policy
            }
            try await withManager(configuration) { manager in
                var first = Browser()
                var second = Browser()
                var third = Browser()
                try await manager.login(&first, as: "hank")
                try await manager.login(&second, as: "hank")
                switch policy {
                case .logOutOldest:
                    try await manager.login(&third, as: "hank")
                    #expect(try await manager.hasSession(first) == false)
                    #expect(try await manager.hasSession(second))
                    #expect(try await manager.hasSession(third))
                case .refuseNewLogin:
                    let error = await sessionError { try await manager.login(&third, as: "hank") }
                    #expect(error?.code == .sessionLimitReached)
                    #expect(error?.httpAnswer.status == 403)
                    #expect(try await manager.hasSession(first))
                    #expect(try await manager.hasSession(second))
                    #expect(manager.statistics.value(of: .principalLoginsRefused) == 1)
                    // A logout makes room.
                    try await manager.request(&first) { access in try await access.invalidate() }
                    var fourth = Browser()
                    try await manager.login(&fourth, as: "hank")
                    #expect(try await manager.hasSession(fourth))
                }
            }
        }
    }

    /// The index's primary node killed: its backup serves the revocation. Both nodes down: a
    /// typed error that says no session was ended.
    @Test func theBackupServesWhenTheIndexNodeIsDownAndNeitherIsATypedError() async throws {
        try await withMemcachedServers(count: 3) { servers in
            try await withManager(try configuration(servers) { $0.memcached.requestTimeout = .milliseconds(500) }) { manager in
                var browsers: [Browser] = []
                for _ in 0..<4 {
                    var browser = Browser()
                    try await manager.login(&browser, as: "ivy")
                    browsers.append(browser)
                }
                let located = manager.principals.index.locate(try manager.configuration.codec.encodeValue("ivy"))
                let byID = Dictionary(uniqueKeysWithValues: servers.enumerated().map { ("n\($0.offset + 1)", $0.element) })
                try await byID[located.primaryNode]!.kill()
                try await eventually("the node is marked down") { !manager.principals.topology.isReachable(located.primaryNode) }
                #expect(try await manager.invalidateAll(principal: "ivy") == 4)
                for browser in browsers where browser.id!.nodeID != located.primaryNode {
                    #expect(try await manager.hasSession(browser) == false)
                }
                try await byID[located.backupNode!]!.kill()
                try await eventually("the node is marked down") { !manager.principals.topology.isReachable(located.backupNode!) }
                let error = await sessionError { _ = try await manager.invalidateAll(principal: "ivy") }
                #expect(error?.code == .principalIndexUnavailable)
                #expect(error?.sessionsEnded == 0)
                #expect(error.map { !$0.message.contains("ivy") } == true)
            }
        }
    }

    /// The management endpoint ends them too; with the index's nodes down it answers 503 with
    /// the count ended (0) and an error that names nobody.
    @Test func theManagementEndpointRevokes() async throws {
        try await withMemcachedServers(count: 2) { servers in
            try await withManager(try configuration(servers) { $0.memcached.requestTimeout = .milliseconds(500) }) { manager in
                let token = "0123456789abcdef-token"
                let endpoints = try ManagementEndpoints(manager: manager, token: token, instance: "test")
                var fields = HTTPFields()
                fields[.authorization] = "Bearer \(token)"
                var first = Browser()
                var second = Browser()
                try await manager.login(&first, as: "jane")
                try await manager.login(&second, as: "jane")
                let body = ByteBuffer(string: #"{"principal":"jane"}"#)
                let answer = await endpoints.respond(to: .revoke, method: .post, headerFields: fields, body: body)
                #expect(answer.status == .ok)
                #expect(answer.text == #"{"ended":2}"#)
                #expect(try await manager.hasSession(first) == false)
                #expect(try await manager.hasSession(second) == false)
                for server in servers { try await server.kill() }
                try await eventually("the nodes are marked down") { !manager.principals.topology.order.contains { manager.principals.topology.isReachable($0) } }
                let failed = await endpoints.respond(to: .revoke, method: .post, headerFields: fields, body: body)
                #expect(failed.status == .serviceUnavailable)
                #expect(failed.text.contains(#""ended":0"#))
                #expect(!failed.text.contains("jane"))
            }
        }
    }

    @Test func aPrincipalMustBeShortAndNotEmpty() async throws {
        try await withMemcachedServers(count: 1) { servers in
            try await withManager(try configuration(servers)) { manager in
                var browser = Browser()
                try await manager.request(&browser) { access in
                    let session = try access.create()
                    #expect(throws: SessionError.self) { try session.setPrincipal("") }
                    #expect(throws: SessionError.self) { try session.setPrincipal(String(repeating: "x", count: 257)) }
                    try session.setPrincipal("ok")
                    #expect(session.principal == "ok")
                }
            }
        }
    }
}

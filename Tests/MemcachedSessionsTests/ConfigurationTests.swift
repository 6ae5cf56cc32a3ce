import Testing

@testable import MemcachedSessions

@Suite struct ConfigurationTests {
    func fresh() throws -> SessionManager.Configuration {
        try SessionManager.Configuration(nodes: "n1:127.0.0.1:11211")
    }

    @Test func theGroupsHoldTheDefaults() throws {
        let configuration = try fresh()
        #expect(configuration.timeouts.idle == .seconds(1800))
        #expect(configuration.timeouts.absolute == .seconds(24 * 60 * 60), "24 h by default (OWASP)")
        #expect(configuration.cookie.secure, "Secure by default")
        #expect(configuration.timeouts.save == .milliseconds(500))
        #expect(configuration.sticky.asynchronousSaving)
        #expect(configuration.sticky.saveDelay == .milliseconds(250))
        #expect(configuration.sticky.queueLimit == 10_000)
        #expect(configuration.sticky.localSessionLimit == 100_000)
        #expect(configuration.sticky.touchInterval == nil)
        #expect(configuration.locking == SessionManager.Configuration.Locking(mode: .none))
        #expect(configuration.locking.expiry == .seconds(5))
        #expect(configuration.locking.waitBudget == .seconds(10))
        #expect(configuration.cookie == .default)
        try configuration.validate()
    }

    @Test func anInvalidSettingIsNamedByItsGroup() throws {
        var configuration = try fresh()
        configuration.locking.expiry = .seconds(1)
        #expect(throws: SessionError.self) { try configuration.validate() }
        do { try configuration.validate() } catch { #expect(error.message.contains("locking.expiry")) }
        configuration = try fresh()
        configuration.sticky.queueLimit = 0
        do { try configuration.validate() } catch { #expect(error.message.contains("sticky.queueLimit")) }
    }

    /// The flat names of the previous release still compile (with a deprecation warning) and
    /// read and write the grouped settings.
    @available(*, deprecated)
    @Test func theFlatNamesAreAliasesOfTheGroupedSettings() throws {
        var configuration = try fresh()
        configuration.idleTimeout = .seconds(60)
        configuration.absoluteTimeout = .seconds(3600)
        configuration.saveTimeout = .seconds(2)
        configuration.asynchronousSaving = false
        configuration.asynchronousSaveDelay = .milliseconds(10)
        configuration.asynchronousQueueLimit = 7
        configuration.localSessionLimit = 8
        configuration.stickyTouchInterval = .seconds(9)
        configuration.lockExpiry = .seconds(3)
        configuration.lockWaitBudget = .seconds(4)
        configuration.lockFailurePolicy = .proceedUnlocked
        configuration.autoLockingPathLimit = 11
        configuration.operationTimeout = .milliseconds(700)
        #expect(configuration.timeouts.idle == .seconds(60))
        #expect(configuration.timeouts.absolute == .seconds(3600))
        #expect(configuration.timeouts.save == .seconds(2))
        #expect(!configuration.sticky.asynchronousSaving)
        #expect(configuration.sticky.saveDelay == .milliseconds(10))
        #expect(configuration.sticky.queueLimit == 7)
        #expect(configuration.sticky.localSessionLimit == 8)
        #expect(configuration.sticky.touchInterval == .seconds(9))
        #expect(configuration.locking.expiry == .seconds(3))
        #expect(configuration.locking.waitBudget == .seconds(4))
        #expect(configuration.locking.failurePolicy == .proceedUnlocked)
        #expect(configuration.locking.autoPathLimit == 11)
        #expect(configuration.memcached.requestTimeout == .milliseconds(700))
        #expect(configuration.lockExpiry == .seconds(3) && configuration.idleTimeout == .seconds(60))
    }

    /// `locking = .all`, from when `locking` was the mode alone, sets the mode and leaves the
    /// lock settings made before it (in whatever order old code set them).
    @available(*, deprecated)
    @Test func theOldLockingSpellingSetsTheModeOnly() throws {
        var configuration = try fresh()
        configuration.lockExpiry = .seconds(3)
        configuration.lockWaitBudget = .milliseconds(300)
        configuration.locking = .all
        #expect(configuration.locking.mode == .all)
        #expect(configuration.locking.expiry == .seconds(3), "kept")
        #expect(configuration.locking.waitBudget == .milliseconds(300), "kept")
        configuration.locking = .uriPattern("/cart/.*")
        #expect(configuration.locking.mode == .uriPattern("/cart/.*"))
        #expect(configuration.locking.expiry == .seconds(3))
        // A value built from the old spelling and then changed is taken whole.
        var locking = SessionManager.Configuration.Locking.auto
        locking.expiry = .seconds(7)
        configuration.locking = locking
        #expect(configuration.locking.mode == .auto && configuration.locking.expiry == .seconds(7))
        #expect(configuration.locking.waitBudget == .seconds(10), "the new value's")
        // The new spelling.
        configuration.locking = SessionManager.Configuration.Locking(mode: .none)
        #expect(configuration.locking.expiry == .seconds(5), "a whole new group")
    }
}

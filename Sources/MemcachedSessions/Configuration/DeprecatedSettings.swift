// The flat settings of earlier releases, kept for one release so that existing code compiles
// (with a warning naming the new place). Each reads and writes its grouped setting.

extension SessionManager.Configuration {
    @available(*, deprecated, renamed: "memcached.requestTimeout")
    public var operationTimeout: Duration {
        get { memcached.requestTimeout }
        set { memcached.requestTimeout = newValue }
    }

    @available(*, deprecated, renamed: "timeouts.idle")
    public var idleTimeout: Duration {
        get { timeouts.idle }
        set { timeouts.idle = newValue }
    }

    @available(*, deprecated, renamed: "timeouts.absolute")
    public var absoluteTimeout: Duration? {
        get { timeouts.absolute }
        set { timeouts.absolute = newValue }
    }

    @available(*, deprecated, renamed: "timeouts.save")
    public var saveTimeout: Duration {
        get { timeouts.save }
        set { timeouts.save = newValue }
    }

    @available(*, deprecated, renamed: "sticky.asynchronousSaving")
    public var asynchronousSaving: Bool {
        get { sticky.asynchronousSaving }
        set { sticky.asynchronousSaving = newValue }
    }

    @available(*, deprecated, renamed: "sticky.saveDelay")
    public var asynchronousSaveDelay: Duration {
        get { sticky.saveDelay }
        set { sticky.saveDelay = newValue }
    }

    @available(*, deprecated, renamed: "sticky.queueLimit")
    public var asynchronousQueueLimit: Int {
        get { sticky.queueLimit }
        set { sticky.queueLimit = newValue }
    }

    @available(*, deprecated, renamed: "sticky.localSessionLimit")
    public var localSessionLimit: Int {
        get { sticky.localSessionLimit }
        set { sticky.localSessionLimit = newValue }
    }

    @available(*, deprecated, renamed: "sticky.touchInterval")
    public var stickyTouchInterval: Duration? {
        get { sticky.touchInterval }
        set { sticky.touchInterval = newValue }
    }

    @available(*, deprecated, renamed: "locking.expiry")
    public var lockExpiry: Duration {
        get { locking.expiry }
        set { locking.expiry = newValue }
    }

    @available(*, deprecated, renamed: "locking.waitBudget")
    public var lockWaitBudget: Duration {
        get { locking.waitBudget }
        set { locking.waitBudget = newValue }
    }

    @available(*, deprecated, renamed: "locking.failurePolicy")
    public var lockFailurePolicy: SessionManager.LockFailurePolicy {
        get { locking.failurePolicy }
        set { locking.failurePolicy = newValue }
    }

    @available(*, deprecated, renamed: "locking.autoPathLimit")
    public var autoLockingPathLimit: Int {
        get { locking.autoPathLimit }
        set { locking.autoPathLimit = newValue }
    }
}

/// `configuration.locking = .all`, as when `locking` was the mode alone: sets the mode, leaves the
/// other locking settings as they are.
extension SessionManager.Configuration.Locking {
    private static func modeOnly(_ mode: SessionManager.LockingMode) -> Self {
        var locking = Self(mode: mode)
        locking.setsModeOnly = true
        return locking
    }

    @available(*, deprecated, message: "set locking.mode = .none")
    public static var none: Self { modeOnly(.none) }

    @available(*, deprecated, message: "set locking.mode = .all")
    public static var all: Self { modeOnly(.all) }

    @available(*, deprecated, message: "set locking.mode = .auto")
    public static var auto: Self { modeOnly(.auto) }

    @available(*, deprecated, message: "set locking.mode = .uriPattern(pattern)")
    public static func uriPattern(_ pattern: String) -> Self { modeOnly(.uriPattern(pattern)) }
}

#if canImport(Glibc)
    import Glibc
#elseif canImport(Musl)
    import Musl
#elseif canImport(Darwin)
    import Darwin
#endif

/// How long an item lives, with memcached's rules spelled out.
///
/// memcached reads an expiry of up to 30 days (2,592,000 s) as relative seconds and anything larger
/// as an absolute Unix time. ``seconds(_:)`` hides that: a longer TTL is converted to an absolute
/// time when the request is encoded, never sent raw (a raw 31-day TTL would be read as a date in
/// January 1970, i.e. already expired).
public struct MemcachedTTL: Sendable, Hashable, CustomStringConvertible {
    enum Storage: Hashable, Sendable {
        case never
        case expired
        case relative(Int64)
        case absolute(Int64)
    }

    let storage: Storage

    /// The largest relative TTL memcached accepts as relative; above it a value is a Unix time.
    public static let maximumRelativeSeconds: Int64 = 60 * 60 * 24 * 30

    /// Never expires (memcached's 0).
    public static let never = MemcachedTTL(storage: .never)
    /// Expired at once (memcached's negative TTL): the item is invisible from the start.
    public static let expired = MemcachedTTL(storage: .expired)

    /// Expires `seconds` from now. 0 means never expires and a negative value means expired at once,
    /// as memcached's protocol documents them.
    public static func seconds(_ seconds: Int) -> MemcachedTTL {
        if seconds == 0 { return .never }
        if seconds < 0 { return .expired }
        return MemcachedTTL(storage: .relative(Int64(seconds)))
    }

    /// Expires after `duration` (rounded up to whole seconds).
    public static func duration(_ duration: Duration) -> MemcachedTTL {
        let (seconds, attoseconds) = duration.components
        if seconds < 0 || (seconds == 0 && attoseconds < 0) { return .expired }
        if seconds == 0 && attoseconds == 0 { return .never }
        return .seconds(Int(seconds) + (attoseconds > 0 ? 1 : 0))
    }

    /// Expires at the given Unix time (seconds since 1970).
    public static func at(unixTime: Int) -> MemcachedTTL {
        if unixTime <= 0 { return .expired }
        return MemcachedTTL(storage: .absolute(Int64(unixTime)))
    }

    /// The exptime field memcached gets: 0 for never, -1 for expired, a relative number of
    /// seconds up to 30 days, an absolute Unix time beyond (`now` is the current Unix time).
    public func wireValue(now: @autoclosure () -> Int64 = MemcachedTTL.currentUnixTime()) -> Int64 {
        switch storage {
        case .never: return 0
        case .expired: return -1
        case .relative(let seconds):
            return seconds <= Self.maximumRelativeSeconds ? seconds : now() + seconds
        case .absolute(let time):
            // An absolute time within 30 days of the epoch would be read as relative: such a date is
            // in the past anyway, so it means "expired".
            return time <= Self.maximumRelativeSeconds ? -1 : time
        }
    }

    /// The current Unix time in seconds (the system's real-time clock).
    public static func currentUnixTime() -> Int64 {
        var spec = timespec()
        clock_gettime(CLOCK_REALTIME, &spec)
        return Int64(spec.tv_sec)
    }

    public var description: String {
        switch storage {
        case .never: return "never"
        case .expired: return "expired"
        case .relative(let s): return "\(s)s"
        case .absolute(let t): return "at \(t)"
        }
    }
}

#if Tools
import MemcachedSessions

/// The session-counter workload (`../shared/bench/README.md`), framework-agnostic: both the
/// Hummingbird and the Vapor app call these.
public enum CounterWorkload {
    /// The 1,024-byte `profile` attribute every new session carries.
    public static let profile = String(repeating: "p", count: 1024)

    /// `GET /counter`: a new session holds count 1 and the profile; otherwise count + 1.
    public static func counter(_ sessions: RequestSessions) async throws(SessionError) -> Int {
        if let session = try await sessions.load() {
            let count = (session["count", as: Int.self] ?? 0) + 1
            try session.set("count", count)
            return count
        }
        let session = try sessions.create()
        try session.set("count", 1)
        try session.set("profile", profile)
        return 1
    }

    /// `GET /read`: the count, 0 without a session; never modifies.
    public static func read(_ sessions: RequestSessions) async throws(SessionError) -> Int {
        try await sessions.load()?["count", as: Int.self] ?? 0
    }
}
#endif

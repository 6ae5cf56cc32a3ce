import Synchronization

/// `auto` locking: learns which request paths only read the session, so that they run unlocked,
/// and locks a path again as soon as a request on it writes. Keys are paths without the query
/// string (MSM matched "METHOD URI?query", so every distinct query made a new entry), and the
/// table is bounded.
final class ReadOnlyPaths: Sendable {
    private let paths = Mutex<[String: Int]>([:])
    private let limit: Int
    /// Read-only requests needed before a path runs unlocked.
    static let threshold = 1

    init(limit: Int) { self.limit = limit }

    func isReadOnly(_ path: String) -> Bool {
        paths.withLock { ($0[path] ?? 0) >= Self.threshold }
    }

    func record(_ path: String, modified: Bool) {
        paths.withLock { paths in
            if modified {
                paths[path] = nil
                return
            }
            if paths[path] == nil, paths.count >= limit {
                // Full: forget half of the table (the cost of a lock, not of correctness).
                for key in paths.keys.prefix(limit / 2 + 1) { paths[key] = nil }
            }
            paths[path, default: 0] += 1
        }
    }

    var count: Int { paths.withLock { $0.count } }
}

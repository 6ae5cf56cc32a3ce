/// Waits until `condition` holds, checking every 20 ms, or fails after `timeout`: tests wait for a
/// state with a deadline instead of sleeping and hoping.
public func eventually(
    timeout: Duration = .seconds(10), _ what: String, _ condition: () async throws -> Bool
) async throws {
    let deadline = ContinuousClock.now + timeout
    while ContinuousClock.now < deadline {
        if try await condition() { return }
        try await Task.sleep(for: .milliseconds(20))
    }
    throw RigError("timed out after \(timeout) waiting for: \(what)")
}

extension Array where Element == MemcachedServer {
    /// A node list for these servers, with ids n1, n2, ... in order: `n1:127.0.0.1:port,...`.
    public var nodeList: String {
        enumerated().map { "n\($0.offset + 1):\($0.element.hostAndPort)" }.joined(separator: ",")
    }
}

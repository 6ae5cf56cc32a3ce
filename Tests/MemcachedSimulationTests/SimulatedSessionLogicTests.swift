import Foundation
import MemcachedSimulation
import Testing

/// The session logic against the simulated memcached cluster (`SimulatedTest.all`: locking, the
/// CAS merge, failover, expiry, the sticky lifecycle), each under 20 seeds, i.e. 20 interleavings
/// of its concurrent requests, on virtual time. The simulation takes over its process's global
/// executor, so each test runs in a `session-sim --test NAME` process of its own, built next to
/// the tests.
@Suite("The session logic on a simulated cluster")
struct SimulatedSessionLogicTests {
    static let names = SimulatedTest.all.map(\.name)

    @Test(arguments: names)
    func simulated(_ name: String) throws {
        let (code, output) = try sessionSim(["--test", name])
        #expect(code == 0, "\(output)")
        #expect(output.contains("PASS \(name)"), "\(output)")
    }

    /// The runner itself can fail: an unknown test is an error, not a pass.
    @Test func anUnknownTestFails() throws {
        let (code, _) = try sessionSim(["--test", "no-such-test"])
        #expect(code != 0)
    }
}

func sessionSim(_ arguments: [String]) throws -> (code: Int32, output: String) {
    let directory = URL(fileURLWithPath: CommandLine.arguments[0]).deletingLastPathComponent()
    var binary = directory.appendingPathComponent("session-sim")
    if !FileManager.default.isExecutableFile(atPath: binary.path) {
        // Under `swift test` the first argument may be the xctest bundle inside the build folder.
        binary = directory.deletingLastPathComponent().appendingPathComponent("session-sim")
    }
    let process = Process()
    process.executableURL = binary
    process.arguments = arguments
    let output = Pipe()
    process.standardOutput = output
    process.standardError = output
    try process.run()
    let data = output.fileHandleForReading.readDataToEndOfFile()
    process.waitUntilExit()
    return (process.terminationStatus, String(decoding: data, as: UTF8.self))
}

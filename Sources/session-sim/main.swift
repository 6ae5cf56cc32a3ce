import ArgumentParser
import Foundation
import MemcachedSimulation

/// Runs simulated fault schedules against the session manager and checks the guarantees.
///
///     session-sim --seeds 10000            # seeds 1...10000, every mode
///     session-sim --seed 4711 --verbose    # one seed, its whole history
///     session-sim --test all               # the simulated unit tests (SimulatedTest.all)
struct SessionSim: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "session-sim",
        abstract: "Simulated memcached clusters, faults and browsers against real session managers; checks the guarantees.")

    @Option(help: "Run this one seed.")
    var seed: UInt64?

    @Option(help: "Run this many seeds, starting at --first.")
    var seeds: Int = 1000

    @Option(help: "The first seed of a range.")
    var first: UInt64 = 1

    @Option(help: "Pin the mode: non-sticky, sticky-sync or sticky-async.")
    var mode: String?

    @Option(help: "Pin the locking mode (non-sticky): none, all, auto, uriPattern:<regex>.")
    var locking: String?

    @Flag(help: "Print the whole history of each seed run.")
    var verbose = false

    @Option(help: "Stop after this many failing seeds.")
    var maxFailures: Int = 5

    @Option(help: "Run this simulated unit test (or 'all', or 'list' to print their names) under --seeds seeds (default 1000; 20 here unless given).")
    var test: String?

    func run() throws {
        if let test {
            try runTests(test)
            return
        }
        let pinnedMode: SimulationScenario.Mode?
        if let mode {
            guard let parsed = SimulationScenario.Mode(rawValue: mode) else { throw ValidationError("unknown mode \(mode)") }
            pinnedMode = parsed
        } else {
            pinnedMode = nil
        }
        DeterministicScheduler.shared.install()
        let range: [UInt64] = seed.map { [$0] } ?? Array(first..<(first + UInt64(seeds)))
        var failing = 0
        var requests = 0
        var failedRequests = 0
        var virtualSeconds = 0.0
        var jobs = 0
        var byInvariant: [String: Int] = [:]
        let started = Date()
        for seed in range {
            let scenario = SimulationScenario.draw(seed: seed, mode: pinnedMode, locking: locking)
            let outcome = Simulation.run(scenario)
            requests += outcome.requests
            failedRequests += outcome.failedRequests
            virtualSeconds += outcome.virtualSeconds
            jobs += outcome.jobs
            if verbose {
                print(scenario)
                if seed == range.first, range.count == 1 { print(outcome.history.joined(separator: "\n")) }
            }
            if !outcome.violations.isEmpty {
                failing += 1
                print("FAILED \(scenario)")
                for violation in outcome.violations.prefix(3) {
                    byInvariant[violation.invariant, default: 0] += 1
                    print(violation)
                }
                var command = "session-sim --seed \(seed)"
                if let mode { command += " --mode \(mode)" }
                if let locking { command += " --locking '\(locking)'" }
                print("reproduce: swift run -c release \(command) --verbose\n")
                if failing >= maxFailures { break }
            }
        }
        let elapsed = Date().timeIntervalSince(started)
        print(
            String(
                format: "%d seeds, %d failing; %d requests (%d failed on purpose-made faults), %.0f simulated seconds, %d jobs, %.1f s",
                range.count, failing, requests, failedRequests, virtualSeconds, jobs, elapsed))
        for (invariant, count) in byInvariant.sorted(by: { $0.key < $1.key }) { print("  \(invariant): \(count)") }
        if failing > 0 { throw ExitCode(1) }
    }
}

extension SessionSim {
    func runTests(_ name: String) throws {
        if name == "list" {
            for test in SimulatedTest.all { print(test.name) }
            return
        }
        let tests: [SimulatedTest]
        if name == "all" {
            tests = SimulatedTest.all
        } else if let test = SimulatedTest.named(name) {
            tests = [test]
        } else {
            throw ValidationError("no simulated test \(name) (session-sim --test list)")
        }
        let count = CommandLine.arguments.contains("--seeds") ? seeds : 20
        let range: [UInt64] = seed.map { [$0] } ?? Array(first..<(first + UInt64(count)))
        DeterministicScheduler.shared.install()
        var failed = 0
        for test in tests {
            var failures: [(UInt64, [String])] = []
            for seed in range {
                let found = test.run(seed: seed)
                if !found.isEmpty { failures.append((seed, found)) }
            }
            if failures.isEmpty {
                print("PASS \(test.name) (\(range.count) seeds)")
            } else {
                failed += 1
                print("FAIL \(test.name): \(failures.count) of \(range.count) seeds")
                for (seed, messages) in failures.prefix(3) {
                    print("  seed \(seed): " + messages.joined(separator: "; "))
                    print("  reproduce: swift run -c release --traits Tools session-sim --test \(test.name) --seed \(seed)")
                }
            }
        }
        if failed > 0 { throw ExitCode(1) }
    }
}

// Dictionaries and sets must iterate in the same order in every run: Swift's per-process hash
// seed is turned off by this variable, read at start, so the tool starts itself again with it.
if ProcessInfo.processInfo.environment["SWIFT_DETERMINISTIC_HASHING"] == nil {
    setenv("SWIFT_DETERMINISTIC_HASHING", "1", 1)
    let arguments = CommandLine.arguments
    let argv = arguments.map { strdup($0) } + [nil]
    execv("/proc/self/exe", argv)
    fatalError("could not start again with deterministic hashing")
}
SessionSim.main()

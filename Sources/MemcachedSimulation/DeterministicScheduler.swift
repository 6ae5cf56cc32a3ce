import Foundation
import NIOCore
import Synchronization

/// A seeded generator (SplitMix64): the simulation's only source of randomness.
public struct SeededGenerator: RandomNumberGenerator, Sendable {
    private var state: UInt64

    public init(seed: UInt64) { state = seed &+ 0x9E37_79B9_7F4A_7C15 }

    public mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
}

/// Swift concurrency on one thread, in an order and on a time the simulation decides.
///
/// Every job Swift's runtime hands the global executor (task starts, resumptions, actor turns)
/// arrives through the runtime's `swift_task_enqueueGlobal_hook` and waits in a ready list; the
/// run loop picks the next one with the seeded generator (so that a seed explores one
/// interleaving, and replays it exactly). Time is virtual: ``SimulatedClock`` sleeps register
/// timers here, and when nothing is ready the clock jumps to the earliest timer. Nothing runs on
/// another thread, so a run is a pure function of the seed.
///
/// Limits (said, not hidden): `Task.sleep` itself does not go through the hook in this runtime,
/// so code under simulation must sleep on its ``SimulatedClock`` (the session manager does: every
/// timer of it is on its `SessionClock`); NIO event loops and the real memcached client are not
/// simulated (a simulation uses ``SimulatedCluster`` instead).
public final class DeterministicScheduler: @unchecked Sendable {
    // @unchecked Sendable: every field is touched only on the one thread that runs the loop (the
    // hook is called on the thread that enqueues, which is that thread: nothing else runs).

    public static let shared = DeterministicScheduler()

    private var ready: [UnownedJob] = []
    private var timers: [(deadline: UInt64, sequence: UInt64, fire: () -> Void)] = []
    private var sequence: UInt64 = 0
    private var generator = SeededGenerator(seed: 0)
    /// Virtual nanoseconds since the simulation started.
    public private(set) var nanoseconds: UInt64 = 0
    /// Jobs run so far (a measure of a run's size).
    public private(set) var jobsRun = 0
    private var installed = false
    private let thread = pthread_self()

    private final class Executor: SerialExecutor, @unchecked Sendable {
        // @unchecked Sendable: stateless; enqueue hands the job to the scheduler's ready list.
        func enqueue(_ job: consuming ExecutorJob) {
            DeterministicScheduler.shared.ready.append(UnownedJob(job))
        }
    }
    private let executor = Executor()

    private init() {}

    /// Takes over Swift concurrency's global executor for this process. Call once, from the main
    /// thread, before any task exists.
    public func install() {
        precondition(!installed, "install() once")
        installed = true
        typealias Hook = @convention(thin) (UnownedJob, @convention(thin) (UnownedJob) -> Void) -> Void
        guard let symbol = dlsym(dlopen(nil, RTLD_NOW), "swift_task_enqueueGlobal_hook") else {
            fatalError("this Swift runtime has no swift_task_enqueueGlobal_hook")
        }
        symbol.assumingMemoryBound(to: Hook?.self).pointee = { job, _ in
            precondition(pthread_equal(pthread_self(), DeterministicScheduler.shared.thread) != 0, "a job from another thread")
            DeterministicScheduler.shared.ready.append(job)
        }
    }

    /// Starts a run: virtual time 0, the seed's generator, nothing pending.
    public func reset(seed: UInt64) {
        precondition(ready.isEmpty && timers.isEmpty, "a run left work behind")
        generator = SeededGenerator(seed: seed ^ 0x5EED)
        nanoseconds = 0
        jobsRun = 0
        sequence = 0
    }

    /// Calls `fire` (on the loop) once virtual time reaches `deadline`; returns a handle for
    /// ``cancelTimer(_:)``.
    @discardableResult
    public func schedule(at deadline: UInt64, _ fire: @escaping () -> Void) -> UInt64 {
        sequence += 1
        timers.append((max(deadline, nanoseconds), sequence, fire))
        return sequence
    }

    /// Removes a timer that has not fired; returns whether it was pending.
    @discardableResult
    public func cancelTimer(_ handle: UInt64) -> Bool {
        guard let index = timers.firstIndex(where: { $0.sequence == handle }) else { return false }
        timers.remove(at: index)
        return true
    }

    /// Runs jobs and timers until `done` holds (or nothing is left, or the step limit is hit).
    /// Returns false when it stopped for any reason but `done`.
    public func run(until done: () -> Bool, maximumJobs: Int = 50_000_000, horizon: UInt64 = .max) -> Bool {
        while !done() {
            if !ready.isEmpty {
                // A seeded choice among the ready jobs: one interleaving per seed.
                let index = ready.count == 1 ? 0 : Int(generator.next() % UInt64(ready.count))
                let job = ready.remove(at: index)
                jobsRun += 1
                if jobsRun > maximumJobs { return false }
                job.runSynchronously(on: executor.asUnownedSerialExecutor())
                continue
            }
            guard !timers.isEmpty else { return false }
            var earliest = 0
            for index in timers.indices.dropFirst()
            where (timers[index].deadline, timers[index].sequence) < (timers[earliest].deadline, timers[earliest].sequence) {
                earliest = index
            }
            let timer = timers.remove(at: earliest)
            if timer.deadline > horizon { return false }
            nanoseconds = max(nanoseconds, timer.deadline)
            timer.fire()
        }
        return true
    }

    /// Drops whatever is left (after a run that stopped early): its tasks never resume.
    public func abandon() {
        ready.removeAll()
        timers.removeAll()
    }

    /// A uniform random number below `bound`, from the run's generator.
    public func random(below bound: UInt64) -> UInt64 {
        bound <= 1 ? 0 : generator.next() % bound
    }

    public func randomUInt64() -> UInt64 { generator.next() }
}

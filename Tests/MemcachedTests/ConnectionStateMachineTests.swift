import NIOCore
import Testing

@testable import Memcached

@Suite("Connection state machine")
struct ConnectionStateMachineTests {
    typealias Machine = ConnectionStateMachine<Int>
    typealias Outcome = Result<MemcachedResponse, MemcachedError>

    /// A state machine plus the completions it produced, in order.
    struct Harness {
        var machine = Machine()
        var completed: [(Int, Outcome)] = []
        let deadline = NIODeadline.uptimeNanoseconds(1_000_000_000)

        mutating func send(
            _ id: Int, _ expectation: ReplyExpectation, quiet: Bool = false, opaque: UInt32? = nil, deadline: NIODeadline? = nil
        ) {
            let accepted = machine.enqueue(
                id: UInt64(id), opaque: opaque ?? UInt32(id), expectation: expectation, quiet: quiet,
                deadline: deadline ?? self.deadline, context: id)
            precondition(accepted)
        }

        mutating func barrier() {
            _ = machine.enqueue(id: 0, opaque: nil, expectation: .metaNoop, quiet: false, deadline: deadline, context: nil)
        }

        @discardableResult
        mutating func receive(_ reply: MemcachedReply) -> Machine.Action {
            var done: [(Int, Outcome)] = []
            let action = machine.receive(reply) { done.append(($0, $1)) }
            completed += done
            return action
        }

        mutating func receive(_ text: String) throws -> [Machine.Action] {
            var decoder = MemcachedReplyDecoder()
            var buffer = ByteBuffer(string: text)
            var actions: [Machine.Action] = []
            while let reply = try decoder.decode(buffer: &buffer) { actions.append(receive(reply)) }
            return actions
        }

        func outcome(_ id: Int) -> Outcome? { completed.first { $0.0 == id }?.1 }
        func response(_ id: Int) -> MemcachedResponse? { try? outcome(id)?.get() }
        func errorCode(_ id: Int) -> MemcachedError.Code? {
            if case .failure(let error) = outcome(id) { return error.code }
            return nil
        }
    }

    @Test func matchesPipelinedMetaRepliesByOpaque() throws {
        var h = Harness()
        h.send(1, .metaGet)
        h.send(2, .metaGet)
        h.send(3, .metaStore)
        h.send(4, .metaDelete)
        h.send(5, .metaArithmetic)
        h.send(6, .metaTouch)
        let actions = try h.receive("VA 2 f3 c9 O1\r\nhi\r\nEN O2\r\nHD c10 O3\r\nNF O4\r\nVA 2 O5\r\n42\r\nHD O6\r\n")
        #expect(actions.allSatisfy { $0 == .none })
        #expect(h.response(1) == .item(MemcachedItem(value: ByteBuffer(string: "hi"), flags: 3, cas: 9)))
        #expect(h.response(2) == .item(nil))
        #expect(h.response(3) == .stored(.stored(cas: 10)))
        #expect(h.response(4) == .deleted(.notFound))
        #expect(h.response(5) == .counter(42))
        #expect(h.response(6) == .touched(true))
        #expect(h.machine.isEmpty)
    }

    @Test func quietRequestsSucceedWhenALaterReplyPassesThem() throws {
        var h = Harness()
        h.send(1, .metaStore, quiet: true)
        h.send(2, .metaStore, quiet: true)
        h.send(3, .metaGet)
        _ = try h.receive("EN O3\r\n")
        #expect(h.completed.map(\.0) == [1, 2, 3])
        #expect(h.response(1) == .stored(.stored(cas: nil)))
        #expect(h.response(2) == .stored(.stored(cas: nil)))
    }

    @Test func quietRequestsAreSettledByTheBarrier() throws {
        var h = Harness()
        h.send(1, .metaStore, quiet: true)
        h.send(2, .metaDelete, quiet: true)
        #expect(h.machine.needsBarrier)
        h.barrier()
        #expect(!h.machine.needsBarrier)
        _ = try h.receive("NF O2\r\nMN\r\n")
        #expect(h.response(1) == .stored(.stored(cas: nil)))
        #expect(h.response(2) == .deleted(.notFound))
        #expect(h.machine.isEmpty)
    }

    @Test func aFailedQuietWriteIsReported() throws {
        var h = Harness()
        h.send(1, .metaStore, quiet: true)
        h.send(2, .metaStore, quiet: true)
        h.barrier()
        _ = try h.receive("EX O1\r\nMN\r\n")
        #expect(h.response(1) == .stored(.exists))
        #expect(h.response(2) == .stored(.stored(cas: nil)))
    }

    @Test func serverErrorFailsOnlyItsRequest() throws {
        var h = Harness()
        h.send(1, .metaStore)
        h.send(2, .metaGet)
        let actions = try h.receive("SERVER_ERROR out of memory storing object\r\nEN O2\r\n")
        #expect(actions == [.none, .none])
        #expect(h.errorCode(1) == .serverError)
        if case .failure(let error) = h.outcome(1) { #expect(error.message == "out of memory storing object") }
        #expect(h.response(2) == .item(nil))
    }

    @Test(arguments: ["ERROR\r\n", "CLIENT_ERROR bad data chunk\r\n"])
    func clientErrorsFailTheRequestAndCloseTheConnection(reply: String) throws {
        var h = Harness()
        h.send(1, .metaStore)
        h.send(2, .metaGet)
        let actions = try h.receive(reply)
        #expect(actions == [.close])
        #expect(h.errorCode(1) == .clientError)
        #expect(h.errorCode(2) == .connectionClosed)
        #expect(!h.machine.canEnqueue)
    }

    @Test(arguments: [
        ("reply for an unknown token", "HD O99\r\n"),
        ("reply that skips a request", "HD O2\r\n"),
        ("reply of the wrong kind", "VA 1 O1\r\nx\r\n"),
        ("MN before a waiting reply", "MN\r\n"),
        ("a text reply in meta mode", "STORED\r\n"),
    ])
    func desynchronisationClosesTheConnectionWithTypedErrors(name: String, reply: String) throws {
        var h = Harness()
        h.send(1, .metaStore)
        h.send(2, .metaStore)
        let actions = try h.receive(reply)
        #expect(actions.last == .close, "\(name)")
        #expect(h.errorCode(1) == .protocolError, "\(name)")
        #expect(h.errorCode(2) == .connectionClosed, "\(name)")
        // Nothing more is delivered once closed.
        let after = try h.receive("HD O2\r\n")
        #expect(after == [.none])
        #expect(h.completed.count == 2)
    }

    @Test func replyWithNothingWaitingIsAProtocolError() throws {
        var h = Harness()
        #expect(try h.receive("HD O1\r\n") == [.close])
    }

    @Test func textGetChecksTheKey() throws {
        var h = Harness()
        h.send(1, .textGet(key: "a"))
        h.send(2, .textGet(key: "b"))
        _ = try h.receive("VALUE a 1 2 5\r\nhi\r\nEND\r\nEND\r\n")
        #expect(h.response(1) == .item(MemcachedItem(value: ByteBuffer(string: "hi"), flags: 1, cas: 5)))
        #expect(h.response(2) == .item(nil))

        var wrong = Harness()
        wrong.send(1, .textGet(key: "a"))
        #expect(try wrong.receive("VALUE other 0 2\r\nhi\r\n") == [.close])
        #expect(wrong.errorCode(1) == .protocolError)
    }

    @Test func textRepliesMatchInOrder() throws {
        var h = Harness()
        h.send(1, .textStore)
        h.send(2, .textStore)
        h.send(3, .textDelete)
        h.send(4, .textTouch)
        h.send(5, .textArithmetic)
        h.send(6, .textArithmetic)
        h.send(7, .textNoop)
        h.send(8, .version)
        h.send(9, .stats)
        _ = try h.receive(
            "STORED\r\nEXISTS\r\nDELETED\r\nNOT_FOUND\r\n12\r\nNOT_FOUND\r\nVERSION 1.6\r\nVERSION 1.6\r\nSTAT a 1\r\nSTAT b 2\r\nEND\r\n")
        #expect(h.response(1) == .stored(.stored(cas: nil)))
        #expect(h.response(2) == .stored(.exists))
        #expect(h.response(3) == .deleted(.deleted))
        #expect(h.response(4) == .touched(false))
        #expect(h.response(5) == .counter(12))
        #expect(h.response(6) == .counter(nil))
        #expect(h.response(7) == .noop)
        #expect(h.response(8) == .version("1.6"))
        #expect(h.response(9) == .stats([MemcachedStat(name: "a", value: "1"), MemcachedStat(name: "b", value: "2")]))
    }

    /// A `stats` reply that never ends (a broken or hostile server) is cut off at a bound, both in
    /// lines and in bytes: the request fails with a protocol error and the connection closes.
    @Test(arguments: [(lines: Machine.maximumStatLines + 1, valueBytes: 1), (lines: 300, valueBytes: 7_000)])
    func anEndlessStatsReplyIsCutOffAtItsBound(lines: Int, valueBytes: Int) throws {
        var h = Harness()
        h.send(1, .stats)
        h.send(2, .version)
        let value = String(repeating: "v", count: valueBytes)
        var closed = false
        for index in 0..<lines {
            let actions = try h.receive("STAT s\(index) \(value)\r\n")
            if actions.contains(.close) {
                closed = true
                break
            }
            #expect(h.response(1) == nil && h.errorCode(1) == nil)
        }
        #expect(closed)
        #expect(h.errorCode(1) == .protocolError)
        #expect(h.errorCode(2) == .connectionClosed)
    }

    @Test func aLongStatsReplyWithinTheBoundsIsKept() throws {
        var h = Harness()
        h.send(1, .stats)
        var text = ""
        for index in 0..<2_000 { text += "STAT s\(index) \(index)\r\n" }
        _ = try h.receive(text + "END\r\n")
        guard case .stats(let stats)? = h.response(1) else {
            Issue.record("no stats: \(String(describing: h.outcome(1)))")
            return
        }
        #expect(stats.count == 2_000)
        #expect(stats.last == MemcachedStat(name: "s1999", value: "1999"))
    }

    @Test func versionAfterQuietWritesSettlesThem() throws {
        var h = Harness()
        h.send(1, .metaStore, quiet: true)
        h.send(2, .version)
        _ = try h.receive("VERSION 1.6.18\r\n")
        #expect(h.response(1) == .stored(.stored(cas: nil)))
        #expect(h.response(2) == .version("1.6.18"))
    }

    @Test func timedOutRequestsFailAndTheirLateRepliesAreDiscarded() throws {
        var h = Harness()
        let early = NIODeadline.uptimeNanoseconds(100)
        h.send(1, .metaGet, deadline: early)
        h.send(2, .metaGet)
        var expired: [(Int, Outcome)] = []
        let action = h.machine.expire(now: .uptimeNanoseconds(200), stallGrace: .seconds(10)) { expired.append(($0, $1)) }
        #expect(action == .none)
        #expect(expired.count == 1 && expired[0].0 == 1)
        if case .failure(let error) = expired[0].1 { #expect(error.code == .timeout) }
        // The late reply to 1 is read and dropped; 2 still gets its own.
        _ = try h.receive("VA 1 O1\r\nx\r\nEN O2\r\n")
        #expect(h.completed.map(\.0) == [2])
        #expect(h.response(2) == .item(nil))
        #expect(h.machine.isEmpty)
    }

    @Test func aStalledConnectionIsClosed() {
        var h = Harness()
        h.send(1, .metaGet, deadline: .uptimeNanoseconds(100))
        h.send(2, .metaGet, deadline: .uptimeNanoseconds(5_000))
        var outcomes: [(Int, Outcome)] = []
        #expect(h.machine.nextCheck(stallGrace: .nanoseconds(1_000)) == .uptimeNanoseconds(100))
        _ = h.machine.expire(now: .uptimeNanoseconds(150), stallGrace: .nanoseconds(1_000)) { outcomes.append(($0, $1)) }
        #expect(h.machine.nextCheck(stallGrace: .nanoseconds(1_000)) == .uptimeNanoseconds(1_100))
        let action = h.machine.expire(now: .uptimeNanoseconds(1_200), stallGrace: .nanoseconds(1_000)) { outcomes.append(($0, $1)) }
        #expect(action == .close)
        #expect(outcomes.map(\.0) == [1, 2])
    }

    @Test func cancellationFailsTheRequestButKeepsItsSlot() throws {
        var h = Harness()
        h.send(1, .metaGet)
        h.send(2, .metaGet)
        var cancelled: [(Int, Outcome)] = []
        h.machine.cancel(id: 1) { cancelled.append(($0, $1)) }
        h.machine.cancel(id: 42) { cancelled.append(($0, $1)) }
        #expect(cancelled.count == 1)
        if case .failure(let error) = cancelled.first?.1 { #expect(error.code == .cancelled) }
        _ = try h.receive("EN O1\r\nEN O2\r\n")
        #expect(h.completed.map(\.0) == [2])
    }

    @Test func drainingRefusesNewRequestsAndClosesWhenEmpty() throws {
        var h = Harness()
        h.send(1, .metaGet)
        #expect(h.machine.drain() == .none)
        let accepted = h.machine.enqueue(id: 2, opaque: 2, expectation: .metaGet, quiet: false, deadline: h.deadline, context: 2)
        #expect(!accepted)
        #expect(try h.receive("EN O1\r\n") == [.close])
        #expect(h.response(1) == .item(nil))

        var empty = Harness()
        #expect(empty.machine.drain() == .close)
    }

    @Test func channelCloseFailsEverythingQueued() {
        var h = Harness()
        h.send(1, .metaGet)
        h.send(2, .metaStore, quiet: true)
        var outcomes: [(Int, Outcome)] = []
        h.machine.channelClosed(.connectionClosed()) { outcomes.append(($0, $1)) }
        #expect(outcomes.map(\.0) == [1, 2])
        #expect(!h.machine.canEnqueue)
    }
}

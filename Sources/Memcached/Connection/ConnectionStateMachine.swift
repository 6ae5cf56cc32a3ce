import DequeModule
import NIOCore

/// The logic of one pipelined connection, free of I/O: which request a reply belongs to, what it
/// means for that request, deadlines, cancellation and shutdown.
///
/// Every event is a `mutating func`; results are handed to the `complete` closure and what the
/// connection must do next comes back as an ``Action``. The channel handler only performs actions,
/// so every protocol edge case is a unit test without a socket.
///
/// Matching rules (memcached answers in order):
/// - meta replies carry the opaque token we sent; requests ahead of the matched one that are quiet
///   succeeded silently; a non-quiet request skipped over means we lost track: the connection closes.
/// - `MN` completes the first `mn` waiting, after the quiet requests ahead of it.
/// - replies without a token (`VERSION`, `STAT`, `END`, text replies, errors) go to the first
///   request that waits; errors have no token, so an error that arrives while quiet requests lead
///   the queue is charged to the first of them. A misattribution can only turn a quiet success into
///   a reported failure, never give a request another request's data.
/// - `ERROR` and `CLIENT_ERROR` mean the server may have read our bytes differently from how we
///   framed them (after a rejected storage line it runs the *value* as commands): the request fails
///   and the connection closes. `SERVER_ERROR` keeps framing and only fails its request.
struct ConnectionStateMachine<Context> {
    struct PendingRequest {
        var id: UInt64
        var opaque: UInt32?
        var expectation: ReplyExpectation
        var quiet: Bool
        var deadline: NIODeadline
        /// Who waits for the outcome; `nil` once nobody does (timed out, cancelled) and for internal
        /// barriers. The request stays queued until its reply has been read, to keep replies in step.
        var context: Context?
    }

    /// What the head request's multi-line reply (`VALUE ... END`, `STAT ... END`) has collected so
    /// far. Only the head can be part-way through its reply, so this lives here and not in every
    /// ``PendingRequest`` (which is copied as requests come and go); ``popHead()`` clears it.
    private var headItem: MemcachedItem?
    private var headStats: [MemcachedStat]?
    private var headStatsBytes = 0

    /// The most `STAT` lines one reply may have (memcached's `stats` has about 100, `stats
    /// settings` about 80, `stats slabs` about 15 per slab class, `stats items` about 20 per class).
    static var maximumStatLines: Int { 10_000 }
    /// The most bytes of names and values one `stats` reply may have.
    static var maximumStatBytes: Int { 1 << 20 }

    enum State {
        case active
        /// Graceful close: no new requests; close once the queue is empty.
        case draining
        case closed
    }

    enum Action: Equatable {
        case none
        /// Close the channel. Every request still queued has been failed already.
        case close
    }

    typealias Completion = (Context, Result<MemcachedResponse, MemcachedError>) -> Void

    private(set) var pending: Deque<PendingRequest> = []
    private(set) var state: State = .active

    var isEmpty: Bool { pending.isEmpty }
    var canEnqueue: Bool { state == .active }

    /// Whether the newest request is quiet: then nothing would ever answer it and a barrier (`mn`)
    /// must follow before the bytes go out.
    var needsBarrier: Bool { pending.last?.quiet ?? false }

    /// The newest request's deadline.
    var lastDeadline: NIODeadline? { pending.isEmpty ? nil : pending[pending.index(before: pending.endIndex)].deadline }

    // MARK: - events

    /// Queues a request whose bytes are about to be written. Returns false (and queues nothing) when
    /// the connection no longer takes requests.
    mutating func enqueue(
        id: UInt64, opaque: UInt32?, expectation: ReplyExpectation, quiet: Bool, deadline: NIODeadline,
        context: Context?
    ) -> Bool {
        guard state == .active else { return false }
        pending.append(
            PendingRequest(
                id: id, opaque: expectation.carriesOpaque ? opaque : nil, expectation: expectation, quiet: quiet,
                deadline: deadline, context: context))
        return true
    }

    /// The head request's fields a reply is matched by, read in place through the deque's modify
    /// accessor: its getter copies the whole request for every field read, the context retained
    /// and released each time (docs/benchmarks/instructions.md: `receive`, 7,910 to 6,503
    /// instructions a non-sticky `/counter`).
    private mutating func headFields() -> (opaque: UInt32?, expectation: ReplyExpectation, quiet: Bool) {
        Self.matchFields(&pending[pending.startIndex])
    }

    private static func matchFields(_ request: inout PendingRequest) -> (opaque: UInt32?, expectation: ReplyExpectation, quiet: Bool) {
        (request.opaque, request.expectation, request.quiet)
    }

    /// A reply arrived.
    mutating func receive(_ reply: MemcachedReply, complete: Completion) -> Action {
        guard state != .closed else { return .none }

        if reply.status == .metaNoop {
            while !pending.isEmpty {
                let head = headFields()
                if head.expectation == .metaNoop {
                    if let context = popHead().context { complete(context, .success(.noop)) }
                    return afterCompletion()
                }
                guard head.quiet else {
                    return desync("MN arrived before the reply to an earlier request", complete: complete)
                }
                completeSilentSuccess(popHead(), complete: complete)
            }
            return desync("MN arrived with no request waiting", complete: complete)
        }

        if let opaque = reply.opaque {
            while !pending.isEmpty {
                let head = headFields()
                if head.opaque == opaque {
                    guard let response = Self.interpretMeta(reply, for: head.expectation) else {
                        return desync(
                            "reply \(reply.status) does not answer a \(head.expectation) request", complete: complete)
                    }
                    if let context = popHead().context { complete(context, .success(response)) }
                    return afterCompletion()
                }
                guard head.quiet else {
                    return desync("reply for token \(opaque) while an earlier request waits", complete: complete)
                }
                completeSilentSuccess(popHead(), complete: complete)
            }
            return desync("reply for token \(opaque) matches no request", complete: complete)
        }

        if reply.isError {
            guard !pending.isEmpty else {
                return desync("error reply with no request waiting", complete: complete)
            }
            let error = Self.error(from: reply)
            if let context = popHead().context { complete(context, .failure(error)) }
            if reply.status == .serverError {
                return afterCompletion()
            }
            return closeAll(
                MemcachedError.connectionClosed("connection closed after the server's \(reply.status) reply (framing may be lost)"),
                headError: nil, complete: complete)
        }

        // Replies without a token: a quiet request ahead of the waiting one succeeded silently.
        while !pending.isEmpty {
            let head = headFields()
            guard head.quiet, head.expectation.carriesOpaque else { break }
            completeSilentSuccess(popHead(), complete: complete)
        }
        guard !pending.isEmpty else {
            return desync("reply \(reply.status) with no request waiting", complete: complete)
        }
        let expectation = headFields().expectation
        switch (expectation, reply.status) {
        case (.version, .version):
            return finishHead(.version(reply.text ?? ""), complete: complete)
        case (.textNoop, .version):
            return finishHead(.noop, complete: complete)
        case (.stats, .stat):
            // Appended in place (linear in the reply), and bounded: a broken or hostile server
            // cannot grow one reply without end or stall the event loop.
            let stat = MemcachedStat(name: reply.text ?? "", value: reply.statValue ?? "")
            let size = stat.name.utf8.count + stat.value.utf8.count
            if headStats == nil {
                headStats = []
                headStats?.reserveCapacity(128)
            }
            headStats?.append(stat)
            headStatsBytes += size
            guard (headStats?.count ?? 0) <= Self.maximumStatLines, headStatsBytes <= Self.maximumStatBytes else {
                return desync(
                    "stats reply longer than \(Self.maximumStatLines) lines or \(Self.maximumStatBytes) bytes",
                    complete: complete)
            }
            return .none
        case (.stats, .end):
            return finishHead(.stats(headStats ?? []), complete: complete)
        case (.textGet(let key), .textValue):
            // The text protocol has no tokens: checking the key is what stops a desynchronised
            // connection from handing one key's value to another key's request.
            guard reply.key == key, headItem == nil, let value = reply.value else {
                return desync("VALUE line for another key or a second VALUE line", complete: complete)
            }
            headItem = MemcachedItem(value: value, flags: reply.flags ?? 0, cas: reply.cas)
            return .none
        case (.textGet, .end):
            return finishHead(.item(headItem), complete: complete)
        case (.textStore, .stored):
            return finishHead(.stored(.stored(cas: nil)), complete: complete)
        case (.textStore, .notStored):
            return finishHead(.stored(.notStored), complete: complete)
        case (.textStore, .exists):
            return finishHead(.stored(.exists), complete: complete)
        case (.textStore, .notFound):
            return finishHead(.stored(.notFound), complete: complete)
        case (.textDelete, .deleted):
            return finishHead(.deleted(.deleted), complete: complete)
        case (.textDelete, .notFound):
            return finishHead(.deleted(.notFound), complete: complete)
        case (.textTouch, .touched):
            return finishHead(.touched(true), complete: complete)
        case (.textTouch, .notFound):
            return finishHead(.touched(false), complete: complete)
        case (.textArithmetic, .number):
            return finishHead(.counter(reply.number), complete: complete)
        case (.textArithmetic, .notFound):
            return finishHead(.counter(nil), complete: complete)
        default:
            return desync(
                "reply \(reply.status) does not answer a \(expectation) request", complete: complete)
        }
    }

    /// Fails the requests whose deadline has passed. Their replies are still expected and will be
    /// discarded. If the oldest request got no reply for `stallGrace` past its deadline, the server
    /// is stalled: the connection closes.
    mutating func expire(now: NIODeadline, stallGrace: TimeAmount, complete: Completion) -> Action {
        guard state != .closed else { return .none }
        for index in pending.indices where pending[index].deadline <= now {
            if let context = pending[index].context {
                pending[index].context = nil
                complete(context, .failure(.timeout()))
            }
        }
        if let head = pending.first, head.deadline + stallGrace <= now {
            return closeAll(
                .timeout("no reply from the server for \(Self.describe(now - head.deadline + stallGrace)); connection closed"),
                headError: nil, complete: complete)
        }
        return .none
    }

    /// When the handler must next call ``expire(now:stallGrace:complete:)``.
    func nextCheck(stallGrace: TimeAmount) -> NIODeadline? {
        guard let head = pending.first else { return nil }
        var earliest = head.deadline + stallGrace
        for request in pending where request.context != nil && request.deadline < earliest {
            earliest = request.deadline
        }
        return earliest
    }

    /// The caller gave up on a request (task cancelled).
    mutating func cancel(id: UInt64, complete: Completion) {
        guard let index = pending.firstIndex(where: { $0.id == id }), let context = pending[index].context else { return }
        pending[index].context = nil
        complete(context, .failure(MemcachedError.cancelledError))
    }

    /// Graceful shutdown: take no new requests, close once the queue is empty.
    mutating func drain() -> Action {
        guard state == .active else { return .none }
        state = .draining
        return pending.isEmpty ? close() : .none
    }

    /// The channel is gone: everything still queued fails.
    mutating func channelClosed(_ error: MemcachedError, complete: Completion) {
        state = .closed
        failAll(error, complete: complete)
    }

    /// Fails everything and closes, e.g. on a decoding error.
    mutating func fail(_ error: MemcachedError, complete: Completion) -> Action {
        guard state != .closed else { return .none }
        return closeAll(
            .connectionClosed("connection closed after an earlier request's \(error.code)"), headError: error, complete: complete)
    }

    // MARK: - helpers

    private mutating func finishHead(_ response: MemcachedResponse, complete: Completion) -> Action {
        if let context = popHead().context { complete(context, .success(response)) }
        return afterCompletion()
    }

    /// Takes the head request off the queue, with whatever its reply had collected.
    private mutating func popHead() -> PendingRequest {
        headItem = nil
        headStats = nil
        headStatsBytes = 0
        return pending.removeFirst()
    }

    private func completeSilentSuccess(_ request: PendingRequest, complete: Completion) {
        guard let context = request.context else { return }
        if let response = request.expectation.impliedQuietResponse {
            complete(context, .success(response))
        } else {
            complete(context, .failure(.protocolError("no reply to a request that expects one")))
        }
    }

    private mutating func afterCompletion() -> Action {
        if state == .draining && pending.isEmpty { return close() }
        return .none
    }

    private mutating func close() -> Action {
        state = .closed
        return .close
    }

    private mutating func desync(_ message: String, complete: Completion) -> Action {
        closeAll(
            .connectionClosed("connection closed after a protocol error: \(message)"),
            headError: .protocolError(message), complete: complete)
    }

    /// Fails every queued request (the head with `headError` when given) and closes.
    private mutating func closeAll(_ error: MemcachedError, headError: MemcachedError?, complete: Completion) -> Action {
        if let headError, !pending.isEmpty, let context = popHead().context {
            complete(context, .failure(headError))
        }
        failAll(error, complete: complete)
        return close()
    }

    private mutating func failAll(_ error: MemcachedError, complete: Completion) {
        let failed = pending
        pending.removeAll()
        headItem = nil
        headStats = nil
        headStatsBytes = 0
        for request in failed {
            if let context = request.context { complete(context, .failure(error)) }
        }
    }

    static func interpretMeta(_ reply: MemcachedReply, for expectation: ReplyExpectation) -> MemcachedResponse? {
        switch (expectation, reply.status) {
        case (.metaGet, .metaValue):
            guard let value = reply.value else { return nil }
            return .item(MemcachedItem(value: value, flags: reply.flags ?? 0, cas: reply.cas, timeToLive: reply.timeToLive))
        case (.metaGet, .metaMiss): return .item(nil)
        case (.metaGet, .metaHeader):
            // `mg` without `v`: the item's metadata only.
            return .item(MemcachedItem(value: ByteBuffer(), flags: reply.flags ?? 0, cas: reply.cas, timeToLive: reply.timeToLive))
        case (.metaTouch, .metaHeader): return .touched(true)
        case (.metaTouch, .metaMiss): return .touched(false)
        case (.metaStore, .metaHeader): return .stored(.stored(cas: reply.cas))
        case (.metaStore, .metaNotStored): return .stored(.notStored)
        case (.metaStore, .metaExists): return .stored(.exists)
        case (.metaStore, .metaNotFound): return .stored(.notFound)
        case (.metaDelete, .metaHeader): return .deleted(.deleted)
        case (.metaDelete, .metaNotFound): return .deleted(.notFound)
        case (.metaDelete, .metaExists): return .deleted(.exists)
        case (.metaArithmetic, .metaValue):
            guard let value = reply.value,
                let number = value.withUnsafeReadableBytes({ MemcachedReplyDecoder.parseUInt64($0) })
            else { return nil }
            return .counter(number)
        case (.metaArithmetic, .metaNotFound), (.metaArithmetic, .metaNotStored): return .counter(nil)
        default: return nil
        }
    }

    static func error(from reply: MemcachedReply) -> MemcachedError {
        switch reply.status {
        case .serverError: return MemcachedError(code: .serverError, message: reply.text ?? "")
        case .clientError: return MemcachedError(code: .clientError, message: reply.text ?? "")
        default: return MemcachedError(code: .clientError, message: "ERROR (the server did not recognise the command)")
        }
    }

    private static func describe(_ amount: TimeAmount) -> String {
        "\(amount.nanoseconds / 1_000_000) ms"
    }
}

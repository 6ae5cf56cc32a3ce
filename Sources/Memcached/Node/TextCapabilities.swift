import Atomics
import NIOCore

/// What a node spoken to in the text protocol understands. memcached itself knows every text
/// command; a memcached-protocol proxy may lack some, and answers them by closing the connection
/// (twemproxy does so for `gat`/`gats` and `stats`), which would fail every request in flight on
/// it. So neither is sent until a probe, on a connection of its own, has seen the node answer it:
///
/// - without `gats`, a read that slides the TTL is a `gets` then a `touch`, pipelined on one
///   connection (one round trip, not atomic: harmless for a TTL);
/// - without `stats`, a stats request fails at once with
///   ``MemcachedError/Code/unsupportedInProtocolMode`` (nothing is sent).
///
/// Meta mode needs none of this: memcached 1.6 answers every meta command.
final class TextCapabilities: Sendable {
    enum Answer: UInt8, AtomicValue {
        case unknown, yes, no
    }

    let getAndTouch = ManagedAtomic<Answer>(.unknown)
    let stats = ManagedAtomic<Answer>(.unknown)

    var isKnown: Bool {
        getAndTouch.load(ordering: .relaxed) != .unknown && stats.load(ordering: .relaxed) != .unknown
    }

    /// The answer a probe's outcome gives: an answer (even an empty one) is a yes; a closed
    /// connection, `ERROR` or a client error is a no; a timeout or a refused connection says
    /// nothing (probed again later).
    static func answer(_ result: Result<MemcachedResponse, MemcachedError>) -> Answer {
        switch result {
        case .success: return .yes
        case .failure(let error):
            switch error.code {
            case .connectionClosed, .protocolError, .clientError, .serverError: return .no
            default: return .unknown
            }
        }
    }
}

/// The requests of a batch as they go to a node without `gats`: each read that slides the TTL
/// becomes a read and a touch of the same key, and the read's result stands for both.
struct TextFallbackBatch {
    let requests: [MemcachedRequest]
    /// For each original request, the index of its (first) request in ``requests``.
    private let positions: [Int]

    init(_ original: [MemcachedRequest]) {
        var requests: [MemcachedRequest] = []
        var positions: [Int] = []
        requests.reserveCapacity(original.count + 1)
        for request in original {
            positions.append(requests.count)
            if case .get(let key, true, let touch?) = request.command {
                var read = request
                read.command = .get(key: key, value: true, touch: nil)
                var slide = request
                slide.command = .touch(key: key, ttl: touch)
                requests.append(read)
                requests.append(slide)
            } else {
                requests.append(request)
            }
        }
        self.requests = requests
        self.positions = positions
    }

    /// Whether any request was split.
    var isSplit: Bool { requests.count != positions.count }

    static func needsSplit(_ requests: [MemcachedRequest]) -> Bool {
        requests.contains { if case .get(_, true, .some) = $0.command { true } else { false } }
    }

    /// The results of the original requests.
    func results(_ results: [Result<MemcachedResponse, MemcachedError>]) -> [Result<MemcachedResponse, MemcachedError>] {
        positions.map { results[$0] }
    }
}

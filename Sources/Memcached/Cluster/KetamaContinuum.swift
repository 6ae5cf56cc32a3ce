/// Consistent hashing compatible with libmemcached's weighted ketama (`MEMCACHED_BEHAVIOR_KETAMA_WEIGHTED`
/// with equal weights, the set-up spymemcached's `KETAMA_HASH` and most ketama clients share):
/// 160 points per node, four per MD5 digest of `host:port-i` (`host-i` on the default port 11211),
/// keys hashed with the first four digest bytes, little-endian, and placed on the first point at or
/// after their hash. Adding a fourth node to three moves about a quarter of the keys.
struct KetamaContinuum: Sendable {
    struct Point: Sendable {
        var hash: UInt32
        var node: Int
    }

    static let pointsPerNode = 160
    static let pointsPerHash = 4

    let points: [Point]
    let nodeCount: Int

    /// `nodes` are `(host, port)` in configuration order; the ring refers to them by index.
    init(nodes: [(host: String, port: Int)]) {
        var points: [Point] = []
        points.reserveCapacity(nodes.count * Self.pointsPerNode)
        for (index, node) in nodes.enumerated() {
            for pointIndex in 0..<(Self.pointsPerNode / Self.pointsPerHash) {
                let label = node.port == 11211 ? "\(node.host)-\(pointIndex)" : "\(node.host):\(node.port)-\(pointIndex)"
                let digest = MD5.digest(Array(label.utf8))
                for alignment in 0..<Self.pointsPerHash {
                    let base = alignment * 4
                    let hash =
                        UInt32(digest[base + 3]) << 24 | UInt32(digest[base + 2]) << 16 | UInt32(digest[base + 1]) << 8
                        | UInt32(digest[base])
                    points.append(Point(hash: hash, node: index))
                }
            }
        }
        // Stable order for equal hashes so every client builds the same ring.
        points.sort { $0.hash != $1.hash ? $0.hash < $1.hash : $0.node < $1.node }
        self.points = points
        self.nodeCount = nodes.count
    }

    static func hash(key: some Collection<UInt8>) -> UInt32 {
        let digest = MD5.digest(key)
        return UInt32(digest[3]) << 24 | UInt32(digest[2]) << 16 | UInt32(digest[1]) << 8 | UInt32(digest[0])
    }

    /// The index of the point a hash lands on: the first point whose hash is not below it, wrapping.
    func pointIndex(for hash: UInt32) -> Int {
        var low = 0
        var high = points.count
        while low < high {
            let middle = (low + high) / 2
            if points[middle].hash < hash { low = middle + 1 } else { high = middle }
        }
        return low == points.count ? 0 : low
    }

    /// The node for a key.
    func node(forKey key: some Collection<UInt8>) -> Int {
        guard !points.isEmpty else { return 0 }
        return points[pointIndex(for: Self.hash(key: key))].node
    }

    /// The node for a key when some nodes are unavailable: walks the ring from the key's point to the
    /// first node that `isAvailable` accepts. Bounded: each point is visited at most once.
    func node(forKey key: some Collection<UInt8>, isAvailable: (Int) -> Bool) -> Int? {
        guard !points.isEmpty else { return nil }
        var index = pointIndex(for: Self.hash(key: key))
        for _ in 0..<points.count {
            let node = points[index].node
            if isAvailable(node) { return node }
            index = index + 1 == points.count ? 0 : index + 1
        }
        return nil
    }
}

// Talking to memcached directly: the client is a `Service`; requests work while it runs.
import Memcached

let client = try MemcachedClient(configuration: .init(nodes: "n1:127.0.0.1:11211 n2:127.0.0.1:11212"))
try await withThrowingDiscardingTaskGroup { group in
    group.addTask { try await client.run() }  // or put the client in a ServiceGroup
    try await client.set("greeting", value: "hello", ttl: .seconds(60))
    let item = try await client.get("greeting")  // value, flags and CAS unique
    print(item.map { String(buffer: $0.value) } ?? "missing")
    group.cancelAll()
}

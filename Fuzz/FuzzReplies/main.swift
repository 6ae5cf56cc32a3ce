// libFuzzer target: a server's reply stream through the reply decoder and the connection state
// machine. Built by scripts/fuzz (MSM_FUZZ=1, -sanitize=fuzzer,address, -parse-as-library).
@_spi(Fuzzing) import Memcached

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzReplies(_ start: UnsafeRawPointer, _ count: Int) -> CInt {
    MemcachedFuzzing.replies(UnsafeRawBufferPointer(start: start, count: count))
    return 0
}

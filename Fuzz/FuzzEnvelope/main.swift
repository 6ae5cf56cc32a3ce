// libFuzzer target: a stored session envelope through the session codec, and its round trip.
@_spi(Fuzzing) import MemcachedSessions

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzEnvelope(_ start: UnsafeRawPointer, _ count: Int) -> CInt {
    SessionsFuzzing.sessionEnvelope(UnsafeRawBufferPointer(start: start, count: count))
    return 0
}

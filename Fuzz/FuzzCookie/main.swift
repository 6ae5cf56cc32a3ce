// libFuzzer target: a request's Cookie header, the session id in it, and the id's round trip.
@_spi(Fuzzing) import MemcachedSessions

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzCookie(_ start: UnsafeRawPointer, _ count: Int) -> CInt {
    SessionsFuzzing.cookieHeader(UnsafeRawBufferPointer(start: start, count: count))
    return 0
}

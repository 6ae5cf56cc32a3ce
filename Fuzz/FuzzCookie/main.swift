// libFuzzer target (scripts/fuzz builds it: MSM_FUZZ=1, -sanitize=fuzzer,address,
// -parse-as-library). SwiftPM links an executable's entry point as `<Target>_main`; it hands
// control to libFuzzer's driver with the input callback.
@_spi(Fuzzing) import MemcachedSessions

@_silgen_name("LLVMFuzzerRunDriver")
func runFuzzerDriver(
    _ argc: UnsafeMutablePointer<CInt>, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?>,
    _ callback: @convention(c) (UnsafePointer<UInt8>?, Int) -> CInt
) -> CInt

@_cdecl("FuzzCookie_main")
public func fuzzMain(_ argc: CInt, _ argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>?) -> CInt {
    var argc = argc
    var argv = argv
    return runFuzzerDriver(&argc, &argv) { data, count in
        guard let data else { return 0 }
        SessionsFuzzing.cookieHeader(UnsafeRawBufferPointer(start: data, count: count))
        return 0
    }
}

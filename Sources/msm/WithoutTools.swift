#if !Tools
#if canImport(Glibc)
import Glibc
#endif

/// msm needs both frameworks: without the package trait "Tools" it only says so.
@main
enum Entry {
    static func main() {
        print("msm was built without the package trait \"Tools\": swift build --traits Tools --product msm")
        exit(64)
    }
}
#endif

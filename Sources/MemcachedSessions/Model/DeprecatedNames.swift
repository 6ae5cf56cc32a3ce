// The names of the previous release, kept for one release so that existing code compiles (with a
// warning naming the new one). They clashed with Vapor's `Session` and `SessionID` in any file
// that used both: the Vapor adapter does not re-export these two (it re-exports the rest of this
// module by name), so a Vapor file sees only Vapor's.

@available(*, deprecated, renamed: "MemcachedSession")
public typealias Session = MemcachedSession

@available(*, deprecated, renamed: "MemcachedSessionID")
public typealias SessionID = MemcachedSessionID

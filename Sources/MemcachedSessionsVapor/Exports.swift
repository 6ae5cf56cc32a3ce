#if Vapor
// The session core, re-exported by name rather than whole: its deprecated `Session` and
// `SessionID` (the previous release's names of `MemcachedSession` and `MemcachedSessionID`) would
// clash with Vapor's own in every file that imports both, so they stay out. A Vapor file that
// imports this module sees Vapor's `Session` and `SessionID`, and ours under their new names.
@_exported import struct MemcachedSessions.BinarySessionCodec
@_exported import class MemcachedSessions.EventLog
@_exported import class Memcached.EventLoopExecutor
@_exported import enum MemcachedSessions.JSONValueCoding
@_exported import class MemcachedSessions.MemcachedSession
@_exported import struct MemcachedSessions.MemcachedSessionID
@_exported import struct MemcachedSessions.RequestSessions
@_exported import class MemcachedSessions.SessionAccess
@_exported import protocol MemcachedSessions.SessionClock
@_exported import protocol MemcachedSessions.SessionCodec
@_exported import struct MemcachedSessions.SessionCodecError
@_exported import struct MemcachedSessions.SessionCookie
@_exported import struct MemcachedSessions.SessionError
@_exported import struct MemcachedSessions.SessionKeys
@_exported import class MemcachedSessions.SessionManager
@_exported import struct MemcachedSessions.SessionMetadata
@_exported import struct MemcachedSessions.SessionRecord
@_exported import struct MemcachedSessions.SessionResponseAction
@_exported import class MemcachedSessions.SessionStatistics
@_exported import class MemcachedSessions.StatusHistory
@_exported import struct MemcachedSessions.StoredSessionInspection
@_exported import struct MemcachedSessions.StoredSessionInvalidation
@_exported import struct MemcachedSessions.SystemSessionClock
#endif

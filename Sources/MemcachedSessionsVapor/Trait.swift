#if !Vapor
#warning("MemcachedSessionsVapor is built without its trait and is empty: depend on this package with traits: [\"Vapor\"]")
#endif

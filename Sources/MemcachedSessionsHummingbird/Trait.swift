#if !Hummingbird
#warning("MemcachedSessionsHummingbird is built without its trait and is empty: depend on this package with traits: [\"Hummingbird\"]")
#endif

#if !Operations
#warning("MemcachedSessionsOperations is built without its trait and is empty: depend on this package with traits: [\"Operations\"] (the Hummingbird and Vapor traits include it)")
#endif

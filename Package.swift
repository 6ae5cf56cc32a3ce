// swift-tools-version:6.1
import PackageDescription

let package = Package(
    name: "swift-memcached-sessions",
    platforms: [.macOS(.v15)],
    products: [
        .library(name: "Memcached", targets: ["Memcached"]),
        .library(name: "MemcachedTestRig", targets: ["MemcachedTestRig"]),
        .library(name: "MemcachedSessions", targets: ["MemcachedSessions"]),
        .library(name: "MemcachedSessionsOperations", targets: ["MemcachedSessionsOperations"]),
        .library(name: "MemcachedSessionsHummingbird", targets: ["MemcachedSessionsHummingbird"]),
        .library(name: "MemcachedSessionsVapor", targets: ["MemcachedSessionsVapor"]),
        .executable(name: "msm", targets: ["msm"]),
    ],
    // Each framework's adapter, and the msm tool, behind a trait, none on by default: a package
    // that depends on this one fetches a web framework only when it enables its adapter's trait
    // (SwiftPM prunes a dependency whose every use is behind a trait that is off), e.g.
    //     .package(url: "https://github.com/.../swift-memcached-sessions", from: "1.0.0", traits: ["Hummingbird"])
    // This repository's own scripts build with `--traits Tools` (scripts/traits), which turns on all.
    traits: [
        .trait(
            name: "Operations",
            description: "The management endpoints, status page and metrics page: MemcachedSessionsOperations (swift-http-types)."),
        .trait(
            name: "Hummingbird", description: "The Hummingbird 2 adapter: MemcachedSessionsHummingbird.",
            enabledTraits: ["Operations"]),
        .trait(
            name: "HummingbirdAuth",
            description: "hummingbird-auth's session authentication on memcached sessions (MemcachedSessionAuthenticator).",
            enabledTraits: ["Hummingbird"]),
        .trait(name: "Vapor", description: "The Vapor 4 adapter: MemcachedSessionsVapor.", enabledTraits: ["Operations"]),
        .trait(
            name: "OpenTelemetry",
            description: "msm serve --otel exports its tracing spans over OTLP/HTTP with swift-otel (the tool only)."),
        .trait(
            name: "Tools", description: "The msm command: demo cluster, app server, inspection and management.",
            enabledTraits: ["Hummingbird", "HummingbirdAuth", "Vapor", "OpenTelemetry"]),
        .default(enabledTraits: []),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-nio", from: "2.101.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-collections", from: "1.6.0"),
        .package(url: "https://github.com/apple/swift-atomics", from: "1.3.0"),
        .package(url: "https://github.com/swift-server/swift-service-lifecycle", from: "2.13.0"),
        .package(url: "https://github.com/apple/swift-crypto", "3.12.3"..<"5.0.0"),
        .package(url: "https://github.com/apple/swift-nio-ssl", from: "2.37.6"),
        .package(url: "https://github.com/hummingbird-project/hummingbird", from: "2.28.1", traits: []),
        .package(url: "https://github.com/hummingbird-project/hummingbird-auth", from: "2.5.0"),
        .package(url: "https://github.com/vapor/vapor", from: "4.122.3"),
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-http-types", from: "1.8.0"),
        .package(url: "https://github.com/swift-server/async-http-client", from: "1.37.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
        .package(url: "https://github.com/apple/swift-configuration", from: "1.4.0"),
        .package(url: "https://github.com/apple/swift-system", from: "1.5.0"),
        .package(url: "https://github.com/apple/swift-distributed-tracing", from: "1.7.3"),
        // The tool's span export (trait OpenTelemetry): OTLP/HTTP only, no gRPC stack built.
        .package(url: "https://github.com/swift-otel/swift-otel", from: "1.6.0", traits: ["OTLPHTTP"]),
    ],
    targets: [
        .target(
            name: "Memcached",
            dependencies: [
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "DequeModule", package: "swift-collections"),
                .product(name: "Atomics", package: "swift-atomics"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Tracing", package: "swift-distributed-tracing"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
                .product(name: "NIOTLS", package: "swift-nio"),
            ],
            // Async functions run on their caller's executor (SE-0461) instead of hopping to the
            // generic one at every call: a request passes through client, node and connection
            // without a `swift_task_switch` at each layer.
            swiftSettings: [.enableUpcomingFeature("NonisolatedNonsendingByDefault")]
        ),
        .target(
            name: "MemcachedTestRig",
            dependencies: [
                "Memcached",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
            ]
        ),
        .target(
            name: "MemcachedSessions",
            dependencies: [
                "Memcached",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOConcurrencyHelpers", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "DequeModule", package: "swift-collections"),
                .product(name: "Atomics", package: "swift-atomics"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "Tracing", package: "swift-distributed-tracing"),
            ],
            // As the Memcached target: a request's awaits through the session layer stay on the
            // request's executor (no `swift_task_switch` into the generic executor at each call).
            swiftSettings: [.enableUpcomingFeature("NonisolatedNonsendingByDefault")]
        ),
        .target(
            name: "MemcachedSimulation",
            dependencies: [
                "Memcached",
                "MemcachedSessions",
                .product(name: "NIOCore", package: "swift-nio"),
            ]
        ),
        .executableTarget(
            name: "session-sim",
            dependencies: [
                "MemcachedSimulation",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        // Operations out of the core: the management endpoints and the status page, the metrics
        // page; framework-agnostic (swift-http-types), mounted by each adapter as a route group.
        .target(
            name: "MemcachedSessionsOperations",
            dependencies: [
                "MemcachedSessions",
                .product(name: "HTTPTypes", package: "swift-http-types", condition: .when(traits: ["Operations"])),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Metrics", package: "swift-metrics"),
            ]
        ),
        .target(
            name: "MemcachedSessionsHummingbird",
            dependencies: [
                "MemcachedSessions",
                "MemcachedSessionsOperations",
                "Memcached",
                .product(name: "Crypto", package: "swift-crypto"),
                .product(name: "Hummingbird", package: "hummingbird", condition: .when(traits: ["Hummingbird"])),
                .product(name: "HummingbirdCore", package: "hummingbird", condition: .when(traits: ["Hummingbird"])),
                .product(name: "HummingbirdAuth", package: "hummingbird-auth", condition: .when(traits: ["HummingbirdAuth"])),
                .product(name: "HTTPTypes", package: "swift-http-types", condition: .when(traits: ["Hummingbird"])),
            ]
        ),
        .target(
            name: "MemcachedSessionsVapor",
            dependencies: [
                "MemcachedSessions",
                "MemcachedSessionsOperations",
                .product(name: "HTTPTypes", package: "swift-http-types", condition: .when(traits: ["Vapor"])),
                "Memcached",
                .product(name: "Vapor", package: "vapor", condition: .when(traits: ["Vapor"])),
            ]
        ),
        .target(
            name: "MSMApp",
            dependencies: [
                "Memcached",
                "MemcachedSessions",
                "MemcachedSessionsOperations",
                "MemcachedSessionsHummingbird",
                "MemcachedSessionsVapor",
                "MemcachedTestRig",
                .product(name: "Hummingbird", package: "hummingbird", condition: .when(traits: ["Tools"])),
                .product(name: "HTTPTypes", package: "swift-http-types", condition: .when(traits: ["Tools"])),
                .product(name: "Vapor", package: "vapor", condition: .when(traits: ["Tools"])),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus", condition: .when(traits: ["Tools"])),
                .product(name: "Tracing", package: "swift-distributed-tracing"),
                .product(name: "OTel", package: "swift-otel", condition: .when(traits: ["OpenTelemetry"])),
            ]
        ),
        .executableTarget(
            name: "msm",
            dependencies: [
                .target(name: "MSMApp", condition: .when(traits: ["Tools"])),
                "Memcached",
                "MemcachedSessions",
                .product(name: "ArgumentParser", package: "swift-argument-parser", condition: .when(traits: ["Tools"])),
                // Settings from flags, the environment and a JSON file (kept to the tool).
                .product(name: "Configuration", package: "swift-configuration", condition: .when(traits: ["Tools"])),
                .product(name: "SystemPackage", package: "swift-system", condition: .when(traits: ["Tools"])),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOFoundationCompat", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "AsyncHTTPClient", package: "async-http-client", condition: .when(traits: ["Tools"])),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
            ]
        ),
        .executableTarget(
            name: "sessions-bench",
            dependencies: [
                "Memcached",
                "MemcachedSessions",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "Crypto", package: "swift-crypto"),
            ]
        ),
        .executableTarget(
            name: "memcached-bench",
            dependencies: [
                "Memcached",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
            ]
        ),
        .testTarget(
            name: "MemcachedTests",
            dependencies: [
                "Memcached",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOEmbedded", package: "swift-nio"),
                .product(name: "NIOTestUtils", package: "swift-nio"),
            ],
            resources: [.copy("Fixtures")]
        ),
        .testTarget(
            name: "MemcachedIntegrationTests",
            dependencies: [
                "Memcached",
                "MemcachedTestRig",
                .product(name: "Atomics", package: "swift-atomics"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "MetricsTestKit", package: "swift-metrics"),
                .product(name: "NIOSSL", package: "swift-nio-ssl"),
            ]
        ),
        .testTarget(
            name: "MemcachedSessionsTests",
            dependencies: [
                "MemcachedSessions",
                "Memcached",
                .product(name: "NIOCore", package: "swift-nio"),
            ]
        ),
        .testTarget(
            name: "MemcachedSessionsOperationsTests",
            dependencies: [
                "MemcachedSessionsOperations",
                "MemcachedSessions",
                "MemcachedTestRig",
                .product(name: "HTTPTypes", package: "swift-http-types"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "MetricsTestKit", package: "swift-metrics"),
            ]
        ),
        .testTarget(
            name: "MemcachedSessionsIntegrationTests",
            dependencies: [
                "MemcachedSessions",
                "MemcachedSessionsOperations",
                .product(name: "HTTPTypes", package: "swift-http-types"),
                .product(name: "Tracing", package: "swift-distributed-tracing"),
                .product(name: "InMemoryTracing", package: "swift-distributed-tracing"),
                "Memcached",
                "MemcachedTestRig",
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOPosix", package: "swift-nio"),
                .product(name: "ServiceLifecycle", package: "swift-service-lifecycle"),
                .product(name: "Metrics", package: "swift-metrics"),
                .product(name: "MetricsTestKit", package: "swift-metrics"),
            ]
        ),
        .testTarget(
            name: "MemcachedSessionsHummingbirdTests",
            dependencies: [
                "MemcachedSessionsHummingbird",
                "Memcached",
                "MemcachedTestRig",
                .product(name: "Hummingbird", package: "hummingbird"),
                .product(name: "HummingbirdTesting", package: "hummingbird"),
                .product(name: "HummingbirdAuth", package: "hummingbird-auth"),
                .product(name: "HTTPTypes", package: "swift-http-types"),
                .product(name: "NIOCore", package: "swift-nio"),
            ]
        ),
        .testTarget(
            name: "MemcachedSessionsVaporTests",
            dependencies: [
                "MemcachedSessionsVapor",
                "Memcached",
                "MemcachedTestRig",
                .product(name: "Vapor", package: "vapor"),
                .product(name: "AsyncHTTPClient", package: "async-http-client"),
                .product(name: "NIOCore", package: "swift-nio"),
                .product(name: "NIOHTTP1", package: "swift-nio"),
            ]
        ),
        // The session logic on the simulated cluster: each test runs in a session-sim process.
        .testTarget(
            name: "MemcachedSimulationTests",
            dependencies: [
                "MemcachedSimulation",
                "session-sim",
            ]
        ),
        .testTarget(
            name: "MSMToolTests",
            dependencies: [
                "Memcached",
                "MemcachedSessions",
                "MemcachedTestRig",
                "msm",
                // The OTLP collector of the span export's test.
                .product(name: "Hummingbird", package: "hummingbird", condition: .when(traits: ["Tools"])),
            ]
        ),
    ],
    swiftLanguageModes: [.v6]
)

// Fuzzing (issue 8 §5): libFuzzer targets, only when scripts/fuzz asks for them (MSM_FUZZ=1):
// they build with -sanitize=fuzzer and take libFuzzer's main.
if Context.environment["MSM_FUZZ"] != nil {
    package.targets += [
        .executableTarget(name: "FuzzReplies", dependencies: ["Memcached"], path: "Fuzz/FuzzReplies"),
        .executableTarget(name: "FuzzCookie", dependencies: ["MemcachedSessions"], path: "Fuzz/FuzzCookie"),
        .executableTarget(name: "FuzzEnvelope", dependencies: ["MemcachedSessions"], path: "Fuzz/FuzzEnvelope"),
    ]
}

#if Tools
import ArgumentParser
import Configuration
import Foundation
import Synchronization
import SystemPackage

/// Where `msm serve` and `msm demo` take each setting from, first found wins: the flag, the
/// environment (`MSM_` and the flag's name in upper snake case: `--save-delay-ms` is
/// `MSM_SAVE_DELAY_MS`), the JSON file of `--config` (the flags' names as keys:
/// `{"nodes": "n1:10.0.0.1:11211", "save-delay-ms": 100}`), the default. Read through
/// swift-configuration (kept to the tool: no library of this package depends on it).
///
/// Secrets (the management token) are never taken from a flag's value, which any user of the
/// machine can read in `ps`: only from the environment, the configuration file, or a file of its
/// own (`--management-token-file`).
struct Settings {
    private let reader: ConfigReader
    private let failures = Failures()

    /// - Parameters:
    ///   - flags: the options given on the command line, by flag name (without `--`).
    ///   - configFile: the `--config` file, if any (its absence is an error: it was asked for).
    init(flags: [String: ConfigValue], configFile: String?, environment: [String: String] = ProcessInfo.processInfo.environment)
        async throws
    {
        var providers: [any ConfigProvider] = [
            InMemoryProvider(name: "flags", values: Dictionary(uniqueKeysWithValues: flags.map { (AbsoluteConfigKey([$0.key]), $0.value) })),
            KeyMappingProvider(
                upstream: EnvironmentVariablesProvider(
                    environmentVariables: environment, secretsSpecifier: .specific(Settings.secretEnvironmentNames))
            ) { key in key.prepending(["msm"]) },
        ]
        if let configFile {
            do {
                providers.append(try await FileProvider<JSONSnapshot>(filePath: FilePath(configFile)))
            } catch {
                throw ValidationError("--config \(configFile): \(error)")
            }
        }
        reader = ConfigReader(providers: providers, accessReporter: failures)
    }

    /// The settings whose value was there but not of the type asked for: swift-configuration's
    /// getters answer nil then, which must not silently mean "use the default".
    private final class Failures: AccessReporter {
        private let failed = Mutex<Set<String>>([])

        func report(_ event: AccessEvent) {
            let providerFailed = event.providerResults.contains { if case .failure = $0.result { true } else { false } }
            guard providerFailed || event.conversionError != nil else { return }
            failed.withLock { _ = $0.insert(event.metadata.key.components.joined(separator: ".")) }
        }

        /// Whether reading `flag` failed (and forgets it).
        func take(_ flag: String) -> Bool {
            failed.withLock { $0.remove(flag) != nil }
        }
    }

    private func checked<Value>(_ flag: String, _ value: Value?, expected: String) throws -> Value? {
        if failures.take(flag) {
            throw ValidationError("\(flag): expected \(expected) (from \(Self.environmentName(flag)), or the config file)")
        }
        return value
    }

    /// The environment variables that hold secrets (redacted wherever swift-configuration shows
    /// a value).
    static let secretEnvironmentNames: Set<String> = ["MSM_MANAGEMENT_TOKEN", "MSM_AUTH_PASSWORD"]

    /// The environment variable of a setting: `save-delay-ms` is `MSM_SAVE_DELAY_MS`.
    static func environmentName(_ flag: String) -> String {
        "MSM_" + flag.uppercased().replacingOccurrences(of: "-", with: "_")
    }

    func string(_ flag: String) throws -> String? {
        try checked(flag, reader.string(forKey: ConfigKey([flag])), expected: "a string")
    }

    func secret(_ flag: String) throws -> String? {
        try checked(flag, reader.string(forKey: ConfigKey([flag]), isSecret: true), expected: "a string")
    }

    func int(_ flag: String) throws -> Int? {
        try checked(flag, reader.int(forKey: ConfigKey([flag])), expected: "a whole number")
    }

    func bool(_ flag: String) throws -> Bool? {
        try checked(flag, reader.bool(forKey: ConfigKey([flag])), expected: "true or false")
    }

    /// A value parsed by its ArgumentParser type (the same spellings as the flag's).
    func value<Value: ExpressibleByArgument>(_ flag: String, as type: Value.Type = Value.self) throws -> Value? {
        guard let text = try string(flag) else { return nil }
        guard let value = Value(argument: text) else {
            throw ValidationError("\(flag): '\(text)' is not a valid value (\(Self.environmentName(flag)), or the config file)")
        }
        return value
    }
}

extension Dictionary where Key == String, Value == ConfigValue {
    /// Records a flag's value when it was given.
    mutating func flag(_ name: String, _ value: String?) {
        if let value { self[name] = ConfigValue(.string(value), isSecret: false) }
    }

    mutating func flag(_ name: String, _ value: Int?) {
        if let value { self[name] = ConfigValue(.int(value), isSecret: false) }
    }

    mutating func flag(_ name: String, _ value: Bool?) {
        if let value { self[name] = ConfigValue(.bool(value), isSecret: false) }
    }

    mutating func flag<Argument: RawRepresentable>(_ name: String, _ value: Argument?) where Argument.RawValue == String {
        if let value { self[name] = ConfigValue(.string(value.rawValue), isSecret: false) }
    }
}

/// A secret's file (`--management-token-file`): its content without the final newline.
func readSecretFile(_ path: String, flag: String) throws -> String {
    guard let data = FileManager.default.contents(atPath: path), let text = String(data: data, encoding: .utf8) else {
        throw ValidationError("--\(flag) \(path): cannot be read")
    }
    let secret = text.trimmingCharacters(in: .newlines)
    guard !secret.isEmpty else { throw ValidationError("--\(flag) \(path): the file is empty") }
    return secret
}
#endif

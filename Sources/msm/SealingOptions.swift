#if Tools
import ArgumentParser
import Configuration
import Foundation
import MemcachedSessions

/// `--session-keys-file` (sealed sessions: base64 keys, one per line, the first current),
/// `--key-secret-file` (storage keys an HMAC under this secret), and the rolling upgrade's
/// `--accept-unsealed-until` and `--write-unsealed`, and adding a secret to a running cluster's
/// `--keyed-keys-from` and `--accept-unkeyed-until`. Keys and secrets come from files, never from a
/// flag's value (which shows in `ps`).
struct SealingOptions: ParsableArguments {
    @Option(help: "Seal sessions (AES-256-GCM): a file of base64 keys (msm keygen), one per line, the first current, the others only open.")
    var sessionKeysFile: String?

    @Option(help: "Storage keys are an HMAC of the session token under the base64 secret in this file (msm keygen).")
    var keySecretFile: String?

    @Option(help: "Rolling upgrade to sealed sessions: read unsealed copies too until this time (ISO 8601, e.g. 2026-12-31T00:00:00Z).")
    var acceptUnsealedUntil: String?

    @Flag(inversion: .prefixedNo, help: "Rolling upgrade, first step: open sealed sessions but write unsealed ones.")
    var writeUnsealed: Bool?

    @Option(help: "Adding --key-secret-file to a running cluster: storage keys stay unkeyed until this time (ISO 8601), the same on every instance.")
    var keyedKeysFrom: String?

    @Option(help: "After --keyed-keys-from, until this time (ISO 8601), a session not found under its keyed key is looked for under its unkeyed one and moved.")
    var acceptUnkeyedUntil: String?

    /// The flags as named settings, for `Settings` (flag > environment > file).
    func record(into flags: inout [String: ConfigValue]) {
        flags.flag("session-keys-file", sessionKeysFile)
        flags.flag("key-secret-file", keySecretFile)
        flags.flag("accept-unsealed-until", acceptUnsealedUntil)
        flags.flag("write-unsealed", writeUnsealed)
        flags.flag("keyed-keys-from", keyedKeysFrom)
        flags.flag("accept-unkeyed-until", acceptUnkeyedUntil)
    }

    /// The sealing settings from the resolved settings (`msm serve`).
    static func sealing(_ settings: Settings) throws -> SessionManager.Configuration.Sealing {
        try sealing(
            keysFile: try settings.string("session-keys-file"), secretFile: try settings.string("key-secret-file"),
            acceptUnsealedUntil: try settings.string("accept-unsealed-until"), writeUnsealed: try settings.bool("write-unsealed") ?? false,
            keyedKeysFrom: try settings.string("keyed-keys-from"), acceptUnkeyedUntil: try settings.string("accept-unkeyed-until"))
    }

    /// The sealing settings straight from the flags (the inspection commands).
    func sealing() throws -> SessionManager.Configuration.Sealing {
        try Self.sealing(
            keysFile: sessionKeysFile, secretFile: keySecretFile, acceptUnsealedUntil: acceptUnsealedUntil,
            writeUnsealed: writeUnsealed ?? false, keyedKeysFrom: keyedKeysFrom, acceptUnkeyedUntil: acceptUnkeyedUntil)
    }

    static func sealing(
        keysFile: String?, secretFile: String?, acceptUnsealedUntil: String?, writeUnsealed: Bool, keyedKeysFrom: String? = nil,
        acceptUnkeyedUntil: String? = nil
    ) throws -> SessionManager.Configuration.Sealing {
        var sealing = SessionManager.Configuration.Sealing()
        do {
            if let keysFile {
                sealing.keys = try SessionKeyRing(keyFile: try readSecretFile(keysFile, flag: "session-keys-file"))
            }
            if let secretFile {
                sealing.storageKeySecret = try StorageKeySecret(secretFile: try readSecretFile(secretFile, flag: "key-secret-file"))
            }
        } catch let error as SessionError {
            // The message names the problem, never a key.
            throw ValidationError(error.message)
        }
        if let acceptUnsealedUntil {
            guard let date = try? Date(acceptUnsealedUntil, strategy: .iso8601) else {
                throw ValidationError("accept-unsealed-until '\(acceptUnsealedUntil)' is not an ISO 8601 time such as 2026-12-31T00:00:00Z")
            }
            sealing.acceptUnsealedUntil = date
        }
        sealing.writesUnsealed = writeUnsealed
        sealing.keyedStorageKeysFrom = try keyedKeysFrom.map { try time($0, flag: "keyed-keys-from") }
        sealing.acceptUnkeyedUntil = try acceptUnkeyedUntil.map { try time($0, flag: "accept-unkeyed-until") }
        if sealing.storageKeySecret == nil, sealing.keyedStorageKeysFrom != nil || sealing.acceptUnkeyedUntil != nil {
            throw ValidationError("keyed-keys-from and accept-unkeyed-until need --key-secret-file")
        }
        if sealing.acceptUnkeyedUntil != nil, sealing.keyedStorageKeysFrom == nil {
            throw ValidationError("accept-unkeyed-until needs keyed-keys-from (the switch every instance makes at once)")
        }
        if let from = sealing.keyedStorageKeysFrom, let until = sealing.acceptUnkeyedUntil, until <= from {
            throw ValidationError("accept-unkeyed-until must be after keyed-keys-from")
        }
        if sealing.keys == nil, sealing.acceptUnsealedUntil != nil || writeUnsealed {
            throw ValidationError("accept-unsealed-until and write-unsealed need --session-keys-file")
        }
        return sealing
    }

    private static func time(_ text: String, flag: String) throws -> Date {
        guard let date = try? Date(text, strategy: .iso8601) else {
            throw ValidationError("\(flag) '\(text)' is not an ISO 8601 time such as 2026-12-31T00:00:00Z")
        }
        return date
    }
}

struct Keygen: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Prints a new random 256-bit key in base64: a line for --session-keys-file, or a --key-secret-file.",
        discussion: """
            Rotation: add the new key as the second line of every instance's key file first (it then \
            opens what the new key seals), then move it to the first line everywhere. Sessions sealed \
            with the old key are sealed again at their next read or write; retire the old key when \
            no instance counts opens under its key id any more (sealedOpensByKey in GET /_msm/status, \
            the metric msm_sealed_opens_total{key_id}), or after the absolute timeout.
            """)

    func run() throws {
        let key = SessionSealingKey.generate()
        print(key.base64)
        note("msm keygen: key id \(key.idText); keep the key secret (a file readable by the app's user only)")
    }
}
#endif

#if Tools
import ArgumentParser
import Configuration
import Foundation
import Memcached
import NIOSSL

/// `--tls`, `--tls-ca-file`, `--tls-cert-file`, `--tls-key-file`, `--tls-server-name`: TLS to every
/// memcached node; `--auth-user` and `--auth-password-file` (or `MSM_AUTH_PASSWORD`): memcached's
/// authentication. For each command that talks to memcached.
struct SecurityOptions: ParsableArguments {
    @Flag(help: "TLS to every memcached node, trusting the system's certificate store.")
    var tls = false

    @Option(help: "TLS, trusting the CA certificates of this PEM file (implies --tls).")
    var tlsCaFile: String?

    @Option(help: "A client certificate (PEM) for mutual TLS, with --tls-key-file.")
    var tlsCertFile: String?

    @Option(help: "The client certificate's private key (PEM file).")
    var tlsKeyFile: String?

    @Option(help: "The name the nodes' certificates must carry (default: each node's host).")
    var tlsServerName: String?

    @Option(help: "memcached authentication (-Y): the user, with --auth-password-file or MSM_AUTH_PASSWORD.")
    var authUser: String?

    @Option(help: "A file holding the authentication password (never a flag's value: it would show in ps).")
    var authPasswordFile: String?

    /// The flags as named settings, for `Settings` (flag > environment > file).
    func record(into flags: inout [String: ConfigValue]) {
        flags.flag("tls", tls ? true : nil)
        flags.flag("tls-ca-file", tlsCaFile)
        flags.flag("tls-cert-file", tlsCertFile)
        flags.flag("tls-key-file", tlsKeyFile)
        flags.flag("tls-server-name", tlsServerName)
        flags.flag("auth-user", authUser)
    }

    /// The credentials from the resolved settings: the user from its flag, the environment or the
    /// file; the password from `--auth-password-file`, `MSM_AUTH_PASSWORD` or the file's
    /// `auth-password`, never from a flag.
    func authentication(_ settings: Settings) throws -> MemcachedClient.Configuration.Authentication? {
        let password = try authPasswordFile.map { try readSecretFile($0, flag: "auth-password-file") } ?? settings.secret("auth-password")
        return try Self.authentication(user: try settings.string("auth-user"), password: password)
    }

    /// The credentials straight from the flags and the environment (the inspection commands).
    func authentication() throws -> MemcachedClient.Configuration.Authentication? {
        let password = try authPasswordFile.map { try readSecretFile($0, flag: "auth-password-file") }
            ?? ProcessInfo.processInfo.environment["MSM_AUTH_PASSWORD"]
        return try Self.authentication(user: authUser, password: password)
    }

    static func authentication(user: String?, password: String?) throws -> MemcachedClient.Configuration.Authentication? {
        switch (user, password) {
        case (nil, nil): return nil
        case (let user?, let password?):
            let authentication = MemcachedClient.Configuration.Authentication(username: user, password: password)
            var probe = MemcachedClient.Configuration(nodes: [MemcachedNodeAddress(id: "n1", host: "127.0.0.1", port: 1)])
            probe.authentication = authentication
            do { try probe.validate() } catch { throw ValidationError(error.message) }
            return authentication
        case (nil, _): throw ValidationError("a password without --auth-user")
        case (_, nil): throw ValidationError("--auth-user needs --auth-password-file or MSM_AUTH_PASSWORD")
        }
    }

    /// The client's TLS from the resolved settings: off unless `tls` or a CA file is set.
    static func configuration(_ settings: Settings) throws -> MemcachedClient.Configuration.TLS {
        try configuration(
            enabled: try settings.bool("tls") ?? false, caFile: try settings.string("tls-ca-file"),
            certificateFile: try settings.string("tls-cert-file"), keyFile: try settings.string("tls-key-file"),
            serverName: try settings.string("tls-server-name"))
    }

    /// The client's TLS straight from the flags (the inspection commands, which read no environment).
    func configuration() throws -> MemcachedClient.Configuration.TLS {
        try Self.configuration(enabled: tls, caFile: tlsCaFile, certificateFile: tlsCertFile, keyFile: tlsKeyFile, serverName: tlsServerName)
    }

    static func configuration(
        enabled: Bool, caFile: String?, certificateFile: String?, keyFile: String?, serverName: String?
    ) throws -> MemcachedClient.Configuration.TLS {
        guard enabled || caFile != nil || certificateFile != nil else {
            if keyFile != nil || serverName != nil { throw ValidationError("--tls-key-file and --tls-server-name need --tls") }
            return .disable
        }
        var configuration = TLSConfiguration.makeClientConfiguration()
        configuration.minimumTLSVersion = .tlsv12
        do {
            if let caFile { configuration.trustRoots = .file(caFile) }
            switch (certificateFile, keyFile) {
            case (nil, nil): break
            case (let certificateFile?, let keyFile?):
                configuration.certificateChain = try NIOSSLCertificate.fromPEMFile(certificateFile).map { .certificate($0) }
                configuration.privateKey = .privateKey(try NIOSSLPrivateKey(file: keyFile, format: .pem))
            default:
                throw ValidationError("--tls-cert-file and --tls-key-file go together")
            }
            return try .enable(configuration, serverName: serverName)
        } catch let error as ValidationError {
            throw error
        } catch {
            // NIOSSL names the file and the reason; never a key's content.
            throw ValidationError("TLS: \(error)")
        }
    }
}
#endif

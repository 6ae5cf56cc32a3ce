import Foundation

/// Certificates for TLS tests, made by the `openssl` command in a temporary directory: a CA, a
/// server certificate it signed for `localhost` and `127.0.0.1`, one that expired in 2020, one for
/// another name, one from another CA, and a client certificate for mutual TLS. ``remove()`` deletes
/// them. Keys are readable by everyone (memcached drops to `nobody` when the tests run as root):
/// test keys, never real ones.
public struct TestCertificates: Sendable {
    public struct Pair: Sendable {
        public let certificate: String
        public let key: String
    }

    public let directory: String
    /// The CA that signed ``server``, ``expired``, ``wrongName`` and ``client``.
    public let caFile: String
    /// Another CA, which signed ``foreign``.
    public let otherCAFile: String
    /// For `localhost` and `127.0.0.1`, valid for two days.
    public let server: Pair
    /// For `localhost` and `127.0.0.1`, valid on 1 January 2020 only.
    public let expired: Pair
    /// For `other.example` only.
    public let wrongName: Pair
    /// For the name `localhost` only (no IP address entry): reached at 127.0.0.1, it is checked
    /// against the configured server name alone.
    public let localhostOnly: Pair
    /// For `localhost` and `127.0.0.1`, signed by the other CA.
    public let foreign: Pair
    /// A client certificate signed by the CA (mutual TLS).
    public let client: Pair

    /// Makes them all (a fraction of a second; needs `openssl`).
    public static func make() throws -> TestCertificates {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("msm-tls-\(UUID().uuidString)").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        func path(_ name: String) -> String { directory + "/" + name }
        try """
        [ ca ]
        default_ca = rig
        [ rig ]
        database = index.txt
        new_certs_dir = .
        serial = serial
        default_md = sha256
        policy = any
        copy_extensions = copy
        [ any ]
        commonName = supplied

        """.write(toFile: path("template.cnf"), atomically: true, encoding: .utf8)
        func openssl(_ arguments: [String]) throws {
            let process = Process()
            process.executableURL = URL(fileURLWithPath: "/usr/bin/env")
            process.arguments = ["openssl"] + arguments
            process.currentDirectoryURL = URL(fileURLWithPath: directory)
            let errors = Pipe()
            process.standardOutput = FileHandle.nullDevice
            process.standardError = errors
            try process.run()
            let message = errors.fileHandleForReading.readDataToEndOfFile()
            process.waitUntilExit()
            guard process.terminationStatus == 0 else {
                throw RigError("openssl \(arguments.first ?? "") failed: \(String(decoding: message, as: UTF8.self))")
            }
        }
        let curve = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        func authority(_ name: String) throws {
            try "".write(toFile: path("\(name).index.txt"), atomically: true, encoding: .utf8)
            try "01\n".write(toFile: path("\(name).serial"), atomically: true, encoding: .utf8)
            try openssl(["req", "-x509"] + curve + ["-keyout", "\(name).key", "-out", "\(name).pem", "-days", "2", "-subj", "/CN=msm test \(name)"])
        }
        func leaf(_ name: String, by ca: String, names: String, dates: [String] = ["-days", "2"]) throws -> Pair {
            try openssl(["req"] + curve + ["-keyout", "\(name).key", "-out", "\(name).csr", "-subj", "/CN=\(name)", "-addext", "subjectAltName=\(names)"])
            let config = try String(contentsOfFile: path("template.cnf"), encoding: .utf8)
                .replacingOccurrences(of: "index.txt", with: "\(ca).index.txt")
                .replacingOccurrences(of: "serial = serial", with: "serial = \(ca).serial")
            try config.write(toFile: path("\(ca).cnf"), atomically: true, encoding: .utf8)
            try openssl(["ca", "-batch", "-config", "\(ca).cnf", "-cert", "\(ca).pem", "-keyfile", "\(ca).key", "-in", "\(name).csr", "-out", "\(name).pem"] + dates)
            return Pair(certificate: path("\(name).pem"), key: path("\(name).key"))
        }
        try authority("ca")
        try authority("other-ca")
        let local = "DNS:localhost,IP:127.0.0.1"
        let certificates = TestCertificates(
            directory: directory, caFile: path("ca.pem"), otherCAFile: path("other-ca.pem"),
            server: try leaf("server", by: "ca", names: local),
            expired: try leaf("expired", by: "ca", names: local, dates: ["-startdate", "20200101000000Z", "-enddate", "20200102000000Z"]),
            wrongName: try leaf("wrong-name", by: "ca", names: "DNS:other.example"),
            localhostOnly: try leaf("localhost-only", by: "ca", names: "DNS:localhost"),
            foreign: try leaf("foreign", by: "other-ca", names: local),
            client: try leaf("client", by: "ca", names: "DNS:msm-client"))
        // memcached reads them as nobody.
        for file in try FileManager.default.contentsOfDirectory(atPath: directory) {
            try FileManager.default.setAttributes([.posixPermissions: 0o644], ofItemAtPath: path(file))
        }
        try FileManager.default.setAttributes([.posixPermissions: 0o755], ofItemAtPath: directory)
        return certificates
    }

    /// memcached's arguments to serve TLS with `pair`; with `clientCA`, a client certificate signed
    /// by it is required (mutual TLS).
    public static func memcachedArguments(_ pair: Pair, requiringClientsOf clientCA: String? = nil) -> [String] {
        var options = "ssl_chain_cert=\(pair.certificate),ssl_key=\(pair.key)"
        if let clientCA { options += ",ssl_ca_cert=\(clientCA),ssl_verify_mode=2" }
        return ["-Z", "-o", options]
    }

    public func remove() {
        try? FileManager.default.removeItem(atPath: directory)
    }
}

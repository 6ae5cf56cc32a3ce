import Crypto
import Foundation
import NIOCore
import Testing

@testable import MemcachedSessions

@Suite("Sealed sessions: the sealer, the key ring, keyed storage keys")
struct SessionSealingTests {
    let token = MemcachedSessionID.generate(nodeID: "n1", route: nil).token
    let other = MemcachedSessionID.generate(nodeID: "n1", route: nil).token

    func envelope(_ attributes: [String: String] = ["user": "alice"]) throws -> ByteBuffer {
        var buffer = ByteBuffer()
        try BinarySessionCodec().encodeSession(
            SessionRecord(
                metadata: SessionMetadata(createdAt: 1, lastAccessedAt: 2, idleTimeoutSeconds: 60, absoluteTimeoutSeconds: 0, version: 3),
                attributes: attributes.mapValues { ByteBuffer(string: "\"\($0)\"") }),
            into: &buffer)
        return buffer
    }

    /// The first format (version 1: an HKDF message key) still opens, and says it must be sealed
    /// again; what is sealed now is version 2.
    @Test func aVersionOneEnvelopeOpensAndIsSealedAgain() throws {
        let ring = try SessionKeyRing(current: .generate())
        let sealer = SessionSealer(ring: ring)
        let keys = SessionKeys(token: token, prefix: "app:")
        let plain = try envelope()
        let salt = [UInt8](repeating: 9, count: 16)
        let messageKey = HKDF<SHA256>.deriveKey(
            inputKeyMaterial: ring.current.key, salt: salt, info: Array("msm session seal v1".utf8), outputByteCount: 32)
        let box = try AES.GCM.seal(
            Array(plain.readableBytesView), using: messageKey, nonce: AES.GCM.Nonce(),
            authenticating: SessionSealer.associatedData(forKey: keys.primary))
        var versionOne = ByteBuffer()
        versionOne.writeBytes([0x4D, 0x58, 1, 0])
        versionOne.writeInteger(ring.current.id)
        versionOne.writeBytes(salt)
        versionOne.writeBytes(try #require(box.combined))
        let opened = try sealer.open(versionOne, forKey: keys.primary)
        #expect(opened.plaintext == plain && opened.olderKey, "opened, to be sealed again")
        #expect(SessionSealer.version(of: versionOne) == 1)
        let current = try sealer.seal(plain, forKey: keys.primary, allocator: ByteBufferAllocator())
        #expect(SessionSealer.version(of: current) == 2)
        #expect(try sealer.open(current, forKey: keys.primary).olderKey == false)
        // Version 1's derivation does not open version 2's envelopes, nor the reverse.
        var relabelled = current
        relabelled.setInteger(UInt8(1), at: relabelled.readerIndex + 2)
        #expect(throws: SessionSealer.OpenFailure.self) { try sealer.open(relabelled, forKey: keys.primary) }
    }

    @Test func sealsAndOpensUnderBothCopiesKeys() throws {
        let ring = try SessionKeyRing(current: .generate())
        let sealer = SessionSealer(ring: ring)
        let keys = SessionKeys(token: token, prefix: "app:")
        let plain = try envelope()
        let sealed = try sealer.seal(plain, forKey: keys.primary, allocator: ByteBufferAllocator())
        #expect(SessionSealer.isSealed(sealed))
        #expect(sealed.readableBytes == plain.readableBytes + SessionSealer.overhead)
        // Encrypted: the attribute's value is not in the stored bytes.
        #expect(!String(decoding: sealed.readableBytesView, as: UTF8.self).contains("alice"))
        #expect(try sealer.open(sealed, forKey: keys.primary).plaintext == plain)
        // The backup is a byte copy under the b: key: it opens there too.
        #expect(try sealer.open(sealed, forKey: keys.backup).plaintext == plain)
        #expect(try sealer.open(sealed, forKey: keys.primary).olderKey == false)
        // Two seals of the same envelope differ (random salt and nonce).
        #expect(try sealer.seal(plain, forKey: keys.primary, allocator: ByteBufferAllocator()) != sealed)
        #expect(sealer.opensByKey() == [ring.current.idText: 3])
    }

    @Test func aBlobCopiedUnderAnotherSessionOrPrefixDoesNotOpen() throws {
        let sealer = SessionSealer(ring: try SessionKeyRing(current: .generate()))
        let mine = SessionKeys(token: token, prefix: "app:")
        let sealed = try sealer.seal(try envelope(), forKey: mine.primary, allocator: ByteBufferAllocator())
        for key in [
            SessionKeys(token: other, prefix: "app:").primary, SessionKeys(token: token, prefix: "other:").primary,
            SessionKeys(token: token, prefix: "app:", secret: try StorageKeySecret(SymmetricKey(size: .bits256))).primary,
        ] {
            #expect(throws: SessionSealer.OpenFailure.self) { try sealer.open(sealed, forKey: key) }
        }
    }

    @Test func aTamperedOrTruncatedBlobDoesNotOpen() throws {
        let sealer = SessionSealer(ring: try SessionKeyRing(current: .generate()))
        let key = SessionKeys(token: token, prefix: "app:").primary
        let sealed = try sealer.seal(try envelope(), forKey: key, allocator: ByteBufferAllocator())
        let bytes = Array(sealed.readableBytesView)
        // Every single flipped bit past the header, and every truncation, fails to open.
        for index in SessionSealer.headerLength..<bytes.count {
            var flipped = bytes
            flipped[index] ^= 0x01
            #expect(throws: SessionSealer.OpenFailure.self) { try sealer.open(ByteBuffer(bytes: flipped), forKey: key) }
        }
        for length in 0..<bytes.count {
            #expect(throws: SessionSealer.OpenFailure.self) { try sealer.open(ByteBuffer(bytes: bytes.prefix(length)), forKey: key) }
        }
    }

    @Test func anotherApplicationsKeyDoesNotOpen() throws {
        let key = SessionKeys(token: token, prefix: "app:").primary
        let theirs = SessionSealer(ring: try SessionKeyRing(current: .generate()))
        let ours = SessionSealer(ring: try SessionKeyRing(current: .generate()))
        let sealed = try theirs.seal(try envelope(), forKey: key, allocator: ByteBufferAllocator())
        #expect {
            try ours.open(sealed, forKey: key)
        } throws: { error in
            guard case .unknownKey(let id) = error as? SessionSealer.OpenFailure else { return false }
            return id == theirs.ring.current.id
        }
    }

    @Test func rotationOpensWithTheOlderKeyAndSaysSo() throws {
        let old = SessionSealingKey.generate()
        let new = SessionSealingKey.generate()
        let key = SessionKeys(token: token, prefix: "app:").primary
        let before = SessionSealer(ring: try SessionKeyRing(current: old))
        // Step 1: every instance gets the new key as an older key: it opens what the new key seals.
        let step1 = SessionSealer(ring: try SessionKeyRing(current: old, previous: [new]))
        let after = SessionSealer(ring: try SessionKeyRing(current: new, previous: [old]))
        let sealedOld = try before.seal(try envelope(), forKey: key, allocator: ByteBufferAllocator())
        let sealedNew = try after.seal(try envelope(), forKey: key, allocator: ByteBufferAllocator())
        #expect(try step1.open(sealedNew, forKey: key).olderKey == true)
        #expect(try after.open(sealedOld, forKey: key).olderKey == true)
        #expect(try after.open(sealedNew, forKey: key).olderKey == false)
        #expect(SessionSealer.keyID(of: sealedNew) == new.id)
        #expect(after.opensByKey() == [new.idText: 1, old.idText: 1])
    }

    @Test func keyFilesAndSecrets() throws {
        let a = SessionSealingKey.generate()
        let b = SessionSealingKey.generate()
        let ring = try SessionKeyRing(keyFile: "# current first\n\(a.base64)\n\n  \(b.base64)  \n")
        #expect(ring.current.id == a.id)
        #expect(ring.previous.map(\.id) == [b.id])
        #expect(try SessionSealingKey(base64: a.base64).id == a.id)
        #expect(throws: SessionError.self) { try SessionKeyRing(keyFile: "# nothing\n") }
        #expect(throws: SessionError.self) { try SessionKeyRing(keyFile: "\(a.base64)\n\(a.base64)\n") }
        #expect(throws: SessionError.self) { try SessionSealingKey(base64: "not base64!") }
        // 16 bytes: not an AES-256 key.
        #expect(throws: SessionError.self) { try SessionSealingKey(base64: Data(count: 16).base64EncodedString()) }
        #expect(throws: SessionError.self) { try StorageKeySecret(secretFile: Data(count: 8).base64EncodedString()) }
        // No key material in descriptions.
        #expect(!"\(ring)".contains(a.base64) && !"\(a)".contains(a.base64))
        let secret = try StorageKeySecret(secretFile: a.base64 + "\n")
        #expect("\(secret)" == "StorageKeySecret(redacted)")
    }

    @Test func keyedStorageKeysDependOnTheSecret() throws {
        let plain = SessionKeys(token: token, prefix: "app:")
        let secret = try StorageKeySecret(SymmetricKey(size: .bits256))
        let keyed = SessionKeys(token: token, prefix: "app:", secret: secret)
        let otherSecret = SessionKeys(token: token, prefix: "app:", secret: try StorageKeySecret(SymmetricKey(size: .bits256)))
        #expect(keyed.primary != plain.primary)
        #expect(keyed.primary != otherSecret.primary)
        #expect(keyed == SessionKeys(token: token, prefix: "app:", secret: secret))
        #expect(keyed.primary.hasPrefix("app:s:") && keyed.backup.hasPrefix("app:b:") && keyed.lock.hasPrefix("app:l:"))
        #expect(keyed.primary.utf8.count == plain.primary.utf8.count)
        // The HMAC, not a bare hash: the digest is not SHA-256 of the token.
        let sha = SHA256.hash(data: token.bytes).prefix(16).map { String(format: "%02x", $0) }.joined()
        #expect(plain.primary.hasSuffix(sha))
        #expect(!keyed.primary.hasSuffix(sha))
        // Keyed digests derive from unkeyed ones (the principal index's entries from before a
        // storage-key switch still name their sessions); anything else is refused.
        #expect(SessionKeys.keyedDigest(ofUnkeyed: plain.digest, secret: secret) == keyed.digest)
        #expect(SessionKeys.keyedDigest(ofUnkeyed: "not a digest", secret: secret) == nil)
        #expect(SessionKeys.keyedDigest(ofUnkeyed: plain.digest.uppercased(), secret: secret) == nil)
        #expect(keyed.isKeyed && !plain.isKeyed)
    }

    /// The storage-key transition's settings need the secret, and its window ends after the switch.
    @Test func aStorageKeyTransitionNeedsTheSecretAndAnOrderedWindow() throws {
        var configuration = try SessionManager.Configuration(nodes: "n1:127.0.0.1:11211")
        configuration.sealing.keyedStorageKeysFrom = Date()
        #expect(throws: SessionError.self) { try configuration.validate() }
        configuration.sealing.storageKeySecret = try StorageKeySecret(SymmetricKey(size: .bits256))
        try configuration.validate()
        configuration.sealing.acceptUnkeyedUntil = configuration.sealing.keyedStorageKeysFrom
        #expect(throws: SessionError.self) { try configuration.validate() }
        var windowAlone = configuration
        windowAlone.sealing.keyedStorageKeysFrom = nil
        windowAlone.sealing.acceptUnkeyedUntil = Date().addingTimeInterval(60)
        #expect(throws: SessionError.self) { try windowAlone.validate() }
        configuration.sealing.acceptUnkeyedUntil = Date().addingTimeInterval(60)
        try configuration.validate()
    }
}

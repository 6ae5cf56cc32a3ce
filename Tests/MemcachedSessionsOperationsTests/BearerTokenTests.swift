#if Operations
import Testing

@testable import MemcachedSessionsOperations

@Suite struct BearerTokenTests {
    let token = BearerToken("s3cret-token")

    @Test func acceptsTheTokenUnderTheBearerSchemeInAnyCase() {
        #expect(token.isPresented(in: "Bearer s3cret-token"))
        #expect(token.isPresented(in: "bearer s3cret-token"))
        #expect(token.isPresented(in: "BEARER s3cret-token"))
    }

    @Test func refusesEverythingElse() {
        #expect(!token.isPresented(in: nil))
        #expect(!token.isPresented(in: ""))
        #expect(!token.isPresented(in: "Bearer "))
        #expect(!token.isPresented(in: "Bearer"))
        #expect(!token.isPresented(in: "s3cret-token"))
        #expect(!token.isPresented(in: "Basic s3cret-token"))
        #expect(!token.isPresented(in: "Bearer\u{0}s3cret-token"))
        #expect(!token.isPresented(in: "Bearer  s3cret-token"), "no whitespace trimming: the token is exact")
        #expect(!token.isPresented(in: "Bearer S3CRET-TOKEN"), "the token is case-sensitive")
        #expect(!token.isPresented(in: "Bearer s3cret-toke"))
        #expect(!token.isPresented(in: "Bearer s3cret-token "))
        #expect(!token.isPresented(in: "Bearer s3cret-tokenx"))
    }

    @Test func neverShowsTheToken() {
        #expect(!"\(token)".contains("s3cret"))
        #expect(!String(reflecting: token).contains("s3cret"))
    }
}
#endif

//! HS256 JSON Web Tokens: minting (for `presence-svc token` and service-to-service calls)
//! and verification. Written out rather than pulled in: it is ~150 lines, and owning it lets
//! every failure map to a precise, token-free message.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use super::{AuthError, Scope};

/// Longest lifetime a token may have (`exp - iat`, or `exp - now` without `iat`).
pub const MAX_LIFETIME_SECS: i64 = 24 * 3600;
/// Clock skew tolerated on `exp`, `nbf` and `iat`.
pub const CLOCK_SKEW_SECS: i64 = 30;

/// The claims Switchboard reads (docs/CONTRACT.md §4).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claims {
    /// Account id; `*` only with the platform key.
    pub sub: String,
    /// The client identity the token speaks for, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<String>,
    /// Granted scopes.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Expiry, seconds since the epoch.
    pub exp: i64,
    /// Not before, seconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<i64>,
    /// Issued at, seconds since the epoch.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<i64>,
    /// Token id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
}

impl Claims {
    /// The first second (unix) at which the token is refused as expired: `exp` plus the
    /// tolerated clock skew.
    pub fn refused_from(&self) -> i64 {
        self.exp.saturating_add(CLOCK_SKEW_SECS)
    }
}

#[derive(Debug, Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    typ: Option<String>,
}

/// What to put in a new token.
#[derive(Debug, Clone)]
pub struct TokenRequest<'a> {
    /// Key id for the `kid` header.
    pub key_id: &'a str,
    /// The key's secret.
    pub secret: &'a [u8],
    /// Account (`sub`).
    pub account: &'a str,
    /// Optional identity claim.
    pub identity: Option<&'a str>,
    /// Scopes to grant.
    pub scopes: &'a [Scope],
    /// Lifetime in seconds, 1 to [`MAX_LIFETIME_SECS`].
    pub ttl_secs: i64,
}

/// Signs a token. Fails only on a lifetime outside 1 s – 24 h.
pub fn mint(request: &TokenRequest<'_>, now: i64) -> Result<String, AuthError> {
    if !(1..=MAX_LIFETIME_SECS).contains(&request.ttl_secs) {
        return Err(AuthError::Lifetime);
    }
    let header = Header {
        alg: "HS256".into(),
        kid: Some(request.key_id.to_owned()),
        typ: Some("JWT".into()),
    };
    let claims = Claims {
        sub: request.account.to_owned(),
        identity: request.identity.map(str::to_owned),
        scopes: request
            .scopes
            .iter()
            .map(|s| s.as_str().to_owned())
            .collect(),
        exp: now + request.ttl_secs,
        nbf: Some(now),
        iat: Some(now),
        jti: Some(random_id()),
    };
    let signing_input = format!("{}.{}", encode_json(&header), encode_json(&claims));
    let signature = URL_SAFE_NO_PAD.encode(sign(request.secret, signing_input.as_bytes()));
    Ok(format!("{signing_input}.{signature}"))
}

/// A token split into its parts, signature not yet checked.
#[derive(Debug)]
pub struct Unverified<'a> {
    /// The `kid` header.
    pub key_id: String,
    signing_input: &'a str,
    signature: Vec<u8>,
    claims_b64: &'a str,
}

/// Parses the header and finds the key id; no secret is needed yet.
pub fn parse(token: &str) -> Result<Unverified<'_>, AuthError> {
    let mut parts = token.splitn(3, '.');
    let (Some(header_b64), Some(claims_b64), Some(signature_b64)) =
        (parts.next(), parts.next(), parts.next())
    else {
        return Err(AuthError::Malformed("expected three dot-separated parts"));
    };
    let header: Header =
        decode_json(header_b64).ok_or(AuthError::Malformed("header is not base64url JSON"))?;
    if header.alg != "HS256" {
        return Err(AuthError::Algorithm);
    }
    let key_id = header
        .kid
        .filter(|k| !k.is_empty())
        .ok_or(AuthError::Malformed("header has no `kid`"))?;
    let signature = URL_SAFE_NO_PAD
        .decode(signature_b64)
        .map_err(|_| AuthError::Malformed("signature is not base64url"))?;
    let signing_input = &token[..header_b64.len() + 1 + claims_b64.len()];
    Ok(Unverified {
        key_id,
        signing_input,
        signature,
        claims_b64,
    })
}

impl Unverified<'_> {
    /// Checks the signature with `secret`, then the time claims against `now`.
    pub fn verify(&self, secret: &[u8], now: i64) -> Result<Claims, AuthError> {
        let mut mac = hmac_for(secret);
        mac.update(self.signing_input.as_bytes());
        mac.verify_slice(&self.signature)
            .map_err(|_| AuthError::Signature)?;
        let claims: Claims = decode_json(self.claims_b64).ok_or(AuthError::Malformed(
            "claims are not base64url JSON with `sub` and `exp`",
        ))?;
        // Saturating: the claims are any i64 the signer chose. An `exp` near i64::MAX
        // overflowed (a panic with overflow checks; without them a negative `iat` wrapped
        // `exp - iat` past the lifetime check: fuzz/regressions/jwt_verify). Saturation
        // keeps every comparison with `now` exact.
        if claims.refused_from() <= now {
            return Err(AuthError::Expired { exp: claims.exp });
        }
        if let Some(nbf) = claims.nbf
            && nbf.saturating_sub(CLOCK_SKEW_SECS) > now
        {
            return Err(AuthError::NotYetValid { nbf });
        }
        let issued = claims
            .iat
            .unwrap_or(now)
            .min(now.saturating_add(CLOCK_SKEW_SECS));
        if claims.exp.saturating_sub(issued) > MAX_LIFETIME_SECS + CLOCK_SKEW_SECS {
            return Err(AuthError::Lifetime);
        }
        Ok(claims)
    }
}

/// HMAC-SHA256 of `message` under `key`.
pub fn sign(key: &[u8], message: &[u8]) -> Vec<u8> {
    let mut mac = hmac_for(key);
    mac.update(message);
    mac.finalize().into_bytes().to_vec()
}

fn hmac_for(key: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length; `new_from_slice` cannot fail for it.
    match Hmac::<Sha256>::new_from_slice(key) {
        Ok(mac) => mac,
        Err(_) => unreachable!("HMAC accepts keys of every length"),
    }
}

/// A random 128-bit identifier, hex encoded.
pub fn random_id() -> String {
    format!("{:032x}", rand::random::<u128>())
}

fn encode_json<T: Serialize>(value: &T) -> String {
    // Serialising these plain structs cannot fail.
    URL_SAFE_NO_PAD.encode(serde_json::to_vec(value).unwrap_or_default())
}

fn decode_json<T: for<'de> Deserialize<'de>>(part: &str) -> Option<T> {
    let bytes = URL_SAFE_NO_PAD.decode(part).ok()?;
    serde_json::from_slice(&bytes).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    fn token(ttl: i64, secret: &[u8]) -> String {
        let request = TokenRequest {
            key_id: "k1",
            secret,
            account: "AC1",
            identity: Some("alice"),
            scopes: &[Scope::PresenceRegister],
            ttl_secs: ttl,
        };
        mint(&request, NOW).unwrap_or_default()
    }

    #[test]
    fn minted_token_verifies_with_its_secret() {
        let text = token(60, b"s3cret");
        let parsed = parse(&text).map_err(|e| e.to_string());
        let claims = parsed.and_then(|p| p.verify(b"s3cret", NOW + 1).map_err(|e| e.to_string()));
        let claims = claims.unwrap_or_else(|e| panic!("verify failed: {e}"));
        assert_eq!(claims.sub, "AC1");
        assert_eq!(claims.identity.as_deref(), Some("alice"));
        assert_eq!(claims.scopes, vec!["presence.register".to_owned()]);
    }

    #[test]
    fn wrong_secret_and_tampering_fail_the_signature() {
        let text = token(60, b"s3cret");
        assert!(matches!(
            parse(&text).and_then(|p| p.verify(b"other", NOW)),
            Err(AuthError::Signature)
        ));
        let mut parts: Vec<&str> = text.split('.').collect();
        let forged = encode_json(&serde_json::json!({"sub": "*", "exp": NOW + 60}));
        parts[1] = &forged;
        let forged = parts.join(".");
        assert!(matches!(
            parse(&forged).and_then(|p| p.verify(b"s3cret", NOW)),
            Err(AuthError::Signature)
        ));
    }

    #[test]
    fn time_claims_are_enforced_with_skew() {
        let text = token(60, b"k");
        let parsed = parse(&text)
            .map_err(|e| e.to_string())
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(parsed.verify(b"k", NOW + 60 + CLOCK_SKEW_SECS - 1).is_ok());
        assert!(matches!(
            parsed.verify(b"k", NOW + 60 + CLOCK_SKEW_SECS),
            Err(AuthError::Expired { .. })
        ));
        assert!(matches!(
            parsed.verify(b"k", NOW - CLOCK_SKEW_SECS - 1),
            Err(AuthError::NotYetValid { .. })
        ));
    }

    #[test]
    fn lifetimes_over_a_day_are_refused() {
        assert!(matches!(
            mint(
                &TokenRequest {
                    key_id: "k",
                    secret: b"k",
                    account: "A",
                    identity: None,
                    scopes: &[],
                    ttl_secs: MAX_LIFETIME_SECS + 1
                },
                NOW
            ),
            Err(AuthError::Lifetime)
        ));
    }

    #[test]
    fn extreme_time_claims_neither_overflow_nor_dodge_the_lifetime() {
        let signed = |claims: serde_json::Value| {
            let header = encode_json(&serde_json::json!({"alg": "HS256", "kid": "k"}));
            let input = format!("{header}.{}", encode_json(&claims));
            let signature = URL_SAFE_NO_PAD.encode(sign(b"k", input.as_bytes()));
            format!("{input}.{signature}")
        };
        let verify = |text: &str| parse(text).and_then(|p| p.verify(b"k", NOW));
        let forever = signed(serde_json::json!({"sub": "A", "exp": i64::MAX}));
        assert!(matches!(verify(&forever), Err(AuthError::Lifetime)));
        let wrapped = signed(serde_json::json!({"sub": "A", "exp": i64::MAX - 30, "iat": -31}));
        assert!(matches!(verify(&wrapped), Err(AuthError::Lifetime)));
        let early = signed(serde_json::json!({"sub": "A", "exp": NOW + 60, "nbf": i64::MIN}));
        assert!(verify(&early).is_ok());
    }

    #[test]
    fn garbage_is_malformed_not_a_panic() {
        for text in [
            "",
            "a.b",
            "a.b.c",
            "....",
            "eyJhbGciOiJIUzI1NiJ9.e30.AAAA",
            "\u{0}.\u{1}.\u{2}",
        ] {
            assert!(
                parse(text).and_then(|p| p.verify(b"k", NOW)).is_err(),
                "{text:?} accepted"
            );
        }
    }
}

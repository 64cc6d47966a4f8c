//! Bodies of the fuzz targets that live in this crate (`fuzz/fuzz_targets/jwt_verify.rs`
//! calls [`jwt_verify`]); they take the raw fuzzer input so the regression test replays
//! the same inputs on stable. Not part of the service API.
//!
//! Each body panics only when a property of the code under test is broken: that is what a
//! fuzzer reports as a crash.

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::auth::jwt::{self, CLOCK_SKEW_SECS, Claims, MAX_LIFETIME_SECS};
use crate::auth::{Caller, StoredKey, Verifier};

/// The time every token is verified at (unix seconds); seeds are minted around it.
pub const NOW: i64 = 1_800_000_000;
/// The platform key of the fuzzed verifier.
pub const PLATFORM_KEY: (&str, &[u8]) = ("platform", b"platform-secret-for-fuzzing");
/// Its account keys: (key id, account, secret, disabled).
pub const ACCOUNT_KEYS: [(&str, &str, &str, bool); 3] = [
    ("ak_one", "AC1", "c2VjcmV0LW9uZS1mb3ItZnV6emluZw", false),
    ("ak_two", "AC2", "c2VjcmV0LXR3by1mb3ItZnV6emluZw", false),
    ("ak_off", "AC1", "c2VjcmV0LW9mZi1mb3ItZnV6emluZw", true),
];

/// The `jwt_verify` target. The first byte picks the mode:
///
/// - even: the rest, as UTF-8, is an `authorization` value (and, prefixed with `Bearer `,
///   a second one) given to the verifier as it comes;
/// - odd: structured. The second byte picks the signing key (the platform key, one of
///   [`ACCOUNT_KEYS`], or an unknown key id), the third the header (`HS256` with `kid`,
///   no `kid`, another `alg`), and the rest is the claims JSON, signed with the key's
///   secret, so that mutated claims get past the signature to the claim checks.
///
/// Asserts that a token that verifies is signed by the key its `kid` names, that the
/// caller carries exactly the claimed account, identity and known scopes, that the time
/// claims hold (computed without overflow), and, in the structured mode, that a token the
/// rules accept does verify.
pub fn jwt_verify(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let verifier = verifier();
    if mode % 2 == 0 {
        let Ok(text) = std::str::from_utf8(rest) else {
            return;
        };
        for value in [text.to_owned(), format!("Bearer {text}")] {
            if let Ok(caller) = verifier.verify(Some(&value), NOW) {
                check_verified(&value, &caller);
            }
        }
        return;
    }
    let [key, header, claims @ ..] = rest else {
        return;
    };
    let (kid, secret) = signing_key(*key);
    let header = match header % 3 {
        0 => serde_json::json!({"alg": "HS256", "kid": kid, "typ": "JWT"}),
        1 => serde_json::json!({"alg": "HS256"}),
        _ => serde_json::json!({"alg": "none", "kid": kid}),
    };
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header.to_string()),
        URL_SAFE_NO_PAD.encode(claims)
    );
    let signature = URL_SAFE_NO_PAD.encode(jwt::sign(&secret, signing_input.as_bytes()));
    let value = format!("Bearer {signing_input}.{signature}");
    let verified = verifier.verify(Some(&value), NOW);
    if let Ok(caller) = &verified {
        check_verified(&value, caller);
    }
    let acceptable = header["alg"] == "HS256"
        && header.get("kid").is_some()
        && serde_json::from_slice::<Claims>(claims).is_ok_and(|c| rules_accept(kid, &c));
    assert_eq!(
        verified.is_ok(),
        acceptable,
        "the verifier answered {verified:?} for claims the rules {} ({:?})",
        if acceptable { "accept" } else { "refuse" },
        String::from_utf8_lossy(claims),
    );
}

/// The verifier every input goes through: [`PLATFORM_KEY`] and [`ACCOUNT_KEYS`].
pub fn verifier() -> Verifier {
    let (platform_id, platform_secret) = PLATFORM_KEY;
    let keys = ACCOUNT_KEYS
        .iter()
        .map(|(kid, account, secret, disabled)| StoredKey::new(kid, account, secret, *disabled));
    Verifier::with_fixed_keys(
        Some((platform_id.to_owned(), platform_secret.to_vec())),
        keys,
    )
}

/// The key id and secret the structured mode signs with for selector `key`.
fn signing_key(key: u8) -> (&'static str, Vec<u8>) {
    match key % 5 {
        0 => (PLATFORM_KEY.0, PLATFORM_KEY.1.to_vec()),
        4 => ("ak_unknown", b"whatever".to_vec()),
        n => {
            let (kid, _, secret, _) = ACCOUNT_KEYS[usize::from(n) - 1];
            (kid, secret.as_bytes().to_vec())
        }
    }
}

/// The secret `kid` names in the fuzzed verifier, and the account it signs for (`None`:
/// any, the platform key), or `None` for an unknown or disabled key.
fn known_key(kid: &str) -> Option<(Vec<u8>, Option<&'static str>)> {
    if kid == PLATFORM_KEY.0 {
        return Some((PLATFORM_KEY.1.to_vec(), None));
    }
    ACCOUNT_KEYS
        .iter()
        .find(|(id, _, _, disabled)| *id == kid && !disabled)
        .map(|(_, account, secret, _)| (secret.as_bytes().to_vec(), Some(*account)))
}

/// Whether the token rules accept `claims` signed by `kid`, in 128-bit arithmetic.
fn rules_accept(kid: &str, claims: &Claims) -> bool {
    let Some((_, account)) = known_key(kid) else {
        return false;
    };
    account.is_none_or(|a| a == claims.sub) && times_hold(claims)
}

fn times_hold(claims: &Claims) -> bool {
    let (now, skew) = (i128::from(NOW), i128::from(CLOCK_SKEW_SECS));
    let exp = i128::from(claims.exp);
    let issued = claims.iat.map_or(now, i128::from).min(now + skew);
    exp + skew > now
        && claims.nbf.is_none_or(|nbf| i128::from(nbf) - skew <= now)
        && exp - issued <= i128::from(MAX_LIFETIME_SECS) + skew
}

/// The properties of an `authorization` value that verified as `caller`.
fn check_verified(value: &str, caller: &Caller) {
    let token = value
        .strip_prefix("Bearer ")
        .or_else(|| value.strip_prefix("bearer "))
        .map(str::trim);
    let parts: Vec<&str> = token.map_or_else(Vec::new, |t| t.splitn(3, '.').collect());
    let [header, claims, signature] = parts[..] else {
        panic!("{value:?} verified without three parts");
    };
    let header: serde_json::Value = decode(header);
    let claims: Claims = decode(claims);
    let signing_input = format!("{}.{}", parts[0], parts[1]);
    assert_eq!(
        header["alg"], "HS256",
        "{value:?} verified with another alg"
    );
    assert_eq!(header["kid"], caller.key_id.as_str());
    let Some((secret, account)) = known_key(&caller.key_id) else {
        panic!(
            "{value:?} verified with unknown or disabled key {}",
            caller.key_id
        );
    };
    let expected = jwt::sign(&secret, signing_input.as_bytes());
    assert_eq!(
        URL_SAFE_NO_PAD.decode(signature).ok(),
        Some(expected),
        "{value:?} verified with a signature of another key"
    );
    assert_eq!(caller.platform, account.is_none());
    assert_eq!(
        caller.account, claims.sub,
        "the caller is not the claimed account"
    );
    if let Some(account) = account {
        assert_eq!(
            caller.account, account,
            "an account key signed for another account"
        );
    }
    assert_eq!(
        caller.identity,
        claims.identity.clone().filter(|i| !i.is_empty())
    );
    assert!(
        caller
            .scopes
            .iter()
            .all(|s| claims.scopes.iter().any(|c| c == s.as_str())),
        "the caller holds a scope the token does not claim"
    );
    assert!(
        times_hold(&claims),
        "{claims:?} verified outside its time rules"
    );
}

fn decode<T: serde::de::DeserializeOwned>(part: &str) -> T {
    let decoded = URL_SAFE_NO_PAD
        .decode(part)
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok());
    match decoded {
        Some(value) => value,
        None => panic!("a verified token has an undecodable part {part:?}"),
    }
}

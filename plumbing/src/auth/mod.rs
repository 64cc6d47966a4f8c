//! Who is calling, and may they do this?
//!
//! Every RPC except health and reflection carries `authorization: Bearer <JWT>` (HS256).
//! The `kid` header picks the key: the platform key from configuration (any account), or an
//! account key stored in etcd under `<prefix>/keys/<kid>` and mirrored into every replica by
//! a watch, so disabling a key takes effect everywhere within the watch latency.
//! [`AuthLayer`] verifies the token once per request and leaves a [`Caller`] in the request
//! extensions; handlers then ask the caller for scopes and accounts. Verified tokens are
//! cached for at most a second (`cache`), so a disabled key still takes effect within one.

mod cache;
pub mod jwt;
pub mod keys;
mod layer;

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

pub use keys::{KeyError, KeyStore, StoredKey};
pub use layer::{AuthLayer, AuthService, PUBLIC_PATH_PREFIXES};

/// What a token can grant (docs/CONTRACT.md §4). `admin` implies every other scope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scope {
    /// Register and update one's own presence.
    PresenceRegister,
    /// Read presence and watch it.
    PresenceRead,
    /// Acquire and release concurrency slots.
    LimiterAcquire,
    /// Manage limits and read usage.
    LimiterAdmin,
    /// Route communications.
    RouterRoute,
    /// Manage applications.
    RouterAdmin,
    /// Everything.
    Admin,
}

impl Scope {
    /// Every scope, in contract order.
    pub const ALL: [Scope; 7] = [
        Scope::PresenceRegister,
        Scope::PresenceRead,
        Scope::LimiterAcquire,
        Scope::LimiterAdmin,
        Scope::RouterRoute,
        Scope::RouterAdmin,
        Scope::Admin,
    ];

    /// The claim string, e.g. `presence.register`.
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::PresenceRegister => "presence.register",
            Scope::PresenceRead => "presence.read",
            Scope::LimiterAcquire => "limiter.acquire",
            Scope::LimiterAdmin => "limiter.admin",
            Scope::RouterRoute => "router.route",
            Scope::RouterAdmin => "router.admin",
            Scope::Admin => "admin",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Scope {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Scope::ALL
            .into_iter()
            .find(|s| s.as_str() == text)
            .ok_or_else(|| {
                format!(
                    "unknown scope `{text}`; known: {}",
                    Scope::ALL.map(Scope::as_str).join(", ")
                )
            })
    }
}

/// Why a request is not authenticated or not permitted. Messages never contain the token.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    /// No `authorization` metadata.
    #[error("missing `authorization` metadata: expected `authorization: Bearer <JWT>`")]
    Missing,
    /// `authorization` is not `Bearer <token>`.
    #[error("`authorization` metadata must be `Bearer <JWT>`")]
    NotBearer,
    /// The token could not be parsed.
    #[error("token is malformed: {0}")]
    Malformed(&'static str),
    /// `alg` is not HS256.
    #[error("token algorithm must be HS256")]
    Algorithm,
    /// No key with this id exists.
    #[error("token is signed with unknown key id `{0}`")]
    UnknownKey(String),
    /// The key exists but was disabled.
    #[error("token is signed with disabled key `{0}`")]
    DisabledKey(String),
    /// The signature does not match the key.
    #[error("token signature is invalid")]
    Signature,
    /// `exp` has passed.
    #[error("token expired at {exp} (unix seconds)")]
    Expired {
        /// The token's `exp`.
        exp: i64,
    },
    /// `nbf` is in the future.
    #[error("token is not valid before {nbf} (unix seconds)")]
    NotYetValid {
        /// The token's `nbf`.
        nbf: i64,
    },
    /// Lifetime over 24 h.
    #[error("token lifetime exceeds 24 h")]
    Lifetime,
    /// `sub` does not match the account of the key that signed it, or is `*` on an account key.
    #[error("token subject does not match the account of key `{0}`")]
    SubjectMismatch(String),
    /// The token lacks a scope.
    #[error("token lacks scope `{0}`")]
    MissingScope(Scope),
    /// The request names an account the token does not speak for.
    #[error("token for account `{token}` may not act on account `{requested}`")]
    ForeignAccount {
        /// The token's account.
        token: String,
        /// The account the request named.
        requested: String,
    },
    /// The request names an identity the token does not speak for.
    #[error("token for identity `{token}` may not act for identity `{requested}`")]
    ForeignIdentity {
        /// The token's identity (or `<none>`).
        token: String,
        /// The identity the request named.
        requested: String,
    },
    /// Only platform tokens may call this.
    #[error("only platform tokens may call this")]
    PlatformOnly,
    /// A platform token must name the account it acts on.
    #[error("account_id: required with a platform token (`*` is not an account)")]
    AccountRequired,
}

impl AuthError {
    /// UNAUTHENTICATED for errors about the token itself, PERMISSION_DENIED for the rest.
    pub fn is_permission(&self) -> bool {
        matches!(
            self,
            AuthError::MissingScope(_)
                | AuthError::ForeignAccount { .. }
                | AuthError::ForeignIdentity { .. }
                | AuthError::PlatformOnly
        )
    }
}

/// The authenticated principal of one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    /// The token's account (`*` for an all-accounts platform token).
    pub account: String,
    /// The identity claim, if any.
    pub identity: Option<String>,
    /// Granted scopes.
    pub scopes: Vec<Scope>,
    /// Signed with the platform key.
    pub platform: bool,
    /// The key id that signed the token.
    pub key_id: String,
}

impl Caller {
    /// Whether the caller holds `scope` (directly or through `admin`).
    pub fn has(&self, scope: Scope) -> bool {
        self.scopes
            .iter()
            .any(|s| *s == scope || *s == Scope::Admin)
    }

    /// PERMISSION_DENIED unless the caller holds `scope`.
    pub fn require(&self, scope: Scope) -> Result<(), AuthError> {
        if self.has(scope) {
            Ok(())
        } else {
            Err(AuthError::MissingScope(scope))
        }
    }

    /// Only platform tokens pass.
    pub fn require_platform(&self) -> Result<(), AuthError> {
        if self.platform {
            Ok(())
        } else {
            Err(AuthError::PlatformOnly)
        }
    }

    /// The account a request acts on: `requested` when given, else the token's. A non-platform
    /// token may only name its own account.
    pub fn account_for(&self, requested: &str) -> Result<String, AuthError> {
        match (requested.is_empty(), self.platform) {
            (true, _) if self.account == "*" => Err(AuthError::AccountRequired),
            (true, _) => Ok(self.account.clone()),
            (false, true) if self.account == "*" || self.account == requested => {
                Ok(requested.to_owned())
            }
            (false, _) if self.account == requested => Ok(requested.to_owned()),
            (false, _) => Err(AuthError::ForeignAccount {
                token: self.account.clone(),
                requested: requested.to_owned(),
            }),
        }
    }

    /// Whether the caller may act for any identity in its account (platform or `admin`).
    pub fn may_act_for_others(&self) -> bool {
        self.platform || self.scopes.contains(&Scope::Admin)
    }

    /// The caller of a request, as left by [`AuthLayer`].
    pub fn of<T>(request: &tonic::Request<T>) -> Result<Caller, AuthError> {
        request
            .extensions()
            .get::<Caller>()
            .cloned()
            .ok_or(AuthError::Missing)
    }
}

/// The keys a replica accepts: the platform key and the mirrored account keys.
#[derive(Debug, Clone)]
pub struct Verifier {
    platform: Option<(String, Arc<[u8]>)>,
    /// A second platform key accepted during a rotation (never used to sign).
    accepted: Option<(String, Arc<[u8]>)>,
    keys: AccountKeys,
    /// Tokens verified within the current second, shared by clones.
    cache: Arc<cache::TokenCache>,
}

/// Where a [`Verifier`] looks account keys up.
#[derive(Debug, Clone)]
enum AccountKeys {
    /// The store mirrored from etcd (every server); boxed, it holds a whole etcd session.
    Mirrored(Box<KeyStore>),
    /// A fixed set by key id (fuzzing and tests, which run without etcd).
    Fixed(Arc<HashMap<String, StoredKey>>),
}

impl Verifier {
    /// `platform` is (key id, secret); `keys` the account key store, if any.
    pub fn new(platform: Option<(String, Vec<u8>)>, keys: Option<KeyStore>) -> Self {
        Self {
            platform: platform.map(|(id, secret)| (id, Arc::from(secret))),
            accepted: None,
            cache: Arc::default(),
            keys: keys.map_or_else(
                || AccountKeys::Fixed(Arc::default()),
                |store| AccountKeys::Mirrored(Box::new(store)),
            ),
        }
    }

    /// A verifier over a fixed set of account keys instead of the etcd mirror, so the
    /// verification path runs without etcd (the `jwt_verify` fuzz target, tests).
    pub fn with_fixed_keys(
        platform: Option<(String, Vec<u8>)>,
        keys: impl IntoIterator<Item = StoredKey>,
    ) -> Self {
        let keys = keys.into_iter().map(|k| (k.key_id.clone(), k)).collect();
        Self {
            keys: AccountKeys::Fixed(Arc::new(keys)),
            ..Self::new(platform, None)
        }
    }

    /// Also accepts platform tokens of `key` (key id, secret), as during a platform key
    /// rotation.
    pub fn accepting(mut self, key: Option<(String, Vec<u8>)>) -> Self {
        self.accepted = key.map(|(id, secret)| (id, Arc::from(secret)));
        // What was verified under the old set of keys is not reused under the new one.
        self.cache = Arc::default();
        self
    }

    fn account_key(&self, key_id: &str) -> Option<StoredKey> {
        match &self.keys {
            AccountKeys::Mirrored(store) => store.lookup(key_id),
            AccountKeys::Fixed(keys) => keys.get(key_id).cloned(),
        }
    }

    /// Verifies an `authorization` metadata value at time `now` (unix seconds). A token
    /// verified within the same second (and not expired) is taken from the cache.
    pub fn verify(&self, authorization: Option<&str>, now: i64) -> Result<Caller, AuthError> {
        let value = authorization.ok_or(AuthError::Missing)?;
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .map(str::trim)
            .filter(|t| !t.is_empty())
            .ok_or(AuthError::NotBearer)?;
        let key = cache::digest(token);
        if let Some(caller) = self.cache.get(&key, now) {
            return Ok(caller);
        }
        let (caller, refused_from) = self.verify_token(token, now)?;
        self.cache.insert(key, caller.clone(), now, refused_from);
        Ok(caller)
    }

    /// Fully verifies `token` at `now`: its caller, and the second its expiry refuses it.
    fn verify_token(&self, token: &str, now: i64) -> Result<(Caller, i64), AuthError> {
        let unverified = jwt::parse(token)?;
        let kid = unverified.key_id.clone();
        let platform = [&self.platform, &self.accepted]
            .into_iter()
            .flatten()
            .find(|(platform_id, _)| *platform_id == kid);
        if let Some((_, secret)) = platform {
            let claims = unverified.verify(secret, now)?;
            let refused_from = claims.refused_from();
            return Ok((caller(claims, true, kid), refused_from));
        }
        let key = self
            .account_key(&kid)
            .ok_or_else(|| AuthError::UnknownKey(kid.clone()))?;
        let secret = key.secret_bytes();
        let claims = unverified.verify(&secret, now)?;
        if key.disabled {
            return Err(AuthError::DisabledKey(kid));
        }
        if claims.sub != key.account_id {
            return Err(AuthError::SubjectMismatch(kid));
        }
        let refused_from = claims.refused_from();
        Ok((caller(claims, false, kid), refused_from))
    }
}

fn caller(claims: jwt::Claims, platform: bool, key_id: String) -> Caller {
    Caller {
        account: claims.sub,
        identity: claims.identity.filter(|i| !i.is_empty()),
        // Unknown scope strings grant nothing; they are not an error so that newer
        // minters can add scopes without breaking older replicas.
        scopes: claims
            .scopes
            .iter()
            .filter_map(|s| s.parse().ok())
            .collect(),
        platform,
        key_id,
    }
}

/// Seconds since the Unix epoch ([`crate::time::now_secs`]).
pub use crate::time::now_secs as unix_now;

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(account: &str, platform: bool, scopes: &[Scope]) -> Caller {
        Caller {
            account: account.into(),
            identity: None,
            scopes: scopes.to_vec(),
            platform,
            key_id: "k".into(),
        }
    }

    #[test]
    fn accounts_default_to_the_token_and_foreign_ones_are_denied() {
        let ac1 = caller("AC1", false, &[]);
        assert_eq!(ac1.account_for(""), Ok("AC1".into()));
        assert_eq!(ac1.account_for("AC1"), Ok("AC1".into()));
        assert!(matches!(
            ac1.account_for("AC2"),
            Err(AuthError::ForeignAccount { .. })
        ));
        let platform = caller("*", true, &[]);
        assert_eq!(platform.account_for("AC2"), Ok("AC2".into()));
        assert_eq!(platform.account_for(""), Err(AuthError::AccountRequired));
        let scoped_platform = caller("AC1", true, &[]);
        assert!(scoped_platform.account_for("AC2").is_err());
    }

    #[test]
    fn admin_implies_every_scope_and_others_imply_nothing() {
        let admin = caller("AC1", false, &[Scope::Admin]);
        assert!(Scope::ALL.iter().all(|s| admin.has(*s)));
        let reader = caller("AC1", false, &[Scope::PresenceRead]);
        assert!(reader.require(Scope::PresenceRead).is_ok());
        assert_eq!(
            reader.require(Scope::PresenceRegister),
            Err(AuthError::MissingScope(Scope::PresenceRegister))
        );
        assert!(AuthError::MissingScope(Scope::Admin).is_permission());
        assert!(!AuthError::Signature.is_permission());
    }

    #[test]
    fn scopes_parse_from_their_claim_strings() {
        for scope in Scope::ALL {
            assert_eq!(scope.as_str().parse::<Scope>(), Ok(scope));
        }
        assert!("presence.write".parse::<Scope>().is_err());
    }
}

//! Tokens verified lately, so a client sending the same token on every call costs one
//! hash lookup instead of a parse and an HMAC.
//!
//! An entry is the [`Caller`] a full verification produced, keyed by the SHA-256 of the
//! whole token (the token itself is neither stored nor logged). It is used only within the
//! unix second it was verified in and before the token expires: after that the token is
//! verified again against the current key state, so a key disabled or deleted in the key
//! store refuses its tokens within one second, as without the cache.

use std::collections::HashMap;
use std::sync::{PoisonError, RwLock};

use sha2::{Digest, Sha256};

use super::Caller;

/// Entries kept at most; when full, entries past their use are dropped first, then any.
pub(super) const CAPACITY: usize = 10_000;
/// How long, in seconds, an entry is used before its token is verified again.
const RECHECK_SECS: i64 = 1;

/// The cache key of a token: its SHA-256.
pub(super) type TokenDigest = [u8; 32];

/// The SHA-256 of `token`.
pub(super) fn digest(token: &str) -> TokenDigest {
    Sha256::digest(token.as_bytes()).into()
}

/// See the module docs.
pub(super) struct TokenCache {
    entries: RwLock<HashMap<TokenDigest, Entry>>,
    capacity: usize,
}

struct Entry {
    caller: Caller,
    /// When the token was verified (unix seconds).
    checked: i64,
    /// The first second the entry is not used: the next check, or the token's expiry.
    until: i64,
}

impl Entry {
    fn usable(&self, now: i64) -> bool {
        self.checked <= now && now < self.until
    }
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("entries", &self.len())
            .field("capacity", &self.capacity)
            .finish()
    }
}

impl Default for TokenCache {
    fn default() -> Self {
        Self::with_capacity(CAPACITY)
    }
}

impl TokenCache {
    /// An empty cache of at most `capacity` entries.
    pub(super) fn with_capacity(capacity: usize) -> Self {
        Self {
            entries: RwLock::default(),
            capacity: capacity.max(1),
        }
    }

    /// The caller of the token with `key`, if it was verified within this second and has
    /// not expired at `now`.
    pub(super) fn get(&self, key: &TokenDigest, now: i64) -> Option<Caller> {
        let entries = self.entries.read().unwrap_or_else(PoisonError::into_inner);
        entries
            .get(key)
            .filter(|entry| entry.usable(now))
            .map(|entry| entry.caller.clone())
    }

    /// Remembers that the token with `key` verified as `caller` at `now`; `refused_from`
    /// is the first second its expiry refuses it.
    pub(super) fn insert(&self, key: TokenDigest, caller: Caller, now: i64, refused_from: i64) {
        let until = refused_from.min(now.saturating_add(RECHECK_SECS));
        if until <= now {
            return;
        }
        let mut entries = self.entries.write().unwrap_or_else(PoisonError::into_inner);
        if entries.len() >= self.capacity && !entries.contains_key(&key) {
            entries.retain(|_, entry| entry.usable(now));
            if entries.len() >= self.capacity
                && let Some(victim) = entries.keys().next().copied()
            {
                entries.remove(&victim);
            }
        }
        entries.insert(
            key,
            Entry {
                caller,
                checked: now,
                until,
            },
        );
    }

    /// Entries held.
    pub(super) fn len(&self) -> usize {
        self.entries
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;

    fn caller(account: &str) -> Caller {
        Caller {
            account: account.to_owned(),
            identity: None,
            scopes: Vec::new(),
            platform: false,
            key_id: "k1".to_owned(),
        }
    }

    #[test]
    fn an_entry_is_used_only_within_its_second() {
        let cache = TokenCache::default();
        let key = digest("a.b.c");
        cache.insert(key, caller("AC1"), NOW, NOW + 3600);
        assert_eq!(cache.get(&key, NOW), Some(caller("AC1")));
        assert_eq!(cache.get(&key, NOW + 1), None, "re-checked after a second");
        assert_eq!(cache.get(&key, NOW - 1), None, "the clock went back");
        assert_eq!(cache.get(&digest("a.b.d"), NOW), None);
    }

    #[test]
    fn an_entry_is_not_used_once_its_token_expires() {
        let cache = TokenCache::default();
        let key = digest("a.b.c");
        cache.insert(key, caller("AC1"), NOW, NOW);
        assert_eq!(cache.get(&key, NOW), None, "expired as it was verified");
        assert_eq!(cache.len(), 0, "never stored");
    }

    #[test]
    fn a_full_cache_drops_stale_entries_then_any() {
        let cache = TokenCache::with_capacity(2);
        cache.insert(digest("old"), caller("A"), NOW - 5, NOW + 60);
        cache.insert(digest("one"), caller("B"), NOW, NOW + 60);
        cache.insert(digest("two"), caller("C"), NOW, NOW + 60);
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.get(&digest("one"), NOW), Some(caller("B")));
        assert_eq!(cache.get(&digest("two"), NOW), Some(caller("C")));
        cache.insert(digest("three"), caller("D"), NOW, NOW + 60);
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.get(&digest("three"), NOW), Some(caller("D")));
    }

    mod verifier {
        use std::collections::HashMap;
        use std::sync::Arc;

        use super::NOW;
        use crate::auth::jwt::{self, CLOCK_SKEW_SECS, TokenRequest};
        use crate::auth::{AccountKeys, AuthError, Scope, StoredKey, Verifier};

        const SECRET: &str = "account-secret";

        fn bearer(ttl_secs: i64) -> String {
            let request = TokenRequest {
                key_id: "k1",
                secret: SECRET.as_bytes(),
                account: "AC1",
                identity: None,
                scopes: &[Scope::PresenceRead],
                ttl_secs,
            };
            let token = jwt::mint(&request, NOW).unwrap_or_else(|e| panic!("{e}"));
            format!("Bearer {token}")
        }

        /// `verifier` with its account keys replaced by `key` (or none), sharing its cache:
        /// what the key store looks like after a change.
        fn with_key(verifier: &Verifier, key: Option<StoredKey>) -> Verifier {
            let keys: HashMap<_, _> = key.into_iter().map(|k| (k.key_id.clone(), k)).collect();
            Verifier {
                keys: AccountKeys::Fixed(Arc::new(keys)),
                ..verifier.clone()
            }
        }

        fn enabled() -> Verifier {
            Verifier::with_fixed_keys(None, [StoredKey::new("k1", "AC1", SECRET, false)])
        }

        #[test]
        fn a_token_verified_this_second_is_served_from_the_cache() {
            let verifier = enabled();
            let token = bearer(60);
            let first = verifier.verify(Some(&token), NOW);
            assert_eq!(first.as_ref().map(|c| c.account.as_str()), Ok("AC1"));
            // With the key gone, only the cache can accept the token.
            let keyless = with_key(&verifier, None);
            assert_eq!(keyless.verify(Some(&token), NOW), first);
            assert_eq!(
                keyless.verify(Some(&token), NOW + 1),
                Err(AuthError::UnknownKey("k1".into()))
            );
        }

        #[test]
        fn a_cached_token_is_refused_once_it_expires() {
            let verifier = enabled();
            let token = bearer(10);
            let last_second = NOW + 10 + CLOCK_SKEW_SECS - 1;
            assert!(verifier.verify(Some(&token), last_second).is_ok());
            assert_eq!(verifier.cache.len(), 1);
            assert_eq!(
                verifier.verify(Some(&token), last_second + 1),
                Err(AuthError::Expired { exp: NOW + 10 })
            );
        }

        #[test]
        fn a_disabled_key_takes_effect_within_a_second() {
            let verifier = enabled();
            let token = bearer(3600);
            assert!(verifier.verify(Some(&token), NOW).is_ok());
            let disabled = with_key(&verifier, Some(StoredKey::new("k1", "AC1", SECRET, true)));
            assert_eq!(
                disabled.verify(Some(&token), NOW + 1),
                Err(AuthError::DisabledKey("k1".into()))
            );
            assert_eq!(
                disabled.verify(Some(&token), NOW + 1),
                Err(AuthError::DisabledKey("k1".into())),
                "refusals are not cached"
            );
        }
    }
}

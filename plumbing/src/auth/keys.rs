//! Account keys in etcd (`<prefix>/keys/<kid>`, one JSON record each) and the mirrored copy
//! every replica verifies tokens against.
//!
//! The secret is stored because HMAC verification needs it; the key service returns it once,
//! at creation, and never again. Writes are rare (operator actions), so each is one txn.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use etcd_client::{Compare, CompareOp, GetOptions, SortOrder, SortTarget, Txn, TxnOp};
use serde::{Deserialize, Serialize};

use crate::etcd::{EtcdError, EtcdSession, Mirror, MirrorUpdate};
use crate::validate::{self, FieldError};

/// How long a write waits for this replica's mirror to show it before returning.
const MIRROR_CATCH_UP: Duration = Duration::from_secs(2);

/// One account key as stored in etcd.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredKey {
    /// The `kid` tokens carry.
    pub key_id: String,
    /// The account this key signs for.
    pub account_id: String,
    /// base64url HS256 secret.
    secret: String,
    /// Free text from the operator.
    #[serde(default)]
    pub description: String,
    /// Disabled keys verify nothing.
    #[serde(default)]
    pub disabled: bool,
    /// Unix seconds.
    pub create_time: i64,
    /// Unix seconds, when disabled.
    #[serde(default)]
    pub disable_time: Option<i64>,
}

impl std::fmt::Debug for StoredKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredKey")
            .field("key_id", &self.key_id)
            .field("account_id", &self.account_id)
            .field("disabled", &self.disabled)
            .finish_non_exhaustive()
    }
}

impl StoredKey {
    /// An enabled key record with `secret` as its text. Keys are minted by
    /// [`KeyStore::create`]; this builds one for a verifier that runs without etcd
    /// ([`super::Verifier::with_fixed_keys`]: fuzzing, and tests of the token rules).
    pub fn new(key_id: &str, account_id: &str, secret: &str, disabled: bool) -> Self {
        Self {
            key_id: key_id.to_owned(),
            account_id: account_id.to_owned(),
            secret: secret.to_owned(),
            description: String::new(),
            disabled,
            create_time: 0,
            disable_time: None,
        }
    }

    /// The secret as the bytes HMAC is keyed with.
    pub fn secret_bytes(&self) -> Vec<u8> {
        self.secret.as_bytes().to_vec()
    }

    /// The secret text, to show once to whoever created the key.
    pub fn secret(&self) -> &str {
        &self.secret
    }
}

/// Why a key operation failed.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// No such key.
    #[error("key `{0}` not found")]
    NotFound(String),
    /// A field broke a rule.
    #[error(transparent)]
    Invalid(#[from] FieldError),
    /// etcd failed.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
}

/// The account keys of this deployment: writes go to etcd, reads come from a mirror.
#[derive(Clone)]
pub struct KeyStore {
    session: EtcdSession,
    cache: Arc<RwLock<HashMap<String, StoredKey>>>,
    mirror: Arc<Mirror>,
}

impl std::fmt::Debug for KeyStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeyStore")
            .field("revision", &self.mirror.revision())
            .finish_non_exhaustive()
    }
}

impl KeyStore {
    /// Starts mirroring `<prefix>/keys/`.
    pub fn start(session: &EtcdSession) -> Self {
        let cache: Arc<RwLock<HashMap<String, StoredKey>>> = Arc::default();
        let target = cache.clone();
        let mirror = Mirror::start(session, session.key("keys/"), move |update| {
            apply(&target, update)
        });
        Self {
            session: session.clone(),
            cache,
            mirror: Arc::new(mirror),
        }
    }

    /// Waits until the first snapshot is loaded (or `timeout`); false on timeout.
    pub async fn ready(&self, timeout: Duration) -> bool {
        self.mirror.wait_for(1, timeout).await
    }

    /// The key with this id, from the mirror.
    pub fn lookup(&self, key_id: &str) -> Option<StoredKey> {
        self.cache.read().ok()?.get(key_id).cloned()
    }

    /// Creates a key for `account_id` with a fresh random secret.
    pub async fn create(&self, account_id: &str, description: &str) -> Result<StoredKey, KeyError> {
        validate::account_id("account_id", account_id)?;
        validate::max_len("description", description, 256)?;
        let key = StoredKey {
            key_id: format!("ak_{}", &crate::auth::jwt::random_id()[..20]),
            account_id: account_id.to_owned(),
            secret: URL_SAFE_NO_PAD.encode(rand::random::<[u8; 32]>()),
            description: description.to_owned(),
            disabled: false,
            create_time: super::unix_now(),
            disable_time: None,
        };
        let path = self.path(&key.key_id);
        let txn = Txn::new()
            .when([Compare::create_revision(path.clone(), CompareOp::Equal, 0)])
            .and_then([TxnOp::put(path, encode(&key), None)]);
        let mut client = self.session.client();
        let response = self.session.bounded(client.txn(txn)).await?;
        if !response.succeeded() {
            return Err(EtcdError::Unavailable("key id collision; retry".into()).into());
        }
        self.catch_up(response.header().map_or(0, |h| h.revision()))
            .await;
        Ok(key)
    }

    /// Marks a key disabled; tokens it signed are refused from then on, on every replica.
    pub async fn disable(&self, key_id: &str) -> Result<StoredKey, KeyError> {
        validate::non_empty("key_id", key_id)?;
        let path = self.path(key_id);
        loop {
            let mut client = self.session.client();
            let found = self.session.bounded(client.get(path.clone(), None)).await?;
            let Some(kv) = found.kvs().first() else {
                return Err(KeyError::NotFound(key_id.to_owned()));
            };
            let mut key = decode(kv.key(), kv.value())?;
            if key.disabled {
                return Ok(key);
            }
            key.disabled = true;
            key.disable_time = Some(super::unix_now());
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    path.clone(),
                    CompareOp::Equal,
                    kv.mod_revision(),
                )])
                .and_then([TxnOp::put(path.clone(), encode(&key), None)]);
            let response = self.session.bounded(client.txn(txn)).await?;
            if response.succeeded() {
                self.catch_up(response.header().map_or(0, |h| h.revision()))
                    .await;
                return Ok(key);
            }
        }
    }

    /// Keys in key-id order after `page_token`, optionally of one account only.
    pub async fn list(
        &self,
        account_id: Option<&str>,
        page_size: usize,
        page_token: &str,
    ) -> Result<(Vec<StoredKey>, String), KeyError> {
        let page_size = page_size.clamp(1, crate::paging::MAX_PAGE_SIZE);
        let prefix = self.path("");
        let mut from = if page_token.is_empty() {
            prefix.clone()
        } else {
            format!("{}\0", self.path(page_token))
        };
        let mut out = Vec::new();
        // With an account filter a range may hold other accounts' keys: read on until the
        // page is full (one extra tells whether another page exists) or the range ends.
        loop {
            let options = GetOptions::new()
                .with_range(crate::etcd::prefix_end(&prefix))
                .with_limit(256)
                .with_sort(SortTarget::Key, SortOrder::Ascend);
            let mut client = self.session.client();
            let response = self
                .session
                .bounded(client.get(from.clone(), Some(options)))
                .await?;
            for kv in response.kvs() {
                let key = decode(kv.key(), kv.value())?;
                from = format!("{}\0", self.path(&key.key_id));
                if account_id.is_none_or(|a| a == key.account_id) {
                    out.push(key);
                }
                if out.len() > page_size {
                    out.truncate(page_size);
                    let next = out.last().map(|k| k.key_id.clone()).unwrap_or_default();
                    return Ok((out, next));
                }
            }
            if !response.more() {
                return Ok((out, String::new()));
            }
        }
    }

    fn path(&self, key_id: &str) -> String {
        self.session.key(&format!("keys/{key_id}"))
    }

    async fn catch_up(&self, revision: i64) {
        if !self.mirror.wait_for(revision, MIRROR_CATCH_UP).await {
            tracing::warn!(revision, "key mirror is behind etcd");
        }
    }
}

fn apply(cache: &RwLock<HashMap<String, StoredKey>>, update: MirrorUpdate) {
    let Ok(mut cache) = cache.write() else { return };
    match update {
        MirrorUpdate::Reset { kvs, .. } => {
            cache.clear();
            for kv in kvs {
                if let Ok(key) = decode(kv.key(), kv.value()) {
                    cache.insert(key.key_id.clone(), key);
                }
            }
        }
        MirrorUpdate::Put(kv) => match decode(kv.key(), kv.value()) {
            Ok(key) => {
                cache.insert(key.key_id.clone(), key);
            }
            Err(err) => tracing::warn!(error = %err, "ignoring unreadable key record"),
        },
        MirrorUpdate::Delete(kv) => {
            let path = String::from_utf8_lossy(kv.key());
            if let Some(id) = path.rsplit('/').next() {
                cache.remove(id);
            }
        }
    }
}

fn encode(key: &StoredKey) -> Vec<u8> {
    serde_json::to_vec(key).unwrap_or_default()
}

fn decode(path: &[u8], value: &[u8]) -> Result<StoredKey, EtcdError> {
    serde_json::from_slice(value).map_err(|err| EtcdError::Corrupt {
        key: String::from_utf8_lossy(path).into_owned(),
        reason: err.to_string(),
    })
}

//! Applications in etcd (`<prefix>/router/apps/<account>/<address>`, JSON, no lease) and a
//! watch-fed copy of all of them, so that Route finds its application without an etcd read.
//! Account ids and addresses cannot contain `/`, so keys parse back unambiguously and one
//! prefix per account isolates tenants.
//!
//! An account may have at most `--max-applications-per-account` applications. A Put that
//! creates one counts the account's applications in etcd and writes only if no application
//! of the account was created since that count (a compare on the account's range), so the
//! cap holds across replicas; replacing an application is never refused by it.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, GetOptions, KeyValue, Txn, TxnOp};
use plumbing::etcd::{EtcdError, EtcdSession, Mirror, MirrorUpdate};
use proto::router::v1 as pb;
use serde::{Deserialize, Serialize};

use crate::error::Error;
use crate::model::{now_ms, timestamp};
use crate::rules;
use crate::xml::Method;

/// How long Put waits for this replica's copy to show the write.
const MIRROR_WAIT: Duration = Duration::from_secs(2);
/// Put retries when a concurrent Put changed the record between read and write.
const PUT_ATTEMPTS: usize = 5;

/// An application as stored. Its `Debug` leaves the signing secret out.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppRecord {
    /// Webhook for instructions.
    #[serde(default)]
    pub instructions_url: String,
    /// `GET` or `POST`.
    pub method: String,
    /// Fallback webhook.
    #[serde(default)]
    pub fallback_url: String,
    /// Inline instructions.
    #[serde(default)]
    pub instructions: String,
    /// Status callback URL.
    #[serde(default)]
    pub status_callback_url: String,
    /// HMAC key of the signatures.
    pub signing_secret: String,
    /// Creation time, ms since the epoch.
    pub create_ms: i64,
    /// Last change, ms since the epoch.
    pub update_ms: i64,
}

impl std::fmt::Debug for AppRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppRecord")
            .field("instructions_url", &self.instructions_url)
            .field("method", &self.method)
            .field("fallback_url", &self.fallback_url)
            .field("status_callback_url", &self.status_callback_url)
            .field("signing_secret", &"<redacted>")
            .finish_non_exhaustive()
    }
}

impl AppRecord {
    /// The default method for this application's URLs.
    pub fn method(&self) -> Method {
        if self.method == "GET" {
            Method::Get
        } else {
            Method::Post
        }
    }

    /// The public form; the secret only when `with_secret`.
    pub fn to_pb(&self, account: &str, address: &str, with_secret: bool) -> pb::Application {
        let method = match self.method() {
            Method::Get => pb::HttpMethod::Get,
            Method::Post => pb::HttpMethod::Post,
        };
        pb::Application {
            account_id: account.to_owned(),
            address: address.to_owned(),
            instructions_url: self.instructions_url.clone(),
            method: method as i32,
            fallback_url: self.fallback_url.clone(),
            instructions: self.instructions.clone(),
            status_callback_url: self.status_callback_url.clone(),
            signing_secret: if with_secret {
                self.signing_secret.clone()
            } else {
                String::new()
            },
            create_time: Some(timestamp(self.create_ms)),
            update_time: Some(timestamp(self.update_ms)),
        }
    }
}

/// The application store and its copy.
#[derive(Debug, Clone)]
pub struct ApplicationStore {
    session: EtcdSession,
    root: String,
    allow_private: bool,
    max_per_account: usize,
    copy: Arc<RwLock<HashMap<String, Arc<AppRecord>>>>,
    mirror: Arc<Mirror>,
}

impl ApplicationStore {
    /// Starts mirroring the applications under `session`'s prefix; at most
    /// `max_per_account` applications per account.
    pub fn start(session: &EtcdSession, allow_private: bool, max_per_account: usize) -> Self {
        let root = session.key("router/apps/");
        let copy: Arc<RwLock<HashMap<String, Arc<AppRecord>>>> = Arc::default();
        let mirror = {
            let (copy, root) = (copy.clone(), root.clone());
            Mirror::start(session, root.clone(), move |update| {
                apply(&copy, &root, update);
            })
        };
        Self {
            session: session.clone(),
            root,
            allow_private,
            max_per_account,
            copy,
            mirror: Arc::new(mirror),
        }
    }

    fn key(&self, account: &str, address: &str) -> String {
        format!("{}{account}/{address}", self.root)
    }

    /// Creates or replaces an application; the stored record and whether it was created.
    pub async fn put(
        &self,
        account: &str,
        app: &pb::Application,
    ) -> Result<(AppRecord, bool), Error> {
        rules::application(app, self.allow_private)?;
        let key = self.key(account, &app.address);
        for _ in 0..PUT_ATTEMPTS {
            let current = self.read(&key).await?;
            let now = now_ms();
            let (secret, create_ms, compares) = match &current {
                Some((record, revision)) => (
                    record.signing_secret.clone(),
                    record.create_ms,
                    vec![Compare::mod_revision(
                        key.as_str(),
                        CompareOp::Equal,
                        *revision,
                    )],
                ),
                None => (
                    rules::new_secret(),
                    now,
                    vec![
                        Compare::create_revision(key.as_str(), CompareOp::Equal, 0),
                        self.room_for_one(account).await?,
                    ],
                ),
            };
            let record = AppRecord {
                instructions_url: app.instructions_url.clone(),
                method: if app.method == pb::HttpMethod::Get as i32 {
                    "GET".into()
                } else {
                    "POST".into()
                },
                fallback_url: app.fallback_url.clone(),
                instructions: app.instructions.clone(),
                status_callback_url: app.status_callback_url.clone(),
                signing_secret: if app.signing_secret.is_empty() {
                    secret
                } else {
                    app.signing_secret.clone()
                },
                create_ms,
                update_ms: now,
            };
            let value = serde_json::to_vec(&record).map_err(|e| EtcdError::Corrupt {
                key: key.clone(),
                reason: e.to_string(),
            })?;
            let txn = Txn::new()
                .when(compares)
                .and_then([TxnOp::put(key.as_str(), value, None)]);
            let mut client = self.session.client();
            let response = self.session.bounded(client.txn(txn)).await?;
            if response.succeeded() {
                let revision = response.header().map_or(0, |h| h.revision());
                // Read-your-writes on this replica: Route here sees the application at once.
                self.mirror.wait_for(revision, MIRROR_WAIT).await;
                return Ok((record, current.is_none()));
            }
        }
        Err(Error::Contended("the application"))
    }

    /// Refuses a new application when `account` has its cap already; else the compare that
    /// keeps the count valid until the write (no application of the account created since).
    async fn room_for_one(&self, account: &str) -> Result<Compare, Error> {
        let prefix = self.key(account, "");
        let mut client = self.session.client();
        let options = GetOptions::new().with_prefix().with_count_only();
        let counted = self
            .session
            .bounded(client.get(prefix.as_str(), Some(options)))
            .await?;
        if usize::try_from(counted.count()).unwrap_or(usize::MAX) >= self.max_per_account {
            return Err(Error::ApplicationLimit {
                account: account.to_owned(),
                limit: self.max_per_account,
            });
        }
        let revision = counted.header().map_or(0, |h| h.revision());
        Ok(Compare::create_revision(prefix, CompareOp::Less, revision + 1).with_prefix())
    }

    /// The application for (account, address), read from etcd.
    pub async fn get(&self, account: &str, address: &str) -> Result<AppRecord, Error> {
        rules::address("address", address)?;
        self.read(&self.key(account, address))
            .await?
            .map(|(record, _)| record)
            .ok_or_else(|| Error::NoApplication {
                account: account.to_owned(),
                address: address.to_owned(),
            })
    }

    /// The application Route uses: from the copy, or from etcd when the copy has not seen it.
    pub async fn lookup(&self, account: &str, address: &str) -> Result<Arc<AppRecord>, Error> {
        let key = format!("{account}/{address}");
        let cached = self
            .copy
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&key)
            .cloned();
        match cached {
            Some(record) => Ok(record),
            None => self.get(account, address).await.map(Arc::new),
        }
    }

    /// Deletes an application; whether one was deleted.
    pub async fn delete(&self, account: &str, address: &str) -> Result<bool, Error> {
        rules::address("address", address)?;
        let mut client = self.session.client();
        let response = self
            .session
            .bounded(client.delete(self.key(account, address), None))
            .await?;
        Ok(response.deleted() > 0)
    }

    /// One page of an account's applications, by address.
    pub async fn list(
        &self,
        account: &str,
        page_size: usize,
        after: Option<String>,
    ) -> Result<(Vec<(String, AppRecord)>, Option<String>), Error> {
        let prefix = self.key(account, "");
        let start = match &after {
            Some(address) => format!("{prefix}{address}\0"),
            None => prefix.clone(),
        };
        let end = plumbing::etcd::prefix_end(&prefix);
        let options = GetOptions::new()
            .with_range(end)
            .with_limit(page_size as i64 + 1);
        let mut client = self.session.client();
        let response = self
            .session
            .bounded(client.get(start, Some(options)))
            .await?;
        let mut page = Vec::new();
        for kv in response.kvs() {
            let address = kv.key_str().unwrap_or("").trim_start_matches(&prefix);
            page.push((address.to_owned(), decode(kv)?));
        }
        let next = if page.len() > page_size {
            page.truncate(page_size);
            page.last().map(|(address, _)| address.clone())
        } else {
            None
        };
        Ok((page, next))
    }

    async fn read(&self, key: &str) -> Result<Option<(AppRecord, i64)>, Error> {
        let mut client = self.session.client();
        let response = self.session.bounded(client.get(key, None)).await?;
        match response.kvs().first() {
            Some(kv) => Ok(Some((decode(kv)?, kv.mod_revision()))),
            None => Ok(None),
        }
    }
}

fn decode(kv: &KeyValue) -> Result<AppRecord, EtcdError> {
    serde_json::from_slice(kv.value()).map_err(|e| EtcdError::Corrupt {
        key: kv.key_str().unwrap_or("?").to_owned(),
        reason: e.to_string(),
    })
}

fn apply(copy: &RwLock<HashMap<String, Arc<AppRecord>>>, root: &str, update: MirrorUpdate) {
    let mut copy = copy.write().unwrap_or_else(PoisonError::into_inner);
    let name = |kv: &KeyValue| {
        kv.key_str()
            .ok()
            .and_then(|k| k.strip_prefix(root))
            .map(str::to_owned)
    };
    match update {
        MirrorUpdate::Reset { kvs, .. } => {
            copy.clear();
            for kv in kvs {
                if let (Some(name), Ok(record)) = (name(&kv), decode(&kv)) {
                    copy.insert(name, Arc::new(record));
                }
            }
        }
        MirrorUpdate::Put(kv) => match (name(&kv), decode(&kv)) {
            (Some(name), Ok(record)) => {
                copy.insert(name, Arc::new(record));
            }
            (Some(name), Err(err)) => {
                tracing::warn!(error = %err, "unreadable application record ignored");
                copy.remove(&name);
            }
            _ => {}
        },
        MirrorUpdate::Delete(kv) => {
            if let Some(name) = name(&kv) {
                copy.remove(&name);
            }
        }
    }
}

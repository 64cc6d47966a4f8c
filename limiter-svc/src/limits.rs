//! Limits: stored in etcd under `<prefix>/limiter/limits/<account>/<resource>` (JSON
//! [`LimitValue`]), mirrored into every replica by a watch, so a change applies everywhere
//! within the watch latency (milliseconds; the contract says within a second).
//!
//! The limit for a key is the first that exists of: the account's own limit, the `*`
//! default for the resource, and the server's `--default-limit` (0 there means unlimited).

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use plumbing::etcd::{EtcdError, EtcdSession, Mirror, MirrorUpdate};
use tokio::sync::watch;

use crate::model::{LimitSource, LimitValue, SlotKey};

/// How long a write waits for this replica's mirror to show it.
const CATCH_UP: Duration = Duration::from_secs(2);

/// The limits in force, mirrored from etcd.
#[derive(Debug, Clone)]
pub struct LimitTable {
    session: EtcdSession,
    limits: Arc<RwLock<BTreeMap<(String, String), LimitValue>>>,
    server_default: Option<LimitValue>,
    changes: watch::Receiver<u64>,
    mirror: Arc<Mirror>,
}

/// Resource families whose members (`<family>/<member>`) share the family's limit, each
/// member counted on its own: `identity.communications/<identity>` counts one identity's
/// connected communications, limited by the account's `identity.communications`.
pub const MEMBER_FAMILIES: &[&str] = &["identity.communications"];

/// The family of a member resource, if `resource` is one.
pub fn member_family(resource: &str) -> Option<&'static str> {
    let (family, member) = resource.split_once('/')?;
    if member.is_empty() {
        return None;
    }
    MEMBER_FAMILIES.iter().copied().find(|f| *f == family)
}

impl LimitTable {
    /// Starts mirroring the limits; `server_default` 0 means unlimited.
    pub fn start(session: &EtcdSession, server_default: u32) -> Self {
        let limits: Arc<RwLock<BTreeMap<(String, String), LimitValue>>> = Arc::default();
        let (notify, changes) = watch::channel(0u64);
        let prefix = session.key("limiter/limits/");
        let target = limits.clone();
        let strip = prefix.clone();
        let mirror = Mirror::start(session, prefix, move |update| {
            if let Ok(mut map) = target.write() {
                apply(&mut map, &strip, update);
            }
            notify.send_modify(|v| *v += 1);
        });
        let server_default = (server_default > 0).then_some(LimitValue {
            max_in_flight: server_default,
            shadow: false,
        });
        Self {
            session: session.clone(),
            limits,
            server_default,
            changes,
            mirror: Arc::new(mirror),
        }
    }

    /// Waits until the first snapshot is loaded.
    pub async fn ready(&self, timeout: Duration) -> bool {
        self.mirror.wait_for(1, timeout).await
    }

    /// Fires whenever a limit changes.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }

    /// The limit in force for `key` (None: unlimited) and where it comes from. A member of a
    /// family ([`member_family`]: `identity.communications/<identity>`) has its own limit,
    /// else its account's limit of the family, else the platform's (`*`) for the member,
    /// else for the family, else none: the server default does not apply to members.
    pub fn effective(&self, key: &SlotKey) -> (Option<LimitValue>, LimitSource) {
        let Ok(map) = self.limits.read() else {
            return (self.server_default, LimitSource::Server);
        };
        if let Some(limit) = map.get(&(key.account.clone(), key.resource.clone())) {
            return (Some(*limit), LimitSource::Account);
        }
        if let Some(family) = member_family(&key.resource) {
            let found = [
                ((key.account.as_str(), family), LimitSource::Account),
                (("*", key.resource.as_str()), LimitSource::Default),
                (("*", family), LimitSource::Default),
            ]
            .into_iter()
            .find_map(|((account, resource), source)| {
                map.get(&(account.to_owned(), resource.to_owned()))
                    .map(|limit| (Some(*limit), source))
            });
            return found.unwrap_or((None, LimitSource::Unlimited));
        }
        if let Some(limit) = map.get(&("*".to_owned(), key.resource.clone())) {
            return (Some(*limit), LimitSource::Default);
        }
        match self.server_default {
            Some(limit) => (Some(limit), LimitSource::Server),
            None => (None, LimitSource::Unlimited),
        }
    }

    /// The stored limits of `account` after resource `after`, at most `page_size`, plus
    /// whether more follow.
    pub fn list(
        &self,
        account: &str,
        after: &str,
        page_size: usize,
    ) -> (Vec<(String, LimitValue)>, bool) {
        let Ok(map) = self.limits.read() else {
            return (Vec::new(), false);
        };
        let mut page: Vec<(String, LimitValue)> = map
            .range((account.to_owned(), after.to_owned())..)
            .take_while(|((a, _), _)| a == account)
            .filter(|((_, r), _)| r.as_str() > after)
            .take(page_size + 1)
            .map(|((_, r), v)| (r.clone(), *v))
            .collect();
        let more = page.len() > page_size;
        page.truncate(page_size);
        (page, more)
    }

    /// Stores a limit.
    pub async fn set(
        &self,
        account: &str,
        resource: &str,
        value: LimitValue,
    ) -> Result<(), EtcdError> {
        let mut client = self.session.client();
        let body = serde_json::to_vec(&value).unwrap_or_default();
        let response = self
            .session
            .bounded(client.put(self.path(account, resource), body, None))
            .await?;
        self.catch_up(response.header().map_or(0, |h| h.revision()))
            .await;
        Ok(())
    }

    /// Deletes a stored limit; whether there was one.
    pub async fn delete(&self, account: &str, resource: &str) -> Result<bool, EtcdError> {
        let path = self.path(account, resource);
        let txn = Txn::new()
            .when([Compare::version(path.clone(), CompareOp::Greater, 0)])
            .and_then([TxnOp::delete(path, None)]);
        let mut client = self.session.client();
        let response = self.session.bounded(client.txn(txn)).await?;
        if response.succeeded() {
            self.catch_up(response.header().map_or(0, |h| h.revision()))
                .await;
        }
        Ok(response.succeeded())
    }

    fn path(&self, account: &str, resource: &str) -> String {
        self.session
            .key(&format!("limiter/limits/{account}/{resource}"))
    }

    async fn catch_up(&self, revision: i64) {
        if !self.mirror.wait_for(revision, CATCH_UP).await {
            tracing::warn!(revision, "limit mirror is behind etcd");
        }
    }
}

fn apply(map: &mut BTreeMap<(String, String), LimitValue>, prefix: &str, update: MirrorUpdate) {
    let parse_key = |raw: &[u8]| {
        let text = std::str::from_utf8(raw).ok()?.strip_prefix(prefix)?;
        let (account, resource) = text.split_once('/')?;
        Some((account.to_owned(), resource.to_owned()))
    };
    match update {
        MirrorUpdate::Reset { kvs, .. } => {
            map.clear();
            for kv in kvs {
                if let (Some(key), Ok(value)) =
                    (parse_key(kv.key()), serde_json::from_slice(kv.value()))
                {
                    map.insert(key, value);
                }
            }
        }
        MirrorUpdate::Put(kv) => match (parse_key(kv.key()), serde_json::from_slice(kv.value())) {
            (Some(key), Ok(value)) => {
                map.insert(key, value);
            }
            _ => tracing::warn!(key = ?kv.key_str(), "ignoring unreadable limit record"),
        },
        MirrorUpdate::Delete(kv) => {
            if let Some(key) = parse_key(kv.key()) {
                map.remove(&key);
            }
        }
    }
}

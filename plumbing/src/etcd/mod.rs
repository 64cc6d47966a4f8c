//! The etcd session every service holds: a client over several endpoints, the deployment's
//! key prefix, per-call deadlines, and the two things etcd-client does not do by itself —
//! keeping a lease alive ([`lease`]) and keeping a watch alive across etcd restarts
//! ([`watch`]).
//!
//! No call here sets a channel-wide gRPC timeout: etcd would apply it to watch and
//! keep-alive streams too and cut them. Unary calls are bounded with [`EtcdSession::bounded`].

pub mod lease;
pub mod watch;

use std::future::Future;
use std::time::Duration;

use etcd_client::{Client, ConnectOptions, GetOptions};

pub use lease::{Lease, LeaseLost};
pub use watch::{Mirror, MirrorUpdate, WatchItem, WatchSpec, follow};

/// How long one unary etcd call may take before the caller gets [`EtcdError::Unavailable`].
pub const CALL_DEADLINE: Duration = Duration::from_secs(5);

/// Why an etcd operation failed, classified so callers map it to a gRPC code without
/// looking at message text.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// etcd could not be reached, or did not answer before the deadline.
    #[error("etcd unavailable: {0}")]
    Unavailable(String),
    /// The requested revision has been compacted away; the caller must resnapshot.
    #[error("revision {requested} is compacted (oldest available is {compact_revision})")]
    Compacted {
        /// What the caller asked for.
        requested: i64,
        /// The oldest revision etcd still has.
        compact_revision: i64,
    },
    /// A stored value could not be decoded.
    #[error("corrupt record at {key}: {reason}")]
    Corrupt {
        /// The etcd key.
        key: String,
        /// What was wrong.
        reason: String,
    },
}

impl From<etcd_client::Error> for EtcdError {
    fn from(err: etcd_client::Error) -> Self {
        EtcdError::Unavailable(err.to_string())
    }
}

/// A connected etcd client plus the key prefix of this deployment.
#[derive(Clone)]
pub struct EtcdSession {
    client: Client,
    prefix: String,
}

impl std::fmt::Debug for EtcdSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdSession")
            .field("prefix", &self.prefix)
            .finish()
    }
}

impl EtcdSession {
    /// Connects to any of `endpoints` (requests are balanced over them and fail over when
    /// one goes away). `prefix` is normalised to have no trailing slash.
    pub async fn connect(endpoints: &[String], prefix: &str) -> Result<Self, EtcdError> {
        let options = ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_keep_alive(Duration::from_secs(3), Duration::from_secs(3))
            .with_keep_alive_while_idle(true);
        let client = tokio::time::timeout(CALL_DEADLINE, Client::connect(endpoints, Some(options)))
            .await
            .map_err(|_| {
                EtcdError::Unavailable(format!(
                    "no answer from {endpoints:?} within {CALL_DEADLINE:?}"
                ))
            })??;
        let session = Self {
            client,
            prefix: prefix.trim_end_matches('/').to_owned(),
        };
        // Connecting is lazy: ask for the cluster revision once so a wrong address fails here.
        session.current_revision().await?;
        Ok(session)
    }

    /// A clone of the underlying client (cheap; clients share one channel).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    /// The deployment prefix, without trailing slash (e.g. `/switchboard`).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<prefix>/<path>`.
    pub fn key(&self, path: &str) -> String {
        format!("{}/{}", self.prefix, path.trim_start_matches('/'))
    }

    /// Runs one etcd call under [`CALL_DEADLINE`], mapping a timeout to `Unavailable`.
    pub async fn bounded<T, F>(&self, call: F) -> Result<T, EtcdError>
    where
        F: Future<Output = Result<T, etcd_client::Error>>,
    {
        match tokio::time::timeout(CALL_DEADLINE, call).await {
            Ok(result) => result.map_err(EtcdError::from),
            Err(_) => Err(EtcdError::Unavailable(format!(
                "etcd did not answer within {CALL_DEADLINE:?}"
            ))),
        }
    }

    /// The cluster's current revision (a serializable read: cheap, may lag the leader).
    pub async fn current_revision(&self) -> Result<i64, EtcdError> {
        let mut client = self.client.clone();
        let options = GetOptions::new().with_keys_only().with_limit(1);
        let response = self
            .bounded(client.get(self.key("~revision"), Some(options)))
            .await?;
        Ok(response.header().map_or(0, |h| h.revision()))
    }
}

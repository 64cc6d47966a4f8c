//! The etcd session every service holds: a client over several endpoints, the deployment's
//! key prefix, per-call deadlines, and the two things etcd-client does not do by itself —
//! keeping a lease alive ([`lease`]) and keeping a watch alive across etcd restarts
//! ([`watch`]).
//!
//! No call here sets a channel-wide gRPC timeout: etcd would apply it to watch and
//! keep-alive streams too and cut them. Unary calls are bounded with [`EtcdSession::bounded`]
//! (one attempt) or [`EtcdSession::retry`] (requests that are safe to repeat, each attempt
//! under [`ATTEMPT_DEADLINE`], again on the member then preferred).
//!
//! With several endpoints, [`EtcdSession::client`] answers the client of a member that
//! answers its health probes, the leader first (see `members`), so a member that is down
//! or stopped is skipped until it answers again.
//!
//! Every client a session makes counts its requests in the session's [`RoundTrips`]
//! (`switchboard_etcd_*` metrics).

pub mod lease;
mod members;
pub mod options;
pub mod round_trips;
pub mod watch;

use std::future::Future;
use std::time::Duration;

use etcd_client::{Client, GetOptions};
use tonic::Code;

pub use lease::{Lease, LeaseLost};
pub use options::{EtcdArgs, EtcdConfigError, EtcdCredentials, EtcdOptions, EtcdPassword, EtcdTls};
pub use round_trips::RoundTrips;
pub use watch::{Mirror, MirrorUpdate, WatchItem, WatchSpec, follow};

/// How long one unary etcd call may take before the caller gets [`EtcdError::Unavailable`].
pub const CALL_DEADLINE: Duration = Duration::from_secs(5);
/// How long one attempt of a repeatable request may take before it is tried again: well
/// under a caller's deadline, and longer than a healthy etcd ever needs on a LAN. A request
/// sent to a leader that just died is given up after this, not after etcd's own 7 s.
pub const ATTEMPT_DEADLINE: Duration = Duration::from_millis(1000);
/// First pause between attempts; it doubles up to [`RETRY_PAUSE_MAX`].
const RETRY_PAUSE: Duration = Duration::from_millis(50);
const RETRY_PAUSE_MAX: Duration = Duration::from_millis(400);

/// Why an etcd operation failed, classified so callers match on it (and map it to a gRPC
/// code) without looking at message text. [`EtcdError::is_retryable`] says which ones a
/// later attempt may cure.
#[derive(Debug, Clone, thiserror::Error)]
pub enum EtcdError {
    /// etcd could not be reached, or did not answer before the deadline. Retryable; for a
    /// write, whether it applied is unknown.
    #[error("etcd unavailable: {0}")]
    Unavailable(String),
    /// The request named a lease etcd does not have (it expired or was revoked): the
    /// caller must take a new lease before writing under one again.
    #[error("etcd lease not found: {0}")]
    LeaseNotFound(String),
    /// etcd refused the request (permission denied, invalid request, a size limit…): the
    /// same request will be refused again.
    #[error("etcd refused the request ({code:?}): {message}")]
    Refused {
        /// etcd's gRPC code.
        code: tonic::Code,
        /// etcd's message.
        message: String,
    },
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

/// Why [`EtcdSession::connect`] failed; each says which flag to look at. None of them
/// carries the password (etcd's own messages do not contain it either).
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The flags are half-configured or name an unusable file.
    #[error(transparent)]
    Config(#[from] EtcdConfigError),
    /// No endpoint answered (down, wrong address, or a TLS mismatch — see `reason`).
    #[error("etcd at {endpoints} unreachable (--etcd, --etcd-ca): {reason}")]
    Unreachable {
        /// The endpoints tried.
        endpoints: String,
        /// The transport's explanation, with its causes.
        reason: String,
    },
    /// etcd refused the user name or password.
    #[error(
        "etcd refused the login of user `{user}` (--etcd-user, and the password from \
         SWITCHBOARD_ETCD_PASSWORD or --etcd-password-file): {reason}"
    )]
    LoginRefused {
        /// The user name given.
        user: String,
        /// etcd's answer.
        reason: String,
    },
    /// etcd has authentication enabled, no user was given, and etcd refused the access.
    #[error(
        "etcd has authentication on and refused access without --etcd-user: give --etcd-user \
         and its password, or a client certificate (--etcd-cert) whose common name is an etcd \
         user with readwrite on the prefix ({reason})"
    )]
    LoginRequired {
        /// etcd's answer.
        reason: String,
    },
    /// The user may not read and write the deployment's prefix.
    #[error(
        "etcd user `{user}` has no permission on the key prefix `{prefix}` (--etcd-prefix): \
         grant its role readwrite on that prefix ({reason})"
    )]
    PermissionDenied {
        /// The user logged in as.
        user: String,
        /// The deployment prefix.
        prefix: String,
        /// etcd's answer.
        reason: String,
    },
}

/// Why [`EtcdSession::retry_raw`] gave up.
#[derive(Debug)]
pub enum Retried {
    /// etcd answered with an error a retry would repeat.
    Refused(etcd_client::Error),
    /// No attempt was answered within the budget (or each failed transiently): the
    /// request's outcome is unknown.
    Unanswered(String),
}

/// Whether etcd-client's `err` is transient: the member could not be reached, had no
/// leader, lost its leader mid-request, or timed out. Refusals (permissions, bad requests,
/// compaction) are not.
pub fn is_transient(err: &etcd_client::Error) -> bool {
    match err {
        etcd_client::Error::GRpcStatus(status) => matches!(
            status.code(),
            Code::Unavailable | Code::DeadlineExceeded | Code::Aborted | Code::Cancelled
        ),
        etcd_client::Error::TransportError(_)
        | etcd_client::Error::IoError(_)
        | etcd_client::Error::LeaseKeepAliveError(_)
        | etcd_client::Error::WatchError(_) => true,
        _ => false,
    }
}

impl EtcdError {
    /// Whether the same request may succeed when sent again (etcd was unreachable or
    /// leaderless). A lost lease, a refusal or a corrupt record are not cured by retrying.
    pub fn is_retryable(&self) -> bool {
        matches!(self, EtcdError::Unavailable(_))
    }
}

/// The end of the etcd range covering every key that starts with `prefix`: the prefix with
/// its last byte below 0xff incremented (trailing 0xff bytes dropped); `\0` — "to the end
/// of the keyspace" — when every byte is 0xff.
pub fn prefix_end(prefix: impl AsRef<[u8]>) -> Vec<u8> {
    let mut end = prefix.as_ref().to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// Whether etcd said the lease named by a request (or a keep-alive) does not exist: it
/// answers NOT_FOUND "requested lease not found", and the keep-alive stream reports it as
/// text. The one place that reads etcd's message text for it.
pub(crate) fn is_lease_not_found(err: &etcd_client::Error) -> bool {
    match err {
        etcd_client::Error::LeaseKeepAliveError(message) => message.contains("not found"),
        etcd_client::Error::GRpcStatus(status) => {
            status.code() == Code::NotFound && status.message().contains("lease")
        }
        _ => false,
    }
}

impl From<etcd_client::Error> for EtcdError {
    fn from(err: etcd_client::Error) -> Self {
        if is_lease_not_found(&err) {
            return EtcdError::LeaseNotFound(err.to_string());
        }
        match &err {
            // Only a definite refusal; anything else (UNKNOWN is how a broken transport
            // surfaces) may not recur.
            etcd_client::Error::GRpcStatus(status)
                if matches!(
                    status.code(),
                    Code::InvalidArgument
                        | Code::PermissionDenied
                        | Code::Unauthenticated
                        | Code::FailedPrecondition
                        | Code::OutOfRange
                        | Code::NotFound
                        | Code::AlreadyExists
                        | Code::ResourceExhausted
                        | Code::Unimplemented
                ) =>
            {
                EtcdError::Refused {
                    code: status.code(),
                    message: status.message().to_owned(),
                }
            }
            _ => EtcdError::Unavailable(err.to_string()),
        }
    }
}

/// A connected etcd client plus the key prefix of this deployment.
#[derive(Clone)]
pub struct EtcdSession {
    client: Client,
    members: Option<std::sync::Arc<members::Members>>,
    prefix: String,
    authenticated: bool,
    round_trips: RoundTrips,
}

impl std::fmt::Debug for EtcdSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdSession")
            .field("prefix", &self.prefix)
            .field("authenticated", &self.authenticated)
            .finish()
    }
}

impl EtcdSession {
    /// Connects to any of the endpoints (requests are balanced over them and fail over when
    /// one goes away), over TLS and logged in when the options say so, and proves access by
    /// reading under the prefix. The prefix is normalised to have no trailing slash.
    pub async fn connect(options: &EtcdOptions) -> Result<Self, ConnectError> {
        let endpoints = options.endpoints.join(",");
        // A plain client talking to a TLS etcd only hears "transport error": say what to try.
        let hint = match options.tls {
            None => " (if etcd serves TLS: https:// endpoints and --etcd-ca)",
            Some(_) => "",
        };
        let unreachable = |reason: String| ConnectError::Unreachable {
            endpoints: endpoints.clone(),
            reason: format!("{reason}{hint}"),
        };
        let connect_options = options
            .connect_options()
            .with_connect_timeout(Duration::from_secs(3))
            .with_keep_alive(Duration::from_secs(3), Duration::from_secs(3))
            .with_keep_alive_while_idle(true);
        let user = options.credentials.as_ref().map(|c| c.user.clone());
        let round_trips = RoundTrips::default();
        let client = tokio::time::timeout(
            CALL_DEADLINE,
            Client::connect_with_balanced_channel(
                &options.endpoints,
                Some(connect_options.clone()),
                round_trips.clone(),
            ),
        )
        .await
        .map_err(|_| unreachable(format!("no answer within {CALL_DEADLINE:?}")))?
        .map_err(|err| match (&user, login_refusal(&err)) {
            // With a user, connecting logs in; its refusal is the only non-transport error.
            (Some(user), Some(reason)) => ConnectError::LoginRefused {
                user: user.clone(),
                reason,
            },
            _ => unreachable(describe(&err)),
        })?;
        let session = Self {
            client,
            members: members::Members::start(
                &options.endpoints,
                connect_options.clone(),
                round_trips.clone(),
            ),
            prefix: options.prefix.trim_end_matches('/').to_owned(),
            authenticated: user.is_some(),
            round_trips,
        };
        // Connecting is lazy: read once under the prefix so that a wrong address, a TLS
        // mismatch or a missing permission fails here rather than on the first request.
        let mut client = session.client.clone();
        let probe = GetOptions::new().with_keys_only().with_limit(1);
        match tokio::time::timeout(
            CALL_DEADLINE,
            client.get(session.key("~revision"), Some(probe)),
        )
        .await
        {
            Ok(Ok(_)) => Ok(session),
            Err(_) => Err(unreachable(format!("no answer within {CALL_DEADLINE:?}"))),
            Ok(Err(err)) => Err(match status_of(&err) {
                Some(status) => probe_refusal(status, user, &session.prefix)
                    .unwrap_or_else(|| unreachable(describe(&err))),
                None => unreachable(describe(&err)),
            }),
        }
    }

    /// Logs in again, replacing the client's auth token (a no-op without a user). Calls
    /// refresh an expired token by themselves; streams are opened with the token current
    /// at the time, so [`lease`] and [`watch`] call this when etcd refuses theirs.
    pub async fn refresh_login(&self) {
        if !self.authenticated {
            return;
        }
        match tokio::time::timeout(CALL_DEADLINE, self.client.refresh_token()).await {
            Ok(Ok(())) => tracing::info!("etcd login refreshed"),
            Ok(Err(err)) => tracing::warn!(error = %err, "etcd login refresh failed"),
            Err(_) => tracing::warn!("etcd login refresh timed out"),
        }
    }

    /// A client for the next request or stream (cheap to clone): the one of the member
    /// preferred now (the leader if it answers its probes, else any member that does);
    /// with one endpoint, or before any probe answered, the client balanced over all.
    pub fn client(&self) -> Client {
        self.members
            .as_ref()
            .and_then(|m| m.pick())
            .unwrap_or_else(|| self.client.clone())
    }

    /// Runs a request that is safe to send more than once (a read, a txn whose compares
    /// make a repeat harmless, a lease grant whose spare lease just expires) until it
    /// answers, each attempt under [`ATTEMPT_DEADLINE`] on the member preferred at that
    /// moment, pausing 50 ms (doubling to 400 ms) between attempts. Gives up with
    /// [`EtcdError::Unavailable`] once `budget` has passed, or at once on an error a retry
    /// would repeat. `call` builds the request afresh for each attempt.
    pub async fn retry<T, F, Fut>(&self, budget: Duration, call: F) -> Result<T, EtcdError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        self.retry_raw(budget, call)
            .await
            .map_err(|failure| match failure {
                Retried::Refused(err) => EtcdError::from(err),
                Retried::Unanswered(text) => EtcdError::Unavailable(text),
            })
    }

    /// [`Self::retry`], handing back etcd's refusal itself (to match on its code).
    pub async fn retry_raw<T, F, Fut>(&self, budget: Duration, mut call: F) -> Result<T, Retried>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let until = tokio::time::Instant::now() + budget;
        let mut pause = RETRY_PAUSE;
        loop {
            let attempt = tokio::time::timeout(ATTEMPT_DEADLINE, call(self.client())).await;
            let failure = match attempt {
                Ok(Ok(answer)) => return Ok(answer),
                Ok(Err(err)) if !is_transient(&err) => return Err(Retried::Refused(err)),
                Ok(Err(err)) => err.to_string(),
                Err(_) => format!("etcd did not answer within {ATTEMPT_DEADLINE:?}"),
            };
            if tokio::time::Instant::now() + pause >= until {
                return Err(Retried::Unanswered(format!(
                    "{failure} (retried for {budget:?})"
                )));
            }
            tracing::debug!(error = %failure, "etcd request failed; retrying");
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(RETRY_PAUSE_MAX);
        }
    }

    /// The counts and latencies of this session's etcd requests (see [`round_trips`]).
    pub fn round_trips(&self) -> &RoundTrips {
        &self.round_trips
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

/// The gRPC status etcd answered with, if the failure is one.
fn status_of(err: &etcd_client::Error) -> Option<&tonic::Status> {
    match err {
        etcd_client::Error::GRpcStatus(status) => Some(status),
        _ => None,
    }
}

/// What etcd's refusal of the start-up read under the prefix means; `None` when it is not
/// about the login or permissions.
fn probe_refusal(
    status: &tonic::Status,
    user: Option<String>,
    prefix: &str,
) -> Option<ConnectError> {
    let reason = status.message().to_owned();
    match (status.code(), user) {
        // Without a login etcd goes by the client certificate's common name, if any.
        (Code::InvalidArgument | Code::Unauthenticated | Code::PermissionDenied, None) => {
            Some(ConnectError::LoginRequired { reason })
        }
        (Code::PermissionDenied, Some(user)) => Some(ConnectError::PermissionDenied {
            user,
            prefix: prefix.to_owned(),
            reason,
        }),
        (Code::Unauthenticated, Some(user)) => Some(ConnectError::LoginRefused { user, reason }),
        _ => None,
    }
}

/// etcd refused the auth token a call or stream carried (expired, or forgotten by a
/// restarted etcd).
pub(crate) fn is_refused_login(err: &etcd_client::Error) -> bool {
    status_of(err).is_some_and(|status| status.code() == Code::Unauthenticated)
}

/// etcd's reason for refusing a login, if that is what `err` is (rather than a transport
/// failure, which etcd-client also reports as a status, with code UNAVAILABLE).
fn login_refusal(err: &etcd_client::Error) -> Option<String> {
    let status = status_of(err)?;
    matches!(
        status.code(),
        Code::InvalidArgument
            | Code::Unauthenticated
            | Code::PermissionDenied
            | Code::FailedPrecondition
    )
    .then(|| status.message().to_owned())
}

/// An error with its chain of causes: tonic's transport errors say only "transport error"
/// at the top, the useful part (refused, TLS handshake) is in the sources.
fn describe(err: &etcd_client::Error) -> String {
    let (mut text, mut source) = match status_of(err) {
        Some(status) => (
            format!("{:?}: {}", status.code(), status.message()),
            std::error::Error::source(status),
        ),
        None => (err.to_string(), std::error::Error::source(err)),
    };
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: Code, message: &str) -> etcd_client::Error {
        etcd_client::Error::GRpcStatus(tonic::Status::new(code, message))
    }

    #[test]
    fn a_prefix_range_ends_after_every_key_with_the_prefix() {
        assert_eq!(prefix_end("a/b/"), b"a/b0");
        assert_eq!(prefix_end([b'a', 0xff]), b"b");
        assert_eq!(prefix_end([0xff, 0xff]), [0]);
        assert_eq!(prefix_end(""), [0]);
    }

    #[test]
    fn etcd_errors_are_classified_by_kind_and_only_unavailable_is_retryable() {
        let lost = EtcdError::from(status(
            Code::NotFound,
            "etcdserver: requested lease not found",
        ));
        assert!(matches!(lost, EtcdError::LeaseNotFound(_)), "{lost:?}");
        let lost = EtcdError::from(etcd_client::Error::LeaseKeepAliveError(
            "lease not found".into(),
        ));
        assert!(matches!(lost, EtcdError::LeaseNotFound(_)), "{lost:?}");
        assert!(!lost.is_retryable());

        let down = EtcdError::from(status(Code::Unavailable, "etcdserver: no leader"));
        assert!(matches!(down, EtcdError::Unavailable(_)), "{down:?}");
        assert!(down.is_retryable());

        let broken = EtcdError::from(status(Code::Unknown, "transport error"));
        assert!(matches!(broken, EtcdError::Unavailable(_)), "{broken:?}");
        let refused = EtcdError::from(status(Code::PermissionDenied, "permission denied"));
        assert!(
            matches!(
                refused,
                EtcdError::Refused {
                    code: Code::PermissionDenied,
                    ..
                }
            ),
            "{refused:?}"
        );
        assert!(!refused.is_retryable());
        let other = EtcdError::from(status(Code::NotFound, "key not found"));
        assert!(matches!(other, EtcdError::Refused { .. }), "{other:?}");
    }
}

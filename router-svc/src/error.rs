//! The one place where router-svc errors become `tonic::Status`.

use plumbing::auth::AuthError;
use plumbing::etcd::EtcdError;
use plumbing::status;
use plumbing::validate::FieldError;
use tonic::Status;

/// Everything a router-svc handler can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Token or permission problem.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// A request field broke a rule.
    #[error(transparent)]
    Invalid(#[from] FieldError),
    /// etcd failure.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// The account has no application for this address.
    #[error("account `{account}` has no application for address `{address}`")]
    NoApplication {
        /// The account.
        account: String,
        /// The address asked for.
        address: String,
    },
    /// No such communication (never routed, or past its retention).
    #[error("communication `{0}` not found (unknown, or ended longer ago than the retention)")]
    NoCommunication(String),
    /// Route was retried with an id whose communication has other from/to/channel.
    #[error(
        "communication `{0}` already exists with a different from, to or channel; use a new communication_id"
    )]
    Conflict(String),
    /// Concurrent writers kept changing the same record.
    #[error("{0} was changed concurrently too often; retry")]
    Contended(&'static str),
    /// The replica that owns a live communication could not be reached.
    #[error(
        "the router replica at {address} that owns this communication is unreachable: {reason}"
    )]
    OwnerUnavailable {
        /// Its address.
        address: String,
        /// What went wrong.
        reason: String,
    },
    /// The owning replica answered with this status.
    #[error("{}", .0.message())]
    Peer(Status),
    /// A new application would exceed the per-account cap.
    #[error(
        "account `{account}` already has {limit} applications, the per-account limit (--max-applications-per-account); delete one first"
    )]
    ApplicationLimit {
        /// The account.
        account: String,
        /// The cap.
        limit: usize,
    },
    /// The account holds its cap of something on this replica (watches).
    #[error(transparent)]
    Quota(#[from] plumbing::quota::QuotaFull),
    /// The router is stopping.
    #[error("the router is shutting down; retry on another replica")]
    ShuttingDown,
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        match err {
            Error::Auth(e) => status::from_auth(e),
            Error::Invalid(e) => status::from_field(e),
            Error::Etcd(e) => status::from_etcd(e),
            e @ (Error::NoApplication { .. } | Error::NoCommunication(_)) => {
                Status::not_found(e.to_string())
            }
            e @ Error::Conflict(_) => Status::already_exists(e.to_string()),
            e @ Error::Contended(_) => Status::aborted(e.to_string()),
            e @ (Error::OwnerUnavailable { .. } | Error::ShuttingDown) => {
                Status::unavailable(e.to_string())
            }
            e @ (Error::ApplicationLimit { .. } | Error::Quota(_)) => {
                Status::resource_exhausted(e.to_string())
            }
            Error::Peer(status) => status,
        }
    }
}

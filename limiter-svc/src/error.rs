//! The one place where limiter-svc errors become `tonic::Status`.

use plumbing::auth::AuthError;
use plumbing::etcd::EtcdError;
use plumbing::status;
use plumbing::validate::FieldError;
use tonic::Status;

use crate::engine::EngineError;

/// Metadata key on an UNAVAILABLE answer whose operation may or may not have applied (an
/// etcd txn with an unknown outcome): forwarding replicas must not retry it blindly.
pub const OUTCOME_UNKNOWN: &str = "switchboard-outcome-unknown";

/// Everything a limiter-svc handler can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Token or permission problem.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// A request field broke a rule.
    #[error(transparent)]
    Invalid(#[from] FieldError),
    /// etcd failure outside the engine (limits).
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// The engine refused.
    #[error(transparent)]
    Engine(#[from] EngineError),
    /// No replica owned the key's shard within the routing deadline.
    #[error(
        "no limiter replica owns shard {0} right now (an owner crashed or is taking over); retry"
    )]
    NoOwner(u16),
    /// The key is unlimited: no limit applies.
    #[error("no limit applies to account `{account}`, resource `{resource}` (unlimited)")]
    NoLimit {
        /// Account.
        account: String,
        /// Resource.
        resource: String,
    },
    /// Peers cannot be reached without a platform secret to sign relay calls.
    #[error(
        "this key is owned by another replica, and replicas need --platform-secret to call each other"
    )]
    NoPeerCredentials,
    /// The owning replica answered with this status.
    #[error("{}", .0.message())]
    Peer(Status),
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        match err {
            Error::Auth(e) => status::from_auth(e),
            Error::Invalid(e) => status::from_field(e),
            Error::Etcd(e) => status::from_etcd(e),
            Error::Engine(e @ EngineError::NotOwner(_)) => Status::aborted(e.to_string()),
            Error::Engine(e @ EngineError::NotFound) => Status::not_found(e.to_string()),
            Error::Engine(e @ EngineError::Unavailable(_)) => {
                let mut status =
                    Status::unavailable(format!("{e}; retry with the same request_id"));
                status.metadata_mut().insert(
                    OUTCOME_UNKNOWN,
                    tonic::metadata::MetadataValue::from_static("1"),
                );
                status
            }
            e @ (Error::NoOwner(_) | Error::NoPeerCredentials) => {
                Status::unavailable(e.to_string())
            }
            e @ Error::NoLimit { .. } => Status::not_found(e.to_string()),
            Error::Peer(status) => status,
        }
    }
}

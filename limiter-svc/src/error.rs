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

impl Error {
    /// Why an Acquire failing with this error is a fault of the service rather than of the
    /// request (`None` for refusals of the caller: tokens, fields, unknown slots); one of
    /// [`crate::stats::FAULTS`].
    pub fn fault(&self) -> Option<&'static str> {
        match self {
            Error::Engine(EngineError::Unavailable(_)) => Some("unavailable"),
            Error::Engine(EngineError::NotOwner(_)) => Some("not_owner"),
            Error::NoOwner(_) => Some("no_owner"),
            Error::Etcd(_) => Some("etcd"),
            Error::NoPeerCredentials => Some("no_peer_credentials"),
            Error::Peer(status) => matches!(
                status.code(),
                tonic::Code::Unavailable
                    | tonic::Code::Aborted
                    | tonic::Code::DeadlineExceeded
                    | tonic::Code::Internal
                    | tonic::Code::Unknown
            )
            .then_some("peer"),
            Error::Auth(_)
            | Error::Invalid(_)
            | Error::Engine(EngineError::NotFound)
            | Error::NoLimit { .. } => None,
        }
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_are_told_from_refusals_and_named_as_the_metric_expects() {
        let faults = [
            Error::Engine(EngineError::Unavailable("etcd down".into())),
            Error::Engine(EngineError::NotOwner(3)),
            Error::NoOwner(3),
            Error::Etcd(EtcdError::Unavailable("etcd down".into())),
            Error::Peer(Status::unavailable("owner down")),
            Error::NoPeerCredentials,
        ];
        let reasons: Vec<_> = faults.iter().filter_map(Error::fault).collect();
        assert_eq!(reasons, crate::stats::FAULTS);
        let refusals = [
            Error::Engine(EngineError::NotFound),
            Error::Peer(Status::invalid_argument("bad resource")),
            Error::NoLimit {
                account: "AC1".into(),
                resource: "calls".into(),
            },
        ];
        assert!(refusals.iter().all(|e| e.fault().is_none()));
    }
}

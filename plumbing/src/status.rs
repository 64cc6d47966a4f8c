//! Where plumbing errors become `tonic::Status`. Each service maps its own error type in
//! one place and defers to these for the kinds it wraps.

use tonic::{Code, Status};

use crate::auth::{AuthError, KeyError};
use crate::etcd::EtcdError;
use crate::validate::FieldError;

/// UNAUTHENTICATED for token problems, PERMISSION_DENIED for scope/account problems,
/// INVALID_ARGUMENT when a platform token does not name an account.
pub fn from_auth(err: AuthError) -> Status {
    let code = match &err {
        AuthError::AccountRequired => Code::InvalidArgument,
        e if e.is_permission() => Code::PermissionDenied,
        _ => Code::Unauthenticated,
    };
    Status::new(code, err.to_string())
}

/// UNAVAILABLE when etcd is unreachable or the replica's lease went away (it takes a new
/// one; a retry is served), OUT_OF_RANGE for compacted revisions, INTERNAL for unreadable
/// records and for requests etcd refuses (the deployment's etcd permissions or limits).
pub fn from_etcd(err: EtcdError) -> Status {
    match err {
        EtcdError::Unavailable(_) | EtcdError::LeaseNotFound(_) => {
            Status::unavailable(err.to_string())
        }
        EtcdError::Refused { .. } => Status::internal(err.to_string()),
        EtcdError::Compacted { .. } => Status::out_of_range(format!(
            "{err}; resnapshot and resume from the new revision"
        )),
        EtcdError::Corrupt { .. } => Status::internal(err.to_string()),
    }
}

/// INVALID_ARGUMENT naming the field and the rule.
pub fn from_field(err: FieldError) -> Status {
    Status::invalid_argument(err.to_string())
}

/// NOT_FOUND, INVALID_ARGUMENT or the etcd mapping.
pub fn from_key(err: KeyError) -> Status {
    match err {
        KeyError::NotFound(_) => Status::not_found(err.to_string()),
        KeyError::Invalid(e) => from_field(e),
        KeyError::Etcd(e) => from_etcd(e),
    }
}

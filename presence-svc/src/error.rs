//! The one place where presence-svc errors become `tonic::Status`.

use plumbing::auth::{AuthError, KeyError};
use plumbing::etcd::EtcdError;
use plumbing::status;
use plumbing::validate::FieldError;
use tonic::Status;

/// Everything a presence-svc handler can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Token or permission problem.
    #[error(transparent)]
    Auth(#[from] AuthError),
    /// A request field broke a rule.
    #[error(transparent)]
    Invalid(#[from] FieldError),
    /// Key store failure.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// etcd failure.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        match err {
            Error::Auth(e) => status::from_auth(e),
            Error::Invalid(e) => status::from_field(e),
            Error::Key(e) => status::from_key(e),
            Error::Etcd(e) => status::from_etcd(e),
        }
    }
}

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
    /// The device has no record (never present, expired, or removed).
    #[error("device `{device_id}` of identity `{identity}` is not present")]
    DeviceNotFound {
        /// The identity.
        identity: String,
        /// The device.
        device_id: String,
    },
    /// The operation applies to TTL registrations, and a live stream holds the device.
    #[error(
        "device `{device_id}` of identity `{identity}` is held by a live Connect stream; {hint}"
    )]
    HeldByStream {
        /// The identity.
        identity: String,
        /// The device.
        device_id: String,
        /// What to do instead.
        hint: &'static str,
    },
    /// An offer went to a device present by TTL registration, which has no session.
    #[error(
        "device `{device_id}` of identity `{identity}` is registered by TTL and has no live session to offer to; reach it at its contact"
    )]
    NoLiveSession {
        /// The identity.
        identity: String,
        /// The device.
        device_id: String,
    },
    /// A new device would exceed the per-identity device limit (reject-newest policy).
    #[error(
        "identity `{identity}` already has {limit} devices, the limit; unregister one or close its stream first"
    )]
    DeviceLimit {
        /// The identity.
        identity: String,
        /// The limit.
        limit: usize,
    },
    /// A new device would exceed the per-account device limit.
    #[error(
        "account `{account}` already has {limit} devices present, the per-account limit (--max-devices-per-account); unregister one or close its stream first"
    )]
    AccountDeviceLimit {
        /// The account.
        account: String,
        /// The limit.
        limit: usize,
    },
    /// The account holds its cap of something on this replica (watches).
    #[error(transparent)]
    Quota(#[from] plumbing::quota::QuotaFull),
    /// Concurrent changes to the same identity kept a transaction from applying.
    #[error("identity `{identity}` changed concurrently too often; retry")]
    Contention {
        /// The identity.
        identity: String,
    },
    /// The cache did not reach `min_revision` in time.
    #[error(
        "min_revision {wanted} not reached: this replica's presence cache is at revision {current}"
    )]
    NotCaughtUp {
        /// What the caller asked for.
        wanted: i64,
        /// Where the cache is.
        current: i64,
    },
    /// The device's session ended while an offer was being handed to it.
    #[error("the device's live session has just ended")]
    SessionGone,
    /// The device's session did not take an offer in time (its client is not reading).
    #[error("the device's session did not take the offer in time; its client is not reading")]
    SessionStalled,
    /// An offer id already open on the session.
    #[error("offer `{0}` is already open on this device's session")]
    DuplicateOffer(String),
    /// An answer would exceed the message size clients accept.
    #[error(
        "the answer would be {size} bytes, over the {limit}-byte limit; ask for fewer identities"
    )]
    TooLarge {
        /// Its encoded size.
        size: usize,
        /// The limit.
        limit: usize,
    },
    /// The session lost its device record to a newer Connect or to eviction.
    #[error("session ended: {0}")]
    Displaced(&'static str),
    /// The replica is stopping.
    #[error("this presence replica is shutting down; {0}")]
    ShuttingDown(&'static str),
    /// Another presence replica could not be reached.
    #[error("presence replica {address} cannot be reached: {reason}")]
    PeerUnavailable {
        /// Its address.
        address: String,
        /// Why.
        reason: String,
    },
    /// A gRPC status passed through as it is: the answer of another presence replica, or
    /// the error of a client's broken stream.
    #[error("{}", .0.message())]
    Passthrough(Status),
    /// The revision a watch starts (or resumes) from was compacted.
    #[error(
        "revision {requested} has been compacted (the oldest available revision is {compact_revision}); watch again with snapshot = true"
    )]
    Compacted {
        /// What the caller asked for.
        requested: i64,
        /// The oldest revision etcd still has.
        compact_revision: i64,
    },
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        let message = err.to_string();
        match err {
            Error::Auth(e) => status::from_auth(e),
            Error::Invalid(e) => status::from_field(e),
            Error::Key(e) => status::from_key(e),
            Error::Etcd(e) => status::from_etcd(e),
            Error::DeviceNotFound { .. } | Error::SessionGone => Status::not_found(message),
            Error::HeldByStream { .. } | Error::NoLiveSession { .. } => {
                Status::failed_precondition(message)
            }
            Error::DeviceLimit { .. }
            | Error::AccountDeviceLimit { .. }
            | Error::Quota(_)
            | Error::TooLarge { .. } => Status::resource_exhausted(message),
            Error::Contention { .. } | Error::Displaced(_) => Status::aborted(message),
            Error::NotCaughtUp { .. } => Status::deadline_exceeded(message),
            Error::DuplicateOffer(_) => Status::already_exists(message),
            Error::ShuttingDown(_) | Error::PeerUnavailable { .. } | Error::SessionStalled => {
                Status::unavailable(message)
            }
            Error::Passthrough(status) => status,
            Error::Compacted { .. } => Status::out_of_range(message),
        }
    }
}

//! Calls about a communication that another router replica runs go to that replica (the
//! owner named in the record), once: the forwarded call carries [`FORWARDED`] so that the
//! owner never forwards it again.

use proto::router::v1 as pb;
use tonic::Request;
use tonic::metadata::MetadataValue;

use crate::api::WatchStream;
use crate::error::Error;
use crate::peers::{FORWARDED, Peers};

fn marked<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    request
        .metadata_mut()
        .insert(FORWARDED, MetadataValue::from_static("1"));
    request
}

fn unavailable(owner: &str, reason: impl ToString) -> Error {
    Error::OwnerUnavailable {
        address: owner.to_owned(),
        reason: reason.to_string(),
    }
}

fn answer(owner: &str, status: tonic::Status) -> Error {
    if status.code() == tonic::Code::Unavailable {
        unavailable(owner, status.message())
    } else {
        Error::Peer(status)
    }
}

/// Route on the owner (a retried Route whose first call runs there).
pub async fn route(
    peers: &Peers,
    owner: &str,
    request: pb::RouteRequest,
) -> Result<pb::Communication, Error> {
    let mut client = peers.router(owner).map_err(|e| unavailable(owner, e))?;
    let response = client
        .route(marked(request))
        .await
        .map_err(|s| answer(owner, s))?;
    Ok(response.into_inner().communication.unwrap_or_default())
}

/// Hangup on the owner.
pub async fn hangup(
    peers: &Peers,
    owner: &str,
    request: pb::HangupRequest,
) -> Result<pb::Communication, Error> {
    let mut client = peers.router(owner).map_err(|e| unavailable(owner, e))?;
    let response = client
        .hangup(marked(request))
        .await
        .map_err(|s| answer(owner, s))?;
    Ok(response.into_inner().communication.unwrap_or_default())
}

/// WatchCommunication on the owner, passed through.
pub async fn watch(
    peers: &Peers,
    owner: &str,
    request: pb::WatchCommunicationRequest,
) -> Result<WatchStream, Error> {
    let mut client = peers.router(owner).map_err(|e| unavailable(owner, e))?;
    let response = client
        .watch_communication(marked(request))
        .await
        .map_err(|s| answer(owner, s))?;
    Ok(Box::pin(response.into_inner()))
}

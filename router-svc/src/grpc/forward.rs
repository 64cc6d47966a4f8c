//! Calls about a communication that another router replica runs go to that replica (the
//! owner named in the record), once: the forwarded call carries [`FORWARDED`](plumbing::client::FORWARDED) so that the
//! owner never forwards it again.
//!
//! Hangup and the set-up of a watch are bounded by [`PEER_DEADLINE`]. A forwarded Route
//! is not: like Route itself it lasts until the communication is connected or over (its
//! Dial timeouts bound it), and the channel's HTTP/2 keep-alive notices an owner that dies.

use plumbing::client::mark_forwarded;
use proto::router::v1 as pb;
use tonic::Request;

use super::watch::WatchStream;
use crate::error::Error;
use crate::peers::Peers;

/// How long the owner may take to answer a Hangup or to start a watch.
const PEER_DEADLINE: std::time::Duration = std::time::Duration::from_secs(10);

fn too_slow(owner: &str) -> Error {
    unavailable(owner, format!("no answer within {PEER_DEADLINE:?}"))
}

fn marked<T>(message: T) -> Request<T> {
    let mut request = Request::new(message);
    mark_forwarded(request.metadata_mut());
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
    let response = tokio::time::timeout(PEER_DEADLINE, client.hangup(marked(request)))
        .await
        .map_err(|_| too_slow(owner))?
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
    let started = client.watch_communication(marked(request));
    let response = tokio::time::timeout(PEER_DEADLINE, started)
        .await
        .map_err(|_| too_slow(owner))?
        .map_err(|s| answer(owner, s))?;
    Ok(Box::pin(response.into_inner()))
}

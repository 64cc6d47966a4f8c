//! Offer delivery (`SessionRelayService.Offer`): one leg, one offer to one device, carried
//! between the caller (the router) and the device's session, on this replica or — forwarded
//! once — on the replica named in the device record. The sequence is documented on the
//! service in `internal.proto` and in the crate docs.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use plumbing::auth::{Caller, Scope};
use plumbing::client::{CallCredentials, ChannelPool, ClientTls};
use plumbing::validate::FieldError;
use proto::presence::v1 as pb;
use proto::presence::v1::offer_request::Kind as In;
use proto::presence::v1::offer_response::Kind as Out;
use proto::presence::v1::session_relay_service_client::SessionRelayServiceClient;
use tokio::sync::mpsc;
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Request, Status, Streaming};

use crate::cache::PresenceCache;
use crate::error::Error;
use crate::identity;
use crate::record::{DeviceKey, Kind};
use crate::rules;
use crate::table::{Command, LegEvent, SessionHandle, SessionTable};

/// Metadata a replica adds when it forwards an offer, so that the holder never forwards it
/// again.
pub const RELAYED: &str = "x-switchboard-relayed";
/// How long the caller may take to send `start`, and a session to take an offer.
const FIRST_WITHIN: Duration = Duration::from_secs(10);
/// How long a forwarded offer may take to be set up on the holder (which itself waits up to
/// [`FIRST_WITHIN`] for the session to take it); the leg then lasts as the caller says.
const FORWARD_WITHIN: Duration = Duration::from_secs(15);
/// Events of one leg in flight (delivered, answered, then an end).
const LEG_EVENTS: usize = 4;

/// The response stream of Offer.
pub type OfferStream = Pin<Box<dyn Stream<Item = Result<pb::OfferResponse, Status>> + Send>>;

/// Delivers offers to sessions here or on peers.
#[derive(Debug, Clone)]
pub struct Relay {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    table: Arc<SessionTable>,
    cache: PresenceCache,
    address: String,
    credentials: Option<CallCredentials>,
    peers: ChannelPool,
}

impl Relay {
    /// A relay for the sessions in `table`; `credentials` sign calls to peers (without a
    /// platform key, offers for devices on other replicas are UNAVAILABLE), made over `tls`.
    pub fn new(
        table: Arc<SessionTable>,
        cache: PresenceCache,
        address: String,
        credentials: Option<CallCredentials>,
        tls: ClientTls,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                table,
                cache,
                address,
                credentials,
                peers: ChannelPool::new(tls),
            }),
        }
    }

    /// Serves one Offer stream; `relayed` when a peer forwarded it.
    pub async fn offer(
        &self,
        caller: &Caller,
        relayed: bool,
        mut inbound: Streaming<pb::OfferRequest>,
    ) -> Result<OfferStream, Error> {
        caller.require_platform()?;
        caller.require(Scope::RouterRoute)?;
        let start = first_start(&mut inbound).await?;
        let (key, offer) = validate_start(caller, &start)?;
        if let Some(handle) = self.inner.table.get(&key) {
            return local_leg(handle, offer, inbound).await;
        }
        let not_found = || Error::DeviceNotFound {
            identity: key.identity.clone(),
            device_id: key.device_id.clone(),
        };
        if relayed {
            return Err(not_found());
        }
        match self.inner.cache.device(&key) {
            None => Err(not_found()),
            Some(device) if device.record.kind == Kind::Registration => Err(Error::NoLiveSession {
                identity: key.identity.clone(),
                device_id: key.device_id.clone(),
            }),
            // Ours, but the session has just ended.
            Some(device) if device.record.replica == self.inner.address => Err(not_found()),
            Some(device) => self.forward(&device.record.replica, start, inbound).await,
        }
    }

    async fn forward(
        &self,
        address: &str,
        start: pb::OfferStart,
        inbound: Streaming<pb::OfferRequest>,
    ) -> Result<OfferStream, Error> {
        let unavailable = |reason: String| Error::PeerUnavailable {
            address: address.to_owned(),
            reason,
        };
        let credentials = self.inner.credentials.clone().ok_or_else(|| {
            unavailable("this replica has no platform key to call its peers with".into())
        })?;
        let channel = self
            .channel(address)
            .map_err(|e| unavailable(e.to_string()))?;
        let mut client = SessionRelayServiceClient::with_interceptor(channel, credentials);
        let first = pb::OfferRequest {
            kind: Some(In::Start(start)),
        };
        let requests = tokio_stream::once(first).chain(inbound.map_while(Result::ok));
        let mut request = Request::new(requests);
        request
            .metadata_mut()
            .insert(RELAYED, tonic::metadata::MetadataValue::from_static("1"));
        match tokio::time::timeout(FORWARD_WITHIN, client.offer(request)).await {
            Ok(Ok(response)) => Ok(Box::pin(response.into_inner())),
            Ok(Err(status)) if status.code() == Code::Unavailable => {
                Err(unavailable(status.message().to_owned()))
            }
            Ok(Err(status)) => Err(Error::Passthrough(status)),
            Err(_) => Err(unavailable(format!(
                "it did not take the offer within {FORWARD_WITHIN:?}"
            ))),
        }
    }

    fn channel(&self, address: &str) -> Result<Channel, tonic::transport::Error> {
        self.inner.peers.get(address)
    }
}

async fn first_start(inbound: &mut Streaming<pb::OfferRequest>) -> Result<pb::OfferStart, Error> {
    let first = tokio::time::timeout(FIRST_WITHIN, inbound.message())
        .await
        .map_err(|_| FieldError::new("start", "must be sent within 10 s of opening the stream"))?
        .map_err(Error::Passthrough)?;
    match first.and_then(|m| m.kind) {
        Some(In::Start(start)) => Ok(start),
        _ => {
            Err(FieldError::new("start", "the first message on the stream must be `start`").into())
        }
    }
}

fn validate_start(
    caller: &Caller,
    start: &pb::OfferStart,
) -> Result<(DeviceKey, pb::ConnectOffer), Error> {
    let account = identity::account(caller, "start.account_id", &start.account_id)?;
    rules::identity("start.identity", &start.identity)?;
    rules::device_id("start.device_id", &start.device_id)?;
    rules::external_id("start.offer_id", &start.offer_id)?;
    rules::external_id("start.communication_id", &start.communication_id)?;
    rules::text("start.from", &start.from, rules::IDENTITY_MAX)?;
    rules::text("start.to", &start.to, rules::IDENTITY_MAX)?;
    rules::text("start.channel", &start.channel, 64)?;
    rules::parameters("start.parameters", &start.parameters)?;
    let key = DeviceKey {
        account,
        identity: start.identity.clone(),
        device_id: start.device_id.clone(),
    };
    let offer = pb::ConnectOffer {
        offer_id: start.offer_id.clone(),
        communication_id: start.communication_id.clone(),
        from: start.from.clone(),
        to: start.to.clone(),
        parameters: start.parameters.clone(),
        channel: start.channel.clone(),
        expire_time: start.expire_time,
    };
    Ok((key, offer))
}

/// Hands the offer to a session here and carries the leg.
async fn local_leg(
    handle: SessionHandle,
    offer: pb::ConnectOffer,
    inbound: Streaming<pb::OfferRequest>,
) -> Result<OfferStream, Error> {
    let (events_tx, mut events) = mpsc::channel(LEG_EVENTS);
    let offer_id = offer.offer_id.clone();
    let command = Command::Offer {
        offer: Box::new(offer),
        events: events_tx,
    };
    let gone = || Error::SessionGone;
    handle.send(command).await.map_err(|_| gone())?;
    let first = tokio::time::timeout(FIRST_WITHIN, events.recv())
        .await
        .map_err(|_| Error::SessionStalled)?;
    let device = match first {
        Some(LegEvent::Delivered(device)) => device,
        Some(LegEvent::Duplicate) => return Err(Error::DuplicateOffer(offer_id)),
        _ => return Err(gone()),
    };
    let (outbound, stream) = mpsc::channel(LEG_EVENTS);
    let delivered = Out::Delivered(pb::OfferDelivered {
        device: Some(*device),
    });
    // The channel is new and empty: this cannot fail.
    let _ = outbound.try_send(Ok(response(delivered)));
    let leg = Leg {
        handle,
        offer_id,
        accepted: false,
        outbound,
    };
    tokio::spawn(leg.run(inbound, events));
    Ok(Box::pin(ReceiverStream::new(stream)))
}

fn response(kind: Out) -> pb::OfferResponse {
    pb::OfferResponse { kind: Some(kind) }
}

/// The caller's side of one leg on this replica.
struct Leg {
    handle: SessionHandle,
    offer_id: String,
    accepted: bool,
    outbound: mpsc::Sender<Result<pb::OfferResponse, Status>>,
}

impl Leg {
    async fn run(
        mut self,
        mut inbound: Streaming<pb::OfferRequest>,
        mut events: mpsc::Receiver<LegEvent>,
    ) {
        loop {
            tokio::select! {
                message = inbound.message() => {
                    let kind = match message {
                        Ok(Some(message)) => message.kind,
                        // The caller went away or half-closed without cancel or end.
                        Ok(None) | Err(_) => return self.abandon().await,
                    };
                    return self.on_request(kind).await;
                }
                event = events.recv() => {
                    if self.on_event(event).await {
                        return;
                    }
                }
                _ = self.outbound.closed() => return self.abandon().await,
            }
        }
    }

    /// Passes the caller's cancel or end to the session; the leg is over either way.
    async fn on_request(self, kind: Option<In>) {
        let command = match kind {
            Some(In::Cancel(cancel)) => match pb::CancelReason::try_from(cancel.reason) {
                Ok(reason) if reason != pb::CancelReason::Unspecified => Ok(Command::Cancel {
                    offer_id: self.offer_id.clone(),
                    reason,
                }),
                _ => Err(FieldError::new(
                    "cancel.reason",
                    "must be a known reason other than unspecified",
                )),
            },
            Some(In::End(end)) => match pb::EndReason::try_from(end.reason) {
                Ok(reason)
                    if !matches!(
                        reason,
                        pb::EndReason::Unspecified | pb::EndReason::DeviceHangup
                    ) =>
                {
                    Ok(Command::End {
                        offer_id: self.offer_id.clone(),
                        reason,
                    })
                }
                _ => Err(FieldError::new(
                    "end.reason",
                    "must be a known reason other than unspecified and device_hangup",
                )),
            },
            Some(In::Start(_)) => Err(FieldError::new(
                "start",
                "may only be sent once, as the first message",
            )),
            None => Err(FieldError::new(
                "kind",
                "exactly one of start, cancel or end must be set",
            )),
        };
        match command {
            Ok(command) => {
                let _ = self.handle.send(command).await;
            }
            Err(err) => {
                let _ = self.outbound.send(Err(Error::from(err).into())).await;
                self.abandon().await;
            }
        }
    }

    /// Passes a session event to the caller; true when the leg is over.
    async fn on_event(&mut self, event: Option<LegEvent>) -> bool {
        let (kind, over) = match event {
            Some(LegEvent::Answered {
                accept,
                reason,
                scope,
            }) => {
                self.accepted = accept;
                let answered = pb::OfferAnswered {
                    accept,
                    reject_reason: if accept { 0 } else { reason as i32 },
                    scope: if accept { 0 } else { scope as i32 },
                };
                (Out::Answered(answered), !accept)
            }
            Some(LegEvent::Ringing) => (Out::Ringing(pb::OfferRinging {}), false),
            Some(LegEvent::Hangup) => (Out::Hangup(pb::OfferHangup {}), true),
            Some(LegEvent::Gone(reason)) => (
                Out::Gone(pb::OfferGone {
                    reason: reason as i32,
                }),
                true,
            ),
            Some(LegEvent::Delivered(_) | LegEvent::Duplicate) => return false,
            None => (
                Out::Gone(pb::OfferGone {
                    reason: pb::LeaveReason::Unspecified as i32,
                }),
                true,
            ),
        };
        let _ = self.outbound.send(Ok(response(kind))).await;
        over
    }

    /// The caller left without ending the leg: the device must not wait for it.
    async fn abandon(self) {
        let command = if self.accepted {
            Command::End {
                offer_id: self.offer_id,
                reason: pb::EndReason::Failed,
            }
        } else {
            Command::Cancel {
                offer_id: self.offer_id,
                reason: pb::CancelReason::Failed,
            }
        };
        let _ = self.handle.send(command).await;
    }
}

//! Presence load: Connect sessions churning, TTL registrations, and the long-lived devices
//! the router offers communications to. Every change acknowledged with a revision goes to
//! [`Acks`], for the watcher's count.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use plumbing::auth::Scope;
use proto::presence::v1 as pb;
use proto::presence::v1::connect_request::Kind as ToServer;
use proto::presence::v1::connect_response::Kind as FromServer;
use proto::presence::v1::presence_service_client::PresenceServiceClient;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;

use super::fleet::Fleet;
use super::pace::{self, Tally};
use super::watch::Acks;
use super::{CALL_TIMEOUT, call, status_text, token};

/// Connect sessions opened per second (each lives 1.5–4 s: about ten open at a time).
const SESSIONS_PER_S: f64 = 4.0;
/// Devices registered per second (each unregistered after a second, or abandoned).
const REGISTRATIONS_PER_S: f64 = 4.0;
/// Identities the churning sessions and the registrations spread over.
const IDENTITIES: u64 = 20;
/// TTL of an abandoned registration (the shortest the contract allows) and of the others.
const ABANDONED_TTL: u32 = 5;
const REGISTERED_TTL: u32 = 10;

/// An open Connect session: the requests it may still send and the server's messages.
pub struct Session {
    requests: mpsc::Sender<pb::ConnectRequest>,
    inbound: Streaming<pb::ConnectResponse>,
    /// Revision of the device's record when it became present.
    pub revision: i64,
}

impl Session {
    /// Opens the session of `identity`/`device_id` on `addr` and waits for `registered`.
    pub async fn open(
        addr: SocketAddr,
        token: &str,
        identity: &str,
        device_id: &str,
    ) -> Result<Self, String> {
        let (requests, outbound) = mpsc::channel(16);
        let hello = pb::ConnectHello {
            identity: identity.to_owned(),
            device_id: device_id.to_owned(),
            status: pb::Status::Available as i32,
            ..Default::default()
        };
        requests
            .send(pb::ConnectRequest {
                kind: Some(ToServer::Hello(hello)),
            })
            .await
            .map_err(|_| "Connect: the request stream closed".to_owned())?;
        let channel = plumbing::client::channel(&addr.to_string())
            .map_err(|err| format!("channel: {err}"))?;
        // No deadline on the request: a `grpc-timeout` would end the session.
        let mut client = PresenceServiceClient::new(channel);
        let open = client.connect(crate::Tokens::request(token, ReceiverStream::new(outbound)));
        let inbound = tokio::time::timeout(CALL_TIMEOUT, open)
            .await
            .map_err(|_| "Connect: no answer in time".to_owned())?
            .map_err(|s| status_text("Connect", &s))?
            .into_inner();
        let mut session = Self {
            requests,
            inbound,
            revision: 0,
        };
        session.revision = session.registered("Connect").await?;
        Ok(session)
    }

    /// Waits for the next `registered` (other messages are skipped); its revision.
    async fn registered(&mut self, call: &str) -> Result<i64, String> {
        let deadline = Instant::now() + CALL_TIMEOUT;
        loop {
            let message = tokio::time::timeout_at(deadline, self.inbound.message())
                .await
                .map_err(|_| format!("{call}: no `registered` in time"))?
                .map_err(|s| status_text(call, &s))?
                .ok_or_else(|| format!("{call}: the stream ended"))?;
            if let Some(FromServer::Registered(registered)) = message.kind {
                return Ok(registered.device.map_or(0, |d| d.revision));
            }
        }
    }

    /// Changes the device's status; the revision of the change.
    async fn set_status(&mut self, status: pb::Status) -> Result<i64, String> {
        let status = pb::ConnectStatus {
            status: status as i32,
            ..Default::default()
        };
        self.requests
            .send(pb::ConnectRequest {
                kind: Some(ToServer::Status(status)),
            })
            .await
            .map_err(|_| "ConnectStatus: the request stream closed".to_owned())?;
        self.registered("ConnectStatus").await
    }

    /// Ends the session from the client side (half-close) and waits for the server to end
    /// the stream.
    async fn close(self) {
        let Self {
            requests,
            mut inbound,
            ..
        } = self;
        drop(requests);
        let drain = async { while let Ok(Some(_)) = inbound.message().await {} };
        let _ = tokio::time::timeout(CALL_TIMEOUT, drain).await;
    }

    /// Answers every offer (accepting it when `answer`, else never answering) until the
    /// stream ends.
    async fn serve(mut self, answer: bool) {
        while let Ok(Some(message)) = self.inbound.message().await {
            let Some(FromServer::Offer(offer)) = message.kind else {
                continue;
            };
            if !answer {
                continue;
            }
            let accept = pb::ConnectAnswer {
                offer_id: offer.offer_id,
                accept: true,
                ..Default::default()
            };
            let request = pb::ConnectRequest {
                kind: Some(ToServer::Answer(accept)),
            };
            if self.requests.send(request).await.is_err() {
                return;
            }
        }
    }
}

/// A device that stays connected (reconnecting whenever its stream ends) and accepts every
/// offer, or with `answer` false never answers; it ends when the task is aborted.
pub fn device(addr: SocketAddr, identity: String, device_id: &str, answer: bool) -> JoinHandle<()> {
    let device_id = device_id.to_owned();
    tokio::spawn(async move {
        let token = token(&[Scope::PresenceRegister]);
        loop {
            if let Ok(session) = Session::open(addr, &token, &identity, &device_id).await {
                session.serve(answer).await;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    })
}

/// Sessions churning: each opens on one replica or the other, becomes busy after 1–3 s,
/// and ends half a second later — half by closing its stream, half by dropping it.
pub fn sessions(fleet: &Fleet, acks: Acks, end: Instant) -> JoinHandle<Tally> {
    let addrs = fleet.addrs("presence-svc");
    let token = Arc::new(token(&[Scope::PresenceRegister]));
    pace::every("connect_session", SESSIONS_PER_S, end, move |n| {
        let (addr, token, acks) = (addrs[n as usize % addrs.len()], token.clone(), acks.clone());
        async move {
            let identity = format!("s{}", n % IDENTITIES);
            let device = format!("d{n}");
            let mut session = Session::open(addr, &token, &identity, &device).await?;
            acks.record("Connect", session.revision, &identity, &device);
            tokio::time::sleep(Duration::from_millis(1_000 + n % 5 * 500)).await;
            let revision = session.set_status(pb::Status::Busy).await?;
            acks.record("ConnectStatus", revision, &identity, &device);
            tokio::time::sleep(Duration::from_millis(500)).await;
            if n.is_multiple_of(2) {
                session.close().await;
            }
            // Otherwise the session is dropped here: its stream is reset.
            Ok(())
        }
    })
}

/// Registrations: Register, Heartbeat, UpdateStatus, then Unregister — except every third,
/// abandoned with a 5 s TTL to expire by itself.
pub fn registrations(fleet: &Fleet, acks: Acks, end: Instant) -> JoinHandle<Tally> {
    let addrs = fleet.addrs("presence-svc");
    let token = Arc::new(token(&[Scope::PresenceRegister]));
    pace::every("registration", REGISTRATIONS_PER_S, end, move |n| {
        let (addr, token, acks) = (addrs[n as usize % addrs.len()], token.clone(), acks.clone());
        async move { register_once(addr, &token, &acks, n).await }
    })
}

async fn register_once(addr: SocketAddr, token: &str, acks: &Acks, n: u64) -> Result<(), String> {
    let channel =
        plumbing::client::channel(&addr.to_string()).map_err(|err| format!("channel: {err}"))?;
    let mut client = PresenceServiceClient::new(channel);
    let (identity, device_id) = (format!("r{}", n % IDENTITIES), format!("g{n}"));
    let abandon = n.is_multiple_of(3);
    let register = pb::RegisterRequest {
        identity: identity.clone(),
        device_id: device_id.clone(),
        status: pb::Status::Available as i32,
        ttl_seconds: if abandon {
            ABANDONED_TTL
        } else {
            REGISTERED_TTL
        },
        ..Default::default()
    };
    let answer = client
        .register(call(token, register))
        .await
        .map_err(|s| status_text("Register", &s))?;
    acks.record("Register", answer.get_ref().revision, &identity, &device_id);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let heartbeat = pb::HeartbeatRequest {
        identity: identity.clone(),
        device_id: device_id.clone(),
        ..Default::default()
    };
    client
        .heartbeat(call(token, heartbeat))
        .await
        .map_err(|s| status_text("Heartbeat", &s))?;
    let update = pb::UpdateStatusRequest {
        identity: identity.clone(),
        device_id: device_id.clone(),
        status: pb::Status::Busy as i32,
        ..Default::default()
    };
    let answer = client
        .update_status(call(token, update))
        .await
        .map_err(|s| status_text("UpdateStatus", &s))?;
    acks.record(
        "UpdateStatus",
        answer.get_ref().revision,
        &identity,
        &device_id,
    );
    if abandon {
        return Ok(());
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let unregister = pb::UnregisterRequest {
        identity: identity.clone(),
        device_id: device_id.clone(),
        ..Default::default()
    };
    let answer = client
        .unregister(call(token, unregister))
        .await
        .map_err(|s| status_text("Unregister", &s))?
        .into_inner();
    if !answer.removed {
        return Err("Unregister: the device was not present".to_owned());
    }
    acks.record("Unregister", answer.revision, &identity, &device_id);
    Ok(())
}

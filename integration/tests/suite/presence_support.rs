//! Helpers of the presence tests: servers with presence flags, account keys and tokens,
//! Connect sessions and relay legs driven from the test.

use std::time::Duration;

use integration::{Etcd, InProcess, Tokens, common_args, poll_until, serve_in_process};
use plumbing::auth::Scope;
use plumbing::server::ServeError;
use presence_svc::PresenceArgs;
use proto::presence::v1 as pb;
use proto::presence::v1::connect_request::Kind as Send;
use proto::presence::v1::connect_response::Kind as Recv;
use proto::presence::v1::key_service_client::KeyServiceClient;
use proto::presence::v1::presence_service_client::PresenceServiceClient;
use proto::presence::v1::session_relay_service_client::SessionRelayServiceClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Status, Streaming};

use crate::support;

/// How long a test waits for one expected message.
pub const STEP: Duration = Duration::from_secs(5);

/// presence-svc in-process with presence flags.
pub async fn presence_with(
    etcd: &Etcd,
    prefix: &str,
    presence: PresenceArgs,
) -> InProcess<ServeError> {
    let args = presence_svc::ServeArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        common: common_args(etcd, prefix),
    };
    serve_in_process(move |listener, stop| {
        presence_svc::run_with(args, presence, listener, async move {
            let _ = stop.await;
        })
    })
    .await
}

/// A PresenceService client.
pub fn client<E>(server: &InProcess<E>) -> PresenceServiceClient<Channel> {
    PresenceServiceClient::new(support::channel(server))
}

/// Two presence replicas on one etcd, and account `AC1` whose key both already accept.
pub struct TwoReplicas {
    /// The etcd both use (it stops when this is dropped).
    pub etcd: Etcd,
    pub a: InProcess<ServeError>,
    pub b: InProcess<ServeError>,
    pub tenant: Tenant,
}

/// Starts [`TwoReplicas`].
pub async fn two_replicas() -> TwoReplicas {
    let etcd = Etcd::start().await;
    let prefix = integration::unique_prefix();
    let a = support::presence(&etcd, &prefix).await;
    let b = support::presence(&etcd, &prefix).await;
    let tenant = Tenant::create(&a, "AC1").await;
    tenant.known_to(&b).await;
    TwoReplicas { etcd, a, b, tenant }
}

/// An account with a signing key, for account tokens.
#[derive(Debug, Clone)]
pub struct Tenant {
    /// The account id.
    pub account: String,
    key_id: String,
    secret: String,
}

impl Tenant {
    /// Creates an account key through `server`'s KeyService.
    pub async fn create<E>(server: &InProcess<E>, account: &str) -> Self {
        let mut keys = KeyServiceClient::new(support::channel(server));
        let admin = Tokens::platform("*", &[Scope::Admin]);
        let created = keys
            .create_key(Tokens::request(
                &admin,
                pb::CreateKeyRequest {
                    account_id: account.into(),
                    description: "presence test".into(),
                },
            ))
            .await
            .unwrap()
            .into_inner();
        Self {
            account: account.into(),
            key_id: created.key.unwrap().key_id,
            secret: created.secret,
        }
    }

    /// A token of this account for `identity` (or none) with `scopes`.
    pub fn token(&self, identity: Option<&str>, scopes: &[Scope]) -> String {
        Tokens::signed(
            &self.key_id,
            &self.secret,
            &self.account,
            identity,
            scopes,
            600,
        )
    }

    /// A device token: `presence.register` and `presence.read` for `identity`.
    pub fn device(&self, identity: &str) -> String {
        self.token(
            Some(identity),
            &[Scope::PresenceRegister, Scope::PresenceRead],
        )
    }

    /// Waits until `server` accepts this account's tokens (its key mirror has the key).
    pub async fn known_to<E>(&self, server: &InProcess<E>) {
        let token = self.token(None, &[Scope::PresenceRead]);
        let client = client(server);
        poll_until("account key to reach the replica", STEP, || {
            let (mut client, token) = (client.clone(), token.clone());
            async move {
                let request = pb::GetPresenceRequest {
                    identity: "probe".into(),
                    ..Default::default()
                };
                client
                    .get_presence(Tokens::request(&token, request))
                    .await
                    .ok()
                    .map(|_| ())
            }
        })
        .await;
    }
}

/// The current presence of `identity` as `token` reads it through `client`.
pub async fn presence_of(
    client: &PresenceServiceClient<Channel>,
    token: &str,
    identity: &str,
    min_revision: i64,
) -> pb::IdentityPresence {
    let request = pb::GetPresenceRequest {
        identity: identity.into(),
        min_revision,
        ..Default::default()
    };
    client
        .clone()
        .get_presence(Tokens::request(token, request))
        .await
        .unwrap()
        .into_inner()
        .presence
        .unwrap()
}

/// Waits until `identity` has exactly `devices` devices as read through `client`.
pub async fn wait_for_devices(
    client: &PresenceServiceClient<Channel>,
    token: &str,
    identity: &str,
    devices: usize,
    within: Duration,
) -> pb::IdentityPresence {
    poll_until(
        &format!("{identity} to have {devices} devices"),
        within,
        || async {
            let presence = presence_of(client, token, identity, 0).await;
            (presence.devices.len() == devices).then_some(presence)
        },
    )
    .await
}

/// Registers a device; the response.
pub async fn register(
    client: &PresenceServiceClient<Channel>,
    token: &str,
    request: pb::RegisterRequest,
) -> Result<pb::RegisterResponse, Status> {
    client
        .clone()
        .register(Tokens::request(token, request))
        .await
        .map(tonic::Response::into_inner)
}

/// A live Connect session driven by the test.
#[derive(Debug)]
pub struct Session {
    /// The device as registered.
    pub device: pb::Device,
    sender: mpsc::Sender<pb::ConnectRequest>,
    inbound: Streaming<pb::ConnectResponse>,
}

impl Session {
    /// Opens a session with `hello`.
    pub async fn open(
        channel: Channel,
        token: &str,
        hello: pb::ConnectHello,
    ) -> Result<Self, Status> {
        let (sender, requests) = mpsc::channel(16);
        sender
            .send(pb::ConnectRequest {
                kind: Some(Send::Hello(hello)),
            })
            .await
            .unwrap();
        let mut client = PresenceServiceClient::new(channel);
        let mut inbound = client
            .connect(Tokens::request(token, ReceiverStream::new(requests)))
            .await?
            .into_inner();
        let first = tokio::time::timeout(STEP, inbound.message())
            .await
            .expect("no `registered` in time")?;
        match first.and_then(|m| m.kind) {
            Some(Recv::Registered(registered)) => Ok(Self {
                device: registered.device.unwrap(),
                sender,
                inbound,
            }),
            other => panic!("expected `registered`, got {other:?}"),
        }
    }

    /// Opens a session for `device_id` of the token's identity.
    pub async fn hello(channel: Channel, token: &str, device_id: &str) -> Self {
        let hello = pb::ConnectHello {
            device_id: device_id.into(),
            ..Default::default()
        };
        Self::open(channel, token, hello).await.unwrap()
    }

    /// Sends one message.
    pub async fn send(&self, kind: Send) {
        self.sender
            .send(pb::ConnectRequest { kind: Some(kind) })
            .await
            .unwrap();
    }

    /// Changes the session's status over the stream and waits for the confirming
    /// `registered`; answers the device as stored.
    pub async fn confirm_status(&mut self, status: pb::Status) -> pb::Device {
        self.send(Send::Status(pb::ConnectStatus {
            status: status as i32,
            attributes: Default::default(),
        }))
        .await;
        let Recv::Registered(registered) = self.next().await else {
            panic!("expected `registered` after a status change");
        };
        registered.device.expect("`registered` carries the device")
    }

    /// Sends a message with nothing set.
    pub async fn send_empty(&self) {
        self.sender
            .send(pb::ConnectRequest { kind: None })
            .await
            .unwrap();
    }

    /// The next server message (panics if the stream ends or nothing comes in time).
    pub async fn next(&mut self) -> Recv {
        let message = tokio::time::timeout(STEP, self.inbound.message())
            .await
            .expect("no server message in time")
            .expect("stream failed")
            .expect("stream ended");
        message.kind.unwrap()
    }

    /// Waits for the stream to end: `None` when it ends with OK, else its status.
    pub async fn end(&mut self) -> Option<Status> {
        loop {
            let message = tokio::time::timeout(STEP, self.inbound.message())
                .await
                .expect("stream did not end in time");
            match message {
                Ok(Some(_)) => continue,
                Ok(None) => return None,
                Err(status) => return Some(status),
            }
        }
    }
}

/// A relay leg driven by the test (as the router would).
#[derive(Debug)]
pub struct Leg {
    sender: mpsc::Sender<pb::OfferRequest>,
    inbound: Streaming<pb::OfferResponse>,
}

/// An `OfferStart` for a device.
pub fn start(account: &str, identity: &str, device_id: &str, offer_id: &str) -> pb::OfferStart {
    pb::OfferStart {
        account_id: account.into(),
        identity: identity.into(),
        device_id: device_id.into(),
        offer_id: offer_id.into(),
        communication_id: format!("CM-{offer_id}"),
        from: "+15550100".into(),
        to: identity.into(),
        channel: "voice".into(),
        ..Default::default()
    }
}

impl Leg {
    /// Starts a leg through `channel` with a platform `router.route` token.
    pub async fn offer(channel: Channel, start: pb::OfferStart) -> Result<Self, Status> {
        let token = Tokens::platform("*", &[Scope::RouterRoute]);
        Self::offer_as(channel, &token, start).await
    }

    /// Starts a leg with `token`.
    pub async fn offer_as(
        channel: Channel,
        token: &str,
        start: pb::OfferStart,
    ) -> Result<Self, Status> {
        let (sender, requests) = mpsc::channel(4);
        sender
            .send(pb::OfferRequest {
                kind: Some(pb::offer_request::Kind::Start(start)),
            })
            .await
            .unwrap();
        let mut client = SessionRelayServiceClient::new(channel);
        let inbound = client
            .offer(Tokens::request(token, ReceiverStream::new(requests)))
            .await?
            .into_inner();
        Ok(Self { sender, inbound })
    }

    /// Sends one message.
    pub async fn send(&self, kind: pb::offer_request::Kind) {
        self.sender
            .send(pb::OfferRequest { kind: Some(kind) })
            .await
            .unwrap();
    }

    /// The next event, `None` at the end, or the status the stream ended with.
    pub async fn try_next(&mut self) -> Result<Option<pb::offer_response::Kind>, Status> {
        let message = tokio::time::timeout(STEP, self.inbound.message())
            .await
            .expect("no leg event in time")?;
        Ok(message.map(|m| m.kind.unwrap()))
    }

    /// The next event; `None` when the stream has ended with OK.
    pub async fn next(&mut self) -> Option<pb::offer_response::Kind> {
        tokio::time::timeout(STEP, self.inbound.message())
            .await
            .expect("no leg event in time")
            .expect("leg failed")
            .map(|m| m.kind.unwrap())
    }
}

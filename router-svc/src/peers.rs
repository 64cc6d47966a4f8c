//! The services the router calls — limiter-svc (one shared [`LimiterClient`] that sends
//! each call to the owner of its shard), presence-svc (presence reads and, on the
//! replica holding each device's session, offer delivery) and other router replicas (to
//! reach the owner of a communication) — with platform tokens minted here and the trace
//! context carried by [`CallCredentials`].

use plumbing::auth::Scope;
use plumbing::client::{CallCredentials, ChannelPool, ClientTls};
use plumbing::config::CommonArgs;
use plumbing::limiter::{LimiterClient, LimiterClientError};
use proto::presence::v1::presence_service_client::PresenceServiceClient;
use proto::presence::v1::session_relay_service_client::SessionRelayServiceClient;
use proto::router::v1::router_service_client::RouterServiceClient;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// A channel with call credentials.
pub type Authed = InterceptedService<Channel, CallCredentials>;

/// Why a peer cannot be called.
#[derive(Debug, Clone, thiserror::Error)]
pub enum PeerError {
    /// No platform secret: the router cannot sign calls.
    #[error("the router has no platform secret (--platform-secret) to call other services with")]
    NoCredentials,
    /// The address is not usable.
    #[error("bad address `{address}`: {reason}")]
    Address {
        /// The address.
        address: String,
        /// Why.
        reason: String,
    },
}

/// Clients of the router's peers.
#[derive(Debug, Clone)]
pub struct Peers {
    credentials: Option<CallCredentials>,
    /// Built once at startup; `Err` without credentials (said on every call).
    limiter: Option<Result<LimiterClient, PeerError>>,
    presence: String,
    channels: ChannelPool,
}

impl Peers {
    /// Peers at `presence` and `limiter` (one address, or seed addresses separated by
    /// commas), signing with the platform key of `common`, called over `tls`. Fails when
    /// the limiter address is unusable.
    pub fn new(
        common: &CommonArgs,
        presence: String,
        limiter: Option<String>,
        tls: ClientTls,
    ) -> Result<Self, LimiterClientError> {
        let credentials = CallCredentials::from_common(
            common,
            &[
                Scope::LimiterAcquire,
                Scope::PresenceRead,
                Scope::RouterRoute,
            ],
        );
        let limiter = match (limiter.filter(|l| !l.trim().is_empty()), &credentials) {
            (None, _) => None,
            (Some(_), None) => Some(Err(PeerError::NoCredentials)),
            (Some(address), Some(credentials)) => Some(Ok(LimiterClient::from_address(
                &address,
                &tls,
                credentials.clone(),
            )?)),
        };
        Ok(Self {
            credentials,
            limiter,
            presence,
            channels: ChannelPool::new(tls),
        })
    }

    fn authed(&self, address: &str) -> Result<Authed, PeerError> {
        let credentials = self.credentials.clone().ok_or(PeerError::NoCredentials)?;
        let channel = self.channels.get(address).map_err(|e| PeerError::Address {
            address: address.to_owned(),
            reason: e.to_string(),
        })?;
        Ok(InterceptedService::new(channel, credentials))
    }

    /// The limiter, when one is configured.
    pub fn limiter(&self) -> Option<Result<&LimiterClient, PeerError>> {
        self.limiter
            .as_ref()
            .map(|limiter| limiter.as_ref().map_err(Clone::clone))
    }

    /// Presence reads.
    pub fn presence(&self) -> Result<PresenceServiceClient<Authed>, PeerError> {
        self.authed(&self.presence).map(PresenceServiceClient::new)
    }

    /// Offer delivery on the presence replica at `address` (the one holding the session),
    /// or through the configured presence address when it is unknown.
    pub fn relay(&self, address: &str) -> Result<SessionRelayServiceClient<Authed>, PeerError> {
        let address = if address.is_empty() {
            self.presence.as_str()
        } else {
            address
        };
        self.authed(address).map(SessionRelayServiceClient::new)
    }

    /// Another router replica.
    pub fn router(&self, address: &str) -> Result<RouterServiceClient<Authed>, PeerError> {
        self.authed(address).map(RouterServiceClient::new)
    }
}

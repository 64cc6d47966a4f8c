//! Calling another Switchboard service: a lazily connected channel (plain text or TLS, see
//! [`ClientTls`]) and call credentials that sign a short-lived platform token and carry the
//! current trace context.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tonic::service::Interceptor;
use tonic::transport::{Channel, Endpoint};
use tonic::{Request, Status};

use crate::auth::jwt::{self, TokenRequest};
use crate::auth::{Scope, unix_now};
pub use crate::tls::ClientTls;

/// How long service tokens live; they are re-minted when less than half remains.
const SERVICE_TOKEN_TTL: i64 = 3600;

/// A plain-text channel to `address`, as [`channel_with`] without TLS (tools and tests
/// talking to plain-text servers; services pass their [`ClientTls`]).
pub fn channel(address: &str) -> Result<Channel, tonic::transport::Error> {
    channel_with(address, &ClientTls::plain())
}

/// A channel to `address` (`host:port` or a URL) that connects on first use and reconnects
/// by itself. With TLS on, a bare `host:port` is called over `https` and the server's
/// certificate must be valid for `host`; an explicit `http://` URL stays plain text.
pub fn channel_with(address: &str, tls: &ClientTls) -> Result<Channel, tonic::transport::Error> {
    let uri = if address.contains("://") {
        address.to_owned()
    } else if tls.is_enabled() {
        format!("https://{address}")
    } else {
        format!("http://{address}")
    };
    let mut endpoint = Endpoint::from_shared(uri)?
        .connect_timeout(Duration::from_secs(3))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_while_idle(true);
    if let Some(config) = tls.config() {
        endpoint = endpoint.tls_config(config.clone())?;
    }
    Ok(endpoint.connect_lazy())
}

/// Lazily connected channels by peer address, shared by clones: one channel per peer
/// replica for the life of the process (a channel reconnects by itself).
#[derive(Debug, Clone)]
pub struct ChannelPool {
    tls: ClientTls,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
}

impl ChannelPool {
    /// An empty pool whose channels are made over `tls`.
    pub fn new(tls: ClientTls) -> Self {
        Self {
            tls,
            channels: Arc::default(),
        }
    }

    /// The channel to `address`, made on first use ([`channel_with`]).
    pub fn get(&self, address: &str) -> Result<Channel, tonic::transport::Error> {
        let mut channels = self.channels.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(channel) = channels.get(address) {
            return Ok(channel.clone());
        }
        let channel = channel_with(address, &self.tls)?;
        channels.insert(address.to_owned(), channel.clone());
        Ok(channel)
    }

    /// Drops the channels of the addresses `keep` says no (peers that left).
    pub fn retain(&self, keep: impl Fn(&str) -> bool) {
        self.channels
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|address, _| keep(address));
    }

    /// The TLS the pool's channels use.
    pub fn tls(&self) -> &ClientTls {
        &self.tls
    }
}

/// Metadata of a call one replica forwarded to another (the owner of a shard, a
/// communication or a session), so that it is never forwarded again; on a reply, it says
/// another replica produced it (the caller's routing is stale).
pub const FORWARDED: &str = "x-switchboard-forwarded";

/// Marks `metadata` as [`FORWARDED`].
pub fn mark_forwarded(metadata: &mut tonic::metadata::MetadataMap) {
    metadata.insert(FORWARDED, tonic::metadata::MetadataValue::from_static("1"));
}

/// Whether `metadata` carries [`FORWARDED`].
pub fn is_forwarded(metadata: &tonic::metadata::MetadataMap) -> bool {
    metadata.contains_key(FORWARDED)
}

/// An `authorization` metadata value.
type AuthValue = tonic::metadata::MetadataValue<tonic::metadata::Ascii>;

/// Adds `authorization` and `traceparent` to every call: a platform token minted here
/// ([`CallCredentials::platform`]) or a token minted elsewhere ([`CallCredentials::bearer`]).
#[derive(Clone)]
pub struct CallCredentials {
    source: Source,
}

#[derive(Clone)]
enum Source {
    /// Signs short-lived platform tokens with the platform key.
    Platform {
        key_id: Arc<str>,
        secret: Arc<[u8]>,
        scopes: Arc<[Scope]>,
        cached: Arc<Mutex<Option<(AuthValue, i64)>>>,
    },
    /// Sends one token as it is.
    Bearer(AuthValue),
}

impl std::fmt::Debug for CallCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut out = f.debug_struct("CallCredentials");
        match &self.source {
            Source::Platform { key_id, .. } => out.field("key_id", key_id),
            Source::Bearer(_) => out.field("bearer", &"<redacted>"),
        };
        out.finish_non_exhaustive()
    }
}

/// A token that cannot be sent as metadata (it holds characters outside visible ASCII).
#[derive(Debug, thiserror::Error)]
#[error("the token is not valid `authorization` metadata (visible ASCII only)")]
pub struct InvalidToken;

impl CallCredentials {
    /// Credentials signing with the platform key for all accounts, with `scopes`.
    pub fn platform(key_id: &str, secret: &[u8], scopes: &[Scope]) -> Self {
        Self {
            source: Source::Platform {
                key_id: key_id.into(),
                secret: secret.into(),
                scopes: scopes.into(),
                cached: Arc::default(),
            },
        }
    }

    /// Platform credentials with `scopes` from the replica's `--platform-key-id` and
    /// `--platform-secret`; `None` without a secret (calls to peers then fail, each
    /// service says how).
    pub fn from_common(common: &crate::config::CommonArgs, scopes: &[Scope]) -> Option<Self> {
        let secret = common
            .platform_secret
            .as_deref()
            .filter(|s| !s.is_empty())?;
        Some(Self::platform(
            &common.platform_key_id,
            secret.as_bytes(),
            scopes,
        ))
    }

    /// Credentials sending `token` (a JWT minted by `presence-svc token` or `KeyService`) as
    /// `authorization: Bearer <token>`; the caller replaces them before it expires.
    pub fn bearer(token: &str) -> Result<Self, InvalidToken> {
        let value = format!("Bearer {}", token.trim())
            .parse()
            .map_err(|_| InvalidToken)?;
        Ok(Self {
            source: Source::Bearer(value),
        })
    }

    fn token(&self) -> Result<AuthValue, Status> {
        let (key_id, secret, scopes, cached) = match &self.source {
            Source::Bearer(value) => return Ok(value.clone()),
            Source::Platform {
                key_id,
                secret,
                scopes,
                cached,
            } => (key_id, secret, scopes, cached),
        };
        let now = unix_now();
        let mut cached = cached
            .lock()
            .map_err(|_| Status::internal("credential cache poisoned"))?;
        if let Some((value, expires)) = cached.as_ref()
            && expires - now > SERVICE_TOKEN_TTL / 2
        {
            return Ok(value.clone());
        }
        let request = TokenRequest {
            key_id,
            secret,
            account: "*",
            identity: None,
            scopes,
            ttl_secs: SERVICE_TOKEN_TTL,
        };
        let token = jwt::mint(&request, now).map_err(|e| Status::internal(e.to_string()))?;
        let value: AuthValue = format!("Bearer {token}")
            .parse()
            .map_err(|_| Status::internal("minted token is not valid metadata"))?;
        *cached = Some((value.clone(), now + SERVICE_TOKEN_TTL));
        Ok(value)
    }
}

impl Interceptor for CallCredentials {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let token = self.token()?;
        request.metadata_mut().insert("authorization", token);
        crate::telemetry::inject(request.metadata_mut());
        Ok(request)
    }
}

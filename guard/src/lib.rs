//! Put Switchboard's concurrency limiter in front of any tonic service.
//!
//! [`GuardLayer`] is a tower layer. For each request it asks a *key function* what the
//! request counts against — a [`GuardKey`]: an account and a limiter resource — and takes
//! one slot of that key from limiter-svc before the request reaches its handler. The slot
//! is held until the response body ends (for a stream: until the stream ends) and then
//! released, so "requests in flight" means exactly that, streams included. Over the limit
//! the caller gets `RESOURCE_EXHAUSTED` with a `retry-after-ms` metadata entry and a
//! `google.rpc.RetryInfo` detail, and the handler never runs.
//!
//! ```no_run
//! use switchboard_guard::{CallCredentials, ClientTls, FailMode, GuardLayer, LimiterClient};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! // A token with scope `limiter.acquire` for the accounts the service guards.
//! let token = std::env::var("SWITCHBOARD_TOKEN")?;
//! let limiter = LimiterClient::from_address(
//!     "127.0.0.1:50052",
//!     &ClientTls::plain(),
//!     CallCredentials::bearer(&token)?,
//! )?;
//! let guard = GuardLayer::with_limiter(limiter, FailMode::Open)
//!     .with_key(switchboard_guard::header_key("x-account-id"));
//! let (_, health) = tonic_health::server::health_reporter();
//! tonic::transport::Server::builder()
//!     .layer(guard)
//!     .add_service(health) // your service here
//!     .serve("127.0.0.1:50060".parse()?)
//!     .await?;
//! # Ok(())
//! # }
//! ```
//!
//! A runnable version of this is `examples/guarded_health.rs`
//! (`cargo run -p switchboard-guard --example guarded_health`).
//!
//! # The key function
//!
//! A key function maps the request's head ([`http::request::Parts`]: method, URI, headers,
//! extensions) to `Some(GuardKey)`, or to `None` to let the request through unguarded.
//! It runs once per request, before the body is read, and must be cheap.
//!
//! - [`header_key`]: the account from a request header your own authentication sets (say
//!   `x-account-id`), the resource `rpc:<path>` — one limit per account and RPC;
//! - [`switchboard_key`] (the default): what Switchboard's services use — the account of
//!   the caller authenticated by Switchboard's auth layer; platform callers, health and
//!   reflection are not guarded;
//! - any closure `Fn(&http::request::Parts) -> Option<GuardKey>`, passed to
//!   [`GuardLayer::with_key`]: e.g. one resource for all of a service's RPCs
//!   (`"api"`), or a resource per tenant plan.
//!
//! Limits are set per (account, resource) with `LimiterService/SetLimit` (or a default for
//! every account with account `*`); a key without any limit gets the limiter's server
//! default (`--default-limit`).
//!
//! # Fail open or closed
//!
//! When limiter-svc does not answer within two seconds, or answers with an error rather
//! than a decision (unreachable, not permitted, a fault), the guard follows its
//! [`FailMode`]: [`FailMode::Open`] lets the request through (logged, and counted by
//! [`GuardLayer::fail_open_count`]); [`FailMode::Closed`] refuses it with `UNAVAILABLE`.
//! Fail open when the limit protects capacity and an outage of the limiter should not
//! become an outage of your service; fail closed when the limit is a contract (a paid
//! tier, a fragile downstream).
//!
//! # How it talks to the limiter
//!
//! [`LimiterClient`] starts from seed addresses (one, or several separated by commas: a
//! Kubernetes Service is one) and learns the limiter's shard map with `GetShardMap`; each
//! Acquire, Renew and Release goes straight to the replica that owns the key's shard, so
//! no replica forwards it. It refreshes the map in the background and when an answer says
//! it is stale; a call that could not be sent is sent again through a seed, and a call
//! whose outcome is unknown is retried only when that is idempotent (Release, Renew). One
//! worker per guard renews the slots of long streams every [`RENEW_EVERY`] (they are held
//! for [`HOLD_SECS`]), so a process that dies mid-stream leaks its slots for at most
//! [`HOLD_SECS`], and sends the releases; no task is spawned per request.
//!
//! Credentials: [`CallCredentials::bearer`] sends a token minted elsewhere (by
//! `presence-svc token` or `KeyService`) and needs scope `limiter.acquire` for every
//! account the key function names — an account's own token guards that account only; a
//! platform service uses [`CallCredentials::platform`] to sign its own short-lived tokens
//! for all accounts. [`ClientTls`] calls the limiter over TLS (with a client certificate
//! when the limiter requires one) or plain text.
#![forbid(unsafe_code)]
#![deny(missing_docs)]

pub use plumbing::client::{CallCredentials, ClientTls, InvalidToken};
pub use plumbing::guard::{
    FailMode, GuardKey, GuardLayer, GuardService, HOLD_SECS, KeyFn, RENEW_EVERY, exhausted,
    header_key, switchboard_key,
};
pub use plumbing::limiter::{LimiterClient, LimiterClientError};

/// A guard acquiring through limiter-svc at `address` (one `host:port`, or several
/// separated by commas) with `token`, keyed by the request header `account_header`
/// ([`header_key`]), over plain text: the shortest way to guard a service on a trusted
/// network. Must be called within a Tokio runtime.
pub fn guard_by_header(
    address: &str,
    token: &str,
    account_header: &'static str,
    fail: FailMode,
) -> Result<GuardLayer, SetupError> {
    let credentials = CallCredentials::bearer(token)?;
    let limiter = LimiterClient::from_address(address, &ClientTls::plain(), credentials)?;
    Ok(GuardLayer::with_limiter(limiter, fail).with_key(header_key(account_header)))
}

/// Why a guard could not be set up.
#[derive(Debug)]
pub enum SetupError {
    /// The token cannot be sent as metadata.
    Token(InvalidToken),
    /// An address of the limiter is not valid, or none was given.
    Limiter(LimiterClientError),
}

impl std::fmt::Display for SetupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Token(err) => err.fmt(f),
            Self::Limiter(err) => err.fmt(f),
        }
    }
}

impl std::error::Error for SetupError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Token(err) => Some(err),
            Self::Limiter(err) => Some(err),
        }
    }
}

impl From<InvalidToken> for SetupError {
    fn from(err: InvalidToken) -> Self {
        Self::Token(err)
    }
}

impl From<LimiterClientError> for SetupError {
    fn from(err: LimiterClientError) -> Self {
        Self::Limiter(err)
    }
}

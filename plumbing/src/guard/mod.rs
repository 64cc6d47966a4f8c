//! The API guard: a tower layer that puts limiter-svc in front of a tonic service. Before a
//! request reaches its handler, the guard asks its *key function* what the request counts
//! against — a [`GuardKey`]: an account and a resource, by default `rpc:<path>` of the
//! caller's account — and acquires one slot of that key from limiter-svc; when the
//! response body ends (for streams: when the stream ends) the slot is released. Over the
//! limit the caller gets RESOURCE_EXHAUSTED with `retry-after-ms` metadata and a
//! `google.rpc.RetryInfo` detail, once the rest of the request has been read
//! ([`crate::refusal`]). A key function that answers `None` lets the request through
//! unguarded.
//!
//! Slots of long streams are renewed every [`RENEW_EVERY`] while the stream lives, so a
//! replica that crashes mid-stream leaks nothing for longer than [`HOLD_SECS`]. No task
//! is spawned per call: one worker per guard renews every held slot from one timer and
//! sends the releases (`slots`). Calls go straight to the shard's owner
//! ([`LimiterClient`]).
//!
//! Switchboard's own services use [`switchboard_key`]: platform callers (other Switchboard
//! services) are not guarded — they act for every account at once, and limiting them by
//! `*` would throttle all tenants together — nor are health and reflection. Any other
//! tonic service chooses its own key ([`GuardLayer::with_key`], [`header_key`]).
//! When the limiter cannot be reached the guard fails open (the request proceeds; logged
//! and counted in [`GuardLayer::fail_open_count`]) unless configured to fail closed
//! ([`FailMode`]).
//!
//! limiter-svc cannot guard its own API through itself: [`GuardLayer::local`] is the same
//! guard over a local per-account count of requests in flight ([`AccountQuota`]), with
//! the same exemptions and the same RESOURCE_EXHAUSTED answer ([`exhausted`]).

mod slots;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use clap::Args;
use futures::future::BoxFuture;
use http_body::{Body, Frame};
use proto::limiter::v1 as pb;
use tonic_types::{ErrorDetails, StatusExt};
use tower::{Layer, Service};

use self::slots::{HeldSlot, SlotKeeper};
use crate::auth::{Caller, PUBLIC_PATH_PREFIXES, Scope};
use crate::client::{CallCredentials, ClientTls};
use crate::limiter::{LimiterClient, LimiterClientError};
use crate::quota::{AccountQuota, QuotaPermit};
use crate::refusal::refuse;

/// Hold of a guard slot; long streams renew it.
pub const HOLD_SECS: u32 = 60;
/// Renewal period of guard slots of live streams.
pub const RENEW_EVERY: Duration = Duration::from_secs(20);
/// How long the guard waits for the limiter before failing open or closed (and for a
/// renewal or release, which nobody waits for).
const LIMITER_DEADLINE: Duration = Duration::from_secs(2);
/// The retry hint of a local refusal: requests in flight end within milliseconds.
const LOCAL_RETRY_AFTER: Duration = Duration::from_millis(100);

/// Flags of the API guard.
#[derive(Debug, Clone, Args)]
pub struct GuardArgs {
    /// Address of limiter-svc (`host:port`, or several separated by commas, used in
    /// turn). The API guard limits each account's in-flight requests per RPC through it
    /// (resource `rpc:<path>`); without it the API is unguarded.
    #[arg(long = "limiter", env = "SWITCHBOARD_LIMITER")]
    pub limiter: Option<String>,

    /// Refuse requests (UNAVAILABLE) when the limiter cannot be reached, instead of letting
    /// them through (the default, logged and counted).
    #[arg(long, env = "SWITCHBOARD_GUARD_FAIL_CLOSED")]
    pub guard_fail_closed: bool,
}

impl GuardArgs {
    /// `--guard-fail-closed` as a [`FailMode`].
    pub fn fail_mode(&self) -> FailMode {
        if self.guard_fail_closed {
            FailMode::Closed
        } else {
            FailMode::Open
        }
    }
}

/// What one request counts against: its account's requests in flight for `resource`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuardKey {
    /// The account whose limit applies (limiter-svc's `account_id`).
    pub account: String,
    /// The limiter resource (at most 300 characters of `[A-Za-z0-9._:/@+-]`).
    pub resource: String,
}

/// Chooses a request's [`GuardKey`] from its head (method, URI, headers, extensions), or
/// `None` to let it through unguarded. Called once per request, before its body is read.
pub type KeyFn = Arc<dyn Fn(&http::request::Parts) -> Option<GuardKey> + Send + Sync>;

/// What the guard does with a request when limiter-svc cannot be reached (no answer within
/// two seconds, or an error other than a decision).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FailMode {
    /// Let the request through, logged and counted ([`GuardLayer::fail_open_count`]).
    #[default]
    Open,
    /// Refuse it with UNAVAILABLE "the concurrency limiter is unreachable; retry".
    Closed,
}

/// The key of Switchboard's own services: resource `rpc:<path>` of the authenticated
/// caller's account (the [`Caller`] that the auth layer leaves in the extensions). Platform
/// callers, callers of account `*`, unauthenticated requests and the health and reflection
/// services are not guarded.
pub fn switchboard_key(head: &http::request::Parts) -> Option<GuardKey> {
    let path = head.uri.path();
    if PUBLIC_PATH_PREFIXES.iter().any(|p| path.starts_with(p)) {
        return None;
    }
    match head.extensions.get::<Caller>() {
        Some(caller) if !caller.platform && caller.account != "*" => Some(GuardKey {
            account: caller.account.clone(),
            resource: format!("rpc:{path}"),
        }),
        _ => None,
    }
}

/// A key function for any tonic service: the account is the value of the request metadata
/// `header` (e.g. `x-account-id`, set by the service's own authentication in front of the
/// guard), the resource `rpc:<path>`. Requests without the header are not guarded.
pub fn header_key(
    header: &'static str,
) -> impl Fn(&http::request::Parts) -> Option<GuardKey> + Clone + Send + Sync + 'static {
    move |head: &http::request::Parts| {
        let account = head.headers.get(header)?.to_str().ok()?.trim();
        (!account.is_empty()).then(|| GuardKey {
            account: account.to_owned(),
            resource: format!("rpc:{}", head.uri.path()),
        })
    }
}

/// See the module docs.
#[derive(Clone)]
pub struct GuardLayer {
    backend: Backend,
    key: KeyFn,
    fail: FailMode,
    fail_open: Arc<AtomicU64>,
}

impl std::fmt::Debug for GuardLayer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuardLayer")
            .field("fail", &self.fail)
            .field("local", &matches!(self.backend, Backend::Local(_)))
            .finish_non_exhaustive()
    }
}

impl GuardLayer {
    /// A guard calling limiter-svc at `address` (over `tls`; a comma-separated list of
    /// seed addresses), signing with `credentials`, keyed by [`switchboard_key`].
    pub fn new(
        address: &str,
        tls: &ClientTls,
        credentials: CallCredentials,
        fail: FailMode,
    ) -> Result<Self, LimiterClientError> {
        let limiter = LimiterClient::from_address(address, tls, credentials)?;
        Ok(Self::with_limiter(limiter, fail))
    }

    /// A guard acquiring through `limiter` (whose credentials need `limiter.acquire` for
    /// the accounts it guards), keyed by [`switchboard_key`]; for a service that shares one
    /// [`LimiterClient`] between the guard and its own calls. Must be called within a
    /// Tokio runtime (it starts the worker that renews and releases slots).
    pub fn with_limiter(limiter: LimiterClient, fail: FailMode) -> Self {
        Self {
            backend: Backend::Limiter(Arc::new(SlotKeeper::new(limiter))),
            key: Arc::new(switchboard_key),
            fail,
            fail_open: Arc::default(),
        }
    }

    /// The same guard, choosing each request's key with `key` instead.
    pub fn with_key(
        mut self,
        key: impl Fn(&http::request::Parts) -> Option<GuardKey> + Send + Sync + 'static,
    ) -> Self {
        self.key = Arc::new(key);
        self
    }

    /// A guard that needs no limiter: each account may have at most `max_inflight` requests
    /// in flight on this replica (`--max-inflight-per-account` of limiter-svc).
    pub fn local(max_inflight: usize) -> Self {
        Self {
            backend: Backend::Local(AccountQuota::new(
                max_inflight,
                "requests in flight",
                "--max-inflight-per-account",
            )),
            key: Arc::new(switchboard_key),
            fail: FailMode::Open,
            fail_open: Arc::default(),
        }
    }

    /// The guard configured by `args`, if a limiter address was given; it calls the limiter
    /// over `tls` (the replica's [`crate::server::Replica::client_tls`]).
    pub fn from_args(
        args: &GuardArgs,
        common: &crate::config::CommonArgs,
        tls: &ClientTls,
    ) -> Result<Option<Self>, LimiterClientError> {
        let credentials = CallCredentials::from_common(common, &[Scope::LimiterAcquire]);
        let (Some(address), Some(credentials)) = (args.limiter.as_deref(), credentials) else {
            if args.limiter.is_some() {
                tracing::warn!(
                    "the API guard needs --platform-secret to call the limiter; the API is unguarded"
                );
            }
            return Ok(None);
        };
        Self::new(address, tls, credentials, args.fail_mode()).map(Some)
    }

    /// Requests let through because the limiter could not be reached.
    pub fn fail_open_count(&self) -> u64 {
        self.fail_open.load(Ordering::Relaxed)
    }
}

impl<S> Layer<S> for GuardLayer {
    type Service = GuardService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GuardService {
            inner,
            guard: self.clone(),
        }
    }
}

/// See [`GuardLayer`].
#[derive(Debug, Clone)]
pub struct GuardService<S> {
    inner: S,
    guard: GuardLayer,
}

impl<S, B> Service<http::Request<B>> for GuardService<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Body + Unpin + Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let mut inner = crate::take_ready(&mut self.inner);
        let (head, body) = request.into_parts();
        let key = (self.guard.key)(&head);
        let request = http::Request::from_parts(head, body);
        let guard = self.guard.clone();
        Box::pin(async move {
            let Some(key) = key else {
                return inner.call(request).await;
            };
            match guard.admit(&key).await {
                Admission::Granted(held) => {
                    let response = inner.call(request).await?;
                    Ok(response.map(|body| {
                        tonic::body::Body::new(GuardedBody {
                            inner: body,
                            _held: held,
                        })
                    }))
                }
                Admission::Open => inner.call(request).await,
                Admission::Refused(status) => Ok(refuse(request.into_body(), status).await),
            }
        })
    }
}

/// Where a guard takes its decisions.
#[derive(Clone)]
enum Backend {
    /// limiter-svc, resource `rpc:<path>`; the keeper renews and releases the slots.
    Limiter(Arc<SlotKeeper>),
    /// A count of requests in flight per account on this replica.
    Local(AccountQuota),
}

enum Admission {
    Granted(Held),
    Open,
    Refused(tonic::Status),
}

/// RESOURCE_EXHAUSTED with `message`, the `retry-after-ms` metadata and a
/// `google.rpc.RetryInfo` detail: every refusal of the guards, remote or local.
pub fn exhausted(message: String, retry_after: Duration) -> tonic::Status {
    let mut status = tonic::Status::with_error_details(
        tonic::Code::ResourceExhausted,
        message,
        ErrorDetails::with_retry_info(Some(retry_after)),
    );
    if let Ok(value) = retry_after.as_millis().to_string().parse() {
        status.metadata_mut().insert("retry-after-ms", value);
    }
    status
}

impl GuardLayer {
    async fn admit(&self, key: &GuardKey) -> Admission {
        let keeper = match &self.backend {
            Backend::Limiter(keeper) => keeper,
            Backend::Local(quota) => {
                return match quota.try_acquire(&key.account) {
                    Ok(permit) => Admission::Granted(Held::Permit { _permit: permit }),
                    Err(full) => Admission::Refused(exhausted(
                        format!(
                            "{full} (at {}); retry after {} ms",
                            key.resource.strip_prefix("rpc:").unwrap_or(&key.resource),
                            LOCAL_RETRY_AFTER.as_millis()
                        ),
                        LOCAL_RETRY_AFTER,
                    )),
                };
            }
        };
        match self.acquire(keeper.limiter(), key).await {
            Ok(slot) => Admission::Granted(Held::Slot {
                _slot: keeper.hold(slot),
            }),
            Err(admission) => admission,
        }
    }

    /// A slot of `key`, or the admission when there is none.
    async fn acquire(&self, limiter: &LimiterClient, key: &GuardKey) -> Result<String, Admission> {
        let GuardKey { account, resource } = key;
        let request = pb::AcquireRequest {
            account_id: account.clone(),
            resource: resource.clone(),
            request_id: String::new(),
            hold_seconds: HOLD_SECS,
            wait_timeout_ms: 0,
        };
        let answer = tokio::time::timeout(LIMITER_DEADLINE, limiter.acquire(request)).await;
        match answer {
            Ok(Ok(answer)) => {
                if answer.decision == pb::Decision::Granted as i32 {
                    return Ok(answer.slot_id);
                }
                let retry = Duration::from_millis(u64::from(answer.retry_after_ms));
                Err(Admission::Refused(exhausted(
                    format!(
                        "account `{account}` has {} of {} requests in flight for {}; retry after {} ms",
                        answer.in_flight,
                        answer.limit,
                        resource.strip_prefix("rpc:").unwrap_or(resource),
                        answer.retry_after_ms
                    ),
                    retry,
                )))
            }
            Ok(Err(status)) => Err(self.unreachable(&status.to_string())),
            Err(_) => Err(self.unreachable("no answer within the deadline")),
        }
    }

    fn unreachable(&self, why: &str) -> Admission {
        if self.fail == FailMode::Closed {
            tracing::warn!(%why, "API guard: limiter unreachable; refusing (fail closed)");
            return Admission::Refused(tonic::Status::unavailable(
                "the concurrency limiter is unreachable; retry",
            ));
        }
        let count = self.fail_open.fetch_add(1, Ordering::Relaxed) + 1;
        tracing::warn!(%why, fail_open_total = count, "API guard: limiter unreachable; letting the request through (fail open)");
        Admission::Open
    }
}

/// What an admitted request holds for the life of its response body (only for its `Drop`).
enum Held {
    /// A limiter slot, released when dropped.
    Slot { _slot: HeldSlot },
    /// A unit of the local quota, given back when dropped.
    Permit { _permit: QuotaPermit },
}

/// A response body that keeps its guard slot until it is done.
struct GuardedBody {
    inner: tonic::body::Body,
    _held: Held,
}

impl Body for GuardedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

//! A limiter-svc client that sends Acquire, Release and Renew straight to the replica that
//! owns the key's (or slot's) shard, so no replica has to forward them.
//!
//! [`LimiterClient`] starts from seed addresses (the limiter address a service is
//! configured with, e.g. a Kubernetes Service). A background task, started by the first
//! call, fetches `GetShardMap` through a seed and refreshes it every [`REFRESH_EVERY`], and
//! sooner (at most once per [`REFRESH_AT_MOST`]) when an answer says the map is stale: it
//! carried `x-switchboard-forwarded`, or the owner could not be reached.
//!
//! A call goes to a seed whenever the owner is not known (no map yet, a limiter without
//! `GetShardMap`, a shard between owners) or was unreachable lately: any replica forwards
//! to the owner, so this is always correct, only one hop longer. A call that failed before
//! it was sent (connect error) is sent again through a seed. A call whose outcome is
//! unknown (the connection broke mid-call, or the limiter marked it
//! `switchboard-outcome-unknown`) is sent again only when that is idempotent: Release,
//! Renew, and an Acquire with a `request_id` — never an Acquire without one, which could
//! take a second slot.

mod refresh;
mod shard;
#[cfg(test)]
mod tests;

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};
use std::time::{Duration, Instant};

use proto::limiter::v1 as pb;
use proto::limiter::v1::limiter_service_client::LimiterServiceClient;
use tokio::sync::Notify;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Code, Status};

use self::shard::{DownOwners, route};
pub use self::shard::{ShardMap, key_hash, slot_shard};
use crate::client::{CallCredentials, ChannelPool, ClientTls};

/// Metadata on an answer a replica forwarded to the shard's owner: the map is stale.
pub use crate::client::FORWARDED;
/// Metadata on an UNAVAILABLE answer whose operation may or may not have applied.
pub const OUTCOME_UNKNOWN: &str = "switchboard-outcome-unknown";
/// How often the shard map is fetched again when nothing says it is stale.
pub const REFRESH_EVERY: Duration = Duration::from_secs(5);
/// The shortest gap between two fetches of the shard map.
pub const REFRESH_AT_MOST: Duration = Duration::from_secs(1);
/// How long a `GetShardMap` may take.
const FETCH_DEADLINE: Duration = Duration::from_secs(2);
/// How long an owner that could not be reached is skipped.
const DOWN_FOR: Duration = REFRESH_EVERY;

/// A generated limiter client over a channel with call credentials.
pub type RawLimiter = LimiterServiceClient<InterceptedService<Channel, CallCredentials>>;

/// Why a [`LimiterClient`] cannot be built.
#[derive(Debug, thiserror::Error)]
pub enum LimiterClientError {
    /// No seed address was given.
    #[error("no limiter address given")]
    NoSeed,
    /// A seed address is not usable.
    #[error("bad limiter address `{address}`: {source}")]
    Address {
        /// The address.
        address: String,
        /// Why.
        #[source]
        source: tonic::transport::Error,
    },
}

/// See the module docs. Cheap to clone: clones share the map, the channels and the
/// refresh task.
#[derive(Clone)]
pub struct LimiterClient {
    shared: Arc<Shared>,
}

/// What every clone of a client shares.
struct Shared {
    seeds: Vec<Channel>,
    /// The seed the next seed call starts with (round robin).
    next_seed: AtomicUsize,
    credentials: CallCredentials,
    /// The current map, `None` until one is fetched (or when the limiter has none).
    map: RwLock<Option<Arc<ShardMap>>>,
    /// One lazily connected channel per owner address.
    owners: ChannelPool,
    down: Mutex<DownOwners>,
    /// Wakes the refresh task early.
    stale: Arc<Notify>,
    refresher: OnceLock<()>,
}

impl std::fmt::Debug for LimiterClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LimiterClient")
            .field("seeds", &self.shared.seeds.len())
            .field("map", &self.map().map(|m| m.shard_count()))
            .finish_non_exhaustive()
    }
}

/// How a failed call failed, for deciding whether to send it again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// It never left: the connection could not be made.
    NotSent,
    /// It may or may not have applied.
    Unknown,
    /// The limiter answered with an error.
    Answered,
}

impl Failure {
    /// Classified by the error's type and metadata, never its text.
    fn of(status: &Status) -> Self {
        let mut source = std::error::Error::source(status);
        while let Some(cause) = source {
            if cause.is::<tonic::ConnectError>() {
                return Failure::NotSent;
            }
            source = cause.source();
        }
        if status.metadata().contains_key(OUTCOME_UNKNOWN) {
            return Failure::Unknown;
        }
        // A status the server sent has no source; one made here from a transport error
        // (a reset connection, a broken stream) has one.
        if std::error::Error::source(status).is_some() {
            return Failure::Unknown;
        }
        Failure::Answered
    }
}

impl LimiterClient {
    /// A client starting from `seeds` (`host:port` or URLs), calling over `tls` with
    /// `credentials`. Connects on first use; no runtime is needed until then.
    pub fn new<S: AsRef<str>>(
        seeds: impl IntoIterator<Item = S>,
        tls: &ClientTls,
        credentials: CallCredentials,
    ) -> Result<Self, LimiterClientError> {
        let seeds = seeds
            .into_iter()
            .map(|seed| {
                let address = seed.as_ref().trim();
                crate::client::channel_with(address, tls).map_err(|source| {
                    LimiterClientError::Address {
                        address: address.to_owned(),
                        source,
                    }
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if seeds.is_empty() {
            return Err(LimiterClientError::NoSeed);
        }
        Ok(Self {
            shared: Arc::new(Shared {
                seeds,
                next_seed: AtomicUsize::new(0),
                credentials,
                map: RwLock::default(),
                owners: ChannelPool::new(tls.clone()),
                down: Mutex::default(),
                stale: Arc::default(),
                refresher: OnceLock::new(),
            }),
        })
    }

    /// A client starting from `address`: one seed address, or several separated by
    /// commas (the form of the `--limiter` flag).
    pub fn from_address(
        address: &str,
        tls: &ClientTls,
        credentials: CallCredentials,
    ) -> Result<Self, LimiterClientError> {
        let seeds = address.split(',').filter(|seed| !seed.trim().is_empty());
        Self::new(seeds, tls, credentials)
    }

    /// The plain generated client over a seed, for the RPCs this client does not route
    /// (limits, usage, the shard map itself).
    pub fn seed(&self) -> RawLimiter {
        self.seed_at(self.shared.next_seed.fetch_add(1, Ordering::Relaxed))
    }

    /// The shard map in use, if one is known.
    pub fn map(&self) -> Option<Arc<ShardMap>> {
        self.shared
            .map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Acquire, sent to the owner of the key's shard. After an unknown outcome it is sent
    /// again only when it carries a `request_id`.
    pub async fn acquire(
        &self,
        request: pb::AcquireRequest,
    ) -> Result<pb::AcquireResponse, Status> {
        let owner = self.owner(|map| map.owner_of_key(&request.account_id, &request.resource));
        let idempotent = !request.request_id.is_empty();
        self.call(
            owner,
            idempotent,
            request,
            |mut client, request| async move { client.acquire(request).await },
        )
        .await
    }

    /// GetUsage, sent to the owner of the key's shard (a read: idempotent).
    pub async fn usage(
        &self,
        request: pb::GetUsageRequest,
    ) -> Result<pb::GetUsageResponse, Status> {
        let owner = self.owner(|map| map.owner_of_key(&request.account_id, &request.resource));
        self.call(owner, true, request, |mut client, request| async move {
            client.get_usage(request).await
        })
        .await
    }

    /// Release, sent to the owner of the slot's shard (idempotent).
    pub async fn release(
        &self,
        request: pb::ReleaseRequest,
    ) -> Result<pb::ReleaseResponse, Status> {
        let owner = self.owner(|map| map.owner_of_slot(&request.slot_id));
        self.call(owner, true, request, |mut client, request| async move {
            client.release(request).await
        })
        .await
    }

    /// Renew, sent to the owner of the slot's shard (idempotent: the new expiry is counted
    /// from the call).
    pub async fn renew(&self, request: pb::RenewRequest) -> Result<pb::RenewResponse, Status> {
        let owner = self.owner(|map| map.owner_of_slot(&request.slot_id));
        self.call(owner, true, request, |mut client, request| async move {
            client.renew(request).await
        })
        .await
    }

    /// The owner `pick` finds in the current map, unless it was unreachable lately; starts
    /// the refresh task on first use.
    fn owner(&self, pick: impl Fn(&ShardMap) -> Option<&Arc<str>>) -> Option<Arc<str>> {
        self.start_refresher();
        let map = self.map()?;
        let mut down = self
            .shared
            .down
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        route(pick(&map), &mut down, Instant::now()).cloned()
    }

    /// Runs `rpc` on `owner` when there is one, else (or when it was not reachable, or
    /// after an unknown outcome of an `idempotent` call) on a seed.
    async fn call<Req, Resp, F, Fut>(
        &self,
        owner: Option<Arc<str>>,
        idempotent: bool,
        request: Req,
        rpc: F,
    ) -> Result<Resp, Status>
    where
        Req: Clone,
        F: Fn(RawLimiter, Req) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        if let Some(owner) = owner
            && let Some(client) = self.owner_client(&owner)
        {
            match rpc(client, request.clone()).await {
                Ok(answer) => {
                    if crate::client::is_forwarded(answer.metadata()) {
                        self.shared.stale.notify_one();
                    }
                    return Ok(answer.into_inner());
                }
                Err(status) => match Failure::of(&status) {
                    Failure::NotSent => self.owner_unreachable(&owner, &status),
                    Failure::Unknown => {
                        if std::error::Error::source(&status).is_some() {
                            self.owner_unreachable(&owner, &status);
                        } else {
                            self.shared.stale.notify_one();
                        }
                        if !idempotent {
                            return Err(status);
                        }
                    }
                    Failure::Answered => {
                        if status.code() == Code::Unavailable {
                            self.shared.stale.notify_one();
                        }
                        return Err(status);
                    }
                },
            }
        }
        self.call_seed(request, rpc).await
    }

    /// Runs `rpc` on the seeds in turn until one can be reached.
    async fn call_seed<Req, Resp, F, Fut>(&self, request: Req, rpc: F) -> Result<Resp, Status>
    where
        Req: Clone,
        F: Fn(RawLimiter, Req) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Resp>, Status>>,
    {
        let first = self.shared.next_seed.fetch_add(1, Ordering::Relaxed);
        let mut last = None;
        for attempt in 0..self.shared.seeds.len() {
            match rpc(self.seed_at(first + attempt), request.clone()).await {
                Ok(answer) => return Ok(answer.into_inner()),
                Err(status) if Failure::of(&status) == Failure::NotSent => last = Some(status),
                Err(status) => return Err(status),
            }
        }
        Err(last.unwrap_or_else(|| Status::unavailable("no limiter address to call")))
    }

    fn seed_at(&self, index: usize) -> RawLimiter {
        let channel = self.shared.seeds[index % self.shared.seeds.len()].clone();
        LimiterServiceClient::with_interceptor(channel, self.shared.credentials.clone())
    }

    /// The client of `owner`'s cached channel (made on first use); `None` if its address
    /// is unusable.
    fn owner_client(&self, owner: &Arc<str>) -> Option<RawLimiter> {
        let channel = match self.shared.owners.get(owner) {
            Ok(channel) => channel,
            Err(err) => {
                tracing::debug!(%owner, %err, "limiter client: unusable owner address; calling a seed");
                return None;
            }
        };
        Some(LimiterServiceClient::with_interceptor(
            channel,
            self.shared.credentials.clone(),
        ))
    }

    fn owner_unreachable(&self, owner: &Arc<str>, status: &Status) {
        tracing::debug!(%owner, code = ?status.code(), "limiter client: shard owner unreachable; calling a seed");
        self.shared
            .down
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .mark(owner, Instant::now() + DOWN_FOR);
        self.shared.stale.notify_one();
    }

    /// Spawns the refresh task once, on the first call (which runs inside a runtime).
    fn start_refresher(&self) {
        self.shared.refresher.get_or_init(|| {
            let shared = Arc::downgrade(&self.shared);
            let stale = Arc::clone(&self.shared.stale);
            tokio::spawn(refresh::run(shared, stale));
        });
    }
}

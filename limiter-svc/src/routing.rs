//! Who owns which shard, and getting an operation to it.
//!
//! Every replica registers itself under `<prefix>/limiter/members/<replica_id>` (value: its
//! address) and claims shards under `<prefix>/limiter/shards/<nn>`, both attached to its
//! replica lease. A mirror of both prefixes gives every replica the same [`View`]; the
//! [`Dispatcher`] sends each operation to the engine when this replica owns the key's
//! shard, and otherwise forwards it to the owner through `LimiterPeerService`. While a shard
//! has no owner (its owner crashed and its lease has not yet expired, or a claim is in
//! progress) operations wait for the view to change, up to a routing deadline.

use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use etcd_client::PutOptions;
use plumbing::client::{CallCredentials, ChannelPool, ClientTls};
use plumbing::etcd::{EtcdError, EtcdSession, Mirror, MirrorUpdate};
use proto::limiter::v1::limiter_peer_service_client::LimiterPeerServiceClient;
use tokio::sync::watch;
use tokio::time::Instant;
use tonic::Code;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::engine::{EngineError, EngineHandle, Owner, View};
use crate::error::Error;

/// A client to another replica's relay.
pub type PeerClient = LimiterPeerServiceClient<InterceptedService<Channel, CallCredentials>>;

/// How long an operation may wait for its shard to get a reachable owner.
pub const ROUTING_DEADLINE: Duration = Duration::from_secs(3);
/// How long the owner may take to answer one forwarded operation, beyond the caller's wait:
/// its slot txn is bounded by the etcd call deadline.
const FORWARD_DEADLINE: Duration = Duration::from_secs(6);

/// Keeps the [`View`] current and this replica registered.
#[derive(Debug)]
pub struct Membership {
    /// The current view.
    pub view: watch::Receiver<View>,
    session: EtcdSession,
    key: String,
    /// Stops re-registering (on leave and on drop).
    rejoin: tokio_util::sync::CancellationToken,
    _mirrors: [Mirror; 2],
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.rejoin.cancel();
    }
}

impl Membership {
    /// Registers this replica under the lease in force in `leases`, registers it again
    /// under each lease that replaces a lost one, and starts mirroring members and shard
    /// owners.
    pub async fn join(
        session: &EtcdSession,
        replica_id: &str,
        address: &str,
        mut leases: watch::Receiver<i64>,
    ) -> Result<Self, EtcdError> {
        let key = session.key(&format!("limiter/members/{replica_id}"));
        let lease = *leases.borrow_and_update();
        register(session, &key, address, lease).await?;
        let rejoin = tokio_util::sync::CancellationToken::new();
        {
            let (session, key, address) = (session.clone(), key.clone(), address.to_owned());
            let stop = rejoin.clone();
            tokio::spawn(async move {
                loop {
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        changed = leases.changed() => if changed.is_err() { return },
                    }
                    let lease = *leases.borrow_and_update();
                    // Until it answers: a replica out of the membership gets no shards.
                    loop {
                        let put = register(&session, &key, &address, lease);
                        let result = tokio::select! {
                            _ = stop.cancelled() => return,
                            result = put => result,
                        };
                        match result {
                            Ok(()) => {
                                tracing::warn!(
                                    lease,
                                    "rejoined the membership under a new replica lease"
                                );
                                break;
                            }
                            Err(err) => {
                                tracing::warn!(lease, error = %err, "cannot rejoin the membership yet; retrying");
                                tokio::time::sleep(Duration::from_millis(500)).await;
                            }
                        }
                    }
                }
            });
        }
        let (tx, view) = watch::channel(View::default());
        let state = Arc::new(RwLock::new(View::default()));
        let members = {
            let (state, tx, prefix) = (state.clone(), tx.clone(), session.key("limiter/members/"));
            Mirror::start(session, prefix.clone(), move |update| {
                if let Ok(mut view) = state.write() {
                    apply_member(&mut view, &prefix, update);
                    tx.send_replace(view.clone());
                }
            })
        };
        let shards = {
            let prefix = session.key("limiter/shards/");
            Mirror::start(session, prefix.clone(), move |update| {
                if let Ok(mut view) = state.write() {
                    apply_shard(&mut view, &prefix, update);
                    tx.send_replace(view.clone());
                }
            })
        };
        members.wait_for(1, plumbing::etcd::CALL_DEADLINE).await;
        shards.wait_for(1, plumbing::etcd::CALL_DEADLINE).await;
        Ok(Self {
            view,
            session: session.clone(),
            key,
            rejoin,
            _mirrors: [members, shards],
        })
    }

    /// Deletes this replica's membership key (the first step of a graceful leave): the
    /// others drop it from the assignment and take its shards as it hands them off.
    pub fn leave(&self) -> impl Future<Output = Result<(), EtcdError>> + Send + 'static {
        let (session, key) = (self.session.clone(), self.key.clone());
        let rejoin = self.rejoin.clone();
        async move {
            rejoin.cancel();
            let mut client = session.client();
            session.bounded(client.delete(key, None)).await.map(|_| ())
        }
    }
}

/// Puts this replica's membership key under `lease` (a put is safe to repeat).
async fn register(
    session: &EtcdSession,
    key: &str,
    address: &str,
    lease: i64,
) -> Result<(), EtcdError> {
    session
        .retry(plumbing::etcd::CALL_DEADLINE, |mut client| {
            let (key, address) = (key.to_owned(), address.to_owned());
            async move {
                client
                    .put(key, address, Some(PutOptions::new().with_lease(lease)))
                    .await
            }
        })
        .await
        .map(|_| ())
}

fn apply_member(view: &mut View, prefix: &str, update: MirrorUpdate) {
    let id_of = |raw: &[u8]| {
        std::str::from_utf8(raw)
            .ok()
            .and_then(|k| k.strip_prefix(prefix))
            .map(str::to_owned)
    };
    match update {
        MirrorUpdate::Reset { kvs, .. } => {
            view.members = kvs
                .iter()
                .filter_map(|kv| {
                    Some((
                        id_of(kv.key())?,
                        String::from_utf8_lossy(kv.value()).into_owned(),
                    ))
                })
                .collect();
        }
        MirrorUpdate::Put(kv) => {
            if let Some(id) = id_of(kv.key()) {
                view.members
                    .insert(id, String::from_utf8_lossy(kv.value()).into_owned());
            }
        }
        MirrorUpdate::Delete(kv) => {
            if let Some(id) = id_of(kv.key()) {
                view.members.remove(&id);
            }
        }
    }
}

#[derive(serde::Deserialize)]
struct OwnerRecord {
    replica_id: String,
    address: String,
}

fn apply_shard(view: &mut View, prefix: &str, update: MirrorUpdate) {
    let shard_of = |raw: &[u8]| {
        let text = std::str::from_utf8(raw).ok()?.strip_prefix(prefix)?;
        u16::from_str_radix(text, 16).ok()
    };
    let owner_of = |kv: &etcd_client::KeyValue| {
        let record: OwnerRecord = serde_json::from_slice(kv.value()).ok()?;
        Some(Owner {
            replica_id: record.replica_id,
            address: record.address,
            claim_revision: kv.create_revision(),
        })
    };
    match update {
        MirrorUpdate::Reset { kvs, .. } => {
            view.owners = kvs
                .iter()
                .filter_map(|kv| Some((shard_of(kv.key())?, owner_of(kv)?)))
                .collect();
        }
        MirrorUpdate::Put(kv) => {
            if let (Some(shard), Some(owner)) = (shard_of(kv.key()), owner_of(&kv)) {
                view.owners.insert(shard, owner);
            }
        }
        MirrorUpdate::Delete(kv) => {
            if let Some(shard) = shard_of(kv.key()) {
                view.owners.remove(&shard);
                view.vacated.insert(shard, kv.create_revision());
            }
        }
    }
}

/// Sends operations to the owner of their shard.
#[derive(Clone)]
pub struct Dispatcher {
    me: String,
    engine: EngineHandle,
    view: watch::Receiver<View>,
    credentials: Option<CallCredentials>,
    peers: ChannelPool,
}

impl std::fmt::Debug for Dispatcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Dispatcher")
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

enum Target {
    Local,
    Peer(Box<PeerClient>),
}

impl Dispatcher {
    /// A dispatcher for replica `me`; `credentials` sign calls to peers (None: no platform
    /// secret, so keys owned elsewhere are unreachable), made over `tls`.
    pub fn new(
        me: String,
        engine: EngineHandle,
        view: watch::Receiver<View>,
        credentials: Option<CallCredentials>,
        tls: ClientTls,
    ) -> Self {
        Self {
            me,
            engine,
            view,
            credentials,
            peers: ChannelPool::new(tls),
        }
    }

    /// The local engine.
    pub fn engine(&self) -> &EngineHandle {
        &self.engine
    }

    /// Addresses of every other live replica.
    pub fn peer_addresses(&self) -> Vec<String> {
        self.view
            .borrow()
            .members
            .iter()
            .filter(|(id, _)| **id != self.me)
            .map(|(_, a)| a.clone())
            .collect()
    }

    /// A relay client to `address`.
    pub fn peer(&self, address: &str) -> Result<PeerClient, Error> {
        let credentials = self.credentials.clone().ok_or(Error::NoPeerCredentials)?;
        let channel = self
            .peers
            .get(address)
            .map_err(|e| Error::Peer(tonic::Status::unavailable(e.to_string())))?;
        Ok(LimiterPeerServiceClient::with_interceptor(
            channel,
            credentials,
        ))
    }

    fn target(&self, shard: u16) -> Option<Result<Target, Error>> {
        let owner = self.view.borrow().owners.get(&shard).cloned();
        match owner {
            Some(owner) if owner.replica_id == self.me => Some(Ok(Target::Local)),
            Some(owner) => Some(self.peer(&owner.address).map(|p| Target::Peer(Box::new(p)))),
            None if self.engine.owned().contains(&shard) => Some(Ok(Target::Local)),
            None => None,
        }
    }

    /// The shard map as this replica sees it (GetShardMap).
    pub fn shard_map(&self) -> proto::limiter::v1::GetShardMapResponse {
        let view = self.view.borrow();
        let mut owners: Vec<_> = view
            .owners
            .iter()
            .map(|(shard, owner)| proto::limiter::v1::ShardOwner {
                shard: u32::from(*shard),
                replica_id: owner.replica_id.clone(),
                address: owner.address.clone(),
            })
            .collect();
        owners.sort_by_key(|o| o.shard);
        let mut members: Vec<String> = view.members.values().cloned().collect();
        members.sort();
        proto::limiter::v1::GetShardMapResponse {
            shard_count: u32::from(crate::model::SHARDS),
            owners,
            members,
        }
    }

    /// Runs `local` on the engine or `remote` on the owner, re-routing while the shard has
    /// no reachable owner, until `extra` past the routing deadline. Answers whether the
    /// call was forwarded to another replica.
    pub async fn route<T, L, LF, R, RF>(
        &self,
        shard: u16,
        extra: Duration,
        local: L,
        remote: R,
    ) -> Result<(T, bool), Error>
    where
        L: Fn(EngineHandle) -> LF,
        LF: Future<Output = Result<T, EngineError>>,
        R: Fn(PeerClient) -> RF,
        RF: Future<Output = Result<T, tonic::Status>>,
    {
        let deadline = Instant::now() + ROUTING_DEADLINE + extra;
        let mut view = self.view.clone();
        loop {
            match self.target(shard) {
                Some(Ok(Target::Local)) => match local(self.engine.clone()).await {
                    Err(EngineError::NotOwner(_)) => {}
                    other => return other.map(|v| (v, false)).map_err(Error::Engine),
                },
                Some(Ok(Target::Peer(client))) => {
                    match forward_within(FORWARD_DEADLINE + extra, remote(*client)).await {
                        Err(status) if retryable(&status) => {
                            tracing::debug!(shard, code = ?status.code(), "owner unreachable or moved; re-routing");
                        }
                        other => return other.map(|v| (v, true)).map_err(Error::Peer),
                    }
                }
                Some(Err(err)) => return Err(err),
                None => {}
            }
            if Instant::now() >= deadline {
                return Err(Error::NoOwner(shard));
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), view.changed()).await;
        }
    }
}

/// `call` to a peer, or UNAVAILABLE marked [`crate::error::OUTCOME_UNKNOWN`] when it does not
/// answer within `within`: the owner may have applied it, so it is not routed again.
async fn forward_within<T>(
    within: Duration,
    call: impl Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    tokio::time::timeout(within, call)
        .await
        .unwrap_or_else(|_| {
            let mut status = tonic::Status::unavailable(format!(
                "the shard's owner did not answer within {within:?}; retry with the same request_id"
            ));
            status.metadata_mut().insert(
                crate::error::OUTCOME_UNKNOWN,
                tonic::metadata::MetadataValue::from_static("1"),
            );
            Err(status)
        })
}

/// ABORTED: the peer does not own the shard. UNAVAILABLE, UNKNOWN or CANCELLED without the
/// peer's [`crate::error::OUTCOME_UNKNOWN`] mark: the transport failed or the peer went away
/// mid-call. Routing again is safe for the invariants: an operation the dead peer did apply
/// is either counted by the next owner (a slot nobody holds expires at its hold) or was a
/// release the next owner still counts until expiry — never an over-admission.
fn retryable(status: &tonic::Status) -> bool {
    status.code() == Code::Aborted
        || (matches!(
            status.code(),
            Code::Unavailable | Code::Unknown | Code::Cancelled
        ) && !status
            .metadata()
            .contains_key(crate::error::OUTCOME_UNKNOWN))
}

//! limiter-svc: strict, crash-safe concurrency slots on etcd.
//!
//! A caller acquires a slot for (account, resource) before doing work and releases it
//! after; while the key holds as many slots as its limit, Acquire rejects (or queues).
//!
//! # Design
//!
//! **One authoritative writer per key.** Keys hash into [`model::SHARDS`] shards. Each shard
//! is owned by one replica at a time, which decides every operation on its keys in memory
//! ([`table::SlotTable`]) — exact counts, FIFO queues, idempotency by `request_id` — so a
//! rejection costs no etcd request at all, and grants and releases are group-committed: the
//! engine ([`engine`]) packs whatever accumulated while the previous txn was in flight into
//! one txn of up to [`engine::MAX_TXN_OPS`] operations, with at most two txns in flight
//! (a slot is never in two at once, and a shard is reloaded only when none of its txns is
//! in flight). Thousands of slot operations a second cost hundreds of etcd requests. Other replicas forward to the owner
//! (`LimiterPeerService`, [`routing`], [`relay`]).
//!
//! **etcd key layout** (under `--etcd-prefix`, default `/switchboard`):
//!
//! | key | value | lease |
//! |---|---|---|
//! | `limiter/limits/<account>/<resource>` | `{"max_in_flight","shadow"}` | none |
//! | `limiter/members/<replica_id>` | the replica's gRPC address | replica lease |
//! | `limiter/shards/<nn>` | `{"replica_id","address"}` of the owner | owner's replica lease |
//! | `limiter/slots/<nn>/<slot_id>` | `{"a":account,"r":resource,"q":request_id,"e":expire_ms}` | bucket lease |
//!
//! **Leases.** Each replica has one lease (`--replica-ttl`, kept alive every TTL/3) carrying
//! its membership and shard ownership. Slots are not kept alive: each sits on a *bucket
//! lease* shared by every slot expiring in the same second, granted with a TTL that ends one
//! second after that second (one lease grant per second at most, not one per request). A
//! slot therefore disappears from etcd at most ~2 s after the expiry the caller was given;
//! the owner frees it in memory at exactly that expiry.
//!
//! **Why no interleaving can over-admit.** (1) Only the owner decides grants for a key, and
//! it counts a grant from the moment it decides it, committed or not, so its decisions
//! never exceed the limit. (2) A caller hears GRANTED only after the slot's record is
//! committed, so every slot any caller holds is in etcd. (3) Every slot txn is fenced: it
//! compares the create revision of the shard's ownership key with the owner's claim
//! revision, so a replica that lost a shard (its lease expired and another replica claimed
//! the shard) cannot commit anything more for it. (4) A new owner claims the shard and
//! reads its slots in one txn, after every commit of the previous owner that can ever
//! succeed; it starts from exactly the slots callers may hold. Releases are acknowledged
//! before their delete commits: until it does, etcd holds one slot too many, which can
//! only make a successor more conservative, never less. Lowering a limit below the number
//! in flight grants nothing new until usage falls under it, because the rule is `held <
//! limit` on every decision.
//!
//! **Crashes.** *A holder dies*: its slots expire at their hold time (bucket leases).
//! *A replica is killed*: its ownership keys vanish when its replica lease expires (within
//! `--replica-ttl`); the preferred live replica (rendezvous hash) claims each orphaned
//! shard and rebuilds exact counts from the slot records; meanwhile operations on those
//! shards wait up to [`routing::ROUTING_DEADLINE`] and then fail UNAVAILABLE. *A txn fails
//! or times out*: its waiters get UNAVAILABLE (retry with the same `request_id` returns the
//! slot if it was stored) and the shard is reloaded from etcd. *etcd loses its leader*:
//! txns stall until a new leader is elected; nothing is decided on uncommitted state, and
//! etcd extends lease TTLs across the election, which only delays expiry. *Usage counters*
//! (granted/rejected totals) live with the owner and restart from zero on a new owner.
//!
//! **Its own API.** The limiter cannot guard itself through itself: each account may have
//! at most `--max-inflight-per-account` requests in flight on one replica (a local count,
//! [`plumbing::guard::GuardLayer::local`]); beyond it calls get the guard's
//! RESOURCE_EXHAUSTED with `retry-after-ms`. Platform callers (the other services' guards
//! and routers, peers forwarding) are exempt, as with the guard. A queued Acquire may run
//! its `wait_timeout_ms` on top of `--request-timeout`.
//!
//! **Known limits.** A new replica only claims shards that are unowned; shards are not
//! moved to it while their owner lives. Replicas need the platform secret to forward.
#![forbid(unsafe_code)]

pub mod api;
pub mod convert;
pub mod engine;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod limits;
pub mod model;
pub mod relay;
pub mod routing;
pub mod slots;
pub mod stats;
pub mod table;

use std::future::Future;
use std::net::SocketAddr;

use clap::Args;
use plumbing::auth::Scope;
use plumbing::client::CallCredentials;
use plumbing::config::CommonArgs;
use plumbing::etcd::EtcdError;
use plumbing::guard::GuardLayer;
use plumbing::limits::LongCall;
use plumbing::server::{Replica, ServeError};
use proto::limiter::v1::limiter_peer_service_server::LimiterPeerServiceServer;
use proto::limiter::v1::limiter_service_server::LimiterServiceServer;
use tokio::net::TcpListener;
use tonic::server::NamedService;
use tonic::service::Routes;

/// Flags of the limiter server.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to serve gRPC on.
    #[arg(long, env = "SWITCHBOARD_LISTEN", default_value = "127.0.0.1:50052")]
    pub listen: SocketAddr,

    /// Limit for keys with neither an account limit nor a `*` default (0: unlimited).
    #[arg(long, env = "SWITCHBOARD_DEFAULT_LIMIT", default_value_t = 100)]
    pub default_limit: u32,

    /// Flags every Switchboard server takes.
    #[command(flatten)]
    pub common: CommonArgs,
}

/// The limiter's own flags.
#[derive(Debug, Clone, Args)]
pub struct LimiterArgs {
    /// Most requests one account may have in flight on this replica's own API (platform
    /// callers exempt); beyond it calls are refused with RESOURCE_EXHAUSTED and a retry hint.
    #[arg(long, env = "SWITCHBOARD_MAX_INFLIGHT_PER_ACCOUNT", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_inflight_per_account: u32,

    /// `host:port` the other limiter replicas use to forward calls for the shards this one
    /// owns (registered in etcd). Default: the listen address, which must then be one the
    /// others can reach (not 0.0.0.0).
    #[arg(long, env = "SWITCHBOARD_ADVERTISE_ADDRESS")]
    pub advertise_address: Option<String>,
}

impl Default for LimiterArgs {
    fn default() -> Self {
        Self {
            max_inflight_per_account: 1000,
            advertise_address: None,
        }
    }
}

/// Unary calls that may wait `wait_timeout_ms` (at most [`model::MAX_WAIT_MS`]) by contract.
const WAITING_CALLS: [&str; 2] = [
    "/switchboard.limiter.v1.LimiterService/Acquire",
    "/switchboard.limiter.v1.LimiterPeerService/Forward",
];

/// Serves limiter-svc with default limiter flags on `listener` until `stop` resolves.
pub async fn run(
    args: ServeArgs,
    listener: TcpListener,
    stop: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    run_with(args, LimiterArgs::default(), listener, stop).await
}

/// Serves limiter-svc on `listener` until `stop` resolves.
pub async fn run_with(
    args: ServeArgs,
    limiter: LimiterArgs,
    listener: TcpListener,
    stop: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let address = listener.local_addr()?;
    let wait = LongCall::Extra(std::time::Duration::from_millis(u64::from(
        model::MAX_WAIT_MS,
    )));
    let replica = Replica::start(&args.common, address)
        .await?
        .with_guard(Some(GuardLayer::local(
            limiter.max_inflight_per_account as usize,
        )))
        .with_long_calls(&WAITING_CALLS.map(|path| (path, wait)));
    let advertise = limiter
        .advertise_address
        .clone()
        .unwrap_or_else(|| address.to_string());
    if advertise
        .parse::<std::net::SocketAddr>()
        .is_ok_and(|a| a.ip().is_unspecified())
    {
        tracing::warn!(%advertise, "advertising an unspecified address: peers cannot forward here; set --advertise-address");
    }
    let limits = limits::LimitTable::start(&replica.session, args.default_limit);
    if !limits.ready(plumbing::etcd::CALL_DEADLINE).await {
        return Err(EtcdError::Unavailable("could not load limits".into()).into());
    }
    let membership = routing::Membership::join(
        &replica.session,
        &replica.replica_id,
        &advertise,
        replica.lease.id(),
    )
    .await?;
    let engine = engine::start(engine::EngineConfig {
        session: replica.session.clone(),
        replica_id: replica.replica_id.clone(),
        address: advertise.clone(),
        replica_lease: replica.lease.id(),
        lease_lost: replica.lease.lost(),
        limits: limits.clone(),
        view: membership.view.clone(),
        stats: stats::EngineStats::register(&replica.metrics),
    });
    let credentials = args
        .common
        .platform_secret
        .as_ref()
        .filter(|s| !s.is_empty())
        .map(|secret| {
            CallCredentials::platform(
                &args.common.platform_key_id,
                secret.as_bytes(),
                &[Scope::LimiterAcquire, Scope::LimiterAdmin],
            )
        });
    let dispatcher = routing::Dispatcher::new(
        replica.replica_id.clone(),
        engine.clone(),
        membership.view.clone(),
        credentials,
        replica.client_tls().clone(),
    );
    let api = api::LimiterApi::new(slots::Slots::new(dispatcher), limits);
    let max_message = args.common.limits.max_message_bytes();
    let routes = Routes::new(LimiterServiceServer::new(api).max_decoding_message_size(max_message))
        .add_service(
            LimiterPeerServiceServer::new(relay::Relay::new(engine))
                .max_decoding_message_size(max_message),
        );
    let result = replica
        .serve(
            listener,
            routes,
            &[<LimiterServiceServer<api::LimiterApi> as NamedService>::NAME],
            stop,
        )
        .await;
    drop(membership);
    result
}

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
//! in flight). Thousands of slot operations a second cost hundreds of etcd requests, and
//! escrow (below) takes most of them off etcd altogether. Other replicas forward to the
//! owner (`LimiterPeerService`, [`routing`], [`relay`]); clients that know the shard map
//! (GetShardMap, `plumbing::limiter`) call the owner directly.
//!
//! **Even ownership.** Every replica computes the same assignment of shards to the live
//! members (`limiter/members/`) — bounded-load rendezvous hashing
//! ([`engine::View::assignment`]): each replica gets `48 / n` shards or one more. There are
//! 48 shards ([`model::SHARDS`]) because 48 divides evenly among 1, 2, 3, 4, 6, 8, 12 and 16
//! replicas (16 shards over 3 replicas is 6/5/5: one replica a fifth busier than the others)
//! while a shard is still big enough that per-shard overheads (one ownership key, one
//! fence compare per txn) stay negligible. A replica claims unowned shards assigned to it at
//! once, and any unowned shard after a grace of one second (so a shard
//! whose assigned owner died is not left without a decision for longer).
//!
//! **Planned handoff.** When the assignment says a shard it owns belongs to another live
//! replica (a replica joined) or it is leaving (SIGTERM: it first deletes its membership key
//! so the others re-assign), the owner (1) stops deciding for the shard — calls get
//! NotOwner and the routing layer retries them until the new owner serves (callers wait,
//! they are not failed); (2) waits until none of the shard's writes is queued or in flight,
//! so everything it answered is committed; (3) writes every escrow slot of the shard as an
//! exact slot record, then deletes its escrow blocks and the ownership key, in fenced txns
//! (slots first: every prefix of the sequence leaves etcd counting at least every held
//! slot). The new owner sees the ownership key vanish, claims the shard (compare
//! create-revision 0, so at a new, higher revision) and reads it back in the same txn. The
//! gap is a few etcd round trips (milliseconds). On SIGTERM a replica hands every shard
//! off (bounded by 5 s) before it drains; what is not handed off in time fails over when
//! its lease expires.
//!
//! **Strict escrow** ([`engine`]'s `escrow` module). A per-slot etcd write caps the whole
//! fleet at etcd's write rate, so for keys with large limits (`--escrow-min-limit`, default
//! 100) the owner writes one *block* record per key: `count` slots, all held until `e`.
//! Grants and releases within the block are decided in memory and answered at once — no
//! etcd write, no fsync wait. The block is resized (about twice the slots held, plus 8),
//! extended (it outlives the longest hold by 30 s) and deleted when idle, one write per key
//! every ~20 s under steady load. Small limits, idempotent retries (`request_id`), queued
//! callers and holds over 300 s stay exact.
//!
//! **Fencing tokens.** Every grant carries `fencing_token = revision << 24 | n`: the latest
//! etcd revision the owner has seen for the shard (its claim, or its last commit) and a
//! sequence number within it. It is stored in exact slot records, so Renew and an
//! idempotent retry return the same token.
//!
//! **etcd key layout** (under `--etcd-prefix`, default `/switchboard`):
//!
//! | key | value | lease |
//! |---|---|---|
//! | `limiter/limits/<account>/<resource>` | `{"max_in_flight","shadow"}` | none |
//! | `limiter/members/<replica_id>` | the replica's gRPC address | replica lease |
//! | `limiter/shards/<nn>` | `{"replica_id","address"}` of the owner | owner's replica lease |
//! | `limiter/slots/<nn>/<slot_id>` | `{"a":account,"r":resource,"q":request_id,"e":expire_ms,"f":token}` | bucket lease |
//! | `limiter/slots/<nn>/<block_id>` | `{"a","r","n":count,"e":expire_ms}` (an escrow block) | bucket lease |
//! | `limiter/commits/<nn>` | the nonce of the shard's last slot txn (its commit marker) | none (48 keys in all) |
//!
//! **Leases.** Each replica has one lease (`--replica-ttl`, kept alive every TTL/3) carrying
//! its membership and shard ownership. Slots and blocks are not kept alive: each sits on a
//! *bucket lease* shared by every record expiring in the same second, granted with a TTL
//! that ends one second after that second (one lease grant per second at most, not one per
//! request). A record therefore disappears from etcd at most ~2 s after its expiry; the
//! owner frees a slot in memory at exactly that expiry.
//!
//! # Why invariant 1 holds (no over-admission, ever)
//!
//! Call a slot *held* from the moment a caller is told GRANTED until it is released or
//! expires. The argument rests on one durable statement, kept true at every instant for
//! every key: **etcd counts at least every held slot** — each held slot is either an exact
//! record in etcd, or one of at most `n` escrow slots of a block record `(n, e)` whose
//! expiry `e` is no earlier than the slot's.
//!
//! - *Exact slots*: a caller hears GRANTED only after the slot's record is committed.
//!   A release is answered before its delete commits: etcd holds one slot too many for a
//!   moment, which can only make a successor more conservative.
//! - *Escrow slots*: the owner answers a slot from a block only while the escrow slots of
//!   the key (this one included) are at most the block's capacity and the slot's expiry is
//!   within the block's; the capacity is the lesser of what etcd is known to hold and what
//!   a block write in flight may leave there (if a write's outcome is unknown, etcd holds
//!   one or the other). A block is only ever rewritten to a count at least the escrow slots
//!   of the key and an expiry at least theirs, so no write makes the statement false. A slot
//!   the block does not cover waits, counted, until a write that covers it commits.
//!   Renewing past the block's expiry likewise waits for an extension.
//!
//! **One decider per key.** Only the owner decides grants for a key, on every decision
//! under `held < limit` where `held` counts exact slots, escrow slots and *phantoms* (blocks
//! inherited from a previous owner, counted as `n` held slots until their expiry) — committed
//! or not, from the moment they are decided. Every txn is fenced on the create revision of
//! the shard's ownership key, so a replica that lost the shard commits nothing more for it.
//!
//! - *Crash of an owner* (or its lease lost to a partition): its ownership key vanishes with
//!   its lease; a successor claims the shard and reads its records in the same txn, after
//!   every commit of the old owner that can ever succeed. By the durable statement it starts
//!   from a count at least the slots held: exact records as slots, blocks as phantoms. A
//!   zombie owner that has not noticed yet can go on granting from its blocks in memory, but
//!   only within them — at most `n` slots until `e` — exactly what the successor counts as
//!   held. It cannot grow a block or write an exact slot (fenced), so it cannot exceed that.
//! - *Its own lease lost, the replica alive* (revoked, or expired through a long pause): the
//!   lease keeper grants a new lease and publishes it (`Lease::changes`). The engine then
//!   gives up every shard — each waiter is answered NotOwner and retried by the routing
//!   layer, the in-memory table and its escrow slots are dropped — and the membership key is
//!   written again under the new lease. Until then the replica is exactly the zombie above:
//!   its ownership keys vanished with the old lease, so every txn it sends fails its fence
//!   and only grants within blocks it already had can be answered. It claims shards again
//!   like any successor, at a new create revision, reading the shard in the claim txn: exact
//!   slots held through the loss come back as exact slots (still releasable by their ids),
//!   its old blocks come back as phantoms counted until their expiry. Nonces carry the lease
//!   id and a counter that is never reset, so a marker written under the old lease is never
//!   taken for one of the new claim's commits.
//! - *Planned handoff*: the old owner decides nothing more for the shard before it writes
//!   it out; it writes the escrow slots as exact records before deleting their blocks, so
//!   the statement holds after every txn of the sequence; the new owner reads the shard in
//!   its claim txn, after the last of them. It gets the exact slots, so no capacity is lost.
//! - *Limit decrease*: admission compares against the limit in force on every decision, so
//!   nothing is granted until usage (including phantoms) falls under the new limit; blocks
//!   only bound what a successor counts — a block larger than a lowered limit makes a
//!   successor more conservative, never less.
//! - *etcd leader loss*: txns stall or fail; nothing is answered on an uncommitted write
//!   (exact) or an uncommitted block (escrow). The owner keeps the shard and its table: a
//!   slot txn is retried (each attempt under plumbing's 1 s attempt deadline, on the etcd
//!   member answering its probes, for up to 8 s) until the new leader commits it, and its
//!   waiters are answered then; grants from existing blocks, releases and rejections go on
//!   meanwhile, in memory. Only a txn that fails its compares (the shard changed hands) or
//!   stays unanswered for the whole budget fails its waiters (UNAVAILABLE; retry with the
//!   same `request_id`) and reloads the shard under the same claim — escrow slots of that
//!   shard then become phantoms, counted until their block expires. etcd extends lease TTLs
//!   across an election, which only delays expiry.
//!
//! **Retried commits.** Sending a txn again is only safe if no attempt can apply twice or
//! late, after a later write of the same key (a renew's older expiry, a block's smaller
//! count would then undo a newer record, and etcd would count less than is held). An
//! attempt without an answer can still apply later — it may sit in a stopped member's
//! socket and be proposed when the member resumes. So every slot txn also compares the mod
//! revision of the shard's commit marker `limiter/commits/<nn>` with the one this owner
//! last saw (read in the claim txn, then the revision of each of its own commits) and
//! rewrites the marker with a nonce never used before (replica id, replica lease id,
//! counter). A shard has at most one txn in flight, so: (1) of all attempts of one txn at
//! most one applies — the first to apply moves the marker and fails the others' compare;
//! (2) no attempt applies after a later txn of the shard, which expects the marker the
//! earlier one left; (3) an attempt whose answer was lost is recognised: the retry fails
//! its compare, and its failure branch reads the markers — carrying our nonce, the txn
//! applied at their mod revision; carrying anything else, the shard changed hands and is
//! reloaded. So a write's outcome, even unknown for a while, is one of "applied once, in
//! order" or "never applied", which is what the escrow argument above assumes. A claim
//! whose answer was lost is recognised the same way: the ownership key carries our lease.
//! Handoff txns carry the marker too.

//! **Why tokens strictly increase per key** (invariant 7). Within one owner, tokens of a shard
//! are numbered in decision order under a revision that never goes back. A new owner claims
//! at a revision above every revision of the old owner's txns, and the old owner's tokens
//! carry revisions it saw, so every token of the new owner is above every token of the old
//! one. A zombie's late grants carry its old revision: a downstream that remembers the
//! highest token refuses them.
//!
//! **Crashes.** *A holder dies*: its slots expire at their hold time (bucket leases).
//! *A replica is killed*: its shards fail over when its replica lease expires (within
//! `--replica-ttl`); meanwhile operations on those shards wait up to
//! [`routing::ROUTING_DEADLINE`] and then fail UNAVAILABLE. Its escrow slots' holders are
//! unknown to the successor: their Renew answers NOT_FOUND and their Release `false`, and
//! the block's capacity returns at its expiry. *Usage counters* (granted/rejected totals)
//! live with the owner and restart from zero on a new owner.
//!
//! **Its own API.** The limiter cannot guard itself through itself: each account may have
//! at most `--max-inflight-per-account` requests in flight on one replica (a local count,
//! [`plumbing::guard::GuardLayer::local`]); beyond it calls get the guard's
//! RESOURCE_EXHAUSTED with `retry-after-ms`. Platform callers (the other services' guards
//! and routers, peers forwarding) are exempt, as with the guard. A queued Acquire may run
//! its `wait_timeout_ms` on top of `--request-timeout`.
//!
//! **Known limits.** Replicas need the platform secret to forward. A txn that cannot commit
//! for its whole 8 s budget (etcd without quorum that long) reloads the whole shard,
//! turning its escrow slots into phantoms for up to a hold plus 30 s. Queued callers of a shard being handed off are told to route again and
//! queue anew at the new owner (they lose their place).
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

    /// Keys whose limit is at least this are granted from escrow blocks: the owner
    /// reserves part of the key's capacity in one etcd record and grants from it in
    /// memory, with no etcd write per slot (0: every slot is written to etcd). Smaller
    /// limits, idempotent retries (`request_id`), queued callers and holds over 300 s
    /// stay exact.
    #[arg(long, env = "SWITCHBOARD_ESCROW_MIN_LIMIT", default_value_t = 100)]
    pub escrow_min_limit: u32,
}

impl Default for LimiterArgs {
    fn default() -> Self {
        Self {
            max_inflight_per_account: 1000,
            advertise_address: None,
            escrow_min_limit: 100,
        }
    }
}

/// How long a stopping replica waits for its shards to be handed off before it drains
/// anyway (what is not handed off is taken over when its lease expires).
const LEAVE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

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
        replica.lease.changes(),
    )
    .await?;
    let stats = stats::EngineStats::register(&replica.metrics);
    let engine = engine::start(engine::EngineConfig {
        session: replica.session.clone(),
        replica_id: replica.replica_id.clone(),
        address: advertise.clone(),
        replica_lease: replica.lease.changes(),
        lease_lost: replica.lease.lost(),
        limits: limits.clone(),
        view: membership.view.clone(),
        stats: stats.clone(),
        escrow_min_limit: limiter.escrow_min_limit,
    });
    let credentials =
        CallCredentials::from_common(&args.common, &[Scope::LimiterAcquire, Scope::LimiterAdmin]);
    let dispatcher = routing::Dispatcher::new(
        replica.replica_id.clone(),
        engine.clone(),
        membership.view.clone(),
        credentials,
        replica.client_tls().clone(),
    );
    let api = api::LimiterApi::new(slots::Slots::new(dispatcher, stats), limits);
    // On SIGTERM: leave the membership (so the others take over at once), hand every shard
    // off (escrow slots written out exactly), then drain as usual.
    let leave = membership.leave();
    let leaving_engine = engine.clone();
    // Boxed: the server future stays small (debug builds copy large futures on the stack).
    let stop = Box::pin(async move {
        stop.await;
        if let Err(err) = leave.await {
            tracing::warn!(error = %err, "could not leave the membership; handing off anyway");
        }
        if !leaving_engine.leave(LEAVE_DEADLINE).await {
            tracing::warn!("not every shard was handed off in time; the rest fail over");
        }
    });
    let max_message = args.common.limits.max_message_bytes();
    let routes = Routes::new(LimiterServiceServer::new(api).max_decoding_message_size(max_message))
        .add_service(
            LimiterPeerServiceServer::new(relay::Relay::new(engine))
                .max_decoding_message_size(max_message),
        );
    let result = Box::pin(replica.serve(
        listener,
        routes,
        &[<LimiterServiceServer<api::LimiterApi> as NamedService>::NAME],
        stop,
    ))
    .await;
    drop(membership);
    result
}

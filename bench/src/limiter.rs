//! The `limiter` scenario: limiter-svc replicas on one etcd (fsync on), measured against
//! the RPC ceiling, the naive etcd semaphore and a Redis semaphore in the same run.
//!
//! Two worlds, each with its own etcd: three replicas, then one replica. Rows of the
//! three-replica world, in order:
//!
//! - `rpc_ceiling`: Health/Check on replica 1 (no auth, no work).
//! - `naive_etcd_semaphore`: txn put-if-absent + delete per pair, straight on etcd.
//! - `redis_semaphore`: the Lua sorted-set semaphore on the bench's own redis-server, with
//!   the callers and keys of `limiter_pairs`.
//! - `limiter_pairs`: Acquire then Release on 64 keys far below their limit, through the
//!   owner-aware client ([`OwnerAware`]) — the row the throughput ratios are computed from;
//!   `limiter_pairs_unaware` the same through plain clients spread round-robin over the
//!   replicas (non-owners forward); `limiter_pairs_256` and `limiter_pairs_unaware_256` the
//!   same two with 256 callers.
//! - `limiter_many_keys`: pairs over 1,000 keys of limit 1,000 (large limits, where escrow
//!   applies); its etcd writes per pair give `limiter_etcd_writes_per_pair_large`.
//! - `limiter_hunt_small_limits`: 256 callers on 8 keys of limit 5, half of them
//!   owner-aware, half unaware; a client-side count of held grants per key catches any
//!   over-admission.
//! - `limiter_reject` (owner-aware) and `limiter_reject_unaware`: Acquire on one key whose
//!   only slot is held: every call is REJECTED.
//!
//! The one-replica world: `limiter_pairs_1_replica` and `limiter_pairs_1_replica_256`.
//!
//! The rows that feed a throughput or latency ratio (`rpc_ceiling`, `naive_etcd_semaphore`,
//! `redis_semaphore`, `limiter_pairs`, `limiter_reject`) are measured for `--duration`;
//! the others for half of it ([`secondary`]), so that the scenario stays within about three
//! minutes at the defaults. Before every row etcd is compacted (physically, to its current
//! revision) and defragmented, so that one row's history does not slow the next. Every
//! limiter row reports etcd writes per operation (revision growth over the window) and the
//! shards each replica owns at its start and end (`switchboard_limiter_shards_owned`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt as _;
use integration::{PLATFORM_KEY_ID, PLATFORM_SECRET};
use plumbing::auth::Scope;
use plumbing::client::CallCredentials;
use plumbing::limiter::LimiterClient;
use proto::limiter::v1::limiter_service_client::LimiterServiceClient;
use proto::limiter::v1::{
    AcquireRequest, AcquireResponse, Decision, Limit, ReleaseRequest, SetLimitRequest,
};
use tokio::time::Instant;
use tonic::transport::Channel;

use super::baseline::{self, Auth, status_text};
use super::load::{self, Plan, Sample, Worker};
use super::redis_baseline::{self, RedisServer};
use super::report::{Goal, Row};
use super::stack::{Stack, WindowFacts};
use super::{CALLERS_PER_CHANNEL, Options, Report, Result, progress};

/// Limiter replicas of the main world.
const REPLICAS: usize = 3;
/// Callers of the `_256` rows, whatever `--concurrency` says.
const HIGH_CONCURRENCY: usize = 256;
/// Keys of the pairs rows: accounts `AC_bench_0` … `AC_bench_63`, resource `bench`.
const ACCOUNTS: usize = 64;
const RESOURCE: &str = "bench";
/// Their limit: the largest allowed, so that nothing is ever rejected.
const PAIRS_LIMIT: u32 = 1_000_000;
/// Keys of `limiter_many_keys`: `AC_bench_many_<i>` / `bench-many`, limit 1,000 each
/// (large limits: where the replicas' escrow of slot counts applies).
const MANY_KEYS: usize = 1_000;
const MANY_RESOURCE: &str = "bench-many";
const MANY_LIMIT: u32 = 1_000;
/// Keys of `limiter_hunt_small_limits`: `AC_bench_hunt_<i>` / `bench-hunt`, limit 5 each.
const HUNT_KEYS: usize = 8;
const HUNT_RESOURCE: &str = "bench-hunt";
const HUNT_LIMIT: u32 = 5;
/// How long a hunt caller holds a granted slot before releasing it (counted as held by the
/// client all that time).
const HUNT_HOLD: Duration = Duration::from_millis(2);
/// The key of the reject rows, with limit 1.
const REJECT_ACCOUNT: &str = "AC_bench_reject";
const REJECT_RESOURCE: &str = "bench-reject";
/// `hold_seconds` of the measured acquires (released long before).
const HOLD_SECONDS: u32 = 60;
/// `hold_seconds` of the slot that keeps the reject key full.
const BLOCKER_HOLD_SECONDS: u32 = 3_600;
/// Bound on getting the replicas ready (limits seen, every shard owned).
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// The replicas' gauge of the shards each owns (read at the start and end of a row).
const SHARDS_OWNED: &str = "switchboard_limiter_shards_owned";
/// Setup calls (SetLimit, readiness probes) in flight at once.
const SETUP_PARALLELISM: usize = 16;

type Client = LimiterServiceClient<Channel>;

/// One limiter key and its limit.
#[derive(Debug, Clone)]
struct Key {
    account: String,
    resource: String,
    limit: u32,
}

impl Key {
    fn new(account: String, resource: &str, limit: u32) -> Self {
        Self {
            account,
            resource: resource.to_owned(),
            limit,
        }
    }

    fn label(&self) -> String {
        format!("{}/{}", self.account, self.resource)
    }

    fn acquire(&self, request_id: &str, hold: u32) -> AcquireRequest {
        AcquireRequest {
            account_id: self.account.clone(),
            resource: self.resource.clone(),
            request_id: request_id.to_owned(),
            hold_seconds: hold,
            wait_timeout_ms: 0,
        }
    }
}

fn pair_keys() -> Vec<Key> {
    (0..ACCOUNTS)
        .map(|i| Key::new(format!("AC_bench_{i}"), RESOURCE, PAIRS_LIMIT))
        .collect()
}

fn many_keys() -> Vec<Key> {
    (0..MANY_KEYS)
        .map(|i| Key::new(format!("AC_bench_many_{i}"), MANY_RESOURCE, MANY_LIMIT))
        .collect()
}

fn hunt_keys() -> Vec<Key> {
    (0..HUNT_KEYS)
        .map(|i| Key::new(format!("AC_bench_hunt_{i}"), HUNT_RESOURCE, HUNT_LIMIT))
        .collect()
}

fn reject_key() -> Key {
    Key::new(REJECT_ACCOUNT.to_owned(), REJECT_RESOURCE, 1)
}

fn decision_name(decision: i32) -> String {
    Decision::try_from(decision).map_or_else(|_| decision.to_string(), |d| format!("{d:?}"))
}

/// What one measurement found, kept for the ratios.
struct Measured {
    sample: Sample,
    facts: WindowFacts,
}

/// The measurements the ratio lines are computed from.
#[derive(Default)]
struct Figures {
    ceiling: Option<Measured>,
    naive: Option<Measured>,
    redis: Option<Measured>,
    pairs: Option<Measured>,
    many: Option<Measured>,
    reject: Option<Measured>,
    reject_unaware_writes: i64,
    over_admissions: u64,
    /// Every window, for the noise warning.
    windows: Vec<WindowFacts>,
}

/// Runs the scenario: the three-replica world, then the one-replica world.
pub async fn run(options: &Options, report: &mut Report) -> Result<()> {
    let mut figures = Figures::default();
    progress(format_args!("starting etcd (fsync on)"));
    let mut stack = Stack::start(options).await?;
    let outcome = measure_replicas(&mut stack, options, report, &mut figures).await;
    stop(stack, report).await;
    outcome?;

    progress(format_args!(
        "starting a fresh etcd (fsync on) for 1 replica"
    ));
    let mut stack = Stack::start(options).await?;
    let outcome = measure_one_replica(&mut stack, options, report, &mut figures).await;
    stop(stack, report).await;
    outcome?;

    ratios(&figures, report);
    Ok(())
}

async fn stop(stack: Stack, report: &mut Report) {
    progress(format_args!("stopping the services and etcd"));
    for remark in stack.shutdown().await {
        progress(format_args!("{remark}"));
        report.remarks.push(format!("limiter: {remark}"));
    }
}

fn ratios(figures: &Figures, report: &mut Report) {
    let windows: Vec<&WindowFacts> = figures.windows.iter().collect();
    report.warn_noise("limiter", &windows);
    let (Some(ceiling), Some(naive), Some(redis), Some(pairs), Some(many), Some(reject)) = (
        &figures.ceiling,
        &figures.naive,
        &figures.redis,
        &figures.pairs,
        &figures.many,
        &figures.reject,
    ) else {
        report
            .remarks
            .push("limiter: some rows are missing; no ratio lines".to_owned());
        return;
    };
    let per_pair = |m: &Measured| m.facts.writes as f64 / m.sample.latencies.len().max(1) as f64;
    report.ratio(
        "limiter_vs_naive_etcd",
        pairs.sample.rate() / naive.sample.rate(),
        Goal::AtLeast(4.0),
    );
    report.ratio(
        "limiter_vs_redis",
        pairs.sample.rate() / redis.sample.rate(),
        Goal::AtLeast(0.5),
    );
    report.ratio(
        "limiter_vs_rpc_ceiling",
        pairs.sample.rate() / ceiling.sample.rate(),
        Goal::AtLeast(0.3),
    );
    report.ratio(
        "reject_p99_vs_ceiling_p99",
        reject.sample.percentile(0.99).as_secs_f64()
            / ceiling.sample.percentile(0.99).as_secs_f64(),
        Goal::AtMost(2.0),
    );
    report.ratio(
        "reject_etcd_writes",
        (reject.facts.writes + figures.reject_unaware_writes) as f64,
        Goal::AtMost(0.0),
    );
    report.ratio(
        "limiter_pairs_writes_per_pair",
        per_pair(pairs),
        Goal::Report,
    );
    report.ratio(
        "limiter_etcd_writes_per_pair_large",
        per_pair(many),
        Goal::AtMost(0.05),
    );
    report.ratio(
        "limiter_hunt_over_admissions",
        figures.over_admissions as f64,
        Goal::AtMost(0.0),
    );
}

/// The replicas of a world, their setup clients and how they split the shards.
struct World {
    addrs: Vec<SocketAddr>,
    setup: Vec<Client>,
    admin: Auth,
    caller: Auth,
}

/// Starts `replicas` limiter-svc processes, sets the limits of `keys` and waits until every
/// replica grants every one of them with its limit.
async fn prepare(stack: &mut Stack, replicas: usize, keys: &[Key]) -> Result<World> {
    progress(format_args!("starting {replicas} limiter-svc replica(s)"));
    let addrs = stack.start_services("limiter-svc", replicas, &[]).await?;
    let admin = Auth::platform(&[Scope::Admin])?;
    let caller = Auth::platform(&[Scope::LimiterAcquire])?;
    let setup: Vec<Client> = addrs
        .iter()
        .map(|addr| Ok(LimiterServiceClient::new(stack.channel(*addr)?)))
        .collect::<Result<_>>()?;
    progress(format_args!(
        "setting {} limits and waiting for every replica to serve every key",
        keys.len()
    ));
    set_limits(&setup[0], &admin, keys).await?;
    wait_ready(&setup, &admin, keys).await?;
    Ok(World {
        addrs,
        setup,
        admin,
        caller,
    })
}

async fn measure_replicas(
    stack: &mut Stack,
    options: &Options,
    report: &mut Report,
    figures: &mut Figures,
) -> Result<()> {
    let pairs = pair_keys();
    let many = many_keys();
    let hunt = hunt_keys();
    let mut keys = pairs.clone();
    keys.extend(many.iter().cloned());
    keys.extend(hunt.iter().cloned());
    keys.push(reject_key());
    // The reject key is checked by hold_reject_key, not as a grantable key.
    let grantable = &keys[..keys.len() - 1];
    let world = prepare(stack, REPLICAS, grantable).await?;
    set_limits(&world.setup[0], &world.admin, &[reject_key()]).await?;
    hold_reject_key(&world.setup, &world.admin).await?;
    progress(format_args!(
        "ready; shards owned per replica: {}",
        ShardSplit::read(stack).await.0
    ));
    let short = secondary(options, options.concurrency);
    let high = secondary(options, HIGH_CONCURRENCY);

    compact(stack).await?;
    progress(format_args!("measuring rpc_ceiling"));
    let (sample, facts) = baseline::rpc_ceiling(options, stack, world.addrs[0]).await?;
    load::ensure_progress("rpc_ceiling", &sample)?;
    report.row(Row {
        name: "rpc_ceiling".to_owned(),
        rate: sample.rate(),
        unit: "calls/s",
        p50: sample.percentile(0.50),
        p99: sample.percentile(0.99),
        notes: format!(
            "grpc.health.v1.Health/Check on limiter-svc#1, no auth; {}; {}{}",
            facts.cpu,
            sample.error_note(),
            facts.server_errors()
        ),
    });
    figures.windows.push(facts.clone());
    figures.ceiling = Some(Measured { sample, facts });

    compact(stack).await?;
    progress(format_args!("measuring naive_etcd_semaphore"));
    let (sample, facts) = baseline::naive_etcd(options, stack).await?;
    load::ensure_progress("naive_etcd_semaphore", &sample)?;
    report.row(Row {
        name: "naive_etcd_semaphore".to_owned(),
        rate: sample.rate(),
        unit: "pairs/s",
        p50: sample.percentile(0.50),
        p99: sample.percentile(0.99),
        notes: format!(
            "per pair: txn put-if-absent + delete, straight on etcd (compacted and \
             defragmented before the row); {}; {}; {}; {}",
            facts.writes_per(&sample, "pair"),
            facts.etcd_note(sample.seconds),
            facts.cpu,
            sample.error_note()
        ),
    });
    figures.windows.push(facts.clone());
    figures.naive = Some(Measured { sample, facts });

    progress(format_args!(
        "starting redis-server; measuring redis_semaphore"
    ));
    let redis = RedisServer::start().await?;
    let labels: Vec<String> = pairs.iter().map(Key::label).collect();
    let outcome =
        redis_baseline::semaphore(options, stack, &redis, &labels, PAIRS_LIMIT, hold()).await;
    let version = redis.version.clone();
    redis.stop().await;
    let (sample, facts) = outcome?;
    load::ensure_progress("redis_semaphore", &sample)?;
    report.row(Row {
        name: "redis_semaphore".to_owned(),
        rate: sample.rate(),
        unit: "pairs/s",
        p50: sample.percentile(0.50),
        p99: sample.percentile(0.99),
        notes: format!(
            "per pair: EVALSHA acquire (ZREMRANGEBYSCORE -inf now; ZCARD < limit → ZADD \
             expiry member) + ZREM, on a sorted set per key; the {ACCOUNTS} keys of \
             limiter_pairs (limit {PAIRS_LIMIT}); {version}, one node on loopback, {}; \
             one multiplexed connection per {CALLERS_PER_CHANNEL} callers; {}; {}",
            redis_baseline::PERSISTENCE,
            facts.cpu,
            sample.error_note()
        ),
    });
    figures.windows.push(facts.clone());
    figures.redis = Some(Measured { sample, facts });

    let pairs: Arc<[Key]> = pairs.into();
    let rows = [
        ("limiter_pairs", Routing::OwnerAware, options, true),
        ("limiter_pairs_unaware", Routing::Unaware, &short, false),
        ("limiter_pairs_256", Routing::OwnerAware, &high, false),
        ("limiter_pairs_unaware_256", Routing::Unaware, &high, false),
    ];
    for (name, routing, row_options, headline) in rows {
        let measured = pairs_row(
            stack,
            &world,
            report,
            PairsRow {
                name,
                routing,
                options: row_options.clone(),
                keys: pairs.clone(),
                spread: false,
            },
        )
        .await?;
        figures.windows.push(measured.facts.clone());
        if headline {
            figures.pairs = Some(measured);
        }
    }

    let measured = pairs_row(
        stack,
        &world,
        report,
        PairsRow {
            name: "limiter_many_keys",
            routing: Routing::OwnerAware,
            options: short.clone(),
            keys: many.into(),
            spread: true,
        },
    )
    .await?;
    figures.windows.push(measured.facts.clone());
    figures.many = Some(measured);

    let (facts, over) = hunt_row(stack, &world, &high, report, hunt).await?;
    figures.windows.push(facts);
    figures.over_admissions = over;

    let measured = reject_row(stack, &world, options, report, Routing::OwnerAware).await?;
    figures.windows.push(measured.facts.clone());
    figures.reject = Some(measured);
    let measured = reject_row(stack, &world, &short, report, Routing::Unaware).await?;
    figures.windows.push(measured.facts.clone());
    figures.reject_unaware_writes = measured.facts.writes;
    Ok(())
}

async fn measure_one_replica(
    stack: &mut Stack,
    options: &Options,
    report: &mut Report,
    figures: &mut Figures,
) -> Result<()> {
    let keys: Arc<[Key]> = pair_keys().into();
    let world = prepare(stack, 1, &keys).await?;
    progress(format_args!(
        "ready; shards owned: {}",
        ShardSplit::read(stack).await.0
    ));
    // With one replica every call lands on the owner: aware and unaware are the same.
    let rows = [
        ("limiter_pairs_1_replica", options.concurrency),
        ("limiter_pairs_1_replica_256", HIGH_CONCURRENCY),
    ];
    for (name, concurrency) in rows {
        let measured = pairs_row(
            stack,
            &world,
            report,
            PairsRow {
                name,
                routing: Routing::OwnerAware,
                options: secondary(options, concurrency),
                keys: keys.clone(),
                spread: false,
            },
        )
        .await?;
        figures.windows.push(measured.facts);
    }
    Ok(())
}

/// The settings of a secondary row (every row that no ratio but a per-operation one is
/// computed from): `concurrency` callers and half the measured time (at least 1 s), so
/// that the scenario stays within a few minutes.
fn secondary(options: &Options, concurrency: usize) -> Options {
    Options {
        concurrency,
        duration: (options.duration / 2)
            .max(Duration::from_secs(1))
            .min(options.duration),
        ..options.clone()
    }
}

/// `measured 5.0s after 2.0s warmup`.
fn window_note(row: &Options) -> String {
    format!(
        "measured {:.1?} after {:.1?} warmup",
        row.duration, row.warmup
    )
}

fn hold() -> Duration {
    Duration::from_secs(u64::from(HOLD_SECONDS))
}

/// Compacts and defragments etcd between rows.
async fn compact(stack: &Stack) -> Result<()> {
    let done = stack.compact_and_defrag().await?;
    progress(format_args!("etcd {done}"));
    Ok(())
}

/// `slot txns 175/s, mean 5.7 ms, 43 ops each` from the replicas' metrics.
fn txn_note(facts: &WindowFacts) -> String {
    if facts.metrics.is_empty() {
        return "slot txn metrics unavailable".to_owned();
    }
    let txns = facts.metric("switchboard_limiter_txn_duration_seconds_count");
    if txns <= 0.0 {
        return "slot txns (replica metrics): none in window".to_owned();
    }
    let seconds = facts.metric("switchboard_limiter_txn_duration_seconds_sum");
    let ops = facts.metric("switchboard_limiter_txn_batch_size_sum");
    let batches = facts.metric("switchboard_limiter_txn_batch_size_count");
    format!(
        "slot txns (replica metrics): {} in window, mean {:.1} ms, {:.1} ops each",
        super::report::thousands(txns),
        seconds / txns * 1000.0,
        if batches > 0.0 { ops / batches } else { 0.0 }
    )
}

async fn set_limit(client: &mut Client, admin: &Auth, key: &Key) -> Result<()> {
    let limit = Limit {
        account_id: key.account.clone(),
        resource: key.resource.clone(),
        max_in_flight: key.limit,
        shadow: false,
    };
    client
        .set_limit(admin.request(SetLimitRequest { limit: Some(limit) }))
        .await
        .map_err(|s| format!("SetLimit {}: {}", key.label(), status_text(&s)))?;
    Ok(())
}

/// Sets every key's limit, [`SETUP_PARALLELISM`] calls at a time.
async fn set_limits(client: &Client, admin: &Auth, keys: &[Key]) -> Result<()> {
    // Owned keys and clients: a closure over borrowed items in a stream combinator makes
    // the scenario's future not `Send` (rustc cannot prove it for every lifetime).
    let outcomes: Vec<Result<()>> = futures::stream::iter(keys.iter().cloned().map(|key| {
        let mut client = client.clone();
        let admin = admin.clone();
        async move { set_limit(&mut client, &admin, &key).await }
    }))
    .buffer_unordered(SETUP_PARALLELISM)
    .collect()
    .await;
    outcomes.into_iter().collect()
}

/// One readiness probe: `replica` grants `key` with its limit (the slot is released).
async fn check_grant(
    client: &mut Client,
    admin: &Auth,
    key: &Key,
) -> std::result::Result<(), String> {
    let answer = client
        .acquire(admin.request(key.acquire("", 5)))
        .await
        .map_err(|s| status_text(&s))?
        .into_inner();
    if answer.decision == Decision::Granted as i32 {
        let release = ReleaseRequest {
            slot_id: answer.slot_id.clone(),
        };
        let _ = client.release(admin.request(release)).await;
    }
    if answer.decision != Decision::Granted as i32 || answer.limit != key.limit {
        return Err(format!(
            "{}: {} with limit {}",
            key.label(),
            decision_name(answer.decision),
            answer.limit
        ));
    }
    Ok(())
}

/// Polls until every replica grants every key with its limit (so every key's shard has an
/// owner and every replica has seen the limits).
async fn wait_ready(setup: &[Client], admin: &Auth, keys: &[Key]) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut pending: Vec<(usize, usize)> = (0..setup.len())
        .flat_map(|replica| (0..keys.len()).map(move |index| (replica, index)))
        .collect();
    loop {
        let checks: Vec<(usize, usize, std::result::Result<(), String>)> =
            futures::stream::iter(pending.into_iter().map(|(replica, index)| {
                let mut client = setup[replica].clone();
                let key = keys[index].clone();
                let admin = admin.clone();
                async move { (replica, index, check_grant(&mut client, &admin, &key).await) }
            }))
            .buffer_unordered(SETUP_PARALLELISM)
            .collect()
            .await;
        let mut still = Vec::new();
        let mut last = String::new();
        for (replica, index, outcome) in checks {
            if let Err(text) = outcome {
                last = format!("replica {}: {text}", replica + 1);
                still.push((replica, index));
            }
        }
        if still.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "limiter replicas not ready after {READY_TIMEOUT:?}: {} (replica, key) pairs \
                 still failing; last: {last}",
                still.len()
            )
            .into());
        }
        pending = still;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Fills the reject key (one slot, held for an hour) and polls until every replica
/// rejects it with limit 1.
async fn hold_reject_key(setup: &[Client], admin: &Auth) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let key = reject_key();
    let mut held = false;
    let mut replica = 0;
    while replica < setup.len() {
        let mut client = setup[if held { replica } else { 0 }].clone();
        // The blocker carries a request id: retrying it returns the same slot.
        let request_id = if held { "" } else { "bench-reject-blocker" };
        let hold = if held { 1 } else { BLOCKER_HOLD_SECONDS };
        let request = key.acquire(request_id, hold);
        let last = match client.acquire(admin.request(request)).await {
            Ok(answer) => {
                let answer = answer.into_inner();
                let granted = answer.decision == Decision::Granted as i32;
                if !held && granted && answer.limit == 1 {
                    held = true;
                    continue;
                }
                if held && granted {
                    return Err(format!(
                        "replica {} granted a second slot of {} beyond its limit 1",
                        replica + 1,
                        key.label()
                    )
                    .into());
                }
                if held && answer.decision == Decision::Rejected as i32 && answer.limit == 1 {
                    replica += 1;
                    continue;
                }
                format!(
                    "replica {}: {} with limit {}",
                    replica + 1,
                    decision_name(answer.decision),
                    answer.limit
                )
            }
            Err(status) => format!("replica {}: {}", replica + 1, status_text(&status)),
        };
        if Instant::now() >= deadline {
            return Err(format!(
                "the reject key is not full on every replica after {READY_TIMEOUT:?}; last: {last}"
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// How the replicas split the shards at one instant: each replica's
/// `switchboard_limiter_shards_owned` gauge, from its `/metrics`.
struct ShardSplit(String);

impl ShardSplit {
    /// `16/16/16 (48 owned)`, in replica start order (`?` for a replica not scraped).
    async fn read(stack: &Stack) -> Self {
        let owned = stack.gauge("limiter-svc", SHARDS_OWNED).await;
        let total: f64 = owned.iter().flatten().sum();
        let each: Vec<String> = owned
            .iter()
            .map(|value| value.map_or_else(|| "?".to_owned(), |v| format!("{v:.0}")))
            .collect();
        Self(format!("{} ({total:.0} owned)", each.join("/")))
    }

    /// `shards owned per replica: start 16/16/16 (48 owned), end 16/16/16 (48 owned)`.
    fn note(&self, end: &Self) -> String {
        format!("shards owned per replica: start {}, end {}", self.0, end.0)
    }
}

/// How a row's callers reach the replicas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Routing {
    /// The owner-aware client ([`OwnerAware`]).
    OwnerAware,
    /// Plain `LimiterServiceClient`s, caller `i` on replica `i mod replicas`, like grpcurl
    /// or a client in another language: a replica that does not own the key forwards.
    Unaware,
}

impl Routing {
    fn describe(self, replicas: usize) -> String {
        match (self, replicas) {
            (Routing::OwnerAware, _) => format!("owner-aware client ({})", OwnerAware::ABOUT),
            (Routing::Unaware, 1) => "plain client on the only replica".to_owned(),
            (Routing::Unaware, n) => {
                format!("plain clients round-robin over {n} replicas (non-owners forward)")
            }
        }
    }
}

/// The owner-aware client of the rows that use one, `plumbing::limiter::LimiterClient`
/// seeded with every replica: one per `CALLERS_PER_CHANNEL × replicas` callers, so that each
/// of its channels (one per owner) carries about as many callers as a channel of the other
/// rows. Its shard map is fetched by its own task from the first call on (during the
/// warmup); until then, or if the limiter has no `GetShardMap`, it calls the seeds.
///
/// This is the one place that knows the client: the rows only call [`OwnerAware::new`],
/// [`OwnerAware::acquire`], [`OwnerAware::release`] and [`OwnerAware::mapped`].
#[derive(Clone)]
struct OwnerAware(LimiterClient);

impl OwnerAware {
    /// How the rows name it.
    const ABOUT: &'static str = "plumbing::limiter::LimiterClient, each call to its shard's \
                                 owner by GetShardMap";

    fn new(stack: &Stack, addrs: &[SocketAddr]) -> Result<Self> {
        let seeds: Vec<String> = addrs.iter().map(ToString::to_string).collect();
        let credentials = CallCredentials::platform(
            PLATFORM_KEY_ID,
            PLATFORM_SECRET.as_bytes(),
            &[Scope::LimiterAcquire],
        );
        Ok(Self(LimiterClient::new(
            &seeds,
            stack.client_tls(),
            credentials,
        )?))
    }

    async fn acquire(
        &self,
        request: AcquireRequest,
    ) -> std::result::Result<AcquireResponse, tonic::Status> {
        self.0.acquire(request).await
    }

    async fn release(&self, slot_id: String) -> std::result::Result<bool, tonic::Status> {
        let answer = self.0.release(ReleaseRequest { slot_id }).await?;
        Ok(answer.released)
    }

    /// Whether it routes by a shard map (false: every call went to a seed).
    fn mapped(&self) -> bool {
        self.0.map().is_some()
    }
}

/// `; shard map in use by 64 of 64 owner-aware callers` at the end of a row, or nothing
/// when the row has none. A client without a map sent every call to a seed, as the unaware
/// rows do: the row then does not measure owner routing, and says so in capitals.
fn map_note(callers: &[Caller]) -> String {
    let clients: Vec<&OwnerAware> = callers
        .iter()
        .filter_map(|caller| match caller {
            Caller::Aware(client) => Some(client),
            Caller::Unaware { .. } => None,
        })
        .collect();
    if clients.is_empty() {
        return String::new();
    }
    let mapped = clients.iter().filter(|c| c.mapped()).count();
    let text = format!(
        "shard map in use by {mapped} of {} owner-aware callers at the end",
        clients.len()
    );
    if mapped == clients.len() {
        format!("; {text}")
    } else {
        format!("; {} (the others called seeds)", text.to_uppercase())
    }
}

/// One caller's way to the limiter.
#[derive(Clone)]
enum Caller {
    Unaware { client: Client, auth: Auth },
    Aware(OwnerAware),
}

impl Caller {
    async fn acquire(
        &mut self,
        request: AcquireRequest,
    ) -> std::result::Result<AcquireResponse, tonic::Status> {
        match self {
            Caller::Unaware { client, auth } => client
                .acquire(auth.request(request))
                .await
                .map(tonic::Response::into_inner),
            Caller::Aware(client) => client.acquire(request).await,
        }
    }

    async fn release(&mut self, slot_id: String) -> std::result::Result<bool, tonic::Status> {
        match self {
            Caller::Unaware { client, auth } => client
                .release(auth.request(ReleaseRequest { slot_id }))
                .await
                .map(|answer| answer.into_inner().released),
            Caller::Aware(client) => client.release(slot_id).await,
        }
    }
}

/// `concurrency` callers of `routing` (see [`Routing`] and [`OwnerAware`] for how they
/// share channels).
async fn callers(
    routing: Routing,
    concurrency: usize,
    stack: &Stack,
    world: &World,
) -> Result<Vec<Caller>> {
    let addrs = &world.addrs;
    match routing {
        Routing::Unaware => {
            let clients = load::share(concurrency, addrs.len(), |target| {
                let addr = addrs[target];
                async move { Ok(LimiterServiceClient::new(stack.channel(addr)?)) }
            })
            .await?;
            Ok(clients
                .into_iter()
                .map(|(_, client)| Caller::Unaware {
                    client,
                    auth: world.caller.clone(),
                })
                .collect())
        }
        Routing::OwnerAware => {
            let per = CALLERS_PER_CHANNEL * addrs.len().max(1);
            let made = (0..concurrency.div_ceil(per))
                .map(|_| OwnerAware::new(stack, addrs))
                .collect::<Result<Vec<_>>>()?;
            Ok((0..concurrency)
                .map(|caller| Caller::Aware(made[caller / per].clone()))
                .collect())
        }
    }
}

struct PairWorker {
    caller: Caller,
    keys: Arc<[Key]>,
    next: usize,
    stride: usize,
}

impl Worker for PairWorker {
    async fn call(&mut self) -> std::result::Result<(), String> {
        let key = &self.keys[self.next % self.keys.len()];
        self.next = self.next.wrapping_add(self.stride);
        let answer = self
            .caller
            .acquire(key.acquire("", HOLD_SECONDS))
            .await
            .map_err(|s| format!("Acquire {}", status_text(&s)))?;
        if answer.decision != Decision::Granted as i32 {
            return Err(format!(
                "Acquire answered {} (limit {}, in flight {})",
                decision_name(answer.decision),
                answer.limit,
                answer.in_flight
            ));
        }
        let released = self
            .caller
            .release(answer.slot_id)
            .await
            .map_err(|s| format!("Release {}", status_text(&s)))?;
        if released {
            Ok(())
        } else {
            Err("Release answered released=false for a slot just granted".to_owned())
        }
    }
}

/// A pairs row: Acquire then Release, every grant released at once.
struct PairsRow {
    name: &'static str,
    routing: Routing,
    options: Options,
    keys: Arc<[Key]>,
    /// false: caller `i` always uses key `i mod keys`; true: caller `i`'s `n`-th pair uses
    /// key `(i + n × callers) mod keys`, so that the callers sweep every key.
    spread: bool,
}

async fn pairs_row(
    stack: &Stack,
    world: &World,
    report: &mut Report,
    row: PairsRow,
) -> Result<Measured> {
    compact(stack).await?;
    progress(format_args!("measuring {}", row.name));
    let concurrency = row.options.concurrency;
    let kept = callers(row.routing, concurrency, stack, world).await?;
    let workers = kept
        .iter()
        .cloned()
        .enumerate()
        .map(|(index, caller)| PairWorker {
            caller,
            keys: row.keys.clone(),
            next: index,
            stride: if row.spread { concurrency } else { 0 },
        })
        .collect();
    let shards = ShardSplit::read(stack).await;
    let plan = Plan::new(&row.options);
    let window = stack.watch_window(&plan).await?;
    let sample = load::drive(&plan, workers).await?;
    let facts = window.finish().await?;
    let shards = shards.note(&ShardSplit::read(stack).await);
    let map = map_note(&kept);
    load::ensure_progress(row.name, &sample)?;
    let limit = row.keys.first().map_or(0, |k| k.limit);
    let keys = if row.spread {
        format!(
            "{} keys of limit {limit}, each caller sweeping them",
            row.keys.len()
        )
    } else {
        format!(
            "{} keys of limit {limit}, caller i on key i mod {}",
            row.keys.len(),
            row.keys.len()
        )
    };
    report.row(Row {
        name: row.name.to_owned(),
        rate: sample.rate(),
        unit: "pairs/s",
        p50: sample.percentile(0.50),
        p99: sample.percentile(0.99),
        notes: format!(
            "Acquire+Release, {concurrency} callers, {}{map}; {keys}; {}; {shards}; {}; {}; \
             {}; {}; {}{}",
            row.routing.describe(world.addrs.len()),
            window_note(&row.options),
            facts.writes_per(&sample, "pair"),
            txn_note(&facts),
            facts.etcd_note(sample.seconds),
            facts.cpu,
            sample.error_note(),
            facts.server_errors()
        ),
    });
    Ok(Measured { sample, facts })
}

/// A hunt key and the grants of it the callers hold right now (their own count).
struct HuntKey {
    key: Key,
    held: AtomicU32,
}

/// What the hunt's callers saw.
#[derive(Default)]
struct HuntStats {
    /// Grants released inside the measured window.
    grants: AtomicU64,
    /// Rejections answered inside the measured window.
    rejections: AtomicU64,
    /// Grants that made the callers' own count of held slots of a key exceed its limit
    /// (warmup included).
    over_admissions: AtomicU64,
    /// Grants whose answer said in_flight > limit (warmup included).
    reported_over: AtomicU64,
    /// Most slots of one key the callers held at once.
    max_held: AtomicU32,
}

/// Takes one slot of a hunt key in the callers' count; gives it back when dropped (also
/// when the operation is abandoned at its deadline).
struct Holding<'a>(&'a AtomicU32);

impl Drop for Holding<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

struct HuntWorker {
    caller: Caller,
    keys: Arc<[HuntKey]>,
    next: usize,
    stats: Arc<HuntStats>,
    plan: Plan,
}

impl HuntWorker {
    fn in_window(&self) -> bool {
        let now = Instant::now();
        now >= self.plan.measure_start && now < self.plan.end
    }
}

impl Worker for HuntWorker {
    async fn call(&mut self) -> std::result::Result<(), String> {
        let keys = self.keys.clone();
        let hunt = &keys[self.next % keys.len()];
        self.next = self.next.wrapping_add(1);
        let answer = self
            .caller
            .acquire(hunt.key.acquire("", HOLD_SECONDS))
            .await
            .map_err(|s| format!("Acquire {}", status_text(&s)))?;
        if answer.decision == Decision::Rejected as i32 {
            if self.in_window() {
                self.stats.rejections.fetch_add(1, Ordering::Relaxed);
            }
            return Ok(());
        }
        if answer.decision != Decision::Granted as i32 {
            return Err(format!(
                "Acquire answered {}",
                decision_name(answer.decision)
            ));
        }
        // Counted from the grant's answer to just before its release is sent: the
        // limiter holds the slot all that time, so more than `limit` here means the
        // limiter had more than `limit` slots of the key at once.
        let held = hunt.held.fetch_add(1, Ordering::SeqCst) + 1;
        let holding = Holding(&hunt.held);
        self.stats.max_held.fetch_max(held, Ordering::Relaxed);
        if held > hunt.key.limit {
            self.stats.over_admissions.fetch_add(1, Ordering::Relaxed);
        }
        if answer.in_flight > answer.limit {
            self.stats.reported_over.fetch_add(1, Ordering::Relaxed);
        }
        tokio::time::sleep(HUNT_HOLD).await;
        drop(holding);
        let released = self
            .caller
            .release(answer.slot_id)
            .await
            .map_err(|s| format!("Release {}", status_text(&s)))?;
        if !released {
            return Err("Release answered released=false for a slot just granted".to_owned());
        }
        if self.in_window() {
            self.stats.grants.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }
}

/// `limiter_hunt_small_limits`; returns the window's facts and the over-admissions seen.
async fn hunt_row(
    stack: &Stack,
    world: &World,
    options: &Options,
    report: &mut Report,
    keys: Vec<Key>,
) -> Result<(WindowFacts, u64)> {
    const NAME: &str = "limiter_hunt_small_limits";
    compact(stack).await?;
    progress(format_args!("measuring {NAME}"));
    let concurrency = options.concurrency;
    let unaware = callers(Routing::Unaware, concurrency / 2, stack, world).await?;
    let aware = callers(
        Routing::OwnerAware,
        concurrency - concurrency / 2,
        stack,
        world,
    )
    .await?;
    // Even callers owner-aware, odd ones unaware: both paths race on the same keys.
    let mut unaware = unaware.into_iter();
    let mixed: Vec<Caller> = aware
        .into_iter()
        .flat_map(|aware| std::iter::once(aware).chain(unaware.next()))
        .collect();
    let kept = mixed.clone();
    let hunt: Arc<[HuntKey]> = keys
        .into_iter()
        .map(|key| HuntKey {
            key,
            held: AtomicU32::new(0),
        })
        .collect();
    let stats = Arc::new(HuntStats::default());
    let shards = ShardSplit::read(stack).await;
    let plan = Plan::new(options);
    let workers = mixed
        .into_iter()
        .enumerate()
        .map(|(index, caller)| HuntWorker {
            caller,
            keys: hunt.clone(),
            next: index,
            stats: stats.clone(),
            plan,
        })
        .collect();
    let window = stack.watch_window(&plan).await?;
    let sample = load::drive(&plan, workers).await?;
    let facts = window.finish().await?;
    let shards = shards.note(&ShardSplit::read(stack).await);
    let map = map_note(&kept);
    load::ensure_progress(NAME, &sample)?;
    let grants = stats.grants.load(Ordering::Relaxed);
    let rejections = stats.rejections.load(Ordering::Relaxed);
    let over = stats.over_admissions.load(Ordering::Relaxed);
    let reported = stats.reported_over.load(Ordering::Relaxed);
    let slots = HUNT_KEYS as u32 * HUNT_LIMIT;
    report.row(Row {
        name: NAME.to_owned(),
        rate: grants as f64 / sample.seconds.max(f64::EPSILON),
        unit: "grants/s",
        p50: sample.percentile(0.50),
        p99: sample.percentile(0.99),
        notes: format!(
            "{concurrency} callers (half {}{map}, half {}) rotating over {HUNT_KEYS} keys of limit \
             {HUNT_LIMIT} ({slots} slots), each grant held {HUNT_HOLD:?} then released, a \
             rejection retried at once; p50/p99: one attempt; attempts {}/s, rejections \
             {}/s; OVER-ADMISSIONS {over} (the callers' own count of held grants of a key \
             above its limit, warmup included; answers with in_flight > limit: {reported}); \
             most held at once on one key: {} of {HUNT_LIMIT}; {}; {shards}; {}; {}; {}; \
             {}{}",
            Routing::OwnerAware.describe(world.addrs.len()),
            Routing::Unaware.describe(world.addrs.len()),
            super::report::thousands(sample.rate()),
            super::report::thousands(rejections as f64 / sample.seconds.max(f64::EPSILON)),
            stats.max_held.load(Ordering::Relaxed),
            window_note(options),
            facts.writes_per_count(grants as usize, "grant"),
            txn_note(&facts),
            facts.cpu,
            sample.error_note(),
            facts.server_errors()
        )
        .replace("OVER-ADMISSIONS 0 ", "over-admissions 0 "),
    });
    Ok((facts, over))
}

struct RejectWorker {
    caller: Caller,
}

impl Worker for RejectWorker {
    async fn call(&mut self) -> std::result::Result<(), String> {
        let answer = self
            .caller
            .acquire(reject_key().acquire("", HOLD_SECONDS))
            .await
            .map_err(|s| format!("Acquire {}", status_text(&s)))?;
        if answer.decision == Decision::Rejected as i32 {
            return Ok(());
        }
        if answer.decision == Decision::Granted as i32 {
            let _ = self.caller.release(answer.slot_id).await;
            return Err(format!(
                "GRANTED beyond limit 1 (over-admission; in flight {})",
                answer.in_flight
            ));
        }
        Err(format!(
            "Acquire answered {}",
            decision_name(answer.decision)
        ))
    }
}

/// `limiter_reject` (owner-aware) or `limiter_reject_unaware`.
async fn reject_row(
    stack: &Stack,
    world: &World,
    options: &Options,
    report: &mut Report,
    routing: Routing,
) -> Result<Measured> {
    let name = match routing {
        Routing::OwnerAware => "limiter_reject",
        Routing::Unaware => "limiter_reject_unaware",
    };
    compact(stack).await?;
    progress(format_args!("measuring {name}"));
    let kept = callers(routing, options.concurrency, stack, world).await?;
    let workers = kept
        .iter()
        .cloned()
        .map(|caller| RejectWorker { caller })
        .collect();
    let plan = Plan::new(options);
    let window = stack.watch_window(&plan).await?;
    let sample = load::drive(&plan, workers).await?;
    let facts = window.finish().await?;
    let map = map_note(&kept);
    load::ensure_progress(name, &sample)?;
    report.row(Row {
        name: name.to_owned(),
        rate: sample.rate(),
        unit: "calls/s",
        p50: sample.percentile(0.50),
        p99: sample.percentile(0.99),
        notes: format!(
            "Acquire on 1 full key (limit 1), all REJECTED, {} callers, {}{map}; {}; etcd writes \
             in window: {}; {}; {}{}",
            options.concurrency,
            routing.describe(world.addrs.len()),
            window_note(options),
            facts.writes,
            facts.cpu,
            sample.error_note(),
            facts.server_errors()
        ),
    });
    Ok(Measured { sample, facts })
}

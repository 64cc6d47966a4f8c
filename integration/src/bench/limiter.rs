//! The `limiter` scenario: three limiter-svc replicas on one etcd (fsync on), measured
//! against the RPC ceiling and the naive etcd semaphore at the same client concurrency.
//!
//! Rows: `rpc_ceiling` (Health/Check on replica 1), `naive_etcd_semaphore` (txn
//! put-if-absent + delete per pair, straight on etcd), `limiter_pairs` (Acquire then Release
//! on 64 keys far below their limit, callers spread round-robin over the replicas) and
//! `limiter_reject` (Acquire on one key whose only slot is held: every call is REJECTED).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use etcd_client::GetOptions;
use plumbing::auth::Scope;
use proto::limiter::v1::limiter_service_client::LimiterServiceClient;
use proto::limiter::v1::{AcquireRequest, Decision, Limit, ReleaseRequest, SetLimitRequest};
use tokio::time::Instant;
use tonic::transport::Channel;

use super::baseline::{self, Auth, status_text};
use super::load::{self, Plan, Sample, Worker};
use super::report::{Goal, Row};
use super::stack::{Stack, WindowFacts};
use super::{OP_TIMEOUT, Options, Report, Result, progress};

/// Limiter replicas.
const REPLICAS: usize = 3;
/// Keys of `limiter_pairs`: accounts `AC_bench_0` … `AC_bench_63`, resource `bench`.
const ACCOUNTS: usize = 64;
const RESOURCE: &str = "bench";
/// Their limit: the largest allowed, so that nothing is ever rejected.
const PAIRS_LIMIT: u32 = 1_000_000;
/// The key of `limiter_reject`, with limit 1.
const REJECT_ACCOUNT: &str = "AC_bench_reject";
const REJECT_RESOURCE: &str = "bench-reject";
/// `hold_seconds` of the measured acquires (released long before).
const HOLD_SECONDS: u32 = 60;
/// `hold_seconds` of the slot that keeps the reject key full.
const BLOCKER_HOLD_SECONDS: u32 = 3_600;
/// Bound on getting the replicas ready (limits seen, every shard owned).
const READY_TIMEOUT: Duration = Duration::from_secs(30);

type Client = LimiterServiceClient<Channel>;

fn account(index: usize) -> String {
    format!("AC_bench_{}", index % ACCOUNTS)
}

fn acquire_request(account: &str, resource: &str, request_id: &str, hold: u32) -> AcquireRequest {
    AcquireRequest {
        account_id: account.to_owned(),
        resource: resource.to_owned(),
        request_id: request_id.to_owned(),
        hold_seconds: hold,
        wait_timeout_ms: 0,
    }
}

fn decision_name(decision: i32) -> String {
    Decision::try_from(decision).map_or_else(|_| decision.to_string(), |d| format!("{d:?}"))
}

/// Runs the scenario: starts etcd and the replicas, measures, stops them.
pub async fn run(options: &Options, report: &mut Report) -> Result<()> {
    progress(format_args!("starting etcd (fsync on)"));
    let mut stack = Stack::start(options).await?;
    let outcome = measure(&mut stack, options, report).await;
    progress(format_args!("stopping the services and etcd"));
    for remark in stack.shutdown().await {
        progress(format_args!("{remark}"));
        report.remarks.push(format!("limiter: {remark}"));
    }
    outcome
}

async fn measure(stack: &mut Stack, options: &Options, report: &mut Report) -> Result<()> {
    progress(format_args!("starting {REPLICAS} limiter-svc replicas"));
    let addrs = stack.start_services("limiter-svc", REPLICAS, &[]).await?;
    let admin = Auth::platform(&[Scope::Admin])?;
    let caller = Auth::platform(&[Scope::LimiterAcquire])?;
    let setup: Vec<Client> = addrs
        .iter()
        .map(|addr| Ok(LimiterServiceClient::new(stack.channel(*addr)?)))
        .collect::<Result<_>>()?;

    progress(format_args!(
        "setting limits and waiting for every replica to serve every key"
    ));
    let mut first = setup[0].clone();
    for index in 0..ACCOUNTS {
        set_limit(&mut first, &admin, &account(index), RESOURCE, PAIRS_LIMIT).await?;
    }
    set_limit(&mut first, &admin, REJECT_ACCOUNT, REJECT_RESOURCE, 1).await?;
    wait_pairs_ready(&setup, &admin).await?;
    hold_reject_key(&setup, &admin).await?;
    let shards = shard_owners(stack, &addrs).await?;
    progress(format_args!("ready; {shards}"));

    progress(format_args!("measuring rpc_ceiling"));
    let (ceiling, ceiling_facts) = baseline::rpc_ceiling(options, stack, addrs[0]).await?;
    load::ensure_progress("rpc_ceiling", &ceiling)?;
    report.row(Row {
        name: "rpc_ceiling".to_owned(),
        rate: ceiling.rate(),
        unit: "calls/s",
        p50: ceiling.percentile(0.50),
        p99: ceiling.percentile(0.99),
        notes: format!(
            "grpc.health.v1.Health/Check on limiter-svc#1, no auth; {}; {}{}",
            ceiling_facts.cpu,
            ceiling.error_note(),
            ceiling_facts.server_errors()
        ),
    });

    progress(format_args!("measuring naive_etcd_semaphore"));
    let (naive, naive_facts) = baseline::naive_etcd(options, stack).await?;
    load::ensure_progress("naive_etcd_semaphore", &naive)?;
    report.row(Row {
        name: "naive_etcd_semaphore".to_owned(),
        rate: naive.rate(),
        unit: "pairs/s",
        p50: naive.percentile(0.50),
        p99: naive.percentile(0.99),
        notes: format!(
            "per pair: txn put-if-absent + delete, straight on etcd; {}; {}; {}; {}",
            naive_facts.writes_per(&naive, "pair"),
            naive_facts.etcd_note(naive.seconds),
            naive_facts.cpu,
            naive.error_note()
        ),
    });

    progress(format_args!("measuring limiter_pairs"));
    let (pairs, pairs_facts) = limiter_pairs(options, stack, &addrs, &caller).await?;
    load::ensure_progress("limiter_pairs", &pairs)?;
    report.row(Row {
        name: "limiter_pairs".to_owned(),
        rate: pairs.rate(),
        unit: "pairs/s",
        p50: pairs.percentile(0.50),
        p99: pairs.percentile(0.99),
        notes: format!(
            "Acquire+Release, {REPLICAS} replicas round-robin, {ACCOUNTS} keys; {shards}; {}; {}; \
             {}; {}; {}{}",
            pairs_facts.writes_per(&pairs, "pair"),
            txn_note(&pairs_facts),
            pairs_facts.etcd_note(pairs.seconds),
            pairs_facts.cpu,
            pairs.error_note(),
            pairs_facts.server_errors()
        ),
    });

    progress(format_args!("measuring limiter_reject"));
    let (reject, reject_facts) = limiter_reject(options, stack, &addrs, &caller).await?;
    load::ensure_progress("limiter_reject", &reject)?;
    report.row(Row {
        name: "limiter_reject".to_owned(),
        rate: reject.rate(),
        unit: "calls/s",
        p50: reject.percentile(0.50),
        p99: reject.percentile(0.99),
        notes: format!(
            "Acquire on 1 full key (limit 1), all REJECTED, {REPLICAS} replicas round-robin \
             (non-owners forward); etcd writes in window: {}; {}; {}{}",
            reject_facts.writes,
            reject_facts.cpu,
            reject.error_note(),
            reject_facts.server_errors()
        ),
    });

    report.warn_noise(
        "limiter",
        &[&ceiling_facts, &naive_facts, &pairs_facts, &reject_facts],
    );
    report.ratio(
        "limiter_vs_naive_etcd",
        pairs.rate() / naive.rate(),
        Goal::AtLeast(4.0),
    );
    report.ratio(
        "limiter_vs_rpc_ceiling",
        pairs.rate() / ceiling.rate(),
        Goal::AtLeast(0.25),
    );
    report.ratio(
        "reject_p99_vs_ceiling_p99",
        reject.percentile(0.99).as_secs_f64() / ceiling.percentile(0.99).as_secs_f64(),
        Goal::AtMost(2.0),
    );
    report.ratio(
        "reject_etcd_writes",
        reject_facts.writes as f64,
        Goal::AtMost(0.0),
    );
    Ok(())
}

/// `slot txns 175/s, mean 5.7 ms, 43 ops each` from the replicas' metrics.
fn txn_note(facts: &WindowFacts) -> String {
    let txns = facts.metric("switchboard_limiter_txn_duration_seconds_count");
    if txns <= 0.0 {
        return "slot txn metrics unavailable".to_owned();
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

async fn set_limit(
    client: &mut Client,
    admin: &Auth,
    account: &str,
    resource: &str,
    max_in_flight: u32,
) -> Result<()> {
    let limit = Limit {
        account_id: account.to_owned(),
        resource: resource.to_owned(),
        max_in_flight,
        shadow: false,
    };
    client
        .set_limit(admin.request(SetLimitRequest { limit: Some(limit) }))
        .await
        .map_err(|s| format!("SetLimit {account}/{resource}: {}", status_text(&s)))?;
    Ok(())
}

/// Polls until every replica grants every pairs key with the benchmark's limit (so every
/// key's shard has an owner and every replica has seen the limits).
async fn wait_pairs_ready(setup: &[Client], admin: &Auth) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    let mut pending: Vec<(usize, usize)> = (0..setup.len())
        .flat_map(|replica| (0..ACCOUNTS).map(move |index| (replica, index)))
        .collect();
    let mut last = String::new();
    loop {
        let mut still = Vec::new();
        for (replica, index) in pending {
            let mut client = setup[replica].clone();
            let request = acquire_request(&account(index), RESOURCE, "", 5);
            match client.acquire(admin.request(request)).await {
                Ok(answer) => {
                    let answer = answer.into_inner();
                    if answer.decision == Decision::Granted as i32 {
                        let release = ReleaseRequest {
                            slot_id: answer.slot_id.clone(),
                        };
                        let _ = client.release(admin.request(release)).await;
                    }
                    if answer.decision != Decision::Granted as i32 || answer.limit != PAIRS_LIMIT {
                        last = format!(
                            "replica {} {}: {} with limit {}",
                            replica + 1,
                            account(index),
                            decision_name(answer.decision),
                            answer.limit
                        );
                        still.push((replica, index));
                    }
                }
                Err(status) => {
                    last = format!("replica {}: {}", replica + 1, status_text(&status));
                    still.push((replica, index));
                }
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
    let mut held = false;
    let mut replica = 0;
    while replica < setup.len() {
        let mut client = setup[if held { replica } else { 0 }].clone();
        // The blocker carries a request id: retrying it returns the same slot.
        let request_id = if held { "" } else { "bench-reject-blocker" };
        let hold = if held { 1 } else { BLOCKER_HOLD_SECONDS };
        let request = acquire_request(REJECT_ACCOUNT, REJECT_RESOURCE, request_id, hold);
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
                        "replica {} granted a second slot of {REJECT_ACCOUNT}/{REJECT_RESOURCE} \
                         beyond its limit 1",
                        replica + 1
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

/// `shards owned at start 6/5/5 of 16`: how the replicas split the shards (from etcd's
/// ownership keys).
async fn shard_owners(stack: &Stack, addrs: &[SocketAddr]) -> Result<String> {
    let mut client = stack.etcd_client().await?;
    let prefix = format!("{}/limiter/shards/", stack.prefix);
    let answer = tokio::time::timeout(
        OP_TIMEOUT,
        client.get(prefix.as_str(), Some(GetOptions::new().with_prefix())),
    )
    .await
    .map_err(|_| "etcd did not answer within the deadline")??;
    let mut owned: BTreeMap<usize, usize> = BTreeMap::new();
    for kv in answer.kvs() {
        let value = String::from_utf8_lossy(kv.value());
        if let Some(replica) = addrs
            .iter()
            .position(|addr| value.contains(&format!("\"{addr}\"")))
        {
            *owned.entry(replica).or_default() += 1;
        }
    }
    let counts: Vec<String> = (0..addrs.len())
        .map(|replica| owned.get(&replica).copied().unwrap_or(0).to_string())
        .collect();
    Ok(format!(
        "shards owned at start {} of {}",
        counts.join("/"),
        answer.kvs().len()
    ))
}

struct PairWorker {
    client: Client,
    auth: Auth,
    account: String,
}

impl Worker for PairWorker {
    async fn call(&mut self) -> std::result::Result<(), String> {
        let request = acquire_request(&self.account, RESOURCE, "", HOLD_SECONDS);
        let answer = self
            .client
            .acquire(self.auth.request(request))
            .await
            .map_err(|s| format!("Acquire {}", status_text(&s)))?
            .into_inner();
        if answer.decision != Decision::Granted as i32 {
            return Err(format!(
                "Acquire answered {} (limit {}, in flight {})",
                decision_name(answer.decision),
                answer.limit,
                answer.in_flight
            ));
        }
        let release = ReleaseRequest {
            slot_id: answer.slot_id,
        };
        let released = self
            .client
            .release(self.auth.request(release))
            .await
            .map_err(|s| format!("Release {}", status_text(&s)))?
            .into_inner()
            .released;
        if released {
            Ok(())
        } else {
            Err("Release answered released=false for a slot just granted".to_owned())
        }
    }
}

async fn limiter_pairs(
    options: &Options,
    stack: &Stack,
    addrs: &[SocketAddr],
    auth: &Auth,
) -> Result<(Sample, WindowFacts)> {
    let clients = load::share(options.concurrency, addrs.len(), |target| {
        let addr = addrs[target];
        async move { Ok(LimiterServiceClient::new(stack.channel(addr)?)) }
    })
    .await?;
    let workers = clients
        .into_iter()
        .enumerate()
        .map(|(caller, (_, client))| PairWorker {
            client,
            auth: auth.clone(),
            account: account(caller),
        })
        .collect();
    let plan = Plan::new(options);
    let window = stack.watch_window(&plan).await?;
    let sample = load::drive(&plan, workers).await?;
    Ok((sample, window.finish().await?))
}

struct RejectWorker {
    client: Client,
    auth: Auth,
}

impl Worker for RejectWorker {
    async fn call(&mut self) -> std::result::Result<(), String> {
        let request = acquire_request(REJECT_ACCOUNT, REJECT_RESOURCE, "", HOLD_SECONDS);
        let answer = self
            .client
            .acquire(self.auth.request(request))
            .await
            .map_err(|s| format!("Acquire {}", status_text(&s)))?
            .into_inner();
        if answer.decision == Decision::Rejected as i32 {
            return Ok(());
        }
        if answer.decision == Decision::Granted as i32 {
            let release = ReleaseRequest {
                slot_id: answer.slot_id,
            };
            let _ = self.client.release(self.auth.request(release)).await;
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

async fn limiter_reject(
    options: &Options,
    stack: &Stack,
    addrs: &[SocketAddr],
    auth: &Auth,
) -> Result<(Sample, WindowFacts)> {
    let clients = load::share(options.concurrency, addrs.len(), |target| {
        let addr = addrs[target];
        async move { Ok(LimiterServiceClient::new(stack.channel(addr)?)) }
    })
    .await?;
    let workers = clients
        .into_iter()
        .map(|(_, client)| RejectWorker {
            client,
            auth: auth.clone(),
        })
        .collect();
    let plan = Plan::new(options);
    let window = stack.watch_window(&plan).await?;
    let sample = load::drive(&plan, workers).await?;
    Ok((sample, window.finish().await?))
}

//! The soak of issue 13 (`scripts/soak --minutes N`, the `soak` binary; CI runs a 1-minute
//! version as the suite test `soak`): the whole stack under mixed, modest load with etcd
//! faults injected on a schedule, then a report of what should have come back to nothing.
//!
//! The world ([`fleet`]): a 3-member etcd cluster ([`crate::EtcdCluster`]) and two replicas
//! each of limiter-svc, presence-svc and router-svc, real binaries from one folder (release
//! for `scripts/soak`, debug for the test), every service given every etcd endpoint.
//!
//! The load ([`pace`]: open loop, each kind at a fixed rate, every operation bounded):
//! Connect sessions churning ([`presence`]), TTL registrations (some unregistered, some
//! abandoned to expire), Acquire/Release pairs ([`limiter`]) of which a fifth "crash" (they
//! never release; their hold is short), and communications routed end to end to
//! auto-answering devices ([`router`]), plus some that nobody answers.
//!
//! The faults ([`faults`]), one every `fault_every`, in turn: the etcd leader SIGKILLed and
//! restarted, a follower SIGSTOPped for `pause_for`, a limiter replica SIGKILLed and
//! restarted, the leader SIGSTOPped.
//!
//! What is measured after the load has stopped, each against an independent count kept by
//! the callers:
//! - **slots leaked** ([`limiter::drain`]): once every caller has released and every
//!   crashed caller's hold has passed, `GetUsage` must show `in_flight` 0 for every soak
//!   resource (and the router's `communications`), and the callers' ledger 0 outstanding;
//! - **watch events lost** ([`watch`]): a WatchPresence stream that resumes from its last
//!   revision whenever it breaks — and is broken on purpose every `watch_hop_every`, moving
//!   to the other replica — must have seen every presence change a caller was acknowledged
//!   with a revision (Register, UpdateStatus, Unregister, a Connect `registered`);
//! - **keys left over** ([`keys`]): after the services have stopped, every key under the
//!   soak's prefix is classified; durable families (limits, commit markers, applications)
//!   and expiring ones (leave notes, ended communications under their retention lease) are
//!   listed, anything else (device records, slots, shard or member keys, running
//!   communications, owned-index entries, unknown keys) is a leak;
//! - **RSS growth** ([`rss`]): each service process's resident memory, sampled every
//!   `sample_every`; after `warmup`, the first and last value and the least-squares slope.
//!
//! [`Report`] prints a table and `soak NAME VALUE` lines; [`Report::passed`] says whether
//! every check held (the binary exits non-zero otherwise).

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

mod faults;
mod fleet;
mod keys;
mod limiter;
mod pace;
mod presence;
mod report;
mod router;
mod rss;
mod watch;

pub use report::Report;

use fleet::Fleet;

/// Any failure that stops the soak before it can report (a service that does not start,
/// a fault that cannot be injected).
pub type Error = Box<dyn std::error::Error + Send + Sync>;
/// Result of the soak's steps.
pub type Result<T> = std::result::Result<T, Error>;

/// The account every soak call acts for (platform tokens naming it).
const ACCOUNT: &str = "AC_soak";
/// Deadline of one unary call; longer than the services' own 5 s etcd deadline.
const CALL_TIMEOUT: Duration = Duration::from_secs(6);
/// Bound on each setup step (limits, applications, devices, the first route).
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long communications may take to end after the load (every Dial's `timeLimit` is
/// 20 s) and after a router replica stops (its lease is revoked; the other's sweep runs
/// every TTL/3).
const SETTLE_TIMEOUT: Duration = Duration::from_secs(30);

/// What a soak run does; [`Options::scaled`] derives everything from the duration.
#[derive(Debug, Clone)]
pub struct Options {
    /// How long the load runs.
    pub duration: Duration,
    /// The first part of the run, left out of the RSS figures (caches and pools filling).
    pub warmup: Duration,
    /// Time between the starts of two faults.
    pub fault_every: Duration,
    /// How long a SIGSTOPped etcd member stays frozen.
    pub pause_for: Duration,
    /// How long a SIGKILLed etcd member or limiter replica stays down before its restart.
    pub down_for: Duration,
    /// Time between two RSS samples.
    pub sample_every: Duration,
    /// The resuming watcher breaks its stream on purpose this often.
    pub watch_hop_every: Duration,
    /// `--communication-retention` of the routers (bounded, so their memory plateaus).
    pub retention: Duration,
    /// Highest RSS slope after the warm-up, in MiB per minute, that passes.
    pub max_rss_slope: f64,
    /// Folder holding the `*-svc` binaries to run.
    pub binaries: PathBuf,
    /// The command line, for the report.
    pub command: String,
}

impl Options {
    /// A run of `duration` with the other settings scaled to it: warm-up a fifth (10 s to
    /// 2 min), a fault every twelfth (8 s to 60 s), a pause a sixtieth (4 s to 10 s).
    pub fn scaled(duration: Duration, binaries: PathBuf) -> Self {
        let part = |divisor: u32, low: u64, high: u64| {
            (duration / divisor).clamp(Duration::from_secs(low), Duration::from_secs(high))
        };
        Self {
            duration,
            warmup: part(5, 10, 120),
            fault_every: part(12, 8, 60),
            pause_for: part(60, 4, 10),
            down_for: Duration::from_secs(3),
            sample_every: part(120, 1, 5),
            watch_hop_every: part(20, 5, 30),
            retention: part(10, 10, 60),
            max_rss_slope: 2.0,
            binaries,
            command: String::new(),
        }
    }
}

/// Runs the soak: starts the world, loads it through the faults, checks what is left,
/// stops everything (also on error: every child process dies with its handle).
pub async fn run(options: &Options) -> Result<Report> {
    if options.duration <= options.warmup {
        return Err("the duration must be longer than the warm-up".into());
    }
    progress(format_args!(
        "starting a 3-member etcd cluster and 2 replicas of each service from {}",
        options.binaries.display()
    ));
    let fleet = Arc::new(Fleet::start(options).await?);
    let outcome = soak(&fleet, options).await;
    let remarks = fleet.scan_logs(outcome.is_err());
    let mut report = outcome?;
    report.remarks.extend(remarks);
    Ok(report)
}

async fn soak(fleet: &Arc<Fleet>, options: &Options) -> Result<Report> {
    progress(format_args!("setting limits, applications and devices"));
    let world = router::World::setup(fleet).await?;
    let from = fleet.etcd_revision().await? + 1;
    let acks = watch::Acks::default();
    let watcher = watch::Watcher::start(fleet.addrs("presence-svc"), from, options.watch_hop_every);
    let ledger = Arc::new(limiter::Ledger::default());

    let start = Instant::now();
    let end = start + options.duration;
    progress(format_args!(
        "load for {:?} (warm-up {:?}), a fault every {:?}",
        options.duration, options.warmup, options.fault_every
    ));
    let sampler = rss::Sampler::start(fleet.clone(), start, options.sample_every);
    let faults = faults::start(fleet.clone(), faults::Plan::of(options), start, end);
    let loads = vec![
        presence::sessions(fleet, acks.clone(), end),
        presence::registrations(fleet, acks.clone(), end),
        limiter::acquires(fleet, ledger.clone(), end),
        router::communications(&world, end),
        router::unanswered(&world, end),
    ];
    let mut tallies = Vec::new();
    for load in loads {
        tallies.push(load.await?);
    }
    let injected = faults
        .await
        .map_err(|err| format!("fault injection failed: {err}"))??;
    let samples = sampler.stop().await;
    let load_end = Instant::now();
    progress(format_args!(
        "load stopped ({:?} after its end); ending sessions and checking",
        load_end - end
    ));
    drop(world);

    let watch = watcher.finish(&acks, Duration::from_secs(15)).await;
    let slots = limiter::drain(fleet, &ledger, load_end).await;
    let running = router::await_settled(fleet, SETTLE_TIMEOUT).await;
    let exited = fleet.unexpected_exits().await;
    // One router first, so that the other settles whatever it leaves running (as after
    // any replica's departure), then everything else.
    progress(format_args!(
        "stopping router-svc#2, then the other services (SIGTERM)"
    ));
    let mut stopped: Vec<String> = fleet
        .stop_replica("router-svc", 1)
        .await
        .into_iter()
        .collect();
    let handed_over = router::await_settled(fleet, SETTLE_TIMEOUT).await;
    stopped.extend(fleet.stop_services().await);
    let keys = keys::leftovers(fleet, Duration::from_secs(15)).await?;
    let rss = rss::analyse(&samples, options.warmup);

    Ok(Report {
        options: options.clone(),
        tallies,
        faults: injected,
        watch,
        slots,
        running_after_load: running,
        running_after_router_stop: handed_over,
        keys,
        rss,
        exited,
        remarks: stopped,
    })
}

/// `message` with the soak's `token` and the unary deadline.
fn call<T>(token: &str, message: T) -> tonic::Request<T> {
    let mut request = crate::Tokens::request(token, message);
    request.set_timeout(CALL_TIMEOUT);
    request
}

/// A platform token naming [`ACCOUNT`] with `scopes`, valid for a day (longer than any
/// soak).
fn token(scopes: &[plumbing::auth::Scope]) -> String {
    crate::Tokens::signed(
        crate::PLATFORM_KEY_ID,
        crate::PLATFORM_SECRET,
        ACCOUNT,
        None,
        scopes,
        23 * 3_600,
    )
}

/// `Code: message` of a failed call, bounded, for the tallies.
fn status_text(call: &str, status: &tonic::Status) -> String {
    let text = format!("{call} {:?}: {}", status.code(), status.message());
    text.chars().take(120).collect()
}

/// A progress line on stderr.
fn progress(message: std::fmt::Arguments<'_>) {
    eprintln!("[soak] {message}");
}

//! The benchmark of docs/CONTRACT.md §6, run by `scripts/bench <scenario>` (this crate's `bench`
//! binary, `cargo run --release -p switchboard-bench --bin bench -- <scenario>`).
//!
//! It is a crate of its own so that the `integration` crate only tests: it uses that
//! crate's harness ([`integration::Etcd`], [`integration::free_port`], the test platform key)
//! as a library, and nothing there depends on it.
//!
//! Each scenario starts its own world — a single-member etcd **with fsync on** on free
//! loopback ports and the real release service binaries (`target/release/*-svc`, next to
//! the `bench` executable) — drives it with closed-loop callers from this process, prints
//! one markdown table row per measurement, and stops everything at the end (every child
//! process is also killed when dropped, so an error or a panic leaves nothing behind).
//!
//! Every measurement of a run uses the same shape: `--concurrency` callers, each a task
//! looping one operation; callers share HTTP/2 channels (or etcd clients), one per
//! [`CALLERS_PER_CHANNEL`] callers of the same target; `--warmup` seconds are run and
//! discarded, then `--duration` seconds are measured. Throughput counts the operations that
//! completed inside the measured window; latencies are those operations' (nearest-rank
//! percentiles over every sample, no histogram buckets). Every operation has a deadline
//! ([`OP_TIMEOUT`]); a failed operation is counted as an error (reported with its gRPC code
//! and message), not as a sample, and its caller pauses briefly before looping.
//!
//! Scenarios are functions registered in [`SCENARIOS`]; `all` runs every one in turn.
//! After the table come the headline figures, one `ratio NAME VALUE` line each; the
//! binary then draws the run's charts ([`write_charts`]: SVG files, one per figure).

use std::fmt::Write as _;
use std::time::Duration;

use futures::future::BoxFuture;

mod baseline;
mod chart;
mod limiter;
mod load;
mod presence;
mod redis_baseline;
mod report;
mod router;
mod stack;
mod sys;

pub use chart::write_charts;
pub use report::Report;

/// Any failure of the benchmark; it aborts the run with this message.
pub type Error = Box<dyn std::error::Error + Send + Sync>;
/// Result of the benchmark's steps.
pub type Result<T> = std::result::Result<T, Error>;

/// Callers sharing one HTTP/2 channel (or one etcd client), in every measurement.
pub const CALLERS_PER_CHANNEL: usize = 8;
/// Deadline of one measured operation (an acquire+release pair counts as one).
pub const OP_TIMEOUT: Duration = Duration::from_secs(5);

/// Settings shared by every measurement of a run.
#[derive(Debug, Clone)]
pub struct Options {
    /// Concurrent callers.
    pub concurrency: usize,
    /// Measured time per measurement.
    pub duration: Duration,
    /// Discarded time before each measurement.
    pub warmup: Duration,
    /// Serve every started service over TLS (None: plain text, the default).
    pub tls: Option<BenchTls>,
}

/// The files of a TLS run: the services serve `cert`/`key`; the benchmark and the services'
/// calls to each other trust `ca`.
#[derive(Debug, Clone)]
pub struct BenchTls {
    /// Certificate (PEM) every service serves; valid for `127.0.0.1`.
    pub cert: std::path::PathBuf,
    /// Its private key (PEM).
    pub key: std::path::PathBuf,
    /// The CA (PEM) that signed `cert`.
    pub ca: std::path::PathBuf,
}

/// A scenario: a name for the command line and the function that measures it.
#[derive(Debug, Clone, Copy)]
pub struct Scenario {
    /// What `bench <name>` selects.
    pub name: &'static str,
    /// One line for the usage text.
    pub about: &'static str,
    /// Starts its world, measures, adds rows and ratios to the report, stops its world.
    pub run: for<'a> fn(&'a Options, &'a mut Report) -> BoxFuture<'a, Result<()>>,
}

/// Every scenario, in the order `all` runs them.
pub const SCENARIOS: &[Scenario] = &[
    Scenario {
        name: "limiter",
        about: "limiter-svc (3 and 1 replicas) against the RPC ceiling, the naive etcd \
                semaphore and a Redis semaphore",
        run: run_limiter,
    },
    Scenario {
        name: "presence",
        about: "presence-svc (1 replica): reads against the RPC ceiling, registrations, \
                watch latency, 100,000 Connect sessions and their memory",
        run: run_presence,
    },
    Scenario {
        name: "router",
        about: "router-svc with presence-svc and limiter-svc: communications routed end to \
                end per second (route → offer → auto-answer → hangup)",
        run: run_router,
    },
];

fn run_limiter<'a>(options: &'a Options, report: &'a mut Report) -> BoxFuture<'a, Result<()>> {
    Box::pin(limiter::run(options, report))
}

fn run_presence<'a>(options: &'a Options, report: &'a mut Report) -> BoxFuture<'a, Result<()>> {
    Box::pin(presence::run(options, report))
}

fn run_router<'a>(options: &'a Options, report: &'a mut Report) -> BoxFuture<'a, Result<()>> {
    Box::pin(router::run(options, report))
}

/// The scenarios `selection` names (`all`: every one), or `None` when it names none.
pub fn select(selection: &str) -> Option<Vec<Scenario>> {
    if selection == "all" {
        return Some(SCENARIOS.to_vec());
    }
    SCENARIOS
        .iter()
        .find(|s| s.name == selection)
        .map(|s| vec![*s])
}

/// The list of scenarios for usage texts.
pub fn scenario_list() -> String {
    let mut text = String::new();
    for scenario in SCENARIOS {
        let _ = writeln!(text, "  {:<10} {}", scenario.name, scenario.about);
    }
    let _ = writeln!(text, "  {:<10} every scenario above, in turn", "all");
    text
}

/// Runs `scenarios`, printing the report to stdout as it goes (progress goes to stderr).
pub async fn run(scenarios: &[Scenario], options: &Options, command: &str) -> Result<Report> {
    if options.concurrency == 0 {
        return Err("--concurrency must be at least 1".into());
    }
    if options.duration.is_zero() {
        return Err("--duration must be more than 0".into());
    }
    let mut report = Report::start(options, command);
    for scenario in scenarios {
        progress(format_args!("scenario {}", scenario.name));
        report.begin_scenario(scenario.name);
        (scenario.run)(options, &mut report).await?;
    }
    report.finish();
    Ok(report)
}

/// A progress line on stderr.
pub(crate) fn progress(message: std::fmt::Arguments<'_>) {
    eprintln!("[bench] {message}");
}

//! `bench <scenario> [--concurrency N] [--duration SECS] [--warmup SECS] [--charts DIR]
//! [--tls-cert PEM --tls-key PEM --tls-ca PEM]`: the benchmark of
//! docs/CONTRACT.md §6 (see the `switchboard_bench` crate and docs/BENCHMARKS.md). Run it through
//! `scripts/bench`, which builds the release binaries it starts.
#![forbid(unsafe_code)]

#[global_allocator]
static ALLOCATOR: plumbing::Allocator = plumbing::Allocator;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use switchboard_bench::{self as bench, BenchTls, Options};

/// Benchmarks Switchboard against real etcd (fsync on) and the release service binaries.
#[derive(Debug, Parser)]
#[command(name = "bench", after_help = after_help())]
struct Cli {
    /// Which scenario to run (see below).
    scenario: String,

    /// Concurrent callers, the same for every measurement of the run.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,

    /// Measured seconds per measurement.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,

    /// Discarded seconds before each measurement.
    #[arg(long, default_value_t = 2.0)]
    warmup: f64,

    /// Folder the run's SVG charts are written to (default: `bench/` in the target
    /// directory this binary was built in, `target/bench`).
    #[arg(long, value_name = "DIR")]
    charts: Option<PathBuf>,

    /// Run over TLS: every service started serves this certificate (PEM, valid for
    /// 127.0.0.1); needs `--tls-key` and `--tls-ca`. Plain text by default.
    #[arg(long, env = "SWITCHBOARD_TLS_CERT")]
    tls_cert: Option<PathBuf>,

    /// Private key (PEM) of `--tls-cert`.
    #[arg(long, env = "SWITCHBOARD_TLS_KEY")]
    tls_key: Option<PathBuf>,

    /// CA (PEM) that signed `--tls-cert`: the benchmark and the services' calls to each
    /// other trust it.
    #[arg(long, env = "SWITCHBOARD_TLS_CA")]
    tls_ca: Option<PathBuf>,
}

fn after_help() -> String {
    format!("Scenarios:\n{}", bench::scenario_list())
}

fn seconds(flag: &str, value: f64) -> Result<Duration, String> {
    Duration::try_from_secs_f64(value).map_err(|_| format!("{flag} {value}: not a duration"))
}

/// `target/bench` when this binary is `target/release/bench`.
fn default_charts() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("bench")))
        .unwrap_or_else(|| PathBuf::from("target/bench"))
}

/// Writes the run's charts into `dir` and lists them after the report.
fn write_charts(report: &bench::Report, dir: &Path) -> Result<(), bench::Error> {
    let paths = bench::write_charts(report, dir)?;
    if !paths.is_empty() {
        println!("\ncharts:");
        for path in paths {
            println!("- {}", path.display());
        }
    }
    Ok(())
}

fn options(cli: &Cli) -> Result<Options, String> {
    let duration = seconds("--duration", cli.duration)?;
    if duration.is_zero() {
        return Err("--duration must be more than 0".to_owned());
    }
    if cli.concurrency == 0 {
        return Err("--concurrency must be at least 1".to_owned());
    }
    let tls = match (&cli.tls_cert, &cli.tls_key, &cli.tls_ca) {
        (None, None, None) => None,
        (Some(cert), Some(key), Some(ca)) => Some(BenchTls {
            cert: cert.clone(),
            key: key.clone(),
            ca: ca.clone(),
        }),
        _ => return Err("--tls-cert, --tls-key and --tls-ca go together".to_owned()),
    };
    Ok(Options {
        concurrency: cli.concurrency,
        duration,
        warmup: seconds("--warmup", cli.warmup)?,
        tls,
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Some(scenarios) = bench::select(&cli.scenario) else {
        eprintln!(
            "bench: unknown scenario `{}`\n\nusage: bench <scenario> [--concurrency N] \
             [--duration SECS] [--warmup SECS] [--charts DIR]\n\nScenarios:\n{}",
            cli.scenario,
            bench::scenario_list()
        );
        return ExitCode::from(2);
    };
    let options = match options(&cli) {
        Ok(options) => options,
        Err(err) => {
            eprintln!("bench: {err}");
            return ExitCode::from(2);
        }
    };
    let charts = cli.charts.clone().unwrap_or_else(default_charts);
    let command = std::env::args().collect::<Vec<_>>().join(" ");
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("bench: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    // On SIGINT/SIGTERM the run is dropped: its child processes are killed and its
    // temporary folders removed.
    let outcome = runtime.block_on(async {
        tokio::select! {
            outcome = bench::run(&scenarios, &options, &command) => {
                outcome.and_then(|report| write_charts(&report, &charts))
            }
            () = plumbing::server::shutdown_signal() => Err("interrupted".into()),
        }
    });
    // Child processes are killed when their handles drop; shut down before exiting.
    runtime.shutdown_timeout(Duration::from_secs(5));
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("bench: error: {err}");
            ExitCode::FAILURE
        }
    }
}

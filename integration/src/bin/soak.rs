//! `soak --minutes N [--max-rss-slope MIB_PER_MIN]`: the whole stack under mixed load with
//! etcd faults on a schedule, then what leaked (see `integration::soak` and the "Soak"
//! section of docs/OPERATIONS.md). Run it through `scripts/soak`, which builds the release
//! binaries it starts. Exits 1 when a check fails, 2 on bad flags.
#![forbid(unsafe_code)]

#[global_allocator]
static ALLOCATOR: plumbing::Allocator = plumbing::Allocator;

use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use integration::soak::{self, Options};

/// Soaks Switchboard: a 3-member etcd cluster and 2 replicas of each release service.
#[derive(Debug, Parser)]
#[command(name = "soak")]
struct Cli {
    /// How long the load runs, in minutes (the checks and the shutdown come after).
    #[arg(long, default_value_t = 10.0)]
    minutes: f64,

    /// Highest RSS slope after the warm-up that passes, MiB per minute, per service.
    #[arg(long, default_value_t = 2.0)]
    max_rss_slope: f64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let Some(duration) = Duration::try_from_secs_f64(cli.minutes * 60.0)
        .ok()
        .filter(|d| *d >= Duration::from_secs(30))
    else {
        eprintln!("soak: --minutes {} must be at least 0.5", cli.minutes);
        return ExitCode::from(2);
    };
    // The service binaries sit next to this one (target/release for scripts/soak).
    let Some(binaries) = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(std::path::Path::to_path_buf))
    else {
        eprintln!("soak: cannot find the folder of this executable");
        return ExitCode::FAILURE;
    };
    let mut options = Options::scaled(duration, binaries);
    options.max_rss_slope = cli.max_rss_slope;
    options.command = std::env::args().collect::<Vec<_>>().join(" ");
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("soak: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    // On SIGINT/SIGTERM the run is dropped: its child processes are killed and its
    // temporary folders removed.
    let outcome = runtime.block_on(async {
        tokio::select! {
            outcome = soak::run(&options) => outcome,
            () = plumbing::server::shutdown_signal() => Err("interrupted".into()),
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(5));
    match outcome {
        Ok(report) => {
            println!("{report}");
            if report.passed() {
                ExitCode::SUCCESS
            } else {
                for failure in report.failures() {
                    eprintln!("soak: FAILED {failure}");
                }
                ExitCode::FAILURE
            }
        }
        Err(err) => {
            eprintln!("soak: error: {err}");
            ExitCode::FAILURE
        }
    }
}

//! `switchboard-demo [--env FILE] [--presence ADDR] [--limiter ADDR] [--router ADDR]
//! [--softphone PATH] [--logs DIR]`: the demo scenario against a running stack (see the
//! `switchboard_demo` crate). `scripts/stack demo` starts a stack, runs this and stops the
//! stack. Exits 0 when every step gave the expected result, 1 when one did not, 2 on bad
//! flags or a stack it cannot find, 130 when interrupted.
#![forbid(unsafe_code)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use switchboard_demo::softphone::SoftphoneLauncher;
use switchboard_demo::{Failed, Stack, StackEnv};

/// Runs Switchboard's demo scenario against a running stack and checks every answer.
#[derive(Debug, Parser)]
#[command(name = "switchboard-demo")]
struct Cli {
    /// The environment file of the stack (`export NAME='value'` lines: PRESENCE_ADDR,
    /// LIMITER_ADDR, ROUTER_ADDR, PLATFORM_TOKEN, DEMO_TOKEN, ALICE_TOKEN, DEMO_ACCOUNT,
    /// DEMO_IDENTITY, DEMO_ADDRESS); a value it lacks is read from the environment.
    #[arg(long, value_name = "FILE", default_value = ".stack/env")]
    env: PathBuf,

    /// presence-svc's address (default: PRESENCE_ADDR, else 127.0.0.1:50051).
    #[arg(long, value_name = "ADDR")]
    presence: Option<String>,

    /// limiter-svc's address (default: LIMITER_ADDR, else 127.0.0.1:50052).
    #[arg(long, value_name = "ADDR")]
    limiter: Option<String>,

    /// router-svc's address (default: ROUTER_ADDR, else 127.0.0.1:50053).
    #[arg(long, value_name = "ADDR")]
    router: Option<String>,

    /// The softphone binary (default: `softphone` next to this executable).
    #[arg(long, value_name = "PATH")]
    softphone: Option<PathBuf>,

    /// Folder of the softphones' logs (default: the environment file's folder).
    #[arg(long, value_name = "DIR")]
    logs: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let (stack, launcher) = match setup(&cli) {
        Ok(setup) => setup,
        Err(err) => {
            eprintln!("[demo] error: {err}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("[demo] cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let logs = launcher.logs.clone();
    // On SIGINT/SIGTERM the run is dropped: its softphones are killed.
    let outcome = runtime.block_on(async {
        tokio::select! {
            outcome = switchboard_demo::run(stack, launcher) => Some(outcome),
            () = plumbing::server::shutdown_signal() => None,
        }
    });
    runtime.shutdown_timeout(Duration::from_secs(5));
    match outcome {
        Some(Ok(())) => ExitCode::SUCCESS,
        Some(Err(Failed { step, failure })) => {
            eprintln!("\n[demo] demo FAILED at step {step}: {failure}");
            eprintln!("[demo] softphone logs: {}/softphone*.log", logs.display());
            ExitCode::FAILURE
        }
        None => {
            eprintln!("[demo] interrupted");
            ExitCode::from(130)
        }
    }
}

/// The stack from the environment file and the flags, and how to start softphones on it.
fn setup(cli: &Cli) -> Result<(Stack, SoftphoneLauncher), Box<dyn std::error::Error>> {
    let mut stack = Stack::from_env(&StackEnv::read(&cli.env)?)?;
    let flags = [
        (&cli.presence, &mut stack.presence),
        (&cli.limiter, &mut stack.limiter),
        (&cli.router, &mut stack.router),
    ];
    for (flag, address) in flags {
        if let Some(flag) = flag {
            address.clone_from(flag);
        }
    }
    let binary = match &cli.softphone {
        Some(binary) => binary.clone(),
        None => std::env::current_exe()?
            .parent()
            .ok_or("this executable has no folder")?
            .join("softphone"),
    };
    if !binary.exists() {
        return Err(format!(
            "{} is not built: cargo build --workspace --bins (or pass --softphone PATH)",
            binary.display()
        )
        .into());
    }
    let logs = match &cli.logs {
        Some(logs) => logs.clone(),
        None => match cli.env.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
            _ => PathBuf::from("."),
        },
    };
    let launcher = SoftphoneLauncher {
        binary,
        logs,
        presence: stack.presence.clone(),
        token: stack.alice_token.clone(),
    };
    Ok((stack, launcher))
}

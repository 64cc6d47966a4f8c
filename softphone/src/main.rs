//! The softphone binary.
#![forbid(unsafe_code)]

#[global_allocator]
static ALLOCATOR: plumbing::Allocator = plumbing::Allocator;

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;
use softphone::keys::KeyInput;
use softphone::{Event, SoftphoneArgs};
use tokio::sync::mpsc;

/// A Switchboard client application in the terminal: holds a presence session for the
/// identity in its token, prints offers of incoming communications and answers them.
///
/// Output: one line per event, e.g. `registered identity=alice device=… status=available`,
/// `offer CM1 offer=… from=+15551234 to=+15550100 channel=voice params=-`,
/// `connected CM1 offer=…`, `cancel CM1 offer=… reason=timeout`,
/// `ended CM1 reason=remote_hangup`, `disconnected address=… reason=… retry_in=250ms next=…`.
/// Ctrl-C closes the session (the device goes offline) and exits 0; a refused token exits 1.
#[derive(Debug, Parser)]
#[command(name = "softphone", version, about, long_about)]
struct Cli {
    #[command(flatten)]
    args: SoftphoneArgs,
}

fn main() -> ExitCode {
    let args = Cli::parse().args;
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("softphone: cannot start the runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        // Keys only without --auto: a softphone answering by itself may run in the
        // background, where touching the terminal would stop it (SIGTTIN/SIGTTOU).
        let (commands, terminal) = if args.auto.is_none() {
            let input = KeyInput::start();
            (input.commands, input.terminal)
        } else {
            (mpsc::channel(1).1, None)
        };
        let (events, mut printed) = mpsc::unbounded_channel::<Event>();
        let printer = tokio::spawn(async move {
            // Line by line (stdout is line-buffered), so a log file follows live; a closed
            // stdout is ignored rather than a panic.
            while let Some(event) = printed.recv().await {
                let _ = writeln!(std::io::stdout(), "{event}");
            }
        });
        if terminal.is_some() {
            let _ = events.send(Event::Help);
        }
        let result =
            softphone::run(args, commands, events, plumbing::server::shutdown_signal()).await;
        let _ = printer.await;
        drop(terminal);
        match result {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("softphone: {err}");
                ExitCode::FAILURE
            }
        }
    })
}

//! The presence-svc binary: `presence-svc [serve flags]` or `presence-svc token …`.
#![forbid(unsafe_code)]

#[global_allocator]
static ALLOCATOR: plumbing::Allocator = plumbing::Allocator;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use presence_svc::token::TokenArgs;
use presence_svc::{PresenceArgs, ServeArgs};

/// Presence of client applications, and the account signing keys.
#[derive(Debug, Parser)]
#[command(name = "presence-svc", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    serve: ServeArgs,
    #[command(flatten)]
    presence: PresenceArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print one signed JWT (HS256) for developers and operators.
    Token(TokenArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Token(args)) = &cli.command {
        return match presence_svc::token::mint(args) {
            Ok(token) => {
                println!("{token}");
                ExitCode::SUCCESS
            }
            Err(err) => {
                eprintln!("presence-svc token: {err}");
                ExitCode::from(2)
            }
        };
    }
    let (args, presence) = (cli.serve, cli.presence);
    plumbing::server::run_binary("presence-svc", &args.common.clone(), || async move {
        let listener = tokio::net::TcpListener::bind(args.listen).await?;
        let stop = plumbing::server::shutdown_signal();
        presence_svc::run_with(args, presence, listener, stop).await
    })
}

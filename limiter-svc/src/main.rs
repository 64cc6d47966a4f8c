//! The limiter-svc binary.
#![forbid(unsafe_code)]

#[global_allocator]
static ALLOCATOR: plumbing::Allocator = plumbing::Allocator;

use std::process::ExitCode;

use clap::Parser;
use limiter_svc::{LimiterArgs, ServeArgs};

/// Concurrency limits: slots per (account, resource), kept in etcd.
#[derive(Debug, Parser)]
#[command(name = "limiter-svc", version, about)]
struct Cli {
    #[command(flatten)]
    serve: ServeArgs,
    #[command(flatten)]
    limiter: LimiterArgs,
}

fn main() -> ExitCode {
    let Cli {
        serve: args,
        limiter,
    } = Cli::parse();
    plumbing::server::run_binary("limiter-svc", &args.common.clone(), || async move {
        let listener = tokio::net::TcpListener::bind(args.listen).await?;
        limiter_svc::run_with(args, limiter, listener, plumbing::server::shutdown_signal()).await
    })
}

//! The router-svc binary.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use router_svc::ServeArgs;

/// Routes incoming communications to client applications.
#[derive(Debug, Parser)]
#[command(name = "router-svc", version, about)]
struct Cli {
    #[command(flatten)]
    serve: ServeArgs,
}

fn main() -> ExitCode {
    let args = Cli::parse().serve;
    plumbing::server::run_binary("router-svc", &args.common.clone(), || async move {
        let listener = tokio::net::TcpListener::bind(args.listen).await?;
        router_svc::run(args, listener, plumbing::server::shutdown_signal()).await
    })
}

//! The router-svc binary.
#![forbid(unsafe_code)]

#[global_allocator]
static ALLOCATOR: plumbing::Allocator = plumbing::Allocator;

use std::process::ExitCode;

use clap::Parser;
use router_svc::{RouterArgs, ServeArgs};

/// Routes incoming communications to client applications.
#[derive(Debug, Parser)]
#[command(name = "router-svc", version, about)]
struct Cli {
    #[command(flatten)]
    serve: ServeArgs,

    #[command(flatten)]
    router: RouterArgs,
}

fn main() -> ExitCode {
    let Cli { serve, router } = Cli::parse();
    plumbing::server::run_binary("router-svc", &serve.common.clone(), || async move {
        let listener = tokio::net::TcpListener::bind(serve.listen).await?;
        router_svc::run_with(serve, router, listener, plumbing::server::shutdown_signal()).await
    })
}

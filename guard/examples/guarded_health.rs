//! A tonic service behind Switchboard's limiter: the standard gRPC health service (standing
//! for yours), each request counted against the account named by its `x-account-id`
//! header, resource `rpc:<path>`.
//!
//! With the stack running (`scripts/stack`) and its demo token, whose account `AC_demo` it
//! may acquire for:
//!
//! ```sh
//! . .stack/env && export SWITCHBOARD_TOKEN="$DEMO_TOKEN"
//! cargo run -p switchboard-guard --example guarded_health -- --listen 127.0.0.1:50060
//! # limit AC_demo to one Watch stream at a time (needs limiter.admin: the stack's platform token)
//! grpcurl -plaintext -H "authorization: Bearer $PLATFORM_TOKEN" \
//!     -d '{"limit": {"account_id": "AC_demo", "resource": "rpc:/grpc.health.v1.Health/Watch", "max_in_flight": 1}}' \
//!     127.0.0.1:50052 switchboard.limiter.v1.LimiterService/SetLimit
//! grpcurl -plaintext -H 'x-account-id: AC_demo' 127.0.0.1:50060 grpc.health.v1.Health/Watch &   # holds the slot
//! grpcurl -plaintext -H 'x-account-id: AC_demo' 127.0.0.1:50060 grpc.health.v1.Health/Watch
//! # ERROR: Code: ResourceExhausted  Message: account `AC_demo` has 1 of 1 requests in flight for /grpc.health.v1.Health/Watch; retry after … ms
//! ```

use std::net::SocketAddr;

use clap::Parser;
use switchboard_guard::{FailMode, guard_by_header};

/// Serves grpc.health.v1.Health behind the guard.
#[derive(Debug, Parser)]
struct Args {
    /// Where to serve.
    #[arg(long, default_value = "127.0.0.1:50060")]
    listen: SocketAddr,
    /// limiter-svc (`host:port`, or several separated by commas).
    #[arg(long, env = "SWITCHBOARD_LIMITER", default_value = "127.0.0.1:50052")]
    limiter: String,
    /// Refuse requests when the limiter cannot be reached, instead of letting them through.
    #[arg(long)]
    fail_closed: bool,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = Args::parse();
    let token = std::env::var("SWITCHBOARD_TOKEN")
        .map_err(|_| "SWITCHBOARD_TOKEN must hold a token with scope limiter.acquire")?;
    let fail = if args.fail_closed {
        FailMode::Closed
    } else {
        FailMode::Open
    };
    let guard = guard_by_header(&args.limiter, &token, "x-account-id", fail)?;
    let (_reporter, health) = tonic_health::server::health_reporter();
    println!(
        "serving grpc.health.v1.Health on {} behind the limiter at {} (fail {:?})",
        args.listen, args.limiter, fail
    );
    tonic::transport::Server::builder()
        .layer(guard)
        .add_service(health)
        .serve(args.listen)
        .await?;
    Ok(())
}

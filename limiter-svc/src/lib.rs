//! limiter-svc: strict, crash-safe concurrency slots on etcd.
#![forbid(unsafe_code)]

use std::future::Future;
use std::net::SocketAddr;

use clap::Args;
use plumbing::config::CommonArgs;
use plumbing::server::{Replica, ServeError};
use proto::limiter::v1::limiter_service_server::{LimiterService, LimiterServiceServer};
use tokio::net::TcpListener;
use tonic::server::NamedService;
use tonic::service::Routes;

/// Flags of the limiter server.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to serve gRPC on.
    #[arg(long, env = "SWITCHBOARD_LISTEN", default_value = "127.0.0.1:50052")]
    pub listen: SocketAddr,

    /// Flags every Switchboard server takes.
    #[command(flatten)]
    pub common: CommonArgs,
}

/// The limiter handlers.
#[derive(Debug, Clone, Default)]
pub struct LimiterApi;

impl LimiterService for LimiterApi {}

/// Serves limiter-svc on `listener` until `stop` resolves.
pub async fn run(
    args: ServeArgs,
    listener: TcpListener,
    stop: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let address = listener.local_addr()?;
    let replica = Replica::start(&args.common, address).await?;
    let routes = Routes::new(LimiterServiceServer::new(LimiterApi));
    replica
        .serve(
            listener,
            routes,
            &[<LimiterServiceServer<LimiterApi> as NamedService>::NAME],
            stop,
        )
        .await
}

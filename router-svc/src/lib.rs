//! router-svc: routes incoming communications by the customer's instructions and the
//! client's presence.
#![forbid(unsafe_code)]

use std::future::Future;
use std::net::SocketAddr;

use clap::Args;
use plumbing::config::CommonArgs;
use plumbing::guard::{GuardArgs, GuardLayer};
use plumbing::server::{Replica, ServeError};
use proto::router::v1::router_service_server::{RouterService, RouterServiceServer};
use tokio::net::TcpListener;
use tonic::server::NamedService;
use tonic::service::Routes;

/// Flags of the router server.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to serve gRPC on.
    #[arg(long, env = "SWITCHBOARD_LISTEN", default_value = "127.0.0.1:50053")]
    pub listen: SocketAddr,

    /// Address of presence-svc (presence reads and offer delivery).
    #[arg(long, env = "SWITCHBOARD_PRESENCE", default_value = "127.0.0.1:50051")]
    pub presence: String,

    /// Allow webhook URLs that resolve to loopback, link-local or private addresses
    /// (for local development; refused by default to prevent SSRF).
    #[arg(long, env = "SWITCHBOARD_ALLOW_PRIVATE_WEBHOOKS")]
    pub allow_private_webhooks: bool,

    /// The limiter: communications hold a slot of resource `communications`, and the API
    /// guard limits each account's in-flight requests.
    #[command(flatten)]
    pub guard: GuardArgs,

    /// Flags every Switchboard server takes.
    #[command(flatten)]
    pub common: CommonArgs,
}

/// The router handlers.
#[derive(Debug, Clone, Default)]
pub struct RouterApi;

impl RouterService for RouterApi {}

/// Serves router-svc on `listener` until `stop` resolves.
pub async fn run(
    args: ServeArgs,
    listener: TcpListener,
    stop: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let address = listener.local_addr()?;
    let guard = GuardLayer::from_args(&args.guard, &args.common)?;
    let replica = Replica::start(&args.common, address).await?.with_guard(guard);
    let routes = Routes::new(RouterServiceServer::new(RouterApi));
    replica
        .serve(
            listener,
            routes,
            &[<RouterServiceServer<RouterApi> as NamedService>::NAME],
            stop,
        )
        .await
}

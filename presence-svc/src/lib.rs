//! presence-svc: who is reachable.
//!
//! A client application proves itself with a token and registers its presence (by TTL or as
//! a live `Connect` stream); the router and others read and watch it. This crate also serves
//! `KeyService`, the account signing keys every service verifies tokens with.
#![forbid(unsafe_code)]

pub mod error;
pub mod keys;
pub mod token;

use std::future::Future;
use std::net::SocketAddr;

use clap::Args;
use plumbing::config::CommonArgs;
use plumbing::server::{Replica, ServeError};
use proto::presence::v1::key_service_server::KeyServiceServer;
use proto::presence::v1::presence_service_server::{PresenceService, PresenceServiceServer};
use tokio::net::TcpListener;
use tonic::server::NamedService;
use tonic::service::Routes;

/// Flags of the presence server.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to serve gRPC on.
    #[arg(long, env = "SWITCHBOARD_LISTEN", default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,

    /// Flags every Switchboard server takes.
    #[command(flatten)]
    pub common: CommonArgs,
}

/// The presence handlers (registration, sessions and reads arrive with the presence issue).
#[derive(Debug, Clone, Default)]
pub struct PresenceApi;

impl PresenceService for PresenceApi {}

/// Serves presence-svc on `listener` until `stop` resolves.
pub async fn run(
    args: ServeArgs,
    listener: TcpListener,
    stop: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let address = listener.local_addr()?;
    let replica = Replica::start(&args.common, address).await?;
    let routes = Routes::new(PresenceServiceServer::new(PresenceApi)).add_service(
        KeyServiceServer::new(keys::KeyApi::new(replica.keys.clone())),
    );
    let names = [
        <PresenceServiceServer<PresenceApi> as NamedService>::NAME,
        <KeyServiceServer<keys::KeyApi> as NamedService>::NAME,
    ];
    replica.serve(listener, routes, &names, stop).await
}

//! Server bootstrap shared by every binary: connect to etcd, hold the replica lease, mirror
//! the account keys, serve the service with health, reflection, tracing and auth, and shut
//! down cleanly.
//!
//! Shutdown order on SIGTERM/SIGINT (or the test's stop future): health reports NOT_SERVING,
//! [`Replica::shutdown`] fires (services end their streams), the listener closes, in-flight
//! requests get up to `--drain-timeout`, then the replica lease is revoked so everything this
//! replica owned in etcd disappears at once instead of after its TTL.

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use futures::future::Either;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;
use tonic_health::ServingStatus;

use crate::auth::{AuthLayer, KeyStore, Verifier};
use crate::config::CommonArgs;
use crate::etcd::{ConnectError, EtcdError, EtcdOptions, EtcdSession, Lease};
use crate::guard::GuardLayer;
use crate::limits::{ConnectionLimits, LongCall, RequestLimitsLayer};
use crate::metrics::Metrics;
use crate::telemetry::TraceLayer;
use crate::tls::{ClientTls, ServerTls};

/// Why a server could not start or stopped abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// etcd was unreachable at start.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// The etcd flags are wrong, or etcd refused the connection or login.
    #[error(transparent)]
    EtcdConnect(#[from] ConnectError),
    /// Binding or serving failed.
    #[error("transport: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The reflection descriptor set did not load.
    #[error("reflection: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
    /// The listener failed.
    #[error("listener: {0}")]
    Io(#[from] std::io::Error),
    /// A TLS flag or file is unusable (the message names the flag and the file).
    #[error("TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// The limiter address is unusable.
    #[error(transparent)]
    Limiter(#[from] crate::limiter::LimiterClientError),
}

/// What one running replica shares with its service: etcd, its lease, the key mirror and
/// the shutdown signal.
#[derive(Debug)]
pub struct Replica {
    /// The etcd session.
    pub session: EtcdSession,
    /// This replica's lease: records that must vanish with the replica are attached to it.
    pub lease: Lease,
    /// Account keys, mirrored from etcd.
    pub keys: KeyStore,
    /// Fires when the server starts shutting down; long-lived streams end on it.
    pub shutdown: CancellationToken,
    /// The address this replica serves on (for peers to reach it).
    pub address: SocketAddr,
    /// A unique id for this replica's lifetime (used in etcd keys it owns).
    pub replica_id: String,
    /// The process's metrics; services register their own here.
    pub metrics: Metrics,
    metrics_listen: Option<SocketAddr>,
    verifier: Verifier,
    drain_timeout: Duration,
    guard: Option<GuardLayer>,
    limits: ConnectionLimits,
    long_calls: Vec<(&'static str, LongCall)>,
    tls: Option<ServerTls>,
    client_tls: ClientTls,
}

impl Replica {
    /// Connects to etcd, grants the replica lease and loads the key mirror.
    pub async fn start(common: &CommonArgs, address: SocketAddr) -> Result<Self, ServeError> {
        // TLS files first: a bad one should stop the start before anything touches etcd.
        let tls = ServerTls::from_args(&common.tls)?;
        let client_tls = ClientTls::from_server_args(&common.tls)?;
        let etcd = EtcdOptions::from_args(&common.etcd).map_err(ConnectError::from)?;
        let session = EtcdSession::connect(&etcd).await?;
        let lease = Lease::grant(&session, common.replica_ttl).await?;
        let keys = KeyStore::start(&session);
        if !keys.ready(crate::etcd::CALL_DEADLINE).await {
            return Err(EtcdError::Unavailable("could not load account keys".into()).into());
        }
        let platform = common
            .platform_secret
            .as_ref()
            .filter(|s| !s.is_empty())
            .map(|secret| (common.platform_key_id.clone(), secret.as_bytes().to_vec()));
        if platform.is_none() {
            tracing::warn!(
                "no platform secret configured: only account keys from etcd are accepted"
            );
        }
        let accepted = common
            .platform_accept_key_id
            .clone()
            .zip(common.platform_accept_secret.as_ref())
            .filter(|(id, secret)| !secret.is_empty() && *id != common.platform_key_id)
            .map(|(id, secret)| (id, secret.as_bytes().to_vec()));
        if accepted.is_some() {
            tracing::info!("a second platform key is accepted (platform key rotation)");
        }
        let verifier = Verifier::new(platform, Some(keys.clone())).accepting(accepted);
        let metrics = Metrics::new();
        session.round_trips().register(&metrics);
        Ok(Self {
            session,
            lease,
            keys,
            shutdown: CancellationToken::new(),
            address,
            replica_id: format!("{:016x}", rand::random::<u64>()),
            metrics,
            metrics_listen: common.metrics_listen,
            verifier,
            drain_timeout: common.drain_timeout,
            guard: None,
            limits: common.limits.clone(),
            long_calls: Vec::new(),
            tls,
            client_tls,
        })
    }

    /// Puts the API guard in front of every service of this replica (after authentication).
    pub fn with_guard(mut self, guard: Option<GuardLayer>) -> Self {
        if guard.is_some() {
            tracing::info!("API guard enabled");
        }
        self.guard = guard;
        self
    }

    /// Registers unary calls that wait by contract, by path (`/package.Service/Method`): they
    /// are bounded as `calls` say instead of by `--request-timeout` alone.
    pub fn with_long_calls(mut self, calls: &[(&'static str, LongCall)]) -> Self {
        self.long_calls.extend_from_slice(calls);
        self
    }

    /// Serves `routes` (whose services are named `service_names` for health) plus health and
    /// reflection on `listener` until `stop` resolves, then drains and revokes the lease.
    pub async fn serve(
        self,
        listener: TcpListener,
        routes: Routes,
        service_names: &[&'static str],
        stop: impl Future<Output = ()> + Send,
    ) -> Result<(), ServeError> {
        let (health, health_service) = tonic_health::server::health_reporter();
        for name in service_names.iter().copied().chain([""]) {
            health
                .set_service_status(name, ServingStatus::Serving)
                .await;
        }
        let max_message = self.limits.max_message_bytes();
        let reflection = reflection_builder(service_names)
            .build_v1()?
            .max_decoding_message_size(max_message);
        let reflection_alpha = reflection_builder(service_names)
            .build_v1alpha()?
            .max_decoding_message_size(max_message);
        let routes = routes
            .add_service(health_service.max_decoding_message_size(max_message))
            .add_service(reflection)
            .add_service(reflection_alpha);

        if let Some(address) = self.metrics_listen {
            crate::metrics::start(address, self.metrics.clone(), self.shutdown.clone()).await?;
        }
        let shutdown = self.shutdown.clone();
        let lost = self.lease.lost();
        let signal = {
            let health = health.clone();
            let shutdown = shutdown.clone();
            async move {
                tokio::select! {
                    _ = stop => tracing::info!("shutdown requested"),
                    _ = shutdown.cancelled() => tracing::info!("shutdown requested by the service"),
                }
                for name in service_names.iter().copied().chain([""]) {
                    health
                        .set_service_status(name, ServingStatus::NotServing)
                        .await;
                }
                shutdown.cancel();
            }
        };
        tracing::info!(address = %self.address, replica = %self.replica_id, lease = self.lease.id(), tls = self.tls.is_some(), "serving");
        let router = tonic::transport::Server::builder()
            .max_concurrent_streams(self.limits.max_concurrent_streams)
            .http2_max_local_error_reset_streams(Some(crate::limits::MAX_LOCAL_ERROR_RESETS))
            .layer(TraceLayer)
            .layer(self.metrics.layer())
            .layer(AuthLayer::new(self.verifier.clone()))
            .layer(RequestLimitsLayer::new(&self.limits, &self.long_calls))
            .layer(tower::util::option_layer(self.guard.clone()))
            .add_routes(routes);
        // With TLS, every connection is handshaken with the current (reloadable) config.
        let server = match &self.tls {
            None => Either::Left(router.serve_with_incoming_shutdown(
                tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
                signal,
            )),
            Some(tls) => {
                Either::Right(router.serve_with_incoming_shutdown(tls.incoming(listener), signal))
            }
        };
        tokio::pin!(server);
        let result = tokio::select! {
            result = &mut server => result,
            _ = drain_deadline(&shutdown, self.drain_timeout) => {
                tracing::warn!(timeout = ?self.drain_timeout, "drain timed out; closing remaining connections");
                Ok(())
            }
        };
        if lost.is_cancelled() {
            tracing::warn!("replica lease was lost while serving");
        }
        if let Err(err) = self.lease.revoke().await {
            tracing::warn!(error = %err, "could not revoke the replica lease; it will expire by itself");
        }
        tracing::info!("stopped");
        result.map_err(ServeError::from)
    }

    /// What this replica's calls to other Switchboard services use (`--tls-ca`, with
    /// `--tls-cert`/`--tls-key` as client certificate): plain text without `--tls-ca`.
    pub fn client_tls(&self) -> &ClientTls {
        &self.client_tls
    }

    /// A verifier for this replica's keys (also for tests and peers).
    pub fn verifier(&self) -> Verifier {
        self.verifier.clone()
    }
}

/// Reflection over every Switchboard proto, listing only the services this server serves.
fn reflection_builder(
    service_names: &[&'static str],
) -> tonic_reflection::server::Builder<'static> {
    let mut builder = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .with_service_name("grpc.health.v1.Health")
        .with_service_name("grpc.reflection.v1.ServerReflection");
    for name in service_names {
        builder = builder.with_service_name(*name);
    }
    builder
}

async fn drain_deadline(shutdown: &CancellationToken, timeout: Duration) {
    shutdown.cancelled().await;
    tokio::time::sleep(timeout).await;
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = terminate => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// Runs a binary's async `main`: builds the runtime, installs telemetry, runs `body`, and
/// turns an error into a logged message and exit code 1.
pub fn run_binary<F, Fut, E>(
    service: &'static str,
    common: &CommonArgs,
    body: F,
) -> std::process::ExitCode
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("{service}: cannot start the async runtime: {err}");
            return std::process::ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let _telemetry = crate::telemetry::init(service, common.log_format);
        match body().await {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(err) => {
                tracing::error!(error = %err, "{service} failed");
                std::process::ExitCode::FAILURE
            }
        }
    })
}

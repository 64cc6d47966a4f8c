//! router-svc: routes incoming communications by the customer's instructions and the
//! client's presence (docs/CONTRACT.md §1, presence and routing).
//!
//! `Route(from, to, account)` finds the account's application for `to`, takes a limiter
//! slot (resource `communications`), gets the instructions (inline, or a signed webhook
//! with a fallback), and runs them: `<Dial><Client>alice</Client></Dial>` reads alice's
//! presence from presence-svc and offers the communication to every available live device
//! at once through presence's internal `SessionRelayService`; the first accept wins, the
//! others are cancelled (`answered_elsewhere`). Route returns once the communication is
//! connected or routing has ended; the communication lives on until a hangup.
//!
//! # State in etcd
//!
//! | key | value | lease |
//! |---|---|---|
//! | `router/apps/<account>/<address>` | application, JSON (with its signing secret) | none |
//! | `router/comms/<account>/<communication_id>` | `StoredRecord` (protobuf): the `Communication`, its owner's address and its limiter slot | none while running; a shared retention lease once ended |
//! | `router/owned/<lease>/<account>/<communication_id>` | the record's key: an *index entry*, naming the owner's replica lease (hex) | none; deleted with the final record |
//!
//! A running communication belongs to the replica that accepted it (its *owner*): the
//! runner task, the relay streams to the devices and the limiter slot are there. If the
//! owner dies, its lease expires within `--replica-ttl` and the devices' offers are
//! cancelled by presence when the relay streams break; then any other replica's sweep
//! ([`lost`]) finds the index entries under the dead lease and settles them: FAILED, the
//! ENDED event's `reason` `router_lost`, the slot (held for [`slot_hold`], renewed every
//! third of it) released, the status callback sent. Every owner write is guarded by its
//! index entry and every settlement by the record's revision, so exactly one of the two
//! ends a communication ([`store`]). A replica whose lease is lost keeps serving: its
//! communications move under the new lease. Once ended, the final record is under a
//! retention lease (rotated every tenth of `--communication-retention`) and stays readable
//! that long.
//!
//! Other replicas read records from etcd (Get, List) and forward Hangup, Watch and a
//! retried Route to the owner (`x-switchboard-forwarded` marks a forwarded call, which is
//! never forwarded again). Route is idempotent per `communication_id`: creation is a
//! put-if-absent, so two replicas never both run one id.
//!
//! # Writes
//!
//! etcd writes are the scarce resource (docs/CONTRACT.md §3): records are written by one
//! group-committing writer per replica ([`store`]): creations (nested put-if-absent txns)
//! and coalesced "latest state" puts of every communication that changed share one txn of
//! up to 128 operations. A communication typically costs its creation, one or two
//! coalesced updates and its final write, each shared with the others in flight;
//! applications are read from a watch-fed copy.
//!
//! # The state machine
//!
//! A communication's life is one owned type, [`communication::Machine`], advanced by
//! events (an answer from the limiter, a webhook or presence; a leg's news; the clock; a
//! hangup) and returning the effects to perform. The async shell ([`runner`]) performs
//! them through the ports ([`ports`], [`webhook`], [`store`], [`callbacks`]) and
//! feeds the answers back. A hangup request (a Hangup call, or the replica stopping) is an
//! event like any other, so a hangup ends the communication at once whatever it is doing.
#![forbid(unsafe_code)]

pub mod apps;
pub mod callbacks;
pub mod communication;
pub mod context;
pub mod engine;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod grpc;
pub mod live;
pub mod lost;
pub mod model;
pub mod peers;
pub mod ports;
pub mod retention;
pub mod rules;
pub mod runner;
pub mod stats;
pub mod store;
pub mod url;
pub mod webhook;
pub mod xml;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Args;
use plumbing::config::CommonArgs;
use plumbing::guard::{GuardArgs, GuardLayer};
use plumbing::limits::LongCall;
use plumbing::metrics::TxnStats;
use plumbing::server::{Replica, ServeError};
use proto::router::v1::router_service_server::RouterServiceServer;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tonic::server::NamedService;
use tonic::service::Routes;

use crate::apps::ApplicationStore;
use crate::engine::Engine;
use crate::grpc::api::RouterApi;
use crate::live::LiveTable;
use crate::peers::Peers;
use crate::store::CommStore;
use crate::webhook::WebhookClient;
use crate::webhook::tls::WebhookTls;

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

/// The router's own flags.
#[derive(Debug, Clone, Args)]
pub struct RouterArgs {
    /// `host:port` other router replicas use to reach this one (written into the records
    /// of the communications it runs). Default: the listen address.
    #[arg(long, env = "SWITCHBOARD_ADVERTISE_ADDRESS")]
    pub advertise_address: Option<String>,

    /// How long ended communications stay readable (GetCommunication, ListCommunications).
    #[arg(long, env = "SWITCHBOARD_COMMUNICATION_RETENTION", value_parser = plumbing::config::parse_duration, default_value = "5m")]
    pub communication_retention: Duration,

    /// Most applications one account may have; PutApplication creating one more is refused
    /// (RESOURCE_EXHAUSTED). Exact across replicas.
    #[arg(long, env = "SWITCHBOARD_MAX_APPLICATIONS_PER_ACCOUNT", default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_applications_per_account: u32,

    /// Most WatchCommunication streams one account may have open on this replica; beyond
    /// it WatchCommunication is refused (RESOURCE_EXHAUSTED).
    #[arg(long, env = "SWITCHBOARD_MAX_WATCHES_PER_ACCOUNT", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_watches_per_account: u32,

    /// CA bundle (PEM) trusted for https webhooks in addition to the system's roots, for
    /// customers whose instruction servers use a private CA. Read at start-up.
    #[arg(long, env = "SWITCHBOARD_WEBHOOK_CA")]
    pub webhook_ca: Option<PathBuf>,
}

impl Default for RouterArgs {
    fn default() -> Self {
        Self {
            advertise_address: None,
            communication_retention: Duration::from_secs(300),
            max_applications_per_account: 10_000,
            max_watches_per_account: 1000,
            webhook_ca: None,
        }
    }
}

/// The path of Route, a unary call that lasts until the communication is connected or over.
const ROUTE_PATH: &str = "/switchboard.router.v1.RouterService/Route";

/// Hold of a communication's limiter slot for a replica lease of `replica_ttl` seconds:
/// at least twice the TTL and 10 s; renewed every third of it.
pub fn slot_hold(replica_ttl: i64) -> Duration {
    Duration::from_secs((replica_ttl.max(1) as u64 * 2).max(10))
}

/// Serves router-svc with default router flags on `listener` until `stop` resolves.
pub async fn run(
    args: ServeArgs,
    listener: TcpListener,
    stop: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    run_with(args, RouterArgs::default(), listener, stop).await
}

/// Serves router-svc on `listener` until `stop` resolves. A lost replica lease does not stop
/// it: the communications it runs move under the new lease ([`lost`]).
pub async fn run_with(
    args: ServeArgs,
    router: RouterArgs,
    listener: TcpListener,
    stop: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let address = listener.local_addr()?;
    // Before etcd: a bad --webhook-ca stops the start at once, naming the flag.
    let webhook_tls = WebhookTls::load(router.webhook_ca.as_deref())?;
    let replica = Replica::start(&args.common, address).await?;
    let peers = Peers::new(
        &args.common,
        args.presence.clone(),
        args.guard.limiter.clone(),
        replica.client_tls().clone(),
    )?;
    // The API guard shares the router's limiter client (one shard map, one channel per
    // owner); without one, `from_args` says why the API is unguarded.
    let guard = match peers.limiter() {
        Some(Ok(limiter)) => Some(GuardLayer::with_limiter(
            limiter.clone(),
            args.guard.fail_mode(),
        )),
        _ => GuardLayer::from_args(&args.guard, &args.common, replica.client_tls())?,
    };
    // Route returns when the communication is connected or over: its Dial timeouts and
    // webhook deadlines bound it, not --request-timeout.
    let replica = replica
        .with_guard(guard)
        .with_long_calls(&[(ROUTE_PATH, LongCall::Unbounded)]);
    let advertise = router
        .advertise_address
        .clone()
        .unwrap_or_else(|| address.to_string());
    let engine = Arc::new(Engine {
        apps: ApplicationStore::start(
            &replica.session,
            args.allow_private_webhooks,
            router.max_applications_per_account as usize,
        ),
        store: CommStore::start(
            &replica.session,
            replica.lease.changes(),
            advertise,
            router.communication_retention,
            TxnStats::register(&replica.metrics, "router", "Communication record writes"),
        ),
        live: Arc::new(LiveTable::default()),
        peers,
        webhooks: WebhookClient::new(
            args.allow_private_webhooks,
            webhook_tls,
            stats::WebhookStats::register(&replica.metrics),
        ),
        slot_hold: slot_hold(args.common.replica_ttl),
        fail_closed: args.guard.guard_fail_closed,
        shutdown: CancellationToken::new(),
        stats: stats::RouterStats::register(&replica.metrics),
        watches: plumbing::quota::AccountQuota::new(
            router.max_watches_per_account as usize,
            "watches open",
            "--max-watches-per-account",
        ),
    });
    let drain = args.common.drain_timeout;
    let sweeper = lost::start(
        engine.clone(),
        replica.lease.changes(),
        lost::sweep_period(args.common.replica_ttl),
    );
    let on_shutdown = {
        let (shutdown, engine) = (replica.shutdown.clone(), engine.clone());
        tokio::spawn(async move {
            shutdown.cancelled().await;
            engine.stop_all(drain).await;
        })
    };
    let stop = {
        let engine = engine.clone();
        async move {
            stop.await;
            engine.stop_all(drain).await;
        }
    };
    let routes = Routes::new(
        RouterServiceServer::new(RouterApi::new(engine))
            .max_decoding_message_size(args.common.limits.max_message_bytes()),
    );
    let served = replica
        .serve(
            listener,
            routes,
            &[<RouterServiceServer<RouterApi> as NamedService>::NAME],
            stop,
        )
        .await;
    on_shutdown.abort();
    sweeper.abort();
    served
}

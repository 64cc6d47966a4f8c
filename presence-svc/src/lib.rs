//! presence-svc: who is reachable.
//!
//! A client application proves itself with a token and registers its presence — by TTL
//! (`Register` + `Heartbeat`) or as a live `Connect` stream; the router and others read and
//! watch it, and the router offers incoming communications to live sessions through the
//! internal `SessionRelayService`. This crate also serves `KeyService`, the account signing
//! keys every service verifies tokens with.
//!
//! # State in etcd
//!
//! ```text
//! <prefix>/presence/<account>/<identity>/<device_id>          device record (JSON)
//! <prefix>/presence/<account>/~left/<identity>/<device_id>    leave note (JSON), 40–60 s
//! ```
//! A device record holds status, attributes, contact, kind (registration or stream), the
//! holding replica's address and session id (streams), the lease it is attached to, the TTL
//! and the register/expire times; its etcd mod revision is the device's revision. Account
//! ids, identities and device ids cannot contain `/` or `~`, so keys parse back
//! unambiguously and one prefix per account isolates tenants (a watch is always on
//! `<prefix>/presence/<account>/`).
//!
//! # Leases: what makes a device disappear
//!
//! - **Registration**: one lease per registered device, TTL = `ttl_seconds` (default 60,
//!   5 to 3600). Sharing a lease between devices would let one device's heartbeat keep
//!   another alive, so this is the one per-request lease; it costs one grant per Register.
//!   `Heartbeat` is a keep-alive of that lease — leader memory, not a raft write — and
//!   since the lease id is in the record, any replica serves it. A device that stops
//!   heartbeating disappears when etcd expires the lease, with nobody calling anything.
//! - **Stream**: the record is attached to the replica lease (`--replica-ttl`, default
//!   10 s) and deleted (one txn) the moment the stream ends. If the replica dies, its
//!   sessions vanish when its lease expires: within `--replica-ttl` seconds. On SIGTERM the
//!   streams end with UNAVAILABLE (clients reconnect elsewhere) and the lease revoke
//!   removes all their records in one write. A replica that loses its lease (etcd
//!   unreachable for a whole TTL, or the lease revoked behind its back) has lost all its
//!   sessions' records with it: the lease keeper grants a new lease and every live session
//!   writes its record again under it (watchers see the device leave and come back; the
//!   client gets a fresh `registered`). A session whose record vanished while its lease
//!   is alive was removed by someone, and ends.
//! - **Leave notes** ride in the same txn as a deletion, under a shared lease rotated every
//!   20 s (TTL 60 s), so watchers learn `unregistered` / `disconnected` / `evicted`; a
//!   deletion without a note is an expiry.
//!
//! The write cost of each operation is tabled in [`devices`]. All record writes of a
//! replica go through one group-commit writer ([`commit::GroupCommit`]) that packs
//! concurrent writes into one etcd txn of nested txns: a storm of 300 hellos costs about a
//! dozen raft entries, and 50,000 clients reconnecting take seconds, not minutes.
//!
//! # Devices per identity
//!
//! At most `--max-devices-per-identity` devices (default 10). Beyond it
//! `--device-overflow reject-newest` (default) refuses the new device with
//! RESOURCE_EXHAUSTED; `evict-oldest` deletes the oldest device(s) in the same txn (their
//! streams end with ABORTED). The check is exact across replicas: the write is guarded by
//! an etcd compare on the identity's whole key range.
//!
//! # Reads and watches
//!
//! GetPresence, BatchGetPresence and ListPresence are answered from [`cache::PresenceCache`],
//! one watch-fed copy of all presence records; `min_revision` waits (up to 5 s) for the
//! cache to reach a revision a write returned. The aggregate status of an identity is its
//! best device's: AVAILABLE > BUSY > AWAY > DO_NOT_DISTURB, OFFLINE with no device.
//! WatchPresence is an etcd watch on the account prefix from `start_revision`, "now" (the
//! revision when the call is answered) or a snapshot's revision; a compacted start ends the
//! stream with a `compacted` event and OUT_OF_RANGE.
//!
//! # Offer delivery (`switchboard.presence.v1.SessionRelayService`, for the router)
//!
//! Internal; platform tokens with `router.route` (or `admin`) only. `Offer` is a bidi
//! stream carrying one leg — one offer to one device:
//!
//! 1. caller → `start{account_id, identity, device_id, offer_id, communication_id, from,
//!    to, channel, parameters, expire_time}`. Call any presence replica; one that does not
//!    hold the session forwards once to the holder (`Device.replica`). Immediate errors:
//!    NOT_FOUND (device not present / session just ended — ring nobody, fail fast),
//!    FAILED_PRECONDITION (present by TTL registration only: no session to ring),
//!    ALREADY_EXISTS (offer_id already open on that session), UNAVAILABLE (holder
//!    unreachable or stopping), INVALID_ARGUMENT, PERMISSION_DENIED.
//! 2. server → `delivered{device}` once the device's stream has the offer, and `ringing`
//!    (at most once) if the device sends `ringing{offer_id}` on its Connect stream.
//! 3. server → `answered{accept, reject_reason, scope}`; a reject ends the stream (its
//!    `scope` says whether the device declined for itself or for every device).
//! 4. caller → `cancel{reason}` (device gets `cancel`) or, after an accept,
//!    `end{reason}` (device gets `ended`); the server passes it on and ends the stream.
//! 5. server → `hangup` when the device hangs up an accepted communication (the device is
//!    sent `ended{DEVICE_HANGUP}`), then ends the stream.
//! 6. server → `gone{reason}` if the device's session ends first, then ends the stream.
//!
//! A caller that disconnects or half-closes without `cancel`/`end` cancels the offer with
//! CANCEL_REASON_FAILED (or ends an accepted one with END_REASON_FAILED). The presence side
//! keeps no offer timer: the caller cancels with CANCEL_REASON_TIMEOUT.
//!
//! # Bounds
//!
//! Identities 1–256 and device ids 1–128 characters of `A-Z a-z 0-9 . _ - : @ +`;
//! attributes ≤ 32 entries, keys ≤ 64, values ≤ 256 characters, ≤ 4 KiB in all; contact
//! ≤ 1024 characters; batch and watch lists ≤ 1000 identities; ListPresence pages ≤ 1000
//! identities and about 2 MiB; offer parameters ≤ 64 entries, names 1–64 and values ≤ 1024
//! characters; requests ≤ `--max-message-bytes` (default 512 KiB, where a BatchGetPresence
//! of 1000 longest identities fits; larger ones are refused before they are buffered).
//!
//! # Abuse limits
//!
//! Beside the per-identity device limit: at most `--max-devices-per-account` devices per
//! account (see [`devices`]) and `--max-watches-per-account` WatchPresence streams per
//! account on each replica; both refuse with RESOURCE_EXHAUSTED naming the cap. The
//! per-connection limits and the request deadline are [`plumbing::limits`].
#![forbid(unsafe_code)]

pub mod api;
pub mod cache;
pub mod commit;
pub mod devices;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod identity;
pub mod keys;
pub mod notes;
pub mod record;
pub mod relay;
pub mod rules;
pub mod session;
pub mod table;
pub mod token;
pub mod watch;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use clap::Args;
use plumbing::auth::Scope;
use plumbing::client::CallCredentials;
use plumbing::config::CommonArgs;
use plumbing::guard::{GuardArgs, GuardLayer};
use plumbing::server::{Replica, ServeError};
use proto::presence::v1::key_service_server::KeyServiceServer;
use proto::presence::v1::presence_service_server::PresenceServiceServer;
use proto::presence::v1::session_relay_service_server::SessionRelayServiceServer;
use tokio::net::TcpListener;
use tonic::server::NamedService;
use tonic::service::Routes;

use crate::api::{PresenceApi, RelayApi};
use crate::devices::{DeviceLimit, DeviceStore, OverflowPolicy};
use crate::record::Layout;
use crate::table::SessionTable;

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

/// Presence's own flags.
#[derive(Debug, Clone, Args)]
pub struct PresenceArgs {
    /// Most devices (registrations and live sessions) one identity may have present.
    #[arg(long, env = "SWITCHBOARD_MAX_DEVICES_PER_IDENTITY", default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub max_devices_per_identity: u16,

    /// What a new device beyond the limit does: `reject-newest` (RESOURCE_EXHAUSTED) or
    /// `evict-oldest` (the identity's oldest device leaves).
    #[arg(long, env = "SWITCHBOARD_DEVICE_OVERFLOW", value_enum, default_value_t = OverflowPolicy::RejectNewest)]
    pub device_overflow: OverflowPolicy,

    /// Most devices (registrations and live sessions) one account may have present, all
    /// identities together; beyond it new devices are refused (RESOURCE_EXHAUSTED).
    #[arg(long, env = "SWITCHBOARD_MAX_DEVICES_PER_ACCOUNT", default_value_t = 100_000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_devices_per_account: u32,

    /// Most WatchPresence streams one account may have open on this replica (each holds an
    /// etcd watch); beyond it WatchPresence is refused (RESOURCE_EXHAUSTED).
    #[arg(long, env = "SWITCHBOARD_MAX_WATCHES_PER_ACCOUNT", default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_watches_per_account: u32,

    /// `host:port` other replicas and the router use to reach this replica's sessions
    /// (written into stream records). Default: the listen address.
    #[arg(long, env = "SWITCHBOARD_ADVERTISE_ADDRESS")]
    pub advertise_address: Option<String>,

    /// The API guard: each account's in-flight requests per RPC, limited through limiter-svc.
    #[command(flatten)]
    pub guard: GuardArgs,
}

impl Default for PresenceArgs {
    fn default() -> Self {
        Self {
            max_devices_per_identity: 10,
            device_overflow: OverflowPolicy::RejectNewest,
            max_devices_per_account: 100_000,
            max_watches_per_account: 1000,
            advertise_address: None,
            guard: GuardArgs {
                limiter: None,
                guard_fail_closed: false,
            },
        }
    }
}

/// Serves presence-svc with default presence flags on `listener` until `stop` resolves.
pub async fn run(
    args: ServeArgs,
    listener: TcpListener,
    stop: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    run_with(args, PresenceArgs::default(), listener, stop).await
}

/// Serves presence-svc on `listener` until `stop` resolves.
pub async fn run_with(
    args: ServeArgs,
    presence: PresenceArgs,
    listener: TcpListener,
    stop: impl Future<Output = ()> + Send,
) -> Result<(), ServeError> {
    let listen = listener.local_addr()?;
    let replica = Replica::start(&args.common, listen).await?;
    let guard = GuardLayer::from_args(&presence.guard, &args.common, replica.client_tls())?;
    let replica = replica.with_guard(guard);
    let address = presence
        .advertise_address
        .clone()
        .unwrap_or_else(|| listen.to_string());
    let (api, relay) = assemble(&replica, &args.common, &presence, address);
    // A lost replica lease does not stop the replica: the lease keeper grants another and
    // every live session writes its record again under it (`session::SessionTask`).
    let mut leases = replica.lease.changes();
    let watcher = tokio::spawn(async move {
        while leases.changed().await.is_ok() {
            let lease = *leases.borrow();
            tracing::warn!(
                lease,
                "the replica lease was lost (expired or revoked); live sessions are written again under its replacement"
            );
        }
    });
    let max_message = args.common.limits.max_message_bytes();
    let routes =
        Routes::new(PresenceServiceServer::new(api).max_decoding_message_size(max_message))
            .add_service(
                SessionRelayServiceServer::new(relay).max_decoding_message_size(max_message),
            )
            .add_service(
                KeyServiceServer::new(keys::KeyApi::new(replica.keys.clone()))
                    .max_decoding_message_size(max_message),
            );
    let names = [
        <PresenceServiceServer<PresenceApi> as NamedService>::NAME,
        <SessionRelayServiceServer<RelayApi> as NamedService>::NAME,
        <KeyServiceServer<keys::KeyApi> as NamedService>::NAME,
    ];
    let served = replica.serve(listener, routes, &names, stop).await;
    watcher.abort();
    served
}

/// Builds the domain parts over `replica` and the two service handlers.
fn assemble(
    replica: &Replica,
    common: &CommonArgs,
    presence: &PresenceArgs,
    address: String,
) -> (PresenceApi, RelayApi) {
    let session = &replica.session;
    let layout = Layout::new(session.key("presence/"));
    let table = Arc::new(SessionTable::default());
    let cache = cache::PresenceCache::start(session, layout.clone(), table.clone());
    publish_gauges(replica, table.clone(), cache.clone());
    let limit = DeviceLimit {
        max: usize::from(presence.max_devices_per_identity),
        overflow: presence.device_overflow,
        max_per_account: presence.max_devices_per_account as usize,
    };
    let txn = plumbing::metrics::TxnStats::register(&replica.metrics, "presence", "Record writes");
    let store = DeviceStore::new(session.clone(), layout.clone(), cache.clone(), limit, txn);
    let sessions = session::Sessions::new(
        table.clone(),
        store.clone(),
        replica.lease.changes(),
        address.clone(),
        replica.shutdown.clone(),
    );
    let watch = watch::PresenceWatch::new(
        session.clone(),
        layout,
        replica.shutdown.clone(),
        presence.max_watches_per_account as usize,
        &replica.metrics,
    );
    let credentials = CallCredentials::from_common(common, &[Scope::RouterRoute]);
    let relay = relay::Relay::new(
        table,
        cache,
        address,
        credentials,
        replica.client_tls().clone(),
    );
    (
        PresenceApi::new(store, sessions, watch),
        RelayApi::new(relay),
    )
}

/// `switchboard_presence_sessions` (live streams on this replica) and
/// `switchboard_presence_devices` (devices present everywhere, from the cache), sampled
/// every second until the replica stops.
fn publish_gauges(replica: &Replica, table: Arc<SessionTable>, cache: cache::PresenceCache) {
    use prometheus_client::metrics::gauge::Gauge;
    let (sessions, devices) = (Gauge::<i64>::default(), Gauge::<i64>::default());
    replica.metrics.register(
        "presence_sessions",
        "Live Connect sessions on this replica",
        sessions.clone(),
    );
    replica.metrics.register(
        "presence_devices",
        "Devices present in all accounts (registrations and sessions)",
        devices.clone(),
    );
    let stop = replica.shutdown.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {
                    sessions.set(table.len() as i64);
                    devices.set(cache.device_count() as i64);
                }
            }
        }
    });
}

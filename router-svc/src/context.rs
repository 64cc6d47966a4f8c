//! What a router replica's parts share: the [`Engine`] — applications, records, the live
//! table, peers, the webhook client and the settings of admission. The domain operations
//! on it are in [`crate::engine`]; a communication's shell ([`crate::runner`]) and the
//! lost-communication sweep ([`crate::lost`]) use its ports.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::apps::ApplicationStore;
use crate::live::LiveTable;
use crate::peers::Peers;
use crate::store::CommStore;
use crate::webhook::WebhookClient;

/// Everything a communication's runner needs, shared by all of them.
#[derive(Debug)]
pub struct Engine {
    /// Applications.
    pub apps: ApplicationStore,
    /// Communication records.
    pub store: CommStore,
    /// Communications running here.
    pub live: Arc<LiveTable>,
    /// Limiter, presence and router peers.
    pub peers: Peers,
    /// Webhook HTTP client.
    pub webhooks: WebhookClient,
    /// Hold of communication slots (renewed every third of it).
    pub slot_hold: Duration,
    /// Refuse communications when the limiter is unreachable.
    pub fail_closed: bool,
    /// Fires when the replica starts stopping: no new communications.
    pub shutdown: CancellationToken,
    /// Offers and outcomes, for Prometheus.
    pub stats: crate::stats::RouterStats,
    /// WatchCommunication streams open per account on this replica
    /// (`--max-watches-per-account`).
    pub watches: plumbing::quota::AccountQuota,
}

//! The limiter's own Prometheus metrics (registered in the replica's registry).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;

use plumbing::metrics::{Metrics, TxnStats};

/// Per-resource label (accounts are left out to keep cardinality bounded).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResourceLabels {
    /// The limited resource.
    pub resource: String,
}

/// Every `reason` of [`FaultLabels`] (what `Error::fault` answers): each series exists from
/// the start, at 0, so a rate of failures is defined before the first one.
pub const FAULTS: [&str; 6] = [
    "unavailable",
    "not_owner",
    "no_owner",
    "etcd",
    "peer",
    "no_peer_credentials",
];

/// Why an Acquire failed instead of being decided (a fault, not a limit).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FaultLabels {
    /// `unavailable` (etcd failed under the engine, or the shard is reloading), `not_owner`,
    /// `no_owner`, `etcd`, `peer` or `no_peer_credentials` — see `Error::fault`.
    pub reason: &'static str,
}

/// Counters, gauges and histograms of the engine.
#[derive(Debug, Clone)]
pub struct EngineStats {
    /// Slots granted.
    pub grants: Family<ResourceLabels, Counter>,
    /// Acquires rejected (including queue timeouts).
    pub rejects: Family<ResourceLabels, Counter>,
    /// Slots held, in the shards owned here.
    pub in_flight: Family<ResourceLabels, Gauge>,
    /// Callers queued, in the shards owned here.
    pub queued: Family<ResourceLabels, Gauge>,
    /// Keys whose (enforced) limit is all held, in the shards owned here.
    pub keys_at_limit: Family<ResourceLabels, Gauge>,
    /// Acquires that failed for a fault (answered with an error, not a decision).
    pub failures: Family<FaultLabels, Counter>,
    /// Operations per slot txn and slot txn latency (including bucket lease grants).
    pub txn: TxnStats,
    /// Shards owned by this replica.
    pub shards_owned: Gauge,
    /// Slots granted from escrow blocks (no etcd write of their own).
    pub escrow_grants: Counter,
    /// Planned handoffs completed by this replica.
    pub handoffs: Counter,
}

impl EngineStats {
    /// Creates the metrics and registers them in `metrics`.
    pub fn register(metrics: &Metrics) -> Self {
        let stats = Self {
            grants: Family::default(),
            rejects: Family::default(),
            in_flight: Family::default(),
            queued: Family::default(),
            keys_at_limit: Family::default(),
            failures: Family::default(),
            txn: TxnStats::register(metrics, "limiter", "Slot operations"),
            shards_owned: Gauge::default(),
            escrow_grants: Counter::default(),
            handoffs: Counter::default(),
        };
        metrics.register(
            "limiter_escrow_grants",
            "Slots granted from escrow blocks, without an etcd write of their own",
            stats.escrow_grants.clone(),
        );
        metrics.register(
            "limiter_handoffs",
            "Shards this replica handed off in a planned handoff",
            stats.handoffs.clone(),
        );
        metrics.register(
            "limiter_grants",
            "Slots granted, by resource",
            stats.grants.clone(),
        );
        metrics.register(
            "limiter_rejects",
            "Acquires rejected (over the limit or queue timeout), by resource",
            stats.rejects.clone(),
        );
        metrics.register(
            "limiter_in_flight",
            "Slots held in the shards this replica owns, by resource",
            stats.in_flight.clone(),
        );
        metrics.register(
            "limiter_queued",
            "Callers waiting in the shards this replica owns, by resource",
            stats.queued.clone(),
        );
        metrics.register(
            "limiter_keys_at_limit",
            "Keys whose enforced limit is all held, in the shards this replica owns, by resource",
            stats.keys_at_limit.clone(),
        );
        metrics.register(
            "limiter_acquire_failures",
            "Acquires answered with an error instead of a decision (faults, not limits), by reason",
            stats.failures.clone(),
        );
        for reason in FAULTS {
            // Creating the series is the point; the guard returned is not needed.
            let _ = stats.failures.get_or_create(&FaultLabels { reason });
        }
        metrics.register(
            "limiter_shards_owned",
            "Shards this replica owns",
            stats.shards_owned.clone(),
        );
        stats
    }

    /// Counts a grant.
    pub fn granted(&self, resource: &str) {
        self.grants
            .get_or_create(&ResourceLabels {
                resource: resource.to_owned(),
            })
            .inc();
    }

    /// Counts an Acquire that failed for `reason`.
    pub fn failed(&self, reason: &'static str) {
        self.failures.get_or_create(&FaultLabels { reason }).inc();
    }

    /// Counts a rejection.
    pub fn rejected(&self, resource: &str) {
        self.rejects
            .get_or_create(&ResourceLabels {
                resource: resource.to_owned(),
            })
            .inc();
    }
}

//! The router's own Prometheus metrics (registered in the replica's registry).

use plumbing::metrics::Metrics;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use proto::router::v1::Outcome;

/// Label of the outcome counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    /// `OUTCOME_CONNECTED`, `OUTCOME_BUSY`, …
    pub outcome: String,
}

/// Offers made and communications ended, by outcome.
#[derive(Debug, Clone, Default)]
pub struct RouterStats {
    /// Communications ended, by outcome.
    pub outcomes: Family<OutcomeLabels, Counter>,
    /// Offers sent to devices.
    pub offers: Counter,
}

impl RouterStats {
    /// Creates the metrics and registers them in `metrics`.
    pub fn register(metrics: &Metrics) -> Self {
        let stats = Self::default();
        metrics.register(
            "router_communications_ended",
            "Communications ended, by outcome",
            stats.outcomes.clone(),
        );
        metrics.register(
            "router_offers",
            "Offers sent to devices (one per leg)",
            stats.offers.clone(),
        );
        stats
    }

    /// Counts a communication that ended with `outcome` (the wire value).
    pub fn ended(&self, outcome: i32) {
        let name = Outcome::try_from(outcome)
            .unwrap_or(Outcome::Unspecified)
            .as_str_name()
            .to_owned();
        self.outcomes
            .get_or_create(&OutcomeLabels { outcome: name })
            .inc();
    }
}

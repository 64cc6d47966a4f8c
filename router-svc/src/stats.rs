//! The router's own Prometheus metrics (registered in the replica's registry).

use plumbing::metrics::{Metrics, latency_histogram};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
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

/// Label of the webhook counter.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    /// `ok`, or why the request failed: `refused`, `resolve`, `connect`, `tls`, `timeout`,
    /// `http`, `status` (not 2xx), `too_large`.
    pub result: &'static str,
}

/// Requests to application webhooks (instructions and status callbacks): how they ended
/// and how long they took.
#[derive(Debug, Clone)]
pub struct WebhookStats {
    /// Requests, by result.
    pub requests: Family<ResultLabels, Counter>,
    /// Latency of every request, failed ones included.
    pub duration: Histogram,
}

impl WebhookStats {
    /// Creates the metrics and registers them in `metrics`.
    pub fn register(metrics: &Metrics) -> Self {
        let stats = Self {
            requests: Family::default(),
            duration: latency_histogram(),
        };
        metrics.register(
            "router_webhooks",
            "Requests to application webhooks (instructions and status callbacks), by result",
            stats.requests.clone(),
        );
        metrics.register(
            "router_webhook_duration_seconds",
            "Latency of requests to application webhooks, connect included, failures included",
            stats.duration.clone(),
        );
        stats
    }

    /// Counts one request that ended with `result` after `elapsed`.
    pub fn record(&self, result: &'static str, elapsed: std::time::Duration) {
        self.requests.get_or_create(&ResultLabels { result }).inc();
        self.duration.observe(elapsed.as_secs_f64());
    }
}

//! Every request to etcd, counted and timed where all of them pass: a layer on the channel
//! of each etcd client a session makes (the balanced one and each member's own), so reads,
//! txns, lease grants, the members' health probes and the opening of watch and keep-alive
//! streams are all seen, by etcd RPC. The counts exist from the first request; they are
//! served as `switchboard_etcd_requests_total{method, code}` and
//! `switchboard_etcd_request_duration_seconds{method}` once [`RoundTrips::register`] put
//! them in the process's registry.
//!
//! A request is timed until etcd's response headers: for a unary call that is its answer,
//! for a stream (Watch, LeaseKeepAlive) its opening. `code` is the gRPC status of an error
//! answer, `UNAVAILABLE` when the transport failed, and `CANCELLED` when the caller gave up
//! first (an attempt's deadline passed). Label values are static: a request costs two
//! family look-ups and a histogram observation, no allocation beyond the boxed future.

use std::task::{Context, Poll};
use std::time::Instant;

use etcd_client::{BalancedChannelBuilder, Channel};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::mpsc::Sender;
use tonic::transport::Endpoint;
use tonic::transport::channel::Change;
use tower::Service;
use tower::util::BoxCloneSyncService;

use crate::metrics::{Metrics, code_name, latency_histogram};

/// The etcd RPCs told apart (after `/etcdserverpb.`); any other is `other`.
const METHODS: [&str; 14] = [
    "KV/Range",
    "KV/Put",
    "KV/DeleteRange",
    "KV/Txn",
    "KV/Compact",
    "Lease/LeaseGrant",
    "Lease/LeaseRevoke",
    "Lease/LeaseKeepAlive",
    "Lease/LeaseTimeToLive",
    "Lease/LeaseLeases",
    "Watch/Watch",
    "Maintenance/Status",
    "Auth/Authenticate",
    "Cluster/MemberList",
];

/// Labels of `switchboard_etcd_requests_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    method: &'static str,
    code: &'static str,
}

/// Labels of `switchboard_etcd_request_duration_seconds`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MethodLabels {
    method: &'static str,
}

/// Counts and latencies of one session's etcd requests; also the channel builder its
/// clients are connected with.
#[derive(Debug, Clone)]
pub struct RoundTrips {
    requests: Family<CallLabels, Counter>,
    latency: Family<MethodLabels, Histogram, fn() -> Histogram>,
}

impl Default for RoundTrips {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            latency: Family::new_with_constructor(latency_histogram),
        }
    }
}

impl RoundTrips {
    /// Serves these counts from `metrics`.
    pub fn register(&self, metrics: &Metrics) {
        metrics.register(
            "etcd_requests",
            "Requests to etcd, by etcd RPC and gRPC code (CANCELLED: the caller's deadline passed first)",
            self.requests.clone(),
        );
        metrics.register(
            "etcd_request_duration_seconds",
            "Latency of requests to etcd until the answer (streams: until they open), by etcd RPC",
            self.latency.clone(),
        );
    }

    fn record(&self, method: &'static str, code: &'static str, started: Instant) {
        self.requests
            .get_or_create(&CallLabels { method, code })
            .inc();
        self.latency
            .get_or_create(&MethodLabels { method })
            .observe(started.elapsed().as_secs_f64());
    }
}

/// etcd-client's own balanced channel, behind [`Observed`].
impl BalancedChannelBuilder for RoundTrips {
    type Error = tonic::transport::Error;

    fn balanced_channel(
        self,
        buffer_size: usize,
    ) -> Result<(Channel, Sender<Change<http::Uri, Endpoint>>), Self::Error> {
        let (inner, endpoints) = tonic::transport::Channel::balance_channel(buffer_size);
        let observed = Observed { inner, trips: self };
        Ok((
            Channel::Custom(BoxCloneSyncService::new(observed)),
            endpoints,
        ))
    }
}

/// The channel layer recording each request.
#[derive(Clone)]
struct Observed {
    inner: tonic::transport::Channel,
    trips: RoundTrips,
}

impl Service<http::Request<tonic::body::Body>> for Observed {
    type Response = http::Response<tonic::body::Body>;
    type Error = tower::BoxError;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx).map_err(Into::into)
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let mut pending = Pending {
            trips: self.trips.clone(),
            method: method_of(request.uri().path()),
            started: Instant::now(),
            done: false,
        };
        let mut inner = crate::take_ready(&mut self.inner);
        Box::pin(async move {
            match inner.call(request).await {
                Ok(response) => {
                    // etcd answers errors trailers-only: the status is in the headers.
                    let code = response
                        .headers()
                        .get("grpc-status")
                        .map_or("OK", |code| code_name(code.as_bytes()));
                    pending.finish(code);
                    Ok(response)
                }
                Err(err) => {
                    pending.finish("UNAVAILABLE");
                    Err(err.into())
                }
            }
        })
    }
}

/// One request on its way; recorded as `CANCELLED` if dropped unanswered.
struct Pending {
    trips: RoundTrips,
    method: &'static str,
    started: Instant,
    done: bool,
}

impl Pending {
    fn finish(&mut self, code: &'static str) {
        if !self.done {
            self.done = true;
            self.trips.record(self.method, code, self.started);
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.finish("CANCELLED");
    }
}

/// The label of a request path such as `/etcdserverpb.KV/Range`.
fn method_of(path: &str) -> &'static str {
    let name = path.strip_prefix("/etcdserverpb.").unwrap_or_default();
    METHODS
        .iter()
        .find(|method| **method == name)
        .copied()
        .unwrap_or("other")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_labelled_by_known_etcd_rpc_or_other() {
        assert_eq!(method_of("/etcdserverpb.KV/Txn"), "KV/Txn");
        assert_eq!(
            method_of("/etcdserverpb.Lease/LeaseGrant"),
            "Lease/LeaseGrant"
        );
        assert_eq!(method_of("/etcdserverpb.KV/Nope"), "other");
        assert_eq!(method_of("/v3lockpb.Lock/Lock"), "other");
        assert_eq!(method_of(""), "other");
    }

    #[test]
    fn a_request_dropped_unanswered_counts_as_cancelled() {
        let trips = RoundTrips::default();
        drop(Pending {
            trips: trips.clone(),
            method: "KV/Range",
            started: Instant::now(),
            done: false,
        });
        let labels = CallLabels {
            method: "KV/Range",
            code: "CANCELLED",
        };
        assert_eq!(trips.requests.get_or_create(&labels).get(), 1);
    }
}

//! Prometheus metrics: a registry per process, the request metrics every server records
//! through [`MetricsLayer`] (requests by RPC and gRPC code, latency histograms), room for
//! each service's own metrics, and a small HTTP endpoint (`--metrics-listen`, off by
//! default) that serves the text exposition format at `/metrics`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body::{Body, Frame};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Metric, Registry};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tower::{Layer, Service};

/// Labels of `switchboard_requests_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// `/package.Service/Method`.
    pub method: String,
    /// gRPC status code name (`OK`, `UNAVAILABLE`, …).
    pub code: String,
}

/// Labels of `switchboard_request_duration_seconds`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabels {
    /// `/package.Service/Method`.
    pub method: String,
}

/// Latency buckets from 50 µs to ~26 s.
pub fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 20))
}

/// Batch sizes and latencies of one group-commit writer's etcd txns, registered as
/// `switchboard_{writer}_txn_batch_size` and `switchboard_{writer}_txn_duration_seconds`.
#[derive(Debug, Clone)]
pub struct TxnStats {
    batch_size: Histogram,
    duration: Histogram,
}

impl TxnStats {
    /// Creates the two histograms of `writer` (e.g. `presence`) and registers them;
    /// `unit` names what a batch counts (e.g. "record writes").
    pub fn register(metrics: &Metrics, writer: &str, unit: &str) -> Self {
        let stats = Self {
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 8)),
            duration: latency_histogram(),
        };
        metrics.register(
            &format!("{writer}_txn_batch_size"),
            &format!("{unit} per group-committed etcd txn"),
            stats.batch_size.clone(),
        );
        metrics.register(
            &format!("{writer}_txn_duration_seconds"),
            &format!("Latency of the etcd txns carrying {unit}"),
            stats.duration.clone(),
        );
        stats
    }

    /// Records that a txn carried `batch` writes.
    pub fn batch(&self, batch: usize) {
        self.batch_size.observe(batch as f64);
    }

    /// Records how long a txn took.
    pub fn latency(&self, elapsed: std::time::Duration) {
        self.duration.observe(elapsed.as_secs_f64());
    }
}

/// The process's metrics.
#[derive(Clone)]
pub struct Metrics {
    registry: Arc<Mutex<Registry>>,
    requests: Family<RequestLabels, Counter>,
    latency: Family<MethodLabels, Histogram, fn() -> Histogram>,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// An empty registry (names prefixed `switchboard_`) with the request metrics.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("switchboard");
        let requests = Family::<RequestLabels, Counter>::default();
        let latency = Family::<MethodLabels, Histogram, fn() -> Histogram>::new_with_constructor(
            latency_histogram,
        );
        registry.register(
            "requests",
            "gRPC requests handled, by method and status code",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "gRPC request latency until the response headers (streams: until they end)",
            latency.clone(),
        );
        Self {
            registry: Arc::new(Mutex::new(registry)),
            requests,
            latency,
        }
    }

    /// Registers a service's own metric (name without the `switchboard_` prefix).
    pub fn register(&self, name: &str, help: &str, metric: impl Metric) {
        if let Ok(mut registry) = self.registry.lock() {
            registry.register(name, help, metric);
        }
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if let Ok(registry) = self.registry.lock()
            && prometheus_client::encoding::text::encode(&mut text, &registry).is_err()
        {
            text.clear();
        }
        text
    }

    /// The layer recording request metrics.
    pub fn layer(&self) -> MetricsLayer {
        MetricsLayer {
            metrics: self.clone(),
        }
    }

    fn record(&self, method: &str, code: &str, started: Instant) {
        self.requests
            .get_or_create(&RequestLabels {
                method: method.to_owned(),
                code: code.to_owned(),
            })
            .inc();
        self.latency
            .get_or_create(&MethodLabels {
                method: method.to_owned(),
            })
            .observe(started.elapsed().as_secs_f64());
    }
}

/// Serves `/metrics` on `listener` until `stop` fires.
pub async fn serve(listener: TcpListener, metrics: Metrics, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => accepted,
        };
        let Ok((stream, _)) = accepted else { continue };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(
                move |request: hyper::Request<hyper::body::Incoming>| {
                    let metrics = metrics.clone();
                    async move {
                        let response = if request.uri().path() == "/metrics" {
                            hyper::Response::builder()
                                .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                                .body(http_body_util::Full::new(Bytes::from(metrics.encode())))
                        } else {
                            hyper::Response::builder()
                                .status(404)
                                .body(http_body_util::Full::new(Bytes::from_static(
                                    b"see /metrics\n",
                                )))
                        };
                        Ok::<_, Infallible>(response.unwrap_or_default())
                    }
                },
            );
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(io, service)
                .await;
        });
    }
}

/// Binds `address` and serves metrics there in the background.
pub async fn start(
    address: SocketAddr,
    metrics: Metrics,
    stop: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(address).await?;
    let bound = listener.local_addr()?;
    tokio::spawn(serve(listener, metrics, stop));
    tracing::info!(address = %bound, "serving metrics at /metrics");
    Ok(bound)
}

/// Records `switchboard_requests_total` and `switchboard_request_duration_seconds`.
#[derive(Debug, Clone)]
pub struct MetricsLayer {
    metrics: Metrics,
}

impl<S> Layer<S> for MetricsLayer {
    type Service = MetricsService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        MetricsService {
            inner,
            metrics: self.metrics.clone(),
        }
    }
}

/// See [`MetricsLayer`].
#[derive(Debug, Clone)]
pub struct MetricsService<S> {
    inner: S,
    metrics: Metrics,
}

impl<S, B> Service<http::Request<B>> for MetricsService<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = futures::future::BoxFuture<'static, Result<Self::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let mut inner = crate::take_ready(&mut self.inner);
        let method = request.uri().path().to_owned();
        let metrics = self.metrics.clone();
        let started = Instant::now();
        Box::pin(async move {
            let response = inner.call(request).await?;
            // A status in the headers is a trailers-only answer: the call is over.
            if let Some(code) = response.headers().get("grpc-status") {
                metrics.record(&method, code_name(code.as_bytes()), started);
                return Ok(response);
            }
            let observed = Observed {
                metrics,
                method,
                started,
                done: false,
            };
            Ok(response.map(|inner| tonic::body::Body::new(ObservedBody { inner, observed })))
        })
    }
}

struct Observed {
    metrics: Metrics,
    method: String,
    started: Instant,
    done: bool,
}

impl Observed {
    fn finish(&mut self, code: &str) {
        if !self.done {
            self.done = true;
            self.metrics.record(&self.method, code, self.started);
        }
    }
}

impl Drop for Observed {
    fn drop(&mut self) {
        // The client went away before the trailers.
        self.finish("CANCELLED");
    }
}

struct ObservedBody {
    inner: tonic::body::Body,
    observed: Observed,
}

impl Body for ObservedBody {
    type Data = Bytes;
    type Error = tonic::Status;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(code) = frame.trailers_ref().and_then(|t| t.get("grpc-status")) {
                    let name = code_name(code.as_bytes());
                    self.observed.finish(name);
                }
            }
            Poll::Ready(Some(Err(_))) => self.observed.finish("INTERNAL"),
            Poll::Ready(None) => self.observed.finish("OK"),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.inner.size_hint()
    }
}

/// The name of the gRPC status code `raw` (a `grpc-status` header value); `UNKNOWN` when it
/// is not one.
pub(crate) fn code_name(raw: &[u8]) -> &'static str {
    let code = std::str::from_utf8(raw)
        .ok()
        .and_then(|t| t.parse::<i32>().ok())
        .unwrap_or(2);
    match tonic::Code::from_i32(code) {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "CANCELLED",
        tonic::Code::Unknown => "UNKNOWN",
        tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
        tonic::Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        tonic::Code::NotFound => "NOT_FOUND",
        tonic::Code::AlreadyExists => "ALREADY_EXISTS",
        tonic::Code::PermissionDenied => "PERMISSION_DENIED",
        tonic::Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        tonic::Code::FailedPrecondition => "FAILED_PRECONDITION",
        tonic::Code::Aborted => "ABORTED",
        tonic::Code::OutOfRange => "OUT_OF_RANGE",
        tonic::Code::Unimplemented => "UNIMPLEMENTED",
        tonic::Code::Internal => "INTERNAL",
        tonic::Code::Unavailable => "UNAVAILABLE",
        tonic::Code::DataLoss => "DATA_LOSS",
        tonic::Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

//! Plumbing every Switchboard service stands on, written once:
//!
//! - [`config`]: the shared flags and their `SWITCHBOARD_*` environment fallbacks, composed
//!   of the groups that own them (etcd, TLS, limits) over the value types of [`flags`];
//! - [`telemetry`]: logs, OTLP traces and W3C trace-context propagation over gRPC;
//! - [`etcd`]: the etcd session, a lease keeper and a watch that survives etcd restarts;
//! - [`auth`]: HS256 tokens, account keys mirrored from etcd, the auth layer and [`auth::Caller`];
//! - [`server`]: health, reflection, layers, graceful shutdown and the replica lease;
//! - [`guard`]: the API guard, a layer limiting each account's in-flight requests per RPC
//!   through limiter-svc;
//! - [`limiter`]: a limiter-svc client that sends each call to the owner of its shard;
//! - [`limits`]: per-connection and per-request limits (concurrent streams, message size,
//!   request deadline); [`quota`]: per-account caps counted on one replica;
//! - [`refusal`]: how a layer refuses a call before its handler without costing the
//!   connection (the rest of the request is read first);
//! - [`paging`]: page sizes and the one page-token format of every List RPC;
//! - [`metrics`]: Prometheus metrics and the `--metrics-listen` endpoint;
//! - [`client`]: channels and call credentials for service-to-service calls;
//! - [`tls`]: TLS of servers (with certificate reload) and of service-to-service calls;
//! - [`time`]: wall-clock time since the epoch, in seconds and milliseconds;
//! - [`validate`] and [`status`]: field rules and the mapping of these errors to gRPC codes.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod auth;
pub mod client;
pub mod config;
pub mod etcd;
pub mod flags;
#[doc(hidden)]
pub mod fuzzing;
pub mod guard;
pub mod limiter;
pub mod limits;
pub mod metrics;
pub mod paging;
pub mod quota;
pub mod refusal;
pub mod rules;
pub mod server;
pub mod status;
pub mod telemetry;
pub mod time;
pub mod tls;
pub mod validate;

/// The allocator every binary of the house installs (`#[global_allocator]`): mimalloc.
/// Per call the services allocate and free many small buffers across threads (HTTP/2
/// frames, prost messages, tonic metadata); under the system allocator that was 16 % of
/// a limiter replica's CPU (docs/BENCHMARKS.md).
pub use mimalloc::MiMalloc as Allocator;

/// In a tower `call`: takes the inner service that `poll_ready` made ready and leaves a
/// fresh clone in its place (the clone is not ready, the taken one is).
pub(crate) fn take_ready<S: Clone>(inner: &mut S) -> S {
    let clone = inner.clone();
    std::mem::replace(inner, clone)
}

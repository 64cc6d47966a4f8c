//! Starting the services in-process for tests.

use integration::{Etcd, InProcess, common_args, serve_in_process};
use plumbing::server::ServeError;
use tonic::transport::Channel;

/// presence-svc in-process against `etcd` under `prefix`.
pub async fn presence(etcd: &Etcd, prefix: &str) -> InProcess<ServeError> {
    let args = presence_svc::ServeArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        common: common_args(etcd, prefix),
    };
    serve_in_process(move |listener, stop| {
        presence_svc::run(args, listener, async move {
            let _ = stop.await;
        })
    })
    .await
}

/// A channel to an in-process server.
pub fn channel<E>(server: &InProcess<E>) -> Channel {
    plumbing::client::channel(&server.addr.to_string()).unwrap()
}

/// limiter-svc in-process against `etcd` under `prefix`, with `--default-limit`.
pub async fn limiter(etcd: &Etcd, prefix: &str, default_limit: u32) -> InProcess<ServeError> {
    limiter_on(vec![etcd.endpoint.clone()], prefix, default_limit).await
}

/// limiter-svc in-process against these etcd endpoints.
pub async fn limiter_on(
    endpoints: Vec<String>,
    prefix: &str,
    default_limit: u32,
) -> InProcess<ServeError> {
    let common = integration::common_args_for(endpoints, prefix);
    limiter_with(limiter_svc::ServeArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        default_limit,
        common,
    })
    .await
}

/// limiter-svc in-process against these etcd endpoints, with these limiter flags.
pub async fn limiter_on_with(
    endpoints: Vec<String>,
    prefix: &str,
    default_limit: u32,
    limiter: limiter_svc::LimiterArgs,
) -> InProcess<ServeError> {
    let args = limiter_svc::ServeArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        default_limit,
        common: integration::common_args_for(endpoints, prefix),
    };
    serve_in_process(move |listener, stop| {
        limiter_svc::run_with(args, limiter, listener, async move {
            let _ = stop.await;
        })
    })
    .await
}

/// Limiter flags that grant from escrow blocks on every limited key (even small limits),
/// so the tests exercise blocks with limits they can fill.
pub fn escrow_everywhere() -> limiter_svc::LimiterArgs {
    limiter_svc::LimiterArgs {
        escrow_min_limit: 1,
        ..Default::default()
    }
}

/// limiter-svc in-process with these flags.
pub async fn limiter_with(args: limiter_svc::ServeArgs) -> InProcess<ServeError> {
    serve_in_process(move |listener, stop| {
        limiter_svc::run(args, listener, async move {
            let _ = stop.await;
        })
    })
    .await
}

/// router-svc in-process, with the API guard pointing at `limiter` when given.
pub async fn router(
    etcd: &Etcd,
    prefix: &str,
    limiter: Option<String>,
    fail_closed: bool,
) -> InProcess<ServeError> {
    let args = router_svc::ServeArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        presence: "127.0.0.1:1".into(),
        allow_private_webhooks: true,
        guard: plumbing::guard::GuardArgs {
            limiter,
            guard_fail_closed: fail_closed,
        },
        common: common_args(etcd, prefix),
    };
    serve_in_process(move |listener, stop| {
        router_svc::run(args, listener, async move {
            let _ = stop.await;
        })
    })
    .await
}

/// router-svc in-process with a presence address, an optional limiter (used for both the
/// communications slot and the API guard), and its own flags.
pub async fn router_with(
    etcd: &Etcd,
    prefix: &str,
    presence: String,
    limiter: Option<String>,
    allow_private_webhooks: bool,
    router: router_svc::RouterArgs,
) -> InProcess<ServeError> {
    let args = router_args(etcd, prefix, presence, limiter, allow_private_webhooks);
    router_serving(args, router).await
}

/// The flags of an in-process router (for tests that change some before starting it).
pub fn router_args(
    etcd: &Etcd,
    prefix: &str,
    presence: String,
    limiter: Option<String>,
    allow_private_webhooks: bool,
) -> router_svc::ServeArgs {
    router_svc::ServeArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        presence,
        allow_private_webhooks,
        guard: plumbing::guard::GuardArgs {
            limiter,
            guard_fail_closed: false,
        },
        common: common_args(etcd, prefix),
    }
}

/// A router serving in-process with `args`.
pub async fn router_serving(
    args: router_svc::ServeArgs,
    router: router_svc::RouterArgs,
) -> InProcess<ServeError> {
    serve_in_process(move |listener, stop| {
        router_svc::run_with(args, router, listener, async move {
            let _ = stop.await;
        })
    })
    .await
}

/// The text a `--metrics-listen` endpoint serves at `/metrics` (HTTP/1.0, headers included).
pub async fn scrape(address: std::net::SocketAddr) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
    stream
        .write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut text = String::new();
    stream.read_to_string(&mut text).await.unwrap();
    text
}

//! The API guard: a service's public RPCs limited per account through limiter-svc.

use std::time::Duration;

use integration::{Etcd, Tokens, poll_until, unique_prefix};
use plumbing::auth::Scope;
use proto::limiter::v1 as pb;
use proto::limiter::v1::limiter_service_client::LimiterServiceClient;
use proto::router::v1::router_service_client::RouterServiceClient;
use tonic::Code;

use crate::support;

const ROUTE: &str = "rpc:/switchboard.router.v1.RouterService/GetCommunication";

fn admin() -> String {
    Tokens::platform("*", &[Scope::Admin])
}

/// One guarded call as account AC1 (platform callers are not guarded, so `token` must come
/// from a real account key); its status, OK included.
async fn call_router(
    router: &integration::InProcess<plumbing::server::ServeError>,
    token: &str,
) -> tonic::Status {
    let mut client = RouterServiceClient::new(support::channel(router));
    let request = proto::router::v1::GetCommunicationRequest::default();
    match client
        .get_communication(Tokens::request(token, request))
        .await
    {
        Ok(_) => tonic::Status::ok(""),
        Err(status) => status,
    }
}

async fn account_token(
    etcd: &Etcd,
    prefix: &str,
) -> (String, integration::InProcess<plumbing::server::ServeError>) {
    let presence = support::presence(etcd, prefix).await;
    let mut keys =
        proto::presence::v1::key_service_client::KeyServiceClient::new(support::channel(&presence));
    let created = keys
        .create_key(Tokens::request(
            &admin(),
            proto::presence::v1::CreateKeyRequest {
                account_id: "AC1".into(),
                description: String::new(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let token = Tokens::signed(
        &created.key.unwrap().key_id,
        &created.secret,
        "AC1",
        None,
        &[Scope::Admin],
        300,
    );
    (token, presence)
}

#[tokio::test]
async fn guarded_calls_over_the_limit_get_resource_exhausted_with_retry_info() {
    let etcd = Etcd::start().await;
    let prefix = unique_prefix();
    let (token, presence) = account_token(&etcd, &prefix).await;
    let limiter = support::limiter(&etcd, &prefix, 100).await;
    let router = support::router(&etcd, &prefix, Some(limiter.addr.to_string()), false).await;
    let mut limits = LimiterServiceClient::new(support::channel(&limiter));
    let limit = pb::Limit {
        account_id: "AC1".into(),
        resource: ROUTE.into(),
        max_in_flight: 1,
        shadow: false,
    };
    limits
        .set_limit(Tokens::request(
            &admin(),
            pb::SetLimitRequest { limit: Some(limit) },
        ))
        .await
        .unwrap();
    // Within the limit the request reaches its handler (which answers UNIMPLEMENTED for now,
    // or anything but RESOURCE_EXHAUSTED), and its slot is released when it ends.
    let first = poll_until(
        "router to see the account key",
        Duration::from_secs(2),
        || async {
            let status = call_router(&router, &token).await;
            (status.code() != Code::Unauthenticated).then_some(status)
        },
    )
    .await;
    assert_ne!(first.code(), Code::ResourceExhausted, "{first:?}");
    let usage = |limits: &LimiterServiceClient<tonic::transport::Channel>| {
        let mut limits = limits.clone();
        async move {
            let request = pb::GetUsageRequest {
                account_id: "AC1".into(),
                resource: ROUTE.into(),
            };
            limits
                .get_usage(Tokens::request(&admin(), request))
                .await
                .ok()?
                .into_inner()
                .usage
        }
    };
    poll_until(
        "the guard slot to be released",
        Duration::from_secs(2),
        || async {
            usage(&limits)
                .await
                .filter(|u| u.in_flight == 0 && u.granted_total >= 1)
        },
    )
    .await;
    // Someone else holds the only slot: the guarded call is refused with retry information.
    let held = limits
        .acquire(Tokens::request(
            &admin(),
            pb::AcquireRequest {
                account_id: "AC1".into(),
                resource: ROUTE.into(),
                hold_seconds: 30,
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let refused = call_router(&router, &token).await;
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(refused.metadata().get("retry-after-ms").is_some());
    assert!(
        refused.message().contains("1 of 1"),
        "{}",
        refused.message()
    );
    use tonic_types::StatusExt;
    assert!(
        refused.get_details_retry_info().is_some(),
        "no RetryInfo detail"
    );
    limits
        .release(Tokens::request(
            &admin(),
            pb::ReleaseRequest {
                slot_id: held.slot_id,
            },
        ))
        .await
        .unwrap();
    assert_ne!(
        call_router(&router, &token).await.code(),
        Code::ResourceExhausted
    );
    router.shutdown().await.unwrap();
    limiter.shutdown().await.unwrap();
    presence.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_unreachable_limiter_fails_open_by_default_and_closed_when_configured() {
    let etcd = Etcd::start().await;
    let prefix = unique_prefix();
    let (token, presence) = account_token(&etcd, &prefix).await;
    let dead = format!("127.0.0.1:{}", integration::free_port());
    let open = support::router(&etcd, &prefix, Some(dead.clone()), false).await;
    let closed = support::router(&etcd, &prefix, Some(dead), true).await;
    let through = poll_until(
        "router to see the account key",
        Duration::from_secs(2),
        || async {
            let status = call_router(&open, &token).await;
            (status.code() != Code::Unauthenticated).then_some(status)
        },
    )
    .await;
    assert_ne!(
        through.code(),
        Code::Unavailable,
        "fail-open guard refused: {through:?}"
    );
    let refused = poll_until(
        "closed router to see the account key",
        Duration::from_secs(2),
        || async {
            let status = call_router(&closed, &token).await;
            (status.code() != Code::Unauthenticated).then_some(status)
        },
    )
    .await;
    assert_eq!(refused.code(), Code::Unavailable, "{refused:?}");
    assert!(refused.message().contains("limiter is unreachable"));
    open.shutdown().await.unwrap();
    closed.shutdown().await.unwrap();
    presence.shutdown().await.unwrap();
}

/// The guard serving a service of its own: the standard health service behind the public
/// `switchboard-guard` crate, keyed by an `x-account-id` header. Returns its address.
async fn guarded_health(guard: switchboard_guard::GuardLayer) -> std::net::SocketAddr {
    let addr: std::net::SocketAddr = ([127, 0, 0, 1], integration::free_port()).into();
    let (_, health) = tonic_health::server::health_reporter();
    tokio::spawn(
        tonic::transport::Server::builder()
            .layer(guard)
            .add_service(health)
            .serve(addr),
    );
    integration::wait_serving(addr).await;
    addr
}

/// A Health call as account `account` (no header when `None`); its status, OK included.
async fn health_call(
    addr: std::net::SocketAddr,
    account: Option<&str>,
    watch: bool,
) -> Result<Option<tonic::Streaming<tonic_health::pb::HealthCheckResponse>>, tonic::Status> {
    let channel = plumbing::client::channel(&addr.to_string()).unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let mut request = tonic::Request::new(tonic_health::pb::HealthCheckRequest::default());
    if let Some(account) = account {
        request
            .metadata_mut()
            .insert("x-account-id", account.parse().unwrap());
    }
    if !watch {
        return health.check(request).await.map(|_| None);
    }
    let mut stream = health.watch(request).await?.into_inner();
    // The first message proves the handler ran (and the slot is held while the stream lives).
    stream.message().await?;
    Ok(Some(stream))
}

#[tokio::test]
async fn the_guard_crate_limits_any_tonic_service_by_its_key_function() {
    const WATCH: &str = "rpc:/grpc.health.v1.Health/Watch";
    let etcd = Etcd::start().await;
    let prefix = unique_prefix();
    let limiter = support::limiter(&etcd, &prefix, 100).await;
    let mut limits = LimiterServiceClient::new(support::channel(&limiter));
    let limit = pb::Limit {
        account_id: "AC1".into(),
        resource: WATCH.into(),
        max_in_flight: 1,
        shadow: false,
    };
    let request = pb::SetLimitRequest { limit: Some(limit) };
    limits
        .set_limit(Tokens::request(&admin(), request))
        .await
        .unwrap();
    let token = Tokens::platform("*", &[Scope::LimiterAcquire]);
    let guard = switchboard_guard::guard_by_header(
        &limiter.addr.to_string(),
        &token,
        "x-account-id",
        switchboard_guard::FailMode::Open,
    )
    .unwrap();
    let addr = guarded_health(guard.clone()).await;

    let held = health_call(addr, Some("AC1"), true).await.unwrap();
    let refused = health_call(addr, Some("AC1"), true).await.unwrap_err();
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused:?}");
    assert!(
        refused
            .message()
            .contains("has 1 of 1 requests in flight for /grpc.health.v1.Health/Watch"),
        "{refused:?}"
    );
    assert!(refused.metadata().get("retry-after-ms").is_some());
    // Another account, another RPC and a request the key function does not key all pass.
    health_call(addr, Some("AC2"), true).await.unwrap();
    health_call(addr, Some("AC1"), false).await.unwrap();
    health_call(addr, None, true).await.unwrap();
    assert_eq!(guard.fail_open_count(), 0);

    // The slot lives as long as the stream: once it ends, AC1 may watch again.
    drop(held);
    poll_until(
        "the ended stream's slot to be released",
        Duration::from_secs(5),
        || async { health_call(addr, Some("AC1"), true).await.ok() },
    )
    .await;

    let dead = format!("127.0.0.1:{}", integration::free_port());
    let open = switchboard_guard::guard_by_header(
        &dead,
        &token,
        "x-account-id",
        switchboard_guard::FailMode::Open,
    )
    .unwrap();
    let closed = switchboard_guard::guard_by_header(
        &dead,
        &token,
        "x-account-id",
        switchboard_guard::FailMode::Closed,
    )
    .unwrap();
    let open_addr = guarded_health(open.clone()).await;
    let closed_addr = guarded_health(closed).await;
    health_call(open_addr, Some("AC1"), false).await.unwrap();
    assert_eq!(open.fail_open_count(), 1);
    let unavailable = health_call(closed_addr, Some("AC1"), false)
        .await
        .unwrap_err();
    assert_eq!(unavailable.code(), Code::Unavailable, "{unavailable:?}");
    assert!(unavailable.message().contains("limiter is unreachable"));
    limiter.shutdown().await.unwrap();
}

#[test]
fn the_guard_crate_refuses_a_token_that_cannot_be_metadata() {
    let err = switchboard_guard::CallCredentials::bearer("bad\ntoken").unwrap_err();
    assert!(!err.to_string().contains("bad"), "{err}");
}

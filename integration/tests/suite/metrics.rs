//! Prometheus metrics on `--metrics-listen`.

use integration::{Etcd, Tokens, common_args, free_port, unique_prefix};
use plumbing::auth::Scope;
use proto::limiter::v1 as pb;
use proto::limiter::v1::limiter_service_client::LimiterServiceClient;

use crate::support::{self, scrape};

/// The value of the unlabelled sample `name` in `text` (0 when absent).
fn counted(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::test]
async fn the_limiter_serves_request_and_slot_metrics() {
    let etcd = Etcd::start().await;
    let metrics_address: std::net::SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let mut common = common_args(&etcd, &unique_prefix());
    common.metrics_listen = Some(metrics_address);
    let server = support::limiter_with(limiter_svc::ServeArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        default_limit: 1,
        common,
    })
    .await;
    let mut client = LimiterServiceClient::new(support::channel(&server));
    let token = Tokens::platform("*", &[Scope::Admin]);
    let request = || pb::AcquireRequest {
        account_id: "AC1".into(),
        resource: "calls".into(),
        hold_seconds: 30,
        ..Default::default()
    };
    integration::poll_until("a grant", std::time::Duration::from_secs(10), || {
        let mut client = client.clone();
        let token = token.clone();
        async move {
            let answer = client
                .acquire(Tokens::request(&token, request()))
                .await
                .ok()?
                .into_inner();
            (answer.decision == pb::Decision::Granted as i32).then_some(())
        }
    })
    .await;
    let rejected = client
        .acquire(Tokens::request(&token, request()))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rejected.decision, pb::Decision::Rejected as i32);
    let _ = client
        .acquire(tonic::Request::new(request()))
        .await
        .unwrap_err();
    let text = scrape(metrics_address).await;
    assert!(
        text.starts_with("HTTP/1.0 200") || text.starts_with("HTTP/1.1 200"),
        "{text}"
    );
    for expected in [
        r#"switchboard_requests_total{method="/switchboard.limiter.v1.LimiterService/Acquire",code="OK"}"#,
        r#"switchboard_requests_total{method="/switchboard.limiter.v1.LimiterService/Acquire",code="UNAUTHENTICATED"} 1"#,
        r#"switchboard_limiter_grants_total{resource="calls"} 1"#,
        r#"switchboard_limiter_rejects_total{resource="calls"} 1"#,
        "switchboard_request_duration_seconds_bucket",
        "switchboard_limiter_txn_batch_size_count",
    ] {
        assert!(text.contains(expected), "missing {expected} in\n{text}");
    }
    assert!(!text.contains(&token), "a token leaked into metrics");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn presence_serves_session_and_device_gauges() {
    let etcd = Etcd::start().await;
    let metrics_address: std::net::SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let mut common = common_args(&etcd, &unique_prefix());
    common.metrics_listen = Some(metrics_address);
    let args = presence_svc::ServeArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        common,
    };
    let server = integration::serve_in_process(move |listener, stop| {
        presence_svc::run(args, listener, async move {
            let _ = stop.await;
        })
    })
    .await;
    let alice = Tokens::signed(
        integration::PLATFORM_KEY_ID,
        integration::PLATFORM_SECRET,
        "AC1",
        Some("alice"),
        &[Scope::PresenceRegister],
        600,
    );
    let session =
        crate::presence_support::Session::hello(support::channel(&server), &alice, "phone").await;
    integration::poll_until(
        "the gauges to count the session",
        std::time::Duration::from_secs(5),
        || async {
            let text = scrape(metrics_address).await;
            (text.contains("switchboard_presence_sessions 1")
                && text.contains("switchboard_presence_devices 1")
                && counted(&text, "switchboard_presence_txn_batch_size_count") >= 1
                && counted(&text, "switchboard_presence_txn_duration_seconds_count") >= 1)
                .then_some(())
        },
    )
    .await;
    drop(session);
    integration::poll_until(
        "the gauges to drop to zero",
        std::time::Duration::from_secs(5),
        || async {
            let text = scrape(metrics_address).await;
            (text.contains("switchboard_presence_sessions 0")
                && text.contains("switchboard_presence_devices 0"))
            .then_some(())
        },
    )
    .await;
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_router_counts_offers_outcomes_and_record_txns() {
    use crate::router_support::{Router, World};
    use proto::presence::v1 as ppb;
    use proto::router::v1 as rpb;

    let world = World::start(10).await;
    world
        .inline(
            "support",
            "<Response><Dial timeout=\"10\"><Client>alice</Client></Dial></Response>",
        )
        .await;
    let mut phone = world.device("alice", "phone").await;
    let metrics_address: std::net::SocketAddr = ([127, 0, 0, 1], free_port()).into();
    let mut args = support::router_args(
        &world.etcd,
        &world.prefix,
        world.presence.addr.to_string(),
        Some(world.limiter.addr.to_string()),
        true,
    );
    args.common.metrics_listen = Some(metrics_address);
    let server = support::router_serving(args, router_svc::RouterArgs::default()).await;
    let router = Router::new(&server);
    let routing = tokio::spawn({
        let router = router.clone();
        async move { router.route("support", "CM-metrics").await }
    });
    let offer = phone.offer().await;
    phone
        .answer(&offer, true, ppb::RejectReason::Unspecified)
        .await;
    let comm = routing.await.unwrap().unwrap();
    assert_eq!(comm.state, rpb::CommunicationState::Connected as i32);
    router.hangup("CM-metrics").await.unwrap();
    router.ended("CM-metrics").await;

    let text = integration::poll_until(
        "the router to count the offer, the outcome and its record txns",
        std::time::Duration::from_secs(5),
        || async {
            let text = scrape(metrics_address).await;
            (counted(&text, "switchboard_router_offers_total") == 1
                && text.contains(
                    r#"switchboard_router_communications_ended_total{outcome="OUTCOME_CONNECTED"} 1"#,
                )
                && counted(&text, "switchboard_router_txn_batch_size_count") >= 1
                && counted(&text, "switchboard_router_txn_duration_seconds_count") >= 1)
                .then_some(text)
        },
    )
    .await;
    assert!(text.contains(r#"switchboard_requests_total{method="/switchboard.router.v1.RouterService/Route",code="OK"} 1"#));
    server.shutdown().await.unwrap();
}

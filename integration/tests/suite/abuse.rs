//! Abuse limits: one tenant cannot starve another. A flooding account is refused with
//! RESOURCE_EXHAUSTED while a steady one is served within a latency bound; each limit
//! (message size, request deadline, streams per connection, per-account caps) holds and
//! leaves other accounts alone.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use integration::{Etcd, Tokens, poll_until, unique_prefix};
use plumbing::auth::Scope;
use plumbing::guard::GuardArgs;
use plumbing::limits::ConnectionLimits;
use presence_svc::PresenceArgs;
use proto::limiter::v1 as lpb;
use proto::limiter::v1::limiter_service_client::LimiterServiceClient;
use proto::presence::v1 as pb;
use proto::router::v1 as rpb;
use proto::router::v1::router_service_client::RouterServiceClient;
use tonic::Code;
use tonic_types::StatusExt;

use crate::abuse_support::{self, Flood, steady};
use crate::presence_support::{Session, Tenant, client, register};
use crate::support;

/// Concurrent callers of a flooding account.
const FLOOD: usize = 64;
/// Calls of the steady account during a flood.
const STEADY_CALLS: usize = 50;
/// The bound on each of the steady account's calls during a flood (2 shared cores, 64
/// flooding callers on the same machine; unflooded, these calls take milliseconds).
const STEADY_BOUND: Duration = Duration::from_secs(2);

fn admin() -> String {
    Tokens::platform("*", &[Scope::Admin])
}

fn registration(identity: &str, device_id: &str) -> pb::RegisterRequest {
    pb::RegisterRequest {
        identity: identity.into(),
        device_id: device_id.into(),
        ttl_seconds: 60,
        ..Default::default()
    }
}

async fn set_limit(
    limiter: &LimiterServiceClient<tonic::transport::Channel>,
    account: &str,
    resource: &str,
    max: u32,
) {
    let limit = lpb::Limit {
        account_id: account.into(),
        resource: resource.into(),
        max_in_flight: max,
        shadow: false,
    };
    let request = lpb::SetLimitRequest { limit: Some(limit) };
    limiter
        .clone()
        .set_limit(Tokens::request(&admin(), request))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_flood_on_presence_is_refused_while_another_account_is_served() {
    let etcd = Etcd::start().await;
    let prefix = unique_prefix();
    let limiter = abuse_support::limiter(&etcd, &prefix, 100, 10_000).await;
    let guard = GuardArgs {
        limiter: Some(limiter.addr.to_string()),
        guard_fail_closed: true,
    };
    let presence_args = PresenceArgs {
        guard,
        ..PresenceArgs::default()
    };
    let server =
        abuse_support::presence(&etcd, &prefix, ConnectionLimits::default(), presence_args).await;
    let limits = LimiterServiceClient::new(support::channel(&limiter));
    let rpc = "rpc:/switchboard.presence.v1.PresenceService/GetPresence";
    set_limit(&limits, "ACflood", rpc, 4).await;
    let (flooder, calm) = (
        Tenant::create(&server, "ACflood").await,
        Tenant::create(&server, "ACcalm").await,
    );
    flooder.known_to(&server).await;
    calm.known_to(&server).await;
    let read = |tenant: &Tenant| {
        let (client, token) = (client(&server), tenant.token(None, &[Scope::PresenceRead]));
        move |_| {
            let (mut client, token) = (client.clone(), token.clone());
            async move {
                let request = pb::GetPresenceRequest {
                    identity: "alice".into(),
                    ..Default::default()
                };
                client
                    .get_presence(Tokens::request(&token, request))
                    .await?;
                Ok(())
            }
        }
    };
    let flood = Flood::start(FLOOD, read(&flooder));
    flood.until_refused().await;
    let slowest = steady(STEADY_CALLS, read(&calm)).await;
    let tally = flood.stop().await;
    assert!(
        slowest < STEADY_BOUND,
        "slowest steady call took {slowest:?}"
    );
    let refusal = tally.first_refusal.lock().unwrap().take().unwrap();
    assert!(refusal.message().contains("ACflood"), "{refusal:?}");
    assert!(refusal.metadata().get("retry-after-ms").is_some());
    assert_eq!(tally.other.load(Ordering::Relaxed), 0);
    server.shutdown().await.unwrap();
    limiter.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_flood_on_the_limiter_is_refused_while_another_account_is_served() {
    let etcd = Etcd::start().await;
    let prefix = unique_prefix();
    let keys = support::presence(&etcd, &prefix).await;
    let limiter = abuse_support::limiter(&etcd, &prefix, 100, 8).await;
    let limits = LimiterServiceClient::new(support::channel(&limiter));
    set_limit(&limits, "ACflood", "held", 1).await;
    let (flooder, calm) = (
        Tenant::create(&keys, "ACflood").await,
        Tenant::create(&keys, "ACcalm").await,
    );
    let acquire = |tenant: &Tenant, resource: &'static str, wait_timeout_ms: u32| {
        let token = tenant.token(None, &[Scope::LimiterAcquire]);
        let limits = limits.clone();
        move |_| {
            let (mut limits, token) = (limits.clone(), token.clone());
            async move {
                let request = lpb::AcquireRequest {
                    resource: resource.into(),
                    hold_seconds: 30,
                    wait_timeout_ms,
                    ..Default::default()
                };
                let granted = limits.acquire(Tokens::request(&token, request)).await?;
                let slot_id = granted.into_inner().slot_id;
                if !slot_id.is_empty() && resource == "work" {
                    let release = lpb::ReleaseRequest { slot_id };
                    limits.release(Tokens::request(&token, release)).await?;
                }
                Ok(())
            }
        }
    };
    // The limiter mirrors account keys too; wait until it accepts both accounts.
    for tenant in [&flooder, &calm] {
        let call = acquire(tenant, "probe", 0);
        poll_until(
            "the limiter to know the key",
            Duration::from_secs(5),
            || {
                let call = call.clone();
                async move { call(0).await.ok() }
            },
        )
        .await;
    }
    // One caller holds `held` (limit 1); the others queue for it, in flight, until the cap.
    let flood = Flood::start(FLOOD, acquire(&flooder, "held", 2000));
    flood.until_refused().await;
    let slowest = steady(STEADY_CALLS, acquire(&calm, "work", 0)).await;
    let tally = flood.stop().await;
    assert!(
        slowest < STEADY_BOUND,
        "slowest steady call took {slowest:?}"
    );
    let refusal = tally.first_refusal.lock().unwrap().take().unwrap();
    assert!(
        refusal.message().contains("--max-inflight-per-account")
            && refusal.message().contains("ACflood"),
        "{refusal:?}"
    );
    assert!(refusal.metadata().get("retry-after-ms").is_some());
    assert!(refusal.get_details_retry_info().is_some(), "no RetryInfo");
    assert_eq!(tally.other.load(Ordering::Relaxed), 0);
    // Platform callers (the services' own guards) are not counted against an account.
    let platform = Tokens::platform("*", &[Scope::LimiterAcquire]);
    let request = lpb::AcquireRequest {
        account_id: "ACflood".into(),
        resource: "other".into(),
        hold_seconds: 5,
        ..Default::default()
    };
    limits
        .clone()
        .acquire(Tokens::request(&platform, request))
        .await
        .unwrap();
    limiter.shutdown().await.unwrap();
    keys.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_oversized_request_is_refused_with_resource_exhausted_and_the_largest_legitimate_one_passes()
 {
    let etcd = Etcd::start().await;
    let server = support::presence(&etcd, &unique_prefix()).await;
    let tenant = Tenant::create(&server, "AC1").await;
    tenant.known_to(&server).await;
    let token = tenant.token(None, &[Scope::PresenceRead]);
    let batch = |count: usize| pb::BatchGetPresenceRequest {
        identities: (0..count)
            .map(|i| format!("{}{i:05}", "i".repeat(251)))
            .collect(),
        ..Default::default()
    };
    let mut presence = client(&server);
    // 1000 identities of 256 characters: the largest BatchGetPresence the rules allow.
    presence
        .batch_get_presence(Tokens::request(&token, batch(1000)))
        .await
        .unwrap();
    let status = presence
        .batch_get_presence(Tokens::request(&token, batch(2100)))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("--max-message-bytes"),
        "{status:?}"
    );
    // The connection is still good.
    presence
        .batch_get_presence(Tokens::request(&token, batch(1)))
        .await
        .unwrap();
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_unary_call_past_the_request_timeout_ends_while_a_stream_outlives_it() {
    let etcd = Etcd::start().await;
    let timeout = Duration::from_millis(300);
    let limits = ConnectionLimits {
        request_timeout: timeout,
        ..ConnectionLimits::default()
    };
    let server =
        abuse_support::presence(&etcd, &unique_prefix(), limits, PresenceArgs::default()).await;
    let tenant = Tenant::create(&server, "AC1").await;
    tenant.known_to(&server).await;
    let token = tenant.device("alice");
    let mut presence = client(&server);
    let opened = Instant::now();
    let mut watch = presence
        .watch_presence(Tokens::request(&token, pb::WatchPresenceRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let mut session = Session::hello(support::channel(&server), &token, "desk").await;
    // A read waiting for a revision that will not come in time (it would wait 5 s).
    let started = Instant::now();
    let request = pb::GetPresenceRequest {
        identity: "alice".into(),
        min_revision: i64::from(i32::MAX),
        ..Default::default()
    };
    let status = presence
        .get_presence(Tokens::request(&token, request))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::DeadlineExceeded, "{status:?}");
    assert!(status.message().contains("--request-timeout"), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(3));
    // Older than the timeout, the watch still delivers and the session still answers.
    register(&presence, &token, registration("alice", "phone"))
        .await
        .unwrap();
    let phone = loop {
        let event = tokio::time::timeout(Duration::from_secs(5), watch.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        if let Some(pb::watch_presence_response::Event::Joined(joined)) = event.event
            && joined.device.as_ref().unwrap().device_id == "phone"
        {
            break joined;
        }
    };
    assert!(opened.elapsed() > timeout, "{phone:?}");
    let busy = pb::ConnectStatus {
        status: pb::Status::Busy as i32,
        ..Default::default()
    };
    session.send(pb::connect_request::Kind::Status(busy)).await;
    match session.next().await {
        pb::connect_response::Kind::Registered(registered) => {
            let device = registered.device.unwrap();
            assert_eq!(device.status, pb::Status::Busy as i32, "{device:?}");
        }
        other => panic!("expected registered, got {other:?}"),
    }
    server.shutdown().await.unwrap();
}

/// Calls with a bad token in `refused_calls_flooding_a_shared_connection_never_close_it`: the
/// server closes a connection after 1024 streams it had to reset for frames arriving late
/// (`plumbing::limits::MAX_LOCAL_ERROR_RESETS`).
const REFUSED_CALLS: usize = 4000;
/// Concurrent callers of that flood.
const REFUSED_CALLERS: usize = 32;

// Two workers, as a server has: the refusal races the rest of the request.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_calls_flooding_a_shared_connection_never_close_it() {
    let etcd = Etcd::start().await;
    let server = support::presence(&etcd, &unique_prefix()).await;
    let tenant = Tenant::create(&server, "ACcalm").await;
    tenant.known_to(&server).await;
    // One channel is one HTTP/2 connection: the flood and the good calls share it, as the
    // callers behind one proxy do.
    let shared = client(&server);
    let forged = Tokens::signed(
        "no-such-key",
        "not-a-secret",
        "ACflood",
        None,
        &[Scope::PresenceRead],
        600,
    );
    // About 100 KB: the message follows the headers in several DATA frames, some of which
    // are still on their way when the refusal comes.
    let batch = pb::BatchGetPresenceRequest {
        identities: (0..400)
            .map(|i| format!("{}{i:05}", "i".repeat(251)))
            .collect(),
        ..Default::default()
    };
    let flood = {
        let shared = shared.clone();
        abuse_support::burst(REFUSED_CALLERS, REFUSED_CALLS, move || {
            let (mut shared, request) = (shared.clone(), Tokens::request(&forged, batch.clone()));
            async move { shared.batch_get_presence(request).await.map(drop) }
        })
    };
    let good = tenant.token(None, &[Scope::PresenceRead]);
    let mut served = 0;
    while !flood.is_finished() {
        let request = pb::GetPresenceRequest {
            identity: "alice".into(),
            ..Default::default()
        };
        if let Err(status) = shared
            .clone()
            .get_presence(Tokens::request(&good, request))
            .await
        {
            panic!(
                "good call {served} on the shared connection failed during the flood: {status:?}"
            );
        }
        served += 1;
    }
    let codes = flood.await.unwrap();
    assert_eq!(
        codes,
        HashMap::from([(Code::Unauthenticated, REFUSED_CALLS as u64)]),
        "every call with a bad token is refused, and only so"
    );
    assert!(served > 0, "no good call ran during the flood");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn one_connection_gets_at_most_max_concurrent_streams() {
    let etcd = Etcd::start().await;
    let limits = ConnectionLimits {
        max_concurrent_streams: 4,
        ..ConnectionLimits::default()
    };
    let server =
        abuse_support::presence(&etcd, &unique_prefix(), limits, PresenceArgs::default()).await;
    let tenant = Tenant::create(&server, "AC1").await;
    tenant.known_to(&server).await;
    let token = tenant.token(None, &[Scope::PresenceRead]);
    let one_connection = client(&server);
    let watch =
        |mut client: proto::presence::v1::presence_service_client::PresenceServiceClient<
            tonic::transport::Channel,
        >| {
            let token = token.clone();
            async move {
                client
                    .watch_presence(Tokens::request(&token, pb::WatchPresenceRequest::default()))
                    .await
                    .map(tonic::Response::into_inner)
            }
        };
    let mut open = Vec::new();
    for _ in 0..4 {
        open.push(watch(one_connection.clone()).await.unwrap());
    }
    // The fifth waits on the client for a stream to close, without failing.
    let fifth = watch(one_connection.clone());
    tokio::pin!(fifth);
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut fifth)
            .await
            .is_err(),
        "a fifth stream opened on a connection limited to four"
    );
    // Another connection has its own allowance.
    watch(client(&server)).await.unwrap();
    drop(open.pop());
    tokio::time::timeout(Duration::from_secs(5), fifth)
        .await
        .expect("the fifth stream opens once one closes")
        .unwrap();
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_device_cap_per_account_refuses_new_devices_exactly_and_spares_others() {
    let etcd = Etcd::start().await;
    let presence_args = PresenceArgs {
        max_devices_per_account: 3,
        ..PresenceArgs::default()
    };
    let server = abuse_support::presence(
        &etcd,
        &unique_prefix(),
        ConnectionLimits::default(),
        presence_args,
    )
    .await;
    let presence = client(&server);
    let full = Tenant::create(&server, "ACfull").await;
    for (identity, device) in [("alice", "one"), ("alice", "two"), ("bob", "one")] {
        register(
            &presence,
            &full.device(identity),
            registration(identity, device),
        )
        .await
        .unwrap();
    }
    let before = etcd.client().await.get("/", None).await.unwrap();
    let before = before.header().unwrap().revision();
    let status = register(
        &presence,
        &full.device("carol"),
        registration("carol", "one"),
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("--max-devices-per-account")
            && status.message().contains("ACfull"),
        "{status:?}"
    );
    let hello = pb::ConnectHello {
        device_id: "desk".into(),
        ..Default::default()
    };
    let status = Session::open(support::channel(&server), &full.device("dave"), hello)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    let after = etcd.client().await.get("/", None).await.unwrap();
    assert_eq!(
        after.header().unwrap().revision(),
        before,
        "a refusal wrote"
    );
    // A device already present is not a new one.
    register(
        &presence,
        &full.device("alice"),
        registration("alice", "one"),
    )
    .await
    .unwrap();
    // Another account has its own allowance; concurrent new devices stop at the cap.
    let other = Tenant::create(&server, "ACother").await;
    let racing = (0..16).map(|i| {
        let (presence, identity) = (presence.clone(), format!("user{i}"));
        let token = other.device(&identity);
        async move { register(&presence, &token, registration(&identity, "one")).await }
    });
    let results = futures::future::join_all(racing).await;
    let admitted = results.iter().filter(|r| r.is_ok()).count();
    let refused = results
        .iter()
        .filter(|r| matches!(r, Err(s) if s.code() == Code::ResourceExhausted))
        .count();
    assert_eq!((admitted, refused), (3, 13), "{results:?}");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_watch_cap_per_account_holds_on_presence_and_frees_when_a_watch_ends() {
    let etcd = Etcd::start().await;
    let presence_args = PresenceArgs {
        max_watches_per_account: 2,
        ..PresenceArgs::default()
    };
    let server = abuse_support::presence(
        &etcd,
        &unique_prefix(),
        ConnectionLimits::default(),
        presence_args,
    )
    .await;
    let (busy, other) = (
        Tenant::create(&server, "ACbusy").await,
        Tenant::create(&server, "ACother").await,
    );
    busy.known_to(&server).await;
    let watch = |tenant: &Tenant| {
        let (mut presence, token) = (client(&server), tenant.token(None, &[Scope::PresenceRead]));
        async move {
            presence
                .watch_presence(Tokens::request(&token, pb::WatchPresenceRequest::default()))
                .await
                .map(tonic::Response::into_inner)
        }
    };
    let mut open = vec![watch(&busy).await.unwrap(), watch(&busy).await.unwrap()];
    let status = watch(&busy).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("--max-watches-per-account"),
        "{status:?}"
    );
    watch(&other).await.unwrap();
    drop(open.pop());
    poll_until(
        "a watch to be allowed again",
        Duration::from_secs(5),
        || async { watch(&busy).await.ok().map(drop) },
    )
    .await;
    server.shutdown().await.unwrap();
}

/// A RouterService client acting with a platform token.
fn router_client(
    server: &integration::InProcess<plumbing::server::ServeError>,
) -> RouterServiceClient<tonic::transport::Channel> {
    RouterServiceClient::new(support::channel(server))
}

async fn put_app(
    router: &RouterServiceClient<tonic::transport::Channel>,
    account: &str,
    address: &str,
    xml: &str,
) -> Result<(), tonic::Status> {
    let application = rpb::Application {
        account_id: account.into(),
        address: address.into(),
        instructions: xml.into(),
        ..Default::default()
    };
    let request = rpb::PutApplicationRequest {
        application: Some(application),
    };
    router
        .clone()
        .put_application(Tokens::request(&admin(), request))
        .await
        .map(drop)
}

fn route(
    router: &RouterServiceClient<tonic::transport::Channel>,
    account: &str,
    to: &str,
    id: &str,
) -> impl Future<Output = Result<rpb::Communication, tonic::Status>> + use<> {
    let mut router = router.clone();
    let request = rpb::RouteRequest {
        account_id: account.into(),
        from: "+15550100".into(),
        to: to.into(),
        communication_id: id.into(),
        ..Default::default()
    };
    async move {
        let answer = router.route(Tokens::request(&admin(), request)).await?;
        Ok(answer.into_inner().communication.unwrap())
    }
}

#[tokio::test]
async fn the_application_cap_per_account_refuses_a_new_one_and_spares_others() {
    let etcd = Etcd::start().await;
    let router_args = router_svc::RouterArgs {
        max_applications_per_account: 2,
        ..router_svc::RouterArgs::default()
    };
    let server = abuse_support::router(
        &etcd,
        &unique_prefix(),
        ConnectionLimits::default(),
        router_args,
    )
    .await;
    let router = router_client(&server);
    let xml = "<Response><Hangup/></Response>";
    put_app(&router, "AC1", "+15550001", xml).await.unwrap();
    put_app(&router, "AC1", "+15550002", xml).await.unwrap();
    let status = put_app(&router, "AC1", "+15550003", xml).await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("--max-applications-per-account"),
        "{status:?}"
    );
    // Replacing one is not a new one; another account has its own allowance.
    put_app(&router, "AC1", "+15550002", xml).await.unwrap();
    put_app(&router, "AC2", "+15550003", xml).await.unwrap();
    let request = rpb::DeleteApplicationRequest {
        account_id: "AC1".into(),
        address: "+15550001".into(),
    };
    router
        .clone()
        .delete_application(Tokens::request(&admin(), request))
        .await
        .unwrap();
    put_app(&router, "AC1", "+15550003", xml).await.unwrap();
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn route_outlives_the_request_timeout_and_router_watches_are_capped_per_account() {
    let etcd = Etcd::start().await;
    let limits = ConnectionLimits {
        request_timeout: Duration::from_millis(300),
        ..ConnectionLimits::default()
    };
    let router_args = router_svc::RouterArgs {
        max_watches_per_account: 2,
        ..router_svc::RouterArgs::default()
    };
    let server = abuse_support::router(&etcd, &unique_prefix(), limits, router_args).await;
    let router = router_client(&server);
    let long = "<Response><Pause length=\"30\"/></Response>";
    put_app(&router, "AC1", "+15550001", long).await.unwrap();
    put_app(&router, "AC2", "+15550001", long).await.unwrap();
    put_app(
        &router,
        "AC1",
        "+15550002",
        "<Response><Pause length=\"1\"/></Response>",
    )
    .await
    .unwrap();
    // Route is a long call by contract: a one-second pause is not cut at 300 ms.
    let started = Instant::now();
    route(&router, "AC1", "+15550002", "c-short").await.unwrap();
    assert!(started.elapsed() >= Duration::from_secs(1));
    let running = [
        tokio::spawn(route(&router, "AC1", "+15550001", "c-ac1")),
        tokio::spawn(route(&router, "AC2", "+15550001", "c-ac2")),
    ];
    let watch = |account: &str, id: &str| {
        let mut router = router.clone();
        let request = rpb::WatchCommunicationRequest {
            account_id: account.into(),
            communication_id: id.into(),
        };
        async move {
            router
                .watch_communication(Tokens::request(&admin(), request))
                .await
                .map(tonic::Response::into_inner)
        }
    };
    let first = poll_until("c-ac1 to be running", Duration::from_secs(5), || async {
        watch("AC1", "c-ac1").await.ok()
    })
    .await;
    let mut open = vec![first, watch("AC1", "c-ac1").await.unwrap()];
    let status = watch("AC1", "c-ac1").await.unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("--max-watches-per-account"),
        "{status:?}"
    );
    poll_until("c-ac2 to be watchable", Duration::from_secs(5), || async {
        watch("AC2", "c-ac2").await.ok()
    })
    .await;
    drop(open.pop());
    poll_until(
        "a watch to be allowed again",
        Duration::from_secs(5),
        || async { watch("AC1", "c-ac1").await.ok().map(drop) },
    )
    .await;
    for (account, id) in [("AC1", "c-ac1"), ("AC2", "c-ac2")] {
        let request = rpb::HangupRequest {
            account_id: account.into(),
            communication_id: id.into(),
            reason: "test".into(),
        };
        router
            .clone()
            .hangup(Tokens::request(&admin(), request))
            .await
            .unwrap();
    }
    for call in running {
        call.await.unwrap().unwrap();
    }
    server.shutdown().await.unwrap();
}

//! TLS on every server and every call between them: who is let in (CA trust, mutual TLS),
//! service-to-service calls over mutual TLS, certificate reload (SIGHUP and file change)
//! without dropping live sessions, refusing to start on a bad certificate, and the cap on
//! handshakes in progress.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use integration::certs::{CertFiles, TestCa};
use integration::{
    Etcd, InProcess, PLATFORM_KEY_ID, PLATFORM_SECRET, ServiceProcess, Tokens, common_args,
    poll_until, serve_in_process_with, unique_prefix,
};
use plumbing::auth::Scope;
use plumbing::client::{ClientTls, channel_with};
use plumbing::server::ServeError;
use plumbing::tls::{HANDSHAKE_TIMEOUT, TlsArgs};
use proto::limiter::v1 as lpb;
use proto::limiter::v1::limiter_service_client::LimiterServiceClient;
use proto::presence::v1 as ppb;
use proto::presence::v1::connect_request::Kind as Say;
use proto::presence::v1::presence_service_client::PresenceServiceClient;
use proto::router::v1 as pb;
use proto::router::v1::router_service_client::RouterServiceClient;
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

use crate::presence_support::{STEP, Session, presence_of};
use crate::router_support::{ACCOUNT, Device, Router, admin};
use crate::support;

/// How long a refused connection may take to fail.
const REFUSAL: Duration = Duration::from_secs(5);

/// Server flags serving `files`, requiring client certificates of `client_ca` when given,
/// and calling peers over TLS trusting `ca`.
fn server_tls(files: &CertFiles, ca: &TestCa, client_ca: Option<&TestCa>) -> TlsArgs {
    TlsArgs {
        tls_cert: Some(files.cert.clone()),
        tls_key: Some(files.key.clone()),
        tls_client_ca: client_ca.map(|ca| ca.ca_pem().to_owned()),
        tls_ca: Some(ca.ca_pem().to_owned()),
        ..TlsArgs::default()
    }
}

/// A client trusting `ca`, presenting `identity` when given.
fn trusting(ca: &TestCa, identity: Option<&CertFiles>) -> ClientTls {
    let identity = identity.map(|files| (files.cert.as_path(), files.key.as_path()));
    ClientTls::from_files(ca.ca_pem(), identity).unwrap()
}

fn channel(addr: SocketAddr, tls: &ClientTls) -> Channel {
    channel_with(&addr.to_string(), tls).unwrap()
}

/// A health check through `tls`: the status, or the error's text.
async fn health(addr: SocketAddr, tls: &ClientTls) -> Result<ServingStatus, String> {
    let mut client = HealthClient::new(channel(addr, tls));
    let request = tonic_health::pb::HealthCheckRequest::default();
    match tokio::time::timeout(REFUSAL, client.check(request)).await {
        Ok(Ok(answer)) => Ok(answer.into_inner().status()),
        Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
        Err(_) => Err("no answer in time".into()),
    }
}

/// Asserts that a client using `tls` is refused (at the handshake, so never SERVING).
async fn assert_refused(addr: SocketAddr, tls: &ClientTls, who: &str) {
    let answer = health(addr, tls).await;
    assert!(answer.is_err(), "{who} was let in: {answer:?}");
}

/// A device token of [`ACCOUNT`] for `identity`, signed with the platform key.
fn device_token(identity: &str) -> String {
    Tokens::signed(
        PLATFORM_KEY_ID,
        PLATFORM_SECRET,
        ACCOUNT,
        Some(identity),
        &[Scope::PresenceRegister, Scope::PresenceRead],
        600,
    )
}

async fn presence(etcd: &Etcd, prefix: &str, tls: TlsArgs, client: &ClientTls) -> Served {
    let mut common = common_args(etcd, prefix);
    common.tls = tls;
    let args = presence_svc::ServeArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        common,
    };
    serve_in_process_with(client, move |listener, stop| {
        presence_svc::run(args, listener, async move {
            let _ = stop.await;
        })
    })
    .await
}

async fn limiter(etcd: &Etcd, prefix: &str, tls: TlsArgs, client: &ClientTls) -> Served {
    let mut common = common_args(etcd, prefix);
    common.tls = tls;
    let args = limiter_svc::ServeArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        default_limit: 10,
        common,
    };
    serve_in_process_with(client, move |listener, stop| {
        limiter_svc::run(args, listener, async move {
            let _ = stop.await;
        })
    })
    .await
}

/// A router calling `presence` and `limiter` (fail closed: routing needs the limiter).
async fn router(
    etcd: &Etcd,
    prefix: &str,
    peers: (SocketAddr, SocketAddr),
    tls: TlsArgs,
    client: &ClientTls,
) -> Served {
    let (presence, limiter) = peers;
    let mut args = support::router_args(
        etcd,
        prefix,
        presence.to_string(),
        Some(limiter.to_string()),
        false,
    );
    args.guard.guard_fail_closed = true;
    args.common.tls = tls;
    serve_in_process_with(client, move |listener, stop| {
        router_svc::run_with(
            args,
            router_svc::RouterArgs::default(),
            listener,
            async move {
                let _ = stop.await;
            },
        )
    })
    .await
}

type Served = InProcess<ServeError>;

#[tokio::test]
async fn every_service_serves_tls_to_clients_trusting_its_ca_only() {
    let etcd = Etcd::start().await;
    let prefix = unique_prefix();
    let (ca, stranger) = (TestCa::new("switchboard"), TestCa::new("stranger"));
    let tls = trusting(&ca, None);
    let files = ca.issue("server");
    let presence = presence(&etcd, &prefix, server_tls(&files, &ca, None), &tls).await;
    let limiter = limiter(&etcd, &prefix, server_tls(&files, &ca, None), &tls).await;
    let peers = (presence.addr, limiter.addr);
    let router = router(&etcd, &prefix, peers, server_tls(&files, &ca, None), &tls).await;

    for (name, addr) in [
        ("presence", presence.addr),
        ("limiter", limiter.addr),
        ("router", router.addr),
    ] {
        assert_eq!(
            health(addr, &tls).await,
            Ok(ServingStatus::Serving),
            "{name}"
        );
        assert_refused(
            addr,
            &ClientTls::plain(),
            &format!("a plain-text client of {name}"),
        )
        .await;
        let other = trusting(&stranger, None);
        assert_refused(
            addr,
            &other,
            &format!("a client of {name} trusting another CA"),
        )
        .await;
    }

    // Authenticated RPCs work over TLS as over plain text.
    let mut limits = LimiterServiceClient::new(channel(limiter.addr, &tls));
    let request = lpb::GetLimitRequest {
        account_id: ACCOUNT.into(),
        resource: "communications".into(),
    };
    let limit = limits
        .get_limit(Tokens::request(&admin(), request))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(limit.limit.map(|l| l.max_in_flight), Some(10));
    let reads = PresenceServiceClient::new(channel(presence.addr, &tls));
    let alice = presence_of(&reads, &device_token("alice"), "alice", 0).await;
    assert!(alice.devices.is_empty());
}

#[tokio::test]
async fn mutual_tls_refuses_clients_without_a_certificate_and_routes_between_services() {
    let etcd = Etcd::start().await;
    let prefix = unique_prefix();
    let ca = TestCa::new("switchboard");
    let client_files = ca.issue("client");
    let tls = trusting(&ca, Some(&client_files));
    let mutual = |name: &str| server_tls(&ca.issue(name), &ca, Some(&ca));
    let presence = presence(&etcd, &prefix, mutual("presence"), &tls).await;
    let limiter = limiter(&etcd, &prefix, mutual("limiter"), &tls).await;
    let peers = (presence.addr, limiter.addr);
    let router = router(&etcd, &prefix, peers, mutual("router"), &tls).await;

    let anonymous = trusting(&ca, None);
    let stranger = TestCa::new("stranger");
    let foreign = trusting(&ca, Some(&stranger.issue("client")));
    for (name, addr) in [
        ("presence", presence.addr),
        ("limiter", limiter.addr),
        ("router", router.addr),
    ] {
        assert_eq!(
            health(addr, &tls).await,
            Ok(ServingStatus::Serving),
            "{name}"
        );
        let who = format!("a client of {name} without certificate");
        assert_refused(addr, &anonymous, &who).await;
        let who = format!("a client of {name} with a certificate of another CA");
        assert_refused(addr, &foreign, &who).await;
    }

    // A Route reaches alice's live device: router → limiter (slot, fail closed) and
    // router → presence (reads, offer relay), every hop over mutual TLS.
    let router = Router {
        client: RouterServiceClient::new(channel(router.addr, &tls)),
        token: admin(),
    };
    router
        .put(pb::Application {
            address: "support".into(),
            instructions: "<Response><Dial timeout=\"10\"><Client>alice</Client></Dial></Response>"
                .into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let token = device_token("alice");
    let session = Session::hello(channel(presence.addr, &tls), &token, "phone").await;
    let reads = PresenceServiceClient::new(channel(presence.addr, &tls));
    presence_of(&reads, &token, "alice", session.device.revision).await;
    let mut phone = Device { session };
    let routing = tokio::spawn({
        let router = router.clone();
        async move { router.route("support", "CM-mtls").await }
    });
    let offer = phone.offer().await;
    phone
        .answer(&offer, true, ppb::RejectReason::Unspecified)
        .await;
    let comm = routing.await.unwrap().unwrap();
    assert_eq!(
        comm.state,
        pb::CommunicationState::Connected as i32,
        "{comm:?}"
    );
    assert_eq!(comm.connected_device_id, "phone");
}

#[tokio::test]
async fn sighup_reloads_the_certificate_and_keeps_live_sessions() {
    let etcd = Etcd::start().await;
    let prefix = unique_prefix();
    let (old_ca, new_ca) = (TestCa::new("old"), TestCa::new("new"));
    let files = old_ca.issue("presence");
    let (old_trust, new_trust) = (trusting(&old_ca, None), trusting(&new_ca, None));
    let cert = files.cert.display().to_string();
    let key = files.key.display().to_string();
    // No polling of the files: only the signal can make the server see the new ones.
    let args = [
        "--tls-cert",
        cert.as_str(),
        "--tls-key",
        key.as_str(),
        "--tls-reload-interval",
        "0s",
    ];
    let server = ServiceProcess::start_tls("presence-svc", &etcd, &prefix, &args, &old_trust).await;
    let token = device_token("alice");
    let old_channel = channel(server.addr, &old_trust);
    let session = Session::hello(old_channel.clone(), &token, "phone").await;
    let old_reads = PresenceServiceClient::new(old_channel);
    presence_of(&old_reads, &token, "alice", session.device.revision).await;
    assert_refused(server.addr, &new_trust, "a client trusting only the new CA").await;

    new_ca.issue_to("presence", &files);
    // Without the signal the old certificate is still served (no polling)...
    health(server.addr, &old_trust)
        .await
        .expect("the old certificate is served until SIGHUP");
    server.hangup().await;

    poll_until("the new certificate to be served", STEP, || async {
        health(server.addr, &new_trust).await.ok()
    })
    .await;
    assert_refused(server.addr, &old_trust, "a client trusting only the old CA").await;
    // The session's connection was handshaken before the reload and still works both ways:
    // a status sent on the stream reaches the server, and the device is still present.
    session
        .send(Say::Status(ppb::ConnectStatus {
            status: ppb::Status::Busy as i32,
            ..Default::default()
        }))
        .await;
    let new_reads = PresenceServiceClient::new(channel(server.addr, &new_trust));
    poll_until("the old session's status update", STEP, || async {
        let alice = presence_of(&new_reads, &token, "alice", 0).await;
        let phone = alice.devices.iter().find(|d| d.device_id == "phone")?;
        (phone.status == ppb::Status::Busy as i32).then_some(())
    })
    .await;
    // Calls on the connection opened before the reload still succeed.
    presence_of(&old_reads, &token, "alice", 0).await;
}

#[tokio::test]
async fn a_changed_certificate_file_is_served_without_a_signal() {
    let etcd = Etcd::start().await;
    let prefix = unique_prefix();
    let (old_ca, new_ca) = (TestCa::new("old"), TestCa::new("new"));
    let files = old_ca.issue("presence");
    let old_trust = trusting(&old_ca, None);
    let server = presence(
        &etcd,
        &prefix,
        server_tls(&files, &old_ca, None),
        &old_trust,
    )
    .await;
    let token = device_token("bob");
    let session = Session::hello(channel(server.addr, &old_trust), &token, "desk").await;

    new_ca.issue_to("presence", &files);

    let new_trust = trusting(&new_ca, None);
    poll_until("the changed certificate to be served", STEP, || async {
        health(server.addr, &new_trust).await.ok()
    })
    .await;
    assert_refused(server.addr, &old_trust, "a client trusting only the old CA").await;
    let reads = PresenceServiceClient::new(channel(server.addr, &new_trust));
    let bob = presence_of(&reads, &token, "bob", session.device.revision).await;
    assert_eq!(bob.devices.len(), 1, "the session survived the reload");

    // The session itself is untouched: it is still open.
    session
        .send(Say::Status(ppb::ConnectStatus {
            status: ppb::Status::Away as i32,
            ..Default::default()
        }))
        .await;
    poll_until("the session's status update", STEP, || async {
        let bob = presence_of(&reads, &token, "bob", 0).await;
        (bob.devices.first()?.status == ppb::Status::Away as i32).then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_bad_certificate_file_stops_the_start_naming_the_flag() {
    let ca = TestCa::new("switchboard");
    let files = ca.issue("presence");
    let broken = ca.dir().join("broken.pem");
    std::fs::write(&broken, "-----BEGIN CERTIFICATE-----\nnot base64\n").unwrap();
    // No etcd: the TLS files are checked before anything else.
    let mut common = integration::common_args_for(vec!["http://127.0.0.1:1".into()], "/unused");
    common.tls = TlsArgs {
        tls_cert: Some(broken.clone()),
        tls_key: Some(files.key.clone()),
        ..TlsArgs::default()
    };
    let args = presence_svc::ServeArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        common,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = presence_svc::run(args, listener, std::future::pending())
        .await
        .unwrap_err();
    assert!(matches!(err, ServeError::Tls(_)), "{err}");
    let text = err.to_string();
    assert!(
        text.contains("--tls-cert") && text.contains("broken.pem"),
        "{text}"
    );

    // The binary exits with that message, and a key without a certificate is refused too.
    let cases: [(&[&str], &str); 2] = [
        (
            &[
                "--tls-cert",
                broken.to_str().unwrap(),
                "--tls-key",
                files.key.to_str().unwrap(),
            ],
            "--tls-cert",
        ),
        (
            &["--tls-key", files.key.to_str().unwrap()],
            "--tls-key is given without --tls-cert",
        ),
    ];
    for (flags, expected) in cases {
        let output = tokio::process::Command::new(ServiceProcess::binary("presence-svc"))
            .args(["--listen", "127.0.0.1:0", "--etcd", "http://127.0.0.1:1"])
            .args(flags)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "error")
            .kill_on_drop(true)
            .output();
        let output = tokio::time::timeout(Duration::from_secs(20), output)
            .await
            .expect("presence-svc did not exit")
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{flags:?}: {stderr}");
        assert!(stderr.contains(expected), "{flags:?}: {stderr}");
        let key = std::fs::read_to_string(&files.key).unwrap();
        assert!(
            !stderr.contains(key.lines().nth(1).unwrap()),
            "the key leaked: {stderr}"
        );
    }
}

#[tokio::test]
async fn silent_connections_take_at_most_the_handshake_cap_and_a_client_gets_the_next_slot() {
    let etcd = Etcd::start().await;
    let ca = TestCa::new("switchboard");
    let tls = trusting(&ca, None);
    let files = ca.issue("presence");
    let args = TlsArgs {
        tls_max_handshakes: 2,
        ..server_tls(&files, &ca, None)
    };
    let server = presence(&etcd, &unique_prefix(), args, &tls).await;
    // Two connections that never send a ClientHello take both handshake slots.
    let opened = Instant::now();
    let mut silent = Vec::new();
    for _ in 0..2 {
        silent.push(tokio::net::TcpStream::connect(server.addr).await.unwrap());
    }
    // A real client waits (in the listen backlog) while they hold them...
    let addr = server.addr;
    let mut waiting = tokio::spawn(async move { health(addr, &trusting(&ca, None)).await });
    assert!(
        tokio::time::timeout(Duration::from_millis(500), &mut waiting)
            .await
            .is_err(),
        "a third handshake ran while two silent connections held a cap of two"
    );
    // ...and is served as soon as one of them goes away, long before a silent connection
    // would have timed out and freed its slot.
    drop(silent.pop());
    assert_eq!(waiting.await.unwrap(), Ok(ServingStatus::Serving));
    assert!(
        opened.elapsed() < HANDSHAKE_TIMEOUT,
        "served only after {:?}",
        opened.elapsed()
    );
    drop(silent);
    server.shutdown().await.unwrap();
}

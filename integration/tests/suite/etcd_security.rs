//! etcd security: services against an etcd with TLS, client certificates and
//! authentication; the start-up errors of each misconfiguration; and sessions that log in
//! again when etcd forgets or expires their auth token.

use std::time::Duration;

use integration::{
    Etcd, EtcdLogin, EtcdSecurity, InProcess, ServiceProcess, Tokens, poll_until,
    secure_common_args, serve_in_process, unique_prefix,
};
use plumbing::auth::Scope;
use plumbing::config::CommonArgs;
use plumbing::etcd::{ConnectError, EtcdOptions, EtcdSession, Lease, WatchItem, WatchSpec, follow};
use plumbing::server::ServeError;
use proto::limiter::v1 as lpb;
use proto::limiter::v1::limiter_service_client::LimiterServiceClient;
use proto::presence::v1 as ppb;
use proto::presence::v1::key_service_client::KeyServiceClient;
use proto::router::v1 as rpb;
use tonic::transport::Channel;

use crate::presence_support::{Tenant, client, presence_of, register};
use crate::router_support::{ACCOUNT, Router, admin};
use crate::support;

/// The user the services log in as.
const USER: &str = "switchboard";

/// A TLS etcd requiring client certificates, with authentication on and [`USER`] allowed
/// under a fresh prefix.
async fn locked_down_etcd(auth_token_ttl: Option<u32>) -> (Etcd, String, EtcdLogin) {
    let mut etcd = Etcd::start_secure(EtcdSecurity {
        client_cert_auth: true,
        auth_token_ttl,
    })
    .await;
    etcd.enable_auth().await;
    let prefix = unique_prefix();
    let login = etcd.add_user(USER, &prefix).await;
    (etcd, prefix, login)
}

async fn presence(common: CommonArgs) -> InProcess<ServeError> {
    let args = presence_svc::ServeArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        common,
    };
    serve_in_process(move |listener, stop| {
        presence_svc::run(args, listener, async move {
            let _ = stop.await;
        })
    })
    .await
}

async fn limiter(common: CommonArgs) -> InProcess<ServeError> {
    support::limiter_with(limiter_svc::ServeArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        default_limit: 10,
        common,
    })
    .await
}

/// What `presence_svc::run` says when it cannot start with `common`.
async fn start_failure(common: CommonArgs) -> String {
    let args = presence_svc::ServeArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        common,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let result = tokio::time::timeout(
        Duration::from_secs(20),
        presence_svc::run(args, listener, std::future::pending()),
    )
    .await
    .expect("start-up neither failed nor served");
    format!(
        "{}",
        result.expect_err("started against a misconfigured etcd")
    )
}

fn limiter_client(addr: std::net::SocketAddr) -> LimiterServiceClient<Channel> {
    LimiterServiceClient::new(plumbing::client::channel(&addr.to_string()).unwrap())
}

/// SetLimit, then Acquire until granted (the key's shard needs an owner first).
async fn limit_and_acquire(addr: std::net::SocketAddr, resource: &str) {
    let mut limiter = limiter_client(addr);
    let limit = lpb::Limit {
        account_id: ACCOUNT.into(),
        resource: resource.into(),
        max_in_flight: 2,
        shadow: false,
    };
    limiter
        .set_limit(Tokens::request(
            &admin(),
            lpb::SetLimitRequest { limit: Some(limit) },
        ))
        .await
        .unwrap();
    poll_until("an Acquire to be granted", Duration::from_secs(20), || {
        let mut limiter = limiter.clone();
        async move {
            let request = lpb::AcquireRequest {
                account_id: ACCOUNT.into(),
                resource: resource.into(),
                hold_seconds: 30,
                ..Default::default()
            };
            let answer = limiter
                .acquire(Tokens::request(&admin(), request))
                .await
                .ok()?
                .into_inner();
            (answer.decision == lpb::Decision::Granted as i32).then_some(())
        }
    })
    .await;
}

/// Registers `device` of alice and reads it back.
async fn register_and_read(server: &InProcess<ServeError>, tenant: &Tenant, device: &str) {
    let alice = tenant.device("alice");
    let presence = client(server);
    let request = ppb::RegisterRequest {
        device_id: device.into(),
        ttl_seconds: 60,
        ..Default::default()
    };
    let registered = register(&presence, &alice, request).await.unwrap();
    let now = presence_of(&presence, &alice, "alice", registered.revision).await;
    assert!(now.devices.iter().any(|d| d.device_id == device), "{now:?}");
}

/// PutApplication, then GetApplication returns it.
async fn put_and_get_application(router: &Router, address: &str) {
    router
        .put(rpb::Application {
            address: address.into(),
            instructions: "<Response><Hangup/></Response>".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    let read = router
        .client
        .clone()
        .get_application(Tokens::request(
            &router.token,
            rpb::GetApplicationRequest {
                account_id: ACCOUNT.into(),
                address: address.into(),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .application
        .unwrap();
    assert_eq!(read.address, address);
}

#[tokio::test]
async fn the_services_work_against_etcd_with_tls_client_certificates_and_auth() {
    let (etcd, prefix, login) = locked_down_etcd(None).await;
    let common = secure_common_args(&etcd, &prefix, Some(&login));
    let presence = presence(common.clone()).await;
    let limiter = limiter(common.clone()).await;
    let mut router_args = support::router_args(
        &etcd,
        &prefix,
        presence.addr.to_string(),
        Some(limiter.addr.to_string()),
        true,
    );
    router_args.common = common;
    let router = support::router_serving(router_args, router_svc::RouterArgs::default()).await;

    let tenant = Tenant::create(&presence, ACCOUNT).await;
    tenant.known_to(&presence).await;
    register_and_read(&presence, &tenant, "desk").await;
    limit_and_acquire(limiter.addr, "calls").await;
    put_and_get_application(&Router::new(&router), "support").await;

    // Everything went through the locked-down etcd, under the prefix.
    let stored = etcd
        .client()
        .await
        .get(
            prefix.as_str(),
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_count_only(),
            ),
        )
        .await
        .unwrap()
        .count();
    assert!(stored > 0);
    router.shutdown().await.unwrap();
    limiter.shutdown().await.unwrap();
    presence.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_binaries_log_in_with_a_password_from_the_environment_or_a_file() {
    let (etcd, prefix, login) = locked_down_etcd(None).await;
    let mut flags = etcd.tls_flags();
    flags.extend(["--etcd-user".to_owned(), login.user.clone()]);
    let args: Vec<&str> = flags.iter().map(String::as_str).collect();

    // limiter-svc: the password in the environment.
    let limiter = ServiceProcess::start_with_env(
        "limiter-svc",
        &etcd,
        &prefix,
        &args,
        &[("SWITCHBOARD_ETCD_PASSWORD", login.password.as_str())],
    )
    .await;
    limit_and_acquire(limiter.addr, "calls").await;

    // presence-svc: the password in a file, with the newline `echo` leaves.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("etcd-password");
    std::fs::write(&file, format!("{}\n", login.password)).unwrap();
    let mut with_file = args.clone();
    with_file.extend(["--etcd-password-file", file.to_str().unwrap()]);
    let presence = ServiceProcess::start("presence-svc", &etcd, &prefix, &with_file).await;
    let mut keys =
        KeyServiceClient::new(plumbing::client::channel(&presence.addr.to_string()).unwrap());
    let created = keys
        .create_key(Tokens::request(
            &Tokens::platform("*", &[Scope::Admin]),
            ppb::CreateKeyRequest {
                account_id: ACCOUNT.into(),
                description: "written through a TLS etcd with auth".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(created.key.is_some());
}

#[tokio::test]
async fn a_wrong_password_stops_start_up_without_revealing_it() {
    let (etcd, prefix, _) = locked_down_etcd(None).await;
    let wrong = "wrong-password-4f1e9c";
    let mut common = secure_common_args(&etcd, &prefix, None);
    common.etcd.user = Some(USER.into());
    common.etcd.password = Some(plumbing::etcd::EtcdPassword::new(wrong));
    let error = start_failure(common).await;
    assert!(
        error.contains("refused the login of user `switchboard`"),
        "{error}"
    );
    assert!(error.contains("--etcd-user"), "{error}");
    assert!(!error.contains(wrong), "{error}");

    // The binary exits non-zero, and its logs do not show the password either.
    let flags = etcd.tls_flags();
    let mut args: Vec<&str> = flags.iter().map(String::as_str).collect();
    args.extend(["--etcd-user", USER]);
    let (status, logs) = ServiceProcess::run_until_exit(
        "limiter-svc",
        &etcd,
        &prefix,
        &args,
        &[("SWITCHBOARD_ETCD_PASSWORD", wrong), ("RUST_LOG", "debug")],
    )
    .await;
    assert!(!status.success());
    assert!(logs.contains("refused the login"), "{logs}");
    assert!(!logs.contains(wrong), "{logs}");
}

#[tokio::test]
async fn a_tls_etcd_without_the_ca_is_refused_clearly() {
    let (etcd, prefix, login) = locked_down_etcd(None).await;
    // https without --etcd-ca: refused before connecting.
    let mut common = secure_common_args(&etcd, &prefix, Some(&login));
    common.etcd.ca = None;
    common.etcd.cert = None;
    common.etcd.key = None;
    let error = start_failure(common.clone()).await;
    assert!(
        error.contains("--etcd") && error.contains("--etcd-ca"),
        "{error}"
    );
    // Plain http against the TLS port: no answer, and the error says where to look.
    common.etcd.endpoints = vec![etcd.endpoint.replace("https://", "http://")];
    let started = std::time::Instant::now();
    let error = start_failure(common).await;
    assert!(error.contains("unreachable (--etcd, --etcd-ca)"), "{error}");
    assert!(
        error.contains("https:// endpoints and --etcd-ca"),
        "{error}"
    );
    assert!(started.elapsed() < Duration::from_secs(12));
    // A CA that did not sign etcd's certificate: the TLS handshake fails, and says why.
    let other = integration::certs::TestCa::new("someone-else");
    let mut common = secure_common_args(&etcd, &prefix, Some(&login));
    common.etcd.ca = Some(other.ca_pem().to_owned());
    let error = start_failure(common).await;
    assert!(
        error.contains("unreachable") && error.contains("certificate"),
        "{error}"
    );
}

#[tokio::test]
async fn a_user_without_permission_on_the_prefix_or_without_a_login_is_refused() {
    let (etcd, prefix, _) = locked_down_etcd(None).await;
    let elsewhere = etcd.add_user("elsewhere", "/another-deployment").await;
    let error = start_failure(secure_common_args(&etcd, &prefix, Some(&elsewhere))).await;
    assert!(
        error.contains("`elsewhere` has no permission on the key prefix"),
        "{error}"
    );
    assert!(!error.contains(&elsewhere.password), "{error}");

    let options = EtcdOptions::from_args(&secure_common_args(&etcd, &prefix, None).etcd).unwrap();
    let anonymous = EtcdSession::connect(&options).await.unwrap_err();
    assert!(
        matches!(anonymous, ConnectError::LoginRequired { .. }),
        "{anonymous}"
    );
}

#[tokio::test]
async fn the_binaries_take_no_password_flag() {
    for binary in ["presence-svc", "limiter-svc", "router-svc"] {
        let output = tokio::process::Command::new(ServiceProcess::binary(binary))
            .args(["--etcd-password", "hunter2"])
            .output()
            .await
            .unwrap();
        assert_eq!(
            output.status.code(),
            Some(2),
            "{binary} accepted --etcd-password"
        );
        let help = tokio::process::Command::new(ServiceProcess::binary(binary))
            .arg("--help")
            .output()
            .await
            .unwrap();
        let help = String::from_utf8_lossy(&help.stdout);
        assert!(
            help.contains("--etcd-password-file") && help.contains("SWITCHBOARD_ETCD_PASSWORD")
        );
        assert!(
            !help.contains("--etcd-password "),
            "{binary} --help offers a password flag"
        );
    }
}

/// An etcd client logged in as `login`, without etcd-client's token refresh: it shows
/// whether etcd still accepts the token it got when it connected.
async fn probe(etcd: &Etcd, prefix: &str, login: &EtcdLogin) -> etcd_client::Client {
    let read = |path: &std::path::Path| std::fs::read(path).unwrap();
    let args = secure_common_args(etcd, prefix, Some(login));
    let tls = etcd_client::TlsOptions::new()
        .ca_certificate(etcd_client::Certificate::from_pem(read(
            args.etcd.ca.as_deref().unwrap(),
        )))
        .identity(etcd_client::Identity::from_pem(
            read(args.etcd.cert.as_deref().unwrap()),
            read(args.etcd.key.as_deref().unwrap()),
        ));
    let options = etcd_client::ConnectOptions::new()
        .with_tls(tls)
        .with_user(login.user.as_str(), login.password.as_str());
    etcd_client::Client::connect([etcd.endpoint.as_str()], Some(options))
        .await
        .unwrap()
}

/// Lets more than `ttl` seconds pass without using `idle`'s token, then checks etcd has
/// expired it — so every token last used before the wait has expired too.
async fn outlive_auth_tokens(ttl: u32, idle: &mut etcd_client::Client, prefix: &str) {
    // Waiting out the TTL is what this test is about, not a way to synchronise: etcd
    // checks token expiry once a second, so TTL + 2 s is past it.
    tokio::time::sleep(Duration::from_secs(u64::from(ttl) + 2)).await;
    let refused = idle.get(prefix, None).await.unwrap_err();
    assert!(
        refused.to_string().contains("invalid auth token"),
        "etcd did not expire an idle token: {refused}"
    );
}

#[tokio::test]
async fn a_session_keeps_its_lease_watches_and_writes_when_its_auth_token_expires() {
    const TTL: u32 = 2;
    let (etcd, prefix, login) = locked_down_etcd(Some(TTL)).await;
    let options =
        EtcdOptions::from_args(&secure_common_args(&etcd, &prefix, Some(&login)).etcd).unwrap();
    let session = EtcdSession::connect(&options).await.unwrap();
    let lease = Lease::grant(&session, 2).await.unwrap();
    let watch = |key: &str| WatchSpec {
        key: session.key(key),
        prefix: true,
        start_revision: 0,
        prev_kv: false,
    };
    let mut before = follow(&session, watch("w/"));
    let mut idle = probe(&etcd, &prefix, &login).await;
    // The watch is established before its token expires (a put it sees proves it).
    let mut root = etcd.client().await;
    put_until_seen(&mut root, &session.key("w/0"), &mut before).await;

    outlive_auth_tokens(TTL, &mut idle, &prefix).await;
    let mut root = etcd.client().await;

    // A watch opened now is refused by etcd (created and canceled at once); it logs in
    // again and delivers.
    let mut after = follow(&session, watch("w/"));
    put_until_seen(&mut root, &session.key("w/1"), &mut after).await;
    // The watch from before still delivers; writes and new leases log in again by themselves.
    put_until_seen(&mut root, &session.key("w/2"), &mut before).await;
    let mut client = session.client();
    session
        .bounded(client.put(session.key("written"), "after expiry", None))
        .await
        .unwrap();
    let second = Lease::grant(&session, 2).await.unwrap();
    // Keep-alives need no token: the first lease survived the whole time.
    assert!(!lease.lost().is_cancelled());
    assert!(!second.lost().is_cancelled());

    // A restarted etcd forgets every token at once: the same recovery covers it.
    let mut etcd = etcd;
    etcd.restart().await;
    let mut root = etcd.client().await;
    put_until_seen(&mut root, &session.key("w/3"), &mut after).await;
    let mut client = session.client();
    session
        .bounded(client.put(session.key("written"), "after restart", None))
        .await
        .unwrap();
    assert!(!lease.lost().is_cancelled());
}

/// Puts `key` and waits until `items` delivers it, putting again now and then: a watch
/// "from now" may still be opening when the first put lands.
async fn put_until_seen(
    root: &mut etcd_client::Client,
    key: &str,
    items: &mut tokio::sync::mpsc::Receiver<WatchItem>,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the watch never delivered {key}"
        );
        root.put(key, "x", None).await.unwrap();
        let seen = async {
            loop {
                match items.recv().await.expect("the watch ended") {
                    WatchItem::Events { events, .. }
                        if events
                            .iter()
                            .any(|e| e.kv().is_some_and(|kv| kv.key() == key.as_bytes())) =>
                    {
                        return;
                    }
                    WatchItem::Compacted { .. } => panic!("unexpected compaction"),
                    _ => {}
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(1), seen)
            .await
            .is_ok()
        {
            return;
        }
    }
}

#[tokio::test]
async fn the_services_keep_working_when_their_auth_tokens_expire() {
    const TTL: u32 = 2;
    let (etcd, prefix, login) = locked_down_etcd(Some(TTL)).await;
    let common = secure_common_args(&etcd, &prefix, Some(&login));
    let presence = presence(common.clone()).await;
    let limiter = limiter(common).await;
    let tenant = Tenant::create(&presence, ACCOUNT).await;
    tenant.known_to(&presence).await;
    let mut idle = probe(&etcd, &prefix, &login).await;

    outlive_auth_tokens(TTL, &mut idle, &prefix).await;

    // Registrations and limiter slots are written by the group-commit writers.
    register_and_read(&presence, &tenant, "phone").await;
    limit_and_acquire(limiter.addr, "calls").await;
    limiter.shutdown().await.unwrap();
    presence.shutdown().await.unwrap();
}

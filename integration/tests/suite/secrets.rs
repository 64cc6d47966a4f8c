//! Secrets stay secret: a full scenario through the three binaries (debug logs, OTLP traces,
//! metrics) never shows a key secret, a signing secret, the platform secret or a token in
//! any log line, error, span or metric; secrets are never read back through an RPC; and
//! account keys rotate without a failed call.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use integration::{
    Etcd, PLATFORM_SECRET, ServiceProcess, Tokens, free_port, poll_until, unique_prefix,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use plumbing::auth::Scope;
use prost::Message;
use proto::presence::v1 as ppb;
use proto::presence::v1::key_service_client::KeyServiceClient;
use proto::presence::v1::presence_service_client::PresenceServiceClient;
use proto::router::v1 as rpb;
use proto::router::v1::router_service_client::RouterServiceClient;
use tonic::Code;
use tonic::transport::Channel;

use crate::presence_support::Session;
use crate::router_support::{Device, WebhookServer};
use crate::support::scrape;

/// Everything the OTLP receiver got, as text.
#[derive(Clone, Default)]
struct Collector {
    exported: Arc<Mutex<Vec<String>>>,
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        // The whole request, attributes, events and resource included.
        let text = format!("{:?}", request.into_inner());
        self.exported.lock().unwrap().push(text);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

fn channel(process: &ServiceProcess) -> Channel {
    Channel::from_shared(process.url()).unwrap().connect_lazy()
}

/// What must never be shown, with a name for the failure message.
struct Secrets(Vec<(String, String)>);

impl Secrets {
    fn add(&mut self, what: &str, value: &str) {
        assert!(value.len() >= 16, "{what} is too short to search for");
        self.0.push((what.to_owned(), value.to_owned()));
    }

    /// A token and its signature (the part that proves possession of the key).
    fn add_token(&mut self, what: &str, token: &str) {
        self.add(what, token);
        let signature = token.rsplit('.').next().unwrap();
        self.add(&format!("signature of {what}"), signature);
    }

    fn assert_absent(&self, place: &str, text: &str) {
        for (what, value) in &self.0 {
            assert!(!text.contains(value.as_str()), "{what} appears in {place}");
        }
    }
}

#[tokio::test]
async fn no_secret_or_token_reaches_logs_errors_traces_or_metrics() {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let otlp = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(TraceServiceServer::new(collector.clone()))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );

    let etcd = Etcd::start().await;
    let prefix = unique_prefix();
    let logs = tempfile::tempdir().unwrap();
    let log = logs.path().join("services.log");
    let env = [
        ("OTEL_EXPORTER_OTLP_ENDPOINT", otlp.as_str()),
        ("OTEL_BSP_SCHEDULE_DELAY", "200"),
        ("RUST_LOG", "debug"),
    ];
    let metrics: Vec<std::net::SocketAddr> = (0..3)
        .map(|_| ([127, 0, 0, 1], free_port()).into())
        .collect();
    let flags = |i: usize| ["--metrics-listen".to_owned(), metrics[i].to_string()];
    let args = |extra: &[String], i: usize| -> Vec<String> {
        extra.iter().cloned().chain(flags(i)).collect()
    };
    let start = |name: &'static str, args: Vec<String>| {
        let (etcd, prefix, log, env) = (&etcd, &prefix, &log, &env);
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            ServiceProcess::start_logging_to(name, etcd, prefix, &args, env, log).await
        }
    };
    let mut limiter = start("limiter-svc", args(&[], 0)).await;
    let mut presence = start("presence-svc", args(&[], 1)).await;
    let router_flags = [
        "--limiter".to_owned(),
        limiter.addr.to_string(),
        "--presence".to_owned(),
        presence.addr.to_string(),
        "--allow-private-webhooks".to_owned(),
    ];
    let mut router = start("router-svc", args(&router_flags, 2)).await;

    let mut secrets = Secrets(Vec::new());
    secrets.add("the platform secret", PLATFORM_SECRET);
    let admin = Tokens::platform("*", &[Scope::Admin]);
    secrets.add_token("the admin token", &admin);
    let mut errors: Vec<String> = Vec::new();
    let mut record = |status: tonic::Status| {
        errors.push(format!("{status:?}"));
        status.code()
    };

    // An account key; its secret comes back once, and never from ListKeys.
    let mut keys = KeyServiceClient::new(channel(&presence));
    let created = keys
        .create_key(Tokens::request(
            &admin,
            ppb::CreateKeyRequest {
                account_id: "AC1".into(),
                description: "secrets test".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let key_id = created.key.unwrap().key_id;
    secrets.add("the account key secret", &created.secret);
    let listed = keys
        .list_keys(Tokens::request(&admin, ppb::ListKeysRequest::default()))
        .await
        .unwrap()
        .into_inner();
    assert!(listed.keys.iter().any(|k| k.key_id == key_id));
    secrets.assert_absent("ListKeys", &format!("{listed:?}"));
    assert!(
        !String::from_utf8_lossy(&listed.encode_to_vec()).contains(&created.secret),
        "the key secret is in ListKeys' bytes"
    );

    let alice = Tokens::signed(
        &key_id,
        &created.secret,
        "AC1",
        Some("alice"),
        &[Scope::PresenceRegister, Scope::PresenceRead],
        600,
    );
    secrets.add_token("alice's token", &alice);
    let account_admin = Tokens::signed(
        &key_id,
        &created.secret,
        "AC1",
        None,
        &[Scope::RouterAdmin, Scope::RouterRoute],
        600,
    );
    secrets.add_token("the account's router token", &account_admin);
    let presence_client = PresenceServiceClient::new(channel(&presence));
    poll_until(
        "the account key to reach presence",
        Duration::from_secs(5),
        || {
            let (mut client, token) = (presence_client.clone(), alice.clone());
            async move {
                let request = ppb::GetPresenceRequest {
                    identity: "alice".into(),
                    ..Default::default()
                };
                client
                    .get_presence(Tokens::request(&token, request))
                    .await
                    .ok()
                    .map(|_| ())
            }
        },
    )
    .await;
    let mut phone = Device {
        session: Session::hello(channel(&presence), &alice, "phone").await,
    };

    // An application fetched from a signed webhook; its signing secret is returned by
    // Put only.
    let webhook = WebhookServer::start(|_| {
        (
            200,
            "<Response><Dial timeout=\"10\"><Client>alice</Client></Dial></Response>".into(),
        )
    })
    .await;
    let mut routes = RouterServiceClient::new(channel(&router));
    let app = routes
        .put_application(Tokens::request(
            &account_admin,
            rpb::PutApplicationRequest {
                application: Some(rpb::Application {
                    account_id: "AC1".into(),
                    address: "+15550100".into(),
                    instructions_url: webhook.url("/voice"),
                    status_callback_url: webhook.url("/status"),
                    ..Default::default()
                }),
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .application
        .unwrap();
    secrets.add("the application's signing secret", &app.signing_secret);
    let read = routes
        .get_application(Tokens::request(
            &account_admin,
            rpb::GetApplicationRequest {
                account_id: "AC1".into(),
                address: "+15550100".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    secrets.assert_absent("GetApplication", &format!("{read:?}"));
    let listed = routes
        .list_applications(Tokens::request(
            &account_admin,
            rpb::ListApplicationsRequest {
                account_id: "AC1".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.applications.len(), 1);
    secrets.assert_absent("ListApplications", &format!("{listed:?}"));

    // A communication, connected and hung up.
    let route = tokio::spawn({
        let (mut routes, token) = (routes.clone(), account_admin.clone());
        async move {
            let request = rpb::RouteRequest {
                account_id: "AC1".into(),
                from: "+15551234".into(),
                to: "+15550100".into(),
                communication_id: "CM-secrets".into(),
                ..Default::default()
            };
            routes.route(Tokens::request(&token, request)).await
        }
    });
    let offer = phone.offer().await;
    phone
        .answer(&offer, true, ppb::RejectReason::Unspecified)
        .await;
    let comm = route
        .await
        .unwrap()
        .unwrap()
        .into_inner()
        .communication
        .unwrap();
    assert_eq!(comm.state, rpb::CommunicationState::Connected as i32);
    phone.hangup("CM-secrets").await;
    assert!(
        webhook
            .requests()
            .iter()
            .all(|r| !format!("{r:?}").contains(&app.signing_secret)),
        "the signing secret was sent to the webhook"
    );

    // Errors: forged, expired, foreign-account and malformed tokens, a missing scope, a
    // bad field, and the key disabled under a live token.
    let forged = Tokens::signed(
        &key_id,
        "not-the-account-secret-0123456789",
        "AC1",
        Some("alice"),
        &[Scope::PresenceRead],
        600,
    );
    secrets.add_token("a forged token", &forged);
    let expired = plumbing::auth::jwt::mint(
        &plumbing::auth::jwt::TokenRequest {
            key_id: &key_id,
            secret: created.secret.as_bytes(),
            account: "AC1",
            identity: Some("alice"),
            scopes: &[Scope::PresenceRead],
            ttl_secs: 60,
        },
        plumbing::auth::unix_now() - 600,
    )
    .unwrap();
    secrets.add_token("an expired token", &expired);
    let malformed = format!("{}.{}", alice, "trailing-garbage-in-a-token");
    secrets.add("a malformed token", &malformed);
    let get = |token: &str, identity: &str| {
        Tokens::request(
            token,
            ppb::GetPresenceRequest {
                identity: identity.into(),
                ..Default::default()
            },
        )
    };
    let mut client = presence_client.clone();
    for (token, expected) in [
        (&forged, Code::Unauthenticated),
        (&expired, Code::Unauthenticated),
        (&malformed, Code::Unauthenticated),
    ] {
        let status = client.get_presence(get(token, "alice")).await.unwrap_err();
        assert_eq!(record(status), expected);
    }
    let status = client
        .get_presence(get(&alice, "bad identity!"))
        .await
        .unwrap_err();
    assert_eq!(record(status), Code::InvalidArgument);
    let status = routes
        .put_application(Tokens::request(
            &alice,
            rpb::PutApplicationRequest { application: None },
        ))
        .await
        .unwrap_err();
    assert_eq!(record(status), Code::PermissionDenied);
    keys.disable_key(Tokens::request(
        &admin,
        ppb::DisableKeyRequest {
            key_id: key_id.clone(),
        },
    ))
    .await
    .unwrap();
    poll_until(
        "the disabled key to be refused",
        Duration::from_secs(5),
        || {
            let mut client = client.clone();
            let request = get(&alice, "alice");
            async move { client.get_presence(request).await.err() }
        },
    )
    .await;
    let status = client.get_presence(get(&alice, "alice")).await.unwrap_err();
    assert_eq!(record(status), Code::Unauthenticated);
    drop(phone);

    // Spans from every service, then stop them (their logs are complete at exit).
    poll_until(
        "spans of the three services",
        Duration::from_secs(10),
        || async {
            let exported = collector.exported.lock().unwrap().join("\n");
            ["limiter-svc", "presence-svc", "router-svc"]
                .iter()
                .all(|service| exported.contains(service))
                .then_some(())
        },
    )
    .await;
    let mut scraped = String::new();
    for address in &metrics {
        scraped.push_str(&scrape(*address).await);
    }
    for process in [&mut router, &mut presence, &mut limiter] {
        assert!(process.terminate().await.success());
    }
    let logged = std::fs::read_to_string(&log).unwrap();
    let exported = collector.exported.lock().unwrap().join("\n");
    let errors = errors.join("\n");

    // The places looked at are not empty: the scenario was logged, traced and counted.
    assert!(
        logged.lines().count() > 50 && logged.contains("DEBUG"),
        "debug logs were captured:\n{logged}"
    );
    assert!(exported.contains("Route"), "the Route was traced");
    assert!(scraped.contains("switchboard_requests_total"));
    assert_eq!(errors.lines().count(), 6);
    secrets.assert_absent("the services' logs", &logged);
    secrets.assert_absent("the exported spans", &exported);
    secrets.assert_absent("the metrics", &scraped);
    secrets.assert_absent("the errors returned", &errors);
}

#[tokio::test]
async fn account_keys_rotate_without_a_failed_call() {
    let etcd = Etcd::start().await;
    let prefix = unique_prefix();
    let a = crate::support::presence(&etcd, &prefix).await;
    let b = crate::support::presence(&etcd, &prefix).await;
    let replicas = [
        PresenceServiceClient::new(crate::support::channel(&a)),
        PresenceServiceClient::new(crate::support::channel(&b)),
    ];
    let mut keys = KeyServiceClient::new(crate::support::channel(&a));
    let admin = Tokens::platform("*", &[Scope::Admin]);
    let create = |keys: &mut KeyServiceClient<Channel>| {
        let mut keys = keys.clone();
        let admin = admin.clone();
        async move {
            let created = keys
                .create_key(Tokens::request(
                    &admin,
                    ppb::CreateKeyRequest {
                        account_id: "AC1".into(),
                        description: "rotation".into(),
                    },
                ))
                .await
                .unwrap()
                .into_inner();
            let key_id = created.key.unwrap().key_id;
            let token = Tokens::signed(
                &key_id,
                &created.secret,
                "AC1",
                None,
                &[Scope::PresenceRead],
                600,
            );
            (key_id, token)
        }
    };
    let read = |client: &PresenceServiceClient<Channel>, token: &str| {
        let mut client = client.clone();
        let request = Tokens::request(
            token,
            ppb::GetPresenceRequest {
                identity: "alice".into(),
                ..Default::default()
            },
        );
        async move { client.get_presence(request).await.map(|_| ()) }
    };
    let accepted_everywhere = |token: String| {
        let replicas = replicas.clone();
        async move {
            for replica in &replicas {
                read(replica, &token).await.ok()?;
            }
            Some(())
        }
    };

    let (old_key, old_token) = create(&mut keys).await;
    poll_until(
        "the old key on both replicas",
        Duration::from_secs(1),
        || accepted_everywhere(old_token.clone()),
    )
    .await;
    // Clients on the old key keep calling while the new key is introduced.
    let calling = |token: String| {
        let replicas = replicas.clone();
        let stop = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let (mut calls, mut failures) = (0u32, Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    let replica = &replicas[calls as usize % replicas.len()];
                    if let Err(status) = read(replica, &token).await {
                        failures.push(status.code());
                    }
                    calls += 1;
                }
                (calls, failures)
            }
        });
        (stop, task)
    };
    let (stop_old, old_calls) = calling(old_token.clone());
    let (new_key, new_token) = create(&mut keys).await;
    poll_until(
        "the new key on both replicas",
        Duration::from_secs(1),
        || accepted_everywhere(new_token.clone()),
    )
    .await;
    // Overlap: both keys are valid on both replicas.
    accepted_everywhere(old_token.clone())
        .await
        .expect("the old key is still valid during the overlap");
    stop_old.store(true, Ordering::Relaxed);
    let (calls, failures) = old_calls.await.unwrap();
    assert!(
        calls > 0 && failures.is_empty(),
        "old-key calls failed during the overlap: {failures:?}"
    );

    // Clients now on the new key; the old one is disabled under them.
    let (stop_new, new_calls) = calling(new_token.clone());
    keys.disable_key(Tokens::request(
        &admin,
        ppb::DisableKeyRequest {
            key_id: old_key.clone(),
        },
    ))
    .await
    .unwrap();
    poll_until(
        "the old key to be refused on both replicas",
        Duration::from_secs(1),
        || {
            let replicas = replicas.clone();
            let token = old_token.clone();
            async move {
                for replica in &replicas {
                    let status = read(replica, &token).await.err()?;
                    (status.code() == Code::Unauthenticated).then_some(())?;
                }
                Some(())
            }
        },
    )
    .await;
    stop_new.store(true, Ordering::Relaxed);
    let (calls, failures) = new_calls.await.unwrap();
    assert!(calls > 0, "new-key calls were made");
    assert!(
        failures.is_empty(),
        "new-key calls failed during the rotation: {failures:?}"
    );
    let listed = keys
        .list_keys(Tokens::request(&admin, ppb::ListKeysRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let state = |id: &str| {
        listed
            .keys
            .iter()
            .find(|k| k.key_id == id)
            .map(|k| k.disabled)
    };
    assert_eq!(
        (state(&old_key), state(&new_key)),
        (Some(true), Some(false))
    );
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

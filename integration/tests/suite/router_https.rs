//! https webhooks: instructions and status callbacks over TLS with certificates verified
//! against the system's roots plus `--webhook-ca`; an untrusted certificate or one for
//! another name is a webhook failure that goes to the fallback; connections are reused only
//! for the host name they were verified for; a bad `--webhook-ca` stops the start.

use integration::certs::TestCa;
use proto::router::v1 as pb;
use proto::router::v1::{Outcome, TimelineEventKind as Kind};
use router_svc::webhook::signature;

use crate::router_support::{
    Captured, Handshake, WebhookServer, World, auto_answering_device, outcome, poll_for, story,
};

fn xml(body: &str) -> (u16, String) {
    (200, body.to_owned())
}

/// A world whose router allows loopback webhooks and trusts `ca` for https webhooks.
async fn world_trusting(ca: &TestCa) -> World {
    let router_args = router_svc::RouterArgs {
        webhook_ca: Some(ca.ca_pem().to_owned()),
        ..router_svc::RouterArgs::default()
    };
    World::start_with_router(10, true, router_args).await
}

/// Asserts that `request`, received on `url_base` + its target, carries `secret`'s signature.
fn assert_signed(request: &Captured, url_base: &str, secret: &str) {
    let url = format!("{url_base}{}", request.target);
    let params = if request.method == "GET" {
        Vec::new()
    } else {
        request.params.clone()
    };
    assert_eq!(
        request.headers.get("x-switchboard-signature"),
        Some(&signature(secret, &url, &params)),
        "bad signature on {} {url}",
        request.method
    );
}

fn http11(server_name: Option<&str>) -> Handshake {
    Handshake {
        server_name: server_name.map(str::to_owned),
        alpn: Some("http/1.1".into()),
    }
}

#[tokio::test]
async fn signed_https_webhooks_drive_a_dial_and_signed_status_callbacks_follow() {
    let ca = TestCa::new("webhooks");
    let world = world_trusting(&ca).await;
    auto_answering_device(&world, "alice").await;
    let instructions = WebhookServer::start_tls(&ca.issue("instructions"), |request| match request
        .path()
    {
        "/voice" => xml("<Response><Dial timeout=\"5\"><Client>alice</Client></Dial></Response>"),
        _ => (404, String::new()),
    })
    .await;
    let callbacks =
        WebhookServer::start_tls(&ca.issue("callbacks"), |_| (204, String::new())).await;
    let app = world
        .put_app(pb::Application {
            address: "support".into(),
            instructions_url: instructions.localhost_url("/voice"),
            status_callback_url: callbacks.url("/status"),
            ..Default::default()
        })
        .await;
    let comm = world.router().route("support", "CM-https").await.unwrap();
    assert_eq!(
        comm.state,
        pb::CommunicationState::Connected as i32,
        "{}",
        story(&comm)
    );
    assert_eq!(comm.connected_identity, "alice");

    let fetched = instructions.requests();
    assert_eq!(fetched.len(), 1);
    assert_eq!(fetched[0].param("CommunicationSid"), Some("CM-https"));
    assert_eq!(
        fetched[0].headers.get("host").map(String::as_str),
        Some(format!("localhost:{}", instructions.addr.port()).as_str())
    );
    assert_signed(
        &fetched[0],
        &instructions.localhost_url(""),
        &app.signing_secret,
    );
    assert_eq!(
        instructions.handshakes(),
        vec![http11(Some("localhost"))],
        "SNI is the URL's host; ALPN http/1.1"
    );
    let webhook = comm
        .timeline
        .iter()
        .find(|e| e.kind == Kind::Webhook as i32)
        .expect("the webhook is in the timeline");
    assert_eq!(webhook.details["http_status"], "200");

    let connected = poll_for(&callbacks, "CommunicationStatus", "connected").await;
    assert_eq!(connected.param("ConnectedIdentity"), Some("alice"));
    world.router().hangup("CM-https").await.unwrap();
    let ended = poll_for(&callbacks, "CommunicationStatus", "ended").await;
    assert_eq!(ended.param("CommunicationSid"), Some("CM-https"));
    for request in callbacks.requests() {
        assert_eq!(request.method, "POST");
        assert_signed(&request, &callbacks.url(""), &app.signing_secret);
    }
}

#[tokio::test]
async fn an_untrusted_certificate_fails_over_to_the_http_fallback() {
    let ca = TestCa::new("webhooks");
    let rogue = TestCa::new("rogue");
    let world = world_trusting(&ca).await;
    let untrusted = WebhookServer::start_tls(&rogue.issue("impostor"), |_| {
        xml("<Response><Say>never read</Say></Response>")
    })
    .await;
    let fallback =
        WebhookServer::start(|_| xml("<Response><Reject reason=\"busy\"/></Response>")).await;
    let app = world
        .put_app(pb::Application {
            address: "support".into(),
            instructions_url: untrusted.url("/voice"),
            fallback_url: fallback.url("/fallback"),
            ..Default::default()
        })
        .await;
    let comm = world.router().route("support", "CM-rogue").await.unwrap();
    assert_eq!(outcome(&comm), Outcome::Busy, "{}", story(&comm));
    assert!(untrusted.requests().is_empty(), "nothing is sent to it");
    assert!(untrusted.handshakes().is_empty());
    let request = fallback.next().await;
    assert_signed(&request, &fallback.url(""), &app.signing_secret);

    let failed = comm
        .timeline
        .iter()
        .find(|e| e.kind == Kind::Webhook as i32 && e.details.contains_key("error"))
        .expect("the failed webhook is in the timeline");
    let error = &failed.details["error"];
    assert!(
        error.contains("TLS handshake with `127.0.0.1` failed")
            && error.contains("not signed by a trusted CA"),
        "{error}"
    );
    let story = story(&comm);
    assert!(story.contains("asking the fallback URL"), "{story}");
    assert!(!story.contains(&app.signing_secret), "no secret: {story}");
}

#[tokio::test]
async fn a_certificate_for_another_name_fails_over_to_the_https_fallback() {
    let ca = TestCa::new("webhooks");
    let world = world_trusting(&ca).await;
    // Trusted, but issued for localhost and 127.0.0.1 while the URL names 127.0.0.2.
    let misnamed =
        WebhookServer::start_tls_on([127, 0, 0, 2].into(), &ca.issue("misnamed"), |_| {
            xml("<Response><Say>never read</Say></Response>")
        })
        .await;
    let fallback = WebhookServer::start_tls(&ca.issue("fallback"), |_| {
        xml("<Response><Reject reason=\"busy\"/></Response>")
    })
    .await;
    let app = world
        .put_app(pb::Application {
            address: "support".into(),
            instructions_url: misnamed.url("/voice"),
            fallback_url: fallback.url("/fallback"),
            ..Default::default()
        })
        .await;
    let comm = world.router().route("support", "CM-name").await.unwrap();
    assert_eq!(outcome(&comm), Outcome::Busy, "{}", story(&comm));
    assert!(misnamed.requests().is_empty(), "nothing is sent to it");
    let request = fallback.next().await;
    assert_signed(&request, &fallback.url(""), &app.signing_secret);
    let story = story(&comm);
    assert!(
        story.contains("TLS handshake with `127.0.0.2` failed")
            && story.contains("not valid for this host name")
            && story.contains("asking the fallback URL"),
        "{story}"
    );
}

#[tokio::test]
async fn an_https_connection_is_reused_only_for_its_host_name() {
    let ca = TestCa::new("webhooks");
    let world = world_trusting(&ca).await;
    // /first redirects to the same address by name, which redirects back to the IP.
    let server = WebhookServer::start_tls(&ca.issue("instructions"), |request| {
        let port = request.headers["host"]
            .rsplit(':')
            .next()
            .unwrap()
            .to_owned();
        let next = match request.path() {
            "/first" => format!("https://localhost:{port}/by-name"),
            "/by-name" => format!("https://127.0.0.1:{port}/again"),
            _ => return xml("<Response><Reject reason=\"busy\"/></Response>"),
        };
        xml(&format!("<Response><Redirect>{next}</Redirect></Response>"))
    })
    .await;
    world
        .put_app(pb::Application {
            address: "support".into(),
            instructions_url: server.url("/first"),
            ..Default::default()
        })
        .await;
    let comm = world.router().route("support", "CM-reuse").await.unwrap();
    assert_eq!(outcome(&comm), Outcome::Busy, "{}", story(&comm));
    let paths: Vec<String> = server
        .requests()
        .iter()
        .map(|r| r.path().to_owned())
        .collect();
    assert_eq!(paths, ["/first", "/by-name", "/again"]);
    // One address, two names: the IP's connection (no SNI) is not used for `localhost`,
    // which gets its own handshake, and is used again for the IP.
    assert_eq!(
        server.handshakes(),
        vec![http11(None), http11(Some("localhost"))]
    );
}

#[tokio::test]
async fn an_unusable_webhook_ca_stops_the_start_naming_the_flag() {
    let dir = tempfile::tempdir().unwrap();
    let not_a_ca = dir.path().join("not-a-ca.pem");
    std::fs::write(&not_a_ca, "just text\n").unwrap();
    for path in [dir.path().join("missing.pem"), not_a_ca] {
        let router_args = router_svc::RouterArgs {
            webhook_ca: Some(path.clone()),
            ..router_svc::RouterArgs::default()
        };
        // Refused before etcd is contacted: nothing listens on the etcd endpoint.
        let args = router_svc::ServeArgs {
            listen: "127.0.0.1:0".parse().unwrap(),
            presence: "127.0.0.1:1".into(),
            allow_private_webhooks: true,
            guard: plumbing::guard::GuardArgs {
                limiter: None,
                guard_fail_closed: false,
            },
            common: integration::common_args_for(vec!["http://127.0.0.1:1".into()], "unused"),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let err = router_svc::run_with(args, router_args, listener, std::future::pending())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("--webhook-ca"), "{err}");
        assert!(err.contains(&path.display().to_string()), "{err}");
    }
}

//! Instructions from webhooks: signatures, the fallback, Dial actions, redirects and their
//! loop limit, hostile and huge documents, status callbacks, and the SSRF guard.

use std::time::Duration;

use etcd_client::PutOptions;
use proto::router::v1 as pb;
use proto::router::v1::{Outcome, TimelineEventKind as Kind};
use router_svc::webhook::signature;

use crate::router_support::{ACCOUNT, Captured, WebhookServer, World, kinds, outcome, story};

fn xml(body: &str) -> (u16, String) {
    (200, body.to_owned())
}

/// Asserts that `request` carries the signature of `secret` over `base` + its path.
fn assert_signed(request: &Captured, server: &WebhookServer, secret: &str) {
    let (url, params) = if request.method == "GET" {
        (server.url(&request.target), Vec::new())
    } else {
        (server.url(&request.target), request.params.clone())
    };
    let expected = signature(secret, &url, &params);
    assert_eq!(
        request.headers.get("x-switchboard-signature"),
        Some(&expected),
        "bad signature on {} {}",
        request.method,
        request.target
    );
    assert_ne!(
        signature("wrong-secret-0123456789", &url, &params),
        expected
    );
}

#[tokio::test]
async fn signed_webhooks_drive_the_dial_and_its_action() {
    let world = World::start(10).await;
    let server = WebhookServer::start(|request| match request.path() {
        "/voice" => xml("<Response><Say>Hi</Say><Dial timeout=\"5\" action=\"after?step=2\"><Client>alice</Client></Dial></Response>"),
        "/after" => xml("<Response><Reject reason=\"busy\"/></Response>"),
        _ => (404, String::new()),
    })
    .await;
    let app = world
        .put_app(pb::Application {
            address: "support".into(),
            instructions_url: server.url("/voice"),
            ..Default::default()
        })
        .await;
    assert!(app.signing_secret.len() >= 16, "a secret is generated");
    let comm = world.router().route("support", "CM-hook").await.unwrap();
    assert_eq!(outcome(&comm), Outcome::Busy, "{}", story(&comm));
    let requests = server.requests();
    assert_eq!(requests.len(), 2);
    let first = &requests[0];
    assert_eq!(first.method, "POST");
    assert_eq!(
        first.headers.get("content-type").map(String::as_str),
        Some("application/x-www-form-urlencoded")
    );
    for (name, value) in [
        ("AccountSid", ACCOUNT),
        ("CommunicationSid", "CM-hook"),
        ("From", "+15550100"),
        ("To", "support"),
        ("Channel", "voice"),
        ("Direction", "inbound"),
    ] {
        assert_eq!(first.param(name), Some(value), "{name}");
    }
    let action = &requests[1];
    assert_eq!(
        action.target, "/after?step=2",
        "relative action resolved against the webhook"
    );
    assert_eq!(action.param("DialStatus"), Some("offline"));
    assert_eq!(action.param("DialedIdentity"), Some(""));
    assert_eq!(action.param("DialDuration"), Some("0"));
    for request in &requests {
        assert_signed(request, &server, &app.signing_secret);
    }
    let webhooks: Vec<_> = comm
        .timeline
        .iter()
        .filter(|e| e.kind == Kind::Webhook as i32)
        .collect();
    assert_eq!(webhooks.len(), 2);
    assert_eq!(webhooks[0].details["http_status"], "200");
    assert!(webhooks[0].details.contains_key("duration_ms"));
}

#[tokio::test]
async fn get_webhooks_carry_the_parameters_in_the_signed_query() {
    let world = World::start(10).await;
    let server = WebhookServer::start(|_| xml("<Response><Hangup/></Response>")).await;
    let app = world
        .put_app(pb::Application {
            address: "support".into(),
            instructions_url: server.url("/voice?x=1"),
            method: pb::HttpMethod::Get as i32,
            ..Default::default()
        })
        .await;
    let comm = world.router().route("support", "CM-get").await.unwrap();
    assert_eq!(
        outcome(&comm),
        Outcome::Rejected,
        "ended without dialling: {}",
        story(&comm)
    );
    let request = server.next().await;
    assert_eq!(request.method, "GET");
    assert_eq!(request.param("x"), Some("1"));
    assert_eq!(request.param("From"), Some("+15550100"));
    assert_signed(&request, &server, &app.signing_secret);
}

#[tokio::test]
async fn failing_instructions_go_to_the_fallback_and_then_fail() {
    let world = World::start(10).await;
    let server = WebhookServer::start(|request| match request.path() {
        "/error" => (500, "oops".into()),
        "/unknown-verb" => xml("<Response><Play>music.mp3</Play></Response>"),
        "/fallback" => xml("<Response><Say>Fallback</Say><Hangup/></Response>"),
        _ => (404, String::new()),
    })
    .await;
    let router = world.router();
    for (address, primary) in [("a500", "/error"), ("averb", "/unknown-verb")] {
        world
            .put_app(pb::Application {
                address: address.into(),
                instructions_url: server.url(primary),
                fallback_url: server.url("/fallback"),
                ..Default::default()
            })
            .await;
        let comm = router
            .route(address, &format!("CM-{address}"))
            .await
            .unwrap();
        assert!(
            story(&comm).contains("asking the fallback URL"),
            "{}",
            story(&comm)
        );
        assert!(story(&comm).contains("Say: Fallback"), "{}", story(&comm));
        assert_eq!(outcome(&comm), Outcome::Rejected);
    }
    let comm = router.get("CM-averb").await.unwrap();
    assert!(
        story(&comm).contains("unknown verb <Play>"),
        "{}",
        story(&comm)
    );
    world
        .put_app(pb::Application {
            address: "both".into(),
            instructions_url: server.url("/error"),
            fallback_url: server.url("/missing"),
            ..Default::default()
        })
        .await;
    let comm = router.route("both", "CM-both").await.unwrap();
    assert_eq!(outcome(&comm), Outcome::Failed);
    assert!(
        story(&comm).contains("answered HTTP 500"),
        "{}",
        story(&comm)
    );
    assert!(
        story(&comm).contains("the fallback failed too"),
        "{}",
        story(&comm)
    );
    assert!(story(&comm).contains("HTTP 404"), "{}", story(&comm));
    world.slots_freed(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn hostile_and_huge_documents_fail_safely() {
    let world = World::start(10).await;
    let laughs = r#"<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;"><!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">]><Response><Say>&c;</Say></Response>"#;
    let server = WebhookServer::start(move |request| match request.path() {
        "/laughs" => xml(laughs),
        "/external" => xml(r#"<!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]><Response><Say>&x;</Say></Response>"#),
        "/deep" => xml(&format!("<Response>{}{}</Response>", "<Say>".repeat(5000), "</Say>".repeat(5000))),
        "/huge" => xml(&format!("<Response><Say>{}</Say></Response>", "x".repeat(10 * 1024 * 1024))),
        "/malformed" => xml("<Response><Dial><Client>alice</Dial></Response>"),
        _ => (404, String::new()),
    })
    .await;
    let router = world.router();
    for (path, says) in [
        ("/laughs", "DOCTYPE"),
        ("/external", "DOCTYPE"),
        ("/deep", "deeper than 8"),
        ("/huge", "exceeds 65536 bytes"),
        ("/malformed", "malformed XML"),
    ] {
        let address = path.trim_start_matches('/');
        world
            .put_app(pb::Application {
                address: address.into(),
                instructions_url: server.url(path),
                ..Default::default()
            })
            .await;
        let comm = router
            .route(address, &format!("CM-{address}"))
            .await
            .unwrap();
        assert_eq!(outcome(&comm), Outcome::Failed, "{path}");
        assert!(story(&comm).contains(says), "{path}: {}", story(&comm));
    }
    // Inline instructions are checked when the application is stored.
    for document in [laughs, "<Response><Dial>", "<Response><Nope/></Response>"] {
        let refused = router
            .put(pb::Application {
                address: "inline".into(),
                instructions: document.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument);
        assert!(
            refused.message().starts_with("application.instructions"),
            "{}",
            refused.message()
        );
    }
    // The router is unharmed.
    world.inline("ok", "<Response><Reject/></Response>").await;
    assert_eq!(
        outcome(&router.route("ok", "CM-ok").await.unwrap()),
        Outcome::Rejected
    );
}

#[tokio::test]
async fn a_redirect_loop_is_cut_after_the_limit() {
    let world = World::start(10).await;
    let server = WebhookServer::start(|_| {
        xml("<Response><Say>again</Say><Redirect>/loop</Redirect></Response>")
    })
    .await;
    world
        .put_app(pb::Application {
            address: "loop".into(),
            instructions_url: server.url("/loop"),
            ..Default::default()
        })
        .await;
    let comm = world.router().route("loop", "CM-loop").await.unwrap();
    assert_eq!(outcome(&comm), Outcome::Failed);
    assert!(
        story(&comm).contains("more than 10 redirects"),
        "{}",
        story(&comm)
    );
    assert_eq!(
        server.requests().len(),
        11,
        "the first request and ten redirects"
    );
    assert_eq!(*kinds(&comm).last().unwrap(), Kind::Ended);
}

#[tokio::test]
async fn status_callbacks_are_signed_and_report_each_state() {
    let world = World::start(10).await;
    let server = WebhookServer::start(|_| (204, String::new())).await;
    let app = world
        .put_app(pb::Application {
            address: "support".into(),
            instructions:
                "<Response><Dial timeout=\"1\"><Client>nobody</Client></Dial><Reject/></Response>"
                    .into(),
            status_callback_url: server.url("/status"),
            ..Default::default()
        })
        .await;
    world.router().route("support", "CM-status").await.unwrap();
    let ended = crate::router_support::poll_for(&server, "CommunicationStatus", "ended").await;
    assert_eq!(
        ended.param("Outcome"),
        Some("rejected"),
        "the Reject after the offline Dial decides"
    );
    assert_eq!(ended.param("CommunicationSid"), Some("CM-status"));
    for request in server.requests() {
        assert_signed(&request, &server, &app.signing_secret);
    }
}

#[tokio::test]
async fn private_webhook_targets_are_refused_unless_allowed() {
    let world = World::start_with(10, false).await;
    let router = world.router();
    for url in [
        "http://127.0.0.1:9/x",
        "http://localhost/x",
        "http://169.254.169.254/latest",
        "http://[::1]/",
        "http://10.0.0.1/",
    ] {
        let refused = router
            .put(pb::Application {
                address: "support".into(),
                instructions_url: url.into(),
                ..Default::default()
            })
            .await
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{url}");
        assert!(
            refused.message().contains("--allow-private-webhooks"),
            "{}",
            refused.message()
        );
    }
    // An application stored by other means is still refused when the webhook is requested:
    // the guard checks the address the request would go to.
    let server = WebhookServer::start(|_| xml("<Response><Hangup/></Response>")).await;
    let record = serde_json::json!({
        "instructions_url": server.url("/voice"),
        "method": "POST",
        "signing_secret": "0123456789abcdef0123",
        "create_ms": 0,
        "update_ms": 0,
    });
    let mut etcd = world.etcd.client().await;
    let key = format!("{}/router/apps/{ACCOUNT}/sneaky", world.prefix);
    etcd.put(key, record.to_string(), None::<PutOptions>)
        .await
        .unwrap();
    // Route finds it even before the router's copy has: a miss there is read from etcd.
    let comm = router.route("sneaky", "CM-ssrf").await.unwrap();
    assert_eq!(outcome(&comm), Outcome::Failed);
    assert!(story(&comm).contains("non-public"), "{}", story(&comm));
    assert!(
        server.requests().is_empty(),
        "no request reached the private address"
    );
}

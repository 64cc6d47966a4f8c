//! Bad input to presence: INVALID_ARGUMENT naming the field and the rule, nothing written,
//! and the service unharmed (invariant 5).

use integration::{Etcd, Tokens, unique_prefix};
use plumbing::auth::Scope;
use proto::presence::v1 as pb;
use proto::presence::v1::connect_request::Kind as Send;
use proto::presence::v1::offer_request::Kind as Ask;
use proto::presence::v1::presence_service_client::PresenceServiceClient;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::presence_support::{Leg, Session, Tenant, client, presence_of, register, start};
use crate::support;

async fn etcd_revision(etcd: &Etcd) -> i64 {
    let mut client = etcd.client().await;
    let response = client.get("probe", None).await.unwrap();
    response.header().unwrap().revision()
}

fn expect_invalid(case: &str, result: Result<(), Status>, field: &str) {
    let status = result.expect_err(case);
    assert_eq!(status.code(), Code::InvalidArgument, "{case}: {status:?}");
    assert!(
        status.message().starts_with(field),
        "{case}: message {:?} does not start with {field:?}",
        status.message()
    );
}

fn registration(identity: &str, device_id: &str) -> pb::RegisterRequest {
    pb::RegisterRequest {
        identity: identity.into(),
        device_id: device_id.into(),
        ..Default::default()
    }
}

async fn try_register(
    client: &PresenceServiceClient<Channel>,
    token: &str,
    request: pb::RegisterRequest,
) -> Result<(), Status> {
    register(client, token, request).await.map(|_| ())
}

#[tokio::test]
async fn every_bad_request_field_is_invalid_argument_naming_it_and_changes_nothing() {
    let etcd = Etcd::start().await;
    let server = support::presence(&etcd, &unique_prefix()).await;
    let tenant = Tenant::create(&server, "AC1").await;
    let alice = tenant.device("alice");
    let admin = tenant.token(None, &[Scope::Admin]);
    let platform = Tokens::platform("*", &[Scope::Admin]);
    let presence = client(&server);
    let mut rpc = presence.clone();
    let before = etcd_revision(&etcd).await;

    let with = |edit: fn(&mut pb::RegisterRequest)| {
        let mut request = registration("", "d1");
        edit(&mut request);
        request
    };
    let register_cases: Vec<(&str, &str, pb::RegisterRequest, &str)> = vec![
        (
            "identity too long",
            &admin,
            registration(&"a".repeat(257), "d1"),
            "identity: must be at most 256",
        ),
        (
            "identity charset",
            &admin,
            registration("al ice", "d1"),
            "identity: may only contain",
        ),
        (
            "identity missing",
            &admin,
            registration("", "d1"),
            "identity: required",
        ),
        (
            "device_id charset",
            &alice,
            registration("", "a/b"),
            "device_id: may only contain",
        ),
        (
            "device_id too long",
            &alice,
            registration("", &"d".repeat(129)),
            "device_id: must be at most 128",
        ),
        (
            "unknown status",
            &alice,
            with(|r| r.status = 99),
            "status: unknown value 99",
        ),
        (
            "offline status",
            &alice,
            with(|r| r.status = pb::Status::Offline as i32),
            "status: a device cannot set itself offline",
        ),
        (
            "ttl too short",
            &alice,
            with(|r| r.ttl_seconds = 4),
            "ttl_seconds: must be from 5 to 3600",
        ),
        (
            "ttl too long",
            &alice,
            with(|r| r.ttl_seconds = 3601),
            "ttl_seconds: must be from 5 to 3600",
        ),
        (
            "too many attributes",
            &alice,
            with(|r| r.attributes = (0..33).map(|i| (format!("k{i}"), String::new())).collect()),
            "attributes: at most 32 entries",
        ),
        (
            "attributes too big",
            &alice,
            with(|r| {
                r.attributes = (0..20)
                    .map(|i| (format!("k{i}"), "v".repeat(250)))
                    .collect()
            }),
            "attributes: keys and values must total",
        ),
        (
            "attribute key charset",
            &alice,
            with(|r| r.attributes = [("bad key".to_owned(), String::new())].into()),
            "attributes key: may only contain",
        ),
        (
            "attribute value too long",
            &alice,
            with(|r| r.attributes = [("k".to_owned(), "v".repeat(257))].into()),
            "attributes[k]: must be at most 256",
        ),
        (
            "contact too long",
            &alice,
            with(|r| r.contact = "c".repeat(1025)),
            "contact: must be at most 1024",
        ),
        (
            "platform without account",
            &platform,
            registration("alice", "d1"),
            "account_id: required with a platform token",
        ),
        (
            "account charset",
            &platform,
            with(|r| {
                r.account_id = "a/b".into();
                r.identity = "alice".into()
            }),
            "account_id: may only contain",
        ),
    ];
    for (case, token, request, field) in register_cases {
        expect_invalid(case, try_register(&presence, token, request).await, field);
    }

    let device_only = |device_id: &str| pb::HeartbeatRequest {
        device_id: device_id.into(),
        ..Default::default()
    };
    let result = rpc
        .heartbeat(Tokens::request(&alice, device_only("")))
        .await;
    expect_invalid(
        "heartbeat without device",
        result.map(|_| ()),
        "device_id: must not be empty",
    );
    let update = pb::UpdateStatusRequest {
        device_id: "d1".into(),
        status: 42,
        ..Default::default()
    };
    let result = rpc.update_status(Tokens::request(&alice, update)).await;
    expect_invalid(
        "update unknown status",
        result.map(|_| ()),
        "status: unknown value 42",
    );
    let update = pb::UpdateStatusRequest {
        device_id: "d1".into(),
        attributes: (0..40).map(|i| (format!("k{i}"), String::new())).collect(),
        ..Default::default()
    };
    let result = rpc.update_status(Tokens::request(&alice, update)).await;
    expect_invalid(
        "update too many attributes",
        result.map(|_| ()),
        "attributes: at most 32",
    );
    let unregister = pb::UnregisterRequest {
        device_id: "bad id".into(),
        ..Default::default()
    };
    let result = rpc.unregister(Tokens::request(&alice, unregister)).await;
    expect_invalid(
        "unregister bad device",
        result.map(|_| ()),
        "device_id: may only contain",
    );

    let get = |identity: &str, min_revision: i64| pb::GetPresenceRequest {
        identity: identity.into(),
        min_revision,
        ..Default::default()
    };
    let result = rpc.get_presence(Tokens::request(&alice, get("", 0))).await;
    expect_invalid(
        "get without identity",
        result.map(|_| ()),
        "identity: must not be empty",
    );
    let result = rpc
        .get_presence(Tokens::request(&alice, get("alice", -1)))
        .await;
    expect_invalid(
        "negative min_revision",
        result.map(|_| ()),
        "min_revision: must not be negative",
    );

    let batch = |identities: Vec<String>| pb::BatchGetPresenceRequest {
        identities,
        ..Default::default()
    };
    let result = rpc
        .batch_get_presence(Tokens::request(&alice, batch(vec![])))
        .await;
    expect_invalid(
        "empty batch",
        result.map(|_| ()),
        "identities: must name at least one",
    );
    let many = (0..1001).map(|i| format!("u{i}")).collect();
    let result = rpc
        .batch_get_presence(Tokens::request(&alice, batch(many)))
        .await;
    expect_invalid(
        "batch too big",
        result.map(|_| ()),
        "identities: at most 1000",
    );
    let one_bad = vec!["ok".to_owned(), "not ok".to_owned()];
    let result = rpc
        .batch_get_presence(Tokens::request(&alice, batch(one_bad)))
        .await;
    expect_invalid(
        "batch bad entry",
        result.map(|_| ()),
        "identities[1]: may only contain",
    );

    let list = |edit: fn(&mut pb::ListPresenceRequest)| {
        let mut request = pb::ListPresenceRequest::default();
        edit(&mut request);
        request
    };
    for (case, request, field) in [
        (
            "negative page",
            list(|r| r.page_size = -1),
            "page_size: must not be negative",
        ),
        (
            "unknown filter",
            list(|r| r.status = 7),
            "status: unknown value 7",
        ),
        (
            "forged page token",
            list(|r| r.page_token = "Zm9v".into()),
            "page_token:",
        ),
    ] {
        let result = rpc.list_presence(Tokens::request(&alice, request)).await;
        expect_invalid(case, result.map(|_| ()), field);
    }

    let watch = |edit: fn(&mut pb::WatchPresenceRequest)| {
        let mut request = pb::WatchPresenceRequest::default();
        edit(&mut request);
        request
    };
    for (case, request, field) in [
        (
            "negative start",
            watch(|r| r.start_revision = -1),
            "start_revision: must not be negative",
        ),
        (
            "snapshot and start",
            watch(|r| {
                r.snapshot = true;
                r.start_revision = 5
            }),
            "start_revision: must be 0 when snapshot is true",
        ),
        (
            "bad identity",
            watch(|r| r.identities = vec!["x/y".into()]),
            "identities[0]: may only contain",
        ),
    ] {
        let result = rpc.watch_presence(Tokens::request(&alice, request)).await;
        expect_invalid(case, result.map(|_| ()), field);
    }

    assert_eq!(
        etcd_revision(&etcd).await,
        before,
        "a refused request wrote to etcd"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_connect_messages_are_invalid_argument_and_end_the_session() {
    let etcd = Etcd::start().await;
    let server = support::presence(&etcd, &unique_prefix()).await;
    let tenant = Tenant::create(&server, "AC1").await;
    let alice = tenant.device("alice");
    let channel = support::channel(&server);

    // A first message other than hello.
    let (sender, requests) = mpsc::channel(1);
    sender
        .send(pb::ConnectRequest {
            kind: Some(Send::Status(pb::ConnectStatus::default())),
        })
        .await
        .unwrap();
    let result = PresenceServiceClient::new(channel.clone())
        .connect(Tokens::request(&alice, ReceiverStream::new(requests)))
        .await;
    expect_invalid(
        "status first",
        result.map(|_| ()),
        "hello: the first message on the stream must be `hello`",
    );

    let hello = pb::ConnectHello {
        status: 77,
        ..Default::default()
    };
    let result = Session::open(channel.clone(), &alice, hello).await;
    expect_invalid(
        "hello status",
        result.map(|_| ()),
        "hello.status: unknown value 77",
    );
    let hello = pb::ConnectHello {
        device_id: "not/valid".into(),
        ..Default::default()
    };
    let result = Session::open(channel.clone(), &alice, hello).await;
    expect_invalid(
        "hello device",
        result.map(|_| ()),
        "hello.device_id: may only contain",
    );

    let later: Vec<(&str, Option<Send>, &str)> = vec![
        (
            "second hello",
            Some(Send::Hello(pb::ConnectHello::default())),
            "hello: may only be sent once",
        ),
        (
            "offline status",
            Some(Send::Status(pb::ConnectStatus {
                status: pb::Status::Offline as i32,
                ..Default::default()
            })),
            "status.status: a device cannot set itself offline",
        ),
        ("empty message", None, "kind: exactly one of"),
        (
            "answer without offer",
            Some(Send::Answer(pb::ConnectAnswer::default())),
            "answer.offer_id: must not be empty",
        ),
        (
            "hangup without communication",
            Some(Send::Hangup(pb::ConnectHangup::default())),
            "hangup.communication_id: must not be empty",
        ),
        (
            "answer with an unknown decline scope",
            Some(Send::Answer(pb::ConnectAnswer {
                offer_id: "o1".into(),
                scope: 9,
                ..Default::default()
            })),
            "answer.scope: unknown value 9",
        ),
        (
            "ringing without offer",
            Some(Send::Ringing(pb::ConnectRinging::default())),
            "ringing.offer_id: must not be empty",
        ),
    ];
    let presence = client(&server);
    for (case, message, field) in later {
        let mut session = Session::hello(channel.clone(), &alice, "phone").await;
        match message {
            Some(kind) => session.send(kind).await,
            None => session.send_empty().await,
        }
        let status = session.end().await.expect(case);
        expect_invalid(case, Err(status), field);
        let now = presence_of(&presence, &alice, "alice", 0).await;
        // The session is over, so the device has left (or is leaving).
        assert!(now.devices.len() <= 1, "{case}");
    }
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_offer_requests_are_invalid_argument() {
    let etcd = Etcd::start().await;
    let server = support::presence(&etcd, &unique_prefix()).await;
    let tenant = Tenant::create(&server, "AC1").await;
    let alice = tenant.device("alice");
    let _device = Session::hello(support::channel(&server), &alice, "phone").await;
    let channel = support::channel(&server);
    let cases: Vec<(&str, pb::OfferStart, &str)> = vec![
        (
            "no account",
            start("", "alice", "phone", "of-1"),
            "start.account_id: required",
        ),
        (
            "bad identity",
            start("AC1", "a b", "phone", "of-1"),
            "start.identity: may only contain",
        ),
        (
            "no device",
            start("AC1", "alice", "", "of-1"),
            "start.device_id: must not be empty",
        ),
        (
            "bad offer id",
            start("AC1", "alice", "phone", "of 1"),
            "start.offer_id: may only contain",
        ),
        (
            "too many parameters",
            {
                let mut s = start("AC1", "alice", "phone", "of-1");
                s.parameters = (0..65).map(|i| (format!("p{i}"), String::new())).collect();
                s
            },
            "start.parameters: at most 64 entries",
        ),
    ];
    for (case, start, field) in cases {
        let result = Leg::offer(channel.clone(), start).await;
        expect_invalid(case, result.map(|_| ()), field);
    }
    let mut leg = Leg::offer(channel, start("AC1", "alice", "phone", "of-1"))
        .await
        .unwrap();
    assert!(leg.next().await.is_some());
    leg.send(Ask::Cancel(pb::OfferCancel { reason: 0 })).await;
    let status = loop {
        match leg.try_next().await {
            Ok(Some(_)) => continue,
            Ok(None) => panic!("leg ended without the error"),
            Err(status) => break status,
        }
    };
    expect_invalid("unspecified cancel reason", Err(status), "cancel.reason:");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn oversized_messages_are_refused_and_the_service_keeps_serving() {
    let etcd = Etcd::start().await;
    let server = support::presence(&etcd, &unique_prefix()).await;
    let tenant = Tenant::create(&server, "AC1").await;
    let alice = tenant.device("alice");
    let presence = client(&server);
    let mut huge = registration("", "d1");
    huge.contact = "x".repeat(1024 * 1024);
    let status = register(&presence, &alice, huge).await.unwrap_err();
    assert!(
        matches!(status.code(), Code::OutOfRange | Code::ResourceExhausted),
        "{status:?}"
    );
    // The largest legitimate batch still fits.
    let batch = pb::BatchGetPresenceRequest {
        identities: (0..1000).map(|i| format!("{i:0>256}")).collect(),
        ..Default::default()
    };
    let answer = presence
        .clone()
        .batch_get_presence(Tokens::request(&alice, batch))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(answer.presences.len(), 1000);
    register(&presence, &alice, registration("", "d1"))
        .await
        .unwrap();
    server.shutdown().await.unwrap();
}

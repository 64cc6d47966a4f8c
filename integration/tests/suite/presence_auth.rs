//! Tokens and tenants on presence: scopes, one's own identity and account, account
//! isolation in reads, writes and watches (invariant 4), and token failures.

use integration::{Etcd, PLATFORM_KEY_ID, Tokens, unique_prefix};
use plumbing::auth::Scope;
use proto::presence::v1 as pb;
use proto::presence::v1::watch_presence_response::Event;
use tonic::Code;

use crate::presence_support::{STEP, Session, Tenant, client, presence_of, register};
use crate::support;

fn denied(case: &str, status: tonic::Status, needle: &str) {
    assert_eq!(status.code(), Code::PermissionDenied, "{case}: {status:?}");
    assert!(
        status.message().contains(needle),
        "{case}: {:?} lacks {needle:?}",
        status.message()
    );
}

fn device(identity: &str, device_id: &str) -> pb::RegisterRequest {
    pb::RegisterRequest {
        identity: identity.into(),
        device_id: device_id.into(),
        ..Default::default()
    }
}

#[tokio::test]
async fn presence_rpcs_need_their_scope() {
    let etcd = Etcd::start().await;
    let server = support::presence(&etcd, &unique_prefix()).await;
    let tenant = Tenant::create(&server, "AC1").await;
    let reader = tenant.token(Some("alice"), &[Scope::PresenceRead]);
    let writer = tenant.token(Some("alice"), &[Scope::PresenceRegister]);
    let mut rpc = client(&server);

    let status = register(&rpc, &reader, device("", "d1")).await.unwrap_err();
    denied("register", status, "lacks scope `presence.register`");
    let request = pb::HeartbeatRequest {
        device_id: "d1".into(),
        ..Default::default()
    };
    let status = rpc
        .heartbeat(Tokens::request(&reader, request))
        .await
        .unwrap_err();
    denied("heartbeat", status, "presence.register");
    let hello = pb::ConnectHello::default();
    let status = Session::open(support::channel(&server), &reader, hello)
        .await
        .unwrap_err();
    denied("connect", status, "presence.register");

    let get = pb::GetPresenceRequest {
        identity: "alice".into(),
        ..Default::default()
    };
    let status = rpc
        .get_presence(Tokens::request(&writer, get))
        .await
        .unwrap_err();
    denied("get", status, "lacks scope `presence.read`");
    let status = rpc
        .list_presence(Tokens::request(&writer, pb::ListPresenceRequest::default()))
        .await
        .unwrap_err();
    denied("list", status, "presence.read");
    let status = rpc
        .watch_presence(Tokens::request(
            &writer,
            pb::WatchPresenceRequest::default(),
        ))
        .await
        .unwrap_err();
    denied("watch", status, "presence.read");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_device_token_acts_only_for_its_own_identity_and_account() {
    let etcd = Etcd::start().await;
    let server = support::presence(&etcd, &unique_prefix()).await;
    let tenant = Tenant::create(&server, "AC1").await;
    let alice = tenant.device("alice");
    let mut rpc = client(&server);
    let bobs = register(&rpc, &tenant.device("bob"), device("", "desk"))
        .await
        .unwrap();

    let status = register(&rpc, &alice, device("bob", "d1"))
        .await
        .unwrap_err();
    denied("register as bob", status, "may not act for identity `bob`");
    let request = pb::UnregisterRequest {
        identity: "bob".into(),
        device_id: "desk".into(),
        ..Default::default()
    };
    let status = rpc
        .unregister(Tokens::request(&alice, request))
        .await
        .unwrap_err();
    denied("unregister bob's device", status, "identity `bob`");
    let hello = pb::ConnectHello {
        identity: "bob".into(),
        ..Default::default()
    };
    let status = Session::open(support::channel(&server), &alice, hello)
        .await
        .unwrap_err();
    denied("connect as bob", status, "identity `bob`");
    let mut request = device("", "d1");
    request.account_id = "AC2".into();
    let status = register(&rpc, &alice, request).await.unwrap_err();
    denied("register in AC2", status, "may not act on account `AC2`");
    // A token without an identity claim needs admin (or the platform key) to name one.
    let anonymous = tenant.token(None, &[Scope::PresenceRegister]);
    let status = register(&rpc, &anonymous, device("bob", "d1"))
        .await
        .unwrap_err();
    denied("anonymous", status, "identity `bob`");

    let still = presence_of(&rpc, &alice, "bob", bobs.revision).await;
    assert_eq!(still.devices.len(), 1, "bob's device was touched");

    let admin = tenant.token(None, &[Scope::Admin]);
    register(&rpc, &admin, device("bob", "d2")).await.unwrap();
    let platform = Tokens::platform("AC1", &[Scope::PresenceRegister]);
    register(&rpc, &platform, device("bob", "d3"))
        .await
        .unwrap();
    let request = pb::UnregisterRequest {
        identity: "bob".into(),
        device_id: "d3".into(),
        ..Default::default()
    };
    assert!(
        rpc.unregister(Tokens::request(&platform, request))
            .await
            .unwrap()
            .into_inner()
            .removed
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn accounts_are_isolated_in_reads_writes_and_watches() {
    let etcd = Etcd::start().await;
    let server = support::presence(&etcd, &unique_prefix()).await;
    let one = Tenant::create(&server, "AC1").await;
    let two = Tenant::create(&server, "AC2").await;
    let mut rpc = client(&server);
    let two_reader = two.token(None, &[Scope::PresenceRead]);
    let mut watch = rpc
        .watch_presence(Tokens::request(
            &two_reader,
            pb::WatchPresenceRequest::default(),
        ))
        .await
        .unwrap()
        .into_inner();

    let alice_one = register(&rpc, &one.device("alice"), device("", "desk"))
        .await
        .unwrap();
    // Same identity and device id in AC2: a different device.
    let alice_two = register(&rpc, &two.device("alice"), device("", "desk"))
        .await
        .unwrap();
    let seen = tokio::time::timeout(STEP, watch.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(seen.revision, alice_two.revision, "AC2 saw AC1's change");
    let Some(Event::Joined(joined)) = seen.event else {
        panic!("expected `joined`");
    };
    assert_eq!(joined.device.unwrap().account_id, "AC2");

    let in_two = presence_of(&rpc, &two_reader, "alice", alice_two.revision).await;
    assert_eq!(in_two.devices.len(), 1);
    assert_eq!(in_two.devices[0].account_id, "AC2");
    let listed = rpc
        .list_presence(Tokens::request(
            &two_reader,
            pb::ListPresenceRequest::default(),
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.presences.len(), 1);
    assert_eq!(listed.presences[0].account_id, "AC2");

    // AC2 naming AC1 is refused everywhere.
    let two_admin = two.token(None, &[Scope::Admin]);
    let get = pb::GetPresenceRequest {
        account_id: "AC1".into(),
        identity: "alice".into(),
        ..Default::default()
    };
    let status = rpc
        .get_presence(Tokens::request(&two_admin, get))
        .await
        .unwrap_err();
    denied("get", status, "may not act on account `AC1`");
    let watch_one = pb::WatchPresenceRequest {
        account_id: "AC1".into(),
        ..Default::default()
    };
    let status = rpc
        .watch_presence(Tokens::request(&two_admin, watch_one))
        .await
        .unwrap_err();
    denied("watch", status, "account `AC1`");
    let unregister = pb::UnregisterRequest {
        account_id: "AC1".into(),
        identity: "alice".into(),
        device_id: "desk".into(),
    };
    let status = rpc
        .unregister(Tokens::request(&two_admin, unregister))
        .await
        .unwrap_err();
    denied("unregister", status, "account `AC1`");
    let one_reader = one.token(None, &[Scope::PresenceRead]);
    let untouched = presence_of(&rpc, &one_reader, "alice", alice_one.revision).await;
    assert_eq!(untouched.devices.len(), 1);
    assert_eq!(untouched.devices[0].account_id, "AC1");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn token_failures_are_unauthenticated_on_presence_rpcs() {
    let etcd = Etcd::start().await;
    let server = support::presence(&etcd, &unique_prefix()).await;
    let tenant = Tenant::create(&server, "AC1").await;
    let mut rpc = client(&server);
    let get = || pb::GetPresenceRequest {
        identity: "alice".into(),
        ..Default::default()
    };
    let status = rpc.get_presence(get()).await.unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let forged = Tokens::signed(PLATFORM_KEY_ID, "guess", "*", None, &[Scope::Admin], 60);
    let status = rpc
        .get_presence(Tokens::request(&forged, get()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("signature"), "{status:?}");
    let unknown = Tokens::signed("ak_nope", "x", "AC1", None, &[Scope::Admin], 60);
    let status = rpc
        .get_presence(Tokens::request(&unknown, get()))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    let hello = pb::ConnectHello::default();
    let status = Session::open(support::channel(&server), &forged, hello)
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::Unauthenticated);
    // A valid token still works.
    let token = tenant.token(None, &[Scope::PresenceRead]);
    rpc.get_presence(Tokens::request(&token, get()))
        .await
        .unwrap();
    server.shutdown().await.unwrap();
}

//! WatchPresence: device-level events in revision order, resume from a revision without a
//! gap (invariant 3), snapshots, compaction, and why devices left.

use std::time::Duration;

use integration::{Etcd, Tokens, unique_prefix};
use plumbing::auth::Scope;
use proto::presence::v1 as pb;
use proto::presence::v1::presence_service_client::PresenceServiceClient;
use proto::presence::v1::watch_presence_response::Event;
use tonic::transport::Channel;
use tonic::{Code, Streaming};

use crate::presence_support::{
    STEP, Session, Tenant, TwoReplicas, client, register, two_replicas, wait_for_devices,
};
use crate::support;

async fn watch(
    client: &PresenceServiceClient<Channel>,
    token: &str,
    request: pb::WatchPresenceRequest,
) -> Streaming<pb::WatchPresenceResponse> {
    client
        .clone()
        .watch_presence(Tokens::request(token, request))
        .await
        .unwrap()
        .into_inner()
}

async fn next(stream: &mut Streaming<pb::WatchPresenceResponse>) -> (i64, Event) {
    let message = tokio::time::timeout(STEP, stream.message())
        .await
        .expect("no watch event in time")
        .expect("watch failed")
        .expect("watch ended");
    (message.revision, message.event.unwrap())
}

/// (revision, kind, device_id, leave reason) of an event, for comparing sequences.
fn summary(revision: i64, event: &Event) -> (i64, &'static str, String, i32) {
    let id = |device: &Option<pb::Device>| device.as_ref().unwrap().device_id.clone();
    match event {
        Event::Joined(e) => (revision, "joined", id(&e.device), 0),
        Event::Updated(e) => (revision, "updated", id(&e.device), 0),
        Event::Left(e) => (revision, "left", id(&e.device), e.reason),
        Event::SnapshotComplete(_) => (revision, "snapshot_complete", String::new(), 0),
        Event::Compacted(_) => (revision, "compacted", String::new(), 0),
    }
}

fn registration(device_id: &str) -> pb::RegisterRequest {
    pb::RegisterRequest {
        device_id: device_id.into(),
        ..Default::default()
    }
}

fn update(device_id: &str, status: pb::Status) -> pb::UpdateStatusRequest {
    pb::UpdateStatusRequest {
        device_id: device_id.into(),
        status: status as i32,
        ..Default::default()
    }
}

#[tokio::test]
async fn a_watch_resumed_from_a_revision_after_a_disconnect_misses_no_event() {
    let TwoReplicas {
        etcd: _etcd,
        a,
        b,
        tenant,
    } = two_replicas().await;
    let alice = tenant.device("alice");
    let reader = tenant.token(None, &[Scope::PresenceRead]);
    let (writer, watcher) = (client(&a), client(&b));
    let mut writes = writer.clone();

    let mut stream = watch(&watcher, &reader, pb::WatchPresenceRequest::default()).await;
    let r1 = register(&writer, &alice, registration("d1"))
        .await
        .unwrap()
        .revision;
    let r2 = writes
        .update_status(Tokens::request(&alice, update("d1", pb::Status::Busy)))
        .await
        .unwrap()
        .into_inner()
        .revision;
    let r3 = register(&writer, &alice, registration("d2"))
        .await
        .unwrap()
        .revision;
    let mut seen = Vec::new();
    for _ in 0..3 {
        let (revision, event) = next(&mut stream).await;
        seen.push(summary(revision, &event));
    }
    assert_eq!(
        seen,
        vec![
            (r1, "joined", "d1".into(), 0),
            (r2, "updated", "d1".into(), 0),
            (r3, "joined", "d2".into(), 0),
        ]
    );
    drop(stream);

    // Changes while the watcher is away.
    let r4 = writes
        .unregister(Tokens::request(
            &alice,
            pb::UnregisterRequest {
                device_id: "d1".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap()
        .into_inner()
        .revision;
    let session = Session::hello(support::channel(&a), &alice, "d3").await;
    let r5 = session.device.revision;
    drop(session);
    wait_for_devices(&writer, &alice, "alice", 1, STEP).await;
    let r7 = writes
        .update_status(Tokens::request(&alice, update("d2", pb::Status::Away)))
        .await
        .unwrap()
        .into_inner()
        .revision;

    let resume = pb::WatchPresenceRequest {
        start_revision: r3 + 1,
        ..Default::default()
    };
    let mut stream = watch(&writer, &reader, resume).await;
    let mut resumed = Vec::new();
    for _ in 0..4 {
        let (revision, event) = next(&mut stream).await;
        resumed.push(summary(revision, &event));
    }
    let r6 = resumed[2].0;
    assert!(r5 < r6 && r6 < r7, "{resumed:?}");
    assert_eq!(
        resumed,
        vec![
            (
                r4,
                "left",
                "d1".into(),
                pb::LeaveReason::Unregistered as i32
            ),
            (r5, "joined", "d3".into(), 0),
            (
                r6,
                "left",
                "d3".into(),
                pb::LeaveReason::Disconnected as i32
            ),
            (r7, "updated", "d2".into(), 0),
        ]
    );
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_watch_from_a_compacted_revision_says_so_and_ends_with_out_of_range() {
    let etcd = Etcd::start().await;
    let server = support::presence(&etcd, &unique_prefix()).await;
    let tenant = Tenant::create(&server, "AC1").await;
    let alice = tenant.device("alice");
    let presence = client(&server);
    let first = register(&presence, &alice, registration("d1"))
        .await
        .unwrap()
        .revision;
    let last = register(&presence, &alice, registration("d2"))
        .await
        .unwrap()
        .revision;
    etcd.client().await.compact(last, None).await.unwrap();
    let request = pb::WatchPresenceRequest {
        start_revision: first,
        ..Default::default()
    };
    let mut stream = watch(&presence, &alice, request).await;
    let (revision, event) = next(&mut stream).await;
    assert_eq!(revision, last);
    assert!(
        matches!(event, Event::Compacted(pb::Compacted { compact_revision }) if compact_revision == last),
        "{event:?}"
    );
    let status = stream.message().await.unwrap_err();
    assert_eq!(status.code(), Code::OutOfRange, "{status:?}");
    assert!(status.message().contains("snapshot = true"), "{status:?}");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_snapshot_watch_sends_the_current_devices_then_only_later_changes() {
    let etcd = Etcd::start().await;
    let server = support::presence(&etcd, &unique_prefix()).await;
    let tenant = Tenant::create(&server, "AC1").await;
    let (alice, bob) = (tenant.device("alice"), tenant.device("bob"));
    let presence = client(&server);
    register(&presence, &alice, registration("a1"))
        .await
        .unwrap();
    register(&presence, &alice, registration("a2"))
        .await
        .unwrap();
    register(&presence, &bob, registration("b1")).await.unwrap();
    let request = pb::WatchPresenceRequest {
        identities: vec!["alice".into()],
        snapshot: true,
        ..Default::default()
    };
    let mut stream = watch(&presence, &alice, request).await;
    let mut snapshot = Vec::new();
    for _ in 0..3 {
        let (revision, event) = next(&mut stream).await;
        snapshot.push(summary(revision, &event));
    }
    let at = snapshot[2].0;
    assert_eq!(
        snapshot,
        vec![
            (at, "joined", "a1".into(), 0),
            (at, "joined", "a2".into(), 0),
            (at, "snapshot_complete", String::new(), 0),
        ]
    );
    register(&presence, &bob, registration("b2")).await.unwrap();
    let changed = presence
        .clone()
        .update_status(Tokens::request(&alice, update("a2", pb::Status::Busy)))
        .await
        .unwrap()
        .into_inner();
    let (revision, event) = next(&mut stream).await;
    assert_eq!(
        summary(revision, &event),
        (changed.revision, "updated", "a2".into(), 0),
        "bob's change is not alice's"
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_lapsed_registration_leaves_watchers_with_reason_expired() {
    let etcd = Etcd::start().await;
    let server = support::presence(&etcd, &unique_prefix()).await;
    let tenant = Tenant::create(&server, "AC1").await;
    let alice = tenant.device("alice");
    let presence = client(&server);
    let mut stream = watch(&presence, &alice, pb::WatchPresenceRequest::default()).await;
    let mut request = registration("brief");
    request.ttl_seconds = 5;
    register(&presence, &alice, request).await.unwrap();
    assert_eq!(summary(0, &next(&mut stream).await.1).1, "joined");
    let left = tokio::time::timeout(Duration::from_secs(10), stream.message())
        .await
        .expect("no expiry in time")
        .unwrap()
        .unwrap();
    let Some(Event::Left(left)) = left.event else {
        panic!("expected `left`, got {left:?}");
    };
    assert_eq!(left.reason, pb::LeaveReason::Expired as i32);
    assert_eq!(left.device.unwrap().device_id, "brief");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn watches_end_with_unavailable_when_the_replica_shuts_down() {
    let etcd = Etcd::start().await;
    let server = support::presence(&etcd, &unique_prefix()).await;
    let tenant = Tenant::create(&server, "AC1").await;
    let reader = tenant.token(None, &[Scope::PresenceRead]);
    let mut stream = watch(
        &client(&server),
        &reader,
        pb::WatchPresenceRequest::default(),
    )
    .await;
    let stopping = tokio::spawn(server.shutdown());
    let status = tokio::time::timeout(STEP, stream.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    stopping.await.unwrap().unwrap();
}

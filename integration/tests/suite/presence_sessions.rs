//! Live sessions (Connect): present exactly while the stream is open, status over the
//! stream, replacement by a newer Connect, and what a replica's death or shutdown does.

use std::time::{Duration, Instant};

use integration::{Etcd, ServiceProcess, unique_prefix};
use proto::presence::v1 as pb;
use proto::presence::v1::connect_request::Kind as Send;
use proto::presence::v1::connect_response::Kind as Recv;
use tonic::Code;

use crate::presence_support::{
    Session, Tenant, TwoReplicas, client, presence_of, two_replicas, wait_for_devices,
};
use crate::support;

#[tokio::test]
async fn a_session_is_present_while_its_stream_is_open_and_leaves_the_moment_it_ends() {
    let etcd = Etcd::start().await;
    let server = support::presence(&etcd, &unique_prefix()).await;
    let tenant = Tenant::create(&server, "AC1").await;
    let alice = tenant.device("alice");
    let presence = client(&server);
    let hello = pb::ConnectHello {
        status: pb::Status::Away as i32,
        attributes: [("client".to_owned(), "softphone".to_owned())].into(),
        ..Default::default()
    };
    let session = Session::open(support::channel(&server), &alice, hello)
        .await
        .unwrap();
    let device = session.device.clone();
    assert_eq!(device.device_id.len(), 36, "a generated UUID");
    assert_eq!(device.connection_kind, pb::ConnectionKind::Stream as i32);
    assert_eq!(device.replica, server.addr.to_string());
    assert_eq!(device.status, pb::Status::Away as i32);
    assert!(device.expire_time.is_none());
    let now = presence_of(&presence, &alice, "alice", device.revision).await;
    assert_eq!(now.devices, vec![device]);

    let closed = Instant::now();
    drop(session);
    wait_for_devices(&presence, &alice, "alice", 0, Duration::from_secs(2)).await;
    assert!(closed.elapsed() < Duration::from_secs(2));
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn status_updates_over_the_stream_are_confirmed_and_visible_to_readers() {
    let etcd = Etcd::start().await;
    let server = support::presence(&etcd, &unique_prefix()).await;
    let tenant = Tenant::create(&server, "AC1").await;
    let alice = tenant.device("alice");
    let mut session = Session::hello(support::channel(&server), &alice, "laptop").await;
    session
        .send(Send::Status(pb::ConnectStatus {
            status: pb::Status::DoNotDisturb as i32,
            attributes: [("reason".to_owned(), "meeting".to_owned())].into(),
        }))
        .await;
    let Recv::Registered(registered) = session.next().await else {
        panic!("expected `registered` after a status change");
    };
    let device = registered.device.unwrap();
    assert_eq!(device.status, pb::Status::DoNotDisturb as i32);
    assert_eq!(device.attributes["reason"], "meeting");
    let now = presence_of(&client(&server), &alice, "alice", device.revision).await;
    assert_eq!(now.status, pb::Status::DoNotDisturb as i32);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_second_connect_of_a_device_replaces_the_first_on_any_replica() {
    let TwoReplicas {
        etcd: _etcd,
        a,
        b,
        tenant,
    } = two_replicas().await;
    let alice = tenant.device("alice");

    let mut first = Session::hello(support::channel(&a), &alice, "phone").await;
    let mut second = Session::hello(support::channel(&a), &alice, "phone").await;
    let status = first
        .end()
        .await
        .expect("replaced stream ends with a status");
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert!(status.message().contains("replaced"), "{status:?}");

    let third = Session::hello(support::channel(&b), &alice, "phone").await;
    let status = second
        .end()
        .await
        .expect("replaced stream ends with a status");
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    let now = presence_of(&client(&a), &alice, "alice", third.device.revision).await;
    assert_eq!(now.devices.len(), 1);
    assert_eq!(now.devices[0].replica, b.addr.to_string());
    // The replaced sessions did not take the device's record with them (read on the other
    // replica, at least as fresh as the third session's write).
    let still = presence_of(&client(&b), &alice, "alice", third.device.revision).await;
    assert_eq!(still.devices.len(), 1);
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_connect_takes_over_a_registration_of_the_same_device() {
    let etcd = Etcd::start().await;
    let server = support::presence(&etcd, &unique_prefix()).await;
    let tenant = Tenant::create(&server, "AC1").await;
    let alice = tenant.device("alice");
    let presence = client(&server);
    let request = pb::RegisterRequest {
        device_id: "desk".into(),
        ..Default::default()
    };
    crate::presence_support::register(&presence, &alice, request)
        .await
        .unwrap();
    let session = Session::hello(support::channel(&server), &alice, "desk").await;
    let now = presence_of(&presence, &alice, "alice", session.device.revision).await;
    assert_eq!(now.devices.len(), 1);
    assert_eq!(
        now.devices[0].connection_kind,
        pb::ConnectionKind::Stream as i32
    );
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_killed_replica_s_sessions_vanish_within_the_replica_ttl() {
    let etcd = Etcd::start().await;
    let prefix = unique_prefix();
    let mut doomed = ServiceProcess::start("presence-svc", &etcd, &prefix, &[]).await;
    let survivor = support::presence(&etcd, &prefix).await;
    let tenant = Tenant::create(&survivor, "AC1").await;
    let alice = tenant.device("alice");
    let channel = plumbing::client::channel(&doomed.addr.to_string()).unwrap();
    let session = integration::poll_until(
        "key to reach the doomed replica",
        Duration::from_secs(5),
        || {
            let (channel, alice) = (channel.clone(), alice.clone());
            async move {
                let hello = pb::ConnectHello {
                    device_id: "phone".into(),
                    ..Default::default()
                };
                Session::open(channel, &alice, hello).await.ok()
            }
        },
    )
    .await;
    let presence = client(&survivor);
    presence_of(&presence, &alice, "alice", session.device.revision).await;
    doomed.kill().await;
    let killed = Instant::now();
    // --replica-ttl is 5 s in tests.
    wait_for_devices(&presence, &alice, "alice", 0, Duration::from_secs(9)).await;
    assert!(
        killed.elapsed() > Duration::from_secs(1),
        "left before the lease could expire"
    );
    drop(session);
    survivor.shutdown().await.unwrap();
}

#[tokio::test]
async fn shutting_down_ends_sessions_with_unavailable_and_removes_them_at_once() {
    let etcd = Etcd::start().await;
    let prefix = unique_prefix();
    let stopping = support::presence(&etcd, &prefix).await;
    let staying = support::presence(&etcd, &prefix).await;
    let tenant = Tenant::create(&stopping, "AC1").await;
    tenant.known_to(&staying).await;
    let alice = tenant.device("alice");
    let mut session = Session::hello(support::channel(&stopping), &alice, "phone").await;
    let presence = client(&staying);
    presence_of(&presence, &alice, "alice", session.device.revision).await;
    let shutdown = tokio::spawn(stopping.shutdown());
    let status = session.end().await.expect("a status at shutdown");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("reconnect"), "{status:?}");
    shutdown.await.unwrap().unwrap();
    // The lease was revoked, not left to expire: gone well within the 5 s TTL.
    wait_for_devices(&presence, &alice, "alice", 0, Duration::from_secs(2)).await;
    staying.shutdown().await.unwrap();
}

/// A replica whose lease is revoked behind its back (as etcd would expire it after a long
/// pause or a partition) keeps its live sessions: it grants a new lease, writes every
/// session's record again under it and tells each client its new record; the streams go
/// on answering, and readers list the devices again. The replica does not stop.
#[tokio::test]
async fn a_replica_whose_lease_is_revoked_keeps_its_sessions_under_a_new_lease() {
    let etcd = Etcd::start().await;
    let prefix = unique_prefix();
    let server = support::presence(&etcd, &prefix).await;
    let tenant = Tenant::create(&server, "AC1").await;
    let alice = tenant.device("alice");
    let presence = client(&server);
    let mut sessions = Vec::new();
    for device_id in ["phone", "laptop"] {
        let hello = pb::ConnectHello {
            device_id: device_id.into(),
            ..Default::default()
        };
        let session = Session::open(support::channel(&server), &alice, hello)
            .await
            .unwrap();
        presence_of(&presence, &alice, "alice", session.device.revision).await;
        sessions.push(session);
    }
    let mut etcd_client = etcd.client().await;
    let record_key = |device: &str| format!("{prefix}/presence/AC1/alice/{device}");
    let lease_of = |kvs: &[etcd_client::KeyValue]| kvs.first().map(|kv| kv.lease());
    let old = lease_of(
        etcd_client
            .get(record_key("phone"), None)
            .await
            .unwrap()
            .kvs(),
    )
    .expect("the session's record is in etcd");
    assert_ne!(old, 0, "a stream record is under the replica lease");
    etcd_client.lease_revoke(old).await.unwrap();

    // Both records come back under another lease.
    let revived = integration::poll_until(
        "both records under a new lease",
        Duration::from_secs(15),
        || {
            let mut etcd_client = etcd_client.clone();
            let keys = [record_key("phone"), record_key("laptop")];
            async move {
                let mut leases = Vec::new();
                for key in keys {
                    let found = etcd_client.get(key, None).await.ok()?;
                    leases.push(lease_of(found.kvs())?);
                }
                leases.iter().all(|l| *l != old).then_some(leases)
            }
        },
    )
    .await;
    assert_eq!(
        revived[0], revived[1],
        "both under the replica's one new lease"
    );
    wait_for_devices(&presence, &alice, "alice", 2, Duration::from_secs(5)).await;
    for session in &mut sessions {
        // The replica told the client its record was written again...
        let Recv::Registered(again) = session.next().await else {
            panic!("expected `registered` after the record was written again");
        };
        let again = again.device.unwrap();
        assert!(again.revision > session.device.revision);
        // ...and the stream still answers.
        let busy = session.confirm_status(pb::Status::Busy).await;
        assert_eq!(busy.status, pb::Status::Busy as i32);
    }
    assert!(
        !server.join.is_finished(),
        "the replica stopped on losing its lease"
    );
    drop(sessions);
    server.shutdown().await.unwrap();
}

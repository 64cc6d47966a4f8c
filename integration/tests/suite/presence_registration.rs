//! Registration by TTL: Register, Heartbeat (through any replica, without an etcd write),
//! UpdateStatus, Unregister, lapse, and the per-identity device limit.

use std::time::{Duration, Instant};

use integration::{Etcd, Tokens, unique_prefix};
use presence_svc::PresenceArgs;
use presence_svc::devices::OverflowPolicy;
use proto::presence::v1 as pb;
use tonic::Code;

use crate::presence_support::{
    Session, Tenant, TwoReplicas, client, presence_of, presence_with, register, two_replicas,
    wait_for_devices,
};
use crate::support;

fn registration(device_id: &str, ttl_seconds: u32) -> pb::RegisterRequest {
    pb::RegisterRequest {
        device_id: device_id.into(),
        ttl_seconds,
        ..Default::default()
    }
}

async fn etcd_revision(etcd: &Etcd) -> i64 {
    let mut client = etcd.client().await;
    client
        .get("probe", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision()
}

#[tokio::test]
async fn a_registration_is_present_at_its_revision_and_lapses_without_heartbeats() {
    let etcd = Etcd::start().await;
    let server = support::presence(&etcd, &unique_prefix()).await;
    let tenant = Tenant::create(&server, "AC1").await;
    let alice = tenant.device("alice");
    let presence = client(&server);
    let mut request = registration("desk", 5);
    request.status = pb::Status::Busy as i32;
    request.contact = "sip:alice@example.com".into();
    request.attributes = [("platform".to_owned(), "linux".to_owned())].into();
    let registered = register(&presence, &alice, request).await.unwrap();
    let device = registered.device.unwrap();
    assert_eq!(device.identity, "alice");
    assert_eq!(device.account_id, "AC1");
    assert_eq!(device.ttl_seconds, 5);
    assert_eq!(
        device.connection_kind,
        pb::ConnectionKind::Registration as i32
    );
    assert!(device.expire_time.is_some());

    let now = presence_of(&presence, &alice, "alice", registered.revision).await;
    assert_eq!(now.status, pb::Status::Busy as i32);
    assert_eq!(now.devices, vec![device]);

    let started = Instant::now();
    wait_for_devices(&presence, &alice, "alice", 0, Duration::from_secs(10)).await;
    let lapsed_after = started.elapsed();
    assert!(
        lapsed_after >= Duration::from_secs(3),
        "lapsed too early: {lapsed_after:?}"
    );
    let offline = presence_of(&presence, &alice, "alice", 0).await;
    assert_eq!(offline.status, pb::Status::Offline as i32);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn heartbeats_through_another_replica_keep_a_registration_present_without_etcd_writes() {
    let TwoReplicas { etcd, a, b, tenant } = two_replicas().await;
    let alice = tenant.device("alice");
    let registered = register(&client(&a), &alice, registration("phone", 5))
        .await
        .unwrap();
    let registered_at = Instant::now();
    let via_b = client(&b);
    let heartbeat = || {
        let mut via_b = via_b.clone();
        let alice = alice.clone();
        async move {
            let request = pb::HeartbeatRequest {
                device_id: "phone".into(),
                ..Default::default()
            };
            via_b
                .heartbeat(Tokens::request(&alice, request))
                .await
                .unwrap()
                .into_inner()
        }
    };
    let before = etcd_revision(&etcd).await;
    let mut last_expiry = 0;
    // Heartbeat well past the original TTL; the registration never lapses.
    while registered_at.elapsed() < Duration::from_secs(7) {
        let answer = heartbeat().await;
        let expiry = answer.expire_time.unwrap().seconds;
        assert!(expiry >= last_expiry);
        last_expiry = expiry;
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    assert_eq!(
        etcd_revision(&etcd).await,
        before,
        "a heartbeat wrote to etcd"
    );
    let still = presence_of(&via_b, &alice, "alice", registered.revision).await;
    assert_eq!(
        still.devices.len(),
        1,
        "registration lapsed despite heartbeats"
    );
    a.shutdown().await.unwrap();
    b.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_heartbeat_for_a_lapsed_or_unknown_device_is_not_found() {
    let etcd = Etcd::start().await;
    let server = support::presence(&etcd, &unique_prefix()).await;
    let tenant = Tenant::create(&server, "AC1").await;
    let alice = tenant.device("alice");
    let mut presence = client(&server);
    let request = pb::HeartbeatRequest {
        device_id: "never".into(),
        ..Default::default()
    };
    let status = presence
        .heartbeat(Tokens::request(&alice, request))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert!(status.message().contains("`never`"), "{status:?}");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn update_status_changes_a_device_and_the_aggregate_is_the_best_device() {
    let etcd = Etcd::start().await;
    let server = support::presence(&etcd, &unique_prefix()).await;
    let tenant = Tenant::create(&server, "AC1").await;
    let alice = tenant.device("alice");
    let mut presence = client(&server);
    for (device, status) in [("a", pb::Status::DoNotDisturb), ("b", pb::Status::Away)] {
        let mut request = registration(device, 60);
        request.status = status as i32;
        register(&presence, &alice, request).await.unwrap();
    }
    let update = |device: &str, status: pb::Status| pb::UpdateStatusRequest {
        device_id: device.into(),
        status: status as i32,
        attributes: [("mood".to_owned(), "fine".to_owned())].into(),
        ..Default::default()
    };
    let updated = presence
        .update_status(Tokens::request(&alice, update("a", pb::Status::Busy)))
        .await
        .unwrap()
        .into_inner();
    let device = updated.device.unwrap();
    assert_eq!(device.status, pb::Status::Busy as i32);
    assert_eq!(device.attributes["mood"], "fine");
    let now = presence_of(&presence, &alice, "alice", updated.revision).await;
    assert_eq!(now.status, pb::Status::Busy as i32, "BUSY beats AWAY");
    let updated = presence
        .update_status(Tokens::request(&alice, update("b", pb::Status::Available)))
        .await
        .unwrap()
        .into_inner();
    let now = presence_of(&presence, &alice, "alice", updated.revision).await;
    assert_eq!(now.status, pb::Status::Available as i32);
    // An update that changes nothing writes nothing and returns the same revision.
    let again = presence
        .update_status(Tokens::request(&alice, update("b", pb::Status::Available)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.revision, updated.revision);
    let missing = presence
        .update_status(Tokens::request(&alice, update("c", pb::Status::Busy)))
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn unregister_removes_a_registration_at_once_and_is_idempotent() {
    let etcd = Etcd::start().await;
    let server = support::presence(&etcd, &unique_prefix()).await;
    let tenant = Tenant::create(&server, "AC1").await;
    let alice = tenant.device("alice");
    let mut presence = client(&server);
    register(&presence, &alice, registration("desk", 60))
        .await
        .unwrap();
    let request = || pb::UnregisterRequest {
        device_id: "desk".into(),
        ..Default::default()
    };
    let removed = presence
        .unregister(Tokens::request(&alice, request()))
        .await
        .unwrap()
        .into_inner();
    assert!(removed.removed);
    let now = presence_of(&presence, &alice, "alice", removed.revision).await;
    assert!(now.devices.is_empty());
    let again = presence
        .unregister(Tokens::request(&alice, request()))
        .await
        .unwrap()
        .into_inner();
    assert!(!again.removed);
    assert_eq!(again.revision, 0);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn re_registering_a_device_replaces_it_and_releases_its_old_lease() {
    let etcd = Etcd::start().await;
    let server = support::presence(&etcd, &unique_prefix()).await;
    let tenant = Tenant::create(&server, "AC1").await;
    let alice = tenant.device("alice");
    let presence = client(&server);
    register(&presence, &alice, registration("desk", 60))
        .await
        .unwrap();
    let mut request = registration("desk", 30);
    request.status = pb::Status::Away as i32;
    let again = register(&presence, &alice, request).await.unwrap();
    let now = presence_of(&presence, &alice, "alice", again.revision).await;
    assert_eq!(now.devices.len(), 1);
    assert_eq!(now.devices[0].status, pb::Status::Away as i32);
    assert_eq!(now.devices[0].ttl_seconds, 30);
    // The replica's lease and the registration's current lease remain.
    integration::poll_until(
        "old lease to be revoked",
        Duration::from_secs(5),
        || async {
            let leases = etcd.client().await.leases().await.unwrap();
            (leases.leases().len() == 2).then_some(())
        },
    )
    .await;
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_device_held_by_a_stream_cannot_be_registered_over_unregistered_or_heartbeated() {
    let etcd = Etcd::start().await;
    let server = support::presence(&etcd, &unique_prefix()).await;
    let tenant = Tenant::create(&server, "AC1").await;
    let alice = tenant.device("alice");
    let mut presence = client(&server);
    let _session = Session::hello(support::channel(&server), &alice, "softphone").await;
    let status = register(&presence, &alice, registration("softphone", 60))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition, "{status:?}");
    assert!(status.message().contains("live Connect stream"));
    let status = presence
        .unregister(Tokens::request(
            &alice,
            pb::UnregisterRequest {
                device_id: "softphone".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    let status = presence
        .heartbeat(Tokens::request(
            &alice,
            pb::HeartbeatRequest {
                device_id: "softphone".into(),
                ..Default::default()
            },
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_device_limit_rejects_the_newest_device_without_writing() {
    let etcd = Etcd::start().await;
    let limit = PresenceArgs {
        max_devices_per_identity: 2,
        ..PresenceArgs::default()
    };
    let server = presence_with(&etcd, &unique_prefix(), limit).await;
    let tenant = Tenant::create(&server, "AC1").await;
    let alice = tenant.device("alice");
    let presence = client(&server);
    for device in ["one", "two"] {
        register(&presence, &alice, registration(device, 60))
            .await
            .unwrap();
    }
    let before = etcd_revision(&etcd).await;
    let status = register(&presence, &alice, registration("three", 60))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert!(
        status.message().contains("already has 2 devices"),
        "{status:?}"
    );
    let status = Session::open(
        support::channel(&server),
        &alice,
        pb::ConnectHello {
            device_id: "four".into(),
            ..Default::default()
        },
    )
    .await
    .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted);
    assert_eq!(etcd_revision(&etcd).await, before);
    // Re-registering an existing device is not a new device.
    register(&presence, &alice, registration("two", 30))
        .await
        .unwrap();
    // Another identity has its own allowance.
    register(&presence, &tenant.device("bob"), registration("one", 60))
        .await
        .unwrap();
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn the_device_limit_can_evict_the_oldest_device_ending_its_stream() {
    let etcd = Etcd::start().await;
    let limit = PresenceArgs {
        max_devices_per_identity: 2,
        device_overflow: OverflowPolicy::EvictOldest,
        ..PresenceArgs::default()
    };
    let server = presence_with(&etcd, &unique_prefix(), limit).await;
    let tenant = Tenant::create(&server, "AC1").await;
    let alice = tenant.device("alice");
    let presence = client(&server);
    let mut oldest = Session::hello(support::channel(&server), &alice, "oldest").await;
    register(&presence, &alice, registration("middle", 60))
        .await
        .unwrap();
    let newest = register(&presence, &alice, registration("newest", 60))
        .await
        .unwrap();
    let status = oldest
        .end()
        .await
        .expect("evicted stream ends with a status");
    assert_eq!(status.code(), Code::Aborted, "{status:?}");
    assert!(status.message().contains("evicted"), "{status:?}");
    let now = presence_of(&presence, &alice, "alice", newest.revision).await;
    let ids: Vec<&str> = now.devices.iter().map(|d| d.device_id.as_str()).collect();
    assert_eq!(ids, ["middle", "newest"]);
    server.shutdown().await.unwrap();
}

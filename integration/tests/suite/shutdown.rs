//! Graceful shutdown: NOT_SERVING, drain, leases revoked at once; crashes leave leases to expire.

use std::time::Duration;

use integration::{Etcd, ServiceProcess, poll_until, unique_prefix};

use crate::support;

async fn lease_count(etcd: &Etcd) -> usize {
    etcd.client().await.leases().await.unwrap().leases().len()
}

#[tokio::test]
async fn graceful_shutdown_revokes_the_replica_lease_at_once() {
    let etcd = Etcd::start().await;
    let server = support::presence(&etcd, &unique_prefix()).await;
    assert_eq!(lease_count(&etcd).await, 1);
    server.shutdown().await.unwrap();
    // Revoked, not expired: gone immediately although the TTL is 5 s.
    assert_eq!(lease_count(&etcd).await, 0);
}

#[tokio::test]
async fn a_crashed_replica_lease_expires_by_itself() {
    let etcd = Etcd::start().await;
    let server = support::presence(&etcd, &unique_prefix()).await;
    assert_eq!(lease_count(&etcd).await, 1);
    server.crash();
    poll_until(
        "crashed replica's lease to expire",
        Duration::from_secs(10),
        || async { (lease_count(&etcd).await == 0).then_some(()) },
    )
    .await;
}

#[tokio::test]
async fn every_binary_exits_zero_on_sigterm_and_leaves_no_lease() {
    let etcd = Etcd::start().await;
    for name in ["presence-svc", "limiter-svc", "router-svc"] {
        let mut process = ServiceProcess::start(name, &etcd, &unique_prefix(), &[]).await;
        assert!(lease_count(&etcd).await >= 1, "{name} holds no lease");
        let status = process.terminate().await;
        assert!(status.success(), "{name} exited with {status}");
        assert_eq!(lease_count(&etcd).await, 0, "{name} left its lease behind");
    }
}

#[tokio::test]
async fn health_reports_not_serving_while_draining_a_stream() {
    use tonic_health::pb::health_check_response::ServingStatus;
    let etcd = Etcd::start().await;
    let server = support::presence(&etcd, &unique_prefix()).await;
    let channel = support::channel(&server);
    // A Watch on health is a long-lived stream: it sees the transition to NOT_SERVING
    // before the server closes.
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let mut updates = health
        .watch(tonic_health::pb::HealthCheckRequest {
            service: "switchboard.presence.v1.PresenceService".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = updates.message().await.unwrap().unwrap();
    assert_eq!(first.status, ServingStatus::Serving as i32);
    let stopping = tokio::spawn(server.shutdown());
    let update = tokio::time::timeout(Duration::from_secs(4), updates.message())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(update.status, ServingStatus::NotServing as i32);
    drop(updates);
    stopping.await.unwrap().unwrap();
}

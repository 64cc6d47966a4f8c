//! The etcd session: lease keeping and loss, and watches across etcd restarts and compaction.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use integration::{Etcd, unique_prefix};
use plumbing::etcd::{
    EtcdOptions, EtcdSession, Lease, LeaseLost, Mirror, MirrorUpdate, WatchItem, WatchSpec, follow,
};

async fn session(etcd: &Etcd) -> EtcdSession {
    let options = EtcdOptions::plain(vec![etcd.endpoint.clone()], &unique_prefix());
    EtcdSession::connect(&options).await.unwrap()
}

#[tokio::test]
async fn a_kept_lease_outlives_its_ttl() {
    let etcd = Etcd::start().await;
    let session = session(&etcd).await;
    let lease = Lease::grant(&session, 2).await.unwrap();
    let mut client = etcd.client().await;
    client
        .put(
            session.key("held"),
            "x",
            Some(etcd_client::PutOptions::new().with_lease(lease.id())),
        )
        .await
        .unwrap();
    // Three TTLs later the key is still there because the keeper renewed the lease.
    tokio::time::sleep(Duration::from_secs(6)).await;
    assert!(!lease.lost().is_cancelled());
    assert_eq!(
        client
            .get(session.key("held"), None)
            .await
            .unwrap()
            .kvs()
            .len(),
        1
    );
}

#[tokio::test]
async fn a_lease_revoked_elsewhere_is_reported_lost() {
    let etcd = Etcd::start().await;
    let session = session(&etcd).await;
    let lease = Lease::grant(&session, 3).await.unwrap();
    etcd.client().await.lease_revoke(lease.id()).await.unwrap();
    tokio::time::timeout(Duration::from_secs(5), lease.lost().cancelled())
        .await
        .expect("loss not reported");
    assert_eq!(lease.lost_reason(), Some(LeaseLost::Expired));
}

#[tokio::test]
async fn a_lost_lease_is_replaced_by_a_new_one_that_is_kept_alive() {
    let etcd = Etcd::start().await;
    let session = session(&etcd).await;
    let lease = Lease::grant(&session, 3).await.unwrap();
    let first = lease.id();
    let mut changes = lease.changes();
    etcd.client().await.lease_revoke(first).await.unwrap();
    let second = tokio::time::timeout(Duration::from_secs(5), changes.wait_for(|id| *id != first))
        .await
        .expect("no new lease")
        .map(|id| *id)
        .unwrap();
    assert_eq!(lease.id(), second);
    assert!(
        lease.lost().is_cancelled(),
        "the first loss is still reported"
    );
    // Kept alive past its TTL of 3 s.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let live = etcd
        .client()
        .await
        .lease_time_to_live(second, None)
        .await
        .unwrap();
    assert!(live.ttl() > 0, "the new lease expired: ttl {}", live.ttl());
}

#[tokio::test]
async fn a_lease_is_reported_lost_when_etcd_is_gone_for_a_whole_ttl() {
    let mut etcd = Etcd::start().await;
    let session = session(&etcd).await;
    let lease = Lease::grant(&session, 2).await.unwrap();
    etcd.kill().await;
    tokio::time::timeout(Duration::from_secs(6), lease.lost().cancelled())
        .await
        .expect("loss not reported");
    assert!(lease.lost_reason().is_some());
}

#[tokio::test]
async fn a_watch_resumes_after_an_etcd_restart_without_missing_or_repeating_events() {
    let mut etcd = Etcd::start().await;
    let session = session(&etcd).await;
    let prefix = session.key("w/");
    // Start from an explicit revision, so no put can race the watch's creation.
    let start = session.current_revision().await.unwrap() + 1;
    let mut items = follow(
        &session,
        WatchSpec {
            key: prefix.clone(),
            prefix: true,
            start_revision: start,
            prev_kv: false,
        },
    );
    let mut client = etcd.client().await;
    client.put(format!("{prefix}0"), "0", None).await.unwrap();
    let mut seen = Vec::new();
    collect_until(&mut items, &mut seen, 1).await;
    for i in 1..=20 {
        client
            .put(format!("{prefix}{i}"), i.to_string(), None)
            .await
            .unwrap();
    }
    etcd.restart().await;
    let mut client = etcd.client().await;
    for i in 21..=40 {
        client
            .put(format!("{prefix}{i}"), i.to_string(), None)
            .await
            .unwrap();
    }
    collect_until(&mut items, &mut seen, 41).await;
    let expected: Vec<String> = (0..=40).map(|i| i.to_string()).collect();
    assert_eq!(seen, expected);
}

async fn collect_until(
    items: &mut tokio::sync::mpsc::Receiver<WatchItem>,
    seen: &mut Vec<String>,
    count: usize,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while seen.len() < count {
        let item = tokio::time::timeout_at(deadline, items.recv())
            .await
            .expect("watch stalled")
            .expect("watch ended");
        match item {
            WatchItem::Events { events, .. } => {
                seen.extend(
                    events
                        .iter()
                        .map(|e| e.kv().unwrap().value_str().unwrap().to_owned()),
                );
            }
            WatchItem::Progress { .. } => {}
            WatchItem::Compacted { compact_revision } => {
                panic!("unexpected compaction at {compact_revision}")
            }
        }
    }
}

#[tokio::test]
async fn a_watch_from_a_compacted_revision_reports_compaction() {
    let etcd = Etcd::start().await;
    let session = session(&etcd).await;
    let mut client = etcd.client().await;
    let first = client
        .put(session.key("c/a"), "1", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    let last = client
        .put(session.key("c/a"), "2", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    client.compact(last, None).await.unwrap();
    let mut items = follow(
        &session,
        WatchSpec {
            key: session.key("c/"),
            prefix: true,
            start_revision: first,
            prev_kv: false,
        },
    );
    match tokio::time::timeout(Duration::from_secs(5), items.recv())
        .await
        .unwrap()
    {
        Some(WatchItem::Compacted { compact_revision }) => assert_eq!(compact_revision, last),
        other => panic!("expected a compaction report, got {other:?}"),
    }
}

#[tokio::test]
async fn a_mirror_follows_puts_and_deletes_and_survives_an_etcd_restart() {
    let mut etcd = Etcd::start().await;
    let session = session(&etcd).await;
    let copy: Arc<Mutex<HashMap<String, String>>> = Arc::default();
    let target = copy.clone();
    let mirror = Mirror::start(&session, session.key("m/"), move |update| {
        let mut map = target.lock().unwrap();
        match update {
            MirrorUpdate::Reset { kvs, .. } => {
                map.clear();
                for kv in kvs {
                    map.insert(
                        kv.key_str().unwrap().to_owned(),
                        kv.value_str().unwrap().to_owned(),
                    );
                }
            }
            MirrorUpdate::Put(kv) => {
                map.insert(
                    kv.key_str().unwrap().to_owned(),
                    kv.value_str().unwrap().to_owned(),
                );
            }
            MirrorUpdate::Delete(kv) => {
                map.remove(kv.key_str().unwrap());
            }
        }
    });
    let mut client = etcd.client().await;
    client.put(session.key("m/a"), "1", None).await.unwrap();
    let rev = client
        .put(session.key("m/b"), "2", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    assert!(mirror.wait_for(rev, Duration::from_secs(5)).await);
    assert_eq!(copy.lock().unwrap().len(), 2);
    etcd.restart().await;
    let mut client = etcd.client().await;
    let rev = client
        .delete(session.key("m/a"), None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision();
    assert!(
        mirror.wait_for(rev, Duration::from_secs(15)).await,
        "mirror did not catch up after restart"
    );
    let map = copy.lock().unwrap().clone();
    assert_eq!(
        map.into_iter()
            .map(|(k, v)| (k.rsplit('/').next().unwrap().to_owned(), v))
            .collect::<Vec<_>>(),
        vec![("b".to_owned(), "2".to_owned())]
    );
}

#[tokio::test]
async fn connecting_to_a_dead_etcd_fails_within_the_deadline() {
    let started = std::time::Instant::now();
    let dead = format!("http://127.0.0.1:{}", integration::free_port());
    let result = EtcdSession::connect(&EtcdOptions::plain(vec![dead], "/x")).await;
    assert!(
        matches!(
            result,
            Err(plumbing::etcd::ConnectError::Unreachable { .. })
        ),
        "{result:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(12));
}

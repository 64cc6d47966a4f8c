//! Fault suite: all of etcd restarts (its only member is killed and started again on the
//! same ports and data) under the running services (issue 6, item 4).
//!
//! Every watch and lease keeper of every service must recover by itself: the replica
//! leases are kept (etcd restores leases with a fresh TTL, and the keepers reconnect within
//! it), watches resume from their last revision, and the watch-fed caches (presence
//! records, account keys, limits, applications) follow changes made after the restart.
//! The plumbing under it is tested in `etcd::a_watch_resumes_after_an_etcd_restart_*` and
//! `etcd::a_mirror_follows_puts_and_deletes_and_survives_an_etcd_restart`; here the
//! services are the real binaries.

use std::time::{Duration, Instant};

use integration::{Etcd, ServiceProcess, Tokens, poll_until, unique_prefix};
use plumbing::auth::Scope;
use proto::limiter::v1 as lpb;
use proto::presence::v1 as pb;
use proto::presence::v1::key_service_client::KeyServiceClient;
use proto::router::v1 as rpb;
use tonic::Code;

use crate::fault_support::{
    ACCOUNT, Watcher, acquire_request, admin, channel, device_task, device_token, hangup, limiter,
    presence, presence_at, put_dial_app, release, route, set_limit,
};
use crate::presence_support::Session;

/// How long after etcd answers again writes may still fail (keepers and clients reconnect
/// on their own schedule: a keep-alive tick is a third of the 5 s replica TTL).
const RECOVERY_BOUND: Duration = Duration::from_secs(5);

/// How soon a change must reach every replica's watch-fed copy (docs/CONTRACT.md §4: "within a
/// second").
const PROPAGATION_BOUND: Duration = Duration::from_secs(1);

/// Restarts etcd, printing how long it was away.
async fn restart_etcd(etcd: &mut Etcd) -> Instant {
    let started = Instant::now();
    etcd.restart().await;
    println!("etcd restarted and answering after {:?}", started.elapsed());
    Instant::now()
}

/// Registers `device_id` of `writer` through `addr`, retrying while etcd comes back; its
/// revision and how long the retries took.
async fn register_when_back(addr: std::net::SocketAddr, device_id: &str) -> (i64, Duration) {
    let started = Instant::now();
    let revision = poll_until("a Register to succeed", RECOVERY_BOUND, || async {
        let request = pb::RegisterRequest {
            device_id: device_id.into(),
            ttl_seconds: 30,
            ..Default::default()
        };
        let response = presence(addr)
            .register(Tokens::request(&device_token("writer"), request))
            .await
            .ok()?;
        Some(response.into_inner().revision)
    })
    .await;
    (revision, started.elapsed())
}

/// Presence survives a restart of all of etcd: sessions, watches and the key mirror.
///
/// Bounds checked: both replicas keep running; the Connect sessions on both replicas are
/// present afterwards on both and still answer on their streams (the replica lease was
/// kept); a Register succeeds within [`RECOVERY_BOUND`] of etcd answering again; a watch
/// open across the restart and a watch resumed from the last revision it had delivered
/// both see exactly the changes made after the restart, in order (invariant 3); an account
/// key disabled after the restart is refused on the other replica within
/// [`PROPAGATION_BOUND`].
#[tokio::test]
async fn presence_sessions_watches_and_keys_recover_from_a_restart_of_all_etcd() {
    let mut etcd = Etcd::start().await;
    let prefix = unique_prefix();
    let mut replicas = Vec::new();
    for _ in 0..2 {
        replicas.push(ServiceProcess::start("presence-svc", &etcd, &prefix, &[]).await);
    }
    let addrs = [replicas[0].addr, replicas[1].addr];
    let mut keys = KeyServiceClient::new(channel(addrs[0]));
    let created = keys
        .create_key(Tokens::request(
            &admin(),
            pb::CreateKeyRequest {
                account_id: ACCOUNT.into(),
                description: "fault test".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let key_id = created.key.unwrap().key_id;
    let account_token = Tokens::signed(
        &key_id,
        &created.secret,
        ACCOUNT,
        None,
        &[Scope::PresenceRead],
        600,
    );
    let read_with_key = |addr: std::net::SocketAddr| {
        let token = account_token.clone();
        async move {
            let request = pb::GetPresenceRequest {
                identity: "probe".into(),
                ..Default::default()
            };
            presence(addr)
                .get_presence(Tokens::request(&token, request))
                .await
                .map(|_| ())
        }
    };
    poll_until(
        "the account key on the second replica",
        Duration::from_secs(5),
        || async { read_with_key(addrs[1]).await.ok() },
    )
    .await;

    let mut alice = Session::hello(channel(addrs[0]), &device_token("alice"), "phone").await;
    let mut bob = Session::hello(channel(addrs[1]), &device_token("bob"), "desk").await;
    let joined = alice.device.revision.max(bob.device.revision);
    let across = Watcher::open(addrs[1], joined + 1).await;
    let (before, _) = register_when_back(addrs[0], "d1").await;
    across.reached(before, Duration::from_secs(5)).await;

    let back_at = restart_etcd(&mut etcd).await;
    let (r1, waited) = register_when_back(addrs[0], "d2").await;
    println!("first Register after the restart succeeded after {waited:?} of retries");
    let mut after = vec![r1];
    let update = pb::UpdateStatusRequest {
        device_id: "d1".into(),
        status: pb::Status::Away as i32,
        ..Default::default()
    };
    let updated = presence(addrs[1])
        .update_status(Tokens::request(&device_token("writer"), update))
        .await
        .unwrap();
    after.push(updated.into_inner().revision);
    let unregister = pb::UnregisterRequest {
        device_id: "d1".into(),
        ..Default::default()
    };
    let removed = presence(addrs[0])
        .unregister(Tokens::request(&device_token("writer"), unregister))
        .await
        .unwrap();
    after.push(removed.into_inner().revision);
    let last = *after.last().unwrap();

    // A watch resumed from the last revision the first one had delivered before the restart.
    let resumed = Watcher::open(addrs[0], before + 1).await;
    across.reached(last, Duration::from_secs(10)).await;
    resumed.reached(last, Duration::from_secs(10)).await;
    let since_restart = |watcher: &Watcher| -> Vec<(i64, &'static str, String)> {
        watcher
            .seen()
            .into_iter()
            .filter(|s| s.revision > before)
            .map(|s| (s.revision, s.kind, s.device_id))
            .collect()
    };
    let expected = vec![
        (after[0], "joined", "d2".to_owned()),
        (after[1], "updated", "d1".to_owned()),
        (after[2], "left", "d1".to_owned()),
    ];
    assert_eq!(
        since_restart(&across),
        expected,
        "the watch open across the restart"
    );
    assert_eq!(since_restart(&resumed), expected, "the resumed watch");
    assert!(across.ended().is_none(), "{:?}", across.ended());

    for replica in &mut replicas {
        assert!(replica.exited().is_none(), "a presence replica exited");
    }
    for addr in addrs {
        for identity in ["alice", "bob"] {
            let found = presence_at(addr, identity, last).await.unwrap();
            assert_eq!(found.devices.len(), 1, "{identity} is gone on {addr}");
        }
    }
    for session in [&mut alice, &mut bob] {
        session.confirm_status(pb::Status::Busy).await;
    }

    // Key disable through one replica reaches the other's key mirror.
    keys.disable_key(Tokens::request(&admin(), pb::DisableKeyRequest { key_id }))
        .await
        .unwrap();
    let disabled_at = Instant::now();
    poll_until(
        "the disabled key to be refused on the other replica",
        PROPAGATION_BOUND,
        || async {
            let refused = read_with_key(addrs[1]).await.err()?;
            (refused.code() == Code::Unauthenticated).then_some(())
        },
    )
    .await;
    println!(
        "disabled key refused on the other replica after {:?}; {:?} since etcd came back",
        disabled_at.elapsed(),
        back_at.elapsed()
    );
    assert_eq!(
        read_with_key(addrs[0]).await.unwrap_err().code(),
        Code::Unauthenticated
    );
}

/// The limiter survives a restart of all of etcd: held slots, decisions and limits.
///
/// Bounds checked: both replicas keep running; a slot held across the restart still
/// counts, so at a limit of 2 one more is granted and the next rejected (through either
/// replica), and the first grant comes within [`RECOVERY_BOUND`] of etcd answering again;
/// a limit set after the restart reaches the other replica within [`PROPAGATION_BOUND`].
#[tokio::test]
async fn the_limiter_grants_rejects_and_follows_limits_after_a_restart_of_all_etcd() {
    let mut etcd = Etcd::start().await;
    let prefix = unique_prefix();
    let mut replicas = Vec::new();
    for _ in 0..2 {
        replicas.push(ServiceProcess::start("limiter-svc", &etcd, &prefix, &[]).await);
    }
    let addrs = [replicas[0].addr, replicas[1].addr];
    set_limit(addrs[0], "calls", 2).await;
    let first = poll_until("a grant", Duration::from_secs(5), || async {
        let answer = limiter(addrs[0])
            .acquire(Tokens::request(&admin(), acquire_request("calls", 60, 0)))
            .await
            .ok()?
            .into_inner();
        (answer.decision == lpb::Decision::Granted as i32).then_some(answer)
    })
    .await;

    let back_at = restart_etcd(&mut etcd).await;
    let second = poll_until("a grant after the restart", RECOVERY_BOUND, || async {
        limiter(addrs[1])
            .acquire(Tokens::request(&admin(), acquire_request("calls", 60, 0)))
            .await
            .ok()
            .map(tonic::Response::into_inner)
    })
    .await;
    println!(
        "first Acquire answered {:?} after etcd came back",
        back_at.elapsed()
    );
    assert_eq!(
        (second.decision, second.in_flight),
        (lpb::Decision::Granted as i32, 2),
        "the slot held across the restart is not counted"
    );
    for addr in addrs {
        let third = limiter(addr)
            .acquire(Tokens::request(&admin(), acquire_request("calls", 60, 0)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (third.decision, third.in_flight, third.limit),
            (lpb::Decision::Rejected as i32, 2, 2)
        );
    }
    assert!(release(addrs[1], &first.slot_id).await.unwrap());
    assert!(release(addrs[0], &second.slot_id).await.unwrap());

    set_limit(addrs[0], "calls", 7).await;
    let set_at = Instant::now();
    poll_until(
        "the new limit on the other replica",
        PROPAGATION_BOUND,
        || async {
            let request = lpb::GetLimitRequest {
                account_id: ACCOUNT.into(),
                resource: "calls".into(),
            };
            let answer = limiter(addrs[1])
                .get_limit(Tokens::request(&admin(), request))
                .await
                .ok()?
                .into_inner();
            (answer.limit?.max_in_flight == 7).then_some(())
        },
    )
    .await;
    println!(
        "limit change reached the other replica after {:?}",
        set_at.elapsed()
    );
    for replica in &mut replicas {
        assert!(replica.exited().is_none(), "a limiter replica exited");
    }
}

/// Routing works end to end after a restart of all of etcd.
///
/// Bounds checked: every process keeps running; a Route (router → limiter slot → presence
/// → a device that answers) through a router that has run across the restart connects
/// within [`RECOVERY_BOUND`] of etcd answering again, to an application stored before the
/// restart and, through the other router replica, to one stored after it (that replica's
/// application copy follows within [`PROPAGATION_BOUND`]); hangups end both and free
/// their limiter slots.
#[tokio::test]
async fn routing_connects_after_a_restart_of_all_etcd() {
    let mut etcd = Etcd::start().await;
    let prefix = unique_prefix();
    let mut processes = vec![
        ServiceProcess::start("presence-svc", &etcd, &prefix, &[]).await,
        ServiceProcess::start("limiter-svc", &etcd, &prefix, &[]).await,
    ];
    let (presence_addr, limiter_addr) = (processes[0].addr, processes[1].addr);
    let (presence_arg, limiter_arg) = (presence_addr.to_string(), limiter_addr.to_string());
    let args = ["--presence", &presence_arg, "--limiter", &limiter_arg];
    for _ in 0..2 {
        processes.push(ServiceProcess::start("router-svc", &etcd, &prefix, &args).await);
    }
    let routers = [processes[2].addr, processes[3].addr];
    let (device, _) = device_task(presence_addr, "alice", "phone", true).await;
    put_dial_app(routers[0], "before", "alice").await.unwrap();

    let back_at = restart_etcd(&mut etcd).await;
    let mut attempt = 0;
    let comm = poll_until("a Route to connect", RECOVERY_BOUND, || {
        attempt += 1;
        let id = format!("CM-before-{attempt}");
        async move { route(routers[0], "before", &id).await.ok() }
    })
    .await;
    println!(
        "first Route connected {:?} after etcd came back ({attempt} attempts)",
        back_at.elapsed()
    );
    assert_eq!(comm.outcome, rpb::Outcome::Connected as i32, "{comm:?}");
    hangup(routers[0], &comm.communication_id).await.unwrap();

    put_dial_app(routers[0], "after", "alice").await.unwrap();
    let stored_at = Instant::now();
    let mut attempt = 0;
    let (sent, comm) = poll_until(
        "the other router to route to the new application",
        Duration::from_secs(5),
        || {
            attempt += 1;
            let id = format!("CM-after-{attempt}");
            async move {
                let sent = Instant::now();
                match route(routers[1], "after", &id).await {
                    Err(status) if status.code() == Code::NotFound => None,
                    other => Some((sent, other.unwrap())),
                }
            }
        },
    )
    .await;
    let visible = sent - stored_at;
    println!("the other router knew the new application {visible:?} after it was stored");
    assert!(visible < PROPAGATION_BOUND, "{visible:?}");
    assert_eq!(comm.outcome, rpb::Outcome::Connected as i32, "{comm:?}");
    hangup(routers[1], &comm.communication_id).await.unwrap();
    poll_until(
        "the slots to be released",
        Duration::from_secs(5),
        || async {
            let usage = crate::fault_support::usage(limiter_addr, "communications")
                .await
                .ok()?;
            (usage.in_flight == 0).then_some(())
        },
    )
    .await;
    for process in &mut processes {
        assert!(process.exited().is_none(), "a service exited");
    }
    device.abort();
}

//! Fault suite: SIGTERM drains each binary under load and revokes its lease at once
//! (issue 6, item 4; docs/CONTRACT.md §4: "report NOT_SERVING, stop accepting, drain, revoke own
//! leases, exit 0").
//!
//! `shutdown::every_binary_exits_zero_on_sigterm_and_leaves_no_lease` covers idle
//! binaries, `presence_sessions::shutting_down_ends_sessions_with_unavailable_and_removes_them_at_once`
//! and `router_crash::a_stopping_router_ends_its_communications_and_releases_their_slots`
//! the in-process servers. Here each real binary gets SIGTERM while clients keep calling
//! it, and every test checks, for that binary:
//! - calls sent before the signal complete (OK); calls after it are refused with
//!   UNAVAILABLE (a client retries elsewhere) — no other failure;
//! - its streams end (presence: UNAVAILABLE so clients reconnect; router: the
//!   communication's ENDED event, then OK);
//! - it exits 0 well within `--drain-timeout` (10 s);
//! - its replica lease and everything on it (sessions, shard ownership, running
//!   communications) are gone from etcd the moment it has exited — checked once, without
//!   waiting, although `--replica-ttl` is 5 s.

use std::time::{Duration, Instant};

use integration::{Etcd, ServiceProcess, Tokens, poll_until, unique_prefix};
use proto::limiter::v1 as lpb;
use proto::presence::v1 as pb;
use proto::router::v1 as rpb;
use proto::router::v1::router_service_client::RouterServiceClient;
use tonic::transport::Channel;
use tonic::{Code, Status};

use crate::fault_support::{
    ACCOUNT, Load, LoadReport, Watcher, acquire_and_release, acquire_request, admin,
    await_even_split_of_two, channel, device_task, device_token, keys_under, limiter, presence,
    presence_at, put_app, put_dial_app, release, resources_over_all_shards, route, route_on,
    router, set_limit, usage, values_under,
};
use crate::presence_support::Session;

/// How long a drain may take here: the streams end at once and unary calls are short.
const EXIT_BOUND: Duration = Duration::from_secs(5);

/// Asserts that every call sent to the stopping binary before `in_flight_before` completed,
/// and that every later one either completed or was refused with UNAVAILABLE.
fn assert_drained(report: &LoadReport, in_flight_before: Instant) {
    println!("{}", report.summary());
    let cut: Vec<_> = report
        .calls
        .iter()
        .filter(|c| c.started < in_flight_before && c.code != Code::Ok)
        .collect();
    assert!(
        cut.is_empty(),
        "calls in flight at SIGTERM failed: {cut:#?}"
    );
    let odd = report.other_than(&[Code::Ok, Code::Unavailable]);
    assert!(
        odd.is_empty(),
        "calls failed otherwise than UNAVAILABLE: {odd:#?}"
    );
    let after = report
        .calls
        .iter()
        .filter(|c| c.started >= in_flight_before)
        .count();
    let before = report.calls.len() - after;
    println!("{before} calls sent before the signal, all OK; {after} after it");
}

/// Sends SIGTERM; returns the moment before which a call counts as in flight at the
/// signal, and the moment the signal was sent.
///
/// A call passes through the client's buffer and connection tasks before it is on the
/// wire; the 50 ms between the two moments let every call sent before the first reach the
/// server, so that "in flight" means in flight at the server.
async fn terminate(process: &ServiceProcess) -> (Instant, Instant) {
    let in_flight_before = Instant::now();
    tokio::time::sleep(Duration::from_millis(50)).await;
    let signalled = Instant::now();
    process.signal_terminate().await;
    (in_flight_before, signalled)
}

/// Whether etcd still has lease `id`.
async fn lease_exists(client: &mut etcd_client::Client, id: i64) -> bool {
    let leases = client.leases().await.unwrap();
    leases.leases().iter().any(|l| l.id() == id)
}

/// Waits until `load` has `more` successful calls beyond what it has now.
async fn more_successes(load: &Load, more: usize) {
    let target = load.successes() + more;
    poll_until("load to run", Duration::from_secs(10), || async {
        (load.successes() >= target).then_some(())
    })
    .await;
}

/// presence-svc drains on SIGTERM under load.
///
/// Bounds checked: Registers in flight at the signal complete, later ones are UNAVAILABLE;
/// its 5 Connect sessions and a WatchPresence end with UNAVAILABLE; it exits 0 within
/// [`EXIT_BOUND`]; at that moment its replica lease and its sessions' records are gone
/// from etcd, and the other replica (whose readers never fail) answers them absent.
#[tokio::test]
async fn a_presence_replica_drains_on_sigterm_under_load() {
    let etcd = Etcd::start().await;
    let prefix = unique_prefix();
    let mut stopping = ServiceProcess::start("presence-svc", &etcd, &prefix, &[]).await;
    let staying = ServiceProcess::start("presence-svc", &etcd, &prefix, &[]).await;
    let (addr, other) = (stopping.addr, staying.addr);
    let mut sessions = Vec::new();
    for i in 0..5 {
        let token = device_token(&format!("user{i}"));
        sessions.push(Session::hello(channel(addr), &token, "phone").await);
    }
    let joined = sessions.iter().map(|s| s.device.revision).max().unwrap();
    presence_at(other, "user4", joined).await.unwrap();
    let mut client = etcd.client().await;
    let records_prefix = format!("{prefix}/presence/{ACCOUNT}/user");
    let records = keys_under(&mut client, &records_prefix).await;
    assert_eq!(records.len(), 5);
    let replica_lease = records[0].1;
    let mut watch = Watcher::open(addr, joined + 1).await;

    // One connection per worker, as a real client has: a call sent before the signal is
    // then on the server's side of an accepted connection.
    let writers: Vec<_> = (0..4).map(|_| presence(addr)).collect();
    let on_stopping = Load::start("Register on the stopping replica", 4, Duration::ZERO, {
        // One identity per worker: concurrent writes to one identity may legitimately
        // end ABORTED (its device limit is guarded by a compare on the identity's range).
        move |worker, _| {
            let mut client = writers[worker].clone();
            async move {
                let request = pb::RegisterRequest {
                    device_id: "phone".into(),
                    ttl_seconds: 30,
                    ..Default::default()
                };
                let token = device_token(&format!("writer{worker}"));
                client.register(Tokens::request(&token, request)).await?;
                Ok(())
            }
        }
    });
    let on_staying = Load::start(
        "GetPresence on the other replica",
        2,
        Duration::from_millis(5),
        move |_, _| async move { presence_at(other, "writer0", 0).await.map(|_| ()) },
    );
    more_successes(&on_stopping, 40).await;

    let (in_flight_before, signalled) = terminate(&stopping).await;
    for session in &mut sessions {
        let status = session.end().await.expect("the session ends with a status");
        assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    }
    let ended = watch.end(Duration::from_secs(5)).await.unwrap_err();
    assert_eq!(ended.code(), Code::Unavailable, "{ended:?}");
    let status = stopping.wait().await;
    let exited = signalled.elapsed();
    // At once: no polling.
    let left_behind = keys_under(&mut client, &records_prefix).await;
    let lease_left = lease_exists(&mut client, replica_lease).await;
    println!("exited with {status} {exited:?} after SIGTERM");
    assert!(status.success(), "{status}");
    assert!(exited < EXIT_BOUND, "{exited:?}");
    assert!(
        left_behind.is_empty(),
        "sessions left in etcd: {left_behind:?}"
    );
    assert!(!lease_left, "the replica lease outlived the process");

    let on_stopping = on_stopping.stop().await;
    let on_staying = on_staying.stop().await;
    assert_drained(&on_stopping, in_flight_before);
    println!("{}", on_staying.summary());
    assert!(on_staying.other_than(&[Code::Ok]).is_empty());
    let now = crate::fault_support::etcd_revision(&mut client).await;
    for i in 0..5 {
        let found = presence_at(other, &format!("user{i}"), now).await.unwrap();
        assert!(found.devices.is_empty(), "user{i} still present");
    }
}

/// limiter-svc drains on SIGTERM under load, and its shards move at once.
///
/// Bounds checked: a queued Acquire in flight at the signal is answered (REJECTED at its
/// 1.5 s deadline, the key being full) and Acquires in flight complete; later calls to it
/// are UNAVAILABLE; it exits 0 within [`EXIT_BOUND`]; at that moment its lease, membership
/// and shard ownership are gone from etcd; the other replica serves every key within 2 s
/// of the exit — far sooner than the 5 s TTL, so it was the revoke — and still counts the
/// slot held through the stopped one. Before the signal the two replicas own half the
/// shards each; the stopping one hands its half off while it drains, so callers of the
/// other replica wait only for the handoff; their longest wait is printed.
#[tokio::test]
async fn a_limiter_replica_drains_on_sigterm_under_load() {
    let etcd = Etcd::start().await;
    let prefix = unique_prefix();
    let mut stopping = ServiceProcess::start("limiter-svc", &etcd, &prefix, &[]).await;
    let addr = stopping.addr;
    set_limit(addr, "full", 1).await;
    let resources = resources_over_all_shards("load");
    for resource in resources.iter().chain([&"full".to_owned()]) {
        let answer = poll_until(
            "the shard to be served",
            Duration::from_secs(10),
            || async {
                limiter(addr)
                    .acquire(Tokens::request(&admin(), acquire_request(resource, 1, 0)))
                    .await
                    .ok()
            },
        )
        .await;
        release(addr, &answer.into_inner().slot_id).await.unwrap();
    }
    let staying = ServiceProcess::start("limiter-svc", &etcd, &prefix, &[]).await;
    let other = staying.addr;
    let holder = limiter(other)
        .acquire(Tokens::request(&admin(), acquire_request("full", 60, 0)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(holder.decision, lpb::Decision::Granted as i32);

    let mut client = etcd.client().await;
    let members = keys_under(&mut client, &format!("{prefix}/limiter/members/")).await;
    let member_values = values_under(&mut client, &format!("{prefix}/limiter/members/")).await;
    let mine = member_values
        .iter()
        .position(|v| v.contains(&addr.to_string()))
        .expect("the stopping replica is a member");
    let replica_lease = members[mine].1;
    let owned = |values: &[String]| {
        values
            .iter()
            .filter(|v| v.contains(&addr.to_string()))
            .count()
    };
    let shards_prefix = format!("{prefix}/limiter/shards/");
    // The joining replica takes its even half by planned handoff.
    await_even_split_of_two(&etcd, &prefix, addr).await;

    let queued = tokio::spawn(async move {
        limiter(addr)
            .acquire(Tokens::request(&admin(), acquire_request("full", 5, 1500)))
            .await
            .map(tonic::Response::into_inner)
    });
    poll_until(
        "the waiter to be queued",
        Duration::from_secs(5),
        || async { (usage(addr, "full").await.ok()?.queued == 1).then_some(()) },
    )
    .await;
    let pair = move |target: std::net::SocketAddr, resource: String| async move {
        acquire_and_release(target, &resource).await
    };
    // The call measured on the stopping replica is the Acquire; its Release is a second
    // call that may come after the signal, so a refused one only leaves a 5 s slot behind.
    // One connection per worker, as a real client has: a call sent before the signal is
    // then on the server's side of an accepted connection.
    let clients: Vec<_> = (0..3).map(|_| limiter(addr)).collect();
    let on_stopping = Load::start("Acquire on the stopping replica", 3, Duration::ZERO, {
        let resources = resources.clone();
        move |worker, i| {
            let resource = resources[(worker * 17 + i as usize) % resources.len()].clone();
            let mut client = clients[worker].clone();
            async move {
                let answer = client
                    .acquire(Tokens::request(&admin(), acquire_request(&resource, 5, 0)))
                    .await?
                    .into_inner();
                if answer.decision != lpb::Decision::Granted as i32 {
                    return Err(Status::resource_exhausted("rejected"));
                }
                let release = lpb::ReleaseRequest {
                    slot_id: answer.slot_id,
                };
                let _ = client.release(Tokens::request(&admin(), release)).await;
                Ok(())
            }
        }
    });
    let on_staying = Load::start(
        "Acquire+Release on the other replica",
        2,
        Duration::from_millis(5),
        {
            let resources = resources.clone();
            move |worker, i| {
                pair(
                    other,
                    resources[(worker * 29 + i as usize) % resources.len()].clone(),
                )
            }
        },
    );
    more_successes(&on_stopping, 40).await;

    let (in_flight_before, signalled) = terminate(&stopping).await;
    let status = stopping.wait().await;
    let exited_at = Instant::now();
    let exited = signalled.elapsed();
    let member_values = values_under(&mut client, &format!("{prefix}/limiter/members/")).await;
    let shard_values = values_under(&mut client, &shards_prefix).await;
    let lease_left = lease_exists(&mut client, replica_lease).await;
    println!("exited with {status} {exited:?} after SIGTERM");
    assert!(status.success(), "{status}");
    assert!(exited < EXIT_BOUND, "{exited:?}");
    assert_eq!(
        owned(&member_values),
        0,
        "membership left: {member_values:?}"
    );
    assert_eq!(
        owned(&shard_values),
        0,
        "shard ownership left: {shard_values:?}"
    );
    assert!(!lease_left, "the replica lease outlived the process");
    let waiter = queued.await.unwrap().expect("the queued Acquire was cut");
    assert_eq!(
        waiter.decision,
        lpb::Decision::Rejected as i32,
        "the key was full: {waiter:?}"
    );

    for resource in &resources {
        poll_until(
            "every key on the other replica",
            Duration::from_secs(2),
            || async { pair(other, resource.clone()).await.ok() },
        )
        .await;
    }
    let moved = exited_at.elapsed();
    println!("every key served by the other replica {moved:?} after the exit");
    let on_stopping = on_stopping.stop().await;
    let on_staying = on_staying.stop().await;
    assert_drained(&on_stopping, in_flight_before);
    println!("{}", on_staying.summary());
    let allowed = [Code::Ok, Code::Unavailable];
    let odd = on_staying.unexpected_failures(&allowed, exited_at + moved);
    assert!(odd.is_empty(), "{odd:#?}");
    let full = limiter(other)
        .acquire(Tokens::request(&admin(), acquire_request("full", 5, 0)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (full.decision, full.in_flight),
        (lpb::Decision::Rejected as i32, 1),
        "the slot held through the stopped replica was forgotten"
    );
}

/// router-svc drains on SIGTERM under load: ringing communications end, slots free at once.
///
/// Bounds checked: 3 Routes ringing on it at the signal complete with outcome FAILED and
/// Routes in flight complete, later ones are UNAVAILABLE; a WatchCommunication on it
/// delivers ENDED and ends OK; it exits 0 within [`EXIT_BOUND`]; at that moment its
/// replica lease is gone from etcd and no communication is left RINGING; the ended records
/// stay readable through the other replica; the limiter's `communications` slots are back
/// to 0 within 1 s of the exit (their hold is 10 s: released, not expired).
#[tokio::test]
async fn a_router_replica_drains_on_sigterm_under_load() {
    let etcd = Etcd::start().await;
    let prefix = unique_prefix();
    let presence_svc = ServiceProcess::start("presence-svc", &etcd, &prefix, &[]).await;
    let limiter_svc = ServiceProcess::start("limiter-svc", &etcd, &prefix, &[]).await;
    let (presence_arg, limiter_arg) = (presence_svc.addr.to_string(), limiter_svc.addr.to_string());
    let args = ["--presence", &presence_arg, "--limiter", &limiter_arg];
    let mut stopping = ServiceProcess::start("router-svc", &etcd, &prefix, &args).await;
    let staying = ServiceProcess::start("router-svc", &etcd, &prefix, &args).await;
    let (addr, other) = (stopping.addr, staying.addr);
    let (device, _) = device_task(presence_svc.addr, "alice", "phone", false).await;
    put_dial_app(other, "support", "alice").await.unwrap();
    put_app(
        other,
        "quick",
        "<Response><Say>hello</Say><Hangup/></Response>",
    )
    .await
    .unwrap();

    let mut ringing = Vec::new();
    for i in 0..3 {
        let id = format!("CM-ring-{i}");
        ringing.push(tokio::spawn(async move {
            loop {
                match route(addr, "support", &id).await {
                    Err(status) if status.code() == Code::NotFound => {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                    other => return other,
                }
            }
        }));
    }
    let mut client = etcd.client().await;
    let comms_prefix = format!("{prefix}/router/comms/{ACCOUNT}/CM-ring-");
    let replica_lease = poll_until(
        "3 communications ringing",
        Duration::from_secs(10),
        || async {
            for i in 0..3 {
                let comm = get_communication(other, &format!("CM-ring-{i}"))
                    .await
                    .ok()?;
                if comm.state != rpb::CommunicationState::Ringing as i32 {
                    return None;
                }
            }
            keys_under(&mut etcd.client().await, &comms_prefix)
                .await
                .first()
                .map(|(_, lease)| *lease)
        },
    )
    .await;
    let mut watch = router(addr)
        .watch_communication(Tokens::request(
            &admin(),
            rpb::WatchCommunicationRequest {
                account_id: ACCOUNT.into(),
                communication_id: "CM-ring-0".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    let watching = tokio::spawn(async move {
        let mut kinds = Vec::new();
        let end = loop {
            match watch.message().await {
                Ok(Some(message)) => kinds.push(message.event.map_or(0, |e| e.kind)),
                Ok(None) => break Ok(()),
                Err(status) => break Err(status),
            }
        };
        (kinds, end)
    });
    let quick = |mut client: RouterServiceClient<Channel>, id: String| async move {
        let comm = route_on(&mut client, "quick", &id).await?;
        if comm.state == rpb::CommunicationState::Ended as i32 {
            Ok(())
        } else {
            Err(Status::internal(format!("not ended: {comm:?}")))
        }
    };
    // One connection per worker, as a real client has: a call sent before the signal is
    // then on the server's side of an accepted connection.
    let clients: Vec<_> = (0..3).map(|_| router(addr)).collect();
    let on_stopping = Load::start("Route on the stopping replica", 3, Duration::ZERO, {
        move |worker, i| quick(clients[worker].clone(), format!("CM-s{worker}-{i}"))
    });
    let others: Vec<_> = (0..2).map(|_| router(other)).collect();
    let on_staying = Load::start("Route on the other replica", 2, Duration::from_millis(5), {
        move |worker, i| quick(others[worker].clone(), format!("CM-o{worker}-{i}"))
    });
    more_successes(&on_stopping, 20).await;

    let (in_flight_before, signalled) = terminate(&stopping).await;
    let status = stopping.wait().await;
    let exited_at = Instant::now();
    let exited = signalled.elapsed();
    let lease_left = lease_exists(&mut client, replica_lease).await;
    println!("exited with {status} {exited:?} after SIGTERM");
    assert!(status.success(), "{status}");
    assert!(exited < EXIT_BOUND, "{exited:?}");
    assert!(!lease_left, "the replica lease outlived the process");
    for (i, routing) in ringing.into_iter().enumerate() {
        let comm = routing.await.unwrap().expect("a ringing Route was cut");
        assert_eq!(
            comm.outcome,
            rpb::Outcome::Failed as i32,
            "CM-ring-{i}: {comm:?}"
        );
        let stored = get_communication(other, &format!("CM-ring-{i}"))
            .await
            .unwrap();
        assert_eq!(stored.state, rpb::CommunicationState::Ended as i32);
    }
    let (kinds, end) = watching.await.unwrap();
    assert_eq!(end.map_err(|s| s.code()), Ok(()));
    assert_eq!(kinds.last(), Some(&(rpb::TimelineEventKind::Ended as i32)));

    let on_stopping = on_stopping.stop().await;
    let on_staying = on_staying.stop().await;
    assert_drained(&on_stopping, in_flight_before);
    println!("{}", on_staying.summary());
    assert!(on_staying.other_than(&[Code::Ok]).is_empty());
    poll_until(
        "every communications slot to be released",
        Duration::from_secs(1),
        || async {
            (usage(limiter_svc.addr, "communications")
                .await
                .ok()?
                .in_flight
                == 0)
                .then_some(())
        },
    )
    .await;
    println!("slots back to 0 {:?} after the exit", exited_at.elapsed());
    device.abort();
}

/// GetCommunication of [`ACCOUNT`] through `addr`.
async fn get_communication(
    addr: std::net::SocketAddr,
    id: &str,
) -> Result<rpb::Communication, Status> {
    let request = rpb::GetCommunicationRequest {
        account_id: ACCOUNT.into(),
        communication_id: id.into(),
    };
    let response = router(addr)
        .get_communication(Tokens::request(&admin(), request))
        .await?;
    Ok(response.into_inner().communication.unwrap_or_default())
}

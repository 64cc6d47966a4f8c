//! A router replica that dies or stops while a communication rings: the offers are
//! cancelled, another replica settles what the dead one ran (`router_lost`: FAILED, slot
//! released, status callback sent), a stopping one ends its own; a replica whose lease is
//! lost keeps serving.

use std::time::Duration;

use integration::{ServiceProcess, poll_until};
use proto::presence::v1 as ppb;
use proto::router::v1 as pb;
use proto::router::v1::{LegEndReason as Leg, Outcome};

use crate::router_support::{Router, WebhookServer, World, leg_reasons, outcome};

#[tokio::test]
async fn a_router_killed_while_ringing_is_settled_by_another_replica_as_router_lost() {
    let world = World::start(10).await;
    let callbacks = WebhookServer::start(|_| (204, String::new())).await;
    world
        .put_app(pb::Application {
            address: "support".into(),
            instructions: "<Response><Dial timeout=\"60\"><Client>alice</Client></Dial></Response>"
                .into(),
            status_callback_url: callbacks.url("/status"),
            ..Default::default()
        })
        .await;
    let mut alice = world.device("alice", "phone").await;
    let (presence, limiter) = (
        world.presence.addr.to_string(),
        world.limiter.addr.to_string(),
    );
    let args = [
        "--presence",
        presence.as_str(),
        "--limiter",
        limiter.as_str(),
        "--allow-private-webhooks",
    ];
    let mut doomed = ServiceProcess::start("router-svc", &world.etcd, &world.prefix, &args).await;
    let doomed_client = Router {
        client: proto::router::v1::router_service_client::RouterServiceClient::new(
            plumbing::client::channel(&doomed.addr.to_string()).unwrap(),
        ),
        token: crate::router_support::admin(),
    };
    let routing = tokio::spawn(async move { doomed_client.route("support", "CM-crash").await });
    alice.offer().await;
    assert_eq!(world.slots_in_flight().await, 1);
    let survivor = world.router();
    // The ringing state is stored with the slot it holds before the kill.
    poll_until("the ringing record", Duration::from_secs(5), || async {
        (survivor.get("CM-crash").await.ok()?.state == pb::CommunicationState::Ringing as i32)
            .then_some(())
    })
    .await;

    doomed.kill().await;
    let killed = std::time::Instant::now();
    assert_eq!(
        alice.cancelled().await,
        ppb::CancelReason::Failed,
        "presence cancels the orphaned offer"
    );
    assert!(
        routing.await.unwrap().is_err(),
        "the caller's Route fails with the replica"
    );
    // Until its lease (TTL 5 s) expires the record says ringing; then the survivor's sweep
    // (every 5/3 s) settles it.
    let settled = poll_until(
        "the dead replica's communication to be settled",
        Duration::from_secs(15),
        || async {
            let comm = survivor.get("CM-crash").await.ok()?;
            (comm.state == pb::CommunicationState::Ended as i32).then_some(comm)
        },
    )
    .await;
    let took = killed.elapsed();
    println!("router_lost: settled {took:?} after the kill (replica TTL 5 s)");
    assert_eq!(outcome(&settled), Outcome::Failed);
    assert_eq!(leg_reasons(&settled), vec![Leg::Failed]);
    let ended = settled.timeline.last().expect("a timeline");
    assert_eq!(ended.kind, pb::TimelineEventKind::Ended as i32);
    assert_eq!(
        ended.details.get("reason").map(String::as_str),
        Some("router_lost")
    );
    assert!(
        took < Duration::from_secs(5 + 4),
        "settled {took:?} after the kill: more than the TTL and two sweeps"
    );
    // The slot is released by the settling replica, long before its 10 s hold would end.
    assert_eq!(
        world.slots_in_flight().await,
        0,
        "the lost communication's slot is still held"
    );
    let status = crate::router_support::poll_for(&callbacks, "CommunicationStatus", "ended").await;
    assert_eq!(status.param("CommunicationSid"), Some("CM-crash"));
    assert_eq!(status.param("Outcome"), Some("failed"));
    // Nothing is left in the index, and every replica reads the same settled record.
    let mut etcd = world.etcd.client().await;
    let index = etcd
        .get(
            format!("{}/router/owned/", world.prefix),
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_count_only(),
            ),
        )
        .await
        .unwrap();
    assert_eq!(index.count(), 0, "index entries left over");
    let other = world.another_router().await;
    assert_eq!(
        Router::new(&other).get("CM-crash").await.unwrap(),
        survivor.get("CM-crash").await.unwrap()
    );
}

#[tokio::test]
async fn a_stopping_router_ends_its_communications_and_releases_their_slots() {
    let world = World::start(10).await;
    world
        .inline(
            "support",
            "<Response><Dial timeout=\"60\"><Client>alice</Client></Dial></Response>",
        )
        .await;
    let mut alice = world.device("alice", "phone").await;
    let stopping = world.another_router().await;
    let client = Router::new(&stopping);
    let routing = tokio::spawn({
        let client = client.clone();
        async move { client.route("support", "CM-stop").await }
    });
    alice.offer().await;
    let shutdown = tokio::spawn(stopping.shutdown());
    assert_eq!(alice.cancelled().await, ppb::CancelReason::Failed);
    let comm = routing.await.unwrap().unwrap();
    assert_eq!(outcome(&comm), Outcome::Failed);
    assert_eq!(leg_reasons(&comm), vec![Leg::Failed]);
    shutdown.await.unwrap().unwrap();
    assert_eq!(
        world.slots_in_flight().await,
        0,
        "released at once, not by expiry"
    );
    let stored = world.router().get("CM-stop").await.unwrap();
    assert_eq!(
        stored.state,
        pb::CommunicationState::Ended as i32,
        "the final record outlives the replica"
    );
}

/// A record and index entry under a live replica's own lease with no runner behind them
/// (left by a creation etcd applied after its call had failed, or a final write given up):
/// the replica's own sweep settles the orphan; no other replica would, as the lease is alive.
#[tokio::test]
async fn an_orphaned_record_under_a_live_replicas_lease_is_settled_by_that_replica() {
    let world = World::start(10).await;
    world
        .inline(
            "support",
            "<Response><Dial timeout=\"60\"><Client>alice</Client></Dial></Response>",
        )
        .await;
    let mut alice = world.device("alice", "phone").await;
    let router = world.router();
    let routing = tokio::spawn({
        let router = router.clone();
        async move { router.route("support", "CM-running").await }
    });
    alice.offer().await;
    let entries = index_entries(&world).await;
    assert_eq!(entries.len(), 1, "one communication indexed");
    let lease = entries[0].0;

    // The orphan: a ringing record and its index entry under the same live lease.
    let record_key = format!(
        "{}/router/comms/{}/CM-orphan",
        world.prefix,
        crate::router_support::ACCOUNT
    );
    let orphan = router_svc::model::StoredRecord {
        communication: Some(pb::Communication {
            communication_id: "CM-orphan".into(),
            account_id: crate::router_support::ACCOUNT.into(),
            to: "support".into(),
            state: pb::CommunicationState::Ringing as i32,
            ..Default::default()
        }),
        owner: world.router.addr.to_string(),
        slot_id: String::new(),
    };
    let mut etcd = world.etcd.client().await;
    etcd.put(
        record_key.as_str(),
        prost::Message::encode_to_vec(&orphan),
        None,
    )
    .await
    .unwrap();
    etcd.put(
        format!(
            "{}/router/owned/{lease:016x}/{}/CM-orphan",
            world.prefix,
            crate::router_support::ACCOUNT
        ),
        record_key.as_str(),
        None,
    )
    .await
    .unwrap();

    let settled = poll_until(
        "the orphan to be settled by its own replica",
        Duration::from_secs(15),
        || async {
            let comm = router.get("CM-orphan").await.ok()?;
            (comm.state == pb::CommunicationState::Ended as i32).then_some(comm)
        },
    )
    .await;
    assert_eq!(outcome(&settled), Outcome::Failed);
    assert_eq!(
        settled
            .timeline
            .last()
            .and_then(|e| e.details.get("reason"))
            .map(String::as_str),
        Some("router_lost")
    );
    // The communication that does run here is left alone: still ringing, still indexed.
    let entries = index_entries(&world).await;
    assert_eq!(entries.len(), 1, "{entries:?}");
    assert!(entries[0].1.ends_with("/CM-running"), "{entries:?}");
    assert_eq!(
        router.get("CM-running").await.unwrap().state,
        pb::CommunicationState::Ringing as i32
    );
    router.hangup("CM-running").await.unwrap();
    routing.await.unwrap().unwrap();
    assert!(index_entries(&world).await.is_empty());
}

/// The index entries of the world's communications: (owner lease, key).
async fn index_entries(world: &World) -> Vec<(i64, String)> {
    let mut etcd = world.etcd.client().await;
    let root = format!("{}/router/owned/", world.prefix);
    let found = etcd
        .get(
            root.as_str(),
            Some(etcd_client::GetOptions::new().with_prefix()),
        )
        .await
        .unwrap();
    found
        .kvs()
        .iter()
        .map(|kv| {
            let key = kv.key_str().unwrap().to_owned();
            let lease = key[root.len()..].split('/').next().unwrap();
            (i64::from_str_radix(lease, 16).unwrap(), key)
        })
        .collect()
}

#[tokio::test]
async fn a_router_whose_lease_is_revoked_keeps_serving_and_its_communications() {
    let world = World::start(10).await;
    world
        .inline(
            "support",
            "<Response><Dial timeout=\"60\"><Client>alice</Client></Dial></Response>",
        )
        .await;
    let mut alice = world.device("alice", "phone").await;
    let router = world.router();
    let routing = tokio::spawn({
        let router = router.clone();
        async move { router.route("support", "CM-lease").await }
    });
    let offer = alice.offer().await;
    let entries = index_entries(&world).await;
    assert_eq!(entries.len(), 1, "one communication indexed");
    let old = entries[0].0;
    world.etcd.client().await.lease_revoke(old).await.unwrap();

    // The replica gets a new lease and moves the running communication's entry under it.
    poll_until(
        "the index entry under the new lease",
        Duration::from_secs(15),
        || async {
            let entries = index_entries(&world).await;
            (entries.len() == 1 && entries[0].0 != old).then_some(())
        },
    )
    .await;
    // The communication goes on: the device answers, it connects, a hangup ends it.
    alice
        .answer(&offer, true, ppb::RejectReason::Unspecified)
        .await;
    let connected = routing.await.unwrap().unwrap();
    assert_eq!(
        connected.state,
        pb::CommunicationState::Connected as i32,
        "{}",
        crate::router_support::story(&connected)
    );
    let ended = router.hangup("CM-lease").await.unwrap();
    assert_eq!(outcome(&ended), Outcome::Connected);
    assert_eq!(alice.ended().await, ppb::EndReason::RemoteHangup);
    world.slots_freed(Duration::from_secs(5)).await;
    assert!(
        index_entries(&world).await.is_empty(),
        "the entry outlived its communication"
    );
    // New communications are routed by the same replica.
    let routing = tokio::spawn({
        let router = router.clone();
        async move { router.route("support", "CM-after").await }
    });
    alice.offer().await;
    assert!(
        !world.router.join.is_finished(),
        "the router stopped on losing its lease"
    );
    router.hangup("CM-after").await.unwrap();
    routing.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_frozen_router_settled_by_another_replica_ends_its_communication_and_overwrites_nothing()
{
    let world = World::start(10).await;
    world
        .inline(
            "support",
            "<Response><Dial timeout=\"60\"><Client>alice</Client></Dial></Response>",
        )
        .await;
    let mut alice = world.device("alice", "phone").await;
    let (presence, limiter) = (
        world.presence.addr.to_string(),
        world.limiter.addr.to_string(),
    );
    let args = [
        "--presence",
        presence.as_str(),
        "--limiter",
        limiter.as_str(),
        "--allow-private-webhooks",
    ];
    let mut frozen = ServiceProcess::start("router-svc", &world.etcd, &world.prefix, &args).await;
    let frozen_client = Router {
        client: proto::router::v1::router_service_client::RouterServiceClient::new(
            plumbing::client::channel(&frozen.addr.to_string()).unwrap(),
        ),
        token: crate::router_support::admin(),
    };
    let routing = tokio::spawn({
        let client = frozen_client.clone();
        async move { client.route("support", "CM-frozen").await }
    });
    alice.offer().await;
    let survivor = world.router();

    // Frozen past its lease TTL (5 s): the survivor settles what it ran.
    frozen.pause().await;
    let settled = poll_until(
        "the frozen replica's communication to be settled",
        Duration::from_secs(20),
        || async {
            let comm = survivor.get("CM-frozen").await.ok()?;
            (comm.state == pb::CommunicationState::Ended as i32).then_some(comm)
        },
    )
    .await;
    let ended = settled.timeline.last().expect("a timeline");
    assert_eq!(
        ended.details.get("reason").map(String::as_str),
        Some("router_lost")
    );
    world.slots_freed(Duration::from_secs(5)).await;

    // Thawed, it finds its write refused (the index entry is gone), ends the communication
    // here too — the offer is cancelled — and writes nothing over the settled record.
    frozen.resume().await;
    assert_eq!(alice.cancelled().await, ppb::CancelReason::Failed);
    let local = routing.await.unwrap().unwrap();
    assert_eq!(local.state, pb::CommunicationState::Ended as i32);
    assert_eq!(
        survivor.get("CM-frozen").await.unwrap(),
        settled,
        "the thawed owner overwrote the settled record"
    );
    assert!(index_entries(&world).await.is_empty());

    // It serves on under its new lease.
    assert!(frozen.exited().is_none(), "the thawed router stopped");
    let next = tokio::spawn({
        let client = frozen_client.clone();
        async move { client.route("support", "CM-next").await }
    });
    alice.offer().await;
    frozen_client.hangup("CM-next").await.unwrap();
    assert_eq!(outcome(&next.await.unwrap().unwrap()), Outcome::Canceled);
}

//! A router replica that dies or stops while a communication rings: the offers are
//! cancelled, the slot frees itself, and the communication ends.

use std::time::Duration;

use integration::{ServiceProcess, poll_until};
use proto::presence::v1 as ppb;
use proto::router::v1 as pb;
use proto::router::v1::{LegEndReason as Leg, Outcome};

use crate::router_support::{Router, World, leg_reasons, outcome};

#[tokio::test]
async fn a_router_killed_while_ringing_frees_its_slot_and_ends_the_communication() {
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
    assert_eq!(
        survivor.get("CM-crash").await.unwrap().state,
        pb::CommunicationState::Ringing as i32
    );

    doomed.kill().await;
    assert_eq!(
        alice.cancelled().await,
        ppb::CancelReason::Failed,
        "presence cancels the orphaned offer"
    );
    assert!(
        routing.await.unwrap().is_err(),
        "the caller's Route fails with the replica"
    );
    // The record goes with the replica lease (TTL 5 s) and the slot with its hold (10 s).
    poll_until(
        "the dead replica's communication to end",
        Duration::from_secs(15),
        || async {
            (survivor.get("CM-crash").await.err()?.code() == tonic::Code::NotFound).then_some(())
        },
    )
    .await;
    world.slots_freed(Duration::from_secs(20)).await;
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

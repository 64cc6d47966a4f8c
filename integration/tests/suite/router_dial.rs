//! Routing to live devices: every outcome of a Dial and every leg end reason, against real
//! presence sessions and a real limiter.

use std::time::Duration;

use proto::presence::v1 as ppb;
use proto::router::v1 as pb;
use proto::router::v1::{LegEndReason as Leg, Outcome, TimelineEventKind as Kind};

use crate::router_support::{World, kinds, leg_reasons, outcome, story};

const DIAL_ALICE_BOB: &str = "<Response><Dial timeout=\"10\"><Client>alice</Client><Client><Identity>bob</Identity><Parameter name=\"queue\" value=\"vip\"/></Client></Dial></Response>";

#[tokio::test]
async fn the_first_accept_wins_and_the_other_devices_are_cancelled() {
    let world = World::start(10).await;
    world.inline("support", DIAL_ALICE_BOB).await;
    let mut phone = world.device("alice", "phone").await;
    let mut laptop = world.device("alice", "laptop").await;
    let mut bob = world.device("bob", "desk").await;
    let router = world.router();
    let mut request = pb::RouteRequest {
        account_id: "AC1".into(),
        from: "+15550100".into(),
        to: "support".into(),
        communication_id: "CM-first".into(),
        ..Default::default()
    };
    request
        .parameters
        .insert("caller_name".into(), "Carol".into());
    let routing = tokio::spawn({
        let router = router.clone();
        async move { router.route_with(request).await }
    });
    let offer = phone.offer().await;
    let other = laptop.offer().await;
    let bobs = bob.offer().await;
    assert_eq!(offer.communication_id, "CM-first");
    assert_eq!(offer.from, "+15550100");
    assert_eq!(offer.parameters["caller_name"], "Carol");
    assert_eq!(bobs.parameters["queue"], "vip");
    assert!(!offer.parameters.contains_key("queue"));
    assert_ne!(offer.offer_id, other.offer_id);
    laptop
        .answer(&other, true, ppb::RejectReason::Unspecified)
        .await;
    let comm = routing.await.unwrap().unwrap();
    assert_eq!(comm.state, pb::CommunicationState::Connected as i32);
    assert_eq!(outcome(&comm), Outcome::Connected);
    assert_eq!(
        (
            comm.connected_identity.as_str(),
            comm.connected_device_id.as_str()
        ),
        ("alice", "laptop")
    );
    assert_eq!(
        phone.cancelled().await,
        ppb::CancelReason::AnsweredElsewhere
    );
    assert_eq!(bob.cancelled().await, ppb::CancelReason::AnsweredElsewhere);
    assert_eq!(comm.legs.len(), 3);
    let winner = comm.legs.iter().find(|l| l.device_id == "laptop").unwrap();
    assert_eq!(winner.state, pb::LegState::Connected as i32);
    assert!(
        comm.legs
            .iter()
            .filter(|l| l.device_id != "laptop")
            .all(|l| l.end_reason == Leg::AnsweredElsewhere as i32)
    );
    assert_eq!(
        world.slots_in_flight().await,
        1,
        "a connected communication holds its slot"
    );

    // The caller hangs up: the connected device is told, the leg ends answered.
    let ended = router.hangup("CM-first").await.unwrap();
    assert_eq!(laptop.ended().await, ppb::EndReason::RemoteHangup);
    assert_eq!(ended.state, pb::CommunicationState::Ended as i32);
    assert_eq!(
        outcome(&ended),
        Outcome::Connected,
        "stays connected after hangup"
    );
    let winner = ended.legs.iter().find(|l| l.device_id == "laptop").unwrap();
    assert_eq!(winner.end_reason, Leg::Answered as i32);
    assert_eq!(*kinds(&ended).last().unwrap(), Kind::Ended);
    assert!(kinds(&ended).contains(&Kind::Connected));
    assert!(kinds(&ended).contains(&Kind::Hangup));
    assert_eq!(world.slots_in_flight().await, 0, "hangup released the slot");
    // Hangup is idempotent and Get reads the stored record.
    assert_eq!(
        router.hangup("CM-first").await.unwrap().end_time,
        ended.end_time
    );
    assert_eq!(
        router.get("CM-first").await.unwrap().timeline.len(),
        ended.timeline.len()
    );
}

#[tokio::test]
async fn an_identity_without_available_devices_is_offline_at_once() {
    let world = World::start(10).await;
    world
        .inline(
            "sales",
            "<Response><Dial timeout=\"60\"><Client>nobody</Client></Dial></Response>",
        )
        .await;
    let started = std::time::Instant::now();
    let comm = world.router().route("sales", "CM-off").await.unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "did not wait for the dial timeout"
    );
    assert_eq!(outcome(&comm), Outcome::Offline);
    assert_eq!(comm.state, pb::CommunicationState::Ended as i32);
    assert!(comm.legs.is_empty());
    assert!(kinds(&comm).contains(&Kind::Presence));
    world.slots_freed(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn declines_end_rejected_and_busy_rejections_end_busy() {
    let world = World::start(10).await;
    world.inline("support", DIAL_ALICE_BOB).await;
    let mut alice = world.device("alice", "phone").await;
    let mut bob = world.device("bob", "desk").await;
    let router = world.router();
    for (id, reason, expected) in [
        ("CM-rej", ppb::RejectReason::Declined, Outcome::Rejected),
        ("CM-busy", ppb::RejectReason::Busy, Outcome::Busy),
    ] {
        let routing = tokio::spawn({
            let router = router.clone();
            async move { router.route("support", id).await }
        });
        let (a, b) = (alice.offer().await, bob.offer().await);
        alice.answer(&a, false, reason).await;
        bob.answer(&b, false, reason).await;
        let comm = routing.await.unwrap().unwrap();
        assert_eq!(outcome(&comm), expected, "{}", story(&comm));
        assert_eq!(leg_reasons(&comm), vec![Leg::Rejected, Leg::Rejected]);
    }
    world.slots_freed(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn unanswered_offers_time_out_with_no_answer() {
    let world = World::start(10).await;
    world.inline("support", "<Response><Dial timeout=\"1\"><Client>alice</Client></Dial><Say>Sorry</Say></Response>").await;
    let mut alice = world.device("alice", "phone").await;
    let routing = tokio::spawn({
        let router = world.router();
        async move { router.route("support", "CM-timeout").await }
    });
    let offer = alice.offer().await;
    assert!(offer.expire_time.is_some());
    assert_eq!(alice.cancelled().await, ppb::CancelReason::Timeout);
    let comm = routing.await.unwrap().unwrap();
    assert_eq!(outcome(&comm), Outcome::NoAnswer);
    assert_eq!(leg_reasons(&comm), vec![Leg::Timeout]);
    assert!(
        story(&comm).contains("Say: Sorry"),
        "verbs after a Dial without action run: {}",
        story(&comm)
    );
}

#[tokio::test]
async fn the_device_hanging_up_ends_the_communication() {
    let world = World::start(10).await;
    world
        .inline(
            "support",
            "<Response><Dial><Client>alice</Client></Dial></Response>",
        )
        .await;
    let mut alice = world.device("alice", "phone").await;
    let routing = tokio::spawn({
        let router = world.router();
        async move { router.route("support", "CM-devhang").await }
    });
    let offer = alice.offer().await;
    alice
        .answer(&offer, true, ppb::RejectReason::Unspecified)
        .await;
    assert_eq!(
        routing.await.unwrap().unwrap().state,
        pb::CommunicationState::Connected as i32
    );
    alice.hangup("CM-devhang").await;
    assert_eq!(alice.ended().await, ppb::EndReason::DeviceHangup);
    let comm = world.router().ended("CM-devhang").await;
    assert_eq!(outcome(&comm), Outcome::Connected);
    assert_eq!(leg_reasons(&comm), vec![Leg::Answered]);
    assert!(story(&comm).contains("hung up"), "{}", story(&comm));
    world.slots_freed(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn the_time_limit_ends_a_connected_communication() {
    let world = World::start(10).await;
    world
        .inline(
            "support",
            "<Response><Dial timeLimit=\"1\"><Client>alice</Client></Dial></Response>",
        )
        .await;
    let mut alice = world.device("alice", "phone").await;
    let routing = tokio::spawn({
        let router = world.router();
        async move { router.route("support", "CM-limit").await }
    });
    let offer = alice.offer().await;
    alice
        .answer(&offer, true, ppb::RejectReason::Unspecified)
        .await;
    routing.await.unwrap().unwrap();
    assert_eq!(alice.ended().await, ppb::EndReason::TimeLimit);
    let comm = world.router().ended("CM-limit").await;
    assert!(story(&comm).contains("time limit"), "{}", story(&comm));
    assert_eq!(leg_reasons(&comm), vec![Leg::Answered]);
}

#[tokio::test]
async fn a_hangup_while_ringing_cancels_the_offers() {
    let world = World::start(10).await;
    world.inline("support", "<Response><Dial timeout=\"30\" action=\"/never\"><Client>alice</Client></Dial></Response>").await;
    let mut alice = world.device("alice", "phone").await;
    let router = world.router();
    let routing = tokio::spawn({
        let router = router.clone();
        async move { router.route("support", "CM-cancel").await }
    });
    alice.offer().await;
    let ended = router.hangup("CM-cancel").await.unwrap();
    assert_eq!(alice.cancelled().await, ppb::CancelReason::CallerCanceled);
    assert_eq!(outcome(&ended), Outcome::Canceled);
    assert_eq!(leg_reasons(&ended), vec![Leg::CallerCanceled]);
    let routed = routing.await.unwrap().unwrap();
    assert_eq!(outcome(&routed), Outcome::Canceled);
    world.slots_freed(Duration::from_secs(5)).await;
}

#[tokio::test]
async fn a_device_that_disconnects_while_ringing_ends_its_leg_offline() {
    let world = World::start(10).await;
    world
        .inline(
            "support",
            "<Response><Dial timeout=\"30\"><Client>alice</Client></Dial></Response>",
        )
        .await;
    let mut alice = world.device("alice", "phone").await;
    let routing = tokio::spawn({
        let router = world.router();
        async move { router.route("support", "CM-gone").await }
    });
    alice.offer().await;
    drop(alice);
    let comm = routing.await.unwrap().unwrap();
    assert_eq!(outcome(&comm), Outcome::Offline, "{}", story(&comm));
    assert_eq!(leg_reasons(&comm), vec![Leg::Offline]);
}

#[tokio::test]
async fn over_the_limit_route_is_busy_at_once_with_the_reason() {
    let world = World::start(10).await;
    world.set_limit(1).await;
    world
        .inline(
            "support",
            "<Response><Dial><Client>alice</Client></Dial></Response>",
        )
        .await;
    let mut alice = world.device("alice", "phone").await;
    let router = world.router();
    let first = tokio::spawn({
        let router = router.clone();
        async move { router.route("support", "CM-one").await }
    });
    let offer = alice.offer().await;
    alice
        .answer(&offer, true, ppb::RejectReason::Unspecified)
        .await;
    first.await.unwrap().unwrap();
    let second = router.route("support", "CM-two").await.unwrap();
    assert_eq!(outcome(&second), Outcome::Busy);
    assert_eq!(kinds(&second)[1], Kind::Limit);
    assert!(story(&second).contains("1 of 1"), "{}", story(&second));
    router.hangup("CM-one").await.unwrap();
    assert_eq!(alice.ended().await, ppb::EndReason::RemoteHangup);
    let third = tokio::spawn({
        let router = router.clone();
        async move { router.route("support", "CM-three").await }
    });
    let offer = alice.offer().await;
    alice
        .answer(&offer, false, ppb::RejectReason::Declined)
        .await;
    assert_eq!(
        outcome(&third.await.unwrap().unwrap()),
        Outcome::Rejected,
        "the slot was freed by the hangup"
    );
}

#[tokio::test]
async fn route_is_idempotent_by_communication_id_across_replicas() {
    let world = World::start(10).await;
    world
        .inline(
            "support",
            "<Response><Dial><Client>alice</Client></Dial></Response>",
        )
        .await;
    let mut alice = world.device("alice", "phone").await;
    let other = world.another_router().await;
    let (here, there) = (world.router(), crate::router_support::Router::new(&other));
    let first = tokio::spawn({
        let here = here.clone();
        async move { here.route("support", "CM-idem").await }
    });
    let offer = alice.offer().await;
    // A retry on the other replica joins the same communication and waits like the first.
    let retry = tokio::spawn({
        let there = there.clone();
        async move { there.route("support", "CM-idem").await }
    });
    alice
        .answer(&offer, true, ppb::RejectReason::Unspecified)
        .await;
    let (a, b) = (first.await.unwrap().unwrap(), retry.await.unwrap().unwrap());
    assert_eq!(a.communication_id, b.communication_id);
    assert_eq!(b.state, pb::CommunicationState::Connected as i32);
    assert_eq!(b.legs.len(), 1, "routed once");
    let mut changed = pb::RouteRequest {
        account_id: "AC1".into(),
        from: "+15559999".into(),
        to: "support".into(),
        communication_id: "CM-idem".into(),
        ..Default::default()
    };
    let conflict = there.route_with(changed.clone()).await.unwrap_err();
    assert_eq!(conflict.code(), tonic::Code::AlreadyExists);
    // Hangup through the other replica reaches the owner.
    let ended = there.hangup("CM-idem").await.unwrap();
    assert_eq!(ended.state, pb::CommunicationState::Ended as i32);
    assert_eq!(alice.ended().await, ppb::EndReason::RemoteHangup);
    changed.from = "+15550100".into();
    let again = there.route_with(changed).await.unwrap();
    assert_eq!(
        again.end_time, ended.end_time,
        "a retry after the end returns the ended communication"
    );
    other.shutdown().await.unwrap();
}

#[tokio::test]
async fn a_decline_here_ends_one_leg_and_a_decline_everywhere_ends_them_all_rejected() {
    let world = World::start(10).await;
    world.inline("support", DIAL_ALICE_BOB).await;
    let mut phone = world.device("alice", "phone").await;
    let mut laptop = world.device("alice", "laptop").await;
    let mut bob = world.device("bob", "desk").await;
    let router = world.router();
    let routing = tokio::spawn({
        let router = router.clone();
        async move { router.route("support", "CM-decline").await }
    });
    let (on_phone, on_laptop, _) = (phone.offer().await, laptop.offer().await, bob.offer().await);

    // Declined here: only the phone's leg ends; the others keep ringing.
    phone.decline(&on_phone, ppb::DeclineScope::Here).await;
    let ringing = poll_until_leg_ends(&router, "CM-decline", "phone").await;
    assert_eq!(ringing.state, pb::CommunicationState::Ringing as i32);
    let laptop_leg = ringing
        .legs
        .iter()
        .find(|l| l.device_id == "laptop")
        .unwrap();
    assert_eq!(
        laptop_leg.state,
        pb::LegState::Ringing as i32,
        "{}",
        story(&ringing)
    );

    // Declined everywhere from the laptop: bob's offer is cancelled with the reason, and
    // the communication ends REJECTED.
    laptop
        .decline(&on_laptop, ppb::DeclineScope::Everywhere)
        .await;
    assert_eq!(bob.cancelled().await, ppb::CancelReason::DeclinedElsewhere);
    let comm = routing.await.unwrap().unwrap();
    let ended = router.ended("CM-decline").await;
    assert_eq!(outcome(&ended), Outcome::Rejected, "{}", story(&ended));
    let reason_of = |device: &str| {
        ended
            .legs
            .iter()
            .find(|l| l.device_id == device)
            .map(|l| Leg::try_from(l.end_reason).unwrap())
    };
    assert_eq!(reason_of("phone"), Some(Leg::Rejected));
    assert_eq!(reason_of("laptop"), Some(Leg::Rejected));
    assert_eq!(reason_of("desk"), Some(Leg::DeclinedElsewhere));
    assert!(
        ended
            .timeline
            .iter()
            .any(|e| e.message.contains("declined for every device")),
        "{}",
        story(&ended)
    );
    assert_eq!(comm.communication_id, "CM-decline");
    world.slots_freed(Duration::from_secs(5)).await;
}

/// Polls until the leg of `device` in communication `id` has ended; the communication then.
async fn poll_until_leg_ends(
    router: &crate::router_support::Router,
    id: &str,
    device: &str,
) -> pb::Communication {
    integration::poll_until("the leg to end", Duration::from_secs(5), || async {
        let comm = router.get(id).await.ok()?;
        let ended = comm
            .legs
            .iter()
            .any(|l| l.device_id == device && l.state == pb::LegState::Ended as i32);
        ended.then_some(comm)
    })
    .await
}

#[tokio::test]
async fn delivered_and_ringing_show_in_the_leg_the_timeline_the_watch_and_status_callbacks() {
    let world = World::start(10).await;
    let callbacks = crate::router_support::WebhookServer::start(|_| (204, String::new())).await;
    world
        .put_app(pb::Application {
            address: "support".into(),
            instructions: "<Response><Dial timeout=\"10\"><Client>alice</Client></Dial></Response>"
                .into(),
            status_callback_url: callbacks.url("/status"),
            ..Default::default()
        })
        .await;
    let mut alice = world.device("alice", "phone").await;
    let router = world.router();
    let routing = tokio::spawn({
        let router = router.clone();
        async move { router.route("support", "CM-progress").await }
    });
    let offer = alice.offer().await;
    let mut client = router.client.clone();
    let mut watch = client
        .watch_communication(integration::Tokens::request(
            &router.token,
            pb::WatchCommunicationRequest {
                account_id: crate::router_support::ACCOUNT.into(),
                communication_id: "CM-progress".into(),
            },
        ))
        .await
        .unwrap()
        .into_inner();
    alice.ringing(&offer).await;
    // Said twice, recorded once.
    alice.ringing(&offer).await;
    let mut seen = Vec::new();
    while !seen.contains(&Kind::LegRinging) {
        let message = tokio::time::timeout(Duration::from_secs(5), watch.message())
            .await
            .expect("a watch event")
            .unwrap()
            .expect("the watch open");
        seen.push(Kind::try_from(message.event.unwrap().kind).unwrap());
    }
    let delivered_at = seen.iter().position(|k| *k == Kind::LegDelivered);
    let started_at = seen.iter().position(|k| *k == Kind::LegStarted);
    assert!(
        started_at < delivered_at && delivered_at.is_some(),
        "started, then delivered, then ringing: {seen:?}"
    );
    alice
        .answer(&offer, true, ppb::RejectReason::Unspecified)
        .await;
    routing.await.unwrap().unwrap();
    let ended = router.hangup("CM-progress").await.unwrap();
    let leg = &ended.legs[0];
    let (delivered, ringing, answered) = (
        ms(leg.delivered_time),
        ms(leg.ringing_time),
        ms(leg.answer_time),
    );
    assert!(delivered <= ringing && ringing <= answered);
    let progress: Vec<Kind> = kinds(&ended)
        .into_iter()
        .filter(|k| matches!(k, Kind::LegDelivered | Kind::LegRinging))
        .collect();
    assert_eq!(progress, vec![Kind::LegDelivered, Kind::LegRinging]);

    // The status callbacks name each step, in order.
    crate::router_support::poll_for(&callbacks, "StatusCallbackEvent", "completed").await;
    let events: Vec<String> = callbacks
        .requests()
        .iter()
        .filter_map(|r| r.param("StatusCallbackEvent").map(str::to_owned))
        .collect();
    assert_eq!(
        events,
        ["initiated", "delivered", "ringing", "answered", "completed"],
        "status callback events"
    );
    let ringing_callback = callbacks
        .requests()
        .into_iter()
        .find(|r| r.param("StatusCallbackEvent") == Some("ringing"))
        .unwrap();
    assert_eq!(ringing_callback.param("Identity"), Some("alice"));
    assert_eq!(ringing_callback.param("DeviceId"), Some("phone"));
    assert_eq!(ringing_callback.param("LegId"), Some(leg.leg_id.as_str()));
}

/// The `why` of the LEG_STARTED event of `identity`'s first leg.
fn why_started(comm: &pb::Communication, identity: &str) -> String {
    let leg = comm
        .legs
        .iter()
        .find(|l| l.identity == identity)
        .unwrap_or_else(|| panic!("no leg of {identity}: {}", story(comm)));
    comm.timeline
        .iter()
        .find(|e| e.kind == Kind::LegStarted as i32 && e.leg_id == leg.leg_id)
        .and_then(|e| e.details.get("why").cloned())
        .unwrap_or_default()
}

/// When the communication's (first) Dial began: the time of its INSTRUCTION event.
fn dial_time(comm: &pb::Communication) -> Option<prost_types::Timestamp> {
    comm.timeline
        .iter()
        .find(|e| {
            e.kind == Kind::Instruction as i32 && e.details.get("verb").is_some_and(|v| v == "Dial")
        })
        .unwrap_or_else(|| panic!("no Dial in the timeline: {}", story(comm)))
        .time
}

/// A timestamp in ms since the epoch; a missing one fails the test (reading it as 0 would
/// let a comparison of two times pass without either being set).
fn ms(t: Option<prost_types::Timestamp>) -> i64 {
    let t = t.expect("the timestamp is set");
    t.seconds * 1000 + i64::from(t.nanos) / 1_000_000
}

#[tokio::test]
async fn a_delayed_client_rings_after_its_delay_or_at_once_when_every_earlier_leg_ended() {
    let world = World::start(10).await;
    world
        .inline(
            "support",
            "<Response><Dial timeout=\"30\"><Client>alice</Client><Client delay=\"3\">bob</Client></Dial></Response>",
        )
        .await;
    let mut alice = world.device("alice", "phone").await;
    let mut bob = world.device("bob", "desk").await;
    let router = world.router();

    // Nobody answers: bob is rung once his delay has passed, alice still ringing.
    let routing = tokio::spawn({
        let router = router.clone();
        async move { router.route("support", "CM-delay").await }
    });
    let first = alice.offer().await;
    let second = bob.offer().await;
    let ringing = router.get("CM-delay").await.unwrap();
    let (alice_leg, bob_leg) = (&ringing.legs[0], &ringing.legs[1]);
    assert_eq!(alice_leg.identity, "alice");
    // The delay counts from the Dial (not from alice's leg, which starts after her
    // presence is read); the router's clock counts whole milliseconds, so two readings
    // 3,000 ms apart may show as 2,999.
    assert!(
        ms(bob_leg.start_time) - ms(dial_time(&ringing)) >= 2999,
        "bob was rung before his delay: {}",
        story(&ringing)
    );
    assert_eq!(why_started(&ringing, "alice"), "at once");
    assert_eq!(why_started(&ringing, "bob"), "its delay passed");
    bob.answer(&second, true, ppb::RejectReason::Unspecified)
        .await;
    assert_eq!(
        alice.cancelled().await,
        ppb::CancelReason::AnsweredElsewhere
    );
    assert_eq!(routing.await.unwrap().unwrap().connected_identity, "bob");
    let _ = first;
    router.hangup("CM-delay").await.unwrap();
    assert_eq!(bob.ended().await, ppb::EndReason::RemoteHangup);

    // Alice declines at once: bob is rung without waiting for his delay.
    let routing = tokio::spawn({
        let router = router.clone();
        async move { router.route("support", "CM-early").await }
    });
    let first = alice.offer().await;
    alice.decline(&first, ppb::DeclineScope::Here).await;
    let second = bob.offer().await;
    let ringing = router.get("CM-early").await.unwrap();
    assert_eq!(why_started(&ringing, "bob"), "every earlier leg had ended");
    assert!(
        ms(ringing.legs[1].start_time) - ms(ringing.legs[0].start_time) < 3000,
        "bob waited for his delay although alice had declined: {}",
        story(&ringing)
    );
    bob.answer(&second, true, ppb::RejectReason::Unspecified)
        .await;
    assert_eq!(routing.await.unwrap().unwrap().connected_identity, "bob");
    router.hangup("CM-early").await.unwrap();
}

#[tokio::test]
async fn a_sequential_dial_rings_one_client_at_a_time_and_advances_on_timeout_or_rejection() {
    let world = World::start(10).await;
    world
        .inline(
            "support",
            "<Response><Dial sequential=\"true\" timeout=\"20\"><Client timeout=\"2\">alice</Client><Client>bob</Client><Client>carol</Client></Dial></Response>",
        )
        .await;
    let mut alice = world.device("alice", "phone").await;
    let mut bob = world.device("bob", "desk").await;
    let mut carol = world.device("carol", "tablet").await;
    let router = world.router();
    let routing = tokio::spawn({
        let router = router.clone();
        async move { router.route("support", "CM-seq").await }
    });
    // Alice alone rings, for her own 2 s; then her offer times out and bob's turn starts.
    alice.offer().await;
    let ringing = router.get("CM-seq").await.unwrap();
    assert_eq!(ringing.legs.len(), 1, "{}", story(&ringing));
    assert_eq!(alice.cancelled().await, ppb::CancelReason::Timeout);
    let on_bob = bob.offer().await;
    // Bob declines: carol's turn starts at once.
    bob.decline(&on_bob, ppb::DeclineScope::Here).await;
    let on_carol = carol.offer().await;
    carol
        .answer(&on_carol, true, ppb::RejectReason::Unspecified)
        .await;
    let comm = routing.await.unwrap().unwrap();
    assert_eq!(comm.connected_identity, "carol");
    assert_eq!(
        leg_reasons(&router.hangup("CM-seq").await.unwrap()),
        vec![Leg::Timeout, Leg::Rejected, Leg::Answered]
    );
    assert_eq!(why_started(&comm, "alice"), "first in turn");
    assert_eq!(
        why_started(&comm, "bob"),
        "the previous Client's turn ended"
    );
    assert_eq!(
        why_started(&comm, "carol"),
        "the previous Client's turn ended"
    );
    let legs = &comm.legs;
    assert!(
        ms(legs[1].start_time) - ms(legs[0].start_time) >= 2000,
        "bob rang before alice's turn was over"
    );
}

#[tokio::test]
async fn a_sequential_dial_skips_offline_clients_and_ends_no_answer_after_the_last_turn() {
    let world = World::start(10).await;
    world
        .inline(
            "support",
            "<Response><Dial sequential=\"true\" timeout=\"1\"><Client>nobody</Client><Client>alice</Client></Dial></Response>",
        )
        .await;
    let mut alice = world.device("alice", "phone").await;
    let router = world.router();
    let routing = tokio::spawn({
        let router = router.clone();
        async move { router.route("support", "CM-seq-end").await }
    });
    alice.offer().await;
    assert_eq!(alice.cancelled().await, ppb::CancelReason::Timeout);
    routing.await.unwrap().unwrap();
    let ended = router.ended("CM-seq-end").await;
    assert_eq!(outcome(&ended), Outcome::NoAnswer, "{}", story(&ended));
    assert_eq!(leg_reasons(&ended), vec![Leg::Timeout]);
}

#[tokio::test]
async fn an_identity_at_its_limit_is_not_rung_and_a_dial_of_only_busy_targets_is_busy() {
    let world = World::start(10).await;
    // Every identity of the account: at most one connected communication.
    world.set_limit_of("identity.communications", 1).await;
    let actions = crate::router_support::WebhookServer::start(|_| {
        (
            200,
            "<Response><Say>everyone is busy</Say></Response>".to_owned(),
        )
    })
    .await;
    world
        .inline(
            "support",
            &format!(
                "<Response><Dial timeout=\"10\" action=\"{}\"><Client>alice</Client></Dial></Response>",
                actions.url("/after")
            ),
        )
        .await;
    let mut alice = world.device("alice", "phone").await;
    let router = world.router();

    // Alice takes a first communication: she holds her identity slot while connected.
    let first = tokio::spawn({
        let router = router.clone();
        async move { router.route("support", "CM-busy-1").await }
    });
    let offer = alice.offer().await;
    alice
        .answer(&offer, true, ppb::RejectReason::Unspecified)
        .await;
    assert_eq!(
        first.await.unwrap().unwrap().state,
        pb::CommunicationState::Connected as i32
    );
    assert_eq!(world.in_flight_of("identity.communications/alice").await, 1);

    // A second one does not ring her: her leg ends busy at once, the Dial is busy and its
    // action is told so.
    router.route("support", "CM-busy-2").await.unwrap();
    let second = router.ended("CM-busy-2").await;
    assert_eq!(leg_reasons(&second), vec![Leg::Busy], "{}", story(&second));
    let told = crate::router_support::poll_for(&actions, "DialStatus", "busy").await;
    assert_eq!(told.param("CommunicationSid"), Some("CM-busy-2"));
    assert!(
        !kinds(&second).contains(&Kind::LegStarted),
        "a busy identity was offered the communication: {}",
        story(&second)
    );

    // Hung up, she is free again: the slot is released and the next one rings her.
    router.hangup("CM-busy-1").await.unwrap();
    assert_eq!(alice.ended().await, ppb::EndReason::RemoteHangup);
    assert_eq!(
        world.in_flight_of("identity.communications/alice").await,
        0,
        "the identity slot outlived the communication"
    );
    let third = tokio::spawn({
        let router = router.clone();
        async move { router.route("support", "CM-busy-3").await }
    });
    let offer = alice.offer().await;
    assert_eq!(offer.communication_id, "CM-busy-3");
    alice
        .answer(&offer, false, ppb::RejectReason::Declined)
        .await;
    third.await.unwrap().unwrap();
    assert_eq!(
        world.in_flight_of("identity.communications/alice").await,
        0,
        "a declined communication holds no identity slot"
    );
}

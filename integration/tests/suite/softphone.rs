//! The softphone against real presence, limiter and router: automatic and typed answers,
//! status changes, hangups, moving to another presence replica, and a refused token.

use std::time::Duration;

use ::softphone::{AutoMode, Command, Error, Event, RejectAs, SoftphoneArgs};
use integration::{InProcess, Tokens};
use plumbing::server::ServeError;
use proto::presence::v1 as ppb;
use proto::router::v1 as pb;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::presence_support::{STEP, client, presence_of};
use crate::router_support::{World, leg_reasons, outcome};
use crate::support;

const DIAL_ALICE: &str = "<Response><Dial timeout=\"10\"><Client>alice</Client></Dial></Response>";

/// A softphone running in this process, driven and observed by the test.
struct Phone {
    events: mpsc::UnboundedReceiver<Event>,
    commands: mpsc::Sender<Command>,
    stop: Option<oneshot::Sender<()>>,
    join: JoinHandle<Result<(), Error>>,
}

impl Phone {
    /// Starts a softphone with `args`.
    fn start(args: SoftphoneArgs) -> Self {
        let (events_tx, events) = mpsc::unbounded_channel();
        let (commands, commands_rx) = mpsc::channel(8);
        let (stop, stopped) = oneshot::channel::<()>();
        let join = tokio::spawn(::softphone::run(args, commands_rx, events_tx, async move {
            let _ = stopped.await;
        }));
        Self {
            events,
            commands,
            stop: Some(stop),
            join,
        }
    }

    /// Starts a softphone for `world`'s alice with `auto`, and waits until the router can
    /// see her device.
    async fn alice(
        world: &World,
        auto: Option<AutoMode>,
        tweak: impl FnOnce(&mut SoftphoneArgs),
    ) -> Self {
        let mut args = SoftphoneArgs::new(
            vec![world.presence.addr.to_string()],
            &world.tenant.device("alice"),
        );
        args.auto = auto;
        tweak(&mut args);
        let mut phone = Self::start(args);
        phone.registered(world, &world.presence).await;
        phone
    }

    /// Waits for `registered` on `server`, then for presence reads to show the device.
    async fn registered(&mut self, world: &World, server: &InProcess<ServeError>) -> ppb::Device {
        let address = server.addr.to_string();
        let event = self
            .until(|e| matches!(e, Event::Registered { address: a, .. } if *a == address))
            .await;
        let Event::Registered { device, .. } = event else {
            unreachable!()
        };
        let token = world.tenant.device("alice");
        presence_of(&client(&world.presence), &token, "alice", device.revision).await;
        device
    }

    /// The next event that matches `wanted` (others are skipped).
    async fn until(&mut self, wanted: impl Fn(&Event) -> bool) -> Event {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
        loop {
            let event = tokio::time::timeout_at(deadline, self.events.recv())
                .await
                .expect("the softphone did not report it in time")
                .expect("the softphone stopped");
            if wanted(&event) {
                return event;
            }
        }
    }

    async fn type_key(&self, command: Command) {
        self.commands.send(command).await.unwrap();
    }

    /// Stops it as Ctrl-C would; its result.
    async fn stop(mut self) -> Result<(), Error> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.join.await.unwrap()
    }
}

fn route_request(id: &str) -> pb::RouteRequest {
    let mut request = pb::RouteRequest {
        account_id: "AC1".into(),
        from: "+15551234".into(),
        to: "+15550100".into(),
        communication_id: id.into(),
        ..Default::default()
    };
    request
        .parameters
        .insert("caller_name".into(), "Carol".into());
    request
}

#[tokio::test]
async fn auto_answer_connects_a_routed_communication_and_hangs_up_after_the_delay() {
    let world = World::start(10).await;
    world.inline("+15550100", DIAL_ALICE).await;
    let mut phone = Phone::alice(&world, Some(AutoMode::Answer), |args| {
        args.hangup_after_ms = Some(300);
    })
    .await;
    let router = world.router();

    let comm = router.route_with(route_request("CM-soft-1")).await.unwrap();
    assert_eq!(outcome(&comm), pb::Outcome::Connected);
    assert_eq!(comm.connected_identity, "alice");

    let Event::Offer(offer) = phone.until(|e| matches!(e, Event::Offer(_))).await else {
        unreachable!()
    };
    assert_eq!(
        (
            offer.communication_id.as_str(),
            offer.from.as_str(),
            offer.to.as_str()
        ),
        ("CM-soft-1", "+15551234", "+15550100")
    );
    assert_eq!(offer.parameters["caller_name"], "Carol");
    let line = Event::Offer(offer).to_string();
    assert!(line.starts_with("offer CM-soft-1 offer="), "{line}");
    assert!(line.contains(" from=+15551234 to=+15550100 "), "{line}");
    assert!(line.ends_with(" params=caller_name=Carol"), "{line}");
    phone.until(|e| matches!(e, Event::Connected { .. })).await;
    phone.until(|e| matches!(e, Event::HangingUp { .. })).await;
    let ended = phone.until(|e| matches!(e, Event::Ended { .. })).await;
    assert_eq!(ended.to_string(), "ended CM-soft-1 reason=device_hangup");

    let done = router.ended("CM-soft-1").await;
    assert_eq!(outcome(&done), pb::Outcome::Connected);
    assert_eq!(leg_reasons(&done), [pb::LegEndReason::Answered]);
    phone.stop().await.unwrap();
}

#[tokio::test]
async fn auto_reject_ends_routing_with_the_reason_it_gives() {
    let world = World::start(10).await;
    world.inline("+15550100", DIAL_ALICE).await;
    let mut phone = Phone::alice(&world, Some(AutoMode::Reject), |args| {
        args.reject_reason = RejectAs::Busy;
        args.answer_after_ms = 100;
    })
    .await;

    let comm = world
        .router()
        .route_with(route_request("CM-soft-2"))
        .await
        .unwrap();
    assert_eq!(outcome(&comm), pb::Outcome::Busy);
    assert_eq!(leg_reasons(&comm), [pb::LegEndReason::Rejected]);
    let rejected = phone.until(|e| matches!(e, Event::Rejected { .. })).await;
    assert!(
        rejected
            .to_string()
            .starts_with("rejected CM-soft-2 offer="),
        "{rejected}"
    );
    assert!(rejected.to_string().ends_with(" reason=busy"), "{rejected}");
    phone.stop().await.unwrap();
}

#[tokio::test]
async fn typed_keys_answer_hang_up_and_change_status() {
    let world = World::start(10).await;
    world.inline("+15550100", DIAL_ALICE).await;
    let mut phone = Phone::alice(&world, None, |_| {}).await;
    let router = world.router();

    phone.type_key(Command::Answer).await;
    phone
        .until(|e| matches!(e, Event::Note(n) if n == "nothing is ringing"))
        .await;

    let routing = tokio::spawn({
        let router = router.clone();
        async move { router.route_with(route_request("CM-soft-3")).await }
    });
    phone.until(|e| matches!(e, Event::Offer(_))).await;
    phone.type_key(Command::Answer).await;
    let comm = routing.await.unwrap().unwrap();
    assert_eq!(outcome(&comm), pb::Outcome::Connected);
    phone.type_key(Command::Hangup).await;
    let ended = phone.until(|e| matches!(e, Event::Ended { .. })).await;
    assert_eq!(ended.to_string(), "ended CM-soft-3 reason=device_hangup");

    // `s` makes alice busy: the router no longer offers her anything.
    phone.type_key(Command::CycleStatus).await;
    let Event::StatusChanged { device } = phone
        .until(|e| matches!(e, Event::StatusChanged { .. }))
        .await
    else {
        unreachable!()
    };
    assert_eq!(device.status, ppb::Status::Busy as i32);
    let token = world.tenant.device("alice");
    presence_of(&client(&world.presence), &token, "alice", device.revision).await;
    let comm = router.route_with(route_request("CM-soft-4")).await.unwrap();
    assert_eq!(outcome(&comm), pb::Outcome::Offline);

    phone.type_key(Command::Quit).await;
    phone.until(|e| matches!(e, Event::Bye)).await;
    phone.stop().await.unwrap();
}

#[tokio::test]
async fn moves_to_the_next_replica_when_its_stream_breaks() {
    let world = World::start(10).await;
    world.inline("+15550100", DIAL_ALICE).await;
    let second = support::presence(&world.etcd, &world.prefix).await;
    world.tenant.known_to(&second).await;
    let args = SoftphoneArgs {
        auto: Some(AutoMode::Answer),
        ..SoftphoneArgs::new(
            vec![second.addr.to_string(), world.presence.addr.to_string()],
            &world.tenant.device("alice"),
        )
    };
    let mut phone = Phone::start(args);
    let first_device = phone.registered(&world, &second).await;

    second.shutdown().await.unwrap();
    let disconnected = phone
        .until(|e| matches!(e, Event::Disconnected { .. }))
        .await;
    let line = disconnected.to_string();
    assert!(
        line.contains(&format!("next={}", world.presence.addr)),
        "{line}"
    );
    let device = phone.registered(&world, &world.presence).await;
    assert_eq!(
        device.device_id, first_device.device_id,
        "the reconnected device keeps its id"
    );

    let comm = world
        .router()
        .route_with(route_request("CM-soft-5"))
        .await
        .unwrap();
    assert_eq!(outcome(&comm), pb::Outcome::Connected);
    phone.stop().await.unwrap();
}

#[tokio::test]
async fn a_refused_token_stops_it_without_retrying_or_showing_the_token() {
    let world = World::start(10).await;
    let forged = Tokens::signed(
        "no-such-key",
        "wrong-secret-wrong-secret",
        "AC1",
        Some("alice"),
        &[plumbing::auth::Scope::PresenceRegister],
        600,
    );
    let phone = Phone::start(SoftphoneArgs::new(
        vec![world.presence.addr.to_string()],
        &forged,
    ));
    let result = tokio::time::timeout(STEP, phone.join)
        .await
        .unwrap()
        .unwrap();
    let err = result.unwrap_err();
    assert!(
        matches!(
            err,
            Error::Refused {
                code: tonic::Code::Unauthenticated,
                ..
            }
        ),
        "{err}"
    );
    assert!(!err.to_string().contains(&forged));
}

#[tokio::test]
async fn a_second_softphone_with_the_same_device_id_takes_over_and_the_first_stops() {
    let world = World::start(10).await;
    let token = world.tenant.device("alice");
    let shared = |token: &str| SoftphoneArgs {
        device_id: Some("shared".into()),
        ..SoftphoneArgs::new(vec![world.presence.addr.to_string()], token)
    };
    let mut first = Phone::start(shared(&token));
    first.registered(&world, &world.presence).await;
    let mut second = Phone::start(shared(&token));
    second.registered(&world, &world.presence).await;

    // Reconnecting would take the device back and start a tug of war: the first one stops.
    let result = tokio::time::timeout(STEP, first.join)
        .await
        .unwrap()
        .unwrap();
    assert!(matches!(result, Err(Error::Displaced { .. })), "{result:?}");
    second.stop().await.unwrap();
}

#[tokio::test]
async fn the_decline_everywhere_key_ends_every_leg_and_offers_are_reported_ringing() {
    let world = World::start(10).await;
    world
        .inline(
            "+15550100",
            "<Response><Dial timeout=\"10\"><Client>alice</Client><Client>bob</Client></Dial></Response>",
        )
        .await;
    let mut phone = Phone::alice(&world, None, |_| {}).await;
    let mut bob = world.device("bob", "desk").await;
    let router = world.router();
    let routing = tokio::spawn({
        let router = router.clone();
        async move { router.route_with(route_request("CM-soft-e")).await }
    });
    phone.until(|e| matches!(e, Event::Offer(_))).await;
    bob.offer().await;
    // The softphone told the router it is alerting its user.
    integration::poll_until("alice's leg ringing", Duration::from_secs(5), || async {
        let comm = router.get("CM-soft-e").await.ok()?;
        comm.legs
            .iter()
            .any(|l| l.identity == "alice" && l.ringing_time.is_some())
            .then_some(())
    })
    .await;

    phone.type_key(Command::RejectEverywhere).await;
    let rejected = phone.until(|e| matches!(e, Event::Rejected { .. })).await;
    assert!(
        rejected.to_string().ends_with(" everywhere=true"),
        "{rejected}"
    );
    assert_eq!(bob.cancelled().await, ppb::CancelReason::DeclinedElsewhere);
    let comm = routing.await.unwrap().unwrap();
    assert_eq!(outcome(&comm), pb::Outcome::Rejected);
    phone.stop().await.unwrap();
}

//! The communication's rules, driven through the machine with no socket and no clock:
//! each test feeds events at chosen times and checks the record and the effects.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use bytes::Bytes;
use proto::presence::v1 as ppb;
use proto::presence::v1::offer_request::Kind as Ask;
use proto::router::v1 as pb;
use proto::router::v1::{CommunicationState as State, LegEndReason, Outcome};

use super::dial::DELIVERY_WITHIN_MS;
use super::*;
use crate::apps::AppRecord;

const INSTRUCTIONS: &str = "https://app.example/voice";
const FALLBACK: &str = "https://app.example/fallback";

/// A machine and its record, with the clock in the test's hands.
struct Sim {
    machine: Machine,
    rec: pb::Communication,
    now: u64,
}

fn app(instructions: &str, url: &str, fallback: &str) -> Arc<AppRecord> {
    Arc::new(AppRecord {
        instructions_url: url.into(),
        method: "POST".into(),
        fallback_url: fallback.into(),
        instructions: instructions.into(),
        status_callback_url: String::new(),
        signing_secret: "s".into(),
        create_ms: 0,
        update_ms: 0,
    })
}

impl Sim {
    fn with(app: Arc<AppRecord>, fail_closed: bool) -> Self {
        let rec = pb::Communication {
            communication_id: "c1".into(),
            account_id: "acme".into(),
            from: "+15550001".into(),
            to: "+15550002".into(),
            channel: "voice".into(),
            state: State::Routing as i32,
            ..Default::default()
        };
        Self {
            machine: Machine::new(app, fail_closed, 1_000_000),
            rec,
            now: 0,
        }
    }

    /// Inline instructions, admitted.
    fn inline(xml: &str) -> (Self, Vec<Effect>) {
        let mut sim = Self::with(app(xml, "", ""), false);
        let effects = sim.admit();
        (sim, effects)
    }

    /// Instructions from the webhook (with a fallback URL when given), admitted.
    fn fetching(fallback: &str) -> (Self, Vec<Effect>) {
        let mut sim = Self::with(app("", INSTRUCTIONS, fallback), false);
        let effects = sim.admit();
        (sim, effects)
    }

    fn admit(&mut self) -> Vec<Effect> {
        let effects = self.feed(Event::Start);
        let (ticket, work) = only_work(&effects);
        assert!(matches!(work, Work::AcquireSlot));
        self.answer(ticket, Answer::Slot(Decision::Granted))
    }

    fn feed(&mut self, event: Event) -> Vec<Effect> {
        let effects = self.machine.handle(&mut self.rec, self.now, event);
        let saves = effects.iter().filter(|e| matches!(e, Effect::Save)).count();
        assert!(saves <= 1, "one step saves the record at most once");
        effects
    }

    fn answer(&mut self, ticket: u64, answer: Answer) -> Vec<Effect> {
        assert!(self.machine.awaits(ticket));
        self.feed(Event::Done { ticket, answer })
    }

    /// Answers the fetch among `effects` with a 200 and `body`.
    fn document(&mut self, effects: &[Effect], body: &str) -> Vec<Effect> {
        let (ticket, _, _) = fetch_of(effects);
        let fetched = Fetched {
            duration_ms: 3,
            result: Ok((200, Bytes::from(body.to_owned()))),
        };
        self.answer(ticket, Answer::Fetched(fetched))
    }

    /// Fails the fetch among `effects` with HTTP `status`.
    fn fail_fetch(&mut self, effects: &[Effect], status: u16) -> Vec<Effect> {
        let (ticket, _, _) = fetch_of(effects);
        let failure = FetchFailure {
            http_status: Some(status),
            error: format!("HTTP {status}"),
        };
        let fetched = Fetched {
            duration_ms: 3,
            result: Err(failure),
        };
        self.answer(ticket, Answer::Fetched(fetched))
    }

    /// Answers the presence read among `effects`.
    fn presence(&mut self, effects: &[Effect], clients: Vec<ClientPresence>) -> Vec<Effect> {
        let ticket = presence_of(effects).0;
        self.answer(ticket, Answer::Presence(Ok(clients)))
    }

    fn leg(&mut self, link: usize, news: LegNews) -> Vec<Effect> {
        self.feed(Event::Leg { link, news })
    }

    fn accept(&mut self, link: usize) -> Vec<Effect> {
        self.leg(
            link,
            LegNews::Answered {
                accept: true,
                busy: false,
                everywhere: false,
            },
        )
    }

    fn decline(&mut self, link: usize, busy: bool, everywhere: bool) -> Vec<Effect> {
        self.leg(
            link,
            LegNews::Answered {
                accept: false,
                busy,
                everywhere,
            },
        )
    }

    /// Moves the clock to `at` and ticks.
    fn at(&mut self, at: u64) -> Vec<Effect> {
        self.now = at;
        self.feed(Event::Tick)
    }

    fn hangup(&mut self, source: HangupSource) -> Vec<Effect> {
        self.feed(Event::Hangup(source))
    }

    fn outcome(&self) -> Outcome {
        Outcome::try_from(self.rec.outcome).unwrap()
    }

    fn ended(&self) -> bool {
        self.machine.is_ended() && self.rec.state == State::Ended as i32
    }

    fn reasons(&self) -> Vec<LegEndReason> {
        self.rec
            .legs
            .iter()
            .map(|l| LegEndReason::try_from(l.end_reason).unwrap())
            .collect()
    }

    fn last_message(&self) -> &str {
        &self.rec.timeline.last().unwrap().message
    }

    fn has_event(&self, text: &str) -> bool {
        self.rec.timeline.iter().any(|e| e.message.contains(text))
    }
}

fn only_work(effects: &[Effect]) -> (u64, &Work) {
    let works: Vec<(u64, &Work)> = effects
        .iter()
        .filter_map(|e| match e {
            Effect::Work { ticket, work } => Some((*ticket, work)),
            _ => None,
        })
        .collect();
    assert_eq!(works.len(), 1, "one piece of work in {effects:?}");
    works[0]
}

fn fetch_of(effects: &[Effect]) -> (u64, &WebhookUrl, &Vec<(String, String)>) {
    match only_work(effects) {
        (ticket, Work::Fetch { url, params, .. }) => (ticket, url, params),
        other => panic!("expected a fetch, got {other:?}"),
    }
}

fn presence_of(effects: &[Effect]) -> (u64, Vec<String>) {
    match only_work(effects) {
        (ticket, Work::ReadPresence { identities }) => (ticket, identities.clone()),
        other => panic!("expected a presence read, got {other:?}"),
    }
}

fn param<'a>(params: &'a [(String, String)], name: &str) -> &'a str {
    params
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
        .unwrap_or_else(|| panic!("no {name} in {params:?}"))
}

/// An available identity with these live devices.
fn online(devices: &[&str]) -> ClientPresence {
    ClientPresence {
        status: ppb::Status::Available,
        devices: devices.len(),
        live: devices
            .iter()
            .map(|d| LiveDevice {
                device_id: (*d).into(),
                replica: "presence-1".into(),
            })
            .collect(),
        usage: IdentityUsage::Unlimited,
    }
}

fn offline() -> ClientPresence {
    ClientPresence {
        status: ppb::Status::Offline,
        devices: 0,
        live: Vec::new(),
        usage: IdentityUsage::Unlimited,
    }
}

fn opened(effects: &[Effect]) -> Vec<(usize, String)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::OpenLeg { link, start, .. } => Some((*link, start.device_id.clone())),
            _ => None,
        })
        .collect()
}

fn cancels(effects: &[Effect]) -> Vec<(usize, ppb::CancelReason)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Tell {
                link,
                kind: Ask::Cancel(cancel),
            } => Some((*link, ppb::CancelReason::try_from(cancel.reason).unwrap())),
            _ => None,
        })
        .collect()
}

fn ends(effects: &[Effect]) -> Vec<(usize, ppb::EndReason)> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Tell {
                link,
                kind: Ask::End(end),
            } => Some((*link, ppb::EndReason::try_from(end.reason).unwrap())),
            _ => None,
        })
        .collect()
}

fn callbacks(effects: &[Effect]) -> Vec<String> {
    effects
        .iter()
        .filter_map(|e| match e {
            Effect::Callback(params) => params
                .iter()
                .find(|(k, _)| k == "StatusCallbackEvent")
                .map(|(_, v)| v.clone()),
            _ => None,
        })
        .collect()
}

const DIAL_ALICE: &str = r#"<Response><Dial timeout="20"><Client>alice</Client></Dial></Response>"#;

/// A Dial of alice (two devices) that rings both.
fn ringing_alice() -> (Sim, Vec<Effect>) {
    let (mut sim, effects) = Sim::inline(DIAL_ALICE);
    assert_eq!(presence_of(&effects).1, vec!["alice".to_owned()]);
    let effects = sim.presence(&effects, vec![online(&["phone", "laptop"])]);
    (sim, effects)
}

// Admission.

#[test]
fn a_communication_over_its_accounts_limit_ends_busy_without_instructions() {
    let mut sim = Sim::with(app("", INSTRUCTIONS, ""), false);
    let (ticket, _) = only_work(&sim.feed(Event::Start));
    let effects = sim.answer(
        ticket,
        Answer::Slot(Decision::Busy {
            in_flight: 3,
            limit: 3,
        }),
    );
    assert!(sim.ended());
    assert_eq!(sim.outcome(), Outcome::Busy);
    assert!(sim.has_event("over limit: 3 of 3"));
    assert!(!effects.iter().any(|e| matches!(e, Effect::Work { .. })));
}

#[test]
fn an_unreachable_limiter_refuses_when_fail_closed_and_routes_when_fail_open() {
    let mut closed = Sim::with(app("", INSTRUCTIONS, ""), true);
    let (ticket, _) = only_work(&closed.feed(Event::Start));
    closed.answer(ticket, Answer::Slot(Decision::Unreachable("down".into())));
    assert!(closed.ended());
    assert_eq!(closed.outcome(), Outcome::Failed);

    let mut open = Sim::with(app("", INSTRUCTIONS, ""), false);
    let (ticket, _) = only_work(&open.feed(Event::Start));
    let effects = open.answer(ticket, Answer::Slot(Decision::Unreachable("down".into())));
    assert!(!open.machine.is_ended());
    assert_eq!(fetch_of(&effects).1.to_string(), INSTRUCTIONS);
    assert!(open.has_event("routing without a slot (fail open)"));
}

#[test]
fn a_hangup_before_admission_ends_the_communication_once_admitted() {
    let mut sim = Sim::with(app("", INSTRUCTIONS, ""), false);
    let (ticket, _) = only_work(&sim.feed(Event::Start));
    sim.hangup(HangupSource::Api(String::new()));
    assert!(
        !sim.machine.is_ended(),
        "the slot's answer is still awaited"
    );
    let effects = sim.answer(ticket, Answer::Slot(Decision::Granted));
    assert!(sim.ended());
    assert_eq!(sim.outcome(), Outcome::Canceled);
    assert!(!effects.iter().any(|e| matches!(e, Effect::Work { .. })));
}

// Instructions, fallback, redirects.

#[test]
fn instructions_that_dial_nobody_end_rejected() {
    let (sim, _) = Sim::inline("<Response><Say>hello</Say><Hangup/></Response>");
    assert!(sim.ended());
    assert_eq!(sim.outcome(), Outcome::Rejected);
    assert!(sim.has_event("Say: hello"));
    assert!(sim.last_message().contains("without dialling anyone"));
}

#[test]
fn reject_ends_busy_or_rejected_as_the_instructions_say() {
    let (busy, _) = Sim::inline(r#"<Response><Reject reason="busy"/></Response>"#);
    assert_eq!(busy.outcome(), Outcome::Busy);
    let (rejected, _) = Sim::inline("<Response><Reject/></Response>");
    assert_eq!(rejected.outcome(), Outcome::Rejected);
}

#[test]
fn bad_inline_instructions_fail_the_communication() {
    let (sim, _) = Sim::inline("<Response><Dial>");
    assert!(sim.ended());
    assert_eq!(sim.outcome(), Outcome::Failed);
}

#[test]
fn a_failed_instructions_request_asks_the_fallback_with_the_same_parameters() {
    let (mut sim, effects) = Sim::fetching(FALLBACK);
    assert_eq!(param(fetch_of(&effects).2, "CommunicationSid"), "c1");
    let effects = sim.fail_fetch(&effects, 500);
    let (_, url, _) = fetch_of(&effects);
    assert_eq!(url.to_string(), FALLBACK);
    assert!(sim.has_event("asking the fallback URL"));
    sim.document(&effects, "<Response><Reject/></Response>");
    assert!(sim.ended());
    assert_eq!(sim.outcome(), Outcome::Rejected);
}

#[test]
fn when_the_fallback_fails_too_the_communication_fails_with_both_reasons() {
    let (mut sim, effects) = Sim::fetching(FALLBACK);
    let effects = sim.fail_fetch(&effects, 500);
    sim.fail_fetch(&effects, 404);
    assert!(sim.ended());
    assert_eq!(sim.outcome(), Outcome::Failed);
    assert!(sim.last_message().contains("the fallback failed too"));
}

#[test]
fn the_fallback_is_asked_once_per_communication() {
    let (mut sim, effects) = Sim::fetching(FALLBACK);
    let effects = sim.fail_fetch(&effects, 500);
    let effects = sim.document(
        &effects,
        r#"<Response><Redirect>/next</Redirect></Response>"#,
    );
    assert_eq!(fetch_of(&effects).1.to_string(), "https://app.example/next");
    let effects = sim.fail_fetch(&effects, 500);
    assert!(sim.ended(), "no second fallback: {effects:?}");
    assert_eq!(sim.outcome(), Outcome::Failed);
}

#[test]
fn a_body_that_is_not_instructions_counts_as_a_failed_request() {
    let (mut sim, effects) = Sim::fetching(FALLBACK);
    let effects = sim.document(&effects, "not xml at all <");
    assert_eq!(fetch_of(&effects).1.to_string(), FALLBACK);
}

#[test]
fn a_redirect_loop_ends_after_the_redirect_limit() {
    let (mut sim, mut effects) = Sim::fetching("");
    let mut fetched = 0;
    while !sim.machine.is_ended() {
        effects = sim.document(&effects, "<Response><Redirect>/voice</Redirect></Response>");
        fetched += 1;
        assert!(fetched <= MAX_REDIRECTS + 1, "the loop must end");
    }
    assert_eq!(fetched, MAX_REDIRECTS + 1);
    assert_eq!(sim.outcome(), Outcome::Failed);
    assert!(sim.last_message().contains("redirects (a redirect loop?)"));
}

#[test]
fn a_communication_fetches_at_most_the_fetch_limit() {
    // Each Dial's action returns a document that dials again: fetches, not redirects.
    let again = r#"<Response><Dial action="/again"><Client>nobody</Client></Dial></Response>"#;
    let (mut sim, mut effects) = Sim::fetching("");
    let mut fetched = 0;
    loop {
        effects = sim.document(&effects, again);
        fetched += 1;
        if sim.machine.is_ended() {
            break;
        }
        effects = sim.presence(&effects, vec![offline()]);
        assert!(fetched <= MAX_FETCHES, "the fetches must stop");
        if sim.machine.is_ended() {
            break;
        }
    }
    assert_eq!(fetched, MAX_FETCHES);
    assert_eq!(sim.outcome(), Outcome::Failed);
    assert!(
        sim.last_message()
            .contains("more than 25 instruction requests")
    );
}

#[test]
fn a_relative_url_of_inline_instructions_fails_the_communication() {
    let (sim, _) = Sim::inline("<Response><Redirect>/relative</Redirect></Response>");
    assert!(sim.ended());
    assert_eq!(sim.outcome(), Outcome::Failed);
    assert!(sim.has_event("bad URL `/relative`"));
}

// Pause.

#[test]
fn a_pause_waits_its_length_then_runs_the_next_verb() {
    let (mut sim, _) = Sim::inline("<Response><Pause length=\"2\"/><Reject/></Response>");
    assert_eq!(sim.machine.wake_at(&sim.rec), Some(2_000));
    sim.at(1_999);
    assert!(!sim.machine.is_ended());
    sim.at(2_000);
    assert!(sim.ended());
    assert_eq!(sim.outcome(), Outcome::Rejected);
}

#[test]
fn a_hangup_during_a_pause_cancels_at_once() {
    let (mut sim, _) = Sim::inline("<Response><Pause length=\"60\"/><Reject/></Response>");
    sim.hangup(HangupSource::Api("gone".into()));
    assert!(sim.ended());
    assert_eq!(sim.outcome(), Outcome::Canceled);
    assert!(sim.last_message().contains("hung up by the caller: gone"));
}

#[test]
fn a_hangup_during_a_fetch_ends_it_and_the_late_answer_is_stale() {
    let (mut sim, effects) = Sim::fetching(FALLBACK);
    let (ticket, _, _) = fetch_of(&effects);
    sim.hangup(HangupSource::Shutdown);
    assert!(sim.ended());
    assert_eq!(sim.outcome(), Outcome::Failed);
    assert!(!sim.machine.awaits(ticket));
    let late = sim.feed(Event::Done {
        ticket,
        answer: Answer::Fetched(Fetched {
            duration_ms: 1,
            result: Ok((200, Bytes::from_static(b"<Response/>"))),
        }),
    });
    assert!(late.is_empty());
}

// The Dial.

#[test]
fn a_dial_offers_to_every_live_device_and_the_first_accept_wins() {
    let (mut sim, effects) = ringing_alice();
    assert_eq!(
        opened(&effects),
        vec![(0, "phone".into()), (1, "laptop".into())]
    );
    assert_eq!(callbacks(&effects), vec!["initiated"]);
    let effects = sim.accept(1);
    assert_eq!(sim.rec.state, State::Connected as i32);
    assert_eq!(sim.rec.connected_device_id, "laptop");
    assert_eq!(
        cancels(&effects),
        vec![(0, ppb::CancelReason::AnsweredElsewhere)]
    );
    assert_eq!(callbacks(&effects), vec!["answered"]);
    // The loser's accept, late, is told it lost.
    let effects = sim.accept(0);
    assert_eq!(
        cancels(&effects),
        vec![(0, ppb::CancelReason::AnsweredElsewhere)]
    );
    sim.now = 65_000;
    let effects = sim.leg(1, LegNews::Hangup);
    assert!(sim.ended());
    assert_eq!(sim.outcome(), Outcome::Connected);
    assert_eq!(
        sim.reasons(),
        vec![LegEndReason::AnsweredElsewhere, LegEndReason::Answered]
    );
    assert!(sim.has_event("alice/laptop hung up"));
    assert!(effects.iter().any(|e| matches!(e, Effect::CloseLegs)));
}

#[test]
fn a_dial_that_times_out_ends_no_answer_and_tells_the_action_url() {
    let xml = r#"<Response><Dial timeout="10" action="https://app.example/after"><Client>alice</Client></Dial></Response>"#;
    let (mut sim, effects) = Sim::inline(xml);
    let effects = sim.presence(&effects, vec![online(&["phone"])]);
    assert_eq!(opened(&effects).len(), 1);
    sim.leg(0, LegNews::Delivered);
    assert_eq!(sim.machine.wake_at(&sim.rec), Some(10_000));
    let effects = sim.at(10_000);
    assert_eq!(cancels(&effects), vec![(0, ppb::CancelReason::Timeout)]);
    assert_eq!(sim.reasons(), vec![LegEndReason::Timeout]);
    let (_, url, params) = fetch_of(&effects);
    assert_eq!(url.to_string(), "https://app.example/after");
    assert_eq!(param(params, "DialStatus"), "no-answer");
    sim.document(&effects, "<Response><Hangup/></Response>");
    assert!(sim.ended());
    assert_eq!(sim.outcome(), Outcome::NoAnswer);
}

#[test]
fn every_dial_outcome_of_a_dial_that_connected_nobody() {
    // Offline: nobody has a device.
    let (mut sim, effects) = Sim::inline(DIAL_ALICE);
    sim.presence(&effects, vec![offline()]);
    assert_eq!(sim.outcome(), Outcome::Offline);
    // Rejected: the only device declines.
    let (mut sim, _) = ringing_alice();
    sim.decline(0, false, false);
    sim.decline(1, false, false);
    assert_eq!(sim.outcome(), Outcome::Rejected);
    assert_eq!(
        sim.reasons(),
        vec![LegEndReason::Rejected, LegEndReason::Rejected]
    );
    // Busy: devices reject as busy.
    let (mut sim, _) = ringing_alice();
    sim.decline(0, true, false);
    sim.decline(1, true, false);
    assert_eq!(sim.outcome(), Outcome::Busy);
    // Failed: presence cannot be read.
    let (mut sim, effects) = Sim::inline(DIAL_ALICE);
    let ticket = presence_of(&effects).0;
    sim.answer(ticket, Answer::Presence(Err("presence down".into())));
    assert_eq!(sim.outcome(), Outcome::Failed);
    assert!(sim.has_event("presence down"));
    // Failed: every leg failed.
    let (mut sim, _) = ringing_alice();
    sim.leg(0, LegNews::Failed(tonic::Status::internal("boom")));
    sim.leg(1, LegNews::Failed(tonic::Status::internal("boom")));
    assert_eq!(sim.outcome(), Outcome::Failed);
    assert_eq!(
        sim.reasons(),
        vec![LegEndReason::Failed, LegEndReason::Failed]
    );
    // Offline: the devices' sessions went away.
    let (mut sim, _) = ringing_alice();
    sim.leg(0, LegNews::Gone(ppb::LeaveReason::Disconnected as i32));
    sim.leg(1, LegNews::Failed(tonic::Status::not_found("no session")));
    assert_eq!(sim.outcome(), Outcome::Offline);
    assert_eq!(
        sim.reasons(),
        vec![LegEndReason::Offline, LegEndReason::Offline]
    );
    // Canceled: the caller hung up while it rang.
    let (mut sim, _) = ringing_alice();
    let effects = sim.hangup(HangupSource::Api(String::new()));
    assert_eq!(sim.outcome(), Outcome::Canceled);
    assert_eq!(
        cancels(&effects),
        vec![
            (0, ppb::CancelReason::CallerCanceled),
            (1, ppb::CancelReason::CallerCanceled)
        ]
    );
    assert_eq!(
        sim.reasons(),
        vec![LegEndReason::CallerCanceled, LegEndReason::CallerCanceled]
    );
}

#[test]
fn a_decline_here_ends_one_leg_and_a_decline_everywhere_ends_the_dial_rejected() {
    let (mut sim, _) = ringing_alice();
    sim.decline(0, false, false);
    assert!(!sim.machine.is_ended(), "the laptop still rings");
    assert_eq!(sim.rec.state, State::Ringing as i32);

    let (mut sim, _) = ringing_alice();
    let effects = sim.decline(0, false, true);
    assert_eq!(
        cancels(&effects),
        vec![(1, ppb::CancelReason::DeclinedElsewhere)]
    );
    assert!(sim.ended());
    assert_eq!(sim.outcome(), Outcome::Rejected);
    assert_eq!(
        sim.reasons(),
        vec![LegEndReason::Rejected, LegEndReason::DeclinedElsewhere]
    );
}

#[test]
fn a_busy_identity_is_not_rung_and_its_leg_ends_busy() {
    let (mut sim, effects) = Sim::inline(DIAL_ALICE);
    let mut alice = online(&["phone"]);
    alice.usage = IdentityUsage::Busy(1, 1);
    let effects = sim.presence(&effects, vec![alice]);
    assert!(opened(&effects).is_empty());
    assert_eq!(sim.reasons(), vec![LegEndReason::Busy]);
    assert_eq!(sim.outcome(), Outcome::Busy);
}

#[test]
fn a_limited_identity_takes_its_slot_on_answer_and_a_refusal_ends_the_leg_busy() {
    let xml = r#"<Response><Dial><Client>alice</Client><Client>bob</Client></Dial></Response>"#;
    let (mut sim, effects) = Sim::inline(xml);
    let mut alice = online(&["a1"]);
    alice.usage = IdentityUsage::Limited;
    let bob = online(&["b1"]);
    sim.presence(&effects, vec![alice, bob]);
    let effects = sim.accept(0);
    let (ticket, work) = only_work(&effects);
    assert!(matches!(work, Work::AcquireIdentitySlot { identity } if identity == "alice"));
    // Bob accepts while alice's slot is asked for: he waits his turn.
    assert!(sim.accept(1).is_empty());
    let effects = sim.answer(
        ticket,
        Answer::IdentitySlot(Decision::Busy {
            in_flight: 1,
            limit: 1,
        }),
    );
    assert_eq!(cancels(&effects), vec![(0, ppb::CancelReason::Failed)]);
    assert_eq!(sim.rec.connected_identity, "bob");
    assert_eq!(sim.reasons()[0], LegEndReason::Busy);
}

#[test]
fn a_connected_leg_ends_at_the_time_limit() {
    let xml = r#"<Response><Dial timeLimit="30"><Client>alice</Client></Dial></Response>"#;
    let (mut sim, effects) = Sim::inline(xml);
    sim.presence(&effects, vec![online(&["phone"])]);
    sim.now = 1_000;
    sim.accept(0);
    assert_eq!(sim.machine.wake_at(&sim.rec), Some(31_000));
    let effects = sim.at(31_000);
    assert_eq!(ends(&effects), vec![(0, ppb::EndReason::TimeLimit)]);
    assert!(sim.has_event("the time limit of 30s was reached"));
    assert!(sim.ended());
    assert_eq!(sim.outcome(), Outcome::Connected);
}

#[test]
fn a_hangup_of_a_connected_communication_ends_the_leg_and_tells_the_action_url_only() {
    let xml = r#"<Response><Dial action="https://app.example/after"><Client>alice</Client></Dial></Response>"#;
    let (mut sim, effects) = Sim::inline(xml);
    sim.presence(&effects, vec![online(&["phone"])]);
    sim.accept(0);
    sim.now = 7_500;
    let effects = sim.hangup(HangupSource::Api("done".into()));
    assert_eq!(ends(&effects), vec![(0, ppb::EndReason::RemoteHangup)]);
    let (_, url, params) = fetch_of(&effects);
    assert_eq!(url.to_string(), "https://app.example/after");
    assert_eq!(param(params, "DialStatus"), "completed");
    assert_eq!(param(params, "DialDuration"), "7");
    // What the action URL says is not run: the communication ends as hung up.
    sim.document(
        &effects,
        "<Response><Dial><Client>bob</Client></Dial></Response>",
    );
    assert!(sim.ended());
    assert_eq!(sim.outcome(), Outcome::Connected);
    assert!(sim.last_message().contains("hung up by the caller: done"));
}

#[test]
fn an_offer_never_delivered_ends_offline_after_the_delivery_window() {
    let (mut sim, _) = ringing_alice();
    sim.leg(0, LegNews::Delivered);
    assert_eq!(sim.machine.wake_at(&sim.rec), Some(DELIVERY_WITHIN_MS));
    let effects = sim.at(DELIVERY_WITHIN_MS);
    assert_eq!(cancels(&effects), vec![(1, ppb::CancelReason::Failed)]);
    assert_eq!(sim.reasons()[1], LegEndReason::Offline);
    assert_eq!(sim.rec.legs[0].state, pb::LegState::Ringing as i32);
}

#[test]
fn delivered_and_ringing_are_recorded_once_each_without_a_save() {
    let (mut sim, _) = ringing_alice();
    let effects = sim.leg(0, LegNews::Delivered);
    assert_eq!(callbacks(&effects), vec!["delivered"]);
    assert!(!effects.iter().any(|e| matches!(e, Effect::Save)));
    assert!(callbacks(&sim.leg(0, LegNews::Delivered)).is_empty());
    assert_eq!(callbacks(&sim.leg(0, LegNews::Ringing)), vec!["ringing"]);
    assert!(sim.rec.legs[0].delivered_time.is_some());
    assert!(sim.rec.legs[0].ringing_time.is_some());
}

#[test]
fn a_staged_client_rings_after_its_delay_or_when_every_earlier_leg_has_ended() {
    let xml =
        r#"<Response><Dial><Client>alice</Client><Client delay="5">bob</Client></Dial></Response>"#;
    let (mut sim, effects) = Sim::inline(xml);
    assert_eq!(presence_of(&effects).1, vec!["alice".to_owned()]);
    sim.presence(&effects, vec![online(&["a1"])]);
    sim.leg(0, LegNews::Delivered);
    assert_eq!(sim.machine.wake_at(&sim.rec), Some(5_000));
    let effects = sim.at(5_000);
    assert_eq!(presence_of(&effects).1, vec!["bob".to_owned()]);
    assert!(sim.has_event("Dial alice, bob"));

    // Alice declines before bob's delay: bob rings at once.
    let (mut sim, effects) = Sim::inline(xml);
    sim.presence(&effects, vec![online(&["a1"])]);
    let effects = sim.decline(0, false, false);
    assert_eq!(presence_of(&effects).1, vec!["bob".to_owned()]);
    let effects = sim.presence(&effects, vec![online(&["b1"])]);
    let start = effects.iter().find_map(|e| match e {
        Effect::OpenLeg { start, .. } => Some(start),
        _ => None,
    });
    assert_eq!(start.unwrap().identity, "bob");
    assert!(sim.has_event("every earlier leg had ended"));
}

#[test]
fn a_sequential_dial_rings_one_client_per_turn_and_advances_when_it_ends() {
    let xml = r#"<Response><Dial sequential="true" timeout="10"><Client timeout="4">alice</Client><Client>bob</Client></Dial></Response>"#;
    let (mut sim, effects) = Sim::inline(xml);
    assert_eq!(presence_of(&effects).1, vec!["alice".to_owned()]);
    sim.presence(&effects, vec![online(&["a1"])]);
    sim.leg(0, LegNews::Delivered);
    assert_eq!(sim.machine.wake_at(&sim.rec), Some(4_000));
    let effects = sim.at(4_000);
    assert_eq!(cancels(&effects), vec![(0, ppb::CancelReason::Timeout)]);
    assert_eq!(presence_of(&effects).1, vec!["bob".to_owned()]);
    let effects = sim.presence(&effects, vec![online(&["b1"])]);
    assert_eq!(opened(&effects), vec![(1, "b1".into())]);
    sim.leg(1, LegNews::Delivered);
    // Bob's turn lasts the Dial's timeout; a sequential Dial has no deadline of its own.
    assert_eq!(sim.machine.wake_at(&sim.rec), Some(14_000));
    sim.at(14_000);
    assert!(sim.ended());
    assert_eq!(sim.outcome(), Outcome::NoAnswer);
    assert_eq!(
        sim.reasons(),
        vec![LegEndReason::Timeout, LegEndReason::Timeout]
    );
}

#[test]
fn a_presence_answer_after_the_dial_ended_is_stale() {
    let xml = r#"<Response><Dial timeout="1"><Client>alice</Client></Dial><Pause length="5"/></Response>"#;
    let (mut sim, effects) = Sim::inline(xml);
    let ticket = presence_of(&effects).0;
    sim.at(1_000);
    assert!(!sim.machine.awaits(ticket));
    assert!(sim.has_event("Pause 5s"));
    let late = sim.feed(Event::Done {
        ticket,
        answer: Answer::Presence(Ok(vec![online(&["phone"])])),
    });
    assert!(opened(&late).is_empty());
}

#[test]
fn a_late_accept_of_a_leg_whose_turn_ended_connects_nothing() {
    let xml = r#"<Response><Dial sequential="true"><Client timeout="2">alice</Client><Client>bob</Client></Dial></Response>"#;
    let (mut sim, effects) = Sim::inline(xml);
    sim.presence(&effects, vec![online(&["a1"])]);
    sim.leg(0, LegNews::Delivered);
    sim.at(2_000);
    sim.accept(0);
    assert_eq!(sim.rec.state, State::Ringing as i32);
    assert!(sim.rec.connected_identity.is_empty());
}

#[test]
fn a_stopping_replica_fails_a_ringing_dial() {
    let (mut sim, _) = ringing_alice();
    let effects = sim.hangup(HangupSource::Shutdown);
    assert_eq!(
        cancels(&effects),
        vec![
            (0, ppb::CancelReason::Failed),
            (1, ppb::CancelReason::Failed)
        ]
    );
    assert!(sim.ended());
    assert_eq!(sim.outcome(), Outcome::Failed);
    assert_eq!(
        callbacks(&effects).last().map(String::as_str),
        Some("completed")
    );
}

#[test]
fn after_a_dial_without_action_the_next_verb_runs() {
    let xml = r#"<Response><Dial><Client>alice</Client></Dial><Say>sorry</Say></Response>"#;
    let (mut sim, effects) = Sim::inline(xml);
    sim.presence(&effects, vec![offline()]);
    assert!(sim.has_event("Say: sorry"));
    assert!(sim.ended());
    assert_eq!(sim.outcome(), Outcome::Offline);
}

//! One communication as an owned state machine. [`Machine`] knows where the communication
//! is in its life and what it is waiting for. It moves on [`Event`]s and answers each with
//! the [`Effect`]s to perform. An event is an answer to work it asked for, a leg's news,
//! the clock reaching [`Machine::wake_at`], or a hangup request.
//!
//! ```text
//! ADMITTING ──slot──► instructions (inline | fetch → fallback) ──► verbs in order
//!    │                                      ▲                          │
//!    │ over limit → BUSY                    └── Redirect / Dial action ◄┤
//!    ▼                                                                  ▼
//!  ENDED ◄── Reject / Hangup / end of document / failure ◄── Dial: RINGING ──► CONNECTED
//!                                   device hangup / timeLimit / hangup request ◄──────┘
//! ```
//!
//! The machine reads no clock and touches no socket. The async shell ([`crate::runner`])
//! does the rest: it performs the effects through the ports ([`crate::ports`] for the
//! limiter, presence and the relay streams to the devices; [`crate::webhook`] for
//! fetches; [`crate::store`] and [`crate::callbacks`]) and feeds their answers back. So
//! every routing rule has a unit test that needs no socket and no clock (`tests.rs`).
//!
//! - **Time** is milliseconds since the communication began, as the shell's monotonic clock
//!   counts it. The record's timestamps are stamped with wall time by [`crate::model`];
//!   they are never used to decide anything.
//! - **The record** is the public `Communication` message the machine is handed at each
//!   step. It lives in the [`crate::live::LiveComm`] that readers share, and one step is one
//!   update of it.
//! - **Everything else is the machine's own:** the document being run, the Dial's legs and
//!   schedule, the counts of fetches and redirects, the pending hangup.
//! - **Work** (admission, a fetch, a presence read, an identity slot) carries a ticket. An
//!   answer whose ticket the machine no longer waits for is stale; [`Machine::awaits`] lets
//!   the shell drop it.
//! - **Writes:** one step saves the record at most once, and only if the state changed.
//!   The timeline events in between go out with the next save.
//! - **Hangups:** whatever step the communication is at, a hangup request ends it. The
//!   ringing legs are cancelled, a connected leg is ended, and the shell then releases the
//!   slot and writes the final record.

pub(crate) mod dial;
pub(crate) mod schedule;
#[cfg(test)]
mod tests;

use std::collections::VecDeque;
use std::sync::Arc;

use bytes::Bytes;
use proto::presence::v1 as ppb;
use proto::presence::v1::offer_request::Kind as Ask;
use proto::presence::v1::offer_response::Kind as Heard;
use proto::router::v1 as pb;
use proto::router::v1::TimelineEventKind as Kind;
use proto::router::v1::{LegEndReason, Outcome};

use crate::apps::AppRecord;
use crate::model::{self, event, finish, outcome_word, state_word};
use crate::url::WebhookUrl;
use crate::xml::{self, Method, RejectReason, Verb};
use dial::{DialResult, Dialing};

/// Most Redirects one communication may follow.
pub const MAX_REDIRECTS: u32 = 10;
/// Most documents one communication may fetch (instructions, fallback, redirects, actions).
pub const MAX_FETCHES: u32 = 25;

/// Who asked to hang up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HangupSource {
    /// A Hangup call (the caller's side).
    Api(String),
    /// The router replica is stopping.
    Shutdown,
    /// Another replica settled it (`router_lost`) while this replica could not reach etcd
    /// under its lease: it is over in etcd, so it ends here too.
    SettledElsewhere,
}

/// How a communication ends.
#[derive(Debug, Clone, PartialEq)]
pub struct Ending {
    /// Its outcome (a connected communication stays CONNECTED whatever this says).
    pub outcome: Outcome,
    /// Why, for the timeline.
    pub why: String,
    /// Reason for legs still ringing.
    pub legs: LegEndReason,
}

impl Ending {
    pub(crate) fn new(outcome: Outcome, why: impl Into<String>) -> Self {
        Self {
            outcome,
            why: why.into(),
            legs: LegEndReason::Failed,
        }
    }

    /// The ending a hangup request causes.
    pub fn hangup(source: &HangupSource) -> Self {
        match source {
            HangupSource::Api(reason) => Self {
                outcome: Outcome::Canceled,
                why: if reason.is_empty() {
                    "hung up by the caller".into()
                } else {
                    format!("hung up by the caller: {reason}")
                },
                legs: LegEndReason::CallerCanceled,
            },
            HangupSource::Shutdown => Self::new(Outcome::Failed, "the router replica stopped"),
            HangupSource::SettledElsewhere => Self::new(
                Outcome::Failed,
                "settled by another router replica while this one had lost its lease (router_lost)",
            ),
        }
    }
}

/// What moves a communication on.
#[derive(Debug)]
pub(crate) enum Event {
    /// It was created: ask for its slot.
    Start,
    /// The answer to the work with this ticket.
    Done { ticket: u64, answer: Answer },
    /// A leg (by its place in the current Dial) heard something.
    Leg { link: usize, news: LegNews },
    /// The clock reached [`Machine::wake_at`].
    Tick,
    /// A hangup was requested.
    Hangup(HangupSource),
}

/// The answer to a piece of [`Work`].
#[derive(Debug)]
pub(crate) enum Answer {
    /// The limiter's word on the communications slot.
    Slot(Decision),
    /// What a document request brought.
    Fetched(Fetched),
    /// What presence (and the limiter, for identities with live devices) said of the
    /// Clients asked about, in the order asked; or why it could not be read.
    Presence(Result<Vec<ClientPresence>, String>),
    /// The limiter's word on an accepting identity's slot.
    IdentitySlot(Decision),
}

/// The limiter's word on a slot (the shell keeps the slot itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Decision {
    /// Granted.
    Granted,
    /// No limit applies (no limiter configured).
    Unlimited,
    /// At the limit.
    Busy { in_flight: u32, limit: u32 },
    /// The limiter could not be asked; why.
    Unreachable(String),
}

/// A document request's result.
#[derive(Debug)]
pub(crate) struct Fetched {
    /// How long it took.
    pub duration_ms: u128,
    /// The HTTP status and body of a 2xx answer, or what went wrong.
    pub result: Result<(u16, Bytes), FetchFailure>,
}

/// A document request that failed.
#[derive(Debug)]
pub(crate) struct FetchFailure {
    /// The HTTP status, if the server answered with one that is not 2xx.
    pub http_status: Option<u16>,
    /// What went wrong.
    pub error: String,
}

/// What the limiter says of an identity's connected communications.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IdentityUsage {
    /// No limit applies (or the limiter cannot say): ring it, take no slot.
    Unlimited,
    /// Under its limit: ring it, take a slot when it answers.
    Limited,
    /// At its limit: (in flight, limit).
    Busy(u32, u32),
}

/// One dialled identity's presence.
#[derive(Debug, Clone)]
pub(crate) struct ClientPresence {
    /// Its overall status.
    pub status: ppb::Status,
    /// How many devices it has.
    pub devices: usize,
    /// Its available devices connected by stream: the ones that can be rung.
    pub live: Vec<LiveDevice>,
    /// The limiter's word on its connected communications.
    pub usage: IdentityUsage,
}

/// A device that can be rung, and the presence replica holding its session.
#[derive(Debug, Clone)]
pub(crate) struct LiveDevice {
    pub device_id: String,
    pub replica: String,
}

/// What a leg's relay stream reports.
#[derive(Debug)]
pub(crate) enum LegNews {
    Delivered,
    Ringing,
    Answered {
        accept: bool,
        busy: bool,
        /// A rejection for every device (`DECLINE_SCOPE_EVERYWHERE`).
        everywhere: bool,
    },
    Hangup,
    Gone(i32),
    Failed(tonic::Status),
    Closed,
}

impl LegNews {
    pub(crate) fn from(heard: Heard) -> Self {
        match heard {
            Heard::Delivered(_) => LegNews::Delivered,
            Heard::Ringing(_) => LegNews::Ringing,
            Heard::Answered(answer) => LegNews::Answered {
                accept: answer.accept,
                busy: answer.reject_reason == ppb::RejectReason::Busy as i32,
                everywhere: !answer.accept && answer.scope == ppb::DeclineScope::Everywhere as i32,
            },
            Heard::Hangup(_) => LegNews::Hangup,
            Heard::Gone(gone) => LegNews::Gone(gone.reason),
        }
    }
}

/// What the shell is asked to do.
#[derive(Debug)]
pub(crate) enum Effect {
    /// Start this work; answer with [`Event::Done`] and the ticket.
    Work { ticket: u64, work: Work },
    /// Open a leg's relay stream (the next place in the current Dial) to `replica`.
    OpenLeg {
        link: usize,
        replica: String,
        start: ppb::OfferStart,
    },
    /// Send this to a leg.
    Tell { link: usize, kind: Ask },
    /// The Dial is over: close its legs' streams and release its identity slot.
    CloseLegs,
    /// Queue the record's write (its state changed).
    Save,
    /// Send a status callback with these parameters.
    Callback(Vec<(String, String)>),
}

/// Work whose answer the machine waits for.
#[derive(Debug)]
pub(crate) enum Work {
    /// Take the communications slot.
    AcquireSlot,
    /// Request a document (or tell a Dial's action URL).
    Fetch {
        url: WebhookUrl,
        method: Method,
        params: Vec<(String, String)>,
    },
    /// Read these identities' presence, and their usage where they have live devices.
    ReadPresence { identities: Vec<String> },
    /// Take a slot of this identity's connected communications.
    AcquireIdentitySlot { identity: String },
}

/// One step's output: the record it changes and the effects it asks for.
pub(crate) struct Out<'a> {
    rec: &'a mut pb::Communication,
    effects: Vec<Effect>,
    changed_state: bool,
    ticket: u64,
}

impl Out<'_> {
    /// Changes the record. A change of state queues a status callback (with the record
    /// as it is then) and the record's save at the end of the step.
    pub(crate) fn change<T>(&mut self, change: impl FnOnce(&mut pb::Communication) -> T) -> T {
        let before = self.rec.state;
        let result = change(self.rec);
        if self.rec.state != before {
            self.changed_state = true;
            let mut params = status_params(self.rec);
            if let Some(word) = state_event(self.rec.state) {
                params.push(("StatusCallbackEvent".into(), word.into()));
            }
            self.effects.push(Effect::Callback(params));
        }
        result
    }

    /// Records a timeline event.
    pub(crate) fn note(
        &mut self,
        kind: Kind,
        message: impl Into<String>,
        details: &[(&str, String)],
    ) {
        let message = message.into();
        self.change(|c| event(c, kind, message, "", details));
    }

    pub(crate) fn rec(&self) -> &pb::Communication {
        self.rec
    }

    pub(crate) fn push(&mut self, effect: Effect) {
        self.effects.push(effect);
    }

    /// Asks for `work`; its ticket.
    pub(crate) fn work(&mut self, work: Work) -> u64 {
        self.ticket += 1;
        let ticket = self.ticket;
        self.effects.push(Effect::Work { ticket, work });
        ticket
    }
}

/// Instructions being run: the verbs not yet run, and where they came from (for relative
/// URLs; none for inline instructions).
#[derive(Debug)]
pub(crate) struct Document {
    pub(crate) verbs: VecDeque<Verb>,
    pub(crate) base: Option<WebhookUrl>,
}

/// Where the communication is.
#[derive(Debug)]
enum Phase {
    /// Created, before it is started.
    New,
    /// Waiting for the communications slot.
    Admitting { ticket: u64 },
    /// Waiting for a document request.
    Fetching {
        ticket: u64,
        url: WebhookUrl,
        method: Method,
        purpose: Purpose,
    },
    /// In a `<Pause>` until `until`, then the rest of `doc`.
    Pausing { until: u64, doc: Document },
    /// Running a `<Dial>`; then the rest of `doc`.
    Dialing {
        dialing: Box<Dialing>,
        doc: Document,
    },
    /// Over: the record is final.
    Ended,
}

/// Why a document is requested.
#[derive(Debug)]
enum Purpose {
    /// The next document to run (the instructions, a Redirect's, a Dial action's); if the
    /// request fails, the fallback URL is asked (once per communication).
    Next { extra: Vec<(String, String)> },
    /// The fallback (with the same parameters), after `why`.
    Fallback {
        why: String,
        extra: Vec<(String, String)>,
    },
    /// The action URL of a Dial the caller hung up on: it is told, not obeyed; then the
    /// communication ends so.
    Notify { ending: Ending },
}

/// One communication's life. See the module docs.
#[derive(Debug)]
pub(crate) struct Machine {
    app: Arc<AppRecord>,
    fail_closed: bool,
    /// Wall time (ms since the epoch) at time 0, for the offers' expiry.
    wall_start: i64,
    phase: Phase,
    hangup: Option<HangupSource>,
    fetches: u32,
    redirects: u32,
    fallback_used: bool,
    dialled: bool,
    ticket: u64,
}

impl Machine {
    /// A machine for a communication of `app` created at `wall_start` (ms since the
    /// epoch); `fail_closed` refuses it when the limiter cannot be asked.
    pub(crate) fn new(app: Arc<AppRecord>, fail_closed: bool, wall_start: i64) -> Self {
        Self {
            app,
            fail_closed,
            wall_start,
            phase: Phase::New,
            hangup: None,
            fetches: 0,
            redirects: 0,
            fallback_used: false,
            dialled: false,
            ticket: 0,
        }
    }

    /// Moves on `event` at `now` (ms since the communication began), changing `rec`; the
    /// effects to perform, in order.
    pub(crate) fn handle(
        &mut self,
        rec: &mut pb::Communication,
        now: u64,
        event: Event,
    ) -> Vec<Effect> {
        let mut out = Out {
            rec,
            effects: Vec::new(),
            changed_state: false,
            ticket: self.ticket,
        };
        match event {
            Event::Start => {
                if matches!(self.phase, Phase::New) {
                    let ticket = out.work(Work::AcquireSlot);
                    self.phase = Phase::Admitting { ticket };
                }
            }
            Event::Done { ticket, answer } if self.awaits(ticket) => {
                self.answered(&mut out, now, answer);
            }
            Event::Done { .. } => {}
            Event::Leg { link, news } => {
                self.in_dial(&mut out, now, |dialing, out, now| {
                    dialing.news(out, now, link, news)
                });
            }
            Event::Tick => self.tick(&mut out, now),
            Event::Hangup(source) => self.hung_up(&mut out, now, source),
        }
        self.ticket = out.ticket;
        if out.changed_state {
            out.effects.push(Effect::Save);
        }
        out.effects
    }

    /// Whether the machine waits for the answer with `ticket`.
    pub(crate) fn awaits(&self, ticket: u64) -> bool {
        match &self.phase {
            Phase::Admitting { ticket: t } | Phase::Fetching { ticket: t, .. } => *t == ticket,
            Phase::Dialing { dialing, .. } => dialing.awaits(ticket),
            Phase::New | Phase::Pausing { .. } | Phase::Ended => false,
        }
    }

    /// When the clock next matters (ms since the communication began), given its record.
    pub(crate) fn wake_at(&self, rec: &pb::Communication) -> Option<u64> {
        match &self.phase {
            Phase::Pausing { until, .. } => Some(*until),
            Phase::Dialing { dialing, .. } => dialing.wake_at(rec),
            _ => None,
        }
    }

    /// Whether the communication is over (its record final).
    pub(crate) fn is_ended(&self) -> bool {
        matches!(self.phase, Phase::Ended)
    }

    fn answered(&mut self, out: &mut Out<'_>, now: u64, answer: Answer) {
        match answer {
            Answer::Slot(decision) => self.admitted(out, now, decision),
            Answer::Fetched(fetched) => {
                let Phase::Fetching {
                    url,
                    method,
                    purpose,
                    ..
                } = std::mem::replace(&mut self.phase, Phase::Ended)
                else {
                    return;
                };
                self.fetched(out, now, url, method, purpose, fetched);
            }
            Answer::Presence(presence) => {
                let wall = self.wall_start + now as i64;
                self.in_dial(out, now, |dialing, out, now| {
                    dialing.presence(out, now, wall, presence)
                });
            }
            Answer::IdentitySlot(decision) => {
                self.in_dial(out, now, |dialing, out, now| {
                    dialing.identity_slot(out, now, decision)
                });
            }
        }
    }

    fn tick(&mut self, out: &mut Out<'_>, now: u64) {
        match &self.phase {
            Phase::Pausing { until, .. } if *until <= now => {
                let Phase::Pausing { doc, .. } = std::mem::replace(&mut self.phase, Phase::Ended)
                else {
                    return;
                };
                self.perform(out, now, doc);
            }
            Phase::Dialing { .. } => {
                self.in_dial(out, now, |dialing, out, now| dialing.tick(out, now));
            }
            _ => {}
        }
    }

    fn hung_up(&mut self, out: &mut Out<'_>, now: u64, source: HangupSource) {
        if self.hangup.is_some() {
            return;
        }
        self.hangup = Some(source.clone());
        match &self.phase {
            // Noticed once admitted (or told to the action URL first).
            Phase::New
            | Phase::Admitting { .. }
            | Phase::Ended
            | Phase::Fetching {
                purpose: Purpose::Notify { .. },
                ..
            } => {}
            Phase::Fetching { .. } | Phase::Pausing { .. } => {
                self.end(out, Ending::hangup(&source));
            }
            Phase::Dialing { .. } => {
                self.in_dial(out, now, |dialing, out, now| {
                    Some(dialing.hung_up(out, now, source))
                });
            }
        }
    }

    /// Runs `step` on the current Dial; when it says the Dial is over, goes on after it.
    fn in_dial(
        &mut self,
        out: &mut Out<'_>,
        now: u64,
        step: impl FnOnce(&mut Dialing, &mut Out<'_>, u64) -> Option<DialResult>,
    ) {
        let Phase::Dialing { dialing, .. } = &mut self.phase else {
            return;
        };
        let Some(result) = step(dialing, out, now) else {
            return;
        };
        let Phase::Dialing { dialing, doc } = std::mem::replace(&mut self.phase, Phase::Ended)
        else {
            return;
        };
        out.push(Effect::CloseLegs);
        self.after_dial(out, now, dialing.into_dial(), doc, result);
    }

    fn admitted(&mut self, out: &mut Out<'_>, now: u64, decision: Decision) {
        match decision {
            Decision::Granted => {
                out.note(
                    Kind::Limit,
                    "communications slot granted",
                    &[("decision", "granted".into())],
                );
            }
            Decision::Unlimited => out.note(
                Kind::Limit,
                "no limiter configured: communications are not limited",
                &[],
            ),
            Decision::Busy { in_flight, limit } => {
                let message =
                    format!("over limit: {in_flight} of {limit} communications in flight");
                out.note(
                    Kind::Limit,
                    message.clone(),
                    &[
                        ("decision", "rejected".into()),
                        ("in_flight", in_flight.to_string()),
                        ("limit", limit.to_string()),
                    ],
                );
                return self.end(out, Ending::new(Outcome::Busy, message));
            }
            Decision::Unreachable(why) if self.fail_closed => {
                let message = format!("the limiter is unreachable ({why}); refusing (fail closed)");
                out.note(Kind::Error, message.clone(), &[]);
                return self.end(out, Ending::new(Outcome::Failed, message));
            }
            Decision::Unreachable(why) => out.note(
                Kind::Error,
                format!("the limiter is unreachable ({why}); routing without a slot (fail open)"),
                &[],
            ),
        }
        self.begin(out, now);
    }

    /// Gets the instructions: inline, or from the instructions URL.
    fn begin(&mut self, out: &mut Out<'_>, now: u64) {
        if let Some(source) = self.hangup.clone() {
            return self.end(out, Ending::hangup(&source));
        }
        if !self.app.instructions.is_empty() {
            return match xml::parse(&self.app.instructions) {
                Ok(verbs) => self.perform(
                    out,
                    now,
                    Document {
                        verbs: verbs.into(),
                        base: None,
                    },
                ),
                Err(err) => self.end(out, Ending::new(Outcome::Failed, err.to_string())),
            };
        }
        match WebhookUrl::parse(&self.app.instructions_url) {
            Ok(url) => self.ask(
                out,
                url,
                self.app.method(),
                Purpose::Next { extra: Vec::new() },
            ),
            Err(why) => self.end(
                out,
                Ending::new(Outcome::Failed, format!("instructions_url: {why}")),
            ),
        }
    }

    /// Requests a document (counting it against [`MAX_FETCHES`]).
    fn ask(&mut self, out: &mut Out<'_>, url: WebhookUrl, method: Method, purpose: Purpose) {
        self.fetches += 1;
        if self.fetches > MAX_FETCHES {
            let why = format!("more than {MAX_FETCHES} instruction requests");
            return self.fetch_failed(out, purpose, why);
        }
        self.request(out, url, method, purpose);
    }

    fn request(&mut self, out: &mut Out<'_>, url: WebhookUrl, method: Method, purpose: Purpose) {
        let mut params = base_params(out.rec());
        match &purpose {
            Purpose::Next { extra } | Purpose::Fallback { extra, .. } => {
                params.extend(extra.iter().cloned());
            }
            Purpose::Notify { .. } => {}
        }
        let ticket = out.work(Work::Fetch {
            url: url.clone(),
            method,
            params,
        });
        self.phase = Phase::Fetching {
            ticket,
            url,
            method,
            purpose,
        };
    }

    fn fetched(
        &mut self,
        out: &mut Out<'_>,
        now: u64,
        url: WebhookUrl,
        method: Method,
        purpose: Purpose,
        fetched: Fetched,
    ) {
        let ms = fetched.duration_ms.to_string();
        let mut details = vec![
            ("url", url.to_string()),
            ("method", method.as_str().to_owned()),
            ("duration_ms", ms.clone()),
        ];
        let body = match fetched.result {
            Ok((status, body)) => {
                details.push(("http_status", status.to_string()));
                let message = format!("{} {url} -> {status} in {ms} ms", method.as_str());
                out.note(Kind::Webhook, message, &details);
                Ok(body)
            }
            Err(failure) => {
                if let Some(code) = failure.http_status {
                    details.push(("http_status", code.to_string()));
                }
                details.push(("error", failure.error.clone()));
                let message = format!("{} {url} failed: {}", method.as_str(), failure.error);
                out.note(Kind::Webhook, message.clone(), &details);
                Err(message)
            }
        };
        if let Purpose::Notify { ending } = purpose {
            return self.end(out, ending);
        }
        let verbs = match body {
            Ok(body) => match std::str::from_utf8(&body) {
                Err(_) => Err(format!("{url} answered with a body that is not UTF-8")),
                Ok(text) => xml::parse(text).map_err(|e| {
                    let why = format!("{url}: {e}");
                    out.note(Kind::Error, why.clone(), &[("url", url.to_string())]);
                    why
                }),
            },
            Err(why) => Err(why),
        };
        match verbs {
            Ok(verbs) => self.perform(
                out,
                now,
                Document {
                    verbs: verbs.into(),
                    base: Some(url),
                },
            ),
            Err(why) => self.fetch_failed(out, purpose, why),
        }
    }

    /// A document request failed (`why`): the fallback URL (once per communication) or
    /// the end.
    fn fetch_failed(&mut self, out: &mut Out<'_>, purpose: Purpose, why: String) {
        match purpose {
            Purpose::Next { extra } => {
                let fallback = WebhookUrl::parse(&self.app.fallback_url).ok();
                let Some(fallback) = fallback.filter(|_| !self.fallback_used) else {
                    return self.end(out, Ending::new(Outcome::Failed, why));
                };
                self.fallback_used = true;
                out.note(Kind::Error, format!("{why}; asking the fallback URL"), &[]);
                let purpose = Purpose::Fallback { why, extra };
                self.ask(out, fallback, self.app.method(), purpose);
            }
            Purpose::Fallback { why: first, .. } => self.end(
                out,
                Ending::new(
                    Outcome::Failed,
                    format!("{first}; the fallback failed too: {why}"),
                ),
            ),
            Purpose::Notify { ending } => self.end(out, ending),
        }
    }

    /// Runs a document's verbs until one waits, replaces the document or ends the
    /// communication.
    fn perform(&mut self, out: &mut Out<'_>, now: u64, mut doc: Document) {
        while let Some(verb) = doc.verbs.pop_front() {
            if let Some(source) = self.hangup.clone() {
                return self.end(out, Ending::hangup(&source));
            }
            match verb {
                Verb::Say { text, attributes } => {
                    let mut details = vec![("verb", "Say".to_owned()), ("text", text.clone())];
                    details.extend(attributes.iter().map(|(k, v)| (k.as_str(), v.clone())));
                    out.note(Kind::Instruction, format!("Say: {text}"), &details);
                }
                Verb::Pause { length } => {
                    out.note(
                        Kind::Instruction,
                        format!("Pause {length}s"),
                        &[("verb", "Pause".into()), ("length", length.to_string())],
                    );
                    let until = now + u64::from(length) * 1000;
                    self.phase = Phase::Pausing { until, doc };
                    return;
                }
                Verb::Reject { reason } => {
                    let (word, outcome) = match reason {
                        RejectReason::Busy => ("busy", Outcome::Busy),
                        RejectReason::Rejected => ("rejected", Outcome::Rejected),
                    };
                    out.note(
                        Kind::Instruction,
                        format!("Reject ({word})"),
                        &[("verb", "Reject".into()), ("reason", word.into())],
                    );
                    let why = format!("instructions rejected it ({word})");
                    return self.end(out, Ending::new(outcome, why));
                }
                Verb::Hangup => {
                    out.note(Kind::Instruction, "Hangup", &[("verb", "Hangup".into())]);
                    let ending = self.instructions_ended(out.rec(), "instructions said Hangup");
                    return self.end(out, ending);
                }
                Verb::Redirect { url, method } => {
                    out.note(
                        Kind::Instruction,
                        format!("Redirect to {url}"),
                        &[("verb", "Redirect".into()), ("url", url.clone())],
                    );
                    self.redirects += 1;
                    if self.redirects > MAX_REDIRECTS {
                        let why = format!("more than {MAX_REDIRECTS} redirects (a redirect loop?)");
                        out.note(Kind::Error, why.clone(), &[]);
                        return self.end(out, Ending::new(Outcome::Failed, why));
                    }
                    return match resolve(out, doc.base.as_ref(), &url) {
                        Ok(target) => {
                            let method = method.unwrap_or(self.app.method());
                            self.ask(out, target, method, Purpose::Next { extra: Vec::new() });
                        }
                        Err(ending) => self.end(out, ending),
                    };
                }
                Verb::Dial(dial) => {
                    self.dialled = true;
                    let wall = self.wall_start + now as i64;
                    let dialing = Dialing::start(out, now, wall, dial);
                    self.phase = Phase::Dialing {
                        dialing: Box::new(dialing),
                        doc,
                    };
                    return self.in_dial(out, now, |dialing, out, now| dialing.advance(out, now));
                }
            }
        }
        let ending = self.instructions_ended(out.rec(), "the instructions ended");
        self.end(out, ending);
    }

    /// Goes on after a Dial: its action URL (told and obeyed, or only told when the
    /// caller hung up), or the next verb.
    fn after_dial(
        &mut self,
        out: &mut Out<'_>,
        now: u64,
        dial: xml::Dial,
        doc: Document,
        result: DialResult,
    ) {
        let Some(action) = &dial.action else {
            if let Some(source) = result.hangup {
                return self.end(out, Ending::hangup(&source));
            }
            return self.perform(out, now, doc);
        };
        let params = vec![
            (
                "DialStatus".to_owned(),
                outcome_word(result.outcome).to_owned(),
            ),
            ("DialedIdentity".to_owned(), result.identity.clone()),
            ("DialDuration".to_owned(), result.duration_secs.to_string()),
        ];
        let method = dial.method.unwrap_or(self.app.method());
        let target = resolve(out, doc.base.as_ref(), action);
        match (target, result.hangup) {
            // The caller is gone: tell the action URL, but run nothing it says.
            (Ok(target), Some(source)) => {
                let ending = Ending::hangup(&source);
                self.notify(out, target, method, params, Purpose::Notify { ending });
            }
            (Err(_), Some(source)) => self.end(out, Ending::hangup(&source)),
            (Ok(target), None) => self.ask(out, target, method, Purpose::Next { extra: params }),
            (Err(ending), None) => self.end(out, ending),
        }
    }

    /// Tells a URL, uncounted, then ends as `purpose` says.
    fn notify(
        &mut self,
        out: &mut Out<'_>,
        url: WebhookUrl,
        method: Method,
        params: Vec<(String, String)>,
        purpose: Purpose,
    ) {
        let mut all = base_params(out.rec());
        all.extend(params);
        let ticket = out.work(Work::Fetch {
            url: url.clone(),
            method,
            params: all,
        });
        self.phase = Phase::Fetching {
            ticket,
            url,
            method,
            purpose,
        };
    }

    /// The ending when the instructions run out (or say Hangup).
    fn instructions_ended(&self, rec: &pb::Communication, why: &str) -> Ending {
        let outcome = Outcome::try_from(rec.outcome).unwrap_or(Outcome::Unspecified);
        match outcome {
            Outcome::Unspecified if !self.dialled => {
                Ending::new(Outcome::Rejected, format!("{why} without dialling anyone"))
            }
            Outcome::Unspecified => Ending::new(Outcome::Failed, why.to_owned()),
            outcome => Ending::new(outcome, why.to_owned()),
        }
    }

    fn end(&mut self, out: &mut Out<'_>, ending: Ending) {
        out.change(|c| finish(c, ending.outcome, &ending.why, ending.legs));
        self.phase = Phase::Ended;
    }
}

/// `reference` resolved against the document's URL (absolute when the document was
/// inline); the ending, recorded, when it is no URL.
fn resolve(
    out: &mut Out<'_>,
    base: Option<&WebhookUrl>,
    reference: &str,
) -> Result<WebhookUrl, Ending> {
    let resolved = match base {
        Some(base) => base.join(reference),
        None => WebhookUrl::parse(reference),
    };
    resolved.map_err(|why| {
        let message = format!("bad URL `{reference}` in the instructions: {why}");
        out.note(Kind::Error, message.clone(), &[]);
        Ending::new(Outcome::Failed, message)
    })
}

/// The parameters every webhook request carries.
pub fn base_params(comm: &pb::Communication) -> Vec<(String, String)> {
    vec![
        ("AccountSid".into(), comm.account_id.clone()),
        ("CommunicationSid".into(), comm.communication_id.clone()),
        ("From".into(), comm.from.clone()),
        ("To".into(), comm.to.clone()),
        ("Channel".into(), comm.channel.clone()),
        ("Direction".into(), "inbound".into()),
    ]
}

/// The `StatusCallbackEvent` of a change to `state`, if it has one.
fn state_event(state: i32) -> Option<&'static str> {
    match pb::CommunicationState::try_from(state) {
        Ok(pb::CommunicationState::Ringing) => Some("initiated"),
        Ok(pb::CommunicationState::Connected) => Some("answered"),
        Ok(pb::CommunicationState::Ended) => Some("completed"),
        _ => None,
    }
}

/// A status callback's parameters for the record as it is.
pub fn status_params(comm: &pb::Communication) -> Vec<(String, String)> {
    let mut params = base_params(comm);
    let outcome = Outcome::try_from(comm.outcome).unwrap_or(Outcome::Unspecified);
    params.extend([
        (
            "CommunicationStatus".into(),
            state_word(comm.state).to_owned(),
        ),
        (
            "Outcome".into(),
            model::outcome_word(outcome).replace("completed", "connected"),
        ),
        ("ConnectedIdentity".into(), comm.connected_identity.clone()),
        ("SequenceNumber".into(), comm.timeline.len().to_string()),
    ]);
    params
}

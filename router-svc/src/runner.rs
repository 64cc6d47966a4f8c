//! The life of one communication, on the replica that accepted it:
//!
//! ```text
//! ROUTING ──slot granted──► instructions (inline | webhook → fallback) ──► verbs in order
//!    │                                       ▲                               │
//!    │ over limit → BUSY                     └── Redirect / Dial action ◄────┤
//!    ▼                                                                       ▼
//!  ENDED ◄── Reject / Hangup / end of document / failure ◄── Dial: RINGING ──► CONNECTED
//!                                                               (all legs at once)   │
//!                                     device hangup / timeLimit / Hangup call ◄──────┘
//! ```
//! A Hangup call (or the replica stopping) interrupts any step. Whatever way it ends, the
//! ringing legs are cancelled, a connected leg is ended, the slot is released, and the
//! final record is written under the retention lease.

use std::sync::Arc;
use std::time::Duration;

use proto::router::v1 as pb;
use proto::router::v1::TimelineEventKind as Kind;
use proto::router::v1::{LegEndReason, LegState, Outcome};

use crate::apps::AppRecord;
use crate::callbacks::StatusCallbacks;
use crate::engine::Engine;
use crate::fetch::Document;
use crate::live::{HangupSource, LiveComm};
use crate::model::{self, event, finish, outcome_word, state_word};
use crate::slot::{self, Admission, Slot};
use crate::url::WebhookUrl;
use crate::xml::{self, RejectReason, Verb};

/// How long a runner keeps trying to write its communication's final record.
const FINAL_WRITE_FOR: Duration = Duration::from_secs(300);

/// Most Redirects one communication may follow.
pub const MAX_REDIRECTS: u32 = 10;
/// Most documents one communication may fetch (instructions, fallback, redirects, actions).
pub const MAX_FETCHES: u32 = 25;

/// How a communication ends.
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

/// Runs one communication.
pub struct Runner {
    pub(crate) engine: Arc<Engine>,
    pub(crate) comm: Arc<LiveComm>,
    pub(crate) app: Arc<AppRecord>,
    callbacks: Option<StatusCallbacks>,
    pub(crate) fallback_used: bool,
    pub(crate) fetches: u32,
    redirects: u32,
    pub(crate) dialled: bool,
}

impl Runner {
    /// A runner for `comm` under `app`.
    pub fn new(engine: Arc<Engine>, comm: Arc<LiveComm>, app: Arc<AppRecord>) -> Self {
        let callbacks = StatusCallbacks::start(&app, &engine.webhooks);
        Self {
            engine,
            comm,
            app,
            callbacks,
            fallback_used: false,
            fetches: 0,
            redirects: 0,
            dialled: false,
        }
    }

    /// Changes the communication; on a state change, queues its record write and its
    /// status callback.
    pub(crate) fn change<T>(&self, change: impl FnOnce(&mut pb::Communication) -> T) -> T {
        let (result, changed) = self.comm.update(|comm| {
            let before = comm.state;
            let result = change(comm);
            let changed = (comm.state != before).then(|| {
                let mut params = status_params(comm);
                if let Some(word) = state_event(comm.state) {
                    params.push(("StatusCallbackEvent".into(), word.into()));
                }
                params
            });
            (result, changed)
        });
        // Records are written on state changes only (events in between ride along with
        // the next one); readers elsewhere see every state, the owner sees every event.
        if let Some(params) = changed {
            self.engine.store.save(&self.comm);
            if let Some(callbacks) = &self.callbacks {
                callbacks.send(params);
            }
        }
        result
    }

    /// Records that leg `index`'s offer reached the device's session (`ringing` false) or
    /// that the device said it is alerting its user (`ringing` true) — once each, while the
    /// leg rings — with its timeline event and status callback. The record is not written
    /// for it: the event rides along with the next state change.
    pub(crate) fn leg_progress(&self, index: usize, ringing: bool) {
        let params = self.comm.update(|comm| {
            let leg = comm
                .legs
                .get_mut(index)
                .filter(|l| l.state == LegState::Ringing as i32)?;
            let when = if ringing {
                &mut leg.ringing_time
            } else {
                &mut leg.delivered_time
            };
            if when.is_some() {
                return None;
            }
            *when = Some(model::timestamp(model::now_ms()));
            let (leg_id, identity, device) = (
                leg.leg_id.clone(),
                leg.identity.clone(),
                leg.device_id.clone(),
            );
            let (kind, word, message) = if ringing {
                (
                    Kind::LegRinging,
                    "ringing",
                    format!("{identity}/{device} is ringing"),
                )
            } else {
                (
                    Kind::LegDelivered,
                    "delivered",
                    format!("the offer reached {identity}/{device}"),
                )
            };
            let details = [
                ("identity", identity.clone()),
                ("device_id", device.clone()),
            ];
            event(comm, kind, message, &leg_id, &details);
            let mut params = status_params(comm);
            params.extend([
                ("StatusCallbackEvent".to_owned(), word.to_owned()),
                ("LegId".to_owned(), leg_id),
                ("Identity".to_owned(), identity),
                ("DeviceId".to_owned(), device),
            ]);
            Some(params)
        });
        if let (Some(params), Some(callbacks)) = (params, &self.callbacks) {
            callbacks.send(params);
        }
    }

    /// Records an event.
    pub(crate) fn note(&self, kind: Kind, message: impl Into<String>, details: &[(&str, String)]) {
        let message = message.into();
        self.change(|c| event(c, kind, message, "", details));
    }

    /// Runs the communication to its end.
    #[tracing::instrument(skip_all, fields(communication = %self.comm.id))]
    pub async fn run(mut self) {
        let (slot, ending) = match self.admit().await {
            Ok(slot) => {
                let ending = self.execute().await;
                (slot, ending)
            }
            Err(ending) => (None, ending),
        };
        self.change(|c| finish(c, ending.outcome, &ending.why, ending.legs));
        self.engine.stats.ended(self.comm.read(|c| c.outcome));
        if let Some(slot) = slot {
            slot.release().await;
        }
        self.write_final().await;
        self.engine.live.remove(&self.comm);
    }

    /// Writes the final record, again and again while etcd refuses it (a leader change, a
    /// member down), pausing 250 ms doubling to 5 s, for up to [`FINAL_WRITE_FOR`]: a final
    /// record left unwritten would keep the communication running in etcd, indexed under a
    /// lease that is still alive, so no other replica would settle it. After that the
    /// record stays until this replica's lease ends and another settles it (router_lost).
    async fn write_final(&self) {
        let until = tokio::time::Instant::now() + FINAL_WRITE_FOR;
        let mut pause = Duration::from_millis(250);
        loop {
            match self.engine.store.flush(&self.comm).await {
                Ok(()) => return,
                Err(err) if tokio::time::Instant::now() + pause < until => {
                    tracing::warn!(error = %err, retry_in = ?pause, "the final record of a communication was not written; retrying");
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                Err(err) => {
                    tracing::error!(error = %err, "the final record of a communication was not written; giving up (another replica settles it once this one's lease ends)");
                    return;
                }
            }
        }
    }

    /// Takes the communications slot; the ending when refused.
    async fn admit(&mut self) -> Result<Option<Slot>, Ending> {
        let hold = self.engine.slot_hold;
        let admission =
            slot::acquire(&self.engine.peers, &self.comm.account, &self.comm.id, hold).await;
        match admission {
            Admission::Granted(slot) => {
                // Written with the next record, so a replica settling it can release it.
                self.comm.set_slot(slot.id());
                self.note(
                    Kind::Limit,
                    "communications slot granted",
                    &[("decision", "granted".into())],
                );
                Ok(Some(*slot))
            }
            Admission::Unlimited => {
                self.note(
                    Kind::Limit,
                    "no limiter configured: communications are not limited",
                    &[],
                );
                Ok(None)
            }
            Admission::Busy { in_flight, limit } => {
                let message =
                    format!("over limit: {in_flight} of {limit} communications in flight");
                self.note(
                    Kind::Limit,
                    message.clone(),
                    &[
                        ("decision", "rejected".into()),
                        ("in_flight", in_flight.to_string()),
                        ("limit", limit.to_string()),
                    ],
                );
                Err(Ending::new(Outcome::Busy, message))
            }
            Admission::Unreachable(why) if self.engine.fail_closed => {
                let message = format!("the limiter is unreachable ({why}); refusing (fail closed)");
                self.note(Kind::Error, message.clone(), &[]);
                Err(Ending::new(Outcome::Failed, message))
            }
            Admission::Unreachable(why) => {
                self.note(
                    Kind::Error,
                    format!(
                        "the limiter is unreachable ({why}); routing without a slot (fail open)"
                    ),
                    &[],
                );
                Ok(None)
            }
        }
    }

    /// Gets the instructions and runs their verbs.
    async fn execute(&mut self) -> Ending {
        let first = if self.app.instructions.is_empty() {
            match WebhookUrl::parse(&self.app.instructions_url) {
                Ok(url) => self.fetch(url, self.app.method(), Vec::new()).await,
                Err(why) => Err(Ending::new(
                    Outcome::Failed,
                    format!("instructions_url: {why}"),
                )),
            }
        } else {
            match xml::parse(&self.app.instructions) {
                Ok(verbs) => Ok(Document { verbs, base: None }),
                Err(err) => Err(Ending::new(Outcome::Failed, err.to_string())),
            }
        };
        let mut document = match first {
            Ok(document) => document,
            Err(ending) => return ending,
        };
        loop {
            match self.perform(document).await {
                Step::Next(next) => document = next,
                Step::End(ending) => return ending,
            }
        }
    }

    /// Runs a document's verbs until one replaces the document or ends the communication.
    async fn perform(&mut self, document: Document) -> Step {
        for verb in document.verbs {
            if let Some(source) = self.comm.hangup_pending() {
                return Step::End(Ending::hangup(&source));
            }
            match verb {
                Verb::Say { text, attributes } => {
                    let mut details = vec![("verb", "Say".to_owned()), ("text", text.clone())];
                    details.extend(attributes.iter().map(|(k, v)| (k.as_str(), v.clone())));
                    self.note(Kind::Instruction, format!("Say: {text}"), &details);
                }
                Verb::Pause { length } => {
                    self.note(
                        Kind::Instruction,
                        format!("Pause {length}s"),
                        &[("verb", "Pause".into()), ("length", length.to_string())],
                    );
                    let pause = tokio::time::sleep(std::time::Duration::from_secs(length.into()));
                    tokio::select! {
                        _ = pause => {}
                        source = self.comm.hangup_requested() => return Step::End(Ending::hangup(&source)),
                    }
                }
                Verb::Reject { reason } => {
                    let (word, outcome) = match reason {
                        RejectReason::Busy => ("busy", Outcome::Busy),
                        RejectReason::Rejected => ("rejected", Outcome::Rejected),
                    };
                    self.note(
                        Kind::Instruction,
                        format!("Reject ({word})"),
                        &[("verb", "Reject".into()), ("reason", word.into())],
                    );
                    return Step::End(Ending::new(
                        outcome,
                        format!("instructions rejected it ({word})"),
                    ));
                }
                Verb::Hangup => {
                    self.note(Kind::Instruction, "Hangup", &[("verb", "Hangup".into())]);
                    return Step::End(self.instructions_ended("instructions said Hangup"));
                }
                Verb::Redirect { url, method } => {
                    self.note(
                        Kind::Instruction,
                        format!("Redirect to {url}"),
                        &[("verb", "Redirect".into()), ("url", url.clone())],
                    );
                    self.redirects += 1;
                    if self.redirects > MAX_REDIRECTS {
                        let why = format!("more than {MAX_REDIRECTS} redirects (a redirect loop?)");
                        self.note(Kind::Error, why.clone(), &[]);
                        return Step::End(Ending::new(Outcome::Failed, why));
                    }
                    return match self.resolve(document.base.as_ref(), &url) {
                        Ok(target) => self.next_document(target, method, Vec::new()).await,
                        Err(ending) => Step::End(ending),
                    };
                }
                Verb::Dial(dial) => {
                    self.dialled = true;
                    let result = self.dial(&dial).await;
                    let Some(action) = &dial.action else {
                        if let Some(source) = result.hangup {
                            return Step::End(Ending::hangup(&source));
                        }
                        continue;
                    };
                    let params = vec![
                        (
                            "DialStatus".to_owned(),
                            outcome_word(result.outcome).to_owned(),
                        ),
                        ("DialedIdentity".to_owned(), result.identity.clone()),
                        ("DialDuration".to_owned(), result.duration_secs.to_string()),
                    ];
                    let target = self.resolve(document.base.as_ref(), action);
                    if let Some(source) = result.hangup {
                        // The caller is gone: tell the action URL, but run nothing it says.
                        if let Ok(target) = target {
                            let method = dial.method.unwrap_or(self.app.method());
                            let _ = self.request(&target, method, params).await;
                        }
                        return Step::End(Ending::hangup(&source));
                    }
                    return match target {
                        Ok(target) => self.next_document(target, dial.method, params).await,
                        Err(ending) => Step::End(ending),
                    };
                }
            }
        }
        Step::End(self.instructions_ended("the instructions ended"))
    }

    /// The ending when the instructions run out (or say Hangup).
    fn instructions_ended(&self, why: &str) -> Ending {
        let outcome = self
            .comm
            .read(|c| Outcome::try_from(c.outcome).unwrap_or(Outcome::Unspecified));
        match outcome {
            Outcome::Unspecified if !self.dialled => {
                Ending::new(Outcome::Rejected, format!("{why} without dialling anyone"))
            }
            Outcome::Unspecified => Ending::new(Outcome::Failed, why.to_owned()),
            outcome => Ending::new(outcome, why.to_owned()),
        }
    }
}

/// What running a document led to.
pub(crate) enum Step {
    /// Run this document next.
    Next(Document),
    /// The communication ends.
    End(Ending),
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

pub(crate) fn status_params(comm: &pb::Communication) -> Vec<(String, String)> {
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

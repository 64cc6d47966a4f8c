//! The Dial part of the machine: `<Dial><Client>…`. It reads the presence of the dialled
//! identities and offers the communication to every available live device. The offers go
//! out all at once, or in stages (`<Client delay>`, `<Dial sequential>`; the rules are in
//! [`super::schedule`]). The first accept wins and the rest are cancelled. The machine then
//! carries the connected leg until the device hangs up, the time limit passes or a hangup
//! is requested.
//!
//! - **Rejections.** A rejection ends only its own leg. The exception is a device that
//!   declined for every device (`DECLINE_SCOPE_EVERYWHERE`): then every other leg is
//!   cancelled (`CANCEL_REASON_DECLINED_ELSEWHERE`, leg end reason `declined_elsewhere`)
//!   and the Dial's outcome is REJECTED.
//! - **Progress.** A leg records `delivered` (presence put the offer on the device's
//!   stream) and `ringing` (the device said so), each once, with a timeline event and a
//!   status callback. A leg not delivered within [`DELIVERY_WITHIN_MS`] ends offline.
//! - **Busy identities.** An identity at its limit of connected communications is not
//!   rung: its leg ends `busy` at once. An identity under such a limit takes a slot when
//!   it answers. If the limiter refuses that slot (another communication connected the
//!   identity first), the leg ends `busy` and the Dial goes on.
//! - **Waiting.** While a presence read is in flight, the schedule waits, but the legs'
//!   news, the deadline and hangups are still handled. While an accepting leg waits for
//!   its identity slot, later accepts queue behind it, and the Dial's deadline waits: the
//!   limiter's answer takes at most its deadline.

use std::collections::{HashSet, VecDeque};

use proto::presence::v1 as ppb;
use proto::presence::v1::offer_request::Kind as Ask;
use proto::router::v1::TimelineEventKind as Kind;
use proto::router::v1::{CommunicationState as State, LegEndReason, LegState, Outcome};

use super::schedule::{self, Action, Schedule, Unanswered};
use super::{ClientPresence, Decision, Effect, HangupSource, IdentityUsage, LegNews, Out, Work};
use crate::model::{add_leg, end_leg, event, now_ms, set_state, timestamp};
use crate::xml::Dial;

/// How long a device's session may take to take an offer (presence's `delivered`): a leg
/// not delivered by then (a half-dead connection whose stream no longer drains) ends
/// offline instead of eating the whole Dial timeout.
pub const DELIVERY_WITHIN_MS: u64 = 5_000;

/// How a Dial ended.
#[derive(Debug)]
pub(crate) struct DialResult {
    /// The outcome of this attempt.
    pub outcome: Outcome,
    /// Identity that answered, if any.
    pub identity: String,
    /// Seconds connected.
    pub duration_secs: u64,
    /// Set when a hangup was requested during the Dial.
    pub hangup: Option<HangupSource>,
}

/// A leg of this Dial: its index among the communication's legs and when it was offered.
#[derive(Debug)]
struct Link {
    index: usize,
    started: u64,
}

/// A presence read in flight, for these Clients (indexes into the Dial).
#[derive(Debug)]
struct Reading {
    ticket: u64,
    clients: Vec<usize>,
    why: &'static str,
    turn_secs: Option<u32>,
}

/// The connected leg.
#[derive(Debug)]
struct Connected {
    link: usize,
    index: usize,
    identity: String,
    device: String,
    since: u64,
    until: u64,
}

/// One device to ring.
struct Target {
    identity: String,
    device_id: String,
    replica: String,
    parameters: std::collections::HashMap<String, String>,
    usage: IdentityUsage,
}

/// A Dial in progress.
#[derive(Debug)]
pub(crate) struct Dialing {
    dial: Dial,
    began: u64,
    /// When the offers of a parallel Dial expire (wall ms).
    expires_wall: i64,
    schedule: Schedule,
    links: Vec<Link>,
    unanswered: Unanswered,
    /// Identities with a limit of connected communications: a slot is taken on answer.
    limited: HashSet<String>,
    reading: Option<Reading>,
    /// An accepting leg waiting for its identity slot: (ticket, link).
    answering: Option<(u64, usize)>,
    /// Accepts heard while another waited for its identity slot.
    queued: VecDeque<usize>,
    connected: Option<Connected>,
}

impl Dialing {
    /// Begins `dial` at `now` (`wall` in wall time).
    pub(crate) fn start(out: &mut Out<'_>, now: u64, wall: i64, dial: Dial) -> Self {
        let identities: Vec<String> = dial.clients.iter().map(|c| c.identity.clone()).collect();
        out.note(
            Kind::Instruction,
            format!("Dial {} (timeout {}s)", identities.join(", "), dial.timeout),
            &[
                ("verb", "Dial".into()),
                ("clients", identities.join(",")),
                ("timeout", dial.timeout.to_string()),
                ("time_limit", dial.time_limit.to_string()),
                ("action", dial.action.clone().unwrap_or_default()),
                ("sequential", dial.sequential.to_string()),
            ],
        );
        Self {
            began: now,
            expires_wall: wall + i64::from(dial.timeout) * 1000,
            schedule: Schedule::new(&dial),
            dial,
            links: Vec::new(),
            unanswered: Unanswered::default(),
            limited: HashSet::new(),
            reading: None,
            answering: None,
            queued: VecDeque::new(),
            connected: None,
        }
    }

    /// The Dial, once it is over.
    pub(crate) fn into_dial(self) -> Dial {
        self.dial
    }

    pub(crate) fn awaits(&self, ticket: u64) -> bool {
        self.reading.as_ref().is_some_and(|r| r.ticket == ticket)
            || self.answering.is_some_and(|(t, _)| t == ticket)
    }

    fn deadline(&self) -> Option<u64> {
        (self.schedule.has_deadline() && self.answering.is_none())
            .then(|| self.began + u64::from(self.dial.timeout) * 1000)
    }

    fn ended(rec: &proto::router::v1::Communication, index: usize) -> bool {
        rec.legs
            .get(index)
            .is_none_or(|l| l.state == LegState::Ended as i32)
    }

    fn delivered(rec: &proto::router::v1::Communication, index: usize) -> bool {
        rec.legs
            .get(index)
            .is_some_and(|l| l.delivered_time.is_some())
    }

    /// When the clock next matters: the connected leg's time limit; or the next Client
    /// falling due or turn ending (unless presence is being read or an identity slot
    /// asked for), an undelivered leg's delivery window closing, the Dial's deadline.
    pub(crate) fn wake_at(&self, rec: &proto::router::v1::Communication) -> Option<u64> {
        if let Some(connected) = &self.connected {
            return Some(connected.until);
        }
        let due = self
            .schedule
            .wake_at()
            .filter(|_| self.reading.is_none() && self.answering.is_none())
            .map(|ms| self.began + ms);
        let delivery = self
            .links
            .iter()
            .filter(|l| !Self::ended(rec, l.index) && !Self::delivered(rec, l.index))
            .map(|l| l.started + DELIVERY_WITHIN_MS)
            .min();
        [due, delivery, self.deadline()].into_iter().flatten().min()
    }

    /// Asks the schedule whom to ring now; `Some` when the Dial is over.
    pub(crate) fn advance(&mut self, out: &mut Out<'_>, now: u64) -> Option<DialResult> {
        if self.connected.is_some() || self.reading.is_some() || self.answering.is_some() {
            return None;
        }
        let since = now.saturating_sub(self.began);
        let links = &self.links;
        let step = self.schedule.next(since, links.len(), |l| {
            Self::ended(out.rec(), links[l].index)
        });
        for l in step.expired {
            let index = self.links[l].index;
            cancel(out, l, ppb::CancelReason::Timeout);
            out.change(|c| end_leg(c, index, LegEndReason::Timeout, "its turn ended"));
        }
        match step.action {
            Action::Over => Some(self.unanswered(out)),
            Action::Wait => None,
            Action::Ring {
                clients,
                why,
                turn_secs,
            } => {
                let identities = clients
                    .iter()
                    .map(|&i| self.dial.clients[i].identity.clone())
                    .collect();
                let ticket = out.work(Work::ReadPresence { identities });
                self.reading = Some(Reading {
                    ticket,
                    clients,
                    why,
                    turn_secs,
                });
                None
            }
        }
    }

    /// Presence answered for the Clients being rung: offer to their live devices.
    pub(crate) fn presence(
        &mut self,
        out: &mut Out<'_>,
        now: u64,
        wall: i64,
        answer: Result<Vec<ClientPresence>, String>,
    ) -> Option<DialResult> {
        let reading = self.reading.take()?;
        let targets = match answer {
            Ok(presences) => self.targets(out, &reading.clients, presences),
            Err(failure) => {
                out.note(Kind::Error, failure, &[]);
                self.unanswered.presence_failed = true;
                Vec::new()
            }
        };
        match reading.turn_secs {
            Some(secs) => {
                // This Client's turn: its own timeout, its offers expiring with it.
                let expires = wall + i64::from(secs) * 1000;
                let new = self.offer(out, now, targets, reading.why, expires);
                self.schedule
                    .begin_turn(new, now.saturating_sub(self.began), secs);
            }
            None => {
                self.offer(out, now, targets, reading.why, self.expires_wall);
            }
        }
        self.advance(out, now)
    }

    /// The devices to ring among `presences` of `clients`, each read recorded.
    fn targets(
        &self,
        out: &mut Out<'_>,
        clients: &[usize],
        presences: Vec<ClientPresence>,
    ) -> Vec<Target> {
        let base = out.rec().parameters.clone();
        let mut targets = Vec::new();
        for (&i, presence) in clients.iter().zip(presences) {
            let client = &self.dial.clients[i];
            out.note(
                Kind::Presence,
                format!(
                    "{} is {} with {} available live device(s) of {}",
                    client.identity,
                    presence
                        .status
                        .as_str_name()
                        .trim_start_matches("STATUS_")
                        .to_lowercase(),
                    presence.live.len(),
                    presence.devices
                ),
                &[
                    ("identity", client.identity.clone()),
                    ("status", presence.status.as_str_name().to_owned()),
                    ("available_devices", presence.live.len().to_string()),
                ],
            );
            let usage = if presence.live.is_empty() {
                IdentityUsage::Unlimited
            } else {
                presence.usage
            };
            if let IdentityUsage::Busy(in_flight, limit) = usage {
                out.note(
                    Kind::Limit,
                    format!(
                        "{} is busy: {in_flight} of {limit} communications connected",
                        client.identity
                    ),
                    &[
                        ("identity", client.identity.clone()),
                        ("decision", "busy".into()),
                        ("in_flight", in_flight.to_string()),
                        ("limit", limit.to_string()),
                    ],
                );
            }
            for device in presence.live {
                let mut parameters = base.clone();
                parameters.extend(client.parameters.clone());
                targets.push(Target {
                    identity: client.identity.clone(),
                    device_id: device.device_id,
                    replica: device.replica,
                    parameters,
                    usage,
                });
            }
        }
        targets
    }

    /// Offers the communication to `targets` (why they start now: `why`); the places of
    /// the new legs in this Dial.
    fn offer(
        &mut self,
        out: &mut Out<'_>,
        now: u64,
        targets: Vec<Target>,
        why: &str,
        expires: i64,
    ) -> Vec<usize> {
        let mut new = Vec::new();
        for target in targets {
            let leg_id = format!(
                "{}.{}",
                out.rec().communication_id,
                out.rec().legs.len() + 1
            );
            if target.usage == IdentityUsage::Limited {
                self.limited.insert(target.identity.clone());
            }
            if let IdentityUsage::Busy(in_flight, limit) = target.usage {
                // Not rung: the leg is recorded, ended busy.
                let why = format!(
                    "{} is on {in_flight} of {limit} communications",
                    target.identity
                );
                out.change(|c| {
                    let index = add_leg(c, &leg_id, &target.identity, &target.device_id);
                    end_leg(c, index, LegEndReason::Busy, &why);
                });
                continue;
            }
            let index = out.change(|c| {
                set_state(c, State::Ringing);
                let index = add_leg(c, &leg_id, &target.identity, &target.device_id);
                event(
                    c,
                    Kind::LegStarted,
                    format!(
                        "offered to {}/{} ({why})",
                        target.identity, target.device_id
                    ),
                    &leg_id,
                    &[
                        ("identity", target.identity.clone()),
                        ("device_id", target.device_id.clone()),
                        ("why", why.to_owned()),
                    ],
                );
                index
            });
            let rec = out.rec();
            let start = ppb::OfferStart {
                account_id: rec.account_id.clone(),
                identity: target.identity,
                device_id: target.device_id,
                offer_id: leg_id,
                communication_id: rec.communication_id.clone(),
                from: rec.from.clone(),
                to: rec.to.clone(),
                channel: rec.channel.clone(),
                parameters: target.parameters,
                expire_time: Some(timestamp(expires)),
            };
            let link = self.links.len();
            self.links.push(Link {
                index,
                started: now,
            });
            out.push(Effect::OpenLeg {
                link,
                replica: target.replica,
                start,
            });
            new.push(link);
        }
        new
    }

    /// Leg `link` heard `news`.
    pub(crate) fn news(
        &mut self,
        out: &mut Out<'_>,
        now: u64,
        link: usize,
        news: LegNews,
    ) -> Option<DialResult> {
        if self.connected.is_some() {
            return self.connected_news(out, now, link, news);
        }
        let index = self.links.get(link)?.index;
        match news {
            // A late accept of a leg already ended (its turn or window closed, its
            // cancel already sent) connects nothing.
            LegNews::Answered { accept: true, .. } if Self::ended(out.rec(), index) => {}
            LegNews::Answered { accept: true, .. } if self.answering.is_some() => {
                self.queued.push_back(link);
            }
            LegNews::Answered { accept: true, .. } => return self.accept(out, now, link),
            LegNews::Answered {
                everywhere: true, ..
            } => {
                out.change(|c| {
                    end_leg(
                        c,
                        index,
                        LegEndReason::Rejected,
                        "declined for every device",
                    );
                });
                for (l, leg) in self.links.iter().enumerate() {
                    if !Self::ended(out.rec(), leg.index) {
                        cancel(out, l, ppb::CancelReason::DeclinedElsewhere);
                        out.change(|c| end_leg(c, leg.index, LegEndReason::DeclinedElsewhere, ""));
                    }
                }
                self.unanswered.declined_everywhere = true;
                return Some(self.unanswered(out));
            }
            LegNews::Answered { busy, .. } => {
                self.unanswered.busy_rejections += usize::from(busy);
                let why = if busy { "busy" } else { "declined" };
                out.change(|c| end_leg(c, index, LegEndReason::Rejected, why));
            }
            LegNews::Delivered => leg_progress(out, index, false),
            LegNews::Ringing => leg_progress(out, index, true),
            other => {
                let (reason, why) = schedule::lost_leg(&other);
                out.change(|c| end_leg(c, index, reason, &why));
            }
        }
        self.advance(out, now)
    }

    /// A device accepted on leg `link`: connect it, or first take its identity's slot.
    fn accept(&mut self, out: &mut Out<'_>, now: u64, link: usize) -> Option<DialResult> {
        let index = self.links[link].index;
        let identity = out.rec().legs[index].identity.clone();
        if !self.limited.contains(&identity) {
            return self.connect(out, now, link);
        }
        let ticket = out.work(Work::AcquireIdentitySlot { identity });
        self.answering = Some((ticket, link));
        None
    }

    /// The limiter's word on the accepting leg's identity slot.
    pub(crate) fn identity_slot(
        &mut self,
        out: &mut Out<'_>,
        now: u64,
        decision: Decision,
    ) -> Option<DialResult> {
        let (_, link) = self.answering.take()?;
        let index = self.links[link].index;
        let identity = out.rec().legs[index].identity.clone();
        match decision {
            // Its device went away while the limiter was asked.
            _ if Self::ended(out.rec(), index) => {}
            Decision::Granted | Decision::Unlimited => return self.connect(out, now, link),
            Decision::Unreachable(why) => {
                out.note(
                    Kind::Error,
                    format!("the limiter is unreachable ({why}); connecting {identity} without an identity slot"),
                    &[],
                );
                return self.connect(out, now, link);
            }
            Decision::Busy { in_flight, limit } => {
                // Busy since it was rung (another communication connected it first):
                // this leg cannot connect.
                let why = format!(
                    "{identity} became busy: {in_flight} of {limit} communications connected"
                );
                cancel(out, link, ppb::CancelReason::Failed);
                out.change(|c| end_leg(c, index, LegEndReason::Busy, &why));
            }
        }
        while let Some(next) = self.queued.pop_front() {
            if !Self::ended(out.rec(), self.links[next].index) {
                return self.accept(out, now, next);
            }
        }
        self.advance(out, now)
    }

    /// Connects leg `link`; every other leg is cancelled as answered elsewhere.
    fn connect(&mut self, out: &mut Out<'_>, now: u64, link: usize) -> Option<DialResult> {
        let index = self.links[link].index;
        let connect_ms = now_ms();
        let (identity, device) = out.change(|c| {
            let leg = &mut c.legs[index];
            leg.state = LegState::Connected as i32;
            leg.answer_time = Some(timestamp(connect_ms));
            let (identity, device, leg_id) = (
                leg.identity.clone(),
                leg.device_id.clone(),
                leg.leg_id.clone(),
            );
            c.connected_identity = identity.clone();
            c.connected_device_id = device.clone();
            c.connect_time = Some(timestamp(connect_ms));
            c.outcome = Outcome::Connected as i32;
            set_state(c, State::Connected);
            event(
                c,
                Kind::Connected,
                format!("connected to {identity}/{device}"),
                &leg_id,
                &[
                    ("identity", identity.clone()),
                    ("device_id", device.clone()),
                ],
            );
            (identity, device)
        });
        for (l, leg) in self.links.iter().enumerate() {
            if l != link && !Self::ended(out.rec(), leg.index) {
                cancel(out, l, ppb::CancelReason::AnsweredElsewhere);
                out.change(|c| end_leg(c, leg.index, LegEndReason::AnsweredElsewhere, ""));
            }
        }
        self.queued.clear();
        self.connected = Some(Connected {
            link,
            index,
            identity,
            device,
            since: now,
            until: now + u64::from(self.dial.time_limit) * 1000,
        });
        None
    }

    /// News while connected: the connected leg's end, or a late accept elsewhere.
    fn connected_news(
        &mut self,
        out: &mut Out<'_>,
        now: u64,
        link: usize,
        news: LegNews,
    ) -> Option<DialResult> {
        let connected = self.connected.as_ref()?;
        if link != connected.link {
            if matches!(news, LegNews::Answered { accept: true, .. }) {
                // Lost the race: the device is told its accept came too late.
                cancel(out, link, ppb::CancelReason::AnsweredElsewhere);
            }
            return None;
        }
        let (identity, device) = (&connected.identity, &connected.device);
        let why = match news {
            LegNews::Hangup => format!("{identity}/{device} hung up"),
            LegNews::Gone(_) => format!("{identity}/{device} went offline"),
            LegNews::Delivered | LegNews::Ringing | LegNews::Answered { .. } => return None,
            LegNews::Failed(status) => format!("the leg failed: {}", status.message()),
            LegNews::Closed => "the leg's stream ended".to_owned(),
        };
        Some(self.disconnect(out, now, why, None))
    }

    /// The clock reached [`Dialing::wake_at`].
    pub(crate) fn tick(&mut self, out: &mut Out<'_>, now: u64) -> Option<DialResult> {
        if let Some(connected) = &self.connected {
            if now < connected.until {
                return None;
            }
            tell(
                out,
                connected.link,
                Ask::End(ppb::OfferEnd {
                    reason: ppb::EndReason::TimeLimit as i32,
                }),
            );
            let why = format!("the time limit of {}s was reached", self.dial.time_limit);
            return Some(self.disconnect(out, now, why, None));
        }
        for (l, leg) in self.links.iter().enumerate() {
            let index = leg.index;
            if !Self::ended(out.rec(), index)
                && !Self::delivered(out.rec(), index)
                && leg.started + DELIVERY_WITHIN_MS <= now
            {
                cancel(out, l, ppb::CancelReason::Failed);
                let why = format!(
                    "the offer did not reach the device's session within {}s",
                    DELIVERY_WITHIN_MS / 1000
                );
                out.change(|c| end_leg(c, index, LegEndReason::Offline, &why));
            }
        }
        if self.deadline().is_some_and(|at| at <= now) {
            for (l, leg) in self.links.iter().enumerate() {
                if !Self::ended(out.rec(), leg.index) {
                    cancel(out, l, ppb::CancelReason::Timeout);
                    out.change(|c| end_leg(c, leg.index, LegEndReason::Timeout, ""));
                }
            }
            return Some(self.unanswered(out));
        }
        self.advance(out, now)
    }

    /// A hangup was requested during the Dial.
    pub(crate) fn hung_up(
        &mut self,
        out: &mut Out<'_>,
        now: u64,
        source: HangupSource,
    ) -> DialResult {
        if let Some(connected) = &self.connected {
            let (reason, why) = schedule::hangup_while_connected(&source);
            tell(
                out,
                connected.link,
                Ask::End(ppb::OfferEnd {
                    reason: reason as i32,
                }),
            );
            return self.disconnect(out, now, why, Some(source));
        }
        let (cancel_reason, reason, outcome) = schedule::hangup_while_ringing(&source);
        for (l, leg) in self.links.iter().enumerate() {
            if !Self::ended(out.rec(), leg.index) {
                cancel(out, l, cancel_reason);
                out.change(|c| end_leg(c, leg.index, reason, ""));
            }
        }
        let mut result = attempt(out, outcome);
        result.hangup = Some(source);
        result
    }

    /// The connected leg ended (`why`) at `now`.
    fn disconnect(
        &mut self,
        out: &mut Out<'_>,
        now: u64,
        why: String,
        hangup: Option<HangupSource>,
    ) -> DialResult {
        let Some(connected) = self.connected.take() else {
            return attempt(out, Outcome::Failed);
        };
        let index = connected.index;
        out.change(|c| {
            let leg_id = c.legs[index].leg_id.clone();
            event(c, Kind::Hangup, why.clone(), &leg_id, &[("reason", why)]);
            end_leg(c, index, LegEndReason::Answered, "");
            set_state(c, State::Routing);
        });
        DialResult {
            outcome: Outcome::Connected,
            identity: connected.identity,
            duration_secs: now.saturating_sub(connected.since) / 1000,
            hangup,
        }
    }

    /// The Dial connected nobody: its outcome from how the legs ended.
    fn unanswered(&self, out: &mut Out<'_>) -> DialResult {
        let reasons: Vec<LegEndReason> = out
            .rec()
            .legs
            .iter()
            .map(|l| LegEndReason::try_from(l.end_reason).unwrap_or_default())
            .collect();
        attempt(out, self.unanswered.outcome(&reasons))
    }
}

/// Sets this attempt's outcome and returns it.
fn attempt(out: &mut Out<'_>, outcome: Outcome) -> DialResult {
    out.change(|c| {
        c.outcome = outcome as i32;
        set_state(c, State::Routing);
    });
    DialResult {
        outcome,
        identity: String::new(),
        duration_secs: 0,
        hangup: None,
    }
}

fn tell(out: &mut Out<'_>, link: usize, kind: Ask) {
    out.push(Effect::Tell { link, kind });
}

fn cancel(out: &mut Out<'_>, link: usize, reason: ppb::CancelReason) {
    tell(
        out,
        link,
        Ask::Cancel(ppb::OfferCancel {
            reason: reason as i32,
        }),
    );
}

/// Records that leg `index`'s offer reached the device's session (`ringing` false) or
/// that the device said it is alerting its user (`ringing` true) — once each, while the
/// leg rings — with its timeline event and status callback. The record is not saved for
/// it: the event goes out with the next state change.
fn leg_progress(out: &mut Out<'_>, index: usize, ringing: bool) {
    let params = out.change(|comm| {
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
        *when = Some(timestamp(now_ms()));
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
        let mut params = super::status_params(comm);
        params.extend([
            ("StatusCallbackEvent".to_owned(), word.to_owned()),
            ("LegId".to_owned(), leg_id),
            ("Identity".to_owned(), identity),
            ("DeviceId".to_owned(), device),
        ]);
        Some(params)
    });
    if let Some(params) = params {
        out.push(Effect::Callback(params));
    }
}

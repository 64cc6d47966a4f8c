//! `<Dial><Client>…`: read the presence of every dialled identity, offer the communication
//! to every available live device at once (or in stages: `<Client delay>`, `<Dial
//! sequential>`: see `Runner::ring`) (one `SessionRelayService.Offer` stream per leg,
//! straight to the presence replica holding the session), let the first accept win and
//! cancel the rest, then carry the connected leg until the device hangs up, the time limit
//! passes or the caller hangs up.
//!
//! A rejection ends only its own leg unless the device declined for every device
//! (`DECLINE_SCOPE_EVERYWHERE`): then every other leg is cancelled
//! (`CANCEL_REASON_DECLINED_ELSEWHERE`, leg end reason `declined_elsewhere`) and the Dial's
//! outcome is REJECTED. A leg records `delivered` (presence put the offer on the device's
//! stream) and `ringing` (the device said so), each once, with a timeline event and a status
//! callback; a leg not delivered within [`DELIVERY_WITHIN`] ends offline.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use proto::presence::v1 as ppb;
use proto::presence::v1::offer_request::Kind as Ask;
use proto::router::v1::TimelineEventKind as Kind;
use proto::router::v1::{CommunicationState as State, LegEndReason, LegState, Outcome};
use tokio::sync::mpsc;

use crate::legs::{LegLink, LegNews};
use crate::live::HangupSource;
use crate::model::{add_leg, end_leg, event, now_ms, set_state, timestamp};
use crate::runner::Runner;
use crate::schedule::{self, Action, Schedule, Unanswered};
use crate::slot::{self, Admission, IdentityUsage, Slot};
use crate::xml::Dial;

/// How long the presence read may take.
const PRESENCE_DEADLINE: Duration = Duration::from_secs(3);
/// How long a device's session may take to take an offer (presence's `delivered`): a leg
/// not delivered by then (a half-dead connection whose stream no longer drains) ends
/// offline instead of eating the whole Dial timeout.
pub const DELIVERY_WITHIN: Duration = Duration::from_secs(5);

/// How a Dial ended.
#[derive(Debug)]
pub struct DialResult {
    /// The outcome of this attempt.
    pub outcome: Outcome,
    /// Identity that answered, if any.
    pub identity: String,
    /// Seconds connected.
    pub duration_secs: u64,
    /// Set when the caller hung up (or the router is stopping) during the Dial.
    pub hangup: Option<HangupSource>,
}

/// One device to ring.
struct Target {
    identity: String,
    device_id: String,
    replica: String,
    parameters: HashMap<String, String>,
    /// The limiter's word on the identity's connected communications.
    usage: IdentityUsage,
}

impl Runner {
    /// Executes a Dial.
    pub(crate) async fn dial(&mut self, dial: &Dial) -> DialResult {
        let identities: Vec<String> = dial.clients.iter().map(|c| c.identity.clone()).collect();
        self.note(
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
        self.ring(dial).await
    }

    /// Sets this attempt's outcome and returns it.
    fn attempt(&self, outcome: Outcome) -> DialResult {
        self.change(|c| {
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

    /// Reads the presence of `clients` (indexes into the Dial); the available live devices
    /// to ring.
    async fn available(&self, dial: &Dial, clients: &[usize]) -> Result<Vec<Target>, String> {
        let mut presence = self.engine.peers.presence().map_err(|e| e.to_string())?;
        let request = ppb::BatchGetPresenceRequest {
            account_id: self.comm.account.clone(),
            identities: clients
                .iter()
                .map(|&i| dial.clients[i].identity.clone())
                .collect(),
            min_revision: 0,
        };
        let answer = tokio::time::timeout(PRESENCE_DEADLINE, presence.batch_get_presence(request))
            .await
            .map_err(|_| "presence did not answer within 3 s".to_owned())?
            .map_err(|s| format!("presence lookup failed: {:?}: {}", s.code(), s.message()))?
            .into_inner();
        let base = self.comm.read(|c| c.parameters.clone());
        let mut targets = Vec::new();
        for (&i, identity) in clients.iter().zip(answer.presences) {
            let client = &dial.clients[i];
            let status = ppb::Status::try_from(identity.status).unwrap_or(ppb::Status::Offline);
            let live: Vec<&ppb::Device> = identity
                .devices
                .iter()
                .filter(|d| d.status == ppb::Status::Available as i32)
                .filter(|d| d.connection_kind == ppb::ConnectionKind::Stream as i32)
                .collect();
            self.note(
                Kind::Presence,
                format!(
                    "{} is {} with {} available live device(s) of {}",
                    client.identity,
                    status
                        .as_str_name()
                        .trim_start_matches("STATUS_")
                        .to_lowercase(),
                    live.len(),
                    identity.devices.len()
                ),
                &[
                    ("identity", client.identity.clone()),
                    ("status", status.as_str_name().to_owned()),
                    ("available_devices", live.len().to_string()),
                ],
            );
            let usage = if live.is_empty() {
                IdentityUsage::Unlimited
            } else {
                slot::identity_usage(&self.engine.peers, &self.comm.account, &client.identity).await
            };
            if let IdentityUsage::Busy(in_flight, limit) = usage {
                self.note(
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
            for device in live {
                let mut parameters = base.clone();
                parameters.extend(client.parameters.clone());
                targets.push(Target {
                    identity: client.identity.clone(),
                    device_id: device.device_id.clone(),
                    replica: device.replica.clone(),
                    parameters,
                    usage,
                });
            }
        }
        Ok(targets)
    }

    /// Offers the communication to `targets` (why they start now: `why`); the indexes of
    /// the new legs in `legs`.
    fn offer(
        &self,
        targets: Vec<Target>,
        why: &str,
        expires: i64,
        legs: &mut Vec<LegLink>,
        events: &mpsc::Sender<(usize, LegNews)>,
        limited: &mut HashSet<String>,
    ) -> Vec<usize> {
        let comm = self.comm.snapshot();
        let mut new = Vec::new();
        for target in targets {
            let leg_id = format!(
                "{}.{}",
                comm.communication_id,
                self.comm.read(|c| c.legs.len()) + 1
            );
            if target.usage == IdentityUsage::Limited {
                limited.insert(target.identity.clone());
            }
            if let IdentityUsage::Busy(in_flight, limit) = target.usage {
                // Not rung: the leg is recorded, ended busy.
                let why = format!(
                    "{} is on {in_flight} of {limit} communications",
                    target.identity
                );
                self.change(|c| {
                    let index = add_leg(c, &leg_id, &target.identity, &target.device_id);
                    end_leg(c, index, LegEndReason::Busy, &why);
                });
                continue;
            }
            let index = self.change(|c| {
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
            self.engine.stats.offers.inc();
            let start = ppb::OfferStart {
                account_id: comm.account_id.clone(),
                identity: target.identity.clone(),
                device_id: target.device_id.clone(),
                offer_id: leg_id,
                communication_id: comm.communication_id.clone(),
                from: comm.from.clone(),
                to: comm.to.clone(),
                channel: comm.channel.clone(),
                parameters: target.parameters,
                expire_time: Some(timestamp(expires)),
            };
            new.push(legs.len());
            legs.push(self.open_leg(legs.len(), index, &target.replica, start, events.clone()));
        }
        new
    }

    /// Rings the Dial's Clients — all at once (each after its `delay`, or as soon as every
    /// leg started before it has ended), or one at a time for a sequential Dial — until one
    /// device accepts, every leg has ended with nobody left to ring, the Dial times out or
    /// the caller hangs up.
    async fn ring(&mut self, dial: &Dial) -> DialResult {
        let began = tokio::time::Instant::now();
        let (events_tx, mut events) = mpsc::channel::<(usize, LegNews)>(64);
        // A parallel Dial ends at its timeout; a sequential one when its last turn does.
        let expires = now_ms() + i64::from(dial.timeout) * 1000;
        let mut schedule = Schedule::new(dial);
        let mut legs: Vec<LegLink> = Vec::new();
        let deadline = tokio::time::sleep(Duration::from_secs(dial.timeout.into()));
        tokio::pin!(deadline);
        let mut unanswered = Unanswered::default();
        let mut identity_slot = None;
        // Identities with a limit of connected communications: a slot is taken on answer.
        let mut limited = HashSet::new();
        let since = |began: tokio::time::Instant| began.elapsed().as_millis() as u64;
        let winner = loop {
            // Whom to ring now, and why.
            let step = schedule.next(since(began), legs.len(), |l| self.leg_ended(&legs[l]));
            for l in step.expired {
                legs[l].cancel(ppb::CancelReason::Timeout);
                self.change(|c| end_leg(c, legs[l].index, LegEndReason::Timeout, "its turn ended"));
            }
            match step.action {
                Action::Over => break None,
                Action::Wait => {}
                Action::Ring {
                    clients,
                    why,
                    turn_secs,
                } => {
                    let targets = match self.available(dial, &clients).await {
                        Ok(targets) => targets,
                        Err(failure) => {
                            self.note(Kind::Error, failure.clone(), &[]);
                            unanswered.presence_failed = true;
                            Vec::new()
                        }
                    };
                    if let Some(secs) = turn_secs {
                        // This Client's turn: its own timeout, its offers expiring with it.
                        let expires = now_ms() + i64::from(secs) * 1000;
                        let new =
                            self.offer(targets, why, expires, &mut legs, &events_tx, &mut limited);
                        schedule.begin_turn(new, since(began), secs);
                    } else {
                        self.offer(targets, why, expires, &mut legs, &events_tx, &mut limited);
                    }
                    continue;
                }
            }
            // The next thing that may happen without a message: a Client falling due, the
            // current turn ending, an undelivered leg's delivery window closing.
            let next_due = schedule
                .wake_at()
                .map(|ms| began + Duration::from_millis(ms));
            let next_delivery = legs
                .iter()
                .filter(|l| !self.leg_ended(l) && !self.leg_delivered(l))
                .map(|l| l.started + DELIVERY_WITHIN)
                .min();
            let far = tokio::time::Instant::now() + Duration::from_secs(86_400);
            tokio::select! {
                heard = events.recv() => {
                    let Some((slot, heard)) = heard else { break None };
                    match heard {
                        LegNews::Answered { accept: true, .. } => {
                            match self.identity_slot(legs[slot].index, &limited).await {
                                Ok(held) => {
                                    identity_slot = held;
                                    break Some(slot);
                                }
                                Err(why) => {
                                    // Busy since it was rung (another communication
                                    // connected it first): this leg cannot connect.
                                    legs[slot].cancel(ppb::CancelReason::Failed);
                                    self.change(|c| end_leg(c, legs[slot].index, LegEndReason::Busy, &why));
                                }
                            }
                        }
                        LegNews::Answered { everywhere: true, .. } => {
                            self.change(|c| end_leg(c, legs[slot].index, LegEndReason::Rejected, "declined for every device"));
                            for leg in legs.iter().filter(|l| !self.leg_ended(l)) {
                                leg.cancel(ppb::CancelReason::DeclinedElsewhere);
                                self.change(|c| end_leg(c, leg.index, LegEndReason::DeclinedElsewhere, ""));
                            }
                            unanswered.declined_everywhere = true;
                            break None;
                        }
                        LegNews::Answered { busy: is_busy, .. } => {
                            unanswered.busy_rejections += usize::from(is_busy);
                            let why = if is_busy { "busy" } else { "declined" };
                            self.change(|c| end_leg(c, legs[slot].index, LegEndReason::Rejected, why));
                        }
                        LegNews::Delivered => self.leg_progress(legs[slot].index, false),
                        LegNews::Ringing => self.leg_progress(legs[slot].index, true),
                        other => {
                            let (reason, why) = schedule::lost_leg(&other);
                            self.change(|c| end_leg(c, legs[slot].index, reason, &why));
                        }
                    }
                }
                _ = tokio::time::sleep_until(next_due.unwrap_or(far)), if next_due.is_some() => {}
                _ = tokio::time::sleep_until(next_delivery.unwrap_or(far)), if next_delivery.is_some() => {
                    let now = tokio::time::Instant::now();
                    for leg in &legs {
                        if !self.leg_ended(leg) && !self.leg_delivered(leg) && leg.started + DELIVERY_WITHIN <= now {
                            leg.cancel(ppb::CancelReason::Failed);
                            let why = format!("the offer did not reach the device's session within {DELIVERY_WITHIN:?}");
                            self.change(|c| end_leg(c, leg.index, LegEndReason::Offline, &why));
                        }
                    }
                }
                _ = &mut deadline, if schedule.has_deadline() => {
                    for leg in legs.iter().filter(|l| !self.leg_ended(l)) {
                        leg.cancel(ppb::CancelReason::Timeout);
                        self.change(|c| end_leg(c, leg.index, LegEndReason::Timeout, ""));
                    }
                    break None;
                }
                source = self.comm.hangup_requested() => {
                    let (cancel, reason, outcome) = schedule::hangup_while_ringing(&source);
                    for leg in legs.iter().filter(|l| !self.leg_ended(l)) {
                        leg.cancel(cancel);
                        self.change(|c| end_leg(c, leg.index, reason, ""));
                    }
                    let mut result = self.attempt(outcome);
                    result.hangup = Some(source);
                    return result;
                }
            }
        };
        drop(events_tx);
        let Some(winner) = winner else {
            let reasons: Vec<LegEndReason> = self.comm.read(|c| {
                c.legs
                    .iter()
                    .map(|l| LegEndReason::try_from(l.end_reason).unwrap_or_default())
                    .collect()
            });
            return self.attempt(unanswered.outcome(&reasons));
        };
        let result = self.connected(dial, legs, winner, events).await;
        // The identity's slot is held from the answer to the hangup.
        if let Some(slot) = identity_slot {
            slot.release().await;
        }
        result
    }

    /// Takes a slot of the identity of leg `index`, which a device accepted: `None` when no
    /// limit applies (or the limiter cannot be asked: fail open), the reason when the
    /// identity is at its limit.
    async fn identity_slot(
        &self,
        index: usize,
        limited: &HashSet<String>,
    ) -> Result<Option<Slot>, String> {
        let identity = self.comm.read(|c| c.legs[index].identity.clone());
        if !limited.contains(&identity) {
            return Ok(None);
        }
        let resource = slot::identity_resource(&identity);
        let admission = slot::acquire_for(
            &self.engine.peers,
            &self.comm.account,
            &resource,
            "",
            self.engine.slot_hold,
        )
        .await;
        match admission {
            Admission::Granted(slot) => Ok(Some(*slot)),
            Admission::Unlimited => Ok(None),
            Admission::Busy { in_flight, limit } => Err(format!(
                "{identity} became busy: {in_flight} of {limit} communications connected"
            )),
            Admission::Unreachable(why) => {
                self.note(
                    Kind::Error,
                    format!("the limiter is unreachable ({why}); connecting {identity} without an identity slot"),
                    &[],
                );
                Ok(None)
            }
        }
    }

    fn leg_delivered(&self, leg: &LegLink) -> bool {
        self.comm.read(|c| {
            c.legs
                .get(leg.index)
                .is_some_and(|l| l.delivered_time.is_some())
        })
    }

    fn leg_ended(&self, leg: &LegLink) -> bool {
        self.comm.read(|c| {
            c.legs
                .get(leg.index)
                .is_none_or(|l| l.state == LegState::Ended as i32)
        })
    }

    /// Carries the winning leg until the communication on it ends.
    async fn connected(
        &mut self,
        dial: &Dial,
        legs: Vec<LegLink>,
        winner: usize,
        mut events: mpsc::Receiver<(usize, LegNews)>,
    ) -> DialResult {
        let index = legs[winner].index;
        let (identity, device) = self.change(|c| {
            let leg = &mut c.legs[index];
            leg.state = LegState::Connected as i32;
            leg.answer_time = Some(timestamp(now_ms()));
            let (identity, device, leg_id) = (
                leg.identity.clone(),
                leg.device_id.clone(),
                leg.leg_id.clone(),
            );
            c.connected_identity = identity.clone();
            c.connected_device_id = device.clone();
            c.connect_time = Some(timestamp(now_ms()));
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
        for leg in legs
            .iter()
            .filter(|l| l.index != index && !self.leg_ended(l))
        {
            leg.cancel(ppb::CancelReason::AnsweredElsewhere);
            self.change(|c| end_leg(c, leg.index, LegEndReason::AnsweredElsewhere, ""));
        }
        let started = Instant::now();
        let limit = tokio::time::sleep(Duration::from_secs(dial.time_limit.into()));
        tokio::pin!(limit);
        let mut hangup = None;
        let why = loop {
            tokio::select! {
                heard = events.recv() => match heard {
                    Some((slot, LegNews::Answered { accept: true, .. })) if slot != winner => {
                        // Lost the race: the device is told its accept came too late.
                        legs[slot].cancel(ppb::CancelReason::AnsweredElsewhere);
                    }
                    Some((slot, _)) if slot != winner => {}
                    Some((_, LegNews::Hangup)) => break format!("{identity}/{device} hung up"),
                    Some((_, LegNews::Gone(_))) => break format!("{identity}/{device} went offline"),
                    Some((_, LegNews::Delivered | LegNews::Ringing | LegNews::Answered { .. })) => {}
                    Some((_, LegNews::Failed(status))) => break format!("the leg failed: {}", status.message()),
                    Some((_, LegNews::Closed)) | None => break "the leg's stream ended".to_owned(),
                },
                _ = &mut limit => {
                    legs[winner].tell(Ask::End(ppb::OfferEnd { reason: ppb::EndReason::TimeLimit as i32 }));
                    break format!("the time limit of {}s was reached", dial.time_limit);
                }
                source = self.comm.hangup_requested() => {
                    let (reason, why) = schedule::hangup_while_connected(&source);
                    legs[winner].tell(Ask::End(ppb::OfferEnd { reason: reason as i32 }));
                    hangup = Some(source);
                    break why;
                }
            }
        };
        let leg_id = self.comm.read(|c| c.legs[index].leg_id.clone());
        self.change(|c| {
            event(
                c,
                Kind::Hangup,
                why.clone(),
                &leg_id,
                &[("reason", why.clone())],
            );
            end_leg(c, index, LegEndReason::Answered, "");
            set_state(c, State::Routing);
        });
        DialResult {
            outcome: Outcome::Connected,
            identity,
            duration_secs: started.elapsed().as_secs(),
            hangup,
        }
    }
}

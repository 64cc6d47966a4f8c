//! The rules of a Dial as plain values: who is rung when (staged `delay`s, sequential
//! turns), how a leg that stopped without an answer ended, and the Dial's outcome when
//! nobody connected. The Dial's part of the machine ([`super::dial`]) feeds them the time —
//! milliseconds since the Dial began — and what the legs did, and acts on what they
//! decide; nothing here reads a clock or touches a socket, so each rule has a unit test.

use proto::presence::v1 as ppb;
use proto::router::v1::{LegEndReason, Outcome};

use super::HangupSource;
use super::LegNews;
use crate::xml::Dial;

/// Who of a Dial's `<Client>`s rings when.
#[derive(Debug)]
pub(crate) struct Schedule {
    sequential: bool,
    /// Clients not rung yet, in document order: (index in the Dial, due at ms).
    pending: Vec<(usize, u64)>,
    /// The current turn of a sequential Dial.
    turn: Option<Turn>,
    clients: usize,
    dial_timeout: u32,
    client_timeouts: Vec<Option<u32>>,
}

/// The legs of one `<Client>`'s turn in a sequential Dial, and when the turn ends.
#[derive(Debug)]
struct Turn {
    legs: Vec<usize>,
    until: u64,
}

/// What the schedule says at some moment.
#[derive(Debug, PartialEq, Eq)]
pub(crate) struct Step {
    /// Legs of a sequential turn that is over and that have not ended: they end `timeout`
    /// ("its turn ended").
    pub expired: Vec<usize>,
    /// What to do now.
    pub action: Action,
}

/// Ring some Clients, wait, or give up.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Action {
    /// Ring these Clients (indexes into the Dial) now, for `why`; in a sequential Dial the
    /// one Client's turn lasts `turn_secs`.
    Ring {
        clients: Vec<usize>,
        why: &'static str,
        turn_secs: Option<u32>,
    },
    /// Nothing is due: wait for a leg's news or [`Schedule::wake_at`].
    Wait,
    /// Nobody is left to ring and nothing rings any more.
    Over,
}

impl Schedule {
    /// The schedule of `dial` at its start (time 0).
    pub(crate) fn new(dial: &Dial) -> Self {
        Self {
            sequential: dial.sequential,
            pending: dial
                .clients
                .iter()
                .enumerate()
                .map(|(i, c)| (i, u64::from(c.delay) * 1000))
                .collect(),
            turn: None,
            clients: dial.clients.len(),
            dial_timeout: dial.timeout,
            client_timeouts: dial.clients.iter().map(|c| c.timeout).collect(),
        }
    }

    /// What is due at `now` (ms since the Dial began), given the Dial's `legs` so far (by
    /// index, in the order they started) and which of them have ended.
    pub(crate) fn next(&mut self, now: u64, legs: usize, ended: impl Fn(usize) -> bool) -> Step {
        if self.sequential {
            return self.next_turn(now, ended);
        }
        let all_ended = (0..legs).all(&ended);
        let due: Vec<usize> = self
            .pending
            .iter()
            .enumerate()
            .filter(|(_, (_, at))| *at <= now)
            .map(|(p, _)| p)
            .collect();
        let action = if let Some(&first) = due.first() {
            let why = if self.pending[first].1 == 0 {
                "at once"
            } else {
                "its delay passed"
            };
            Action::Ring {
                clients: self.take(&due),
                why,
                turn_secs: None,
            }
        } else if all_ended && !self.pending.is_empty() && self.rung() > 0 {
            // Everyone rung so far has ended (or had no device): the next one now.
            Action::Ring {
                clients: self.take(&[0]),
                why: "every earlier leg had ended",
                turn_secs: None,
            }
        } else if self.pending.is_empty() && all_ended {
            Action::Over
        } else {
            Action::Wait
        };
        Step {
            expired: Vec::new(),
            action,
        }
    }

    fn next_turn(&mut self, now: u64, ended: impl Fn(usize) -> bool) -> Step {
        let over = self
            .turn
            .as_ref()
            .is_none_or(|t| now >= t.until || t.legs.iter().all(|&l| ended(l)));
        if !over {
            return Step {
                expired: Vec::new(),
                action: Action::Wait,
            };
        }
        let (expired, why) = match self.turn.take() {
            Some(turn) => (
                turn.legs.into_iter().filter(|&l| !ended(l)).collect(),
                "the previous Client's turn ended",
            ),
            None => (Vec::new(), "first in turn"),
        };
        if self.pending.is_empty() {
            return Step {
                expired,
                action: Action::Over,
            };
        }
        let clients = self.take(&[0]);
        let turn_secs = self.client_timeouts[clients[0]].unwrap_or(self.dial_timeout);
        Step {
            expired,
            action: Action::Ring {
                clients,
                why,
                turn_secs: Some(turn_secs),
            },
        }
    }

    /// A sequential Dial's turn began at `now` with these legs (none when the Client had
    /// no device to ring: the turn is over at the next [`Schedule::next`]).
    pub(crate) fn begin_turn(&mut self, legs: Vec<usize>, now: u64, secs: u32) {
        self.turn = Some(Turn {
            legs,
            until: now + u64::from(secs) * 1000,
        });
    }

    /// When something becomes due without any news from the legs: the next delay of a
    /// staged Dial, or the end of the current turn.
    pub(crate) fn wake_at(&self) -> Option<u64> {
        if self.sequential {
            self.turn.as_ref().map(|t| t.until)
        } else {
            self.pending.iter().map(|(_, at)| *at).min()
        }
    }

    /// Whether the Dial as a whole ends at its own timeout (a parallel Dial does; a
    /// sequential one ends when its last turn does).
    pub(crate) fn has_deadline(&self) -> bool {
        !self.sequential
    }

    fn take(&mut self, positions: &[usize]) -> Vec<usize> {
        let clients = positions.iter().map(|&p| self.pending[p].0).collect();
        for &p in positions.iter().rev() {
            self.pending.remove(p);
        }
        clients
    }

    fn rung(&self) -> usize {
        self.clients - self.pending.len()
    }
}

/// How a leg that stopped without an answer ended, and why: its device's session went
/// away or presence could not reach it (offline), or the leg failed.
pub(crate) fn lost_leg(heard: &LegNews) -> (LegEndReason, String) {
    match heard {
        LegNews::Gone(reason) => {
            let why = ppb::LeaveReason::try_from(*reason).map_or("gone", |r| r.as_str_name());
            (
                LegEndReason::Offline,
                format!("the device's session ended ({why})"),
            )
        }
        LegNews::Failed(status)
            if matches!(
                status.code(),
                tonic::Code::NotFound | tonic::Code::FailedPrecondition | tonic::Code::Unavailable
            ) =>
        {
            (
                LegEndReason::Offline,
                format!("{:?}: {}", status.code(), status.message()),
            )
        }
        LegNews::Failed(status) => (
            LegEndReason::Failed,
            format!("{:?}: {}", status.code(), status.message()),
        ),
        _ => (LegEndReason::Offline, "the offer stream ended".to_owned()),
    }
}

/// How a Dial that connected nobody ended.
#[derive(Debug, Default)]
pub(crate) struct Unanswered {
    /// A device declined for every device (`DECLINE_SCOPE_EVERYWHERE`).
    pub declined_everywhere: bool,
    /// Presence could not be read (and so no leg was started).
    pub presence_failed: bool,
    /// Devices that rejected as busy (their legs end `rejected`).
    pub busy_rejections: usize,
}

impl Unanswered {
    /// The Dial's outcome, from how its legs ended: REJECTED when declined everywhere;
    /// FAILED when presence could not be read and nothing rang; otherwise NO_ANSWER if any
    /// leg timed out, REJECTED if more rejected than were busy, BUSY if any was busy
    /// (rejected as busy, or not rung because the identity was at its limit), FAILED if a
    /// leg failed and none was offline, else OFFLINE (nobody to ring).
    pub(crate) fn outcome(&self, reasons: &[LegEndReason]) -> Outcome {
        if self.declined_everywhere {
            return Outcome::Rejected;
        }
        if reasons.is_empty() && self.presence_failed {
            return Outcome::Failed;
        }
        let count = |reason: LegEndReason| reasons.iter().filter(|r| **r == reason).count();
        let rejected = count(LegEndReason::Rejected);
        let busy = self.busy_rejections + count(LegEndReason::Busy);
        if count(LegEndReason::Timeout) > 0 {
            Outcome::NoAnswer
        } else if rejected > busy {
            Outcome::Rejected
        } else if busy > 0 {
            Outcome::Busy
        } else if count(LegEndReason::Failed) > 0 && count(LegEndReason::Offline) == 0 {
            Outcome::Failed
        } else {
            Outcome::Offline
        }
    }
}

/// What a hang-up during a Dial does to the legs still ringing and to the outcome: the
/// caller's (the API) cancels them as `caller_canceled` and the outcome is CANCELED; a
/// stopping replica or a settlement elsewhere fails them.
pub(crate) fn hangup_while_ringing(
    source: &HangupSource,
) -> (ppb::CancelReason, LegEndReason, Outcome) {
    match source {
        HangupSource::Api(_) => (
            ppb::CancelReason::CallerCanceled,
            LegEndReason::CallerCanceled,
            Outcome::Canceled,
        ),
        HangupSource::Shutdown | HangupSource::SettledElsewhere => (
            ppb::CancelReason::Failed,
            LegEndReason::Failed,
            Outcome::Failed,
        ),
    }
}

/// What a hang-up of a connected communication tells the device, and the timeline's why.
pub(crate) fn hangup_while_connected(source: &HangupSource) -> (ppb::EndReason, String) {
    match source {
        HangupSource::Api(reason) if !reason.is_empty() => (
            ppb::EndReason::RemoteHangup,
            format!("the caller hung up: {reason}"),
        ),
        HangupSource::Api(_) => (ppb::EndReason::RemoteHangup, "the caller hung up".into()),
        HangupSource::Shutdown => (
            ppb::EndReason::Failed,
            "the router replica is stopping".into(),
        ),
        HangupSource::SettledElsewhere => (
            ppb::EndReason::Failed,
            "settled by another router replica (router_lost)".into(),
        ),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::xml::ClientNoun;

    fn client(identity: &str, delay: u32, timeout: Option<u32>) -> ClientNoun {
        ClientNoun {
            identity: identity.into(),
            parameters: Default::default(),
            delay,
            timeout,
        }
    }

    fn dial(sequential: bool, clients: Vec<ClientNoun>) -> Dial {
        Dial {
            timeout: 20,
            action: None,
            method: None,
            time_limit: 3600,
            sequential,
            clients,
        }
    }

    fn ring(clients: &[usize], why: &'static str, turn_secs: Option<u32>) -> Action {
        Action::Ring {
            clients: clients.to_vec(),
            why,
            turn_secs,
        }
    }

    /// Asks `schedule` what is due at `now` with `legs` legs of which `ended` have ended.
    fn at(schedule: &mut Schedule, now: u64, legs: usize, ended: &[usize]) -> Step {
        schedule.next(now, legs, |leg| ended.contains(&leg))
    }

    #[test]
    fn a_parallel_dial_rings_every_undelayed_client_at_once_and_ends_when_all_legs_end() {
        let mut s = Schedule::new(&dial(
            false,
            vec![client("a", 0, None), client("b", 0, None)],
        ));
        assert_eq!(at(&mut s, 0, 0, &[]).action, ring(&[0, 1], "at once", None));
        assert_eq!(at(&mut s, 10, 2, &[0]).action, Action::Wait);
        assert_eq!(s.wake_at(), None);
        assert_eq!(at(&mut s, 20, 2, &[0, 1]).action, Action::Over);
        assert!(s.has_deadline());
    }

    #[test]
    fn a_delayed_client_rings_when_its_delay_passes() {
        let mut s = Schedule::new(&dial(
            false,
            vec![client("a", 0, None), client("b", 5, None)],
        ));
        assert_eq!(at(&mut s, 0, 0, &[]).action, ring(&[0], "at once", None));
        assert_eq!(s.wake_at(), Some(5000));
        assert_eq!(at(&mut s, 4999, 1, &[]).action, Action::Wait);
        assert_eq!(
            at(&mut s, 5000, 1, &[]).action,
            ring(&[1], "its delay passed", None)
        );
        assert_eq!(at(&mut s, 6000, 2, &[0, 1]).action, Action::Over);
    }

    #[test]
    fn a_delayed_client_rings_early_when_every_earlier_leg_has_ended() {
        let mut s = Schedule::new(&dial(
            false,
            vec![
                client("a", 0, None),
                client("b", 8, None),
                client("c", 9, None),
            ],
        ));
        assert_eq!(at(&mut s, 0, 0, &[]).action, ring(&[0], "at once", None));
        // a's only device rejected at 1 s: b is rung then, not at 8 s; c waits for b.
        assert_eq!(
            at(&mut s, 1000, 1, &[0]).action,
            ring(&[1], "every earlier leg had ended", None)
        );
        assert_eq!(at(&mut s, 1500, 2, &[0]).action, Action::Wait);
        assert_eq!(s.wake_at(), Some(9000));
    }

    #[test]
    fn a_client_with_no_device_counts_as_ended_so_the_next_rings_at_once() {
        // a had no available device: no leg was started, "every leg" is vacuously ended.
        let mut s = Schedule::new(&dial(
            false,
            vec![client("a", 0, None), client("b", 8, None)],
        ));
        assert_eq!(at(&mut s, 0, 0, &[]).action, ring(&[0], "at once", None));
        assert_eq!(
            at(&mut s, 0, 0, &[]).action,
            ring(&[1], "every earlier leg had ended", None)
        );
        assert_eq!(at(&mut s, 0, 0, &[]).action, Action::Over);
    }

    #[test]
    fn a_dial_whose_only_client_is_delayed_waits_for_the_delay() {
        let mut s = Schedule::new(&dial(false, vec![client("a", 3, None)]));
        assert_eq!(at(&mut s, 0, 0, &[]).action, Action::Wait);
        assert_eq!(s.wake_at(), Some(3000));
        assert_eq!(
            at(&mut s, 3000, 0, &[]).action,
            ring(&[0], "its delay passed", None)
        );
    }

    #[test]
    fn a_sequential_dial_gives_each_client_its_own_turn() {
        let mut s = Schedule::new(&dial(
            true,
            vec![client("a", 0, Some(5)), client("b", 0, None)],
        ));
        assert!(!s.has_deadline());
        let first = at(&mut s, 0, 0, &[]);
        assert_eq!(first.action, ring(&[0], "first in turn", Some(5)));
        s.begin_turn(vec![0], 10, 5);
        assert_eq!(s.wake_at(), Some(5010));
        assert_eq!(at(&mut s, 2000, 1, &[]).action, Action::Wait);
        // The turn ends at its timeout: the ringing leg expires, b gets the Dial's timeout.
        let second = at(&mut s, 5010, 1, &[]);
        assert_eq!(second.expired, vec![0]);
        assert_eq!(
            second.action,
            ring(&[1], "the previous Client's turn ended", Some(20))
        );
        s.begin_turn(vec![1], 5010, 20);
        let last = at(&mut s, 25_010, 2, &[0]);
        assert_eq!(last.expired, vec![1]);
        assert_eq!(last.action, Action::Over);
    }

    #[test]
    fn a_sequential_turn_ends_at_once_when_its_legs_end() {
        let mut s = Schedule::new(&dial(
            true,
            vec![client("a", 0, None), client("b", 0, None)],
        ));
        at(&mut s, 0, 0, &[]);
        s.begin_turn(vec![0, 1], 0, 20);
        // Both of a's devices rejected (or went offline) at 1 s: b's turn starts then.
        let step = at(&mut s, 1000, 2, &[0, 1]);
        assert!(step.expired.is_empty());
        assert_eq!(
            step.action,
            ring(&[1], "the previous Client's turn ended", Some(20))
        );
        // A Client with no device: its turn has no legs and is over at once.
        s.begin_turn(Vec::new(), 1000, 20);
        assert_eq!(at(&mut s, 1000, 2, &[0, 1]).action, Action::Over);
    }

    fn outcome(unanswered: Unanswered, reasons: &[LegEndReason]) -> Outcome {
        unanswered.outcome(reasons)
    }

    #[test]
    fn every_outcome_of_a_dial_that_connected_nobody() {
        use LegEndReason as L;
        let none = Unanswered::default;
        assert_eq!(outcome(none(), &[]), Outcome::Offline);
        assert_eq!(outcome(none(), &[L::Offline, L::Offline]), Outcome::Offline);
        assert_eq!(
            outcome(none(), &[L::Timeout, L::Rejected]),
            Outcome::NoAnswer
        );
        assert_eq!(outcome(none(), &[L::Rejected]), Outcome::Rejected);
        assert_eq!(outcome(none(), &[L::Busy]), Outcome::Busy);
        assert_eq!(outcome(none(), &[L::Busy, L::Offline]), Outcome::Busy);
        let busy_reject = Unanswered {
            busy_rejections: 1,
            ..none()
        };
        assert_eq!(outcome(busy_reject, &[L::Rejected]), Outcome::Busy);
        assert_eq!(outcome(none(), &[L::Failed]), Outcome::Failed);
        assert_eq!(outcome(none(), &[L::Failed, L::Offline]), Outcome::Offline);
        let presence = Unanswered {
            presence_failed: true,
            ..none()
        };
        assert_eq!(outcome(presence, &[]), Outcome::Failed);
        let everywhere = Unanswered {
            declined_everywhere: true,
            ..none()
        };
        assert_eq!(
            outcome(everywhere, &[L::Rejected, L::DeclinedElsewhere]),
            Outcome::Rejected
        );
    }

    #[test]
    fn a_lost_leg_is_offline_when_its_device_is_gone_or_unreachable_and_failed_otherwise() {
        let gone = lost_leg(&LegNews::Gone(ppb::LeaveReason::Expired as i32));
        assert_eq!(gone.0, LegEndReason::Offline);
        assert!(gone.1.contains("LEAVE_REASON_EXPIRED"), "{}", gone.1);
        for code in [
            tonic::Code::NotFound,
            tonic::Code::FailedPrecondition,
            tonic::Code::Unavailable,
        ] {
            let (reason, _) = lost_leg(&LegNews::Failed(tonic::Status::new(code, "x")));
            assert_eq!(reason, LegEndReason::Offline, "{code:?}");
        }
        let (reason, why) = lost_leg(&LegNews::Failed(tonic::Status::internal("boom")));
        assert_eq!(reason, LegEndReason::Failed);
        assert!(why.contains("boom"));
        assert_eq!(lost_leg(&LegNews::Closed).0, LegEndReason::Offline);
    }

    #[test]
    fn a_hangup_cancels_as_the_caller_or_fails_as_the_replica() {
        let api = HangupSource::Api("bye".into());
        assert_eq!(
            hangup_while_ringing(&api),
            (
                ppb::CancelReason::CallerCanceled,
                LegEndReason::CallerCanceled,
                Outcome::Canceled
            )
        );
        for source in [HangupSource::Shutdown, HangupSource::SettledElsewhere] {
            assert_eq!(hangup_while_ringing(&source).2, Outcome::Failed);
            assert_eq!(hangup_while_connected(&source).0, ppb::EndReason::Failed);
        }
        assert_eq!(
            hangup_while_connected(&api),
            (
                ppb::EndReason::RemoteHangup,
                "the caller hung up: bye".to_owned()
            )
        );
        assert!(
            hangup_while_connected(&HangupSource::SettledElsewhere)
                .1
                .contains("router_lost")
        );
    }
}

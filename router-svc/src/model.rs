//! The communication as the router keeps it: the public `Communication` message itself (so
//! reads need no conversion), helpers that append timeline events and legs, and the record
//! stored in etcd (the message plus the owning replica's address, protobuf-encoded).

use prost::Message;
use prost_types::Timestamp;
use proto::router::v1 as pb;
use proto::router::v1::TimelineEventKind as Kind;
use proto::router::v1::{CommunicationState as State, LegEndReason, LegState, Outcome};

pub use plumbing::time::now_ms;

/// A protobuf timestamp for `ms` since the epoch.
pub fn timestamp(ms: i64) -> Timestamp {
    Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: (ms.rem_euclid(1000) * 1_000_000) as i32,
    }
}

/// Milliseconds since the epoch of a timestamp (0 when unset).
pub fn millis(ts: Option<&Timestamp>) -> i64 {
    ts.map_or(0, |t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000)
}

/// A communication record in etcd.
#[derive(Clone, PartialEq, Message)]
pub struct StoredRecord {
    /// The communication.
    #[prost(message, optional, tag = "1")]
    pub communication: Option<pb::Communication>,
    /// gRPC address of the replica running it (empty once it has ended).
    #[prost(string, tag = "2")]
    pub owner: String,
    /// The limiter slot it holds (empty when none, or not yet written), so that another
    /// replica settling it after its owner died can release the slot at once.
    #[prost(string, tag = "3")]
    pub slot_id: String,
}

impl StoredRecord {
    /// Decodes a stored value.
    pub fn decode_from(bytes: &[u8]) -> Result<Self, prost::DecodeError> {
        Self::decode(bytes)
    }
}

/// The ENDED event's `reason` for a communication settled by another replica because the
/// replica running it was lost.
pub const ROUTER_LOST: &str = "router_lost";

/// Ends a communication whose replica was lost: FAILED, every open leg FAILED, and the ENDED
/// event says `reason: router_lost`.
pub fn finish_lost(comm: &mut pb::Communication) {
    finish(
        comm,
        Outcome::Failed,
        "the router replica running it was lost (router_lost)",
        LegEndReason::Failed,
    );
    if let Some(ended) = comm.timeline.last_mut() {
        ended
            .details
            .insert("reason".to_owned(), ROUTER_LOST.to_owned());
    }
}

/// Whether a state is final.
pub fn is_ended(comm: &pb::Communication) -> bool {
    comm.state == State::Ended as i32
}

/// Whether Route may return: connected or ended.
pub fn is_settled(comm: &pb::Communication) -> bool {
    comm.state == State::Connected as i32 || is_ended(comm)
}

/// Appends a timeline event.
pub fn event(
    comm: &mut pb::Communication,
    kind: Kind,
    message: impl Into<String>,
    leg_id: &str,
    details: &[(&str, String)],
) {
    let sequence = comm.timeline.len() as u32 + 1;
    comm.timeline.push(pb::TimelineEvent {
        time: Some(timestamp(now_ms())),
        kind: kind as i32,
        message: message.into(),
        leg_id: leg_id.to_owned(),
        details: details
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect(),
        sequence,
    });
}

/// Sets the state (no event).
pub fn set_state(comm: &mut pb::Communication, state: State) {
    comm.state = state as i32;
}

/// Adds a ringing leg; its index.
pub fn add_leg(comm: &mut pb::Communication, leg_id: &str, identity: &str, device: &str) -> usize {
    comm.legs.push(pb::Leg {
        leg_id: leg_id.to_owned(),
        identity: identity.to_owned(),
        device_id: device.to_owned(),
        state: LegState::Ringing as i32,
        end_reason: LegEndReason::Unspecified as i32,
        start_time: Some(timestamp(now_ms())),
        answer_time: None,
        end_time: None,
        delivered_time: None,
        ringing_time: None,
    });
    comm.legs.len() - 1
}

/// Ends leg `index` with `reason` and records it, unless it has already ended.
pub fn end_leg(comm: &mut pb::Communication, index: usize, reason: LegEndReason, why: &str) {
    let Some(leg) = comm.legs.get_mut(index) else {
        return;
    };
    if leg.state == LegState::Ended as i32 {
        return;
    }
    leg.state = LegState::Ended as i32;
    leg.end_reason = reason as i32;
    leg.end_time = Some(timestamp(now_ms()));
    let leg_id = leg.leg_id.clone();
    let name = reason_name(reason);
    let message = if why.is_empty() {
        format!("leg {leg_id} ended: {name}")
    } else {
        format!("leg {leg_id} ended: {name} ({why})")
    };
    event(
        comm,
        Kind::LegEnded,
        message,
        &leg_id,
        &[("end_reason", name.to_owned())],
    );
}

/// The contract's word for a leg end reason.
pub fn reason_name(reason: LegEndReason) -> &'static str {
    match reason {
        LegEndReason::Unspecified => "unspecified",
        LegEndReason::Answered => "answered",
        LegEndReason::AnsweredElsewhere => "answered_elsewhere",
        LegEndReason::Rejected => "rejected",
        LegEndReason::Timeout => "timeout",
        LegEndReason::Offline => "offline",
        LegEndReason::CallerCanceled => "caller_canceled",
        LegEndReason::Failed => "failed",
        LegEndReason::DeclinedElsewhere => "declined_elsewhere",
        LegEndReason::Busy => "busy",
    }
}

/// The webhook word (`DialStatus`, status callback `Outcome`) for an outcome.
pub fn outcome_word(outcome: Outcome) -> &'static str {
    match outcome {
        Outcome::Unspecified => "",
        Outcome::Connected => "completed",
        Outcome::NoAnswer => "no-answer",
        Outcome::Offline => "offline",
        Outcome::Busy => "busy",
        Outcome::Rejected => "rejected",
        Outcome::Failed => "failed",
        Outcome::Canceled => "canceled",
    }
}

/// The status callback word for a state.
pub fn state_word(state: i32) -> &'static str {
    match State::try_from(state) {
        Ok(State::Routing) => "routing",
        Ok(State::Ringing) => "ringing",
        Ok(State::Connected) => "connected",
        Ok(State::Ended) => "ended",
        _ => "unspecified",
    }
}

/// Marks the communication ended with `outcome` (a connected one keeps CONNECTED): every
/// open leg ends (`open_legs` as the reason for ringing ones, ANSWERED for a connected one),
/// and the last event is ENDED.
pub fn finish(comm: &mut pb::Communication, outcome: Outcome, why: &str, open_legs: LegEndReason) {
    if is_ended(comm) {
        return;
    }
    for index in 0..comm.legs.len() {
        let reason = if comm.legs[index].state == LegState::Connected as i32 {
            LegEndReason::Answered
        } else {
            open_legs
        };
        end_leg(comm, index, reason, "");
    }
    if comm.outcome != Outcome::Connected as i32 || outcome == Outcome::Connected {
        comm.outcome = outcome as i32;
    }
    set_state(comm, State::Ended);
    comm.end_time = Some(timestamp(now_ms()));
    let outcome_name = Outcome::try_from(comm.outcome)
        .map(|o| o.as_str_name())
        .unwrap_or("OUTCOME_UNSPECIFIED");
    event(
        comm,
        Kind::Ended,
        format!("ended: {why}"),
        "",
        &[("outcome", outcome_name.to_owned())],
    );
}

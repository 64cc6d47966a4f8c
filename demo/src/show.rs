//! A communication as the demo prints it: one summary line, its legs, and its timeline with
//! each event's offset from the first.
//!
//! ```text
//!     CM_demo_1  state=CONNECTED  outcome=CONNECTED  connected=alice/alice-softphone
//!     legs:
//!       CM_demo_1.1  alice/alice-softphone  CONNECTED  end_reason=-
//!     timeline:
//!        1 +    0ms  CREATED       +15551234 -> +15550100 (voice)
//! ```

use std::fmt::Write as _;

use proto::router::v1::{
    Communication, CommunicationState, LegEndReason, LegState, Outcome, TimelineEventKind,
};

/// The text of `communication`, lines indented by four spaces, ending in a newline.
pub fn communication(communication: &Communication) -> String {
    let c = communication;
    let mut text = format!(
        "    {}  state={}  outcome={}",
        c.communication_id,
        short(state_name(c.state), "COMMUNICATION_STATE_"),
        short(outcome_name(c.outcome), "OUTCOME_"),
    );
    if !c.connected_identity.is_empty() {
        let _ = write!(
            text,
            "  connected={}/{}",
            c.connected_identity, c.connected_device_id
        );
    }
    text.push('\n');
    text.push_str(if c.legs.is_empty() {
        "    legs: none\n"
    } else {
        "    legs:\n"
    });
    for leg in &c.legs {
        let state = LegState::try_from(leg.state).map_or("?", |s| s.as_str_name());
        let end = LegEndReason::try_from(leg.end_reason).map_or("?", |r| r.as_str_name());
        let _ = writeln!(
            text,
            "      {}  {}/{}  {}  end_reason={}",
            leg.leg_id,
            leg.identity,
            leg.device_id,
            short(state, "LEG_STATE_"),
            short(end, "LEG_END_REASON_"),
        );
    }
    text.push_str("    timeline:\n");
    let start = c
        .timeline
        .first()
        .and_then(|event| millis(event.time.as_ref()));
    // Padded to the longest kind, LEG_DELIVERED.
    for event in &c.timeline {
        let offset = match (start, millis(event.time.as_ref())) {
            (Some(start), Some(at)) => format!("+{:5}ms", at - start),
            _ => String::new(),
        };
        let _ = writeln!(
            text,
            "      {:>2} {offset}  {:<13} {}",
            event.sequence,
            short(kind_name(event.kind), "TIMELINE_EVENT_KIND_"),
            event.message,
        );
    }
    text
}

/// `OUTCOME_CONNECTED` for the outcome number (`?` for one this build does not know).
pub fn outcome_name(outcome: i32) -> &'static str {
    Outcome::try_from(outcome).map_or("?", |o| o.as_str_name())
}

/// `COMMUNICATION_STATE_ENDED` for the state number.
pub fn state_name(state: i32) -> &'static str {
    CommunicationState::try_from(state).map_or("?", |s| s.as_str_name())
}

/// `TIMELINE_EVENT_KIND_LEG_STARTED` for the kind number.
pub fn kind_name(kind: i32) -> &'static str {
    TimelineEventKind::try_from(kind).map_or("?", |k| k.as_str_name())
}

/// `name` without `prefix`; `-` for the unspecified value, as nothing was set.
fn short<'a>(name: &'a str, prefix: &str) -> &'a str {
    match name.strip_prefix(prefix) {
        Some("UNSPECIFIED") => "-",
        Some(rest) => rest,
        None => name,
    }
}

fn millis(time: Option<&prost_types::Timestamp>) -> Option<i64> {
    let time = time?;
    Some(time.seconds * 1000 + i64::from(time.nanos) / 1_000_000)
}

#[cfg(test)]
mod tests {
    use proto::router::v1::{Leg, TimelineEvent};

    use super::*;

    fn event(sequence: u32, ms: i64, kind: TimelineEventKind, message: &str) -> TimelineEvent {
        TimelineEvent {
            time: Some(prost_types::Timestamp {
                seconds: 1_700_000_000 + ms / 1000,
                nanos: (ms % 1000) as i32 * 1_000_000,
            }),
            kind: kind as i32,
            message: message.to_owned(),
            sequence,
            ..TimelineEvent::default()
        }
    }

    #[test]
    fn prints_summary_legs_and_timeline_offsets() {
        let communication = Communication {
            communication_id: "CM_demo_1".to_owned(),
            state: CommunicationState::Connected as i32,
            outcome: Outcome::Connected as i32,
            connected_identity: "alice".to_owned(),
            connected_device_id: "alice-softphone".to_owned(),
            legs: vec![Leg {
                leg_id: "CM_demo_1.1".to_owned(),
                identity: "alice".to_owned(),
                device_id: "alice-softphone".to_owned(),
                state: LegState::Connected as i32,
                ..Leg::default()
            }],
            timeline: vec![
                event(
                    1,
                    0,
                    TimelineEventKind::Created,
                    "+15551234 -> +15550100 (voice)",
                ),
                event(6, 2009, TimelineEventKind::Connected, "connected to alice"),
            ],
            ..Communication::default()
        };
        assert_eq!(
            super::communication(&communication),
            "    CM_demo_1  state=CONNECTED  outcome=CONNECTED  connected=alice/alice-softphone\n\
             \x20   legs:\n\
             \x20     CM_demo_1.1  alice/alice-softphone  CONNECTED  end_reason=-\n\
             \x20   timeline:\n\
             \x20      1 +    0ms  CREATED       +15551234 -> +15550100 (voice)\n\
             \x20      6 + 2009ms  CONNECTED     connected to alice\n"
        );
    }

    #[test]
    fn says_none_without_legs_and_dash_for_unset_values() {
        let text = super::communication(&Communication {
            communication_id: "CM_x".to_owned(),
            ..Communication::default()
        });
        assert!(text.starts_with("    CM_x  state=-  outcome=-\n    legs: none\n"));
    }
}

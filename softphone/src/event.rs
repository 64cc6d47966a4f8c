//! What the softphone reports: one [`Event`] per thing that happened, displayed as one
//! plain line that starts with a fixed word and carries `name=value` fields, so logs can be
//! grepped (`grep '^offer '`, `grep 'ended CM42 '`).

use std::collections::HashMap;
use std::fmt;
use std::time::Duration;

use proto::presence::v1 as pb;

/// Something the softphone did or saw.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Opening a Connect stream to `address`.
    Connecting {
        /// The presence address.
        address: String,
    },
    /// The device is present (the answer to `hello`).
    Registered {
        /// The presence address the stream is on.
        address: String,
        /// The device as stored.
        device: pb::Device,
    },
    /// The device's status changed (the answer to a status change).
    StatusChanged {
        /// The device as stored.
        device: pb::Device,
    },
    /// An incoming communication is offered.
    Offer(pb::ConnectOffer),
    /// This device accepted an offer: it is connected unless a `cancel` says another
    /// device won.
    Connected {
        /// The communication.
        communication_id: String,
        /// The offer accepted.
        offer_id: String,
    },
    /// This device rejected an offer.
    Rejected {
        /// The communication.
        communication_id: String,
        /// The offer rejected.
        offer_id: String,
        /// The reason given.
        reason: pb::RejectReason,
        /// Declined for every device, not only this one.
        everywhere: bool,
    },
    /// An offer was withdrawn.
    Cancelled {
        /// The communication (empty if the offer was unknown here).
        communication_id: String,
        /// The offer withdrawn.
        offer_id: String,
        /// Why, as the server says.
        reason: pb::CancelReason,
        /// This device had accepted: its accept lost the race.
        after_accept: bool,
    },
    /// This device asked to end a connected communication.
    HangingUp {
        /// The communication.
        communication_id: String,
    },
    /// A connected communication ended.
    Ended {
        /// The communication.
        communication_id: String,
        /// Why, as the server says.
        reason: pb::EndReason,
    },
    /// The stream broke while an offer rang or a communication was connected: the router
    /// ends it.
    Dropped {
        /// The communication.
        communication_id: String,
    },
    /// The stream ended; the softphone reconnects.
    Disconnected {
        /// The address the stream was on.
        address: String,
        /// Why (the status message, on one line).
        reason: String,
        /// When the next attempt starts.
        retry_in: Duration,
        /// Where the next attempt goes.
        next: String,
    },
    /// A remark about a command (e.g. nothing to answer).
    Note(String),
    /// The keys a person can type.
    Help,
    /// The softphone is exiting.
    Bye,
}

impl fmt::Display for Event {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Connecting { address } => write!(f, "connecting address={address}"),
            Self::Registered { address, device } => write!(
                f,
                "registered identity={} device={} status={} account={} address={address}",
                device.identity,
                device.device_id,
                status_name(device.status),
                device.account_id,
            ),
            Self::StatusChanged { device } => write!(
                f,
                "status {} device={}",
                status_name(device.status),
                device.device_id
            ),
            Self::Offer(offer) => write!(
                f,
                "offer {} offer={} from={} to={} channel={}{} params={}",
                offer.communication_id,
                offer.offer_id,
                field(&offer.from),
                field(&offer.to),
                field(&offer.channel),
                expires_in(offer.expire_time.as_ref()),
                params(&offer.parameters),
            ),
            Self::Connected {
                communication_id,
                offer_id,
            } => write!(f, "connected {communication_id} offer={offer_id}"),
            Self::Rejected {
                communication_id,
                offer_id,
                reason,
                everywhere,
            } => {
                write!(
                    f,
                    "rejected {communication_id} offer={offer_id} reason={}",
                    enum_name(reason.as_str_name(), "REJECT_REASON_")
                )?;
                if *everywhere {
                    f.write_str(" everywhere=true")?;
                }
                Ok(())
            }
            Self::Cancelled {
                communication_id,
                offer_id,
                reason,
                after_accept,
            } => {
                let id = if communication_id.is_empty() {
                    "-"
                } else {
                    communication_id
                };
                write!(
                    f,
                    "cancel {id} offer={offer_id} reason={}",
                    enum_name(reason.as_str_name(), "CANCEL_REASON_")
                )?;
                if *after_accept {
                    f.write_str(" accept_lost=true")?;
                }
                Ok(())
            }
            Self::HangingUp { communication_id } => write!(f, "hangup {communication_id}"),
            Self::Ended {
                communication_id,
                reason,
            } => write!(
                f,
                "ended {communication_id} reason={}",
                enum_name(reason.as_str_name(), "END_REASON_")
            ),
            Self::Dropped { communication_id } => {
                write!(f, "dropped {communication_id} reason=stream_broke")
            }
            Self::Disconnected {
                address,
                reason,
                retry_in,
                next,
            } => write!(
                f,
                "disconnected address={address} reason={} retry_in={}ms next={next}",
                field(reason),
                retry_in.as_millis()
            ),
            Self::Note(note) => write!(f, "note {note}"),
            Self::Help => f.write_str(
                "keys a=answer r=reject(here) e=reject(everywhere) h=hangup s=status(available>busy>away>dnd) q=quit ?=help",
            ),
            Self::Bye => f.write_str("bye"),
        }
    }
}

/// `STATUS_DO_NOT_DISTURB` → `do_not_disturb`; unknown numbers as they are.
fn status_name(status: i32) -> String {
    pb::Status::try_from(status).map_or_else(
        |_| status.to_string(),
        |s| enum_name(s.as_str_name(), "STATUS_"),
    )
}

/// A protobuf enum name without its prefix, in lower case.
fn enum_name(name: &str, prefix: &str) -> String {
    name.strip_prefix(prefix)
        .unwrap_or(name)
        .to_ascii_lowercase()
}

/// A value as one greppable token: quoted (Rust string syntax) when it is empty or holds
/// a space, a quote, `,` or `=`.
fn field(value: &str) -> String {
    let plain = !value.is_empty()
        && !value
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || matches!(c, '"' | ',' | '='));
    if plain {
        value.to_owned()
    } else {
        format!("{value:?}")
    }
}

/// Parameters as `k=v,k=v`, sorted by name; `-` when there are none.
fn params(parameters: &HashMap<String, String>) -> String {
    if parameters.is_empty() {
        return "-".into();
    }
    let mut pairs: Vec<_> = parameters.iter().collect();
    pairs.sort();
    pairs
        .into_iter()
        .map(|(k, v)| format!("{}={}", field(k), field(v)))
        .collect::<Vec<_>>()
        .join(",")
}

/// ` expires_in=9.8s` from the offer's expiry, or nothing when it has none.
fn expires_in(expire: Option<&prost_types::Timestamp>) -> String {
    let Some(expire) = expire else {
        return String::new();
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    let at = Duration::new(
        u64::try_from(expire.seconds).unwrap_or(0),
        u32::try_from(expire.nanos).unwrap_or(0),
    );
    let left = at.saturating_sub(now);
    format!(" expires_in={:.1}s", left.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_offer_is_one_line_with_its_fields() {
        let offer = pb::ConnectOffer {
            offer_id: "leg-1".into(),
            communication_id: "CM123".into(),
            from: "+15551234".into(),
            to: "+15550100".into(),
            channel: "voice".into(),
            parameters: [
                ("queue".to_owned(), "vip".to_owned()),
                ("name".to_owned(), "Carol Ann".to_owned()),
            ]
            .into(),
            expire_time: None,
        };
        assert_eq!(
            Event::Offer(offer).to_string(),
            "offer CM123 offer=leg-1 from=+15551234 to=+15550100 channel=voice params=name=\"Carol Ann\",queue=vip"
        );
    }

    #[test]
    fn reasons_read_as_lower_case_words() {
        let ended = Event::Ended {
            communication_id: "CM1".into(),
            reason: pb::EndReason::RemoteHangup,
        };
        assert_eq!(ended.to_string(), "ended CM1 reason=remote_hangup");
        let cancel = Event::Cancelled {
            communication_id: "CM1".into(),
            offer_id: "o".into(),
            reason: pb::CancelReason::AnsweredElsewhere,
            after_accept: true,
        };
        assert_eq!(
            cancel.to_string(),
            "cancel CM1 offer=o reason=answered_elsewhere accept_lost=true"
        );
    }

    #[test]
    fn a_reason_with_newlines_stays_on_one_line() {
        let event = Event::Disconnected {
            address: "a:1".into(),
            reason: "broken\npipe".into(),
            retry_in: Duration::from_millis(200),
            next: "b:2".into(),
        };
        assert!(!event.to_string().contains('\n'));
    }
}

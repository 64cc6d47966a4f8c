//! Conversions between engine answers and the wire, shared by the public API and the relay.

use proto::limiter::v1 as pb;

use crate::engine::{AcquireReply, UsageReply};

/// Milliseconds since the epoch as a protobuf timestamp.
pub fn timestamp(ms: u64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

/// A protobuf timestamp as milliseconds since the epoch.
pub fn millis(ts: Option<&prost_types::Timestamp>) -> u64 {
    ts.map_or(0, |t| {
        (t.seconds.max(0) as u64) * 1000 + (t.nanos.max(0) as u64) / 1_000_000
    })
}

/// Engine answer → AcquireResponse.
pub fn acquire_response(reply: AcquireReply) -> pb::AcquireResponse {
    pb::AcquireResponse {
        decision: if reply.granted {
            pb::Decision::Granted
        } else {
            pb::Decision::Rejected
        } as i32,
        slot_id: reply.slot_id,
        in_flight: reply.in_flight,
        limit: reply.limit,
        retry_after_ms: reply.retry_after_ms,
        expire_time: reply.granted.then(|| timestamp(reply.expire_ms)),
        shadow: reply.shadow,
        fencing_token: reply.fencing_token,
    }
}

/// Engine renewal (new expiry, token) → RenewResponse.
pub fn renew_response((expire_ms, token): (u64, u64)) -> pb::RenewResponse {
    pb::RenewResponse {
        expire_time: Some(timestamp(expire_ms)),
        fencing_token: token,
    }
}

/// Engine usage → Usage.
pub fn usage(reply: UsageReply) -> pb::Usage {
    pb::Usage {
        account_id: reply.key.account,
        resource: reply.key.resource,
        in_flight: reply.in_flight,
        limit: reply.limit,
        queued: reply.queued,
        granted_total: reply.granted_total,
        rejected_total: reply.rejected_total,
        shadow_rejected_total: reply.shadow_rejected_total,
        shadow: reply.shadow,
    }
}

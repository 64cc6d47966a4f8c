//! The limiter slot a communication holds (resource `communications`) from routing until it
//! ends. The slot's hold is short and renewed while the communication lasts, so the slots
//! of a router replica that dies free themselves within that hold, like its records.

use std::time::Duration;

use proto::limiter::v1 as pb;
use tokio_util::sync::CancellationToken;

use crate::communication::IdentityUsage;
use crate::peers::Peers;

/// The limiter resource of communications.
pub const RESOURCE: &str = "communications";
/// The limiter resource of one identity's connected communications (its limit: the
/// account's `identity.communications`, see the limiter's contract).
pub fn identity_resource(identity: &str) -> String {
    format!("identity.communications/{identity}")
}
/// How long the router waits for the limiter (acquire, renew, release).
const LIMITER_DEADLINE: Duration = Duration::from_secs(3);

/// The limiter's answer for a new communication.
#[derive(Debug)]
pub enum Admission {
    /// A slot is held (renewed until released or dropped).
    Granted(Box<Slot>),
    /// No limiter is configured: communications are not limited.
    Unlimited,
    /// The account is at its limit.
    Busy {
        /// Slots in flight.
        in_flight: u32,
        /// The limit.
        limit: u32,
    },
    /// The limiter could not be asked; with why.
    Unreachable(String),
}

/// A held slot. Dropping it releases it in the background.
#[derive(Debug)]
pub struct Slot {
    id: String,
    peers: Peers,
    renewing: CancellationToken,
    released: bool,
}

/// Asks for a communications slot for `account`, idempotent per communication id.
pub async fn acquire(
    peers: &Peers,
    account: &str,
    communication_id: &str,
    hold: Duration,
) -> Admission {
    acquire_for(peers, account, RESOURCE, communication_id, hold).await
}

/// Whether `identity` of `account` is limited in connected communications, and busy.
pub async fn identity_usage(peers: &Peers, account: &str, identity: &str) -> IdentityUsage {
    let Some(Ok(limiter)) = peers.limiter() else {
        return IdentityUsage::Unlimited;
    };
    let request = pb::GetUsageRequest {
        account_id: account.to_owned(),
        resource: identity_resource(identity),
    };
    match tokio::time::timeout(LIMITER_DEADLINE, limiter.usage(request)).await {
        Ok(Ok(answer)) => match answer.usage {
            Some(usage) if usage.limit > 0 && usage.in_flight >= usage.limit => {
                IdentityUsage::Busy(usage.in_flight, usage.limit)
            }
            Some(usage) if usage.limit > 0 => IdentityUsage::Limited,
            _ => IdentityUsage::Unlimited,
        },
        Ok(Err(status)) => {
            tracing::warn!(code = ?status.code(), "could not read an identity's usage; ringing it");
            IdentityUsage::Unlimited
        }
        Err(_) => {
            tracing::warn!("the limiter did not answer an identity's usage in time; ringing it");
            IdentityUsage::Unlimited
        }
    }
}

/// Asks for a slot of `resource` for `account` (idempotent per `request_id` when given).
pub async fn acquire_for(
    peers: &Peers,
    account: &str,
    resource: &str,
    request_id: &str,
    hold: Duration,
) -> Admission {
    let Some(limiter) = peers.limiter() else {
        return Admission::Unlimited;
    };
    let limiter = match limiter {
        Ok(limiter) => limiter,
        Err(err) => return Admission::Unreachable(err.to_string()),
    };
    let request = pb::AcquireRequest {
        account_id: account.to_owned(),
        resource: resource.to_owned(),
        request_id: request_id.to_owned(),
        hold_seconds: hold.as_secs() as u32,
        wait_timeout_ms: 0,
    };
    let answer = match tokio::time::timeout(LIMITER_DEADLINE, limiter.acquire(request)).await {
        Ok(Ok(answer)) => answer,
        Ok(Err(status)) => {
            return Admission::Unreachable(format!("{:?}: {}", status.code(), status.message()));
        }
        Err(_) => return Admission::Unreachable("no answer within 3 s".into()),
    };
    if answer.decision != pb::Decision::Granted as i32 {
        return Admission::Busy {
            in_flight: answer.in_flight,
            limit: answer.limit,
        };
    }
    let renewing = CancellationToken::new();
    tokio::spawn(renew(
        peers.clone(),
        answer.slot_id.clone(),
        hold,
        renewing.clone(),
    ));
    Admission::Granted(Box::new(Slot {
        id: answer.slot_id,
        peers: peers.clone(),
        renewing,
        released: false,
    }))
}

impl Slot {
    /// The limiter's id of the slot.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Releases the slot and waits (briefly) for the limiter to confirm.
    pub async fn release(mut self) {
        self.released = true;
        self.renewing.cancel();
        release(&self.peers, &self.id).await;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if self.released {
            return;
        }
        self.renewing.cancel();
        let (peers, id) = (self.peers.clone(), std::mem::take(&mut self.id));
        tokio::spawn(async move { release(&peers, &id).await });
    }
}

/// Releases slot `slot_id` (held by this replica or by a lost one), waiting briefly for
/// the limiter.
pub async fn release(peers: &Peers, slot_id: &str) {
    let Some(Ok(limiter)) = peers.limiter() else {
        return;
    };
    let request = pb::ReleaseRequest {
        slot_id: slot_id.to_owned(),
    };
    match tokio::time::timeout(LIMITER_DEADLINE, limiter.release(request)).await {
        Ok(Ok(_)) => {}
        Ok(Err(status)) => {
            tracing::warn!(code = ?status.code(), "could not release a communication slot; it expires by itself");
        }
        Err(_) => {
            tracing::warn!(
                "the limiter did not answer a release in time; the slot expires by itself"
            );
        }
    }
}

async fn renew(peers: Peers, slot_id: String, hold: Duration, stop: CancellationToken) {
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(hold / 3) => {}
        }
        let Some(Ok(limiter)) = peers.limiter() else {
            return;
        };
        let request = pb::RenewRequest {
            slot_id: slot_id.clone(),
            hold_seconds: hold.as_secs() as u32,
        };
        match tokio::time::timeout(LIMITER_DEADLINE, limiter.renew(request)).await {
            Ok(Ok(_)) => {}
            Ok(Err(status)) => {
                tracing::warn!(code = ?status.code(), "could not renew a communication slot");
            }
            Err(_) => tracing::warn!("the limiter did not answer a renewal in time"),
        }
    }
}

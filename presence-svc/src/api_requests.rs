//! The checks of each PresenceService request, one function per RPC (and per message of a
//! Connect stream): who the caller acts for, then the field rules of [`crate::rules`]. The
//! handlers and the session call these before they touch the domain, and the
//! `presence_requests` fuzz target calls the same functions.

use std::collections::{BTreeMap, HashSet};

use plumbing::auth::Caller;
use plumbing::validate::FieldError;
use proto::presence::v1 as pb;

use super::PageToken;
use crate::error::Error;
use crate::identity::{self, DeviceRef, EmptyDevice, acting_key};
use crate::record::{DeviceKey, DeviceStatus};
use crate::rules;
use crate::watch::{Start, WatchRequest};

/// A device announcing itself: Register, or the `hello` of a Connect stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announcement {
    /// The device (a generated id when the request left it empty).
    pub key: DeviceKey,
    /// Its status (`available` when the request left it unspecified).
    pub status: DeviceStatus,
    /// Its attributes.
    pub attributes: BTreeMap<String, String>,
}

/// A status change: UpdateStatus, or `status` on a Connect stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusChange {
    /// The new status (`None`: unchanged).
    pub status: Option<DeviceStatus>,
    /// The new attributes (`None`: unchanged).
    pub attributes: Option<BTreeMap<String, String>>,
}

/// A read: the account, and the revision the answer must include.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Read {
    /// The account read.
    pub account: String,
    /// The revision the cache must have caught up with.
    pub min_revision: i64,
}

/// Register: the announcement and its TTL in seconds.
pub fn register(caller: &Caller, r: &pb::RegisterRequest) -> Result<(Announcement, u32), Error> {
    let device = DeviceRef {
        account_id: &r.account_id,
        identity: &r.identity,
        device_id: &r.device_id,
    };
    let key = acting_key(caller, "", device, EmptyDevice::Generate)?;
    let status = rules::device_status("status", r.status, Some(DeviceStatus::Available))?
        .unwrap_or(DeviceStatus::Available);
    let ttl = rules::ttl("ttl_seconds", r.ttl_seconds)?;
    let attributes = rules::attributes("attributes", &r.attributes)?;
    rules::contact("contact", &r.contact)?;
    let announcement = Announcement {
        key,
        status,
        attributes,
    };
    Ok((announcement, ttl))
}

/// Heartbeat, UpdateStatus and Unregister: the device they act on.
pub fn device(
    caller: &Caller,
    account_id: &str,
    identity: &str,
    device_id: &str,
) -> Result<DeviceKey, Error> {
    let device = DeviceRef {
        account_id,
        identity,
        device_id,
    };
    acting_key(caller, "", device, EmptyDevice::Refuse)
}

/// UpdateStatus: the device and the change.
pub fn update_status(
    caller: &Caller,
    r: &pb::UpdateStatusRequest,
) -> Result<(DeviceKey, StatusChange), Error> {
    let key = device(caller, &r.account_id, &r.identity, &r.device_id)?;
    Ok((key, status_change("", r.status, &r.attributes)?))
}

/// The `hello` that opens a Connect stream.
pub fn connect_hello(caller: &Caller, hello: &pb::ConnectHello) -> Result<Announcement, Error> {
    let device = DeviceRef {
        account_id: &hello.account_id,
        identity: &hello.identity,
        device_id: &hello.device_id,
    };
    let key = acting_key(caller, "hello.", device, EmptyDevice::Generate)?;
    let status = rules::device_status("hello.status", hello.status, Some(DeviceStatus::Available))?
        .unwrap_or(DeviceStatus::Available);
    let attributes = rules::attributes("hello.attributes", &hello.attributes)?;
    Ok(Announcement {
        key,
        status,
        attributes,
    })
}

/// An `answer` on a Connect stream: the reason a refusal gives (`declined` by default) and
/// where it applies (`here` by default).
pub fn connect_answer(
    answer: &pb::ConnectAnswer,
) -> Result<(pb::RejectReason, pb::DeclineScope), Error> {
    rules::external_id("answer.offer_id", &answer.offer_id)?;
    let reason = match pb::RejectReason::try_from(answer.reject_reason) {
        Ok(pb::RejectReason::Unspecified) => pb::RejectReason::Declined,
        Ok(reason) => reason,
        Err(_) => {
            return Err(rules::unknown_enum("answer.reject_reason", answer.reject_reason).into());
        }
    };
    let scope = match pb::DeclineScope::try_from(answer.scope) {
        Ok(pb::DeclineScope::Unspecified) => pb::DeclineScope::Here,
        Ok(scope) => scope,
        Err(_) => return Err(rules::unknown_enum("answer.scope", answer.scope).into()),
    };
    Ok((reason, scope))
}

/// A `ringing` on a Connect stream: the offer it names.
pub fn connect_ringing(ringing: &pb::ConnectRinging) -> Result<&str, Error> {
    rules::external_id("ringing.offer_id", &ringing.offer_id)?;
    Ok(&ringing.offer_id)
}

/// A `status` on a Connect stream.
pub fn connect_status(status: &pb::ConnectStatus) -> Result<StatusChange, Error> {
    status_change("status.", status.status, &status.attributes)
}

/// A `hangup` on a Connect stream.
pub fn connect_hangup(hangup: &pb::ConnectHangup) -> Result<(), Error> {
    Ok(rules::external_id(
        "hangup.communication_id",
        &hangup.communication_id,
    )?)
}

/// GetPresence.
pub fn get_presence(caller: &Caller, r: &pb::GetPresenceRequest) -> Result<Read, Error> {
    let account = identity::account(caller, "account_id", &r.account_id)?;
    rules::identity("identity", &r.identity)?;
    read(account, r.min_revision)
}

/// BatchGetPresence.
pub fn batch_get_presence(caller: &Caller, r: &pb::BatchGetPresenceRequest) -> Result<Read, Error> {
    let account = identity::account(caller, "account_id", &r.account_id)?;
    rules::identities("identities", &r.identities, false)?;
    read(account, r.min_revision)
}

/// ListPresence: the read, the page size, the status filter and the identity the page
/// starts after.
pub fn list_presence(
    caller: &Caller,
    r: &pb::ListPresenceRequest,
) -> Result<(Read, usize, pb::Status, Option<String>), Error> {
    let account = identity::account(caller, "account_id", &r.account_id)?;
    let size = plumbing::paging::page_size(r.page_size)?;
    let filter = rules::status_filter("status", r.status)?;
    let after = PageToken::decode(&r.page_token, &account, filter)?;
    Ok((read(account, r.min_revision)?, size, filter, after))
}

/// WatchPresence.
pub fn watch_presence(
    caller: &Caller,
    r: &pb::WatchPresenceRequest,
) -> Result<WatchRequest, Error> {
    let account = identity::account(caller, "account_id", &r.account_id)?;
    rules::identities("identities", &r.identities, true)?;
    let start = match (r.snapshot, r.start_revision) {
        (_, revision) if revision < 0 => {
            return Err(FieldError::new("start_revision", "must not be negative").into());
        }
        (true, 0) => Start::Snapshot,
        (true, _) => {
            return Err(
                FieldError::new("start_revision", "must be 0 when snapshot is true").into(),
            );
        }
        (false, 0) => Start::Now,
        (false, revision) => Start::From(revision),
    };
    Ok(WatchRequest {
        account,
        identities: r.identities.iter().cloned().collect::<HashSet<_>>(),
        start,
    })
}

fn read(account: String, min_revision: i64) -> Result<Read, Error> {
    let min_revision = rules::min_revision("min_revision", min_revision)?;
    Ok(Read {
        account,
        min_revision,
    })
}

fn status_change(
    fields: &str,
    status: i32,
    attributes: &std::collections::HashMap<String, String>,
) -> Result<StatusChange, Error> {
    let status = rules::device_status(&format!("{fields}status"), status, None)?;
    let attributes = rules::attributes(&format!("{fields}attributes"), attributes)?;
    Ok(StatusChange {
        status,
        attributes: (!attributes.is_empty()).then_some(attributes),
    })
}

//! The checks of each LimiterService request, one function per RPC: which account the
//! caller (already holding the RPC's scope) acts on, then the field rules of
//! [`crate::model`]. The handlers call these before they touch the domain, and the
//! `limiter_requests` fuzz target calls the same functions.

use plumbing::auth::Caller;
use plumbing::paging;
use plumbing::validate::{self, FieldError};
use proto::limiter::v1 as pb;

use crate::error::Error;
use crate::model::{self, AcquireSpec, LimitValue, MAX_LIMIT, SlotId, SlotKey};

/// Acquire: the validated slot request.
pub fn acquire(caller: &Caller, request: &pb::AcquireRequest) -> Result<AcquireSpec, Error> {
    let account = caller.account_for(&request.account_id)?;
    Ok(AcquireSpec::new(
        account,
        request.resource.clone(),
        request.request_id.clone(),
        request.hold_seconds,
        request.wait_timeout_ms,
    )?)
}

/// Release: the slot.
pub fn release(request: &pb::ReleaseRequest) -> Result<SlotId, Error> {
    Ok(SlotId::parse("slot_id", &request.slot_id)?)
}

/// Renew: the slot and the new hold in seconds.
pub fn renew(request: &pb::RenewRequest) -> Result<(SlotId, u32), Error> {
    let id = SlotId::parse("slot_id", &request.slot_id)?;
    let hold = model::hold(request.hold_seconds, "hold_seconds")?;
    Ok((id, hold))
}

/// SetLimit (platform callers only): the limit to store, with its account resolved.
pub fn set_limit(
    caller: &Caller,
    request: &pb::SetLimitRequest,
) -> Result<(SlotKey, LimitValue), Error> {
    // Limits are what the platform sells: an account may read its limits, not raise them.
    caller.require_platform()?;
    let limit = request
        .limit
        .as_ref()
        .ok_or_else(|| FieldError::new("limit", "must be set"))?;
    let account = limit_account(caller, &limit.account_id)?;
    model::resource_name("limit.resource", &limit.resource)?;
    validate::in_range("limit.max_in_flight", limit.max_in_flight, 1, MAX_LIMIT)?;
    let key = SlotKey {
        account,
        resource: limit.resource.clone(),
    };
    let value = LimitValue {
        max_in_flight: limit.max_in_flight,
        shadow: limit.shadow,
    };
    Ok((key, value))
}

/// GetLimit: the key (its account may be `*`, the default, for platform callers).
pub fn get_limit(caller: &Caller, request: &pb::GetLimitRequest) -> Result<SlotKey, Error> {
    limit_key(caller, &request.account_id, &request.resource)
}

/// ListLimits: the account, the page size and the resource the page starts after.
pub fn list_limits(
    caller: &Caller,
    request: &pb::ListLimitsRequest,
) -> Result<(String, usize, String), Error> {
    let account = limit_account(caller, &request.account_id)?;
    let page = paging::page_size(request.page_size)?;
    let after = paging::decode(&request.page_token, &limits_listing(&account))?;
    Ok((account, page, after.unwrap_or_default()))
}

/// What a ListLimits page token is bound to ([`paging`]): the account listed.
pub fn limits_listing(account: &str) -> String {
    format!("ListLimits/{account}")
}

/// DeleteLimit (platform callers only): the key.
pub fn delete_limit(caller: &Caller, request: &pb::DeleteLimitRequest) -> Result<SlotKey, Error> {
    caller.require_platform()?;
    limit_key(caller, &request.account_id, &request.resource)
}

/// GetUsage: the key.
pub fn get_usage(caller: &Caller, request: &pb::GetUsageRequest) -> Result<SlotKey, Error> {
    let account = usage_account(caller, &request.account_id)?;
    model::resource_name("resource", &request.resource)?;
    Ok(SlotKey {
        account,
        resource: request.resource.clone(),
    })
}

/// ListUsage: the account.
pub fn list_usage(caller: &Caller, request: &pb::ListUsageRequest) -> Result<String, Error> {
    usage_account(caller, &request.account_id)
}

fn usage_account(caller: &Caller, requested: &str) -> Result<String, Error> {
    let account = caller.account_for(requested)?;
    validate::account_id("account_id", &account)?;
    Ok(account)
}

fn limit_key(caller: &Caller, account_id: &str, resource: &str) -> Result<SlotKey, Error> {
    let account = limit_account(caller, account_id)?;
    model::resource_name("resource", resource)?;
    Ok(SlotKey {
        account,
        resource: resource.to_owned(),
    })
}

/// The account a limit request names: `*` only for platform callers.
fn limit_account(caller: &Caller, requested: &str) -> Result<String, Error> {
    if requested == "*" {
        caller.require_platform()?;
        return Ok("*".into());
    }
    usage_account(caller, requested)
}

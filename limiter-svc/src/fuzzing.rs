//! Body of the `limiter_requests` fuzz target (`fuzz/fuzz_targets/limiter_requests.rs` is a
//! one-line call of it), taking the raw fuzzer input so that the regression test replays
//! the same inputs on stable. Not part of the service API.
//!
//! It panics only when a property of the code under test is broken.

use plumbing::auth::{Caller, Scope};
use plumbing::validate;
use prost::Message;
use proto::limiter::v1 as pb;

use crate::api::requests;
use crate::model::{self, MAX_HOLD_SECS, MAX_LIMIT, MAX_WAIT_MS, SHARDS, SlotKey};

/// `data` decoded as every public LimiterService request in turn (those it decodes as),
/// each checked as its handler checks it, for a platform caller and an account caller.
/// Asserts that an account caller acts on its own account only and never on the `*`
/// defaults, that only platform callers change limits, and that what passes is within the
/// documented bounds (names, holds, waits, limits, pages, slot shards).
pub fn limiter_requests(data: &[u8]) {
    for caller in callers() {
        check(&caller, data);
    }
}

fn check(caller: &Caller, data: &[u8]) {
    if let Ok(r) = pb::AcquireRequest::decode(data)
        && let Ok(spec) = requests::acquire(caller, &r)
    {
        own_key(caller, &spec.key, false);
        assert!((1..=MAX_HOLD_SECS).contains(&spec.hold_secs));
        assert!(spec.wait_ms <= MAX_WAIT_MS);
        assert!(
            spec.request_id.is_empty()
                || validate::name("request_id", &spec.request_id, model::REQUEST_ID_MAX).is_ok()
        );
        assert!(spec.key.shard() < SHARDS);
    }
    if let Ok(r) = pb::ReleaseRequest::decode(data)
        && let Ok(id) = requests::release(&r)
    {
        assert!(id.shard() < SHARDS);
    }
    if let Ok(r) = pb::RenewRequest::decode(data)
        && let Ok((id, hold)) = requests::renew(&r)
    {
        assert!(id.shard() < SHARDS);
        assert!((1..=MAX_HOLD_SECS).contains(&hold));
    }
    if let Ok(r) = pb::SetLimitRequest::decode(data)
        && let Ok((key, value)) = requests::set_limit(caller, &r)
    {
        assert!(caller.platform, "an account caller set a limit");
        own_key(caller, &key, true);
        assert!((1..=MAX_LIMIT).contains(&value.max_in_flight));
    }
    if let Ok(r) = pb::GetLimitRequest::decode(data)
        && let Ok(key) = requests::get_limit(caller, &r)
    {
        own_key(caller, &key, true);
    }
    if let Ok(r) = pb::ListLimitsRequest::decode(data)
        && let Ok((account, page, _after)) = requests::list_limits(caller, &r)
    {
        own_account(caller, &account, true);
        assert!((1..=plumbing::paging::MAX_PAGE_SIZE).contains(&page));
    }
    if let Ok(r) = pb::DeleteLimitRequest::decode(data)
        && let Ok(key) = requests::delete_limit(caller, &r)
    {
        assert!(caller.platform, "an account caller deleted a limit");
        own_key(caller, &key, true);
    }
    if let Ok(r) = pb::GetUsageRequest::decode(data)
        && let Ok(key) = requests::get_usage(caller, &r)
    {
        own_key(caller, &key, false);
    }
    if let Ok(r) = pb::ListUsageRequest::decode(data)
        && let Ok(account) = requests::list_usage(caller, &r)
    {
        own_account(caller, &account, false);
    }
}

fn callers() -> [Caller; 2] {
    let caller = |account: &str, platform| Caller {
        account: account.to_owned(),
        identity: None,
        scopes: vec![Scope::Admin],
        platform,
        key_id: "fuzz".to_owned(),
    };
    [caller("*", true), caller("AC1", false)]
}

fn own_key(caller: &Caller, key: &SlotKey, defaults_allowed: bool) {
    own_account(caller, &key.account, defaults_allowed);
    assert!(model::resource_name("resource", &key.resource).is_ok());
}

/// `account` is a valid account id (or `*` where defaults are allowed, for platform
/// callers), and the caller's own unless the caller is the platform.
fn own_account(caller: &Caller, account: &str, defaults_allowed: bool) {
    if account == "*" {
        assert!(
            defaults_allowed && caller.platform,
            "acted on the `*` defaults"
        );
        return;
    }
    assert!(validate::account_id("account_id", account).is_ok());
    if !caller.platform {
        assert_eq!(account, caller.account, "acted on a foreign account");
    }
}

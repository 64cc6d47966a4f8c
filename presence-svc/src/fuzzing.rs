//! Body of the `presence_requests` fuzz target (`fuzz/fuzz_targets/presence_requests.rs` is
//! a one-line call of it), taking the raw fuzzer input so that the regression test replays
//! the same inputs on stable. Not part of the service API.
//!
//! It panics only when a property of the code under test is broken.

use plumbing::auth::{Caller, Scope};
use plumbing::validate;
use prost::Message;
use proto::presence::v1 as pb;
use proto::presence::v1::connect_request::Kind as In;

use crate::api::requests::{self, Announcement, Read, StatusChange};
use crate::record::DeviceKey;
use crate::rules;

/// `data` decoded as every public PresenceService request, and as a Connect stream
/// message, in turn (those it decodes as), each checked as its handler checks it, for a
/// platform caller, an account caller with an identity, an `admin` caller and one
/// without an identity. Asserts that an account token acts on its own account only, that
/// only platform and `admin` callers act for another identity, and that what passes is
/// within the documented bounds (a device setting itself offline cannot even be expressed
/// as a `DeviceStatus`).
pub fn presence_requests(data: &[u8]) {
    for caller in callers() {
        check(&caller, data);
    }
    if let Ok(message) = pb::ConnectRequest::decode(data) {
        match message.kind {
            Some(In::Answer(answer)) => {
                let _ = requests::connect_answer(&answer);
            }
            Some(In::Status(status)) => {
                if let Ok(change) = requests::connect_status(&status) {
                    check_change(&change);
                }
            }
            Some(In::Hangup(hangup)) => {
                let _ = requests::connect_hangup(&hangup);
            }
            Some(In::Ringing(ringing)) => {
                let _ = requests::connect_ringing(&ringing);
            }
            Some(In::Hello(_)) | None => {}
        }
    }
}

fn check(caller: &Caller, data: &[u8]) {
    if let Ok(r) = pb::RegisterRequest::decode(data)
        && let Ok((device, ttl)) = requests::register(caller, &r)
    {
        check_announcement(caller, &device, &r.identity);
        assert!((rules::TTL_MIN..=rules::TTL_MAX).contains(&ttl));
        assert!(r.contact.chars().count() <= rules::CONTACT_MAX);
    }
    if let Ok(message) = pb::ConnectRequest::decode(data)
        && let Some(In::Hello(hello)) = message.kind
        && let Ok(device) = requests::connect_hello(caller, &hello)
    {
        check_announcement(caller, &device, &hello.identity);
    }
    if let Ok(r) = pb::HeartbeatRequest::decode(data)
        && let Ok(key) = requests::device(caller, &r.account_id, &r.identity, &r.device_id)
    {
        check_key(caller, &key, &r.identity);
    }
    if let Ok(r) = pb::UnregisterRequest::decode(data)
        && let Ok(key) = requests::device(caller, &r.account_id, &r.identity, &r.device_id)
    {
        check_key(caller, &key, &r.identity);
    }
    if let Ok(r) = pb::UpdateStatusRequest::decode(data)
        && let Ok((key, change)) = requests::update_status(caller, &r)
    {
        check_key(caller, &key, &r.identity);
        check_change(&change);
    }
    if let Ok(r) = pb::GetPresenceRequest::decode(data)
        && let Ok(read) = requests::get_presence(caller, &r)
    {
        check_read(caller, &read);
        assert!(rules::identity("identity", &r.identity).is_ok());
    }
    if let Ok(r) = pb::BatchGetPresenceRequest::decode(data)
        && let Ok(read) = requests::batch_get_presence(caller, &r)
    {
        check_read(caller, &read);
        assert!((1..=rules::IDENTITIES_MAX).contains(&r.identities.len()));
    }
    if let Ok(r) = pb::ListPresenceRequest::decode(data)
        && let Ok((read, size, _, after)) = requests::list_presence(caller, &r)
    {
        check_read(caller, &read);
        assert!((1..=plumbing::paging::MAX_PAGE_SIZE).contains(&size));
        assert!(after.is_none_or(|a| rules::identity("page_token", &a).is_ok()));
    }
    if let Ok(r) = pb::WatchPresenceRequest::decode(data)
        && let Ok(watch) = requests::watch_presence(caller, &r)
    {
        check_read(
            caller,
            &Read {
                account: watch.account,
                min_revision: 0,
            },
        );
        assert!(watch.identities.len() <= rules::IDENTITIES_MAX);
    }
}

fn callers() -> [Caller; 4] {
    let caller = |account: &str, identity: Option<&str>, scopes: &[Scope], platform| Caller {
        account: account.to_owned(),
        identity: identity.map(str::to_owned),
        scopes: scopes.to_vec(),
        platform,
        key_id: "fuzz".to_owned(),
    };
    let client = [Scope::PresenceRegister, Scope::PresenceRead];
    [
        caller("*", None, &[Scope::Admin], true),
        caller("AC1", Some("alice"), &client, false),
        caller("AC1", None, &[Scope::Admin], false),
        caller("AC1", None, &client, false),
    ]
}

fn check_announcement(caller: &Caller, device: &Announcement, requested_identity: &str) {
    check_key(caller, &device.key, requested_identity);
    check_attributes(&device.attributes);
}

fn check_change(change: &StatusChange) {
    if let Some(attributes) = &change.attributes {
        check_attributes(attributes);
    }
}

fn check_attributes(attributes: &std::collections::BTreeMap<String, String>) {
    assert!(attributes.len() <= rules::ATTRIBUTES_MAX);
    let bytes: usize = attributes.iter().map(|(k, v)| k.len() + v.len()).sum();
    assert!(bytes <= rules::ATTRIBUTES_BYTES_MAX);
}

/// The device a write acts on is valid, in the caller's account (unless platform), and the
/// caller's own identity unless the caller may act for others.
fn check_key(caller: &Caller, key: &DeviceKey, requested_identity: &str) {
    check_read(
        caller,
        &Read {
            account: key.account.clone(),
            min_revision: 0,
        },
    );
    assert!(rules::identity("identity", &key.identity).is_ok());
    assert!(rules::device_id("device_id", &key.device_id).is_ok());
    if !caller.may_act_for_others() {
        assert_eq!(
            Some(key.identity.as_str()),
            caller.identity.as_deref(),
            "acted for a foreign identity"
        );
    }
    if !requested_identity.is_empty() {
        assert_eq!(key.identity, requested_identity);
    }
}

fn check_read(caller: &Caller, read: &Read) {
    assert!(validate::account_id("account_id", &read.account).is_ok());
    assert!(read.min_revision >= 0);
    if !caller.platform {
        assert_eq!(read.account, caller.account, "acted on a foreign account");
    }
}

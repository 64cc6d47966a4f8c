//! Bodies of this crate's fuzz targets (`fuzz/fuzz_targets/{instruction_xml,router_requests}.rs`
//! are one-line calls of these), taking the raw fuzzer input so that the regression test
//! replays the same inputs on stable. Not part of the service API.
//!
//! A body panics only when a property of the code under test is broken.

use plumbing::auth::{Caller, Scope};
use plumbing::validate;
use prost::Message;
use proto::router::v1 as pb;

use crate::grpc::requests;
use crate::rules;
use crate::url::WebhookUrl;
use crate::xml::{self, Verb};

/// The `instruction_xml` target: `data` as an instructions document (the webhook answer is
/// decoded as UTF-8, as the fetcher does). Asserts that whatever parses respects the
/// document, depth, element, client and parameter bounds and the attribute ranges, that
/// its identities are valid names, and that its URLs resolve against a webhook URL
/// without panicking (the runner resolves `Redirect` and `Dial action` that way).
pub fn instruction_xml(data: &[u8]) {
    let Ok(document) = std::str::from_utf8(data) else {
        return;
    };
    let shape = xml::tree_shape(document);
    if let Ok((depth, elements)) = shape {
        assert!(depth <= xml::MAX_DEPTH, "a tree {depth} deep parsed");
        assert!(elements <= xml::MAX_ELEMENTS, "{elements} elements parsed");
        assert!(document.len() <= xml::MAX_DOCUMENT);
    }
    let Ok(verbs) = xml::parse(document) else {
        return;
    };
    let Ok((_, elements)) = shape else {
        panic!("instructions parsed, their tree did not: {shape:?}");
    };
    assert!(verbs.len() < elements, "more verbs than elements");
    let base = WebhookUrl::parse("https://app.example.com/voice/answer.xml?step=1");
    let Ok(base) = base else {
        panic!("the base URL does not parse: {base:?}");
    };
    for verb in &verbs {
        check_verb(verb, &base);
    }
}

fn check_verb(verb: &Verb, base: &WebhookUrl) {
    let in_bounds = |value: u32, (_, min, max): (u32, u32, u32)| (min..=max).contains(&value);
    match verb {
        Verb::Pause { length } => assert!(in_bounds(*length, xml::PAUSE_LENGTH)),
        Verb::Redirect { url, .. } => {
            assert!(!url.is_empty(), "an empty Redirect parsed");
            resolve(base, url);
        }
        Verb::Dial(dial) => {
            assert!(in_bounds(dial.timeout, xml::DIAL_TIMEOUT));
            assert!(in_bounds(dial.time_limit, xml::TIME_LIMIT));
            assert!((1..=xml::MAX_CLIENTS).contains(&dial.clients.len()));
            for client in &dial.clients {
                assert!(
                    validate::name("identity", &client.identity, validate::NAME_MAX).is_ok(),
                    "client identity {:?} parsed",
                    client.identity
                );
                assert!(client.parameters.len() <= xml::MAX_PARAMETERS);
            }
            if let Some(action) = &dial.action {
                assert!(!action.is_empty(), "an empty Dial action parsed");
                resolve(base, action);
            }
        }
        Verb::Say { .. } | Verb::Reject { .. } | Verb::Hangup => {}
    }
}

/// Resolves `reference` as the runner does; what resolves must parse again as written.
fn resolve(base: &WebhookUrl, reference: &str) {
    if let Ok(url) = base.join(reference) {
        let again = WebhookUrl::parse(url.as_str());
        assert_eq!(again.as_ref(), Ok(&url), "{reference:?} resolved to {url}");
    }
}

/// The `router_requests` target: `data` decoded as every public RouterService request in
/// turn (those it decodes as), each checked as its handler checks it, for a platform
/// caller, an account caller and a caller without scopes. Asserts that an account token
/// only ever acts on its own account, that pages stay within bounds, that a page token
/// round-trips, and that what passes without private webhooks passes with them.
pub fn router_requests(data: &[u8]) {
    let callers = callers();
    if let Ok(r) = pb::PutApplicationRequest::decode(data) {
        let account_id = r.application.as_ref().map_or("", |a| a.account_id.as_str());
        accounts(&callers, Scope::RouterAdmin, account_id);
        if let Ok(app) = requests::put_application(&r) {
            let public = rules::application(app, false);
            let private = rules::application(app, true);
            assert!(
                public.is_err() || private.is_ok(),
                "allowing private webhooks refused {app:?}: {private:?}"
            );
            if private.is_ok() && !app.instructions.is_empty() {
                assert!(xml::parse(&app.instructions).is_ok());
            }
        }
    }
    if let Ok(r) = pb::GetApplicationRequest::decode(data) {
        accounts(&callers, Scope::RouterAdmin, &r.account_id);
        let _ = requests::application_address(&r.address);
    }
    if let Ok(r) = pb::DeleteApplicationRequest::decode(data) {
        accounts(&callers, Scope::RouterAdmin, &r.account_id);
        let _ = requests::application_address(&r.address);
    }
    if let Ok(r) = pb::ListApplicationsRequest::decode(data) {
        accounts(&callers, Scope::RouterAdmin, &r.account_id);
        if let Ok(page) = requests::list_applications(&r.account_id, &r) {
            assert!((1..=plumbing::paging::MAX_PAGE_SIZE).contains(&page.size));
            if let Some(after) = page.after {
                let listing = requests::applications_listing(&r.account_id);
                let token = plumbing::paging::encode(&listing, &after);
                assert_eq!(plumbing::paging::decode(&token, &listing), Ok(Some(after)));
            }
        }
    }
    if let Ok(r) = pb::RouteRequest::decode(data) {
        accounts(&callers, Scope::RouterRoute, &r.account_id);
        if let Ok(channel) = requests::route(&r) {
            assert!(
                (1..=plumbing::rules::CHANNEL_MAX).contains(&channel.len()),
                "channel {channel:?}"
            );
        }
    }
    if let Ok(r) = pb::GetCommunicationRequest::decode(data) {
        accounts(&callers, Scope::RouterRoute, &r.account_id);
        let _ = requests::communication_id(&r.communication_id);
    }
    if let Ok(r) = pb::WatchCommunicationRequest::decode(data) {
        accounts(&callers, Scope::RouterRoute, &r.account_id);
        let _ = requests::communication_id(&r.communication_id);
    }
    if let Ok(r) = pb::ListCommunicationsRequest::decode(data) {
        accounts(&callers, Scope::RouterRoute, &r.account_id);
        if let Ok(page) = requests::list_communications(&r.account_id, &r) {
            assert!((1..=plumbing::paging::MAX_PAGE_SIZE).contains(&page.size));
        }
    }
    if let Ok(r) = pb::HangupRequest::decode(data) {
        accounts(&callers, Scope::RouterRoute, &r.account_id);
        let _ = requests::hangup(&r);
    }
}

fn callers() -> [Caller; 3] {
    let caller = |account: &str, scopes: &[Scope], platform| Caller {
        account: account.to_owned(),
        identity: None,
        scopes: scopes.to_vec(),
        platform,
        key_id: "fuzz".to_owned(),
    };
    [
        caller("*", &[Scope::Admin], true),
        caller("AC1", &[Scope::RouterRoute, Scope::RouterAdmin], false),
        caller("AC1", &[], false),
    ]
}

/// The account each caller's request acts on; an account token acts on its own only.
fn accounts(callers: &[Caller], scope: Scope, account_id: &str) {
    for caller in callers {
        if let Ok(account) = requests::account(caller, scope, account_id) {
            assert!(caller.has(scope));
            assert!(validate::account_id("account_id", &account).is_ok());
            if !caller.platform {
                assert_eq!(account, caller.account, "acted on a foreign account");
            }
        }
    }
}

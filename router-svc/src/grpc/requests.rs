//! The checks of each RouterService request, one function per RPC: who may act on which
//! account, then the field rules of [`crate::rules`]. The handlers call these before they
//! touch the domain, and the `router_requests` fuzz target calls the same functions.

use plumbing::auth::{Caller, Scope};
use plumbing::paging;
use plumbing::validate::{self, FieldError};
use proto::router::v1 as pb;

use crate::error::Error;
use crate::rules;

/// A page request: its size and where it starts (`None`: the first page).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page<C> {
    /// Entries per page, 1 to [`plumbing::paging::MAX_PAGE_SIZE`].
    pub size: usize,
    /// The cursor of the last entry of the previous page.
    pub after: Option<C>,
}

/// The account a request of `caller` acts on, if the caller holds `scope`.
pub fn account(caller: &Caller, scope: Scope, account_id: &str) -> Result<String, Error> {
    caller.require(scope)?;
    let account = caller.account_for(account_id)?;
    validate::account_id("account_id", &account)?;
    Ok(account)
}

/// PutApplication: the application must be set; its fields are checked by
/// [`crate::apps::AppStore::put`] with [`rules::application`], which knows whether private
/// webhook hosts are allowed.
pub fn put_application(request: &pb::PutApplicationRequest) -> Result<&pb::Application, Error> {
    Ok(request
        .application
        .as_ref()
        .ok_or_else(|| FieldError::new("application", "must be set"))?)
}

/// GetApplication and DeleteApplication: the address.
pub fn application_address(address: &str) -> Result<(), Error> {
    Ok(rules::address("address", address)?)
}

/// ListApplications of `account`: the page; the cursor is the last address of the previous
/// page.
pub fn list_applications(
    account: &str,
    request: &pb::ListApplicationsRequest,
) -> Result<Page<String>, Error> {
    Ok(Page {
        size: paging::page_size(request.page_size)?,
        after: paging::decode(&request.page_token, &applications_listing(account))?,
    })
}

/// What a ListApplications page token is bound to ([`paging`]): the account.
pub fn applications_listing(account: &str) -> String {
    format!("ListApplications/{account}")
}

/// What a ListCommunications page token is bound to: the account and the state filter.
pub fn communications_listing(account: &str, state: i32) -> String {
    format!("ListCommunications/{account}/{state}")
}

/// Route: the channel (default `voice`).
pub fn route(request: &pb::RouteRequest) -> Result<String, Error> {
    Ok(rules::route(request)?)
}

/// GetCommunication and WatchCommunication: the id.
pub fn communication_id(id: &str) -> Result<(), Error> {
    Ok(rules::communication_id("communication_id", id)?)
}

/// ListCommunications: the page (the cursor is the create time in ms and the id of the
/// last communication of the previous page).
pub fn list_communications(
    account: &str,
    request: &pb::ListCommunicationsRequest,
) -> Result<Page<(i64, String)>, Error> {
    let size = paging::page_size(request.page_size)?;
    let listing = communications_listing(account, request.state);
    let after = paging::decode(&request.page_token, &listing)?;
    let after = after.map(|c| parse_cursor(&c)).transpose()?;
    if pb::CommunicationState::try_from(request.state).is_err() {
        return Err(FieldError::new("state", format!("unknown value {}", request.state)).into());
    }
    Ok(Page { size, after })
}

/// Hangup: the id and the reason.
pub fn hangup(request: &pb::HangupRequest) -> Result<(), Error> {
    rules::communication_id("communication_id", &request.communication_id)?;
    rules::reason(&request.reason)?;
    Ok(())
}

fn parse_cursor(cursor: &str) -> Result<(i64, String), Error> {
    cursor
        .split_once(':')
        .and_then(|(ms, id)| Some((ms.parse().ok()?, id.to_owned())))
        .ok_or_else(|| FieldError::new("page_token", "is not a token this server returned").into())
}

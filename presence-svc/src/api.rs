//! The gRPC handlers: `PresenceService` and the internal `SessionRelayService`. Each one
//! checks the caller, turns the request into domain values (with the field rules), calls
//! the domain and turns the result into the response.

use plumbing::auth::{Caller, Scope};
use plumbing::paging;
use plumbing::validate::FieldError;
use prost::Message;
use proto::presence::v1 as pb;
use proto::presence::v1::presence_service_server::PresenceService;
use proto::presence::v1::session_relay_service_server::SessionRelayService;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status, Streaming};

use crate::devices::DeviceStore;
use crate::error::Error;
use crate::record::timestamp;
use crate::relay::{RELAYED, Relay};
use crate::rules;
use crate::session::Sessions;
use crate::watch::PresenceWatch;

#[path = "api_requests.rs"]
pub mod requests;

/// Largest answer BatchGetPresence gives (gRPC clients refuse 4 MiB by default).
const MAX_ANSWER_BYTES: usize = 4 * 1024 * 1024 - 64 * 1024;
/// ListPresence pages stop growing at about this size.
const MAX_PAGE_BYTES: usize = 2 * 1024 * 1024;

/// The PresenceService handlers.
#[derive(Debug, Clone)]
pub struct PresenceApi {
    store: DeviceStore,
    sessions: Sessions,
    watch: PresenceWatch,
}

impl PresenceApi {
    /// Handlers over the domain parts.
    pub fn new(store: DeviceStore, sessions: Sessions, watch: PresenceWatch) -> Self {
        Self {
            store,
            sessions,
            watch,
        }
    }
}

fn caller<T>(request: &Request<T>, scope: Scope) -> Result<Caller, Error> {
    let caller = Caller::of(request)?;
    caller.require(scope)?;
    Ok(caller)
}

#[tonic::async_trait]
impl PresenceService for PresenceApi {
    #[tracing::instrument(skip_all)]
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let caller = caller(&request, Scope::PresenceRegister)?;
        let (device, ttl) = requests::register(&caller, request.get_ref())?;
        let contact = request.into_inner().contact;
        let written = self
            .store
            .register(device.key, device.status, device.attributes, contact, ttl)
            .await?;
        Ok(Response::new(pb::RegisterResponse {
            device: Some(written.device),
            revision: written.revision,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let caller = caller(&request, Scope::PresenceRegister)?;
        let body = request.into_inner();
        let key = requests::device(&caller, &body.account_id, &body.identity, &body.device_id)?;
        let expires = self.store.heartbeat(&key).await?;
        Ok(Response::new(pb::HeartbeatResponse {
            expire_time: Some(timestamp(expires)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn update_status(
        &self,
        request: Request<pb::UpdateStatusRequest>,
    ) -> Result<Response<pb::UpdateStatusResponse>, Status> {
        let caller = caller(&request, Scope::PresenceRegister)?;
        let (key, change) = requests::update_status(&caller, request.get_ref())?;
        let written = self
            .store
            .update(&key, change.status, change.attributes, None)
            .await?;
        Ok(Response::new(pb::UpdateStatusResponse {
            device: Some(written.device),
            revision: written.revision,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn unregister(
        &self,
        request: Request<pb::UnregisterRequest>,
    ) -> Result<Response<pb::UnregisterResponse>, Status> {
        let caller = caller(&request, Scope::PresenceRegister)?;
        let body = request.into_inner();
        let key = requests::device(&caller, &body.account_id, &body.identity, &body.device_id)?;
        let revision = self.store.unregister(&key).await?;
        Ok(Response::new(pb::UnregisterResponse {
            removed: revision.is_some(),
            revision: revision.unwrap_or(0),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn connect(
        &self,
        request: Request<Streaming<pb::ConnectRequest>>,
    ) -> Result<Response<BoxStream<pb::ConnectResponse>>, Status> {
        let caller = Caller::of(&request).map_err(Error::from)?;
        let stream = self.sessions.open(&caller, request.into_inner()).await?;
        Ok(Response::new(stream))
    }

    #[tracing::instrument(skip_all)]
    async fn get_presence(
        &self,
        request: Request<pb::GetPresenceRequest>,
    ) -> Result<Response<pb::GetPresenceResponse>, Status> {
        let caller = caller(&request, Scope::PresenceRead)?;
        let read = requests::get_presence(&caller, request.get_ref())?;
        let body = request.into_inner();
        let cache = self.store.cache();
        let revision = cache.caught_up(read.min_revision).await?;
        Ok(Response::new(pb::GetPresenceResponse {
            presence: Some(cache.presence(&read.account, &body.identity)),
            revision,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn batch_get_presence(
        &self,
        request: Request<pb::BatchGetPresenceRequest>,
    ) -> Result<Response<pb::BatchGetPresenceResponse>, Status> {
        let caller = caller(&request, Scope::PresenceRead)?;
        let read = requests::batch_get_presence(&caller, request.get_ref())?;
        let body = request.into_inner();
        let cache = self.store.cache();
        let revision = cache.caught_up(read.min_revision).await?;
        let answer = pb::BatchGetPresenceResponse {
            presences: body
                .identities
                .iter()
                .map(|identity| cache.presence(&read.account, identity))
                .collect(),
            revision,
        };
        let size = answer.encoded_len();
        if size > MAX_ANSWER_BYTES {
            return Err(Error::TooLarge {
                size,
                limit: MAX_ANSWER_BYTES,
            }
            .into());
        }
        Ok(Response::new(answer))
    }

    #[tracing::instrument(skip_all)]
    async fn list_presence(
        &self,
        request: Request<pb::ListPresenceRequest>,
    ) -> Result<Response<pb::ListPresenceResponse>, Status> {
        let caller = caller(&request, Scope::PresenceRead)?;
        let (read, size, filter, after) = requests::list_presence(&caller, request.get_ref())?;
        let cache = self.store.cache();
        let revision = cache.caught_up(read.min_revision).await?;
        let (presences, next) = cache.list(
            &read.account,
            filter,
            after.as_deref(),
            size,
            MAX_PAGE_BYTES,
        );
        Ok(Response::new(pb::ListPresenceResponse {
            presences,
            next_page_token: next.map_or_else(String::new, |after| {
                PageToken::encode(&read.account, &after, filter)
            }),
            revision,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn watch_presence(
        &self,
        request: Request<pb::WatchPresenceRequest>,
    ) -> Result<Response<BoxStream<pb::WatchPresenceResponse>>, Status> {
        let caller = caller(&request, Scope::PresenceRead)?;
        let request = requests::watch_presence(&caller, request.get_ref())?;
        Ok(Response::new(Box::pin(self.watch.open(request).await?)))
    }
}

/// ListPresence page tokens ([`plumbing::paging`]): the cursor is the last identity of the
/// page; a token is bound to the account and the status filter it was listed with.
struct PageToken;

impl PageToken {
    fn listing(account: &str, filter: pb::Status) -> String {
        format!("ListPresence/{account}/{}", filter.as_str_name())
    }

    fn encode(account: &str, after: &str, filter: pb::Status) -> String {
        paging::encode(&Self::listing(account, filter), after)
    }

    fn decode(token: &str, account: &str, filter: pb::Status) -> Result<Option<String>, Error> {
        let after = paging::decode(token, &Self::listing(account, filter))?;
        if let Some(after) = &after {
            rules::identity("page_token", after).map_err(|_| {
                FieldError::new("page_token", "is not a token this server returned")
            })?;
        }
        Ok(after)
    }
}

/// The SessionRelayService handler.
#[derive(Debug, Clone)]
pub struct RelayApi {
    relay: Relay,
}

impl RelayApi {
    /// The handler over `relay`.
    pub fn new(relay: Relay) -> Self {
        Self { relay }
    }
}

#[tonic::async_trait]
impl SessionRelayService for RelayApi {
    #[tracing::instrument(skip_all)]
    async fn offer(
        &self,
        request: Request<Streaming<pb::OfferRequest>>,
    ) -> Result<Response<BoxStream<pb::OfferResponse>>, Status> {
        let caller = Caller::of(&request).map_err(Error::from)?;
        let relayed = request.metadata().contains_key(RELAYED);
        let stream = self
            .relay
            .offer(&caller, relayed, request.into_inner())
            .await?;
        Ok(Response::new(stream))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn page_tokens_round_trip_and_bind_the_filter() {
        let token = PageToken::encode("AC1", "alice", pb::Status::Busy);
        assert_eq!(
            PageToken::decode(&token, "AC1", pb::Status::Busy).unwrap(),
            Some("alice".to_owned())
        );
        assert!(PageToken::decode(&token, "AC1", pb::Status::Available).is_err());
        assert!(PageToken::decode(&token, "AC2", pb::Status::Busy).is_err());
        assert!(PageToken::decode("garbage!", "AC1", pb::Status::Busy).is_err());
        assert_eq!(
            PageToken::decode("", "AC1", pb::Status::Busy).unwrap(),
            None
        );
    }
}

//! The gRPC handlers: `PresenceService` and the internal `SessionRelayService`. Each one
//! checks the caller, turns the request into domain values (with the field rules), calls
//! the domain and turns the result into the response.

use std::collections::HashSet;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use plumbing::auth::{Caller, Scope};
use plumbing::validate::FieldError;
use prost::Message;
use proto::presence::v1 as pb;
use proto::presence::v1::presence_service_server::PresenceService;
use proto::presence::v1::session_relay_service_server::SessionRelayService;
use tonic::codegen::BoxStream;
use tonic::{Request, Response, Status, Streaming};

use crate::devices::DeviceStore;
use crate::error::Error;
use crate::identity::{self, DeviceRef, EmptyDevice, acting_key};
use crate::record::{DeviceKey, DeviceStatus, timestamp};
use crate::relay::{RELAYED, Relay};
use crate::rules;
use crate::session::Sessions;
use crate::watch::{PresenceWatch, Start, WatchRequest};

/// Largest request the presence API decodes (a BatchGetPresence of 1000 longest
/// identities fits; anything larger is refused before it is buffered whole).
pub const MAX_REQUEST_BYTES: usize = 512 * 1024;
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

fn device_key(
    caller: &Caller,
    account: &str,
    identity: &str,
    device: &str,
) -> Result<DeviceKey, Error> {
    let device = DeviceRef {
        account_id: account,
        identity,
        device_id: device,
    };
    acting_key(caller, "", device, EmptyDevice::Refuse)
}

#[tonic::async_trait]
impl PresenceService for PresenceApi {
    #[tracing::instrument(skip_all)]
    async fn register(
        &self,
        request: Request<pb::RegisterRequest>,
    ) -> Result<Response<pb::RegisterResponse>, Status> {
        let caller = caller(&request, Scope::PresenceRegister)?;
        let body = request.into_inner();
        let device = DeviceRef {
            account_id: &body.account_id,
            identity: &body.identity,
            device_id: &body.device_id,
        };
        let key = acting_key(&caller, "", device, EmptyDevice::Generate)?;
        let status = rules::device_status("status", body.status, Some(DeviceStatus::Available))
            .map_err(Error::from)?
            .unwrap_or(DeviceStatus::Available);
        let ttl = rules::ttl("ttl_seconds", body.ttl_seconds).map_err(Error::from)?;
        let attributes = rules::attributes("attributes", &body.attributes).map_err(Error::from)?;
        rules::contact("contact", &body.contact).map_err(Error::from)?;
        let written = self
            .store
            .register(key, status, attributes, body.contact, ttl)
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
        let key = device_key(&caller, &body.account_id, &body.identity, &body.device_id)?;
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
        let body = request.into_inner();
        let key = device_key(&caller, &body.account_id, &body.identity, &body.device_id)?;
        let status = rules::device_status("status", body.status, None).map_err(Error::from)?;
        let attributes = rules::attributes("attributes", &body.attributes).map_err(Error::from)?;
        let attributes = (!attributes.is_empty()).then_some(attributes);
        let written = self.store.update(&key, status, attributes, None).await?;
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
        let key = device_key(&caller, &body.account_id, &body.identity, &body.device_id)?;
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
        let body = request.into_inner();
        let account = identity::account(&caller, "account_id", &body.account_id)?;
        rules::identity("identity", &body.identity).map_err(Error::from)?;
        let min = rules::min_revision("min_revision", body.min_revision).map_err(Error::from)?;
        let cache = self.store.cache();
        let revision = cache.caught_up(min).await?;
        Ok(Response::new(pb::GetPresenceResponse {
            presence: Some(cache.presence(&account, &body.identity)),
            revision,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn batch_get_presence(
        &self,
        request: Request<pb::BatchGetPresenceRequest>,
    ) -> Result<Response<pb::BatchGetPresenceResponse>, Status> {
        let caller = caller(&request, Scope::PresenceRead)?;
        let body = request.into_inner();
        let account = identity::account(&caller, "account_id", &body.account_id)?;
        rules::identities("identities", &body.identities, false).map_err(Error::from)?;
        let min = rules::min_revision("min_revision", body.min_revision).map_err(Error::from)?;
        let cache = self.store.cache();
        let revision = cache.caught_up(min).await?;
        let answer = pb::BatchGetPresenceResponse {
            presences: body
                .identities
                .iter()
                .map(|identity| cache.presence(&account, identity))
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
        let body = request.into_inner();
        let account = identity::account(&caller, "account_id", &body.account_id)?;
        let size = rules::page_size("page_size", body.page_size).map_err(Error::from)?;
        let filter = rules::status_filter("status", body.status).map_err(Error::from)?;
        let after = PageToken::decode(&body.page_token, filter)?;
        let min = rules::min_revision("min_revision", body.min_revision).map_err(Error::from)?;
        let cache = self.store.cache();
        let revision = cache.caught_up(min).await?;
        let (presences, next) =
            cache.list(&account, filter, after.as_deref(), size, MAX_PAGE_BYTES);
        Ok(Response::new(pb::ListPresenceResponse {
            presences,
            next_page_token: next
                .map_or_else(String::new, |after| PageToken::encode(&after, filter)),
            revision,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn watch_presence(
        &self,
        request: Request<pb::WatchPresenceRequest>,
    ) -> Result<Response<BoxStream<pb::WatchPresenceResponse>>, Status> {
        let caller = caller(&request, Scope::PresenceRead)?;
        let body = request.into_inner();
        let account = identity::account(&caller, "account_id", &body.account_id)?;
        rules::identities("identities", &body.identities, true).map_err(Error::from)?;
        let start = match (body.snapshot, body.start_revision) {
            (_, revision) if revision < 0 => {
                return Err(
                    Error::from(FieldError::new("start_revision", "must not be negative")).into(),
                );
            }
            (true, 0) => Start::Snapshot,
            (true, _) => {
                return Err(Error::from(FieldError::new(
                    "start_revision",
                    "must be 0 when snapshot is true",
                ))
                .into());
            }
            (false, 0) => Start::Now,
            (false, revision) => Start::From(revision),
        };
        let request = WatchRequest {
            account,
            identities: body.identities.into_iter().collect::<HashSet<_>>(),
            start,
        };
        Ok(Response::new(Box::pin(self.watch.open(request).await?)))
    }
}

/// ListPresence page tokens: the last identity of the page and the filter it was listed
/// with, base64url-encoded (opaque to clients).
struct PageToken;

impl PageToken {
    fn encode(after: &str, filter: pb::Status) -> String {
        URL_SAFE_NO_PAD.encode(format!("v1:{}:{after}", filter as i32))
    }

    fn decode(token: &str, filter: pb::Status) -> Result<Option<String>, Error> {
        if token.is_empty() {
            return Ok(None);
        }
        let invalid =
            || FieldError::new("page_token", "is not a token from a previous ListPresence");
        let text = URL_SAFE_NO_PAD
            .decode(token)
            .ok()
            .and_then(|bytes| String::from_utf8(bytes).ok())
            .ok_or_else(invalid)?;
        let mut parts = text.splitn(3, ':');
        let (Some("v1"), Some(status), Some(after)) = (parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid().into());
        };
        if status != (filter as i32).to_string() {
            return Err(
                FieldError::new("page_token", "must be used with the same status filter").into(),
            );
        }
        rules::identity("page_token", after).map_err(|_| invalid())?;
        Ok(Some(after.to_owned()))
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
        let token = PageToken::encode("alice", pb::Status::Busy);
        assert_eq!(
            PageToken::decode(&token, pb::Status::Busy).unwrap(),
            Some("alice".to_owned())
        );
        assert!(PageToken::decode(&token, pb::Status::Available).is_err());
        assert!(PageToken::decode("garbage!", pb::Status::Busy).is_err());
        assert_eq!(PageToken::decode("", pb::Status::Busy).unwrap(), None);
    }
}

//! `switchboard.presence.v1.KeyService`: account signing keys, platform tokens only.
//! The store itself lives in `plumbing::auth::keys`, since every service verifies with it.

use plumbing::auth::{Caller, KeyStore, StoredKey};
use plumbing::paging;
use proto::presence::v1 as pb;
use proto::presence::v1::key_service_server::KeyService;
use tonic::{Request, Response, Status};

use crate::error::Error;

/// The KeyService handlers.
#[derive(Debug, Clone)]
pub struct KeyApi {
    keys: KeyStore,
}

impl KeyApi {
    /// Handlers over `keys`.
    pub fn new(keys: KeyStore) -> Self {
        Self { keys }
    }
}

#[tonic::async_trait]
impl KeyService for KeyApi {
    #[tracing::instrument(skip_all)]
    async fn create_key(
        &self,
        request: Request<pb::CreateKeyRequest>,
    ) -> Result<Response<pb::CreateKeyResponse>, Status> {
        Caller::of(&request)
            .and_then(|c| c.require_platform())
            .map_err(Error::from)?;
        let body = request.into_inner();
        let key = self
            .keys
            .create(&body.account_id, &body.description)
            .await
            .map_err(Error::from)?;
        tracing::info!(key_id = %key.key_id, account = %key.account_id, "account key created");
        Ok(Response::new(pb::CreateKeyResponse {
            secret: key.secret().to_owned(),
            key: Some(to_proto(&key)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_keys(
        &self,
        request: Request<pb::ListKeysRequest>,
    ) -> Result<Response<pb::ListKeysResponse>, Status> {
        Caller::of(&request)
            .and_then(|c| c.require_platform())
            .map_err(Error::from)?;
        let body = request.into_inner();
        let account = Some(body.account_id.as_str()).filter(|a| !a.is_empty());
        let page_size = paging::page_size(body.page_size).map_err(Error::from)?;
        // A token continues the listing of the account filter it was returned for; its
        // cursor is the last key id of the page before.
        let listing = format!("ListKeys/{}", account.unwrap_or("*"));
        let after = paging::decode(&body.page_token, &listing).map_err(Error::from)?;
        let (keys, next) = self
            .keys
            .list(account, page_size, after.as_deref().unwrap_or(""))
            .await
            .map_err(Error::from)?;
        Ok(Response::new(pb::ListKeysResponse {
            keys: keys.iter().map(to_proto).collect(),
            next_page_token: if next.is_empty() {
                next
            } else {
                paging::encode(&listing, &next)
            },
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn disable_key(
        &self,
        request: Request<pb::DisableKeyRequest>,
    ) -> Result<Response<pb::DisableKeyResponse>, Status> {
        Caller::of(&request)
            .and_then(|c| c.require_platform())
            .map_err(Error::from)?;
        let body = request.into_inner();
        let key = self.keys.disable(&body.key_id).await.map_err(Error::from)?;
        tracing::info!(key_id = %key.key_id, "account key disabled");
        Ok(Response::new(pb::DisableKeyResponse {
            key: Some(to_proto(&key)),
        }))
    }
}

fn to_proto(key: &StoredKey) -> pb::Key {
    pb::Key {
        key_id: key.key_id.clone(),
        account_id: key.account_id.clone(),
        description: key.description.clone(),
        disabled: key.disabled,
        create_time: Some(prost_types::Timestamp {
            seconds: key.create_time,
            nanos: 0,
        }),
        disable_time: key
            .disable_time
            .map(|seconds| prost_types::Timestamp { seconds, nanos: 0 }),
    }
}

//! `switchboard.router.v1.RouterService`: thin handlers — authorise, validate, call the
//! domain ([`crate::apps`], [`crate::engine`]), convert back. Calls about a communication
//! that another replica runs are forwarded to it, once.

use std::sync::Arc;

use plumbing::auth::{Caller, Scope};
use plumbing::paging;
use proto::router::v1 as pb;
use proto::router::v1::router_service_server::RouterService;
use tonic::{Request, Response, Status};

use super::forward;
use super::requests;
use super::watch;
use crate::engine::{Engine, Found, RouteSpec};
use crate::error::Error;
use crate::model::millis;
use crate::rules;

/// The RouterService handlers.
#[derive(Debug, Clone)]
pub struct RouterApi {
    engine: Arc<Engine>,
}

impl RouterApi {
    /// Handlers over `engine`.
    pub fn new(engine: Arc<Engine>) -> Self {
        Self { engine }
    }
}

/// The caller holding `scope`, and the account the request acts on.
fn authorise<T>(request: &Request<T>, scope: Scope, account_id: &str) -> Result<String, Error> {
    requests::account(&Caller::of(request)?, scope, account_id)
}

fn forwarded<T>(request: &Request<T>) -> bool {
    plumbing::client::is_forwarded(request.metadata())
}

#[tonic::async_trait]
impl RouterService for RouterApi {
    #[tracing::instrument(skip_all)]
    async fn put_application(
        &self,
        request: Request<pb::PutApplicationRequest>,
    ) -> Result<Response<pb::PutApplicationResponse>, Status> {
        let app = request.get_ref().application.clone().unwrap_or_default();
        let account = authorise(&request, Scope::RouterAdmin, &app.account_id)?;
        requests::put_application(request.get_ref())?;
        let (record, created) = self.engine.apps.put(&account, &app).await?;
        Ok(Response::new(pb::PutApplicationResponse {
            application: Some(record.to_pb(&account, &app.address, true)),
            created,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_application(
        &self,
        request: Request<pb::GetApplicationRequest>,
    ) -> Result<Response<pb::GetApplicationResponse>, Status> {
        let account = authorise(&request, Scope::RouterAdmin, &request.get_ref().account_id)?;
        let address = &request.get_ref().address;
        requests::application_address(address)?;
        let record = self.engine.apps.get(&account, address).await?;
        Ok(Response::new(pb::GetApplicationResponse {
            application: Some(record.to_pb(&account, address, false)),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn delete_application(
        &self,
        request: Request<pb::DeleteApplicationRequest>,
    ) -> Result<Response<pb::DeleteApplicationResponse>, Status> {
        let account = authorise(&request, Scope::RouterAdmin, &request.get_ref().account_id)?;
        requests::application_address(&request.get_ref().address)?;
        let deleted = self
            .engine
            .apps
            .delete(&account, &request.get_ref().address)
            .await?;
        Ok(Response::new(pb::DeleteApplicationResponse { deleted }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_applications(
        &self,
        request: Request<pb::ListApplicationsRequest>,
    ) -> Result<Response<pb::ListApplicationsResponse>, Status> {
        let account = authorise(&request, Scope::RouterAdmin, &request.get_ref().account_id)?;
        let r = request.into_inner();
        let page = requests::list_applications(&account, &r)?;
        let (page, next) = self
            .engine
            .apps
            .list(&account, page.size, page.after)
            .await?;
        Ok(Response::new(pb::ListApplicationsResponse {
            applications: page
                .iter()
                .map(|(address, record)| record.to_pb(&account, address, false))
                .collect(),
            next_page_token: next
                .map(|n| paging::encode(&requests::applications_listing(&account), &n))
                .unwrap_or_default(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn route(
        &self,
        request: Request<pb::RouteRequest>,
    ) -> Result<Response<pb::RouteResponse>, Status> {
        let account = authorise(&request, Scope::RouterRoute, &request.get_ref().account_id)?;
        let is_forwarded = forwarded(&request);
        let mut r = request.into_inner();
        let channel = requests::route(&r)?;
        if r.communication_id.is_empty() {
            r.communication_id = rules::new_communication_id();
        }
        let spec = RouteSpec {
            account: account.clone(),
            id: r.communication_id.clone(),
            from: r.from.clone(),
            to: r.to.clone(),
            channel,
            parameters: r.parameters.clone(),
        };
        let communication = match self.engine.start(spec).await? {
            Found::Here(live) => {
                live.settled().await;
                self.engine.settle(&live).await
            }
            Found::Stored(comm) => *comm,
            Found::Elsewhere(owner, _) if !is_forwarded => {
                r.account_id = account;
                forward::route(&self.engine.peers, &owner, r).await?
            }
            Found::Elsewhere(owner, _) => return Err(owner_moved(owner).into()),
        };
        Ok(Response::new(pb::RouteResponse {
            communication: Some(communication),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_communication(
        &self,
        request: Request<pb::GetCommunicationRequest>,
    ) -> Result<Response<pb::GetCommunicationResponse>, Status> {
        let account = authorise(&request, Scope::RouterRoute, &request.get_ref().account_id)?;
        let id = &request.get_ref().communication_id;
        requests::communication_id(id)?;
        let communication = match self.engine.find(&account, id).await? {
            Found::Here(live) => live.snapshot(),
            Found::Stored(comm) => *comm,
            Found::Elsewhere(_, comm) => *comm,
        };
        Ok(Response::new(pb::GetCommunicationResponse {
            communication: Some(communication),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_communications(
        &self,
        request: Request<pb::ListCommunicationsRequest>,
    ) -> Result<Response<pb::ListCommunicationsResponse>, Status> {
        let account = authorise(&request, Scope::RouterRoute, &request.get_ref().account_id)?;
        let r = request.into_inner();
        let requests::Page { size, after } = requests::list_communications(&account, &r)?;
        let mut all = self.engine.list(&account).await?;
        all.retain(|c| r.state == 0 || c.state == r.state);
        let key =
            |c: &pb::Communication| (millis(c.create_time.as_ref()), c.communication_id.clone());
        all.sort_by_key(|c| std::cmp::Reverse(key(c)));
        if let Some(after) = after {
            all.retain(|c| key(c) < after);
        }
        let next = (all.len() > size).then(|| {
            let (ms, id) = key(&all[size - 1]);
            let listing = requests::communications_listing(&account, r.state);
            paging::encode(&listing, &format!("{ms}:{id}"))
        });
        all.truncate(size);
        Ok(Response::new(pb::ListCommunicationsResponse {
            communications: all,
            next_page_token: next.unwrap_or_default(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn hangup(
        &self,
        request: Request<pb::HangupRequest>,
    ) -> Result<Response<pb::HangupResponse>, Status> {
        let account = authorise(&request, Scope::RouterRoute, &request.get_ref().account_id)?;
        let is_forwarded = forwarded(&request);
        let mut r = request.into_inner();
        requests::hangup(&r)?;
        let communication = match self.engine.find(&account, &r.communication_id).await? {
            Found::Here(live) => self.engine.hangup(&live, r.reason).await,
            Found::Stored(comm) => *comm,
            Found::Elsewhere(owner, _) if !is_forwarded => {
                r.account_id = account;
                forward::hangup(&self.engine.peers, &owner, r).await?
            }
            Found::Elsewhere(owner, _) => return Err(owner_moved(owner).into()),
        };
        Ok(Response::new(pb::HangupResponse {
            communication: Some(communication),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn watch_communication(
        &self,
        request: Request<pb::WatchCommunicationRequest>,
    ) -> Result<Response<watch::WatchStream>, Status> {
        let account = authorise(&request, Scope::RouterRoute, &request.get_ref().account_id)?;
        let is_forwarded = forwarded(&request);
        let mut r = request.into_inner();
        requests::communication_id(&r.communication_id)?;
        // A forwarded watch was counted on the replica the client called.
        let permit = match is_forwarded {
            false => Some(
                self.engine
                    .watches
                    .try_acquire(&account)
                    .map_err(Error::from)?,
            ),
            true => None,
        };
        let stream = match self.engine.find(&account, &r.communication_id).await? {
            Found::Here(live) => watch::live(live),
            Found::Stored(comm) => watch::replay(*comm),
            Found::Elsewhere(owner, _) if !is_forwarded => {
                r.account_id = account;
                forward::watch(&self.engine.peers, &owner, r).await?
            }
            Found::Elsewhere(owner, _) => return Err(owner_moved(owner).into()),
        };
        Ok(Response::new(watch::holding(stream, permit)))
    }
}

fn owner_moved(owner: String) -> Error {
    Error::OwnerUnavailable {
        address: owner,
        reason: "it does not run the communication its record names it for".into(),
    }
}

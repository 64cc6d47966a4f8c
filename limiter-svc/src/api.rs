//! `switchboard.limiter.v1.LimiterService`: thin handlers — authorise, validate, call the
//! domain, convert back.

use plumbing::auth::{Caller, Scope};
use proto::limiter::v1 as pb;
use proto::limiter::v1::limiter_service_server::LimiterService;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::limits::LimitTable;
use crate::model::LimitSource;
use crate::slots::{Requester, Slots};

#[path = "api_requests.rs"]
pub mod requests;

/// The LimiterService handlers.
#[derive(Debug, Clone)]
pub struct LimiterApi {
    slots: Slots,
    limits: LimitTable,
}

impl LimiterApi {
    /// Handlers over the slot operations and the limit table.
    pub fn new(slots: Slots, limits: LimitTable) -> Self {
        Self { slots, limits }
    }
}

/// The answer; marked [`plumbing::client::FORWARDED`] when another replica produced it
/// (the caller's shard map is stale).
fn respond<T>(answer: T, forwarded: bool) -> Response<T> {
    let mut response = Response::new(answer);
    if forwarded {
        plumbing::client::mark_forwarded(response.metadata_mut());
    }
    response
}

/// The caller, holding `scope`.
fn caller<T>(request: &Request<T>, scope: Scope) -> Result<(Caller, Requester), Error> {
    let caller = Caller::of(request)?;
    caller.require(scope)?;
    let requester = Requester {
        account: caller.account.clone(),
        platform: caller.platform,
    };
    Ok((caller, requester))
}

#[tonic::async_trait]
impl LimiterService for LimiterApi {
    #[tracing::instrument(skip_all)]
    async fn acquire(
        &self,
        request: Request<pb::AcquireRequest>,
    ) -> Result<Response<pb::AcquireResponse>, Status> {
        let (caller, who) = caller(&request, Scope::LimiterAcquire)?;
        let spec = requests::acquire(&caller, request.get_ref())?;
        let (answer, forwarded) = self.slots.acquire(spec, &who).await?;
        Ok(respond(answer, forwarded))
    }

    #[tracing::instrument(skip_all)]
    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let (_, who) = caller(&request, Scope::LimiterAcquire)?;
        let id = requests::release(request.get_ref())?;
        let (released, forwarded) = self.slots.release(id, &who).await?;
        Ok(respond(pb::ReleaseResponse { released }, forwarded))
    }

    #[tracing::instrument(skip_all)]
    async fn renew(
        &self,
        request: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        let (_, who) = caller(&request, Scope::LimiterAcquire)?;
        let (id, hold) = requests::renew(request.get_ref())?;
        let (answer, forwarded) = self.slots.renew(id, hold, &who).await?;
        Ok(respond(answer, forwarded))
    }

    #[tracing::instrument(skip_all)]
    async fn set_limit(
        &self,
        request: Request<pb::SetLimitRequest>,
    ) -> Result<Response<pb::SetLimitResponse>, Status> {
        let (caller, _) = caller(&request, Scope::LimiterAdmin)?;
        let (key, value) = requests::set_limit(&caller, request.get_ref())?;
        let (account, resource) = (key.account, key.resource);
        self.limits
            .set(&account, &resource, value)
            .await
            .map_err(Error::from)?;
        tracing::info!(%account, %resource, max = value.max_in_flight, shadow = value.shadow, "limit set");
        Ok(Response::new(pb::SetLimitResponse {
            limit: Some(pb::Limit {
                account_id: account,
                resource,
                max_in_flight: value.max_in_flight,
                shadow: value.shadow,
            }),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_limit(
        &self,
        request: Request<pb::GetLimitRequest>,
    ) -> Result<Response<pb::GetLimitResponse>, Status> {
        let (caller, _) = caller(&request, Scope::LimiterAdmin)?;
        let key = requests::get_limit(&caller, request.get_ref())?;
        let (limit, source) = self.limits.effective(&key);
        let Some(limit) = limit else {
            return Err(Error::NoLimit {
                account: key.account,
                resource: key.resource,
            }
            .into());
        };
        let source = match source {
            LimitSource::Account => pb::LimitSource::Account,
            LimitSource::Default => pb::LimitSource::Default,
            LimitSource::Server | LimitSource::Unlimited => pb::LimitSource::Server,
        };
        Ok(Response::new(pb::GetLimitResponse {
            limit: Some(pb::Limit {
                account_id: key.account,
                resource: key.resource,
                max_in_flight: limit.max_in_flight,
                shadow: limit.shadow,
            }),
            source: source as i32,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_limits(
        &self,
        request: Request<pb::ListLimitsRequest>,
    ) -> Result<Response<pb::ListLimitsResponse>, Status> {
        let (caller, _) = caller(&request, Scope::LimiterAdmin)?;
        let (account, page, after) = requests::list_limits(&caller, request.get_ref())?;
        let (limits, more) = self.limits.list(&account, &after, page);
        let next_page_token = match limits.last() {
            Some((last, _)) if more => {
                plumbing::paging::encode(&requests::limits_listing(&account), last)
            }
            _ => String::new(),
        };
        let limits = limits
            .into_iter()
            .map(|(resource, v)| pb::Limit {
                account_id: account.clone(),
                resource,
                max_in_flight: v.max_in_flight,
                shadow: v.shadow,
            })
            .collect();
        Ok(Response::new(pb::ListLimitsResponse {
            limits,
            next_page_token,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn delete_limit(
        &self,
        request: Request<pb::DeleteLimitRequest>,
    ) -> Result<Response<pb::DeleteLimitResponse>, Status> {
        let (caller, _) = caller(&request, Scope::LimiterAdmin)?;
        let key = requests::delete_limit(&caller, request.get_ref())?;
        let deleted = self
            .limits
            .delete(&key.account, &key.resource)
            .await
            .map_err(Error::from)?;
        Ok(Response::new(pb::DeleteLimitResponse { deleted }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_usage(
        &self,
        request: Request<pb::GetUsageRequest>,
    ) -> Result<Response<pb::GetUsageResponse>, Status> {
        // Reading a key's usage is allowed to whoever may acquire its slots (the router
        // reads an identity's before ringing it), as well as to admins.
        let scope = if Caller::of(&request).is_ok_and(|c| c.has(Scope::LimiterAcquire)) {
            Scope::LimiterAcquire
        } else {
            Scope::LimiterAdmin
        };
        let (caller, who) = caller(&request, scope)?;
        let key = requests::get_usage(&caller, request.get_ref())?;
        let usage = self.slots.usage(key, &who).await?;
        Ok(Response::new(pb::GetUsageResponse { usage: Some(usage) }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_usage(
        &self,
        request: Request<pb::ListUsageRequest>,
    ) -> Result<Response<pb::ListUsageResponse>, Status> {
        let (caller, who) = caller(&request, Scope::LimiterAdmin)?;
        let account = requests::list_usage(&caller, request.get_ref())?;
        Ok(Response::new(pb::ListUsageResponse {
            usages: self.slots.list_usage(&account, &who).await?,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_shard_map(
        &self,
        request: Request<pb::GetShardMapRequest>,
    ) -> Result<Response<pb::GetShardMapResponse>, Status> {
        caller(&request, Scope::LimiterAcquire)?;
        Ok(Response::new(self.slots.shard_map()))
    }
}

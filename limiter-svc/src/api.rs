//! `switchboard.limiter.v1.LimiterService`: thin handlers — authorise, validate, call the
//! domain, convert back.

use plumbing::auth::{Caller, Scope};
use plumbing::validate::{self, FieldError};
use proto::limiter::v1 as pb;
use proto::limiter::v1::limiter_service_server::LimiterService;
use tonic::{Request, Response, Status};

use crate::error::Error;
use crate::limits::LimitTable;
use crate::model::{self, AcquireSpec, LimitSource, LimitValue, MAX_LIMIT, SlotId, SlotKey};
use crate::slots::{Requester, Slots};

/// Default and largest page of ListLimits.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

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

/// The account a limit request names: `*` only for platform callers.
fn limit_account(caller: &Caller, requested: &str) -> Result<String, Error> {
    if requested == "*" {
        caller.require_platform()?;
        return Ok("*".into());
    }
    let account = caller.account_for(requested)?;
    validate::account_id("account_id", &account)?;
    Ok(account)
}

#[tonic::async_trait]
impl LimiterService for LimiterApi {
    #[tracing::instrument(skip_all)]
    async fn acquire(
        &self,
        request: Request<pb::AcquireRequest>,
    ) -> Result<Response<pb::AcquireResponse>, Status> {
        let (caller, who) = caller(&request, Scope::LimiterAcquire)?;
        let r = request.into_inner();
        let account = caller.account_for(&r.account_id).map_err(Error::from)?;
        let spec = AcquireSpec::new(
            account,
            r.resource,
            r.request_id,
            r.hold_seconds,
            r.wait_timeout_ms,
        )
        .map_err(Error::from)?;
        Ok(Response::new(self.slots.acquire(spec, &who).await?))
    }

    #[tracing::instrument(skip_all)]
    async fn release(
        &self,
        request: Request<pb::ReleaseRequest>,
    ) -> Result<Response<pb::ReleaseResponse>, Status> {
        let (_, who) = caller(&request, Scope::LimiterAcquire)?;
        let id = SlotId::parse("slot_id", &request.into_inner().slot_id).map_err(Error::from)?;
        Ok(Response::new(pb::ReleaseResponse {
            released: self.slots.release(id, &who).await?,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn renew(
        &self,
        request: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::RenewResponse>, Status> {
        let (_, who) = caller(&request, Scope::LimiterAcquire)?;
        let r = request.into_inner();
        let id = SlotId::parse("slot_id", &r.slot_id).map_err(Error::from)?;
        let hold = model::hold(r.hold_seconds, "hold_seconds").map_err(Error::from)?;
        Ok(Response::new(self.slots.renew(id, hold, &who).await?))
    }

    #[tracing::instrument(skip_all)]
    async fn set_limit(
        &self,
        request: Request<pb::SetLimitRequest>,
    ) -> Result<Response<pb::SetLimitResponse>, Status> {
        let (caller, _) = caller(&request, Scope::LimiterAdmin)?;
        // Limits are what the platform sells: an account may read its limits, not raise them.
        caller.require_platform().map_err(Error::from)?;
        let limit = request
            .into_inner()
            .limit
            .ok_or_else(|| Error::from(FieldError::new("limit", "must be set")))?;
        let account = limit_account(&caller, &limit.account_id)?;
        model::resource_name("limit.resource", &limit.resource).map_err(Error::from)?;
        validate::in_range("limit.max_in_flight", limit.max_in_flight, 1, MAX_LIMIT)
            .map_err(Error::from)?;
        let value = LimitValue {
            max_in_flight: limit.max_in_flight,
            shadow: limit.shadow,
        };
        self.limits
            .set(&account, &limit.resource, value)
            .await
            .map_err(Error::from)?;
        tracing::info!(%account, resource = %limit.resource, max = value.max_in_flight, shadow = value.shadow, "limit set");
        Ok(Response::new(pb::SetLimitResponse {
            limit: Some(pb::Limit {
                account_id: account,
                ..limit
            }),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_limit(
        &self,
        request: Request<pb::GetLimitRequest>,
    ) -> Result<Response<pb::GetLimitResponse>, Status> {
        let (caller, _) = caller(&request, Scope::LimiterAdmin)?;
        let r = request.into_inner();
        let account = limit_account(&caller, &r.account_id)?;
        model::resource_name("resource", &r.resource).map_err(Error::from)?;
        let key = SlotKey {
            account: account.clone(),
            resource: r.resource.clone(),
        };
        let (limit, source) = self.limits.effective(&key);
        let Some(limit) = limit else {
            return Err(Error::NoLimit {
                account,
                resource: r.resource,
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
                account_id: account,
                resource: r.resource,
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
        let r = request.into_inner();
        let account = limit_account(&caller, &r.account_id)?;
        let page = usize::try_from(r.page_size)
            .ok()
            .filter(|p| *p > 0)
            .unwrap_or(DEFAULT_PAGE)
            .min(MAX_PAGE);
        if r.page_size < 0 {
            return Err(Error::from(FieldError::new("page_size", "must not be negative")).into());
        }
        let (limits, more) = self.limits.list(&account, &r.page_token, page);
        let next_page_token = if more {
            limits.last().map(|(r, _)| r.clone()).unwrap_or_default()
        } else {
            String::new()
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
        caller.require_platform().map_err(Error::from)?;
        let r = request.into_inner();
        let account = limit_account(&caller, &r.account_id)?;
        model::resource_name("resource", &r.resource).map_err(Error::from)?;
        let deleted = self
            .limits
            .delete(&account, &r.resource)
            .await
            .map_err(Error::from)?;
        Ok(Response::new(pb::DeleteLimitResponse { deleted }))
    }

    #[tracing::instrument(skip_all)]
    async fn get_usage(
        &self,
        request: Request<pb::GetUsageRequest>,
    ) -> Result<Response<pb::GetUsageResponse>, Status> {
        let (caller, who) = caller(&request, Scope::LimiterAdmin)?;
        let r = request.into_inner();
        let account = caller.account_for(&r.account_id).map_err(Error::from)?;
        validate::account_id("account_id", &account).map_err(Error::from)?;
        model::resource_name("resource", &r.resource).map_err(Error::from)?;
        let usage = self
            .slots
            .usage(
                SlotKey {
                    account,
                    resource: r.resource,
                },
                &who,
            )
            .await?;
        Ok(Response::new(pb::GetUsageResponse { usage: Some(usage) }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_usage(
        &self,
        request: Request<pb::ListUsageRequest>,
    ) -> Result<Response<pb::ListUsageResponse>, Status> {
        let (caller, who) = caller(&request, Scope::LimiterAdmin)?;
        let account = caller
            .account_for(&request.into_inner().account_id)
            .map_err(Error::from)?;
        validate::account_id("account_id", &account).map_err(Error::from)?;
        Ok(Response::new(pb::ListUsageResponse {
            usages: self.slots.list_usage(&account, &who).await?,
        }))
    }
}

//! The calls the demo makes, over the workspace's generated clients: each carries its
//! token as `authorization: Bearer …` and a deadline, and a failed call becomes a
//! [`Failure`] naming the call and the gRPC code.

use std::time::Duration;

use proto::limiter::v1::limiter_service_client::LimiterServiceClient;
use proto::limiter::v1::{
    DeleteLimitRequest, GetLimitRequest, GetUsageRequest, Limit, LimitSource, SetLimitRequest,
    Usage,
};
use proto::presence::v1::GetPresenceRequest;
use proto::presence::v1::presence_service_client::PresenceServiceClient;
use proto::router::v1::router_service_client::RouterServiceClient;
use proto::router::v1::{
    Application, Communication, HangupRequest, PutApplicationRequest, RouteRequest,
};
use tonic::transport::Channel;
use tonic::{Request, Status};

use crate::{Failure, Stack};

/// Deadline of every call (a Route rings for up to its Dial timeout, 10 s, and more when
/// it then runs the `<Say>`).
const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Clients of the stack's three services, with the tokens the demo calls them with.
#[derive(Debug, Clone)]
pub struct Calls {
    presence: PresenceServiceClient<Channel>,
    limiter: LimiterServiceClient<Channel>,
    router: RouterServiceClient<Channel>,
    /// Platform token, scope admin: limits and applications.
    platform_token: String,
    /// The demo identity's token: Route, Hangup, GetPresence.
    demo_token: String,
    account: String,
}

/// An account's own limit before the demo changed it, to put it back afterwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PreviousLimit {
    /// The account had its own limit of this many.
    Own(u32),
    /// The account used the default (`*`) or the server's limit.
    Inherited,
}

impl Calls {
    /// Channels to `stack`'s services (they connect on first use).
    pub fn new(stack: &Stack) -> Result<Self, Failure> {
        let channel = |address: &str| {
            plumbing::client::channel(address)
                .map_err(|err| Failure::new(format!("bad address {address}: {err}")))
        };
        Ok(Self {
            presence: PresenceServiceClient::new(channel(&stack.presence)?),
            limiter: LimiterServiceClient::new(channel(&stack.limiter)?),
            router: RouterServiceClient::new(channel(&stack.router)?),
            platform_token: stack.platform_token.clone(),
            demo_token: stack.demo_token.clone(),
            account: stack.account.clone(),
        })
    }

    /// Route `from` → `to` as the demo identity, with the parameter `caller_name=Carol`.
    pub async fn route(&self, id: &str, from: &str, to: &str) -> Result<Communication, Failure> {
        let message = RouteRequest {
            from: from.to_owned(),
            to: to.to_owned(),
            communication_id: id.to_owned(),
            parameters: [("caller_name".to_owned(), "Carol".to_owned())].into(),
            ..RouteRequest::default()
        };
        let answer = self
            .router
            .clone()
            .route(request(message, &self.demo_token)?)
            .await
            .map_err(|status| failed(&format!("Route {id}"), &status))?;
        communication(answer.into_inner().communication, id)
    }

    /// Hangup `id` as the demo identity.
    pub async fn hangup(&self, id: &str, reason: &str) -> Result<Communication, Failure> {
        let message = HangupRequest {
            communication_id: id.to_owned(),
            reason: reason.to_owned(),
            ..HangupRequest::default()
        };
        let answer = self
            .router
            .clone()
            .hangup(request(message, &self.demo_token)?)
            .await
            .map_err(|status| failed(&format!("Hangup {id}"), &status))?;
        communication(answer.into_inner().communication, id)
    }

    /// The aggregate status of `identity` (`STATUS_OFFLINE`…), as GetPresence reads it.
    pub async fn presence_status(&self, identity: &str) -> Result<&'static str, Failure> {
        let message = GetPresenceRequest {
            identity: identity.to_owned(),
            ..GetPresenceRequest::default()
        };
        let answer = self
            .presence
            .clone()
            .get_presence(request(message, &self.demo_token)?)
            .await
            .map_err(|status| failed(&format!("GetPresence {identity}"), &status))?;
        let status = answer.into_inner().presence.map_or(0, |p| p.status);
        Ok(proto::presence::v1::Status::try_from(status).map_or("?", |s| s.as_str_name()))
    }

    /// The account's own limit of `resource`, if it has one.
    pub async fn limit(&self, resource: &str) -> Result<PreviousLimit, Failure> {
        let message = GetLimitRequest {
            account_id: self.account.clone(),
            resource: resource.to_owned(),
        };
        let answer = self
            .limiter
            .clone()
            .get_limit(request(message, &self.platform_token)?)
            .await
            .map_err(|status| failed(&format!("GetLimit {resource}"), &status))?
            .into_inner();
        Ok(match answer.limit {
            Some(limit) if answer.source == LimitSource::Account as i32 => {
                PreviousLimit::Own(limit.max_in_flight)
            }
            _ => PreviousLimit::Inherited,
        })
    }

    /// SetLimit of the account's `resource` to `max_in_flight`.
    pub async fn set_limit(&self, resource: &str, max_in_flight: u32) -> Result<(), Failure> {
        let message = SetLimitRequest {
            limit: Some(Limit {
                account_id: self.account.clone(),
                resource: resource.to_owned(),
                max_in_flight,
                ..Limit::default()
            }),
        };
        self.limiter
            .clone()
            .set_limit(request(message, &self.platform_token)?)
            .await
            .map_err(|status| failed(&format!("SetLimit {resource}"), &status))?;
        Ok(())
    }

    /// Puts back what [`Calls::limit`] read: the account's own limit, or none.
    pub async fn restore_limit(
        &self,
        resource: &str,
        previous: PreviousLimit,
    ) -> Result<(), Failure> {
        let PreviousLimit::Own(max_in_flight) = previous else {
            let message = DeleteLimitRequest {
                account_id: self.account.clone(),
                resource: resource.to_owned(),
            };
            self.limiter
                .clone()
                .delete_limit(request(message, &self.platform_token)?)
                .await
                .map_err(|status| failed(&format!("DeleteLimit {resource}"), &status))?;
            return Ok(());
        };
        self.set_limit(resource, max_in_flight).await
    }

    /// GetUsage of the account's `resource`.
    pub async fn usage(&self, resource: &str) -> Result<Usage, Failure> {
        let message = GetUsageRequest {
            account_id: self.account.clone(),
            resource: resource.to_owned(),
        };
        let answer = self
            .limiter
            .clone()
            .get_usage(request(message, &self.platform_token)?)
            .await
            .map_err(|status| failed(&format!("GetUsage {resource}"), &status))?;
        answer
            .into_inner()
            .usage
            .ok_or_else(|| Failure::new(format!("GetUsage {resource} answered no usage")))
    }

    /// PutApplication of `address` with inline `instructions`, in the demo account.
    pub async fn put_application(&self, address: &str, instructions: &str) -> Result<(), Failure> {
        let message = PutApplicationRequest {
            application: Some(Application {
                account_id: self.account.clone(),
                address: address.to_owned(),
                instructions: instructions.to_owned(),
                ..Application::default()
            }),
        };
        self.router
            .clone()
            .put_application(request(message, &self.platform_token)?)
            .await
            .map_err(|status| failed(&format!("PutApplication {address}"), &status))?;
        Ok(())
    }
}

/// `message` with its token and the deadline.
fn request<T>(message: T, token: &str) -> Result<Request<T>, Failure> {
    let mut request = Request::new(message);
    request.set_timeout(CALL_TIMEOUT);
    let value = format!("Bearer {token}")
        .parse()
        .map_err(|_| Failure::new("a token is not a valid header value"))?;
    request.metadata_mut().insert("authorization", value);
    Ok(request)
}

fn failed(call: &str, status: &Status) -> Failure {
    Failure::new(format!(
        "{call} failed: {:?}: {}",
        status.code(),
        status.message()
    ))
}

fn communication(communication: Option<Communication>, id: &str) -> Result<Communication, Failure> {
    communication.ok_or_else(|| Failure::new(format!("the answer about {id} has no communication")))
}

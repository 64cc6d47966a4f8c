//! `LimiterPeerService`: the owner side of forwarding. Operations arriving here are applied
//! by the local engine only (never forwarded again, so no loops); a shard not owned here
//! answers ABORTED and the sender routes again.

use plumbing::auth::Caller;
use proto::limiter::v1 as pb;
use proto::limiter::v1::forward_request::Op;
use proto::limiter::v1::forward_response::Result as Answer;
use proto::limiter::v1::limiter_peer_service_server::LimiterPeerService;
use tonic::{Request, Response, Status};

use crate::convert;
use crate::engine::{Command, EngineHandle};
use crate::error::Error;
use crate::model::{AcquireSpec, SlotId, SlotKey};

/// The relay handlers.
#[derive(Debug, Clone)]
pub struct Relay {
    engine: EngineHandle,
}

impl Relay {
    /// A relay into `engine`.
    pub fn new(engine: EngineHandle) -> Self {
        Self { engine }
    }

    async fn apply(&self, restriction: Option<String>, op: Op) -> Result<Answer, Error> {
        let engine = &self.engine;
        Ok(match op {
            Op::Acquire(r) => {
                let spec = AcquireSpec::new(
                    r.account_id,
                    r.resource,
                    r.request_id,
                    r.hold_seconds,
                    r.wait_timeout_ms,
                )?;
                Answer::Acquire(convert::acquire_response(
                    engine.call(|reply| Command::Acquire(spec, reply)).await?,
                ))
            }
            Op::Release(r) => {
                let id = SlotId::parse("slot_id", &r.slot_id)?;
                Answer::Release(pb::ReleaseResponse {
                    released: engine
                        .call(|reply| Command::Release(id, restriction, reply))
                        .await?,
                })
            }
            Op::Renew(r) => {
                let id = SlotId::parse("slot_id", &r.slot_id)?;
                let hold = crate::model::hold(r.hold_seconds, "hold_seconds")?;
                Answer::Renew(convert::renew_response(
                    engine
                        .call(|reply| Command::Renew(id, restriction, hold, reply))
                        .await?,
                ))
            }
            Op::GetUsage(r) => {
                let key = SlotKey {
                    account: r.account_id,
                    resource: r.resource,
                };
                let usage = engine.call(|reply| Command::Usage(key, reply)).await?;
                Answer::GetUsage(pb::GetUsageResponse {
                    usage: Some(convert::usage(usage)),
                })
            }
            Op::ListUsage(r) => Answer::ListUsage(pb::ListUsageResponse {
                usages: engine
                    .list_usage(r.account_id)
                    .await
                    .into_iter()
                    .map(convert::usage)
                    .collect(),
            }),
        })
    }
}

#[tonic::async_trait]
impl LimiterPeerService for Relay {
    #[tracing::instrument(skip_all)]
    async fn forward(
        &self,
        request: Request<pb::ForwardRequest>,
    ) -> Result<Response<pb::ForwardResponse>, Status> {
        Caller::of(&request)
            .and_then(|c| c.require_platform())
            .map_err(Error::from)?;
        let body = request.into_inner();
        let op = body
            .op
            .ok_or_else(|| Error::from(plumbing::validate::FieldError::new("op", "must be set")))?;
        let restriction = (!body.caller_platform).then_some(body.caller_account);
        let answer = self.apply(restriction, op).await?;
        Ok(Response::new(pb::ForwardResponse {
            result: Some(answer),
        }))
    }
}

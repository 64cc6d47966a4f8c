//! Slot operations as the API sees them: validated, routed to the owning replica (local
//! engine or relay), answered in wire types.

use std::time::Duration;

use proto::limiter::v1 as pb;
use proto::limiter::v1::forward_request::Op;
use proto::limiter::v1::forward_response::Result as Answer;

use crate::convert;
use crate::engine::Command;
use crate::error::Error;
use crate::model::{AcquireSpec, SlotId, SlotKey};
use crate::routing::Dispatcher;
use crate::stats::EngineStats;

/// Who asked, as the owner needs to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requester {
    /// The token's account (`*` for an all-accounts platform token).
    pub account: String,
    /// Signed with the platform key: may act on any account's slots.
    pub platform: bool,
}

impl Requester {
    /// The account restriction for slot-id operations: None for platform callers.
    pub fn restriction(&self) -> Option<String> {
        (!self.platform).then(|| self.account.clone())
    }
}

/// The slot operations.
#[derive(Debug, Clone)]
pub struct Slots {
    dispatcher: Dispatcher,
    /// Where failed Acquires are counted (by fault).
    stats: EngineStats,
}

fn unexpected() -> tonic::Status {
    tonic::Status::internal("limiter peer answered with the wrong kind of result")
}

impl Slots {
    /// Operations over `dispatcher`, counting failed Acquires in `stats`.
    pub fn new(dispatcher: Dispatcher, stats: EngineStats) -> Self {
        Self { dispatcher, stats }
    }

    /// Acquire: granted, queued until granted or the wait expires, or rejected; an error
    /// that is a fault of the service is counted by its reason.
    pub async fn acquire(
        &self,
        spec: AcquireSpec,
        who: &Requester,
    ) -> Result<(pb::AcquireResponse, bool), Error> {
        let wait = Duration::from_millis(u64::from(spec.wait_ms));
        let shard = spec.key.shard();
        let request = forward(
            who,
            Op::Acquire(pb::AcquireRequest {
                account_id: spec.key.account.clone(),
                resource: spec.key.resource.clone(),
                request_id: spec.request_id.clone(),
                hold_seconds: spec.hold_secs,
                wait_timeout_ms: spec.wait_ms,
            }),
        );
        let answered = self
            .dispatcher
            .route(
                shard,
                wait,
                |engine| {
                    let spec = spec.clone();
                    async move {
                        engine
                            .call(|reply| Command::Acquire(spec, reply))
                            .await
                            .map(convert::acquire_response)
                    }
                },
                |mut peer| {
                    let request = request.clone();
                    async move {
                        match peer.forward(request).await?.into_inner().result {
                            Some(Answer::Acquire(answer)) => Ok(answer),
                            _ => Err(unexpected()),
                        }
                    }
                },
            )
            .await;
        if let Err(err) = &answered
            && let Some(reason) = err.fault()
        {
            self.stats.failed(reason);
        }
        answered
    }

    /// Release: whether this call freed the slot.
    pub async fn release(&self, id: SlotId, who: &Requester) -> Result<(bool, bool), Error> {
        let request = forward(
            who,
            Op::Release(pb::ReleaseRequest {
                slot_id: id.as_str().to_owned(),
            }),
        );
        let restriction = who.restriction();
        self.dispatcher
            .route(
                id.shard(),
                Duration::ZERO,
                |engine| {
                    let (id, restriction) = (id.clone(), restriction.clone());
                    async move {
                        engine
                            .call(|reply| Command::Release(id, restriction, reply))
                            .await
                    }
                },
                |mut peer| {
                    let request = request.clone();
                    async move {
                        match peer.forward(request).await?.into_inner().result {
                            Some(Answer::Release(answer)) => Ok(answer.released),
                            _ => Err(unexpected()),
                        }
                    }
                },
            )
            .await
    }

    /// Renew: the slot's new expiry.
    pub async fn renew(
        &self,
        id: SlotId,
        hold_secs: u32,
        who: &Requester,
    ) -> Result<(pb::RenewResponse, bool), Error> {
        let request = forward(
            who,
            Op::Renew(pb::RenewRequest {
                slot_id: id.as_str().to_owned(),
                hold_seconds: hold_secs,
            }),
        );
        let restriction = who.restriction();
        self.dispatcher
            .route(
                id.shard(),
                Duration::ZERO,
                |engine| {
                    let (id, restriction) = (id.clone(), restriction.clone());
                    async move {
                        engine
                            .call(|reply| Command::Renew(id, restriction, hold_secs, reply))
                            .await
                            .map(convert::renew_response)
                    }
                },
                |mut peer| {
                    let request = request.clone();
                    async move {
                        match peer.forward(request).await?.into_inner().result {
                            Some(Answer::Renew(answer)) => Ok(answer),
                            _ => Err(unexpected()),
                        }
                    }
                },
            )
            .await
    }

    /// Usage of one key, from its owner.
    pub async fn usage(&self, key: SlotKey, who: &Requester) -> Result<pb::Usage, Error> {
        let request = forward(
            who,
            Op::GetUsage(pb::GetUsageRequest {
                account_id: key.account.clone(),
                resource: key.resource.clone(),
            }),
        );
        self.dispatcher
            .route(
                key.shard(),
                Duration::ZERO,
                |engine| {
                    let key = key.clone();
                    async move {
                        engine
                            .call(|reply| Command::Usage(key, reply))
                            .await
                            .map(convert::usage)
                    }
                },
                |mut peer| {
                    let request = request.clone();
                    async move {
                        match peer.forward(request).await?.into_inner().result {
                            Some(Answer::GetUsage(answer)) => answer.usage.ok_or_else(unexpected),
                            _ => Err(unexpected()),
                        }
                    }
                },
            )
            .await
            .map(|(usage, _)| usage)
    }

    /// The shard map as this replica sees it.
    pub fn shard_map(&self) -> pb::GetShardMapResponse {
        self.dispatcher.shard_map()
    }

    /// Usage of every active key of `account`, gathered from every replica.
    pub async fn list_usage(
        &self,
        account: &str,
        who: &Requester,
    ) -> Result<Vec<pb::Usage>, Error> {
        let mut usages: Vec<pb::Usage> = self
            .dispatcher
            .engine()
            .list_usage(account.to_owned())
            .await
            .into_iter()
            .map(convert::usage)
            .collect();
        for address in self.dispatcher.peer_addresses() {
            let mut peer = self.dispatcher.peer(&address)?;
            let request = forward(
                who,
                Op::ListUsage(pb::ListUsageRequest {
                    account_id: account.to_owned(),
                }),
            );
            match peer
                .forward(request)
                .await
                .map_err(Error::Peer)?
                .into_inner()
                .result
            {
                Some(Answer::ListUsage(answer)) => usages.extend(answer.usages),
                _ => return Err(Error::Peer(unexpected())),
            }
        }
        usages.sort_by(|a, b| a.resource.cmp(&b.resource));
        Ok(usages)
    }
}

fn forward(who: &Requester, op: Op) -> pb::ForwardRequest {
    pb::ForwardRequest {
        caller_account: who.account.clone(),
        caller_platform: who.platform,
        op: Some(op),
    }
}

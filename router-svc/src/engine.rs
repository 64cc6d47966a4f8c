//! The router's domain: start a communication (idempotently, across replicas), find one
//! (here, in etcd, or on the replica that runs it), hang one up, and stop them all when the
//! replica stops. Handlers in [`crate::grpc`] only authorise, validate and convert.

use std::sync::Arc;
use std::time::Duration;
use tracing::Instrument;

use proto::router::v1 as pb;
use proto::router::v1::CommunicationState as State;
use proto::router::v1::TimelineEventKind as Kind;

use crate::communication::HangupSource;
pub use crate::context::Engine;
use crate::error::Error;
use crate::live::LiveComm;
use crate::model::{StoredRecord, event, is_ended, now_ms, timestamp};
use crate::runner::Runner;
use crate::store::Created;

/// A validated Route call.
#[derive(Debug, Clone)]
pub struct RouteSpec {
    /// Account.
    pub account: String,
    /// Communication id (given or generated).
    pub id: String,
    /// From.
    pub from: String,
    /// To.
    pub to: String,
    /// Channel.
    pub channel: String,
    /// Parameters for the devices.
    pub parameters: std::collections::HashMap<String, String>,
}

/// Where a communication is.
#[derive(Debug)]
pub enum Found {
    /// Running on this replica.
    Here(Arc<LiveComm>),
    /// Ended (or not yet settled elsewhere); as stored.
    Stored(Box<pb::Communication>),
    /// Running on the replica at this address; as last stored.
    Elsewhere(String, Box<pb::Communication>),
}

impl Engine {
    /// Starts (or joins) a communication; it is running or ended when this returns.
    pub async fn start(self: &Arc<Self>, spec: RouteSpec) -> Result<Found, Error> {
        if self.shutdown.is_cancelled() {
            return Err(Error::ShuttingDown);
        }
        if let Some(comm) = self.live.get(&spec.account, &spec.id) {
            same_call(&comm.snapshot(), &spec)?;
            return Ok(Found::Here(comm));
        }
        let app = self.apps.lookup(&spec.account, &spec.to).await?;
        let comm = new_communication(&spec);
        let live = match self.live.insert(LiveComm::new(comm.clone())) {
            Ok(live) => live,
            Err(running) => {
                same_call(&running.snapshot(), &spec)?;
                return Ok(Found::Here(running));
            }
        };
        match self.store.create(&live).await {
            Ok(Created::New) => {}
            Ok(Created::Exists(record)) => {
                self.live.remove(&live);
                let found = self.stored(*record);
                if let Found::Stored(existing) | Found::Elsewhere(_, existing) = &found {
                    same_call(existing, &spec)?;
                }
                return Ok(found);
            }
            Err(err) => {
                self.live.remove(&live);
                return Err(err.into());
            }
        }
        let runner = Runner::new(self.clone(), live.clone(), app);
        // The runner outlives the Route call but belongs to its trace: limiter and presence
        // spans of this communication join the caller's trace.
        tokio::spawn(runner.run().instrument(tracing::Span::current()));
        Ok(Found::Here(live))
    }

    /// Finds a communication of `account`.
    pub async fn find(&self, account: &str, id: &str) -> Result<Found, Error> {
        if let Some(comm) = self.live.get(account, id) {
            return Ok(Found::Here(comm));
        }
        match self.store.get(account, id).await? {
            Some(record) => Ok(self.stored(record)),
            None => Err(Error::NoCommunication(id.to_owned())),
        }
    }

    fn stored(&self, record: StoredRecord) -> Found {
        let comm = record.communication.unwrap_or_default();
        if is_ended(&comm) || record.owner.is_empty() {
            Found::Stored(Box::new(comm))
        } else {
            Found::Elsewhere(record.owner, Box::new(comm))
        }
    }

    /// Hangs up a communication running here; it when it has ended and been stored.
    pub async fn hangup(&self, comm: &Arc<LiveComm>, reason: String) -> pb::Communication {
        comm.request_hangup(HangupSource::Api(reason));
        comm.ended().await;
        self.settle(comm).await
    }

    /// The communication once its current state is stored (so any replica reads it).
    pub async fn settle(&self, comm: &Arc<LiveComm>) -> pb::Communication {
        if let Err(err) = self.store.flush(comm).await {
            tracing::warn!(error = %err, "communication record not written; answering from memory");
        }
        comm.snapshot()
    }

    /// Every communication of an account: stored records overlaid with the live ones here.
    pub async fn list(&self, account: &str) -> Result<Vec<pb::Communication>, Error> {
        let mut all: std::collections::HashMap<String, pb::Communication> = self
            .store
            .list(account)
            .await?
            .into_iter()
            .filter_map(|r| r.communication)
            .map(|c| (c.communication_id.clone(), c))
            .collect();
        for live in self.live.of_account(account) {
            all.insert(live.id.clone(), live.snapshot());
        }
        Ok(all.into_values().collect())
    }

    /// Stops every communication running here (the replica is stopping) and waits, at most
    /// `within`, for them to end and be stored.
    pub async fn stop_all(&self, within: Duration) {
        self.shutdown.cancel();
        for comm in self.live.all() {
            comm.request_hangup(HangupSource::Shutdown);
        }
        if tokio::time::timeout(within, self.live.drained())
            .await
            .is_err()
        {
            tracing::warn!(
                "communications still running at shutdown; their records go with the replica lease"
            );
        }
    }
}

/// ALREADY_EXISTS unless a retried Route names the same call.
fn same_call(existing: &pb::Communication, spec: &RouteSpec) -> Result<(), Error> {
    if existing.from == spec.from && existing.to == spec.to && existing.channel == spec.channel {
        Ok(())
    } else {
        Err(Error::Conflict(spec.id.clone()))
    }
}

fn new_communication(spec: &RouteSpec) -> pb::Communication {
    let mut comm = pb::Communication {
        communication_id: spec.id.clone(),
        account_id: spec.account.clone(),
        from: spec.from.clone(),
        to: spec.to.clone(),
        channel: spec.channel.clone(),
        state: State::Routing as i32,
        create_time: Some(timestamp(now_ms())),
        parameters: spec.parameters.clone(),
        ..Default::default()
    };
    event(
        &mut comm,
        Kind::Created,
        format!("{} -> {} ({})", spec.from, spec.to, spec.channel),
        "",
        &[
            ("from", spec.from.clone()),
            ("to", spec.to.clone()),
            ("channel", spec.channel.clone()),
        ],
    );
    comm
}

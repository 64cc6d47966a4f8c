//! Settling the communications of a lost router replica, and keeping this replica's own
//! index entries under the lease in force (the txns and why they are safe: [`crate::store`]).
//!
//! Every replica sweeps the index every third of `--replica-ttl` (at least every second):
//! an entry under a lease etcd no longer knows, and not one this replica ever held, is a
//! communication whose replica died (or lost its lease). The sweep settles it — FAILED,
//! ENDED with `reason: router_lost`, every leg FAILED — then releases its limiter slot and
//! sends its status callback. The devices' offers were cancelled by presence already: it
//! ends an offer when the relay stream from the router breaks. A communication is settled
//! within the lease's TTL plus one sweep period of its replica's death.
//!
//! When this replica's own lease is replaced, each communication it runs is written again at
//! once, which moves its index entry under the new lease; the sweep does not settle the
//! communications this replica runs.
//!
//! **Orphans.** An entry under one of this replica's own leases whose communication it does
//! not run (no runner in [`crate::live`]) is an orphan, and the sweep settles it the same
//! way: its lease is alive, so no other replica ever would. Two paths leave one: a creation
//! txn that etcd applied although the call that sent it failed (a leader change: the
//! answer was lost, Route answered UNAVAILABLE and no runner started), and a final record
//! the runner gave up writing. Settling one is safe against a runner that is still writing:
//! a communication is in the live map from before its creation is sent until after its
//! final record is written (which deletes the entry), and the settlement's txn applies only
//! while the entry exists and the record is unchanged since it was read.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use plumbing::etcd::EtcdError;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::callbacks::StatusCallbacks;
use crate::communication::status_params;
use crate::context::Engine;
use crate::model::StoredRecord;
use crate::ports::slot;

/// How often a replica with lease TTL `replica_ttl` (seconds) sweeps the index.
pub fn sweep_period(replica_ttl: i64) -> Duration {
    (Duration::from_secs(replica_ttl.max(1) as u64) / 3).max(Duration::from_secs(1))
}

/// Sweeps every `period` until the engine shuts down; `leases` is this replica's lease in
/// force.
pub fn start(
    engine: Arc<Engine>,
    mut leases: watch::Receiver<i64>,
    period: Duration,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let mut mine = HashSet::from([*leases.borrow_and_update()]);
        loop {
            tokio::select! {
                _ = engine.shutdown.cancelled() => return,
                _ = tokio::time::sleep(period) => {}
                changed = leases.changed() => if changed.is_err() { return },
            }
            let lease = *leases.borrow_and_update();
            if mine.insert(lease) {
                tracing::warn!(
                    lease,
                    "a new replica lease: moving this replica's communications under it"
                );
            }
            // Our own communications indexed under a lease we lost move with their next
            // write: write them now.
            for comm in engine.live.all() {
                let indexed = comm.index_lease();
                if indexed > 0 && indexed != lease {
                    engine.store.save(&comm);
                }
            }
            if let Err(err) = sweep(&engine, &mine).await {
                tracing::warn!(error = %err, "could not sweep for communications of lost replicas; retrying");
            }
        }
    })
}

/// Settles every entry under a dead lease not in `mine`, and every orphan under one in it.
async fn sweep(engine: &Engine, mine: &HashSet<i64>) -> Result<(), EtcdError> {
    let mut alive: HashMap<i64, bool> = HashMap::new();
    for entry in engine.store.index().await? {
        if mine.contains(&entry.lease) {
            if engine.store.runs_here(&entry.record, &engine.live) {
                continue;
            }
            tracing::warn!(record = %entry.record, "an index entry of this replica with no communication running here: settling the orphan");
            if let Some(settled) = engine.store.settle_lost(&entry).await? {
                settled_here(engine, settled).await;
            }
            continue;
        }
        let live = match alive.get(&entry.lease) {
            Some(live) => *live,
            None => {
                let live = engine.store.lease_alive(entry.lease).await?;
                alive.insert(entry.lease, live);
                live
            }
        };
        if live {
            continue;
        }
        if let Some(settled) = engine.store.settle_lost(&entry).await? {
            settled_here(engine, settled).await;
        }
    }
    Ok(())
}

/// What follows a settlement this replica made: the slot, the metrics, the callback.
async fn settled_here(engine: &Engine, record: StoredRecord) {
    let comm = record.communication.unwrap_or_default();
    tracing::warn!(
        account = %comm.account_id,
        communication = %comm.communication_id,
        "settled a communication of a lost router replica (router_lost)"
    );
    engine.stats.ended(comm.outcome);
    if !record.slot_id.is_empty() {
        slot::release(&engine.peers, &record.slot_id).await;
    }
    match engine.apps.lookup(&comm.account_id, &comm.to).await {
        Ok(app) => {
            if let Some(callbacks) = StatusCallbacks::start(&app, &engine.webhooks) {
                callbacks.send(status_params(&comm));
            }
        }
        Err(err) => {
            tracing::debug!(error = %err, "no application for a settled communication's status callback");
        }
    }
}

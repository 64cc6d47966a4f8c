//! Open-loop load at a fixed rate: one operation started every `1 / per_second` seconds,
//! each on its own task and bounded by [`OP_DEADLINE`], so that a stalled service (an etcd
//! election, a frozen member) delays nothing but its own calls and the rate is what the
//! services are offered, not what they manage.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use tokio::task::{JoinError, JoinHandle, JoinSet};
use tokio::time::{Instant, MissedTickBehavior};

/// Bound on one whole operation (a session's lifetime, a communication with its retries).
pub const OP_DEADLINE: Duration = Duration::from_secs(40);
/// Distinct failure texts kept per kind; the rest are counted as "other".
const FAILURE_KINDS: usize = 12;

/// What one kind of operation did.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    /// The kind, e.g. `acquire`.
    pub name: &'static str,
    /// Operations started.
    pub started: u64,
    /// Operations that did everything they meant to.
    pub ok: u64,
    /// Failed operations, by what failed first (calls failing during the faults are
    /// expected; they are reported, not checked).
    pub failures: BTreeMap<String, u64>,
}

impl Tally {
    /// Failed operations.
    pub fn failed(&self) -> u64 {
        self.failures.values().sum()
    }

    fn add(
        &mut self,
        outcome: std::result::Result<Option<std::result::Result<(), String>>, JoinError>,
    ) {
        let failure = match outcome {
            Ok(Some(Ok(()))) => {
                self.ok += 1;
                return;
            }
            Ok(Some(Err(text))) => text,
            Ok(None) => format!("no end within {OP_DEADLINE:?}"),
            Err(err) => format!("the operation's task failed: {err}"),
        };
        let key = if self.failures.len() < FAILURE_KINDS || self.failures.contains_key(&failure) {
            failure
        } else {
            "other failures".to_owned()
        };
        *self.failures.entry(key).or_default() += 1;
    }
}

/// Starts `op(0)`, `op(1)`, … at `per_second` until `end`, then waits for those running;
/// the task answers the tally.
pub fn every<F, Fut>(name: &'static str, per_second: f64, end: Instant, op: F) -> JoinHandle<Tally>
where
    F: Fn(u64) -> Fut + Send + 'static,
    Fut: Future<Output = std::result::Result<(), String>> + Send + 'static,
{
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(Duration::from_secs_f64(1.0 / per_second));
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut running = JoinSet::new();
        let mut tally = Tally {
            name,
            ..Tally::default()
        };
        loop {
            tokio::select! {
                _ = ticker.tick() => {
                    if Instant::now() >= end {
                        break;
                    }
                    let op = op(tally.started);
                    running.spawn(async move { tokio::time::timeout(OP_DEADLINE, op).await.ok() });
                    tally.started += 1;
                }
                Some(done) = running.join_next() => tally.add(done),
            }
        }
        while let Some(done) = running.join_next().await {
            tally.add(done);
        }
        tally
    })
}

//! [`GroupCommit`]: every presence write of this replica goes through one writer that packs
//! whatever is waiting into a single etcd txn, each write a nested txn keeping its own
//! compare (docs/CONTRACT.md §3: etcd's cost is per request, so a storm of hellos or hang-ups —
//! thousands of clients reconnecting — costs tens of raft entries, not thousands).
//!
//! The writer adds no delay: it takes what is queued when the previous txn has returned, up
//! to 100 writes (etcd allows 128 ops per txn, nested ones included), so an idle replica
//! writes with single-txn latency. Writes that
//! touch the same key never share a batch (etcd refuses duplicate keys in one txn); they go
//! in the next. If a batch fails as a whole (say one write names a lease that has just
//! expired), each of its writes is retried alone so that none fails for another's sake.

use std::collections::{HashSet, VecDeque};

use etcd_client::{Txn, TxnOp, TxnOpResponse, TxnResponse};
use plumbing::etcd::{CALL_DEADLINE, EtcdSession, Retried};
use plumbing::metrics::TxnStats;
use tokio::sync::{mpsc, oneshot};

/// etcd's default `--max-txn-ops`. etcd checks each nested txn against what the outer txn
/// leaves of it: a batch of `n` writes may carry nested txns of up to `128 - n` ops.
const MAX_TXN_OPS: usize = 128;
/// Most writes in one batch (each nested txn then has room for 28 ops).
const MAX_BATCH: usize = 100;
/// Writes waiting for the writer before callers wait to queue.
const QUEUE: usize = 4096;

/// The outcome of one write.
#[derive(Debug, Clone, Copy)]
pub struct Committed {
    /// Whether the write's compares held (and its ops were applied).
    pub succeeded: bool,
    /// The revision of the txn that carried it.
    pub revision: i64,
}

/// Why a write could not be committed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CommitError {
    /// The write puts a key under a lease etcd no longer has.
    #[error("etcd: requested lease not found")]
    LeaseNotFound,
    /// etcd failed or did not answer in time.
    #[error("etcd unavailable: {0}")]
    Unavailable(String),
}

struct Pending {
    txn: Txn,
    keys: Vec<String>,
    reply: oneshot::Sender<Result<Committed, CommitError>>,
}

/// The replica's single etcd writer for presence records.
#[derive(Debug, Clone)]
pub struct GroupCommit {
    queue: mpsc::Sender<Pending>,
}

impl GroupCommit {
    /// Starts the writer; it stops when every handle is dropped.
    pub fn start(session: EtcdSession, stats: TxnStats) -> Self {
        let (queue, pending) = mpsc::channel(QUEUE);
        tokio::spawn(run(session, stats, pending));
        Self { queue }
    }

    /// Commits `txn`, which writes (puts or deletes) exactly `keys`.
    pub async fn commit(&self, txn: Txn, keys: Vec<String>) -> Result<Committed, CommitError> {
        let (reply, answer) = oneshot::channel();
        let pending = Pending { txn, keys, reply };
        let stopped = || CommitError::Unavailable("the presence writer has stopped".into());
        self.queue.send(pending).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

async fn run(session: EtcdSession, stats: TxnStats, mut queue: mpsc::Receiver<Pending>) {
    let mut waiting: VecDeque<Pending> = VecDeque::new();
    loop {
        if waiting.is_empty() {
            match queue.recv().await {
                Some(pending) => waiting.push_back(pending),
                None => return,
            }
        }
        while waiting.len() < 2 * MAX_BATCH {
            match queue.try_recv() {
                Ok(pending) => waiting.push_back(pending),
                Err(_) => break,
            }
        }
        let batch = take_batch(&mut waiting);
        stats.batch(batch.len());
        let started = std::time::Instant::now();
        commit_batch(&session, batch).await;
        stats.latency(started.elapsed());
    }
}

/// Waiting writes with pairwise distinct keys that fit etcd's op limit together, oldest
/// first (the oldest always goes, alone if it must).
fn take_batch(waiting: &mut VecDeque<Pending>) -> Vec<Pending> {
    let mut batch: Vec<Pending> = Vec::new();
    let mut keys = HashSet::new();
    let mut widest = 0;
    let mut later = VecDeque::new();
    while let Some(pending) = waiting.pop_front() {
        // A nested txn's ops: its writes, and at most one compare per write.
        let width = widest.max(pending.keys.len());
        let fits =
            batch.is_empty() || (batch.len() < MAX_BATCH && batch.len() + 1 + width <= MAX_TXN_OPS);
        if fits && pending.keys.iter().all(|k| !keys.contains(k)) {
            keys.extend(pending.keys.iter().cloned());
            widest = width;
            batch.push(pending);
        } else {
            later.push_back(pending);
        }
    }
    *waiting = later;
    batch
}

async fn commit_batch(session: &EtcdSession, batch: Vec<Pending>) {
    if batch.len() == 1 {
        return commit_alone(session, batch).await;
    }
    let nested: Vec<TxnOp> = batch.iter().map(|p| TxnOp::txn(p.txn.clone())).collect();
    match call(session, Txn::new().and_then(nested)).await {
        Ok(response) => {
            let revision = response.header().map_or(0, |h| h.revision());
            for (pending, op) in batch.into_iter().zip(response.op_responses()) {
                let succeeded = matches!(op, TxnOpResponse::Txn(txn) if txn.succeeded());
                let _ = pending.reply.send(Ok(Committed {
                    succeeded,
                    revision,
                }));
            }
        }
        Err(err) => {
            tracing::debug!(error = %err, writes = batch.len(), "batched txn failed; committing its writes one by one");
            commit_alone(session, batch).await;
        }
    }
}

async fn commit_alone(session: &EtcdSession, batch: Vec<Pending>) {
    let commits = batch.into_iter().map(|pending| async move {
        let result = call(session, pending.txn).await.map(|response| Committed {
            succeeded: response.succeeded(),
            revision: response.header().map_or(0, |h| h.revision()),
        });
        let _ = pending.reply.send(result);
    });
    futures::future::join_all(commits).await;
}

async fn call(session: &EtcdSession, txn: Txn) -> Result<TxnResponse, CommitError> {
    // Every txn here is guarded by compares (a device's mod revision or lease), so an
    // attempt that applied without an answer makes its repeat fail the compare, and the
    // caller's read-and-retry loop sees the record as it is: repeating is safe.
    let attempt = session
        .retry_raw(CALL_DEADLINE, |mut client| {
            let txn = txn.clone();
            async move { client.txn(txn).await }
        })
        .await;
    match attempt {
        Ok(response) => Ok(response),
        Err(Retried::Refused(etcd_client::Error::GRpcStatus(status)))
            if status.code() == tonic::Code::NotFound =>
        {
            Err(CommitError::LeaseNotFound)
        }
        Err(Retried::Refused(err)) => Err(CommitError::Unavailable(err.to_string())),
        Err(Retried::Unanswered(text)) => Err(CommitError::Unavailable(text)),
    }
}

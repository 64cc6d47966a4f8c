//! Communication records in etcd, written by one group-committing writer per replica.
//!
//! `<prefix>/router/comms/<account>/<communication_id>` holds a [`StoredRecord`]
//! (protobuf). While the communication runs, the record is attached to the replica lease,
//! so a dead replica's communications vanish within `--replica-ttl`; when it ends, the
//! final record is rewritten under a shared retention lease (rotated, one grant per
//! rotation period) and stays readable for about `--communication-retention`.
//!
//! Writes are scarce (DESIGN.md §3), so nobody writes directly: a creation (put-if-absent,
//! for idempotency across replicas) or a "this record changed" mark goes to a queue, and
//! the writer packs everything queued while its previous txn was in flight into one txn of
//! up to [`MAX_OPS`] operations. A record marked dirty several times before its txn is
//! written once, with its latest state, so a communication costs its creation plus a few
//! coalesced writes, shared with every other communication in flight.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse};
use plumbing::etcd::{EtcdError, EtcdSession};
use plumbing::metrics::TxnStats;
use prost::Message;
use proto::router::v1 as pb;
use tokio::sync::{Notify, oneshot};

use crate::apps::prefix_end;
use crate::live::LiveComm;
use crate::model::{StoredRecord, is_ended};
use crate::retention::Retention;

/// Most operations in one txn (etcd's default `--max-txn-ops`), counting every compare and
/// operation of nested txns: a creation (compare, put, get) costs [`CREATION_OPS`].
pub const MAX_OPS: usize = 128;
/// What one creation costs of [`MAX_OPS`].
const CREATION_OPS: usize = 3;

/// What a creation found.
#[derive(Debug)]
pub enum Created {
    /// The record is new: this replica runs the communication.
    New,
    /// A communication with this id exists already.
    Exists(Box<StoredRecord>),
}

type Done = oneshot::Sender<Result<(), EtcdError>>;

struct Creation {
    key: String,
    value: Vec<u8>,
    done: oneshot::Sender<Result<Created, EtcdError>>,
}

struct Dirty {
    comm: Arc<LiveComm>,
    waiters: Vec<Done>,
}

#[derive(Default)]
struct Queue {
    creations: Vec<Creation>,
    dirty: HashMap<String, Dirty>,
}

/// The record store of this replica.
#[derive(Clone)]
pub struct CommStore {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for CommStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CommStore")
            .field("root", &self.inner.root)
            .finish_non_exhaustive()
    }
}

struct Inner {
    session: EtcdSession,
    root: String,
    replica_lease: i64,
    owner: String,
    queue: Mutex<Queue>,
    wake: Arc<Notify>,
    retention: Retention,
    stats: TxnStats,
}

impl CommStore {
    /// Starts the writer. Live records go under `replica_lease` with `owner` (this replica's
    /// address); ended ones under a retention lease of `retention`.
    pub fn start(
        session: &EtcdSession,
        replica_lease: i64,
        owner: String,
        retention: Duration,
        stats: TxnStats,
    ) -> Self {
        let inner = Arc::new(Inner {
            stats,
            session: session.clone(),
            root: session.key("router/comms/"),
            replica_lease,
            owner,
            queue: Mutex::default(),
            wake: Arc::new(Notify::new()),
            retention: Retention::new(session.clone(), retention),
        });
        tokio::spawn(write_loop(Arc::downgrade(&inner)));
        Self { inner }
    }

    fn key(&self, account: &str, id: &str) -> String {
        format!("{}{account}/{id}", self.inner.root)
    }

    /// Creates the record of a new communication unless its id exists.
    pub async fn create(&self, comm: &pb::Communication) -> Result<Created, EtcdError> {
        let record = StoredRecord {
            communication: Some(comm.clone()),
            owner: self.inner.owner.clone(),
        };
        let (done, result) = oneshot::channel();
        let creation = Creation {
            key: self.key(&comm.account_id, &comm.communication_id),
            value: record.encode_to_vec(),
            done,
        };
        self.inner
            .queue
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .creations
            .push(creation);
        self.inner.wake.notify_one();
        result
            .await
            .map_err(|_| EtcdError::Unavailable("the record writer stopped".into()))?
    }

    /// Marks `comm` changed: its latest state is written with the next txn.
    pub fn save(&self, comm: &Arc<LiveComm>) {
        self.enqueue(comm, None);
    }

    /// Like [`CommStore::save`], and waits until the state as of now is in etcd.
    pub async fn flush(&self, comm: &Arc<LiveComm>) -> Result<(), EtcdError> {
        if comm.is_stored() {
            return Ok(());
        }
        let (done, result) = oneshot::channel();
        self.enqueue(comm, Some(done));
        result
            .await
            .map_err(|_| EtcdError::Unavailable("the record writer stopped".into()))?
    }

    fn enqueue(&self, comm: &Arc<LiveComm>, done: Option<Done>) {
        let key = self.key(&comm.account, &comm.id);
        {
            let mut queue = self
                .inner
                .queue
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let entry = queue.dirty.entry(key).or_insert_with(|| Dirty {
                comm: comm.clone(),
                waiters: Vec::new(),
            });
            entry.waiters.extend(done);
        }
        self.inner.wake.notify_one();
    }

    /// The stored record of a communication.
    pub async fn get(&self, account: &str, id: &str) -> Result<Option<StoredRecord>, EtcdError> {
        let key = self.key(account, id);
        let mut client = self.inner.session.client();
        let response = self
            .inner
            .session
            .bounded(client.get(key.as_str(), None))
            .await?;
        response
            .kvs()
            .first()
            .map(|kv| decode(&key, kv.value()))
            .transpose()
    }

    /// Every stored record of an account.
    pub async fn list(&self, account: &str) -> Result<Vec<StoredRecord>, EtcdError> {
        let prefix = self.key(account, "");
        let options = GetOptions::new().with_range(prefix_end(&prefix));
        let mut client = self.inner.session.client();
        let response = self
            .inner
            .session
            .bounded(client.get(prefix.as_str(), Some(options)))
            .await?;
        response
            .kvs()
            .iter()
            .map(|kv| decode(kv.key_str().unwrap_or("?"), kv.value()))
            .collect()
    }
}

fn decode(key: &str, value: &[u8]) -> Result<StoredRecord, EtcdError> {
    StoredRecord::decode_from(value).map_err(|e| EtcdError::Corrupt {
        key: key.to_owned(),
        reason: e.to_string(),
    })
}

async fn write_loop(inner: std::sync::Weak<Inner>) {
    loop {
        let Some(strong) = inner.upgrade() else {
            return;
        };
        let (creations, dirty) = take_batch(&strong);
        if creations.is_empty() && dirty.is_empty() {
            let woken = strong.wake.clone().notified_owned();
            drop(strong);
            // Wake up now and then to notice that the store was dropped.
            let _ = tokio::time::timeout(Duration::from_secs(1), woken).await;
            continue;
        }
        commit(&strong, creations, dirty).await;
    }
}

fn take_batch(inner: &Inner) -> (Vec<Creation>, Vec<(String, Dirty)>) {
    let mut queue = inner.queue.lock().unwrap_or_else(PoisonError::into_inner);
    let mut creations = Vec::new();
    let mut seen = std::collections::HashSet::new();
    let mut later = Vec::new();
    for creation in std::mem::take(&mut queue.creations) {
        // A key may appear only once per txn: a second creation of it waits a round.
        if (creations.len() + 1) * CREATION_OPS <= MAX_OPS && seen.insert(creation.key.clone()) {
            creations.push(creation);
        } else {
            later.push(creation);
        }
    }
    queue.creations = later;
    let room = MAX_OPS - creations.len() * CREATION_OPS;
    let keys: Vec<String> = queue
        .dirty
        .keys()
        .filter(|k| !seen.contains(*k))
        .take(room)
        .cloned()
        .collect();
    let dirty = keys
        .into_iter()
        .filter_map(|k| queue.dirty.remove(&k).map(|d| (k, d)))
        .collect();
    (creations, dirty)
}

async fn commit(inner: &Inner, creations: Vec<Creation>, dirty: Vec<(String, Dirty)>) {
    let mut ops = Vec::with_capacity(creations.len() + dirty.len());
    for creation in &creations {
        let put = TxnOp::put(
            creation.key.as_str(),
            creation.value.clone(),
            Some(PutOptions::new().with_lease(inner.replica_lease)),
        );
        let absent = Compare::create_revision(creation.key.as_str(), CompareOp::Equal, 0);
        let nested = Txn::new()
            .when([absent])
            .and_then([put])
            .or_else([TxnOp::get(creation.key.as_str(), None)]);
        ops.push(TxnOp::txn(nested));
    }
    let mut result = Ok(Vec::new());
    let mut versions = Vec::new();
    inner.stats.batch(creations.len() + dirty.len());
    let started = std::time::Instant::now();
    for attempt in 0..2 {
        let mut batch = ops.clone();
        match dirty_ops(inner, &dirty).await {
            Ok((puts, written)) => {
                batch.extend(puts);
                versions = written;
            }
            Err(err) => {
                result = Err(err);
                break;
            }
        }
        let mut client = inner.session.client();
        result = inner
            .session
            .bounded(client.txn(Txn::new().and_then(batch)))
            .await
            .map(|r| r.op_responses());
        match &result {
            Err(EtcdError::Unavailable(message)) if attempt == 0 && message.contains("lease") => {
                // The retention lease went away under us: take a new one and retry once.
                inner.retention.forget().await;
            }
            _ => break,
        }
    }
    inner.stats.latency(started.elapsed());
    match result {
        Ok(responses) => {
            for (creation, response) in creations.into_iter().zip(responses) {
                let _ = creation.done.send(created(&creation.key, response));
            }
            for ((_, entry), version) in dirty.into_iter().zip(versions) {
                entry.comm.mark_stored(version);
                for waiter in entry.waiters {
                    let _ = waiter.send(Ok(()));
                }
            }
        }
        Err(err) => {
            tracing::warn!(error = %err, "communication records not written");
            for creation in creations {
                let _ = creation.done.send(Err(clone_error(&err)));
            }
            for (_, entry) in dirty {
                for waiter in entry.waiters {
                    let _ = waiter.send(Err(clone_error(&err)));
                }
            }
        }
    }
}

/// The puts of the dirty records, and the version of each that they write.
async fn dirty_ops(
    inner: &Inner,
    dirty: &[(String, Dirty)],
) -> Result<(Vec<TxnOp>, Vec<u64>), EtcdError> {
    let mut ops = Vec::with_capacity(dirty.len());
    let mut versions = Vec::with_capacity(dirty.len());
    for (key, entry) in dirty {
        let (comm, version) = entry.comm.versioned();
        versions.push(version);
        let (lease, owner) = if is_ended(&comm) {
            (inner.retention.lease().await?, String::new())
        } else {
            (inner.replica_lease, inner.owner.clone())
        };
        let record = StoredRecord {
            communication: Some(comm),
            owner,
        };
        ops.push(TxnOp::put(
            key.as_str(),
            record.encode_to_vec(),
            Some(PutOptions::new().with_lease(lease)),
        ));
    }
    Ok((ops, versions))
}

fn created(key: &str, response: TxnOpResponse) -> Result<Created, EtcdError> {
    let TxnOpResponse::Txn(txn) = response else {
        return Err(EtcdError::Unavailable("unexpected txn response".into()));
    };
    if txn.succeeded() {
        return Ok(Created::New);
    }
    let existing = txn.op_responses().into_iter().find_map(|op| match op {
        TxnOpResponse::Get(get) => get.kvs().first().map(|kv| kv.value().to_vec()),
        _ => None,
    });
    match existing {
        Some(value) => decode(key, &value).map(|r| Created::Exists(Box::new(r))),
        // Deleted between the compare and the get cannot happen in one txn; be safe.
        None => Err(EtcdError::Unavailable(
            "record vanished during creation".into(),
        )),
    }
}

fn clone_error(err: &EtcdError) -> EtcdError {
    match err {
        EtcdError::Unavailable(m) => EtcdError::Unavailable(m.clone()),
        EtcdError::Compacted {
            requested,
            compact_revision,
        } => EtcdError::Compacted {
            requested: *requested,
            compact_revision: *compact_revision,
        },
        EtcdError::Corrupt { key, reason } => EtcdError::Corrupt {
            key: key.clone(),
            reason: reason.clone(),
        },
    }
}

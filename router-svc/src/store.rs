//! Communication records in etcd, written by one group-committing writer per replica.
//!
//! `<prefix>/router/comms/<account>/<communication_id>` holds a [`StoredRecord`]
//! (protobuf). While the communication runs, the record has no lease — it must outlive a
//! replica that dies, so that another one can settle it — and an *index entry*
//! `<prefix>/router/owned/<lease>/<account>/<communication_id>` names it under the owner's
//! replica lease id (hex, in the key; the entry itself has no lease either). When it ends,
//! the final record is rewritten under a shared retention lease (rotated, one grant per
//! rotation period) and stays readable for about `--communication-retention`; the index
//! entry is deleted in the same txn.
//!
//! **Settling a lost replica's communications** ([`crate::lost`]). An index entry whose
//! lease etcd no longer knows belongs to a replica that died (or lost its lease): any
//! replica may settle it — FAILED, reason `router_lost` — in one txn that compares the
//! record's mod revision with the one it read and the entry's existence, so of several
//! replicas settling at once exactly one does, and a settlement never overwrites a newer
//! state. Every write of the owner is guarded the same way: it applies only while its index
//! entry exists (compare create revision > 0). So for each communication exactly one of
//! "the owner wrote its end" and "another replica settled it" happens, and the owner learns
//! of the second from its failed compare (it then hangs the communication up locally,
//! [`crate::live::HangupSource::SettledElsewhere`]). A replica whose lease was replaced
//! moves its index entries to the new lease with its next write of each record (the lost
//! lease's sweep skips leases of its own).
//!
//! Writes are scarce (docs/CONTRACT.md §3), so nobody writes directly: a creation (put-if-absent,
//! for idempotency across replicas) or a "this record changed" mark goes to a queue, and
//! the writer packs everything queued while its previous txn was in flight into one txn of
//! up to [`MAX_OPS`] operations. A record marked dirty several times before its txn is
//! written once, with its latest state, so a communication costs its creation plus a few
//! coalesced writes, shared with every other communication in flight.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse};
use plumbing::etcd::{CALL_DEADLINE, EtcdError, EtcdSession, Retried};
use plumbing::metrics::TxnStats;
use prost::Message;
use tokio::sync::{Notify, oneshot, watch};

use crate::communication::HangupSource;
use crate::live::{FINAL_WRITTEN, LiveComm};
use crate::model::{StoredRecord, finish_lost, is_ended};
use crate::retention::Retention;

/// Most operations in one txn (etcd's default `--max-txn-ops`), counting every compare and
/// operation of nested txns: a creation (compare, put, get) costs [`CREATION_OPS`].
pub const MAX_OPS: usize = 128;
/// What one creation costs of [`MAX_OPS`] (compare, put the record, put its index entry,
/// or get the existing record).
const CREATION_OPS: usize = 4;
/// What one record write costs at most (compare the index entry, put the record, delete
/// the old index entry, put the new one).
const WRITE_OPS: usize = 4;

/// An index entry: a communication running on the replica whose lease is `lease`.
#[derive(Debug, Clone)]
pub struct IndexEntry {
    /// The owner's replica lease.
    pub lease: i64,
    /// The entry's key.
    pub key: String,
    /// The key of the communication's record.
    pub record: String,
}

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
    comm: Arc<LiveComm>,
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
    index_root: String,
    replica_lease: watch::Receiver<i64>,
    owner: String,
    queue: Mutex<Queue>,
    wake: Arc<Notify>,
    retention: Retention,
    stats: TxnStats,
}

impl CommStore {
    /// Starts the writer. Live records are indexed under the lease in force in
    /// `replica_lease` with `owner` (this replica's address); ended ones go under a
    /// retention lease of `retention`.
    pub fn start(
        session: &EtcdSession,
        replica_lease: watch::Receiver<i64>,
        owner: String,
        retention: Duration,
        stats: TxnStats,
    ) -> Self {
        let inner = Arc::new(Inner {
            stats,
            session: session.clone(),
            root: session.key("router/comms/"),
            index_root: session.key("router/owned/"),
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

    /// The replica lease this replica indexes its communications under now.
    pub fn lease(&self) -> i64 {
        *self.inner.replica_lease.borrow()
    }

    /// Creates the record (and index entry) of a new communication unless its id exists.
    pub async fn create(&self, live: &Arc<LiveComm>) -> Result<Created, EtcdError> {
        let comm = live.snapshot();
        let record = StoredRecord {
            communication: Some(comm.clone()),
            owner: self.inner.owner.clone(),
            slot_id: String::new(),
        };
        let (done, result) = oneshot::channel();
        let creation = Creation {
            key: self.key(&comm.account_id, &comm.communication_id),
            value: record.encode_to_vec(),
            comm: live.clone(),
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
        let options = GetOptions::new().with_range(plumbing::etcd::prefix_end(&prefix));
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

    /// Every index entry: the communications running on some replica, live or lost.
    pub async fn index(&self) -> Result<Vec<IndexEntry>, EtcdError> {
        let root = self.inner.index_root.clone();
        let response = self
            .inner
            .session
            .retry(CALL_DEADLINE, |mut client| {
                let root = root.clone();
                let options = GetOptions::new().with_range(plumbing::etcd::prefix_end(&root));
                async move { client.get(root.as_str(), Some(options)).await }
            })
            .await?;
        let entries = response.kvs().iter().filter_map(|kv| {
            let key = kv.key_str().ok()?;
            let (lease, _) = key.strip_prefix(root.as_str())?.split_once('/')?;
            Some(IndexEntry {
                lease: i64::from_str_radix(lease, 16).ok()?,
                key: key.to_owned(),
                record: kv.value_str().ok()?.to_owned(),
            })
        });
        Ok(entries.collect())
    }

    /// Whether the communication of record key `record` runs on this replica (is in `live`).
    pub fn runs_here(&self, record: &str, live: &crate::live::LiveTable) -> bool {
        record
            .strip_prefix(self.inner.root.as_str())
            .and_then(|tail| tail.split_once('/'))
            .is_some_and(|(account, id)| live.get(account, id).is_some())
    }

    /// Whether etcd still knows lease `lease`. A lease past its TTL but not yet revoked
    /// (etcd revokes expired leases a moment later, through raft) still counts as alive:
    /// its keeper may yet renew it. Only a revoked lease (TTL -1) is lost for good.
    pub async fn lease_alive(&self, lease: i64) -> Result<bool, EtcdError> {
        let answer = self
            .inner
            .session
            .retry_raw(CALL_DEADLINE, |mut client| async move {
                client.lease_time_to_live(lease, None).await
            })
            .await;
        match answer {
            Ok(ttl) => Ok(ttl.ttl() != -1),
            Err(Retried::Refused(etcd_client::Error::GRpcStatus(status)))
                if status.code() == tonic::Code::NotFound =>
            {
                Ok(false)
            }
            Err(Retried::Refused(err)) => Err(err.into()),
            Err(Retried::Unanswered(why)) => Err(EtcdError::Unavailable(why)),
        }
    }

    /// Settles the communication of a lost replica's index entry: FAILED, `router_lost`,
    /// under the retention lease, the entry deleted — unless it changed meanwhile (its
    /// owner wrote again) or another replica settled it first. The settled record when this
    /// call settled it.
    pub async fn settle_lost(&self, entry: &IndexEntry) -> Result<Option<StoredRecord>, EtcdError> {
        let session = &self.inner.session;
        let record_key = entry.record.clone();
        let found = session
            .retry(CALL_DEADLINE, |mut client| {
                let key = record_key.clone();
                async move { client.get(key, None).await }
            })
            .await?;
        let indexed = Compare::create_revision(entry.key.as_str(), CompareOp::Greater, 0);
        let unindex = TxnOp::delete(entry.key.as_str(), None);
        let stored = match found.kvs().first() {
            Some(kv) => Some((decode(&record_key, kv.value())?, kv.mod_revision())),
            None => None,
        };
        let Some((record, revision)) =
            stored.filter(|(r, _)| r.communication.as_ref().is_some_and(|c| !is_ended(c)))
        else {
            // Ended (or gone) already: only the entry is left over.
            let txn = Txn::new().when([indexed]).and_then([unindex]);
            session
                .retry(CALL_DEADLINE, |mut client| {
                    let txn = txn.clone();
                    async move { client.txn(txn).await }
                })
                .await?;
            return Ok(None);
        };
        let mut comm = record.communication.unwrap_or_default();
        finish_lost(&mut comm);
        let settled = StoredRecord {
            communication: Some(comm),
            owner: String::new(),
            slot_id: record.slot_id,
        };
        let value = settled.encode_to_vec();
        let lease = self.inner.retention.lease().await?;
        let unchanged = Compare::mod_revision(record_key.as_str(), CompareOp::Equal, revision);
        let put = TxnOp::put(
            record_key.as_str(),
            value.clone(),
            Some(PutOptions::new().with_lease(lease)),
        );
        let txn = Txn::new()
            .when([unchanged, indexed])
            .and_then([put, unindex]);
        let answer = session
            .retry(CALL_DEADLINE, |mut client| {
                let txn = txn.clone();
                async move { client.txn(txn).await }
            })
            .await;
        let applied = match answer {
            Ok(answer) if answer.succeeded() => true,
            Err(err) => {
                if matches!(err, EtcdError::LeaseNotFound(_)) {
                    self.inner.retention.forget().await;
                }
                return Err(err);
            }
            // A retried attempt fails its compares if an earlier one applied: ours did if
            // the record holds exactly what we wrote.
            Ok(_) => session
                .retry(CALL_DEADLINE, |mut client| {
                    let key = record_key.clone();
                    async move { client.get(key, None).await }
                })
                .await?
                .kvs()
                .first()
                .is_some_and(|kv| kv.value() == value.as_slice()),
        };
        Ok(applied.then_some(settled))
    }
}

impl Inner {
    /// The index entry of record `record_key` under replica lease `lease`.
    fn index_key(&self, lease: i64, record_key: &str) -> String {
        let tail = record_key.strip_prefix(&self.root).unwrap_or(record_key);
        format!("{}{lease:016x}/{tail}", self.index_root)
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
    let room = (MAX_OPS - creations.len() * CREATION_OPS) / WRITE_OPS;
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
    let lease = *inner.replica_lease.borrow();
    let mut ops = Vec::with_capacity(creations.len() + dirty.len());
    for creation in &creations {
        let index = inner.index_key(lease, &creation.key);
        let put = TxnOp::put(creation.key.as_str(), creation.value.clone(), None);
        let indexed = TxnOp::put(index.as_str(), creation.key.as_str(), None);
        let absent = Compare::create_revision(creation.key.as_str(), CompareOp::Equal, 0);
        let nested = Txn::new()
            .when([absent])
            .and_then([put, indexed])
            .or_else([TxnOp::get(creation.key.as_str(), None)]);
        ops.push(TxnOp::txn(nested));
    }
    let mut result = Ok(Vec::new());
    let mut written = Vec::new();
    inner.stats.batch(creations.len() + dirty.len());
    let started = std::time::Instant::now();
    for attempt in 0..2 {
        let mut batch = ops.clone();
        match dirty_ops(inner, &dirty, lease).await {
            Ok((puts, versions)) => {
                batch.extend(puts);
                written = versions;
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
            Err(EtcdError::LeaseNotFound(_)) if attempt == 0 => {
                // The retention lease went away under us: take a new one and retry once.
                inner.retention.forget().await;
            }
            _ => break,
        }
    }
    inner.stats.latency(started.elapsed());
    match result {
        Ok(responses) => {
            let mut responses = responses.into_iter();
            for (creation, response) in creations.into_iter().zip(&mut responses) {
                let outcome = created(&creation.key, response);
                if matches!(outcome, Ok(Created::New)) {
                    creation.comm.set_index_lease(lease);
                }
                let _ = creation.done.send(outcome);
            }
            for (((key, entry), (version, indexed)), response) in
                dirty.into_iter().zip(written).zip(responses)
            {
                entry.comm.mark_stored(version);
                if guard_held(&response) {
                    entry.comm.set_index_lease(indexed.unwrap_or(FINAL_WRITTEN));
                } else {
                    // Its index entry is gone: another replica settled it (router_lost)
                    // while this one's lease was lost. It is over; end it here too.
                    tracing::warn!(record = %key, "communication settled by another replica; ending it here");
                    entry.comm.request_hangup(HangupSource::SettledElsewhere);
                }
                for waiter in entry.waiters {
                    let _ = waiter.send(Ok(()));
                }
            }
        }
        Err(err) => {
            tracing::warn!(error = %err, "communication records not written");
            for creation in creations {
                let _ = creation.done.send(Err(err.clone()));
            }
            for (_, entry) in dirty {
                for waiter in entry.waiters {
                    let _ = waiter.send(Err(err.clone()));
                }
            }
        }
    }
}

/// Whether a nested txn's compares held.
fn guard_held(response: &TxnOpResponse) -> bool {
    matches!(response, TxnOpResponse::Txn(txn) if txn.succeeded())
}

/// The guarded writes of the dirty records (each moves the record's index entry to `lease`
/// if it is under another, and deletes it with the final record), and for each the version
/// it writes and the lease its index entry is under afterwards (`None` once ended).
async fn dirty_ops(
    inner: &Inner,
    dirty: &[(String, Dirty)],
    lease: i64,
) -> Result<(Vec<TxnOp>, Vec<(u64, Option<i64>)>), EtcdError> {
    let mut ops = Vec::with_capacity(dirty.len());
    let mut written = Vec::with_capacity(dirty.len());
    for (key, entry) in dirty {
        let (comm, version) = entry.comm.versioned();
        let indexed_under = entry.comm.index_lease();
        let index = inner.index_key(indexed_under, key);
        let ended = is_ended(&comm);
        let record = StoredRecord {
            communication: Some(comm),
            owner: if ended {
                String::new()
            } else {
                inner.owner.clone()
            },
            slot_id: entry.comm.slot().to_owned(),
        };
        // The final record is ours once written; a later write needs only the record.
        let guard = if indexed_under == FINAL_WRITTEN {
            Compare::create_revision(key.as_str(), CompareOp::Greater, 0)
        } else {
            Compare::create_revision(index.as_str(), CompareOp::Greater, 0)
        };
        let (put, index_ops, indexed) = if ended && indexed_under == FINAL_WRITTEN {
            let retained = PutOptions::new().with_lease(inner.retention.lease().await?);
            let put = TxnOp::put(key.as_str(), record.encode_to_vec(), Some(retained));
            (put, Vec::new(), None)
        } else if ended {
            let retained = PutOptions::new().with_lease(inner.retention.lease().await?);
            let put = TxnOp::put(key.as_str(), record.encode_to_vec(), Some(retained));
            (put, vec![TxnOp::delete(index.as_str(), None)], None)
        } else if indexed_under != lease {
            let moved = inner.index_key(lease, key);
            let ops = vec![
                TxnOp::delete(index.as_str(), None),
                TxnOp::put(moved.as_str(), key.as_str(), None),
            ];
            let put = TxnOp::put(key.as_str(), record.encode_to_vec(), None);
            (put, ops, Some(lease))
        } else {
            let put = TxnOp::put(key.as_str(), record.encode_to_vec(), None);
            (put, Vec::new(), Some(lease))
        };
        let mut then = vec![put];
        then.extend(index_ops);
        ops.push(TxnOp::txn(Txn::new().when([guard]).and_then(then)));
        written.push((version, indexed));
    }
    Ok((ops, written))
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

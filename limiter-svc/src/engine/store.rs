//! The etcd side of the engine: slot and block records, group-committed fenced txns,
//! bucket leases, reading a shard back in the txn that claims it, and the planned handoff
//! that writes a shard out exactly and vacates it.

use std::collections::{HashMap, HashSet};

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse};
use futures::future::BoxFuture;
use plumbing::etcd::{EtcdError, EtcdSession};

use crate::model::{SlotId, SlotKey, now_ms};
use crate::table::Slot;

/// A slot or block record as stored in etcd.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct SlotRecord {
    a: String,
    r: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    q: String,
    e: u64,
    /// Fencing token (slots).
    #[serde(default, skip_serializing_if = "is_zero")]
    f: u64,
    /// Block count: > 0 marks an escrow block of `n` slots, all held until `e`.
    #[serde(default, skip_serializing_if = "is_zero_u32")]
    n: u32,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

fn is_zero_u32(v: &u32) -> bool {
    *v == 0
}

/// An escrow block record: `count` slots of `key`, every one held until `expire_ms`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct BlockRecord {
    pub id: SlotId,
    pub key: SlotKey,
    pub count: u32,
    pub expire_ms: u64,
}

#[derive(Debug)]
pub(super) enum Write {
    Put(Slot),
    Delete(u16, SlotId),
    Block(BlockRecord),
}

impl Write {
    pub(super) fn id(&self) -> &SlotId {
        match self {
            Write::Put(slot) => &slot.id,
            Write::Delete(_, id) => id,
            Write::Block(block) => &block.id,
        }
    }

    pub(super) fn shard(&self) -> u16 {
        self.id().shard()
    }
}

/// The ownership key of a shard.
pub fn shard_key(session: &EtcdSession, shard: u16) -> String {
    session.key(&format!("limiter/shards/{shard:02x}"))
}

fn slots_prefix(session: &EtcdSession, shard: u16) -> String {
    session.key(&format!("limiter/slots/{shard:02x}/"))
}

/// The bucket (expiry second, plus one of grace) whose lease carries a slot.
fn bucket_of(expire_ms: u64) -> u64 {
    expire_ms.div_ceil(1000) + 1
}

/// What a commit hands back: its writes, the bucket leases it granted, and the revision it
/// committed at.
pub(super) type CommitOutcome = (Vec<Write>, Vec<(u64, i64)>, Result<i64, CommitError>);

/// Grants the bucket leases `writes` need that `leases` lacks; records them in `leases`
/// and `granted`.
async fn grant_buckets(
    session: &EtcdSession,
    writes: &[Write],
    leases: &mut HashMap<u64, i64>,
    granted: &mut Vec<(u64, i64)>,
) -> Result<(), EtcdError> {
    let buckets: HashSet<u64> = writes
        .iter()
        .filter_map(|w| match w {
            Write::Put(s) => Some(bucket_of(s.expire_ms)),
            Write::Block(b) => Some(bucket_of(b.expire_ms)),
            Write::Delete(..) => None,
        })
        .collect();
    for bucket in buckets {
        if leases.contains_key(&bucket) {
            continue;
        }
        let ttl = (bucket * 1000)
            .saturating_sub(now_ms())
            .div_ceil(1000)
            .max(2) as i64;
        // Safe to repeat: a spare lease carries nothing and expires.
        let lease = session
            .retry(COMMIT_BUDGET, |mut client| async move {
                client.lease_grant(ttl, None).await
            })
            .await?;
        leases.insert(bucket, lease.id());
        granted.push((bucket, lease.id()));
    }
    Ok(())
}

fn record_put(session: &EtcdSession, id: &SlotId, record: &SlotRecord, lease: i64) -> TxnOp {
    TxnOp::put(
        format!("{}{}", slots_prefix(session, id.shard()), id.as_str()),
        serde_json::to_vec(record).unwrap_or_default(),
        Some(PutOptions::new().with_lease(lease)),
    )
}

fn op_of(session: &EtcdSession, write: &Write, leases: &HashMap<u64, i64>) -> TxnOp {
    let lease_for = |expire_ms: u64| leases.get(&bucket_of(expire_ms)).copied().unwrap_or(0);
    match write {
        Write::Put(slot) => {
            let record = SlotRecord {
                a: slot.key.account.clone(),
                r: slot.key.resource.clone(),
                q: slot.request_id.clone(),
                e: slot.expire_ms,
                f: slot.token,
                n: 0,
            };
            record_put(session, &slot.id, &record, lease_for(slot.expire_ms))
        }
        Write::Block(block) => {
            let record = SlotRecord {
                a: block.key.account.clone(),
                r: block.key.resource.clone(),
                q: String::new(),
                e: block.expire_ms,
                f: 0,
                n: block.count,
            };
            record_put(session, &block.id, &record, lease_for(block.expire_ms))
        }
        Write::Delete(shard, id) => TxnOp::delete(
            format!("{}{}", slots_prefix(session, *shard), id.as_str()),
            None,
        ),
    }
}

/// The commit marker of a shard: every slot txn of the shard compares its mod revision
/// with the one the owner last saw and rewrites it with the txn's nonce. So at most one
/// attempt of a txn ever applies, an attempt that lingered (in a stopped member's socket,
/// say) can never apply after a later write, and an attempt whose answer was lost is
/// recognised afterwards by its nonce (see the crate docs, "Retried commits").
pub fn marker_key(session: &EtcdSession, shard: u16) -> String {
    session.key(&format!("limiter/commits/{shard:02x}"))
}

/// What a slot txn of one shard is guarded by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ShardFence {
    pub shard: u16,
    /// Create revision of the ownership key when this replica claimed the shard.
    pub claim_revision: i64,
    /// Mod revision of the shard's commit marker after this replica's last txn (or as the
    /// claim read it; 0 when absent).
    pub mark: i64,
}

/// Why a fenced txn did not apply.
#[derive(Debug, thiserror::Error)]
pub(super) enum CommitError {
    /// A compare failed and the txn is not ours: the shard changed hands (or its marker
    /// moved, which only another owner does). Reload the shard.
    #[error("shard ownership changed")]
    Fenced,
    /// etcd could not be reached for the whole retry budget; the outcome is unknown.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
}

/// How long a slot txn is retried before its shards are reloaded: well past an etcd
/// election (about 1.5 s on loopback), within the replica lease's default 10 s TTL.
pub(super) const COMMIT_BUDGET: std::time::Duration = std::time::Duration::from_secs(8);

/// Commits `ops` if every shard of `fences` is still ours and unchanged since our last txn,
/// moving each shard's marker to `nonce`; retried through etcd faults (each attempt under
/// plumbing's attempt deadline, on the member preferred then). Answers the revision the
/// txn committed at. When an attempt's answer was lost and a later attempt finds the
/// markers moved, the failure branch's read says whether they carry our nonce — the lost
/// attempt applied — or not.
async fn fenced_txn(
    session: &EtcdSession,
    fences: &[ShardFence],
    ops: Vec<TxnOp>,
    nonce: &str,
) -> Result<i64, CommitError> {
    let mut compares = Vec::new();
    let mut reads = Vec::new();
    let mut ops = ops;
    for fence in fences {
        let (owner, marker) = (
            shard_key(session, fence.shard),
            marker_key(session, fence.shard),
        );
        compares.push(Compare::create_revision(
            owner.clone(),
            CompareOp::Equal,
            fence.claim_revision,
        ));
        compares.push(Compare::mod_revision(
            marker.clone(),
            CompareOp::Equal,
            fence.mark,
        ));
        ops.push(TxnOp::put(marker.clone(), nonce, None));
        reads.push(TxnOp::get(marker, None));
    }
    let txn = Txn::new().when(compares).and_then(ops).or_else(reads);
    let response = session
        .retry(COMMIT_BUDGET, |mut client| {
            let txn = txn.clone();
            async move { client.txn(txn).await }
        })
        .await?;
    let revision = response.header().map_or(0, |h| h.revision());
    if response.succeeded() {
        return Ok(revision);
    }
    // Ours if every marker carries our nonce (nonces are never reused): an earlier
    // attempt applied, at the markers' mod revision.
    let mut applied_at = None;
    for op in response.op_responses() {
        let TxnOpResponse::Get(get) = op else {
            return Err(CommitError::Fenced);
        };
        match get.kvs().first() {
            Some(kv) if kv.value() == nonce.as_bytes() => applied_at = Some(kv.mod_revision()),
            _ => return Err(CommitError::Fenced),
        }
    }
    applied_at.ok_or(CommitError::Fenced)
}

/// Grants missing bucket leases, then commits the batch fenced by `fences`.
pub(super) fn commit(
    session: EtcdSession,
    fences: Vec<ShardFence>,
    writes: Vec<Write>,
    known: HashMap<u64, i64>,
    nonce: String,
) -> BoxFuture<'static, CommitOutcome> {
    Box::pin(async move {
        let mut granted = Vec::new();
        let mut leases = known;
        if let Err(err) = grant_buckets(&session, &writes, &mut leases, &mut granted).await {
            return (writes, granted, Err(err.into()));
        }
        let ops = writes.iter().map(|w| op_of(&session, w, &leases)).collect();
        let result = fenced_txn(&session, &fences, ops, &nonce).await;
        (writes, granted, result)
    })
}

/// A planned handoff: writes every escrow slot of `shard` as an exact record, deletes its
/// blocks, and deletes the ownership key — in fenced txns of at most [`super::MAX_TXN_OPS`]
/// operations, the slots first, so that every prefix of the sequence that commits leaves
/// etcd counting at least every slot held (a block goes only after, or with, its slots).
/// Each txn is guarded and retried like a slot txn (`nonces` gives one per txn).
pub(super) async fn hand_off(
    session: EtcdSession,
    fence: ShardFence,
    slots: Vec<Slot>,
    blocks: Vec<SlotId>,
    known: HashMap<u64, i64>,
    mut nonces: impl FnMut() -> String + Send,
) -> (Vec<(u64, i64)>, Result<i64, CommitError>) {
    let mut granted = Vec::new();
    let mut leases = known;
    let shard = fence.shard;
    let mut writes: Vec<Write> = slots.into_iter().map(Write::Put).collect();
    writes.extend(blocks.into_iter().map(|id| Write::Delete(shard, id)));
    if let Err(err) = grant_buckets(&session, &writes, &mut leases, &mut granted).await {
        return (granted, Err(err.into()));
    }
    let mut ops: Vec<TxnOp> = writes.iter().map(|w| op_of(&session, w, &leases)).collect();
    ops.push(TxnOp::delete(shard_key(&session, shard), None));
    let mut fence = fence;
    let mut revision = 0;
    while !ops.is_empty() {
        // Room for the marker's put.
        let rest = ops.split_off(ops.len().min(super::MAX_TXN_OPS - 1));
        let batch = std::mem::replace(&mut ops, rest);
        match fenced_txn(&session, &[fence], batch, &nonces()).await {
            Ok(rev) => {
                revision = rev;
                fence.mark = rev;
            }
            Err(err) => return (granted, Err(err)),
        }
    }
    (granted, Ok(revision))
}

/// What a shard's records say: its exact slots and the blocks counted as fully held.
#[derive(Debug, Default)]
pub(super) struct ShardRecords {
    pub slots: Vec<Slot>,
    pub blocks: Vec<BlockRecord>,
}

pub(super) enum Fence {
    /// Claim the shard (it must be unowned), then read it.
    Claim {
        replica_id: String,
        address: String,
        lease: i64,
    },
    /// Read it if we still own it under this claim revision.
    Owned(i64),
}

/// A shard as read when claiming or reloading it: the claim revision, the commit
/// marker's mod revision (0: none yet), and its records.
pub(super) type LoadedShard = (i64, i64, ShardRecords);

/// Reads a shard's records (and its commit marker) in the same txn that claims it or
/// proves it is still ours. Ok(None): not ours. Retried through etcd faults: the read is
/// harmless to repeat, and a claim whose answer was lost is recognised on the next attempt
/// by the ownership key carrying our lease, and read again as ours.
pub(super) async fn load_shard(
    session: EtcdSession,
    shard: u16,
    fence: Fence,
) -> Result<Option<LoadedShard>, EtcdError> {
    let key = shard_key(&session, shard);
    let prefix = slots_prefix(&session, shard);
    let reads = [
        TxnOp::get(prefix.clone(), Some(GetOptions::new().with_prefix())),
        TxnOp::get(marker_key(&session, shard), None),
    ];
    let mut fence = fence;
    let response = loop {
        let txn = match &fence {
            Fence::Claim {
                replica_id,
                address,
                lease,
            } => {
                let owner =
                    serde_json::json!({ "replica_id": replica_id, "address": address }).to_string();
                let mut ops = vec![TxnOp::put(
                    key.clone(),
                    owner,
                    Some(PutOptions::new().with_lease(*lease)),
                )];
                ops.extend(reads.iter().cloned());
                Txn::new()
                    .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                    .and_then(ops)
                    .or_else([TxnOp::get(key.clone(), None)])
            }
            Fence::Owned(rev) => Txn::new()
                .when([Compare::create_revision(
                    key.clone(),
                    CompareOp::Equal,
                    *rev,
                )])
                .and_then(reads.clone()),
        };
        let response = session
            .retry(COMMIT_BUDGET, |mut client| {
                let txn = txn.clone();
                async move { client.txn(txn).await }
            })
            .await?;
        if response.succeeded() {
            break response;
        }
        // A claim that lost its answer and applied: the key is ours, with our lease.
        let ours = match &fence {
            Fence::Claim { lease, .. } => response.op_responses().iter().find_map(|op| match op {
                TxnOpResponse::Get(get) => get
                    .kvs()
                    .first()
                    .filter(|kv| kv.lease() == *lease)
                    .map(|kv| kv.create_revision()),
                _ => None,
            }),
            Fence::Owned(_) => None,
        };
        match ours {
            Some(rev) => fence = Fence::Owned(rev),
            None => return Ok(None),
        }
    };
    let claim_revision = match fence {
        Fence::Claim { .. } => response.header().map_or(0, |h| h.revision()),
        Fence::Owned(rev) => rev,
    };
    let mut records = ShardRecords::default();
    let marker = marker_key(&session, shard);
    let mut mark = 0;
    for op in response.op_responses() {
        if let TxnOpResponse::Get(get) = op {
            for kv in get.kvs() {
                if kv.key() == marker.as_bytes() {
                    mark = kv.mod_revision();
                    continue;
                }
                let Some(id) = kv
                    .key_str()
                    .ok()
                    .and_then(|k| k.strip_prefix(prefix.as_str()))
                else {
                    continue;
                };
                let (Ok(id), Ok(record)) = (
                    SlotId::parse("slot", id),
                    serde_json::from_slice::<SlotRecord>(kv.value()),
                ) else {
                    tracing::warn!(key = ?kv.key_str(), "ignoring unreadable slot record");
                    continue;
                };
                let key = SlotKey {
                    account: record.a,
                    resource: record.r,
                };
                if record.n > 0 {
                    records.blocks.push(BlockRecord {
                        id,
                        key,
                        count: record.n,
                        expire_ms: record.e,
                    });
                } else {
                    records.slots.push(Slot {
                        id,
                        key,
                        request_id: record.q,
                        expire_ms: record.e,
                        committed: true,
                        escrow: false,
                        token: record.f,
                    });
                }
            }
        }
    }
    Ok(Some((claim_revision, mark, records)))
}

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
pub(super) type CommitOutcome = (Vec<Write>, Vec<(u64, i64)>, Result<i64, EtcdError>);

/// Grants the bucket leases `writes` need that `leases` lacks; records them in `leases`
/// and `granted`.
async fn grant_buckets(
    session: &EtcdSession,
    writes: &[Write],
    leases: &mut HashMap<u64, i64>,
    granted: &mut Vec<(u64, i64)>,
) -> Result<(), EtcdError> {
    let mut client = session.client();
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
        let lease = session.bounded(client.lease_grant(ttl, None)).await?;
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

fn fences_of(session: &EtcdSession, fences: &[(u16, i64)]) -> Vec<Compare> {
    fences
        .iter()
        .map(|(shard, rev)| {
            Compare::create_revision(shard_key(session, *shard), CompareOp::Equal, *rev)
        })
        .collect()
}

async fn fenced_txn(
    session: &EtcdSession,
    fences: &[(u16, i64)],
    ops: Vec<TxnOp>,
) -> Result<i64, EtcdError> {
    let mut client = session.client();
    let txn = Txn::new().when(fences_of(session, fences)).and_then(ops);
    match session.bounded(client.txn(txn)).await {
        Ok(response) if response.succeeded() => Ok(response.header().map_or(0, |h| h.revision())),
        Ok(_) => Err(EtcdError::Unavailable("shard ownership changed".into())),
        Err(err) => Err(err),
    }
}

/// Grants missing bucket leases, then commits the batch fenced by `fences`.
pub(super) fn commit(
    session: EtcdSession,
    fences: Vec<(u16, i64)>,
    writes: Vec<Write>,
    known: HashMap<u64, i64>,
) -> BoxFuture<'static, CommitOutcome> {
    Box::pin(async move {
        let mut granted = Vec::new();
        let mut leases = known;
        if let Err(err) = grant_buckets(&session, &writes, &mut leases, &mut granted).await {
            return (writes, granted, Err(err));
        }
        let ops = writes.iter().map(|w| op_of(&session, w, &leases)).collect();
        let result = fenced_txn(&session, &fences, ops).await;
        (writes, granted, result)
    })
}

/// A planned handoff: writes every escrow slot of `shard` as an exact record, deletes its
/// blocks, and deletes the ownership key — in fenced txns of at most [`super::MAX_TXN_OPS`]
/// operations, the slots first, so that every prefix of the sequence that commits leaves
/// etcd counting at least every slot held (a block goes only after, or with, its slots).
pub(super) async fn hand_off(
    session: EtcdSession,
    shard: u16,
    claim_revision: i64,
    slots: Vec<Slot>,
    blocks: Vec<SlotId>,
    known: HashMap<u64, i64>,
) -> (Vec<(u64, i64)>, Result<i64, EtcdError>) {
    let mut granted = Vec::new();
    let mut leases = known;
    let fences = [(shard, claim_revision)];
    let mut writes: Vec<Write> = slots.into_iter().map(Write::Put).collect();
    writes.extend(blocks.into_iter().map(|id| Write::Delete(shard, id)));
    if let Err(err) = grant_buckets(&session, &writes, &mut leases, &mut granted).await {
        return (granted, Err(err));
    }
    let mut ops: Vec<TxnOp> = writes.iter().map(|w| op_of(&session, w, &leases)).collect();
    ops.push(TxnOp::delete(shard_key(&session, shard), None));
    let mut revision = 0;
    while !ops.is_empty() {
        let rest = ops.split_off(ops.len().min(super::MAX_TXN_OPS));
        match fenced_txn(&session, &fences, std::mem::replace(&mut ops, rest)).await {
            Ok(rev) => revision = rev,
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

/// Reads a shard's records in the same txn that claims it or proves it is still ours.
/// Ok(None): not ours.
pub(super) async fn load_shard(
    session: EtcdSession,
    shard: u16,
    fence: Fence,
) -> Result<Option<(i64, ShardRecords)>, EtcdError> {
    let key = shard_key(&session, shard);
    let prefix = slots_prefix(&session, shard);
    let read = TxnOp::get(prefix.clone(), Some(GetOptions::new().with_prefix()));
    let txn = match &fence {
        Fence::Claim {
            replica_id,
            address,
            lease,
        } => {
            let owner =
                serde_json::json!({ "replica_id": replica_id, "address": address }).to_string();
            Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([
                    TxnOp::put(
                        key.clone(),
                        owner,
                        Some(PutOptions::new().with_lease(*lease)),
                    ),
                    read,
                ])
        }
        Fence::Owned(rev) => Txn::new()
            .when([Compare::create_revision(
                key.clone(),
                CompareOp::Equal,
                *rev,
            )])
            .and_then([read]),
    };
    let mut client = session.client();
    let response = session.bounded(client.txn(txn)).await?;
    if !response.succeeded() {
        return Ok(None);
    }
    let claim_revision = match fence {
        Fence::Claim { .. } => response.header().map_or(0, |h| h.revision()),
        Fence::Owned(rev) => rev,
    };
    let mut records = ShardRecords::default();
    for op in response.op_responses() {
        if let TxnOpResponse::Get(get) = op {
            for kv in get.kvs() {
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
    Ok(Some((claim_revision, records)))
}

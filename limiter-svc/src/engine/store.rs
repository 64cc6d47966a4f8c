//! The etcd side of the engine: slot records, group-committed fenced txns, bucket leases,
//! and reading a shard back in the txn that claims it.

use std::collections::{HashMap, HashSet};

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse};
use futures::future::BoxFuture;
use plumbing::etcd::{EtcdError, EtcdSession};

use crate::model::{SlotId, SlotKey, now_ms};
use crate::table::Slot;

/// A slot record as stored in etcd.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct SlotRecord {
    a: String,
    r: String,
    #[serde(default)]
    q: String,
    e: u64,
}

#[derive(Debug)]
pub(super) enum Write {
    Put(Slot),
    Delete(u16, SlotId),
}

impl Write {
    pub(super) fn id(&self) -> &SlotId {
        match self {
            Write::Put(slot) => &slot.id,
            Write::Delete(_, id) => id,
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

pub(super) type CommitOutcome = (Vec<Write>, Vec<(u64, i64)>, Result<(), EtcdError>);

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
        let mut client = session.client();
        let buckets: HashSet<u64> = writes
            .iter()
            .filter_map(|w| {
                if let Write::Put(s) = w {
                    Some(bucket_of(s.expire_ms))
                } else {
                    None
                }
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
            match session.bounded(client.lease_grant(ttl, None)).await {
                Ok(lease) => {
                    leases.insert(bucket, lease.id());
                    granted.push((bucket, lease.id()));
                }
                Err(err) => return (writes, granted, Err(err)),
            }
        }
        let compares: Vec<Compare> = fences
            .iter()
            .map(|(shard, rev)| {
                Compare::create_revision(shard_key(&session, *shard), CompareOp::Equal, *rev)
            })
            .collect();
        let ops: Vec<TxnOp> = writes
            .iter()
            .map(|write| match write {
                Write::Put(slot) => {
                    let record = SlotRecord {
                        a: slot.key.account.clone(),
                        r: slot.key.resource.clone(),
                        q: slot.request_id.clone(),
                        e: slot.expire_ms,
                    };
                    let lease = leases.get(&bucket_of(slot.expire_ms)).copied().unwrap_or(0);
                    TxnOp::put(
                        format!(
                            "{}{}",
                            slots_prefix(&session, slot.id.shard()),
                            slot.id.as_str()
                        ),
                        serde_json::to_vec(&record).unwrap_or_default(),
                        Some(PutOptions::new().with_lease(lease)),
                    )
                }
                Write::Delete(shard, id) => TxnOp::delete(
                    format!("{}{}", slots_prefix(&session, *shard), id.as_str()),
                    None,
                ),
            })
            .collect();
        let txn = Txn::new().when(compares).and_then(ops);
        let result = match session.bounded(client.txn(txn)).await {
            Ok(response) if response.succeeded() => Ok(()),
            Ok(_) => Err(EtcdError::Unavailable("shard ownership changed".into())),
            Err(err) => Err(err),
        };
        (writes, granted, result)
    })
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

/// Reads a shard's slots in the same txn that claims it or proves it is still ours. Ok(None):
/// not ours.
pub(super) async fn load_shard(
    session: EtcdSession,
    shard: u16,
    fence: Fence,
) -> Result<Option<(i64, Vec<Slot>)>, EtcdError> {
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
    let mut slots = Vec::new();
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
                slots.push(Slot {
                    id,
                    key: SlotKey {
                        account: record.a,
                        resource: record.r,
                    },
                    request_id: record.q,
                    expire_ms: record.e,
                    committed: true,
                });
            }
        }
    }
    Ok(Some((claim_revision, slots)))
}

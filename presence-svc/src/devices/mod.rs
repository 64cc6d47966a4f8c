//! [`DeviceStore`]: every etcd write presence makes, and what each costs.
//!
//! | operation | etcd writes |
//! |---|---|
//! | Register (new device) | lease grant + 1 txn |
//! | Register (existing registration) | + revoke of the old lease (in the background) |
//! | Heartbeat | none: a lease keep-alive (leader memory, not raft) |
//! | UpdateStatus / Connect `status` | 1 txn (none when nothing changes) |
//! | Unregister | 1 txn (note + delete) + lease revoke (in the background) |
//! | Connect `hello` | 1 txn under the replica lease |
//! | stream end | 1 txn (note + delete); none at replica shutdown (the lease revoke removes all) |
//!
//! Every "txn" above is a nested txn in [`GroupCommit`]: concurrent writes of a replica share
//! one etcd txn, so a storm of hellos or hang-ups costs one raft entry per batch of up to
//! 128. Lease grants and revokes are separate requests.
//!
//! Every write that depends on an identity's devices (the device limit) is guarded by
//! "nothing in the identity's range changed after the revision I decided on", so two
//! replicas can never both admit an identity's eleventh device. The first decision uses the
//! cache; a failed compare re-reads the identity from etcd and decides again. etcd evaluates
//! every compare of a batched txn before applying any of it, so two admissions of one
//! identity never share a batch (each names the identity's range among its keys): the
//! second is decided again after the first is visible. The per-account cap is in
//! [`account`].

use std::collections::BTreeMap;
use std::sync::Arc;

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp};
use plumbing::etcd::{EtcdError, EtcdSession};
use proto::presence::v1 as pb;

use crate::cache::{IdentityView, PresenceCache};
use crate::commit::{CommitError, Committed, GroupCommit};
use crate::error::Error;
use crate::notes::LeaveNotes;
use crate::record::{
    DeviceKey, DeviceRecord, DeviceStatus, Kind, Layout, LeaveNote, LeaveReason, StoredDevice,
};

mod account;
mod registration;

/// Attempts of a compare-guarded write before giving up with ABORTED.
const ATTEMPTS: usize = 5;

/// What happens when a new device would exceed the per-identity limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OverflowPolicy {
    /// Refuse the new device (RESOURCE_EXHAUSTED).
    RejectNewest,
    /// Remove the identity's oldest device(s) to make room (their streams end with ABORTED).
    EvictOldest,
}

/// The per-identity and per-account device limits.
#[derive(Debug, Clone, Copy)]
pub struct DeviceLimit {
    /// Most devices per identity.
    pub max: usize,
    /// What to do beyond it.
    pub overflow: OverflowPolicy,
    /// Most devices per account (beyond it new devices are refused, whatever `overflow`).
    pub max_per_account: usize,
}

/// A device record as written, for the response.
#[derive(Debug, Clone)]
pub struct Written {
    /// The device as stored.
    pub device: pb::Device,
    /// The write's revision.
    pub revision: i64,
}

/// A device to admit and its new record (whose `kind` says Register or Connect).
#[derive(Debug, Clone)]
pub struct Admission {
    /// Which device.
    pub key: DeviceKey,
    /// Its new record.
    pub record: DeviceRecord,
}

/// Writes device records to etcd.
#[derive(Debug, Clone)]
pub struct DeviceStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    session: EtcdSession,
    layout: Layout,
    cache: PresenceCache,
    writer: GroupCommit,
    notes: LeaveNotes,
    limit: DeviceLimit,
    places: Arc<account::AccountPlaces>,
}

impl DeviceStore {
    /// A store writing under `layout`, deciding with `cache` first.
    pub fn new(
        session: EtcdSession,
        layout: Layout,
        cache: PresenceCache,
        limit: DeviceLimit,
        txn: plumbing::metrics::TxnStats,
    ) -> Self {
        let writer = GroupCommit::start(session.clone(), txn);
        let notes = LeaveNotes::new(session.clone(), writer.clone());
        Self {
            inner: Arc::new(Inner {
                session,
                layout,
                cache,
                writer,
                notes,
                limit,
                places: Arc::default(),
            }),
        }
    }

    /// Whether etcd still has lease `lease` (a record that vanished while its lease lives
    /// was removed by someone, not by the lease's end). Unknown (etcd unreachable) counts
    /// as gone: the caller then waits for a new lease, which only a lost one brings.
    pub async fn lease_alive(&self, lease: i64) -> bool {
        let session = &self.inner.session;
        let answer = session
            .retry(plumbing::etcd::CALL_DEADLINE, |mut client| async move {
                client.lease_time_to_live(lease, None).await
            })
            .await;
        answer.is_ok_and(|live| live.ttl() > 0)
    }

    /// The cache the store decides with.
    pub fn cache(&self) -> &PresenceCache {
        &self.inner.cache
    }

    /// Puts a stream session's record (under the replica lease in `record`), replacing
    /// whatever holds the device.
    pub async fn open_stream(&self, admission: Admission) -> Result<Written, Error> {
        let key = &admission.key;
        let view = self.cache().identity_view(&key.account, &key.identity);
        let (written, replaced) = self.admit(admission, view).await?;
        if let Some(old) = replaced
            && old.record.kind == Kind::Registration
        {
            self.revoke_later(old.record.lease);
        }
        Ok(written)
    }

    /// Removes a stream session's record, unless another replica's session has replaced it
    /// (the record is then under another lease). Same-replica replacement is the caller's
    /// to exclude.
    pub async fn close_stream(&self, key: &DeviceKey, replica_lease: i64) -> Result<(), Error> {
        let layout = &self.inner.layout;
        let device_key = layout.device(key);
        self.inner
            .notes
            .commit(
                |note_lease| {
                    Txn::new()
                        .when([Compare::lease(
                            device_key.clone(),
                            CompareOp::Equal,
                            replica_lease,
                        )])
                        .and_then([
                            note(layout, key, LeaveReason::Disconnected, note_lease),
                            TxnOp::delete(device_key.clone(), None),
                        ])
                },
                vec![device_key.clone(), layout.note(key)],
            )
            .await?;
        Ok(())
    }

    /// Changes a device's status and/or attributes (`None`: unchanged). A registration's
    /// lease is kept alive too: the device has just proven it is there. With `session`, only
    /// while that stream session still holds the device.
    pub async fn update(
        &self,
        key: &DeviceKey,
        status: Option<DeviceStatus>,
        attributes: Option<BTreeMap<String, String>>,
        session: Option<&str>,
    ) -> Result<Written, Error> {
        for attempt in 0..ATTEMPTS {
            let current = self.find(key, attempt > 0).await?;
            if session.is_some_and(|id| id != current.record.session) {
                return Err(Error::Displaced(
                    "the device's record now belongs to another session",
                ));
            }
            let mut record = current.record.clone();
            record.status = status.unwrap_or(record.status);
            record.attributes = attributes.clone().unwrap_or(record.attributes);
            if record == current.record {
                return Ok(Written {
                    device: current.to_device(),
                    revision: current.mod_revision,
                });
            }
            if record.kind == Kind::Registration {
                record.expire_time_ms = Some(self.keep_alive(&current).await?);
            }
            let txn = Txn::new()
                .when([Compare::mod_revision(
                    self.inner.layout.device(key),
                    CompareOp::Equal,
                    current.mod_revision,
                )])
                .and_then([put(&self.inner.layout, key, &record)]);
            let committed = match self.write(txn, vec![self.inner.layout.device(key)]).await {
                // The registration's lease expired since it was read.
                Err(CommitError::LeaseNotFound) => return Err(not_found(key)),
                other => other.map_err(unavailable)?,
            };
            if committed.succeeded {
                let revision = committed.revision;
                return Ok(Written {
                    device: record.to_device(key, revision),
                    revision,
                });
            }
        }
        Err(Error::Contention {
            identity: key.identity.clone(),
        })
    }

    /// Writes `admission` if the identity's devices allow it, evicting for room when so
    /// configured; also the record it replaced.
    async fn admit(
        &self,
        admission: Admission,
        mut view: IdentityView,
    ) -> Result<(Written, Option<StoredDevice>), Error> {
        let Admission { key, record } = admission;
        let layout = &self.inner.layout;
        let evicts = !self.victims(&view, &key, record.kind)?.is_empty();
        let place = self.reserve_account_place(&view, &key, evicts)?;
        for _ in 0..ATTEMPTS {
            let victims = self.victims(&view, &key, record.kind)?;
            let unchanged = Compare::mod_revision(
                layout.identity_prefix(&key.account, &key.identity),
                CompareOp::Less,
                view.revision + 1,
            )
            .with_prefix();
            let write = put(layout, &key, &record);
            // The identity's range is not a key written, only what keeps two admissions of
            // the identity out of one batch.
            let mut keys = vec![
                layout.device(&key),
                layout.identity_prefix(&key.account, &key.identity),
            ];
            let committed = if victims.is_empty() {
                let txn = Txn::new().when([unchanged]).and_then([write]);
                self.write(txn, keys).await.map_err(unavailable)?
            } else {
                for victim in &victims {
                    keys.push(layout.device(&victim.key));
                    keys.push(layout.note(&victim.key));
                }
                let build = |note_lease| {
                    let mut ops = vec![write.clone()];
                    for victim in &victims {
                        ops.push(note(layout, &victim.key, LeaveReason::Evicted, note_lease));
                        ops.push(TxnOp::delete(layout.device(&victim.key), None));
                    }
                    Txn::new().when([unchanged.clone()]).and_then(ops)
                };
                self.inner.notes.commit(build, keys).await?
            };
            if committed.succeeded {
                for victim in &victims {
                    tracing::info!(identity = %key.identity, evicted = %victim.key.device_id, "device evicted by the device limit");
                }
                let revision = committed.revision;
                self.release_when_cached(place, revision);
                let written = Written {
                    device: record.to_device(&key, revision),
                    revision,
                };
                return Ok((written, view.device(&key.device_id).cloned()));
            }
            view = self.read_identity(&key).await?;
        }
        Err(Error::Contention {
            identity: key.identity,
        })
    }

    /// The devices to evict so that `key` fits, or why it cannot.
    fn victims(
        &self,
        view: &IdentityView,
        key: &DeviceKey,
        kind: Kind,
    ) -> Result<Vec<StoredDevice>, Error> {
        if let Some(existing) = view.device(&key.device_id) {
            if kind == Kind::Registration && existing.record.kind == Kind::Stream {
                return Err(held_by_stream(
                    key,
                    "close the stream first, or register another device_id",
                ));
            }
            return Ok(Vec::new());
        }
        let limit = self.inner.limit;
        if view.devices.len() < limit.max {
            return Ok(Vec::new());
        }
        match limit.overflow {
            OverflowPolicy::RejectNewest => Err(Error::DeviceLimit {
                identity: key.identity.clone(),
                limit: limit.max,
            }),
            OverflowPolicy::EvictOldest => {
                let mut oldest = view.devices.clone();
                oldest.sort_by_key(|d| d.create_revision);
                oldest.truncate(view.devices.len() + 1 - limit.max);
                Ok(oldest)
            }
        }
    }

    /// A device's record: from the cache unless `fresh`, and from etcd when the cache does
    /// not have it (it may just not have seen a write made through another replica).
    async fn find(&self, key: &DeviceKey, fresh: bool) -> Result<StoredDevice, Error> {
        if !fresh && let Some(device) = self.cache().device(key) {
            return Ok(device);
        }
        let mut client = self.inner.session.client();
        let response = self
            .inner
            .session
            .bounded(client.get(self.inner.layout.device(key), None))
            .await?;
        response
            .kvs()
            .first()
            .and_then(|kv| StoredDevice::from_kv(&self.inner.layout, kv))
            .ok_or_else(|| not_found(key))
    }

    /// An identity's devices, read from etcd.
    async fn read_identity(&self, key: &DeviceKey) -> Result<IdentityView, Error> {
        let mut client = self.inner.session.client();
        let prefix = self
            .inner
            .layout
            .identity_prefix(&key.account, &key.identity);
        let response = self
            .inner
            .session
            .bounded(client.get(prefix, Some(GetOptions::new().with_prefix())))
            .await?;
        Ok(IdentityView {
            revision: response.header().map_or(0, |h| h.revision()),
            devices: response
                .kvs()
                .iter()
                .filter_map(|kv| StoredDevice::from_kv(&self.inner.layout, kv))
                .collect(),
        })
    }

    async fn write(&self, txn: Txn, keys: Vec<String>) -> Result<Committed, CommitError> {
        self.inner.writer.commit(txn, keys).await
    }
}

fn put(layout: &Layout, key: &DeviceKey, record: &DeviceRecord) -> TxnOp {
    TxnOp::put(
        layout.device(key),
        record.encode(),
        Some(PutOptions::new().with_lease(record.lease)),
    )
}

fn note(layout: &Layout, key: &DeviceKey, reason: LeaveReason, lease: i64) -> TxnOp {
    TxnOp::put(
        layout.note(key),
        LeaveNote { reason }.encode(),
        Some(PutOptions::new().with_lease(lease)),
    )
}

fn unavailable(err: CommitError) -> Error {
    EtcdError::Unavailable(err.to_string()).into()
}

fn not_found(key: &DeviceKey) -> Error {
    Error::DeviceNotFound {
        identity: key.identity.clone(),
        device_id: key.device_id.clone(),
    }
}

fn held_by_stream(key: &DeviceKey, hint: &'static str) -> Error {
    Error::HeldByStream {
        identity: key.identity.clone(),
        device_id: key.device_id.clone(),
        hint,
    }
}

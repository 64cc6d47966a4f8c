//! [`PresenceCache`]: every device record of every account, kept current by one etcd watch
//! (a [`Mirror`] over `<prefix>/presence/`). All reads are answered from it; writes use it
//! as their first guess of an identity's devices and let an etcd compare catch staleness.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::Duration;

use plumbing::etcd::{EtcdSession, Mirror, MirrorUpdate};
use prost::Message;
use proto::presence::v1 as pb;

use crate::error::Error;
use crate::record::{DeviceKey, Kind, Layout, LeaveNote, LeaveReason, ParsedKey, StoredDevice};

/// How long a read with `min_revision` waits for the cache.
pub const MIN_REVISION_WAIT: Duration = Duration::from_secs(5);
/// Leave notes remembered until their deletion arrives (they come in the same revision, so
/// this only bounds memory if one never does).
const PENDING_NOTES_MAX: usize = 1024;

/// Who wants to hear about changes to device records: the live sessions of this replica,
/// which end when their record is replaced or removed by someone else.
pub trait RecordObserver: Send + Sync + 'static {
    /// A device record changed (or, after a resnapshot, may have).
    fn changed(&self, change: RecordChange<'_>);
    /// The keys [`RecordObserver::changed`] matters for, rechecked after a resnapshot.
    fn watched_keys(&self) -> Vec<DeviceKey>;
}

/// One change seen by a [`RecordObserver`].
#[derive(Debug)]
pub struct RecordChange<'a> {
    /// The device.
    pub key: &'a DeviceKey,
    /// The mod revision of the record the change concerns (for a deletion, of the deleted
    /// record; after a resnapshot without the record, the snapshot's revision).
    pub revision: i64,
    /// The stream session now holding the device; `None` when it is gone or registered.
    pub session: Option<&'a str>,
    /// Why it left, when it left with a note.
    pub left: Option<LeaveReason>,
    /// The lease of the record (for a deletion, of the deleted record; 0 when unknown).
    pub lease: i64,
}

/// An identity's devices by device id. Boxed: a BTreeMap leaf reserves room for 11
/// entries, and most identities have one device, so unboxed records (about 220 B each) made
/// every identity cost a 2.7 KiB node.
type Devices = BTreeMap<String, Box<StoredDevice>>;

type Identities = BTreeMap<String, Devices>;

#[derive(Debug, Default)]
struct Store {
    accounts: HashMap<String, Identities>,
    /// Devices per account, kept with `accounts` so the account device cap costs no scan.
    counts: HashMap<String, usize>,
}

impl Store {
    fn insert(&mut self, device: StoredDevice) {
        let account = device.key.account.clone();
        let replaced = self
            .accounts
            .entry(account.clone())
            .or_default()
            .entry(device.key.identity.clone())
            .or_default()
            .insert(device.key.device_id.clone(), Box::new(device));
        if replaced.is_none() {
            *self.counts.entry(account).or_default() += 1;
        }
    }

    fn remove(&mut self, key: &DeviceKey) {
        let Some(identities) = self.accounts.get_mut(&key.account) else {
            return;
        };
        if let Some(devices) = identities.get_mut(&key.identity) {
            if devices.remove(&key.device_id).is_some()
                && let Some(count) = self.counts.get_mut(&key.account)
            {
                *count = count.saturating_sub(1);
            }
            if devices.is_empty() {
                identities.remove(&key.identity);
            }
        }
        if identities.is_empty() {
            self.accounts.remove(&key.account);
            self.counts.remove(&key.account);
        }
    }

    fn devices(&self, account: &str, identity: &str) -> Option<&Devices> {
        self.accounts.get(account)?.get(identity)
    }

    fn get(&self, key: &DeviceKey) -> Option<&StoredDevice> {
        self.devices(&key.account, &key.identity)?
            .get(&key.device_id)
            .map(|device| &**device)
    }
}

/// An identity's devices as of a revision: what a write decides on.
#[derive(Debug, Clone, Default)]
pub struct IdentityView {
    /// Every change to the identity up to this revision is reflected.
    pub revision: i64,
    /// The devices.
    pub devices: Vec<StoredDevice>,
}

impl IdentityView {
    /// The device with this id.
    pub fn device(&self, device_id: &str) -> Option<&StoredDevice> {
        self.devices.iter().find(|d| d.key.device_id == device_id)
    }
}

/// The watch-fed copy of all presence records.
#[derive(Debug, Clone)]
pub struct PresenceCache {
    store: Arc<RwLock<Store>>,
    mirror: Arc<Mirror>,
}

impl PresenceCache {
    /// Starts mirroring `layout`'s root, telling `observer` about every record change.
    pub fn start(session: &EtcdSession, layout: Layout, observer: Arc<dyn RecordObserver>) -> Self {
        let store: Arc<RwLock<Store>> = Arc::default();
        let target = store.clone();
        let mut notes: HashMap<DeviceKey, LeaveReason> = HashMap::new();
        let root = layout.root().to_owned();
        let mirror = Mirror::start(session, root, move |update| {
            apply(&target, &layout, observer.as_ref(), &mut notes, update);
        });
        Self {
            store,
            mirror: Arc::new(mirror),
        }
    }

    /// Devices present in every account (registrations and streams, on every replica).
    pub fn device_count(&self) -> usize {
        let store = self.store.read().unwrap_or_else(PoisonError::into_inner);
        store
            .accounts
            .values()
            .flat_map(|identities| identities.values())
            .map(BTreeMap::len)
            .sum()
    }

    /// Devices present in `account` (registrations and streams, on every replica).
    pub fn account_device_count(&self, account: &str) -> usize {
        let store = self.store.read().unwrap_or_else(PoisonError::into_inner);
        store.counts.get(account).copied().unwrap_or(0)
    }

    /// The revision the cache reflects (0 before the first snapshot).
    pub fn revision(&self) -> i64 {
        self.mirror.revision()
    }

    /// Waits until the cache reflects `min_revision` (0: no wait); the revision it is at.
    pub async fn caught_up(&self, min_revision: i64) -> Result<i64, Error> {
        if min_revision > 0
            && self.revision() < min_revision
            && !self.mirror.wait_for(min_revision, MIN_REVISION_WAIT).await
        {
            return Err(Error::NotCaughtUp {
                wanted: min_revision,
                current: self.revision(),
            });
        }
        Ok(self.revision())
    }

    /// The presence of one identity (offline with no devices when it has none).
    pub fn presence(&self, account: &str, identity: &str) -> pb::IdentityPresence {
        let store = self.store.read().unwrap_or_else(PoisonError::into_inner);
        identity_presence(account, identity, store.devices(account, identity))
    }

    /// One page of an account's present identities with aggregate status `filter`
    /// (unspecified: any), after identity `after`, at most `limit` identities and about
    /// `max_bytes` encoded. Also the identity to continue after, if there are more.
    pub fn list(
        &self,
        account: &str,
        filter: pb::Status,
        after: Option<&str>,
        limit: usize,
        max_bytes: usize,
    ) -> (Vec<pb::IdentityPresence>, Option<String>) {
        let store = self.store.read().unwrap_or_else(PoisonError::into_inner);
        let Some(identities) = store.accounts.get(account) else {
            return (Vec::new(), None);
        };
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut page = Vec::new();
        let mut bytes = 0;
        for (identity, devices) in identities.range::<str, _>((start, Bound::Unbounded)) {
            let presence = identity_presence(account, identity, Some(devices));
            if filter != pb::Status::Unspecified && presence.status != filter as i32 {
                continue;
            }
            let size = presence.encoded_len();
            if page.len() == limit || (!page.is_empty() && bytes + size > max_bytes) {
                let next = page
                    .last()
                    .map(|p: &pb::IdentityPresence| p.identity.clone());
                return (page, next);
            }
            bytes += size;
            page.push(presence);
        }
        (page, None)
    }

    /// The record of one device.
    pub fn device(&self, key: &DeviceKey) -> Option<StoredDevice> {
        let store = self.store.read().unwrap_or_else(PoisonError::into_inner);
        store.get(key).cloned()
    }

    /// An identity's devices and a revision they reflect at least.
    pub fn identity_view(&self, account: &str, identity: &str) -> IdentityView {
        // The revision is read first: the devices then reflect at least that revision, and
        // anything newer makes the writer's compare fail, never pass wrongly.
        let revision = self.revision();
        let store = self.store.read().unwrap_or_else(PoisonError::into_inner);
        IdentityView {
            revision,
            devices: store
                .devices(account, identity)
                .map(|d| d.values().map(|device| (**device).clone()).collect())
                .unwrap_or_default(),
        }
    }
}

/// The aggregate presence of an identity from its devices.
pub fn identity_presence(
    account: &str,
    identity: &str,
    devices: Option<&Devices>,
) -> pb::IdentityPresence {
    let devices: Vec<&StoredDevice> = devices
        .map(|d| d.values().map(|device| &**device).collect())
        .unwrap_or_default();
    let status = devices
        .iter()
        .map(|d| d.record.status)
        .max_by_key(|s| s.rank())
        .map_or(pb::Status::Offline, |s| s.to_pb());
    pb::IdentityPresence {
        identity: identity.to_owned(),
        account_id: account.to_owned(),
        status: status as i32,
        devices: devices.into_iter().map(StoredDevice::to_device).collect(),
    }
}

fn apply(
    store: &RwLock<Store>,
    layout: &Layout,
    observer: &dyn RecordObserver,
    notes: &mut HashMap<DeviceKey, LeaveReason>,
    update: MirrorUpdate,
) {
    match update {
        MirrorUpdate::Reset { kvs, revision } => {
            let mut fresh = Store::default();
            for device in kvs
                .iter()
                .filter_map(|kv| StoredDevice::from_kv(layout, kv))
            {
                fresh.insert(device);
            }
            notes.clear();
            let keys = observer.watched_keys();
            let holders: Vec<(i64, Option<String>, i64)> = keys
                .iter()
                .map(|key| {
                    let record = fresh.get(key);
                    let revision = record.map_or(revision, |d| d.mod_revision);
                    (
                        revision,
                        record.and_then(stream_session).map(str::to_owned),
                        record.map_or(0, |d| d.record.lease),
                    )
                })
                .collect();
            *store.write().unwrap_or_else(PoisonError::into_inner) = fresh;
            for (key, (revision, session, lease)) in keys.iter().zip(holders) {
                observer.changed(RecordChange {
                    key,
                    revision,
                    session: session.as_deref(),
                    left: None,
                    lease,
                });
            }
        }
        MirrorUpdate::Put(kv) => match layout.parse(kv.key()) {
            Some(ParsedKey::Device(_)) => {
                let Some(device) = StoredDevice::from_kv(layout, &kv) else {
                    return;
                };
                let (key, revision, lease) =
                    (device.key.clone(), device.mod_revision, device.record.lease);
                let session = stream_session(&device).map(str::to_owned);
                store
                    .write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(device);
                observer.changed(RecordChange {
                    key: &key,
                    revision,
                    session: session.as_deref(),
                    left: None,
                    lease,
                });
            }
            Some(ParsedKey::Note(key)) => {
                if notes.len() >= PENDING_NOTES_MAX {
                    notes.clear();
                }
                if let Some(reason) = LeaveNote::reason_of(kv.value()) {
                    notes.insert(key, reason);
                }
            }
            None => {}
        },
        MirrorUpdate::Delete(kv) => {
            if let Some(ParsedKey::Device(key)) = layout.parse(kv.key()) {
                store
                    .write()
                    .unwrap_or_else(PoisonError::into_inner)
                    .remove(&key);
                let left = notes.remove(&key);
                observer.changed(RecordChange {
                    key: &key,
                    // The deleted record when etcd still had it, else the deletion itself.
                    revision: kv.mod_revision(),
                    session: None,
                    left,
                    lease: kv.lease(),
                });
            }
        }
    }
}

fn stream_session(device: &StoredDevice) -> Option<&str> {
    (device.record.kind == Kind::Stream).then_some(device.record.session.as_str())
}

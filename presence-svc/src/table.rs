//! [`SessionTable`]: the live Connect sessions this replica holds, how other code reaches
//! one ([`SessionHandle`], [`Command`]) and hears back about an offer ([`LegEvent`]).
//!
//! A session is displaced when its device record is replaced (a newer Connect of the same
//! device, here or on another replica) or removed by someone else (eviction by the device
//! limit): the table hears of it from the cache's watch and the session ends with ABORTED.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};

use proto::presence::v1 as pb;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::cache::{RecordChange, RecordObserver};
use crate::record::{DeviceKey, LeaveReason};

/// Commands a session accepts (capacity of its queue).
const COMMANDS: usize = 8;
/// Stripes of the per-device write lock.
const STRIPES: usize = 256;

/// Why a session lost its device record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Displacement {
    /// A newer Connect of the same device took it over.
    Replaced,
    /// The device limit evicted it for a newer device.
    Evicted,
    /// Its record was removed or overwritten by something else.
    Removed,
}

impl Displacement {
    /// The message the client sees with ABORTED.
    pub fn message(self) -> &'static str {
        match self {
            Displacement::Replaced => "a newer Connect of this device replaced this one",
            Displacement::Evicted => {
                "the device was evicted to make room for a newer device of its identity"
            }
            Displacement::Removed => "the device's presence record was removed",
        }
    }

    /// How watchers saw the device leave.
    pub fn leave_reason(self) -> pb::LeaveReason {
        match self {
            Displacement::Replaced => pb::LeaveReason::Unspecified,
            Displacement::Evicted => pb::LeaveReason::Evicted,
            Displacement::Removed => pb::LeaveReason::Unspecified,
        }
    }
}

/// What the relay asks of a session.
#[derive(Debug)]
pub enum Command {
    /// Push this offer to the device and report on `events`.
    Offer {
        /// The offer, as the device will see it.
        offer: Box<pb::ConnectOffer>,
        /// Where the leg's events go.
        events: mpsc::Sender<LegEvent>,
    },
    /// Withdraw an offer.
    Cancel {
        /// Which.
        offer_id: String,
        /// Why (passed to the device).
        reason: pb::CancelReason,
    },
    /// End the communication of an offer (a cancel if it was never accepted).
    End {
        /// Which.
        offer_id: String,
        /// Why (passed to the device).
        reason: pb::EndReason,
    },
}

/// What a session reports about one offer.
#[derive(Debug)]
pub enum LegEvent {
    /// The offer is on the device's stream.
    Delivered(Box<pb::Device>),
    /// The session already has an open offer with this id.
    Duplicate,
    /// The device answered.
    Answered {
        /// Accepted?
        accept: bool,
        /// Why not.
        reason: pb::RejectReason,
        /// Where a rejection applies.
        scope: pb::DeclineScope,
    },
    /// The device says it is alerting its user.
    Ringing,
    /// The device hung up the accepted communication.
    Hangup,
    /// The session ended.
    Gone(pb::LeaveReason),
}

/// A way to reach one live session.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    /// The session id (also in its device record).
    pub id: Arc<str>,
    commands: mpsc::Sender<Box<Command>>,
    state: Arc<HandleState>,
}

#[derive(Debug, Default)]
struct HandleState {
    /// Revision of the session's own record write; 0 while it is being written.
    established: AtomicI64,
    displaced: CancellationToken,
    why: OnceLock<Displacement>,
    /// The lease the session's record is under.
    lease: AtomicI64,
    /// Set when the record vanished with its lease (expired or revoked behind the
    /// replica's back) rather than being removed by anyone.
    orphaned: tokio::sync::Notify,
}

impl SessionHandle {
    /// A handle and the queue its session reads commands from.
    pub fn new(id: String) -> (Self, mpsc::Receiver<Box<Command>>) {
        let (commands, queue) = mpsc::channel(COMMANDS);
        let handle = Self {
            id: id.into(),
            commands,
            state: Arc::default(),
        };
        (handle, queue)
    }

    /// Queues a command; gives it back if the session has ended. (Commands are boxed so
    /// that each idle session's queue stays small.)
    pub async fn send(&self, command: Command) -> Result<(), Command> {
        self.commands
            .send(Box::new(command))
            .await
            .map_err(|e| *e.0)
    }

    /// Records the revision of the session's own write: changes older than it are about a
    /// previous holder of the device and do not displace this session.
    pub fn establish(&self, revision: i64) {
        self.state.established.store(revision, Ordering::Release);
    }

    /// Records the lease the session's record is now under.
    pub fn set_lease(&self, lease: i64) {
        self.state.lease.store(lease, Ordering::Release);
    }

    /// The lease the session's record is under.
    pub fn lease(&self) -> i64 {
        self.state.lease.load(Ordering::Acquire)
    }

    /// Waits until the session's record vanishes with its lease.
    pub async fn orphaned(&self) {
        self.state.orphaned.notified().await;
    }

    /// Ends the session (the first reason wins).
    pub fn displace(&self, why: Displacement) {
        let _ = self.state.why.set(why);
        self.state.displaced.cancel();
    }

    /// Fires when the session is displaced.
    pub fn displaced(&self) -> CancellationToken {
        self.state.displaced.clone()
    }

    /// Why it was displaced.
    pub fn displacement(&self) -> Displacement {
        self.state
            .why
            .get()
            .copied()
            .unwrap_or(Displacement::Removed)
    }

    fn established(&self) -> i64 {
        self.state.established.load(Ordering::Acquire)
    }
}

/// The sessions held by this replica, by device.
#[derive(Debug)]
pub struct SessionTable {
    sessions: Mutex<HashMap<DeviceKey, SessionHandle>>,
    stripes: Vec<tokio::sync::Mutex<()>>,
    hasher: std::collections::hash_map::RandomState,
}

impl Default for SessionTable {
    fn default() -> Self {
        Self {
            sessions: Mutex::default(),
            stripes: (0..STRIPES).map(|_| tokio::sync::Mutex::new(())).collect(),
            hasher: std::collections::hash_map::RandomState::new(),
        }
    }
}

impl SessionTable {
    /// The session holding `key`, if this replica holds it.
    pub fn get(&self, key: &DeviceKey) -> Option<SessionHandle> {
        self.lock().get(key).cloned()
    }

    /// Number of sessions held.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no session is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Makes `handle` the holder of `key`, displacing the previous local holder.
    pub fn reserve(&self, key: DeviceKey, handle: SessionHandle) {
        if let Some(previous) = self.lock().insert(key, handle) {
            previous.displace(Displacement::Replaced);
        }
    }

    /// Removes session `id` from `key`; false if another session holds it now.
    pub fn release(&self, key: &DeviceKey, id: &str) -> bool {
        let mut sessions = self.lock();
        if sessions.get(key).is_some_and(|h| *h.id == *id) {
            sessions.remove(key);
            true
        } else {
            false
        }
    }

    /// The lock that orders the record writes of sessions of the same device on this
    /// replica (a replacing hello against the replaced session's delete), so that a closing
    /// session can never delete its successor's record: both carry this replica's lease.
    pub fn write_lock(&self, key: &DeviceKey) -> &tokio::sync::Mutex<()> {
        let stripe = usize::try_from(self.hasher.hash_one(key) % STRIPES as u64).unwrap_or(0);
        &self.stripes[stripe]
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<DeviceKey, SessionHandle>> {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl RecordObserver for SessionTable {
    fn changed(&self, change: RecordChange<'_>) {
        let sessions = self.lock();
        let Some(handle) = sessions.get(change.key) else {
            return;
        };
        let established = handle.established();
        if established == 0 || change.revision < established {
            return;
        }
        if change.session == Some(&*handle.id) {
            return;
        }
        if change.session.is_none()
            && change.left.is_none()
            && change.lease != 0
            && change.lease == handle.lease()
        {
            // Gone with its lease, not removed by anyone: the session writes it again
            // under the replica's next lease (or ends if the lease is in fact alive).
            handle.state.orphaned.notify_one();
            return;
        }
        let why = match (change.session, change.left) {
            (Some(_), _) => Displacement::Replaced,
            (None, Some(LeaveReason::Evicted)) => Displacement::Evicted,
            (None, _) => Displacement::Removed,
        };
        handle.displace(why);
    }

    fn watched_keys(&self) -> Vec<DeviceKey> {
        self.lock().keys().cloned().collect()
    }
}

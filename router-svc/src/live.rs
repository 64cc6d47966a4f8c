//! The communications this replica runs: each a [`LiveComm`] — the current `Communication`,
//! a version counter that wakes readers (Route waiting to return, WatchCommunication
//! streams), and the hangup request its runner obeys — in a [`LiveTable`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};

use proto::router::v1 as pb;
use tokio::sync::{Notify, watch};

use crate::communication::HangupSource;
use crate::model::{is_ended, is_settled};

/// One communication in progress on this replica.
#[derive(Debug)]
pub struct LiveComm {
    /// Its account.
    pub account: String,
    /// Its id.
    pub id: String,
    state: Mutex<pb::Communication>,
    version: watch::Sender<u64>,
    /// The newest version written to etcd.
    stored: AtomicU64,
    hangup: watch::Sender<Option<HangupSource>>,
    /// The replica lease its index entry (`router/owned/<lease>/…`) is under; 0 before the
    /// record is created, [`FINAL_WRITTEN`] once its final record is.
    index_lease: AtomicI64,
    /// The limiter slot it holds, once granted.
    slot: OnceLock<String>,
}

/// [`LiveComm::index_lease`] of a communication whose final record is written: its index
/// entry is gone, and later writes (e.g. a status callback's timeline event) are its own.
pub const FINAL_WRITTEN: i64 = -1;

impl LiveComm {
    /// A live communication starting as `comm`.
    pub fn new(comm: pb::Communication) -> Arc<Self> {
        Arc::new(Self {
            account: comm.account_id.clone(),
            id: comm.communication_id.clone(),
            state: Mutex::new(comm),
            version: watch::Sender::new(0),
            stored: AtomicU64::new(0),
            hangup: watch::Sender::new(None),
            index_lease: AtomicI64::new(0),
            slot: OnceLock::new(),
        })
    }

    /// The replica lease its index entry is under (0 before its record is created).
    pub fn index_lease(&self) -> i64 {
        self.index_lease.load(Ordering::Acquire)
    }

    /// Records that its index entry is now under `lease`.
    pub fn set_index_lease(&self, lease: i64) {
        self.index_lease.store(lease, Ordering::Release);
    }

    /// Records the limiter slot it holds (written with its next record).
    pub fn set_slot(&self, slot_id: &str) {
        let _ = self.slot.set(slot_id.to_owned());
    }

    /// The limiter slot it holds, if any.
    pub fn slot(&self) -> &str {
        self.slot.get().map_or("", String::as_str)
    }

    fn lock(&self) -> MutexGuard<'_, pb::Communication> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// A copy of the communication as it is now.
    pub fn snapshot(&self) -> pb::Communication {
        self.lock().clone()
    }

    /// Changes the communication and wakes its readers; returns what `change` returned.
    pub fn update<T>(&self, change: impl FnOnce(&mut pb::Communication) -> T) -> T {
        let mut comm = self.lock();
        let result = change(&mut comm);
        // Bumped under the lock, so that a versioned snapshot is consistent.
        self.version.send_modify(|v| *v += 1);
        result
    }

    /// A copy of the communication and its version.
    pub fn versioned(&self) -> (pb::Communication, u64) {
        let comm = self.lock();
        (comm.clone(), *self.version.borrow())
    }

    /// Records that `version` is in etcd.
    pub fn mark_stored(&self, version: u64) {
        self.stored.fetch_max(version, Ordering::AcqRel);
    }

    /// Whether the current version is in etcd already.
    pub fn is_stored(&self) -> bool {
        let _comm = self.lock();
        self.stored.load(Ordering::Acquire) >= *self.version.borrow()
    }

    /// Reads the communication without copying it.
    pub fn read<T>(&self, read: impl FnOnce(&pb::Communication) -> T) -> T {
        read(&self.lock())
    }

    /// Wakes on every change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version.subscribe()
    }

    /// Waits until connected or ended; the communication then.
    pub async fn settled(&self) -> pb::Communication {
        self.wait(is_settled).await
    }

    /// Waits until ended; the communication then.
    pub async fn ended(&self) -> pb::Communication {
        self.wait(is_ended).await
    }

    async fn wait(&self, done: fn(&pb::Communication) -> bool) -> pb::Communication {
        let mut changes = self.subscribe();
        loop {
            {
                let comm = self.lock();
                if done(&comm) {
                    return comm.clone();
                }
            }
            if changes.changed().await.is_err() {
                return self.snapshot();
            }
        }
    }

    /// Asks the runner to hang up (the first request wins).
    pub fn request_hangup(&self, source: HangupSource) {
        self.hangup.send_if_modified(|current| {
            if current.is_none() {
                *current = Some(source);
                true
            } else {
                false
            }
        });
    }

    /// Resolves when a hangup has been requested; with its source.
    pub async fn hangup_requested(&self) -> HangupSource {
        let mut requests = self.hangup.subscribe();
        loop {
            if let Some(source) = requests.borrow_and_update().clone() {
                return source;
            }
            if requests.changed().await.is_err() {
                return HangupSource::Shutdown;
            }
        }
    }

    /// The pending hangup request, if any.
    pub fn hangup_pending(&self) -> Option<HangupSource> {
        self.hangup.borrow().clone()
    }
}

/// Live communications by (account, id).
#[derive(Debug, Default)]
pub struct LiveTable {
    comms: Mutex<HashMap<(String, String), Arc<LiveComm>>>,
    emptied: Notify,
}

impl LiveTable {
    fn lock(&self) -> MutexGuard<'_, HashMap<(String, String), Arc<LiveComm>>> {
        self.comms.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The live communication, if this replica runs it.
    pub fn get(&self, account: &str, id: &str) -> Option<Arc<LiveComm>> {
        self.lock()
            .get(&(account.to_owned(), id.to_owned()))
            .cloned()
    }

    /// Adds `comm` unless one with its id runs here already; the one that runs.
    pub fn insert(&self, comm: Arc<LiveComm>) -> Result<Arc<LiveComm>, Arc<LiveComm>> {
        let mut comms = self.lock();
        let key = (comm.account.clone(), comm.id.clone());
        if let Some(existing) = comms.get(&key) {
            return Err(existing.clone());
        }
        comms.insert(key, comm.clone());
        Ok(comm)
    }

    /// Removes a communication that has ended (or never started).
    pub fn remove(&self, comm: &LiveComm) {
        let mut comms = self.lock();
        comms.remove(&(comm.account.clone(), comm.id.clone()));
        if comms.is_empty() {
            self.emptied.notify_waiters();
        }
    }

    /// Every live communication.
    pub fn all(&self) -> Vec<Arc<LiveComm>> {
        self.lock().values().cloned().collect()
    }

    /// An account's live communications.
    pub fn of_account(&self, account: &str) -> Vec<Arc<LiveComm>> {
        self.lock()
            .values()
            .filter(|c| c.account == account)
            .cloned()
            .collect()
    }

    /// Waits until no communication runs here.
    pub async fn drained(&self) {
        loop {
            let emptied = self.emptied.notified();
            if self.lock().is_empty() {
                return;
            }
            emptied.await;
        }
    }
}

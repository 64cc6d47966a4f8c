//! What callers exchange with the engine task: commands, answers and the handle.

use tokio::sync::{mpsc, oneshot, watch};

use crate::model::{AcquireSpec, SlotId, SlotKey};

/// Why the engine could not serve a command.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EngineError {
    /// This replica does not own the shard (any more); route again.
    #[error("shard {0} is not owned by this replica")]
    NotOwner(u16),
    /// The slot is not held (released, expired, unknown or of another account).
    #[error("slot not found (released, expired or never granted)")]
    NotFound,
    /// etcd failed; the outcome is unknown and the caller may retry (with its request_id).
    #[error("{0}")]
    Unavailable(String),
}

/// The answer to an Acquire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcquireReply {
    /// Granted (with a slot) or rejected.
    pub granted: bool,
    /// The slot, when granted.
    pub slot_id: String,
    /// Slots held for the key after the decision.
    pub in_flight: u32,
    /// The limit in force (0: unlimited).
    pub limit: u32,
    /// When rejected: a hint for when to retry.
    pub retry_after_ms: u32,
    /// When granted: when the slot expires (ms since the epoch).
    pub expire_ms: u64,
    /// Granted only because the limit is in shadow mode.
    pub shadow: bool,
    /// When granted: the slot's fencing token.
    pub fencing_token: u64,
}

/// Usage of one key as the owner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageReply {
    /// The key.
    pub key: SlotKey,
    /// Slots held.
    pub in_flight: u32,
    /// The limit in force (0: unlimited).
    pub limit: u32,
    /// Limit in shadow mode.
    pub shadow: bool,
    /// Callers queued.
    pub queued: u32,
    /// Grants since this owner took the key.
    pub granted_total: u64,
    /// Rejections since this owner took the key.
    pub rejected_total: u64,
    /// Shadow-mode would-be rejections.
    pub shadow_rejected_total: u64,
}

pub(super) type Reply<T> = oneshot::Sender<Result<T, EngineError>>;

/// What the engine is asked to do.
#[derive(Debug)]
pub enum Command {
    /// Acquire a slot.
    Acquire(AcquireSpec, Reply<AcquireReply>),
    /// Release a slot; `account` None for platform callers (any account).
    Release(SlotId, Option<String>, Reply<bool>),
    /// Renew a slot to `hold_secs` from now; answers the new expiry and the slot's token.
    Renew(SlotId, Option<String>, u32, Reply<(u64, u64)>),
    /// Shut down: hand every shard off and claim nothing more.
    Leave,
    /// Usage of one key.
    Usage(SlotKey, Reply<UsageReply>),
    /// Usage of every key of an account in the shards owned here.
    ListUsage(String, oneshot::Sender<Vec<UsageReply>>),
}

/// Submits commands to the engine task.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    pub(super) tx: mpsc::Sender<Command>,
    pub(super) owned: watch::Receiver<Vec<u16>>,
    pub(super) held: watch::Receiver<usize>,
}

impl EngineHandle {
    /// Sends a command and waits for its answer.
    pub async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T, EngineError> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send(make(reply))
            .await
            .map_err(|_| EngineError::Unavailable("limiter engine stopped".into()))?;
        answer
            .await
            .unwrap_or_else(|_| Err(EngineError::Unavailable("limiter engine stopped".into())))
    }

    /// Usage of an account's keys owned here.
    pub async fn list_usage(&self, account: String) -> Vec<UsageReply> {
        let (reply, answer) = oneshot::channel();
        if self
            .tx
            .send(Command::ListUsage(account, reply))
            .await
            .is_err()
        {
            return Vec::new();
        }
        answer.await.unwrap_or_default()
    }

    /// Hands every shard off (planned: escrow slots are written out exactly) and waits, at
    /// most `within`, until none is held here any more. Answers whether all were.
    pub async fn leave(&self, within: std::time::Duration) -> bool {
        if self.tx.send(Command::Leave).await.is_err() {
            return false;
        }
        let mut held = self.held.clone();
        tokio::time::timeout(within, held.wait_for(|n| *n == 0))
            .await
            .is_ok_and(|r| r.is_ok())
    }

    /// Shards this replica currently owns and serves.
    pub fn owned(&self) -> Vec<u16> {
        self.owned.borrow().clone()
    }
}

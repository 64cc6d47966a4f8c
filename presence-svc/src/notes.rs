//! Leave notes: why a device left, written in the same transaction as its deletion so that
//! watchers of that revision can say `unregistered`, `disconnected` or `evicted` (a deletion
//! without a note is a lease expiry).
//!
//! A note only matters at its own revision, so notes live under a short, shared lease that
//! this replica rotates: granted on first need, used for [`ROTATE_AFTER`], left to expire
//! after [`NOTE_TTL`]. That costs one lease grant per rotation period while notes are being
//! written, and nothing while none are; notes never accumulate.

use std::time::Duration;

use etcd_client::Txn;
use plumbing::etcd::{EtcdError, EtcdSession};
use tokio::sync::Mutex;
use tokio::time::Instant;

use crate::commit::{CommitError, Committed, GroupCommit};

/// Lifetime of a note lease, seconds.
const NOTE_TTL: i64 = 60;
/// How long one note lease is used for new notes (so each note lives 40–60 s).
const ROTATE_AFTER: Duration = Duration::from_secs(20);

/// The rotating lease notes are written under.
#[derive(Debug)]
pub struct LeaveNotes {
    session: EtcdSession,
    writer: GroupCommit,
    current: Mutex<Option<(i64, Instant)>>,
}

impl LeaveNotes {
    /// No lease is granted until the first note.
    pub fn new(session: EtcdSession, writer: GroupCommit) -> Self {
        Self {
            session,
            writer,
            current: Mutex::new(None),
        }
    }

    async fn lease(&self) -> Result<i64, EtcdError> {
        let mut current = self.current.lock().await;
        if let Some((id, granted)) = *current
            && granted.elapsed() < ROTATE_AFTER
        {
            return Ok(id);
        }
        // A repeated grant at worst leaves a spare lease that nobody keeps alive: it expires.
        let granted = self
            .session
            .retry(plumbing::etcd::CALL_DEADLINE, |mut client| async move {
                client.lease_grant(NOTE_TTL, None).await
            })
            .await?;
        *current = Some((granted.id(), Instant::now()));
        Ok(granted.id())
    }

    async fn forget(&self, lease: i64) {
        let mut current = self.current.lock().await;
        if current.is_some_and(|(id, _)| id == lease) {
            *current = None;
        }
    }

    /// Commits the txn `build` makes with the note lease (writing `keys`). If etcd no
    /// longer knows that lease (revoked by hand, or lost with etcd's data), it is replaced
    /// and the txn tried once more.
    pub async fn commit(
        &self,
        build: impl Fn(i64) -> Txn,
        keys: Vec<String>,
    ) -> Result<Committed, EtcdError> {
        let mut retried = false;
        loop {
            let lease = self.lease().await?;
            match self.writer.commit(build(lease), keys.clone()).await {
                Ok(committed) => return Ok(committed),
                Err(CommitError::LeaseNotFound) if !retried => {
                    tracing::warn!(lease, "leave-note lease is gone; granting a new one");
                    self.forget(lease).await;
                    retried = true;
                }
                Err(err) => return Err(EtcdError::Unavailable(err.to_string())),
            }
        }
    }
}

//! The limiter slots a remote guard holds, kept without a task per call: one worker per
//! guard, spawned with its first slot, renews every held slot from one timer and sends
//! the releases that finished responses queue to it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use futures::StreamExt;
use proto::limiter::v1 as pb;
use tokio::sync::mpsc;

use super::{HOLD_SECS, LIMITER_DEADLINE, RENEW_EVERY};
use crate::limiter::LimiterClient;

/// How often the worker looks for slots due for renewal.
const RENEW_TICK: Duration = Duration::from_secs(1);
/// Releases waiting for the worker; beyond this a release is dropped and its slot
/// expires by itself after [`HOLD_SECS`].
const RELEASE_QUEUE: usize = 16_384;
/// Releases the worker takes from the queue at once.
const RELEASE_BATCH: usize = 256;
/// Limiter calls the worker has in flight at once.
const CONCURRENT_CALLS: usize = 64;

/// Held slots by id, with when each is next renewed.
type Held = Arc<Mutex<HashMap<String, Instant>>>;

/// The slots of one guard and the worker that keeps them.
pub(super) struct SlotKeeper {
    limiter: LimiterClient,
    held: Held,
    /// The worker's queue, made (and the worker spawned) with the first slot.
    releases: OnceLock<mpsc::Sender<String>>,
}

impl SlotKeeper {
    /// A keeper calling `limiter`.
    pub(super) fn new(limiter: LimiterClient) -> Self {
        Self {
            limiter,
            held: Held::default(),
            releases: OnceLock::new(),
        }
    }

    /// The limiter the guard acquires its slots from.
    pub(super) fn limiter(&self) -> &LimiterClient {
        &self.limiter
    }

    /// Keeps `slot` (renewed every [`RENEW_EVERY`]) until the returned handle is dropped,
    /// which releases it. Called inside the runtime (the first call spawns the worker).
    pub(super) fn hold(self: &Arc<Self>, slot: String) -> HeldSlot {
        self.releases.get_or_init(|| {
            let (queue, releases) = mpsc::channel(RELEASE_QUEUE);
            tokio::spawn(work(self.limiter.clone(), Arc::clone(&self.held), releases));
            queue
        });
        lock(&self.held).insert(slot.clone(), Instant::now() + RENEW_EVERY);
        HeldSlot {
            slot,
            keeper: Arc::clone(self),
        }
    }
}

/// A guard slot held for the life of a response body; dropping it queues its release.
pub(super) struct HeldSlot {
    slot: String,
    keeper: Arc<SlotKeeper>,
}

impl Drop for HeldSlot {
    fn drop(&mut self) {
        lock(&self.keeper.held).remove(&self.slot);
        let Some(queue) = self.keeper.releases.get() else {
            return;
        };
        if queue.try_send(std::mem::take(&mut self.slot)).is_err() {
            tracing::debug!("API guard: the release queue is full; the slot will expire");
        }
    }
}

fn lock(held: &Held) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
    held.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Releases what is queued and renews what is due, until every handle on the queue is
/// gone (the guard and all its slots): then the last releases are sent and it ends.
async fn work(limiter: LimiterClient, held: Held, mut releases: mpsc::Receiver<String>) {
    let mut tick = tokio::time::interval(RENEW_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::with_capacity(RELEASE_BATCH);
    loop {
        tokio::select! {
            taken = releases.recv_many(&mut batch, RELEASE_BATCH) => {
                if taken == 0 {
                    return;
                }
                release_all(&limiter, batch.drain(..)).await;
            }
            _ = tick.tick() => {
                let due = take_due(&mut lock(&held), Instant::now());
                renew_all(&limiter, &held, due).await;
            }
        }
    }
}

/// The ids of the slots due for renewal at `now`, each rescheduled [`RENEW_EVERY`] on.
fn take_due(held: &mut HashMap<String, Instant>, now: Instant) -> Vec<String> {
    held.iter_mut()
        .filter(|(_, next)| **next <= now)
        .map(|(slot, next)| {
            *next = now + RENEW_EVERY;
            slot.clone()
        })
        .collect()
}

async fn release_all(limiter: &LimiterClient, slots: impl Iterator<Item = String>) {
    futures::stream::iter(slots)
        .for_each_concurrent(CONCURRENT_CALLS, |slot_id| async move {
            let release = limiter.release(pb::ReleaseRequest { slot_id });
            match tokio::time::timeout(LIMITER_DEADLINE, release).await {
                Ok(Ok(_)) => {}
                Ok(Err(status)) => {
                    tracing::debug!(code = ?status.code(), "API guard: release failed; the slot will expire");
                }
                Err(_) => tracing::debug!(
                    "API guard: a release got no answer in time; the slot will expire"
                ),
            }
        })
        .await;
}

/// Renews `slots`; a slot the limiter no longer knows is forgotten (it expired or was
/// released, renewing it again would fail again).
async fn renew_all(limiter: &LimiterClient, held: &Held, slots: Vec<String>) {
    futures::stream::iter(slots)
        .for_each_concurrent(CONCURRENT_CALLS, |slot_id| async move {
            let renew = limiter.renew(pb::RenewRequest {
                slot_id: slot_id.clone(),
                hold_seconds: HOLD_SECS,
            });
            match tokio::time::timeout(LIMITER_DEADLINE, renew).await {
                Ok(Ok(_)) => {}
                Ok(Err(status)) if status.code() == tonic::Code::NotFound => {
                    tracing::debug!("API guard: a stream's slot is gone; no longer renewing it");
                    lock(held).remove(&slot_id);
                }
                Ok(Err(status)) => {
                    tracing::debug!(code = ?status.code(), "API guard: could not renew a stream's slot");
                }
                Err(_) => tracing::debug!("API guard: a renewal got no answer in time"),
            }
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_due_slots_are_renewed_and_each_is_rescheduled() {
        let now = Instant::now();
        let mut held = HashMap::from([
            ("due".to_owned(), now),
            ("late".to_owned(), now - Duration::from_secs(3)),
            ("later".to_owned(), now + Duration::from_secs(1)),
        ]);
        let mut due = take_due(&mut held, now);
        due.sort();
        assert_eq!(due, ["due", "late"]);
        assert_eq!(held["due"], now + RENEW_EVERY);
        assert_eq!(held["late"], now + RENEW_EVERY);
        assert_eq!(held["later"], now + Duration::from_secs(1));
        assert!(take_due(&mut held, now).is_empty(), "nothing is due twice");
    }

    #[tokio::test]
    async fn dropping_a_held_slot_forgets_it_and_queues_its_release() {
        let credentials = crate::client::CallCredentials::platform("k", b"secret", &[]);
        let limiter = LimiterClient::new(
            ["127.0.0.1:9"],
            &crate::client::ClientTls::plain(),
            credentials,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let keeper = Arc::new(SlotKeeper::new(limiter));
        let (queue, mut releases) = mpsc::channel(4);
        // A queue the test reads instead of the worker.
        assert!(keeper.releases.set(queue).is_ok());
        let slot = keeper.hold("00abc".to_owned());
        assert!(lock(&keeper.held).contains_key("00abc"));
        drop(slot);
        assert!(lock(&keeper.held).is_empty());
        assert_eq!(releases.recv().await.as_deref(), Some("00abc"));
    }
}

//! A watch that survives etcd restarts and leader changes, and a mirror built on it.
//!
//! etcd-client's watch stream simply ends (or errors) when its connection breaks. [`follow`]
//! reopens it with backoff and resumes from the revision after the last one delivered, so
//! no event is lost or repeated. If that revision has been compacted meanwhile, it says so
//! with [`WatchItem::Compacted`] and stops: only the caller knows how to resnapshot.
//! [`Mirror`] is that caller for the common case — "keep a local copy of a prefix" — and
//! resnapshots by itself.

use std::time::Duration;

use etcd_client::{Event, GetOptions, KeyValue, WatchOptions};
use tokio::sync::{mpsc, watch as signal};
use tokio::task::JoinHandle;

use super::{EtcdError, EtcdSession};

/// What to watch.
#[derive(Debug, Clone)]
pub struct WatchSpec {
    /// The key, or the prefix when `prefix` is set.
    pub key: String,
    /// Watch every key starting with `key`.
    pub prefix: bool,
    /// First revision to deliver; 0 means "from now".
    pub start_revision: i64,
    /// Attach the previous value to updates and deletes.
    pub prev_kv: bool,
}

/// What a [`follow`] delivers, in revision order.
#[derive(Debug)]
pub enum WatchItem {
    /// Events of one or more revisions; `revision` is the last one covered.
    Events {
        /// The changes, in order.
        events: Vec<Event>,
        /// Every change up to and including this revision has now been delivered.
        revision: i64,
    },
    /// Nothing changed, but everything up to `revision` has been delivered.
    Progress {
        /// The revision the watch is known to be current at.
        revision: i64,
    },
    /// The resume revision was compacted; the watch has stopped and the caller must
    /// resnapshot from `compact_revision` or later.
    Compacted {
        /// The oldest revision still available.
        compact_revision: i64,
    },
}

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// How often a quiet watch asks for progress: a broken connection fails the request, so the
/// watch notices a dead etcd within this interval instead of the TCP keep-alive's.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Starts a resilient watch. It runs until the receiver is dropped or a compaction is
/// reported.
pub fn follow(session: &EtcdSession, spec: WatchSpec) -> mpsc::Receiver<WatchItem> {
    let (tx, rx) = mpsc::channel(256);
    tokio::spawn(run_watch(session.clone(), spec, tx));
    rx
}

async fn run_watch(session: EtcdSession, spec: WatchSpec, tx: mpsc::Sender<WatchItem>) {
    let mut next = spec.start_revision;
    let mut backoff = BACKOFF_MIN;
    loop {
        match watch_once(&session, &spec, &mut next, &tx).await {
            Ok(Stop::Done) => return,
            Ok(Stop::Reconnect) => backoff = BACKOFF_MIN,
            Err(err) => {
                tracing::warn!(key = %spec.key, resume_at = next, error = %err, "etcd watch broke; reconnecting");
            }
        }
        tokio::select! {
            _ = tx.closed() => return,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

enum Stop {
    Done,
    Reconnect,
}

async fn watch_once(
    session: &EtcdSession,
    spec: &WatchSpec,
    next: &mut i64,
    tx: &mpsc::Sender<WatchItem>,
) -> Result<Stop, EtcdError> {
    let mut options = WatchOptions::new().with_progress_notify();
    if spec.prefix {
        options = options.with_prefix();
    }
    if spec.prev_kv {
        options = options.with_prev_key();
    }
    if *next > 0 {
        options = options.with_start_revision(*next);
    }
    let mut client = session.client();
    let mut stream = session
        .bounded(client.watch(spec.key.as_bytes(), Some(options)))
        .await?;
    let mut progress = tokio::time::interval(PROGRESS_EVERY);
    loop {
        let message = tokio::select! {
            _ = tx.closed() => return Ok(Stop::Done),
            _ = progress.tick() => {
                // Also a liveness probe: a broken connection fails this send.
                stream.request_progress().await?;
                continue;
            }
            message = stream.message() => match message {
                Ok(message) => message,
                Err(err) => {
                    if super::is_refused_login(&err) {
                        session.refresh_login().await;
                    }
                    return Err(err.into());
                }
            },
        };
        let Some(response) = message else {
            return Ok(Stop::Reconnect);
        };
        let header_revision = response.header().map_or(0, |h| h.revision());
        // Checked before `created`: etcd refuses a watch (bad or expired auth token, no
        // permission) with one response that is both created and canceled.
        if response.canceled() {
            if response.compact_revision() > 0 {
                let _ = tx
                    .send(WatchItem::Compacted {
                        compact_revision: response.compact_revision(),
                    })
                    .await;
                return Ok(Stop::Done);
            }
            // etcd says why only in text; logging in again is cheap and is what an
            // expired token needs, so do it whatever the reason.
            session.refresh_login().await;
            return Err(EtcdError::Unavailable(format!(
                "watch canceled: {}",
                response.cancel_reason()
            )));
        }
        if response.created() {
            // Watching "from now": the creation revision is where delivery starts. With an
            // explicit start revision, older events may still be on their way.
            if *next == 0 {
                *next = header_revision + 1;
            }
            continue;
        }
        let item = if response.events().is_empty() {
            // etcd 3.4 answers a manual progress request (watch id -1) with the store
            // revision even while this watcher is still catching up, so only the server's
            // own per-watcher notifications prove that everything up to the header has
            // been delivered.
            if response.watch_id() < 0 || header_revision < *next {
                continue;
            }
            *next = header_revision + 1;
            WatchItem::Progress {
                revision: header_revision,
            }
        } else {
            let events = response.events().to_vec();
            let last = events
                .last()
                .and_then(Event::kv)
                .map_or(header_revision, KeyValue::mod_revision);
            *next = last + 1;
            WatchItem::Events {
                events,
                revision: last,
            }
        };
        if tx.send(item).await.is_err() {
            return Ok(Stop::Done);
        }
    }
}

/// One change to a [`Mirror`]'s copy.
#[derive(Debug)]
pub enum MirrorUpdate {
    /// Replace everything with these keys (first load, or after a compaction).
    Reset {
        /// Every key under the prefix at `revision`.
        kvs: Vec<KeyValue>,
        /// The snapshot's revision.
        revision: i64,
    },
    /// A key was created or updated.
    Put(KeyValue),
    /// A key was deleted (the value is the previous one when etcd still had it, else just the key).
    Delete(KeyValue),
}

/// Keeps a caller-owned copy of a prefix current: snapshot, then watch from the snapshot's
/// revision, resnapshotting after a compaction. [`Mirror::revision`] tells how current it is.
#[derive(Debug)]
pub struct Mirror {
    revision: signal::Receiver<i64>,
    task: JoinHandle<()>,
}

impl Mirror {
    /// Starts mirroring `prefix` (a full etcd key). `apply` sees every update, in order,
    /// on the mirror's own task; keep it quick.
    pub fn start<F>(session: &EtcdSession, prefix: String, apply: F) -> Self
    where
        F: FnMut(MirrorUpdate) + Send + 'static,
    {
        let (tx, revision) = signal::channel(0);
        let task = tokio::spawn(run_mirror(session.clone(), prefix, apply, tx));
        Self { revision, task }
    }

    /// The revision the copy is current at (0 until the first snapshot is loaded).
    pub fn revision(&self) -> i64 {
        *self.revision.borrow()
    }

    /// Waits until the copy reflects at least `revision`, or `timeout` passes.
    pub async fn wait_for(&self, revision: i64, timeout: Duration) -> bool {
        let mut rx = self.revision.clone();
        tokio::time::timeout(timeout, rx.wait_for(|current| *current >= revision.max(1)))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

impl Drop for Mirror {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run_mirror<F>(
    session: EtcdSession,
    prefix: String,
    mut apply: F,
    revision: signal::Sender<i64>,
) where
    F: FnMut(MirrorUpdate),
{
    let mut backoff = BACKOFF_MIN;
    loop {
        let snapshot = {
            let mut client = session.client();
            session
                .bounded(client.get(prefix.as_bytes(), Some(GetOptions::new().with_prefix())))
                .await
        };
        let mut response = match snapshot {
            Ok(response) => response,
            Err(err) => {
                tracing::warn!(%prefix, error = %err, "mirror snapshot failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        backoff = BACKOFF_MIN;
        let at = response.header().map_or(0, |h| h.revision());
        apply(MirrorUpdate::Reset {
            kvs: response.take_kvs(),
            revision: at,
        });
        revision.send_replace(at);
        let spec = WatchSpec {
            key: prefix.clone(),
            prefix: true,
            start_revision: at + 1,
            prev_kv: true,
        };
        let mut items = follow(&session, spec);
        while let Some(item) = items.recv().await {
            match item {
                WatchItem::Events {
                    events,
                    revision: at,
                } => {
                    for update in events.into_iter().filter_map(to_update) {
                        apply(update);
                    }
                    revision.send_replace(at);
                }
                WatchItem::Progress { revision: at } => {
                    revision.send_if_modified(|current| {
                        let newer = at > *current;
                        if newer {
                            *current = at;
                        }
                        newer
                    });
                }
                WatchItem::Compacted { compact_revision } => {
                    tracing::warn!(%prefix, compact_revision, "mirror fell behind a compaction; resnapshotting");
                    break;
                }
            }
        }
    }
}

fn to_update(event: Event) -> Option<MirrorUpdate> {
    let deleted = event.event_type() == etcd_client::EventType::Delete;
    let kv = event.kv().cloned();
    let prev = event.prev_kv().cloned();
    // etcd always sends the event's kv; `None` is unreachable in practice.
    match (deleted, kv, prev) {
        (true, _, Some(prev)) => Some(MirrorUpdate::Delete(prev)),
        (true, kv, None) => kv.map(MirrorUpdate::Delete),
        (false, kv, _) => kv.map(MirrorUpdate::Put),
    }
}

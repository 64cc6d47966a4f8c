//! Watch events lost: every presence change a caller was acknowledged with a revision
//! ([`Acks`]) against what one resuming WatchPresence stream saw ([`Watcher`]).
//!
//! The watcher follows every identity of the soak account from the revision just after the
//! setup. When its stream breaks — or when it breaks it on purpose every `hop_every`, to
//! exercise the resume — it opens a new one on the other presence replica from the last
//! revision it saw (the contract: resume from the last revision, skipping the changes of
//! that revision already seen, since one revision can carry several changes). A change
//! is identified by (revision, identity, device id).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use plumbing::auth::Scope;
use proto::presence::v1 as pb;
use proto::presence::v1::presence_service_client::PresenceServiceClient;
use proto::presence::v1::watch_presence_response::Event;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::{CALL_TIMEOUT, progress, token};

/// A presence change acknowledged to a caller.
#[derive(Debug, Clone)]
pub struct Ack {
    /// The revision it was acknowledged with.
    pub revision: i64,
    /// The device's identity.
    pub identity: String,
    /// The device.
    pub device_id: String,
    /// Which call acknowledged it (`Register`, `UpdateStatus`, `Unregister`, `Connect`,
    /// `ConnectStatus`).
    pub call: &'static str,
}

/// Every acknowledged change, shared by the load's callers.
#[derive(Debug, Clone, Default)]
pub struct Acks(Arc<Mutex<Vec<Ack>>>);

impl Acks {
    /// Records a change `call` was acknowledged with.
    pub fn record(&self, call: &'static str, revision: i64, identity: &str, device_id: &str) {
        self.lock().push(Ack {
            revision,
            identity: identity.to_owned(),
            device_id: device_id.to_owned(),
            call,
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Ack>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What the watcher found.
#[derive(Debug, Clone, Default)]
pub struct WatchFigures {
    /// Changes acknowledged to callers.
    pub acknowledged: usize,
    /// Of those, the ones the watcher never saw.
    pub lost: usize,
    /// A few of the lost ones, for the report.
    pub lost_samples: Vec<String>,
    /// Events the watcher received (every change, acknowledged or not, and repeats
    /// after a resume).
    pub events: u64,
    /// Streams opened (the first, then one per resume).
    pub streams: u64,
    /// Streams that broke by themselves (error or end), not by a planned hop.
    pub breaks: u64,
    /// `compacted` events (a resume point gone: changes may have been missed).
    pub compacted: u64,
    /// Whether the watcher reached the last acknowledged revision before the deadline.
    pub caught_up: bool,
}

#[derive(Default)]
struct Seen {
    changes: HashSet<(i64, String, String)>,
    last: i64,
    events: u64,
    streams: u64,
    breaks: u64,
    compacted: u64,
}

/// The resuming watcher's task.
pub struct Watcher {
    seen: Arc<Mutex<Seen>>,
    stop: oneshot::Sender<()>,
    task: JoinHandle<()>,
}

impl Watcher {
    /// Starts watching the soak account through `addrs` in turn from revision `from`.
    pub fn start(addrs: Vec<SocketAddr>, from: i64, hop_every: Duration) -> Self {
        let seen = Arc::new(Mutex::new(Seen {
            last: from,
            ..Seen::default()
        }));
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(follow(addrs, seen.clone(), hop_every, stopped));
        Self { seen, stop, task }
    }

    /// Waits (up to `within`) until the watcher has seen the last acknowledged revision,
    /// stops it and compares.
    pub async fn finish(self, acks: &Acks, within: Duration) -> WatchFigures {
        let Self { seen, stop, task } = self;
        let acks = acks.lock().clone();
        let upto = acks.iter().map(|a| a.revision).max().unwrap_or(0);
        let lock = || seen.lock().unwrap_or_else(PoisonError::into_inner);
        let deadline = Instant::now() + within;
        let caught_up = loop {
            if lock().last >= upto {
                break true;
            }
            if Instant::now() >= deadline {
                break false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let _ = stop.send(());
        let _ = task.await;
        let seen = std::mem::take(&mut *lock());
        let lost: Vec<&Ack> = acks
            .iter()
            .filter(|a| {
                let key = (a.revision, a.identity.clone(), a.device_id.clone());
                !seen.changes.contains(&key)
            })
            .collect();
        WatchFigures {
            acknowledged: acks.len(),
            lost: lost.len(),
            lost_samples: lost
                .iter()
                .take(5)
                .map(|a| {
                    format!(
                        "{} {}/{} at {}",
                        a.call, a.identity, a.device_id, a.revision
                    )
                })
                .collect(),
            events: seen.events,
            streams: seen.streams,
            breaks: seen.breaks,
            compacted: seen.compacted,
            caught_up,
        }
    }
}

/// Opens streams in turn on `addrs`, each from the last revision seen, until `stopped`.
async fn follow(
    addrs: Vec<SocketAddr>,
    seen: Arc<Mutex<Seen>>,
    hop_every: Duration,
    mut stopped: oneshot::Receiver<()>,
) {
    let token = token(&[Scope::PresenceRead]);
    let lock = || seen.lock().unwrap_or_else(PoisonError::into_inner);
    for turn in (0..addrs.len()).cycle() {
        let addr = addrs[turn];
        let request = pb::WatchPresenceRequest {
            start_revision: lock().last,
            ..Default::default()
        };
        let open = async {
            let channel = plumbing::client::channel(&addr.to_string()).ok()?;
            // No deadline on the request: a `grpc-timeout` would end the stream.
            let mut client = PresenceServiceClient::new(channel);
            let call = client.watch_presence(crate::Tokens::request(&token, request));
            tokio::time::timeout(CALL_TIMEOUT, call).await.ok()?.ok()
        };
        let opened = tokio::select! {
            opened = open => opened,
            _ = &mut stopped => return,
        };
        let Some(stream) = opened else {
            lock().breaks += 1;
            tokio::select! {
                () = tokio::time::sleep(Duration::from_millis(200)) => continue,
                _ = &mut stopped => return,
            }
        };
        lock().streams += 1;
        let mut stream = stream.into_inner();
        let hop = tokio::time::sleep(hop_every);
        tokio::pin!(hop);
        loop {
            tokio::select! {
                message = stream.message() => match message {
                    Ok(Some(message)) => record(&mut lock(), &message),
                    Ok(None) | Err(_) => {
                        lock().breaks += 1;
                        break;
                    }
                },
                () = &mut hop => break,
                _ = &mut stopped => return,
            }
        }
    }
    progress(format_args!("the watcher has no presence replica to watch"));
}

fn record(seen: &mut Seen, message: &pb::WatchPresenceResponse) {
    seen.events += 1;
    let device = match &message.event {
        Some(Event::Joined(e)) => e.device.as_ref(),
        Some(Event::Updated(e)) => e.device.as_ref(),
        Some(Event::Left(e)) => e.device.as_ref(),
        Some(Event::Compacted(c)) => {
            // The changes between the resume point and this one are gone: go on from the
            // oldest available revision; the acknowledged changes missed show as lost.
            seen.compacted += 1;
            seen.last = seen.last.max(c.compact_revision);
            None
        }
        Some(Event::SnapshotComplete(_)) | None => None,
    };
    if let Some(device) = device {
        seen.changes.insert((
            message.revision,
            device.identity.clone(),
            device.device_id.clone(),
        ));
        seen.last = seen.last.max(message.revision);
    }
}

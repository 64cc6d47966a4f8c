//! WatchPresence: device-level changes of one account, straight from an etcd watch on the
//! account's prefix (so it can start at any revision etcd still has, and resumes across etcd
//! restarts without losing or repeating a change), optionally after a snapshot read at one
//! revision. Each account may have at most `--max-watches-per-account` watches open on one
//! replica (each is an etcd watch); the unit is given back when the stream ends or its
//! client goes away.
//!
//! `switchboard_presence_watch_lag_seconds` times each batch of etcd events from its
//! arrival here to its last event queued for the client: it grows when watchers read
//! slowly (their stream's buffer is full, so the etcd watch waits for them).

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use etcd_client::{Event, EventType, GetOptions};
use plumbing::etcd::{EtcdSession, WatchItem, WatchSpec, follow};
use plumbing::metrics::{Metrics, latency_histogram};
use plumbing::quota::{AccountQuota, QuotaPermit};
use prometheus_client::metrics::histogram::Histogram;
use proto::presence::v1 as pb;
use proto::presence::v1::watch_presence_response::Event as Out;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::error::Error;
use crate::record::{
    DeviceKey, DeviceRecord, Layout, LeaveNote, LeaveReason, ParsedKey, StoredDevice,
};

/// Events buffered for a watcher that reads slowly (then the etcd watch waits for it).
const BUFFER: usize = 64;
/// Up to this many identities, a snapshot reads each identity's range; beyond, the
/// account's whole range.
const PER_IDENTITY_SNAPSHOT: usize = 16;

/// The response stream of WatchPresence.
pub type WatchStream = ReceiverStream<Result<pb::WatchPresenceResponse, Status>>;

/// Where a watch starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Start {
    /// With changes after the call.
    Now,
    /// With the change at this revision.
    From(i64),
    /// With the current devices, then the changes after them.
    Snapshot,
}

/// What to watch.
#[derive(Debug, Clone)]
pub struct WatchRequest {
    /// The account.
    pub account: String,
    /// Only these identities; empty for all.
    pub identities: HashSet<String>,
    /// Where to start.
    pub start: Start,
}

/// Opens presence watches.
#[derive(Debug, Clone)]
pub struct PresenceWatch {
    session: EtcdSession,
    layout: Layout,
    shutdown: CancellationToken,
    watches: AccountQuota,
    lag: Histogram,
}

impl PresenceWatch {
    /// Watches under `layout`, at most `max_per_account` open per account; streams end
    /// when `shutdown` fires; their lag is registered in `metrics`.
    pub fn new(
        session: EtcdSession,
        layout: Layout,
        shutdown: CancellationToken,
        max_per_account: usize,
        metrics: &Metrics,
    ) -> Self {
        let lag = latency_histogram();
        metrics.register(
            "presence_watch_lag_seconds",
            "WatchPresence: time from a batch of etcd events arriving to its last event queued for the client",
            lag.clone(),
        );
        Self {
            lag,
            session,
            layout,
            shutdown,
            watches: AccountQuota::new(
                max_per_account,
                "watches open",
                "--max-watches-per-account",
            ),
        }
    }

    /// Starts a watch; the snapshot (if asked for) is read before this returns, and "now"
    /// is fixed before it returns too, so that a change the caller makes afterwards is seen.
    pub async fn open(&self, request: WatchRequest) -> Result<WatchStream, Error> {
        let permit = self.watches.try_acquire(&request.account)?;
        let (snapshot, from) = match request.start {
            Start::Snapshot => {
                let (devices, revision) = self.snapshot(&request).await?;
                (Some((devices, revision)), revision + 1)
            }
            Start::From(revision) => (None, revision),
            Start::Now => (None, self.session.current_revision().await? + 1),
        };
        let items = follow(
            &self.session,
            WatchSpec {
                key: self.layout.account_prefix(&request.account),
                prefix: true,
                start_revision: from,
                prev_kv: true,
            },
        );
        let (outbound, stream) = mpsc::channel(BUFFER);
        let task = WatchTask {
            layout: self.layout.clone(),
            identities: request.identities,
            notes: HashMap::new(),
            next: from,
            outbound,
            lag: self.lag.clone(),
            _permit: permit,
        };
        tokio::spawn(task.run(snapshot, items, self.shutdown.clone()));
        Ok(ReceiverStream::new(stream))
    }

    /// The matching devices at one revision, and that revision.
    async fn snapshot(&self, request: &WatchRequest) -> Result<(Vec<StoredDevice>, i64), Error> {
        let mut client = self.session.client();
        let mut prefixes: Vec<String> = request
            .identities
            .iter()
            .map(|identity| self.layout.identity_prefix(&request.account, identity))
            .collect();
        if prefixes.is_empty() || prefixes.len() > PER_IDENTITY_SNAPSHOT {
            prefixes = vec![self.layout.account_prefix(&request.account)];
        }
        prefixes.sort();
        let mut devices = Vec::new();
        let mut revision = 0;
        for prefix in prefixes {
            let mut options = GetOptions::new().with_prefix();
            if revision > 0 {
                options = options.with_revision(revision);
            }
            let response = self
                .session
                .bounded(client.get(prefix, Some(options)))
                .await?;
            if revision == 0 {
                revision = response.header().map_or(0, |h| h.revision());
            }
            devices.extend(
                response
                    .kvs()
                    .iter()
                    .filter_map(|kv| StoredDevice::from_kv(&self.layout, kv))
                    .filter(|d| wanted(&request.identities, &d.key)),
            );
        }
        Ok((devices, revision))
    }
}

fn wanted(identities: &HashSet<String>, key: &DeviceKey) -> bool {
    identities.is_empty() || identities.contains(&key.identity)
}

struct WatchTask {
    layout: Layout,
    identities: HashSet<String>,
    /// Leave notes of the revision being delivered, by device.
    notes: HashMap<DeviceKey, (i64, LeaveReason)>,
    /// The revision delivery resumes from.
    next: i64,
    outbound: mpsc::Sender<Result<pb::WatchPresenceResponse, Status>>,
    /// Where each batch's delivery time is observed.
    lag: Histogram,
    /// This watch's unit of the account's quota, given back when the task ends.
    _permit: QuotaPermit,
}

impl WatchTask {
    async fn run(
        mut self,
        snapshot: Option<(Vec<StoredDevice>, i64)>,
        mut items: mpsc::Receiver<WatchItem>,
        shutdown: CancellationToken,
    ) {
        if let Some((devices, revision)) = snapshot {
            for device in devices {
                let joined = Out::Joined(pb::DeviceJoined {
                    device: Some(device.to_device()),
                });
                if !self.send(revision, joined).await {
                    return;
                }
            }
            if !self
                .send(revision, Out::SnapshotComplete(pb::SnapshotComplete {}))
                .await
            {
                return;
            }
        }
        loop {
            let item = tokio::select! {
                _ = shutdown.cancelled() => {
                    let status = Error::ShuttingDown("resume from the last revision seen + 1 on another replica");
                    let _ = self.outbound.send(Err(status.into())).await;
                    return;
                }
                _ = self.outbound.closed() => return,
                item = items.recv() => item,
            };
            match item {
                Some(WatchItem::Events { events, revision }) => {
                    let arrived = Instant::now();
                    for event in events {
                        if let Some((revision, out)) = self.convert(&event)
                            && !self.send(revision, out).await
                        {
                            return;
                        }
                    }
                    self.lag.observe(arrived.elapsed().as_secs_f64());
                    self.next = revision + 1;
                }
                Some(WatchItem::Progress { revision }) => self.next = revision + 1,
                Some(WatchItem::Compacted { compact_revision }) => {
                    let compacted = Out::Compacted(pb::Compacted { compact_revision });
                    if self.send(compact_revision, compacted).await {
                        let error = Error::Compacted {
                            requested: self.next,
                            compact_revision,
                        };
                        let _ = self.outbound.send(Err(error.into())).await;
                    }
                    return;
                }
                // `follow` ends only after a compaction report or when dropped.
                None => return,
            }
        }
    }

    async fn send(&self, revision: i64, event: Out) -> bool {
        let response = pb::WatchPresenceResponse {
            revision,
            event: Some(event),
        };
        self.outbound.send(Ok(response)).await.is_ok()
    }

    /// The watcher's view of one etcd event, if it concerns a watched device.
    fn convert(&mut self, event: &Event) -> Option<(i64, Out)> {
        let kv = event.kv()?;
        let revision = kv.mod_revision();
        // A note is written in the same revision as its deletion: older ones are done.
        self.notes.retain(|_, (at, _)| *at >= revision);
        let put = event.event_type() == EventType::Put;
        match self.layout.parse(kv.key())? {
            ParsedKey::Note(key) => {
                if put && let Some(reason) = LeaveNote::reason_of(kv.value()) {
                    self.notes.insert(key, (revision, reason));
                }
                None
            }
            ParsedKey::Device(key) if !wanted(&self.identities, &key) => None,
            ParsedKey::Device(_) if put => {
                let device = StoredDevice::from_kv(&self.layout, kv)?.to_device();
                let out = if kv.create_revision() == revision {
                    Out::Joined(pb::DeviceJoined {
                        device: Some(device),
                    })
                } else {
                    Out::Updated(pb::DeviceUpdated {
                        device: Some(device),
                    })
                };
                Some((revision, out))
            }
            ParsedKey::Device(key) => {
                let device = event
                    .prev_kv()
                    .and_then(|prev| {
                        DeviceRecord::decode(prev.value())
                            .ok()
                            .map(|record| record.to_device(&key, prev.mod_revision()))
                    })
                    .unwrap_or_else(|| pb::Device {
                        device_id: key.device_id.clone(),
                        identity: key.identity.clone(),
                        account_id: key.account.clone(),
                        ..pb::Device::default()
                    });
                let reason = self
                    .notes
                    .remove(&key)
                    .map_or(pb::LeaveReason::Expired, |(_, reason)| reason.to_pb());
                let left = Out::Left(pb::DeviceLeft {
                    device: Some(device),
                    reason: reason as i32,
                });
                Some((revision, left))
            }
        }
    }
}

//! The engine: the one task per replica that owns the shards it claimed, decides every
//! Acquire/Release/Renew for their keys against a [`SlotTable`], and group-commits the
//! resulting slot records to etcd.
//!
//! Write path. Decisions are made in memory at once; the etcd writes they imply are queued
//! and committed in txns of up to [`MAX_TXN_OPS`] operations, one txn in flight at a time,
//! the next batch accumulating meanwhile. A grant is answered only after the txn holding
//! its record commits, so every slot a caller believes it holds is in etcd. A release is
//! answered at once: until its delete commits, etcd merely holds one slot too many, which
//! can only make a successor more conservative. Rejections touch nothing in etcd.
//!
//! Fencing. Every txn compares the create revision of each touched shard's ownership key
//! with the revision at which this replica claimed it. If the shard changed hands (our
//! replica lease expired and another replica claimed it), the txn fails and nothing of it
//! applies; the engine then drops or reloads the shard.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, GetOptions, PutOptions, Txn, TxnOp, TxnOpResponse};
use futures::future::BoxFuture;
use plumbing::etcd::{EtcdError, EtcdSession};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::limits::LimitTable;
use crate::model::{AcquireSpec, SHARDS, SlotId, SlotKey, now_ms};
use crate::stats::{EngineStats, ResourceLabels};
use crate::table::{Decision, KeyState, Slot, SlotTable};

/// etcd's default `--max-txn-ops` is 128; leave room for the fencing compares' sake.
pub const MAX_TXN_OPS: usize = 120;
/// How often expiries and queue deadlines are checked.
const TICK: Duration = Duration::from_millis(20);
/// Keys idle this long are forgotten (with their usage counters).
const IDLE_KEY_MS: u64 = 10 * 60 * 1000;
/// Pause before retrying a failed shard reload.
const RELOAD_BACKOFF: Duration = Duration::from_millis(250);
/// Grace before a replica that is not a shard's preferred owner claims it.
const CLAIM_GRACE_MS: u64 = 1_000;

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

type Reply<T> = oneshot::Sender<Result<T, EngineError>>;

/// What the engine is asked to do.
#[derive(Debug)]
pub enum Command {
    /// Acquire a slot.
    Acquire(AcquireSpec, Reply<AcquireReply>),
    /// Release a slot; `account` None for platform callers (any account).
    Release(SlotId, Option<String>, Reply<bool>),
    /// Renew a slot to `hold_secs` from now; answers the new expiry.
    Renew(SlotId, Option<String>, u32, Reply<u64>),
    /// Usage of one key.
    Usage(SlotKey, Reply<UsageReply>),
    /// Usage of every key of an account in the shards owned here.
    ListUsage(String, oneshot::Sender<Vec<UsageReply>>),
}

/// Submits commands to the engine task.
#[derive(Debug, Clone)]
pub struct EngineHandle {
    tx: mpsc::Sender<Command>,
    owned: watch::Receiver<Vec<u16>>,
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

    /// Shards this replica currently owns and serves.
    pub fn owned(&self) -> Vec<u16> {
        self.owned.borrow().clone()
    }
}

/// Who owns a shard, as the ownership key says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Owner {
    /// Owning replica.
    pub replica_id: String,
    /// Its gRPC address.
    pub address: String,
    /// Create revision of the ownership key (the claim's fencing token).
    pub claim_revision: i64,
}

/// The cluster as the routing mirror sees it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct View {
    /// Live replicas: id → address.
    pub members: HashMap<String, String>,
    /// Owner per shard.
    pub owners: HashMap<u16, Owner>,
    /// Claim revision of the last owner key deleted, per shard: if it is ours, we lost it.
    pub vacated: HashMap<u16, i64>,
}

impl View {
    /// The replica that should own `shard`: highest rendezvous hash among members.
    pub fn preferred(&self, shard: u16) -> Option<&str> {
        self.members
            .keys()
            .max_by_key(|id| rendezvous(shard, id))
            .map(String::as_str)
    }
}

fn rendezvous(shard: u16, replica: &str) -> u64 {
    let mut hash: u64 =
        0xcbf2_9ce4_8422_2325 ^ u64::from(shard).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for byte in replica.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// Everything the engine needs from its replica.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// etcd.
    pub session: EtcdSession,
    /// This replica's id.
    pub replica_id: String,
    /// This replica's address (written into ownership keys).
    pub address: String,
    /// The replica lease: ownership keys are attached to it.
    pub replica_lease: i64,
    /// Fires when the replica lease is lost.
    pub lease_lost: CancellationToken,
    /// Limits in force.
    pub limits: LimitTable,
    /// Routing view, kept by the routing mirror.
    pub view: watch::Receiver<View>,
    /// Where the engine's metrics go.
    pub stats: EngineStats,
}

/// A slot record as stored in etcd.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
struct SlotRecord {
    a: String,
    r: String,
    #[serde(default)]
    q: String,
    e: u64,
}

#[derive(Debug)]
enum Write {
    Put(Slot),
    Delete(u16, SlotId),
}

impl Write {
    fn id(&self) -> &SlotId {
        match self {
            Write::Put(slot) => &slot.id,
            Write::Delete(_, id) => id,
        }
    }

    fn shard(&self) -> u16 {
        self.id().shard()
    }
}

enum Ack {
    Grant {
        reply: Reply<AcquireReply>,
        in_flight: u32,
        limit: u32,
        shadow: bool,
    },
    Renew(Reply<u64>),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ShardState {
    Unowned { since_ms: u64 },
    Claiming,
    Owned { claim_revision: i64 },
    Reloading { claim_revision: i64 },
}

enum Event {
    Committed {
        writes: Vec<Write>,
        leases: Vec<(u64, i64)>,
        result: Result<(), EtcdError>,
    },
    Loaded {
        shard: u16,
        result: Result<Option<(i64, Vec<Slot>)>, EtcdError>,
    },
}

/// Starts the engine task.
pub fn start(config: EngineConfig) -> EngineHandle {
    let (tx, rx) = mpsc::channel(4096);
    let (owned_tx, owned) = watch::channel(Vec::new());
    let (events_tx, events) = mpsc::unbounded_channel();
    let engine = Engine {
        shards: (0..SHARDS)
            .map(|_| ShardState::Unowned { since_ms: now_ms() })
            .collect(),
        table: SlotTable::default(),
        pending: Vec::new(),
        acks: HashMap::new(),
        committing: false,
        leases: HashMap::new(),
        owned: owned_tx,
        events: events_tx,
        next_cleanup_ms: 0,
        config,
    };
    tokio::spawn(engine.run(rx, events));
    EngineHandle { tx, owned }
}

struct Engine {
    config: EngineConfig,
    shards: Vec<ShardState>,
    table: SlotTable<Reply<AcquireReply>>,
    pending: Vec<Write>,
    acks: HashMap<SlotId, Vec<Ack>>,
    committing: bool,
    /// Bucket lease per expiry second.
    leases: HashMap<u64, i64>,
    owned: watch::Sender<Vec<u16>>,
    events: mpsc::UnboundedSender<Event>,
    next_cleanup_ms: u64,
}

impl Engine {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut events: mpsc::UnboundedReceiver<Event>,
    ) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut limits = self.config.limits.changes();
        let mut view = self.config.view.clone();
        let lost = self.config.lease_lost.clone();
        loop {
            tokio::select! {
                command = commands.recv() => {
                    let Some(command) = command else { return };
                    self.handle(command);
                    // Take whatever else is waiting, so one txn carries it all.
                    while let Ok(command) = commands.try_recv() {
                        self.handle(command);
                    }
                }
                Some(event) = events.recv() => self.on_event(event),
                _ = tick.tick() => {
                    self.on_tick();
                    self.rebalance();
                }
                Ok(()) = limits.changed() => self.drain_all_queues(),
                Ok(()) = view.changed() => self.rebalance(),
                _ = lost.cancelled(), if !self.owned.borrow().is_empty() => {
                    tracing::error!("replica lease lost: giving up every shard");
                    for shard in 0..SHARDS {
                        self.give_up(shard);
                    }
                }
            }
            if !self.committing && !self.pending.is_empty() {
                self.start_commit();
            }
        }
    }

    fn handle(&mut self, command: Command) {
        match command {
            Command::Acquire(spec, reply) => self.acquire(spec, reply),
            Command::Release(id, account, reply) => {
                let result = self
                    .owned_shard(id.shard())
                    .and_then(|()| self.release(&id, account.as_deref()));
                let _ = reply.send(result);
            }
            Command::Renew(id, account, hold, reply) => {
                self.renew(id, account.as_deref(), hold, reply)
            }
            Command::Usage(key, reply) => {
                let result = self.owned_shard(key.shard()).map(|()| self.usage(&key));
                let _ = reply.send(result);
            }
            Command::ListUsage(account, reply) => {
                let keys: Vec<SlotKey> = self
                    .table
                    .keys_of(&account)
                    .map(|(k, _)| k.clone())
                    .collect();
                let _ = reply.send(keys.iter().map(|k| self.usage(k)).collect());
            }
        }
    }

    fn owned_shard(&self, shard: u16) -> Result<(), EngineError> {
        match self.shards.get(usize::from(shard)) {
            Some(ShardState::Owned { .. }) => Ok(()),
            _ => Err(EngineError::NotOwner(shard)),
        }
    }

    fn acquire(&mut self, spec: AcquireSpec, reply: Reply<AcquireReply>) {
        if let Err(err) = self.owned_shard(spec.key.shard()) {
            let _ = reply.send(Err(err));
            return;
        }
        let (limit, _) = self.config.limits.effective(&spec.key);
        let now = now_ms();
        let (decision, reply) = self.table.decide(
            &spec.key,
            &spec.request_id,
            spec.hold_secs,
            spec.wait_ms,
            limit,
            now,
            reply,
        );
        let Some(reply) = reply else { return }; // queued
        let max = limit.map_or(0, |l| l.max_in_flight);
        match decision {
            Decision::Grant {
                slot,
                in_flight,
                shadow,
            } => {
                self.config.stats.granted(&spec.key.resource);
                self.acks
                    .entry(slot.id.clone())
                    .or_default()
                    .push(Ack::Grant {
                        reply,
                        in_flight,
                        limit: max,
                        shadow,
                    });
                self.pending.push(Write::Put(slot));
            }
            Decision::Existing(slot) if slot.committed => {
                let in_flight = self.table.key(&spec.key).map_or(0, KeyState::held);
                let _ = reply.send(Ok(granted(&slot, in_flight, max, false)));
            }
            Decision::Existing(slot) => {
                let in_flight = self.table.key(&spec.key).map_or(0, KeyState::held);
                self.acks.entry(slot.id).or_default().push(Ack::Grant {
                    reply,
                    in_flight,
                    limit: max,
                    shadow: false,
                });
            }
            Decision::Reject { in_flight } => {
                self.config.stats.rejected(&spec.key.resource);
                let retry = self.retry_after(&spec.key, now);
                let _ = reply.send(Ok(rejected(in_flight, max, retry)));
            }
            Decision::Queued => {}
        }
    }

    fn release(&mut self, id: &SlotId, account: Option<&str>) -> Result<bool, EngineError> {
        let Some(slot) = self.table.slot(id) else {
            return Ok(false);
        };
        if account.is_some_and(|a| a != slot.key.account) {
            return Ok(false);
        }
        if !slot.committed {
            // Its grant has not been answered yet, so nobody can hold this id legitimately.
            return Ok(false);
        }
        let Some(slot) = self.table.remove(id) else {
            return Ok(false);
        };
        self.pending.push(Write::Delete(id.shard(), id.clone()));
        self.drain_queue(&slot.key);
        Ok(true)
    }

    fn renew(&mut self, id: SlotId, account: Option<&str>, hold_secs: u32, reply: Reply<u64>) {
        if let Err(err) = self.owned_shard(id.shard()) {
            let _ = reply.send(Err(err));
            return;
        }
        let held = self
            .table
            .slot(&id)
            .is_some_and(|s| s.committed && account.is_none_or(|a| a == s.key.account));
        if !held {
            let _ = reply.send(Err(EngineError::NotFound));
            return;
        }
        match self
            .table
            .renew(&id, now_ms() + u64::from(hold_secs) * 1000)
        {
            Some(slot) => {
                self.acks.entry(id).or_default().push(Ack::Renew(reply));
                self.pending.push(Write::Put(slot));
            }
            None => {
                let _ = reply.send(Err(EngineError::NotFound));
            }
        }
    }

    fn usage(&self, key: &SlotKey) -> UsageReply {
        let (limit, _) = self.config.limits.effective(key);
        let state = self.table.key(key);
        UsageReply {
            key: key.clone(),
            in_flight: state.map_or(0, KeyState::held),
            limit: limit.map_or(0, |l| l.max_in_flight),
            shadow: limit.is_some_and(|l| l.shadow),
            queued: state.map_or(0, KeyState::queued),
            granted_total: state.map_or(0, |s| s.granted_total),
            rejected_total: state.map_or(0, |s| s.rejected_total),
            shadow_rejected_total: state.map_or(0, |s| s.shadow_rejected_total),
        }
    }

    fn retry_after(&self, key: &SlotKey, now: u64) -> u32 {
        let until_expiry = self
            .table
            .key(key)
            .and_then(KeyState::next_expiry)
            .map_or(1000, |e| e.saturating_sub(now));
        until_expiry.clamp(10, 1000) as u32
    }

    fn on_tick(&mut self) {
        let now = now_ms();
        for key in self.table.expire(now) {
            self.drain_queue(&key);
        }
        for key in self.table.keys_with_queues() {
            self.drain_queue(&key);
        }
        self.leases.retain(|bucket, _| *bucket * 1000 > now);
        if now >= self.next_cleanup_ms {
            self.table.forget_idle(now, IDLE_KEY_MS);
            self.publish_gauges();
            self.next_cleanup_ms = now + 1000;
        }
    }

    fn drain_all_queues(&mut self) {
        for key in self.table.keys_with_queues() {
            self.drain_queue(&key);
        }
    }

    fn drain_queue(&mut self, key: &SlotKey) {
        let (limit, _) = self.config.limits.effective(key);
        let now = now_ms();
        let (granted, expired) = self
            .table
            .drain_queue(key, limit, now, |reply| !reply.is_closed());
        let max = limit.map_or(0, |l| l.max_in_flight);
        for (slot, in_flight, reply) in granted {
            self.config.stats.granted(&key.resource);
            self.acks
                .entry(slot.id.clone())
                .or_default()
                .push(Ack::Grant {
                    reply,
                    in_flight,
                    limit: max,
                    shadow: false,
                });
            self.pending.push(Write::Put(slot));
        }
        for waiter in expired {
            self.config.stats.rejected(&key.resource);
            let in_flight = self.table.key(key).map_or(0, KeyState::held);
            let retry = self.retry_after(key, now);
            let _ = waiter.reply.send(Ok(rejected(in_flight, max, retry)));
        }
    }

    /// Takes up to [`MAX_TXN_OPS`] pending writes (never two for one slot) into one txn.
    fn start_commit(&mut self) {
        let mut batch = Vec::new();
        let mut rest = Vec::new();
        let mut seen = HashSet::new();
        for write in self.pending.drain(..) {
            if batch.len() < MAX_TXN_OPS && seen.insert(write.id().clone()) {
                batch.push(write);
            } else {
                rest.push(write);
            }
        }
        self.pending = rest;
        let mut fences = Vec::new();
        for shard in batch.iter().map(Write::shard).collect::<HashSet<_>>() {
            // A shard lost while its writes were queued gets no fence, and its writes are dropped.
            if let ShardState::Owned { claim_revision } = self.shards[usize::from(shard)] {
                fences.push((shard, claim_revision));
            }
        }
        let fenced: HashSet<u16> = fences.iter().map(|(s, _)| *s).collect();
        let (batch, orphans): (Vec<_>, Vec<_>) =
            batch.into_iter().partition(|w| fenced.contains(&w.shard()));
        for write in orphans {
            self.fail_acks(write.id(), EngineError::NotOwner(write.shard()));
        }
        if batch.is_empty() {
            return;
        }
        self.committing = true;
        self.config.stats.batch_size.observe(batch.len() as f64);
        let latency = self.config.stats.txn_seconds.clone();
        let commit = commit(
            self.config.session.clone(),
            fences,
            batch,
            self.leases.clone(),
        );
        let events = self.events.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let (writes, leases, result) = commit.await;
            latency.observe(started.elapsed().as_secs_f64());
            let _ = events.send(Event::Committed {
                writes,
                leases,
                result,
            });
        });
    }

    fn on_event(&mut self, event: Event) {
        match event {
            Event::Committed {
                writes,
                leases,
                result,
            } => {
                self.committing = false;
                self.leases.extend(leases);
                match result {
                    Ok(()) => {
                        for write in writes {
                            if let Write::Put(slot) = write {
                                self.table.mark_committed(&slot.id);
                                self.answer_acks(&slot);
                            }
                        }
                    }
                    Err(err) => {
                        tracing::warn!(error = %err, "slot txn failed; reloading its shards");
                        let shards: HashSet<u16> = writes.iter().map(Write::shard).collect();
                        for write in &writes {
                            self.fail_acks(
                                write.id(),
                                EngineError::Unavailable(format!("slot not stored: {err}")),
                            );
                        }
                        for shard in shards {
                            self.reload(shard);
                        }
                    }
                }
            }
            Event::Loaded { shard, result } => self.on_loaded(shard, result),
        }
    }

    fn answer_acks(&mut self, slot: &Slot) {
        for ack in self.acks.remove(&slot.id).unwrap_or_default() {
            match ack {
                Ack::Grant {
                    reply,
                    in_flight,
                    limit,
                    shadow,
                } => {
                    let _ = reply.send(Ok(granted(slot, in_flight, limit, shadow)));
                }
                Ack::Renew(reply) => {
                    let _ = reply.send(Ok(slot.expire_ms));
                }
            }
        }
    }

    fn fail_acks(&mut self, id: &SlotId, err: EngineError) {
        for ack in self.acks.remove(id).unwrap_or_default() {
            match ack {
                Ack::Grant { reply, .. } => {
                    let _ = reply.send(Err(err.clone()));
                }
                Ack::Renew(reply) => {
                    let _ = reply.send(Err(err.clone()));
                }
            }
        }
    }

    /// Claims unowned shards this replica should own (or that nobody claimed in time), and
    /// notices shards taken over by others.
    fn rebalance(&mut self) {
        let view = self.config.view.borrow().clone();
        let me = self.config.replica_id.clone();
        let now = now_ms();
        for shard in 0..SHARDS {
            let owner = view.owners.get(&shard);
            match (self.shards[usize::from(shard)], owner) {
                (
                    ShardState::Owned { claim_revision } | ShardState::Reloading { claim_revision },
                    Some(owner),
                ) if owner.replica_id != me && owner.claim_revision > claim_revision => {
                    tracing::warn!(shard, owner = %owner.replica_id, "shard taken over by another replica");
                    self.give_up(shard);
                }
                (ShardState::Owned { claim_revision }, None)
                    if view.vacated.get(&shard) == Some(&claim_revision) =>
                {
                    tracing::warn!(
                        shard,
                        "shard ownership key vanished (replica lease expired?)"
                    );
                    self.give_up(shard);
                }
                (ShardState::Unowned { since_ms }, None) => {
                    let preferred = view.preferred(shard) == Some(me.as_str());
                    if preferred || now.saturating_sub(since_ms) > CLAIM_GRACE_MS {
                        self.claim(shard);
                    }
                }
                (ShardState::Unowned { .. }, Some(_)) => {
                    self.shards[usize::from(shard)] = ShardState::Unowned { since_ms: now };
                }
                _ => {}
            }
        }
    }

    fn claim(&mut self, shard: u16) {
        self.shards[usize::from(shard)] = ShardState::Claiming;
        let load = load_shard(
            self.config.session.clone(),
            shard,
            Fence::Claim {
                replica_id: self.config.replica_id.clone(),
                address: self.config.address.clone(),
                lease: self.config.replica_lease,
            },
        );
        spawn_load(shard, load, &self.events);
    }

    fn reload(&mut self, shard: u16) {
        let ShardState::Owned { claim_revision } = self.shards[usize::from(shard)] else {
            return;
        };
        self.drop_state(
            shard,
            EngineError::Unavailable(format!("shard {shard} is reloading")),
        );
        self.shards[usize::from(shard)] = ShardState::Reloading { claim_revision };
        spawn_load(
            shard,
            load_shard(
                self.config.session.clone(),
                shard,
                Fence::Owned(claim_revision),
            ),
            &self.events,
        );
        self.publish_owned();
    }

    fn on_loaded(&mut self, shard: u16, result: Result<Option<(i64, Vec<Slot>)>, EtcdError>) {
        let state = self.shards[usize::from(shard)];
        match (state, result) {
            (
                ShardState::Claiming | ShardState::Reloading { .. },
                Ok(Some((claim_revision, slots))),
            ) => {
                let now = now_ms();
                for mut slot in slots.into_iter().filter(|s| s.expire_ms > now) {
                    slot.committed = true;
                    self.table.load(slot);
                }
                self.shards[usize::from(shard)] = ShardState::Owned { claim_revision };
                tracing::info!(shard, claim_revision, "shard owned");
            }
            (ShardState::Reloading { claim_revision }, Err(err)) => {
                tracing::warn!(shard, error = %err, "shard reload failed; retrying");
                let load = load_shard(
                    self.config.session.clone(),
                    shard,
                    Fence::Owned(claim_revision),
                );
                let events = self.events.clone();
                tokio::spawn(async move {
                    tokio::time::sleep(RELOAD_BACKOFF).await;
                    let result = load.await;
                    let _ = events.send(Event::Loaded { shard, result });
                });
                return;
            }
            (_, Ok(None) | Err(_)) => {
                self.shards[usize::from(shard)] = ShardState::Unowned { since_ms: now_ms() };
            }
            _ => {}
        }
        self.publish_owned();
    }

    fn give_up(&mut self, shard: u16) {
        self.drop_state(shard, EngineError::NotOwner(shard));
        self.shards[usize::from(shard)] = ShardState::Unowned { since_ms: now_ms() };
        self.publish_owned();
    }

    fn drop_state(&mut self, shard: u16, err: EngineError) {
        for waiter in self.table.drop_shard(shard) {
            let _ = waiter.reply.send(Err(err.clone()));
        }
        let ids: Vec<SlotId> = self
            .acks
            .keys()
            .filter(|id| id.shard() == shard)
            .cloned()
            .collect();
        for id in ids {
            self.fail_acks(&id, err.clone());
        }
        self.pending.retain(|w| w.shard() != shard);
    }

    fn publish_gauges(&self) {
        let stats = &self.config.stats;
        stats.in_flight.clear();
        stats.queued.clear();
        for (key, state) in self.table.keys() {
            let labels = ResourceLabels { resource: key.resource.clone() };
            stats.in_flight.get_or_create(&labels).inc_by(i64::from(state.held()));
            stats.queued.get_or_create(&labels).inc_by(i64::from(state.queued()));
        }
        stats.shards_owned.set(self.owned.borrow().len() as i64);
    }

    fn publish_owned(&self) {
        let owned: Vec<u16> = (0..SHARDS)
            .filter(|s| matches!(self.shards[usize::from(*s)], ShardState::Owned { .. }))
            .collect();
        self.owned.send_if_modified(|current| {
            let changed = *current != owned;
            *current = owned;
            changed
        });
    }
}

fn granted(slot: &Slot, in_flight: u32, limit: u32, shadow: bool) -> AcquireReply {
    AcquireReply {
        granted: true,
        slot_id: slot.id.as_str().to_owned(),
        in_flight,
        limit,
        retry_after_ms: 0,
        expire_ms: slot.expire_ms,
        shadow,
    }
}

fn rejected(in_flight: u32, limit: u32, retry_after_ms: u32) -> AcquireReply {
    AcquireReply {
        granted: false,
        slot_id: String::new(),
        in_flight,
        limit,
        retry_after_ms,
        expire_ms: 0,
        shadow: false,
    }
}

/// The ownership key of a shard.
pub fn shard_key(session: &EtcdSession, shard: u16) -> String {
    session.key(&format!("limiter/shards/{shard:02x}"))
}

fn slots_prefix(session: &EtcdSession, shard: u16) -> String {
    session.key(&format!("limiter/slots/{shard:02x}/"))
}

/// The bucket (expiry second, plus one of grace) whose lease carries a slot.
fn bucket_of(expire_ms: u64) -> u64 {
    expire_ms.div_ceil(1000) + 1
}

type CommitOutcome = (Vec<Write>, Vec<(u64, i64)>, Result<(), EtcdError>);

/// Grants missing bucket leases, then commits the batch fenced by `fences`.
fn commit(
    session: EtcdSession,
    fences: Vec<(u16, i64)>,
    writes: Vec<Write>,
    known: HashMap<u64, i64>,
) -> BoxFuture<'static, CommitOutcome> {
    Box::pin(async move {
        let mut granted = Vec::new();
        let mut leases = known;
        let mut client = session.client();
        let buckets: HashSet<u64> = writes
            .iter()
            .filter_map(|w| {
                if let Write::Put(s) = w {
                    Some(bucket_of(s.expire_ms))
                } else {
                    None
                }
            })
            .collect();
        for bucket in buckets {
            if leases.contains_key(&bucket) {
                continue;
            }
            let ttl = (bucket * 1000)
                .saturating_sub(now_ms())
                .div_ceil(1000)
                .max(2) as i64;
            match session.bounded(client.lease_grant(ttl, None)).await {
                Ok(lease) => {
                    leases.insert(bucket, lease.id());
                    granted.push((bucket, lease.id()));
                }
                Err(err) => return (writes, granted, Err(err)),
            }
        }
        let compares: Vec<Compare> = fences
            .iter()
            .map(|(shard, rev)| {
                Compare::create_revision(shard_key(&session, *shard), CompareOp::Equal, *rev)
            })
            .collect();
        let ops: Vec<TxnOp> = writes
            .iter()
            .map(|write| match write {
                Write::Put(slot) => {
                    let record = SlotRecord {
                        a: slot.key.account.clone(),
                        r: slot.key.resource.clone(),
                        q: slot.request_id.clone(),
                        e: slot.expire_ms,
                    };
                    let lease = leases.get(&bucket_of(slot.expire_ms)).copied().unwrap_or(0);
                    TxnOp::put(
                        format!(
                            "{}{}",
                            slots_prefix(&session, slot.id.shard()),
                            slot.id.as_str()
                        ),
                        serde_json::to_vec(&record).unwrap_or_default(),
                        Some(PutOptions::new().with_lease(lease)),
                    )
                }
                Write::Delete(shard, id) => TxnOp::delete(
                    format!("{}{}", slots_prefix(&session, *shard), id.as_str()),
                    None,
                ),
            })
            .collect();
        let txn = Txn::new().when(compares).and_then(ops);
        let result = match session.bounded(client.txn(txn)).await {
            Ok(response) if response.succeeded() => Ok(()),
            Ok(_) => Err(EtcdError::Unavailable("shard ownership changed".into())),
            Err(err) => Err(err),
        };
        (writes, granted, result)
    })
}

enum Fence {
    /// Claim the shard (it must be unowned), then read it.
    Claim {
        replica_id: String,
        address: String,
        lease: i64,
    },
    /// Read it if we still own it under this claim revision.
    Owned(i64),
}

/// Reads a shard's slots in the same txn that claims it or proves it is still ours. Ok(None):
/// not ours.
async fn load_shard(
    session: EtcdSession,
    shard: u16,
    fence: Fence,
) -> Result<Option<(i64, Vec<Slot>)>, EtcdError> {
    let key = shard_key(&session, shard);
    let prefix = slots_prefix(&session, shard);
    let read = TxnOp::get(prefix.clone(), Some(GetOptions::new().with_prefix()));
    let txn = match &fence {
        Fence::Claim {
            replica_id,
            address,
            lease,
        } => {
            let owner =
                serde_json::json!({ "replica_id": replica_id, "address": address }).to_string();
            Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([
                    TxnOp::put(
                        key.clone(),
                        owner,
                        Some(PutOptions::new().with_lease(*lease)),
                    ),
                    read,
                ])
        }
        Fence::Owned(rev) => Txn::new()
            .when([Compare::create_revision(
                key.clone(),
                CompareOp::Equal,
                *rev,
            )])
            .and_then([read]),
    };
    let mut client = session.client();
    let response = session.bounded(client.txn(txn)).await?;
    if !response.succeeded() {
        return Ok(None);
    }
    let claim_revision = match fence {
        Fence::Claim { .. } => response.header().map_or(0, |h| h.revision()),
        Fence::Owned(rev) => rev,
    };
    let mut slots = Vec::new();
    for op in response.op_responses() {
        if let TxnOpResponse::Get(get) = op {
            for kv in get.kvs() {
                let Some(id) = kv
                    .key_str()
                    .ok()
                    .and_then(|k| k.strip_prefix(prefix.as_str()))
                else {
                    continue;
                };
                let (Ok(id), Ok(record)) = (
                    SlotId::parse("slot", id),
                    serde_json::from_slice::<SlotRecord>(kv.value()),
                ) else {
                    tracing::warn!(key = ?kv.key_str(), "ignoring unreadable slot record");
                    continue;
                };
                slots.push(Slot {
                    id,
                    key: SlotKey {
                        account: record.a,
                        resource: record.r,
                    },
                    request_id: record.q,
                    expire_ms: record.e,
                    committed: true,
                });
            }
        }
    }
    Ok(Some((claim_revision, slots)))
}

fn spawn_load(
    shard: u16,
    load: impl std::future::Future<Output = Result<Option<(i64, Vec<Slot>)>, EtcdError>>
    + Send
    + 'static,
    events: &mpsc::UnboundedSender<Event>,
) {
    let events = events.clone();
    tokio::spawn(async move {
        let result = load.await;
        let _ = events.send(Event::Loaded { shard, result });
    });
}

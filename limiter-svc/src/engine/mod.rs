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

mod escrow;
mod handle;
mod shards;
mod store;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use plumbing::etcd::{EtcdError, EtcdSession};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

use crate::limits::LimitTable;
use crate::model::{AcquireSpec, SHARDS, SlotId, SlotKey, now_ms};
use crate::stats::{EngineStats, ResourceLabels};
use crate::table::{Decision, KeyState, Slot, SlotTable};

use escrow::Block;
pub use escrow::MAX_ESCROW_HOLD_SECS;
use handle::Reply;
pub use handle::{AcquireReply, Command, EngineError, EngineHandle, UsageReply};
use shards::ShardState;
pub use shards::{Owner, View};
pub use store::shard_key;
use store::{CommitError, LoadedShard, ShardFence, Write, commit};

/// etcd's default `--max-txn-ops` is 128; leave room for the fencing compares' sake.
pub const MAX_TXN_OPS: usize = 120;
/// Slot txns one engine keeps in flight at once: the next batch need not wait for the
/// previous commit, and etcd shares one fsync among concurrent txns.
const MAX_TXNS_IN_FLIGHT: usize = 2;
/// How often expiries and queue deadlines are checked.
const TICK: Duration = Duration::from_millis(20);
/// Keys idle this long are forgotten (with their usage counters).
const IDLE_KEY_MS: u64 = 10 * 60 * 1000;
/// Pause before retrying a failed shard reload.
const RELOAD_BACKOFF: Duration = Duration::from_millis(250);
/// Grace before a replica that is not a shard's preferred owner claims it.
const CLAIM_GRACE_MS: u64 = 1_000;

/// Everything the engine needs from its replica.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// etcd.
    pub session: EtcdSession,
    /// This replica's id.
    pub replica_id: String,
    /// This replica's address (written into ownership keys).
    pub address: String,
    /// The replica lease in force: ownership keys are attached to it. It changes when a
    /// lost lease is replaced; every shard claimed under the old one is given up then.
    pub replica_lease: watch::Receiver<i64>,
    /// Fires when the first replica lease is lost (later losses show as lease changes and
    /// as ownership keys vanishing from the view).
    pub lease_lost: CancellationToken,
    /// Limits in force.
    pub limits: LimitTable,
    /// Routing view, kept by the routing mirror.
    pub view: watch::Receiver<View>,
    /// Where the engine's metrics go.
    pub stats: EngineStats,
    /// Keys whose limit is at least this are granted from escrow blocks (0: never).
    pub escrow_min_limit: u32,
}

/// Bits of a fencing token below the revision: grants numbered within one revision.
const TOKEN_SEQ_BITS: u32 = 24;

enum Ack {
    Grant {
        reply: Reply<AcquireReply>,
        in_flight: u32,
        limit: u32,
        shadow: bool,
    },
    Renew(Reply<(u64, u64)>),
}

enum Event {
    Committed {
        writes: Vec<Write>,
        leases: Vec<(u64, i64)>,
        result: Result<i64, CommitError>,
    },
    Loaded {
        shard: u16,
        result: Result<Option<LoadedShard>, EtcdError>,
    },
    HandedOff {
        shard: u16,
        leases: Vec<(u64, i64)>,
        result: Result<i64, CommitError>,
    },
}

/// What the txns in flight touch.
#[derive(Debug, Default)]
struct InFlight {
    txns: usize,
    per_shard: HashMap<u16, usize>,
}

impl InFlight {
    fn begin(&mut self, writes: &[Write]) {
        self.txns += 1;
        for write in writes {
            *self.per_shard.entry(write.shard()).or_default() += 1;
        }
    }

    /// Ends a txn; returns the shards that no longer have a write in flight.
    fn end(&mut self, writes: &[Write]) -> Vec<u16> {
        self.txns = self.txns.saturating_sub(1);
        let mut drained = Vec::new();
        for write in writes {
            if let Some(count) = self.per_shard.get_mut(&write.shard()) {
                *count -= 1;
                if *count == 0 {
                    self.per_shard.remove(&write.shard());
                    drained.push(write.shard());
                }
            }
        }
        drained
    }

    fn touches(&self, shard: u16) -> bool {
        self.per_shard.contains_key(&shard)
    }
}

/// Starts the engine task.
pub fn start(config: EngineConfig) -> EngineHandle {
    let (tx, rx) = mpsc::channel(4096);
    let (owned_tx, owned) = watch::channel(Vec::new());
    let (held_tx, held) = watch::channel(0);
    let (events_tx, events) = mpsc::unbounded_channel();
    let engine = Engine {
        shards: (0..SHARDS)
            .map(|_| ShardState::Unowned { since_ms: now_ms() })
            .collect(),
        table: SlotTable::default(),
        pending: Vec::new(),
        acks: HashMap::new(),
        in_flight: InFlight::default(),
        loading: HashSet::new(),
        leases: HashMap::new(),
        blocks: HashMap::new(),
        fences: vec![(0, 0); usize::from(SHARDS)],
        marks: vec![0; usize::from(SHARDS)],
        nonces: 0,
        leaving: false,
        owned: owned_tx,
        held: held_tx,
        events: events_tx,
        next_cleanup_ms: 0,
        config,
    };
    tokio::spawn(engine.run(rx, events));
    EngineHandle { tx, owned, held }
}

struct Engine {
    config: EngineConfig,
    shards: Vec<ShardState>,
    table: SlotTable<Reply<AcquireReply>>,
    pending: Vec<Write>,
    acks: HashMap<SlotId, Vec<Ack>>,
    /// Txns being committed, and what they touch.
    in_flight: InFlight,
    /// Shards whose reload read is under way.
    loading: HashSet<u16>,
    /// Bucket lease per expiry second.
    leases: HashMap<u64, i64>,
    /// Escrow block per key that has one.
    blocks: HashMap<SlotKey, Block>,
    /// Per shard: (revision, grants numbered since) — the source of fencing tokens.
    fences: Vec<(i64, u32)>,
    /// Per shard: the commit marker's mod revision after our last txn of it.
    marks: Vec<i64>,
    /// Txn nonces handed out (with the replica id, unique across the fleet's history).
    nonces: u64,
    /// Shutting down: hand every shard off, claim nothing.
    leaving: bool,
    owned: watch::Sender<Vec<u16>>,
    /// Shards in any state but unowned.
    held: watch::Sender<usize>,
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
        let mut lease = self.config.replica_lease.clone();
        let mut lost_seen = false;
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
                _ = lost.cancelled(), if !lost_seen => {
                    lost_seen = true;
                    tracing::error!("replica lease lost: giving up every shard");
                    self.give_up_all();
                }
                Ok(()) = lease.changed() => {
                    // Everything claimed under the old lease is gone from etcd; claim again
                    // under the new one once the membership is back (`rebalance`).
                    tracing::warn!(lease = *lease.borrow(), "a new replica lease: giving up every shard claimed under the old one");
                    self.give_up_all();
                    self.rebalance();
                }
            }
            if self.in_flight.txns < MAX_TXNS_IN_FLIGHT && !self.pending.is_empty() {
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
            Command::Leave => {
                tracing::info!("leaving: handing every shard off");
                self.leaving = true;
                self.rebalance();
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
        let escrow = self.escrow_eligible(&spec.request_id, spec.hold_secs, limit);
        let (decision, reply) = self.table.decide(
            &spec.key,
            &spec.request_id,
            spec.hold_secs,
            spec.wait_ms,
            limit,
            now,
            escrow,
            reply,
        );
        let Some(reply) = reply else { return }; // queued
        let max = limit.map_or(0, |l| l.max_in_flight);
        match decision {
            Decision::Grant {
                mut slot,
                in_flight,
                shadow,
            } => {
                let Some(token) = self.next_token(slot.id.shard()) else {
                    self.table.remove(&slot.id);
                    self.bump_fence(&spec.key);
                    let _ = reply.send(Err(EngineError::Unavailable(
                        "fencing tokens of this shard are exhausted until its next write; retry"
                            .into(),
                    )));
                    return;
                };
                slot.token = token;
                self.table.set_token(&slot.id, token);
                self.config.stats.granted(&spec.key.resource);
                let ack = Ack::Grant {
                    reply,
                    in_flight,
                    limit: max,
                    shadow,
                };
                if slot.escrow {
                    self.escrow_grant(slot, ack);
                } else {
                    self.acks.entry(slot.id.clone()).or_default().push(ack);
                    self.pending.push(Write::Put(slot));
                }
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
        if !slot.escrow {
            self.pending.push(Write::Delete(id.shard(), id.clone()));
        }
        self.drain_queue(&slot.key);
        Ok(true)
    }

    fn renew(
        &mut self,
        id: SlotId,
        account: Option<&str>,
        hold_secs: u32,
        reply: Reply<(u64, u64)>,
    ) {
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
            Some(slot) if slot.escrow => self.escrow_renew(slot, Ack::Renew(reply)),
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
            self.maintain_blocks();
            for shard in 0..SHARDS {
                self.try_hand_off(shard);
            }
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
        for (mut slot, in_flight, reply) in granted {
            // Queued grants are exact and always written, so the shard's revision moves
            // on well before its sequence could run out.
            slot.token = self.next_token(slot.id.shard()).unwrap_or(u64::MAX);
            self.table.set_token(&slot.id, slot.token);
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

    /// Takes pending writes into one txn: never two for one slot, none of a shard that has
    /// a txn in flight (a shard's txns apply one after the other, each expecting the commit
    /// marker the previous one left), and no more than etcd's txn limits allow once each
    /// shard's two compares and marker put are counted.
    fn start_commit(&mut self) {
        let mut batch = Vec::new();
        let mut rest = Vec::new();
        let mut seen = HashSet::new();
        let mut shards = HashSet::new();
        for write in std::mem::take(&mut self.pending) {
            let shard = write.shard();
            let shards_after = shards.len() + usize::from(!shards.contains(&shard));
            let owned = matches!(
                self.shards[usize::from(shard)],
                ShardState::Owned { .. } | ShardState::HandingOff { .. }
            );
            if !owned {
                // A shard lost while its writes were queued: its writes are dropped.
                self.fail_acks(write.id(), EngineError::NotOwner(shard));
                continue;
            }
            if batch.len() + 1 + shards_after <= MAX_TXN_OPS
                && 2 * shards_after <= MAX_TXN_OPS
                && !self.in_flight.touches(shard)
                && seen.insert(write.id().clone())
            {
                shards.insert(shard);
                batch.push(write);
            } else {
                rest.push(write);
            }
        }
        self.pending = rest;
        if batch.is_empty() {
            return;
        }
        let fences: Vec<ShardFence> = shards
            .iter()
            .filter_map(|&shard| self.fence_of(shard))
            .collect();
        self.in_flight.begin(&batch);
        self.config.stats.txn.batch(batch.len());
        let txn = self.config.stats.txn.clone();
        let nonce = self.next_nonce();
        let commit = commit(
            self.config.session.clone(),
            fences,
            batch,
            self.leases.clone(),
            nonce,
        );
        let events = self.events.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let (writes, leases, result) = commit.await;
            txn.latency(started.elapsed());
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
                let drained = self.in_flight.end(&writes);
                self.leases.extend(leases);
                match result {
                    Ok(revision) => {
                        let shards: HashSet<u16> = writes.iter().map(Write::shard).collect();
                        for shard in shards {
                            self.raise_fence(shard, revision);
                            self.marks[usize::from(shard)] = revision;
                        }
                        for write in writes {
                            match write {
                                Write::Put(slot) => {
                                    self.table.mark_committed(&slot.id);
                                    self.answer_acks(&slot);
                                }
                                Write::Block(record) => self.block_committed(&record),
                                Write::Delete(..) => {}
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
                // A reload waits until no txn of its shard is in flight, so it reads
                // everything any of them committed.
                for shard in drained {
                    self.start_reload_if_waiting(shard);
                    self.try_hand_off(shard);
                }
            }
            Event::Loaded { shard, result } => self.on_loaded(shard, result),
            Event::HandedOff {
                shard,
                leases,
                result,
            } => self.on_handed_off(shard, leases, result),
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
                    let _ = reply.send(Ok((slot.expire_ms, slot.token)));
                }
            }
        }
    }

    /// What a txn of `shard` is guarded by, while this replica owns it.
    fn fence_of(&self, shard: u16) -> Option<ShardFence> {
        match self.shards[usize::from(shard)] {
            ShardState::Owned { claim_revision }
            | ShardState::HandingOff { claim_revision, .. } => Some(ShardFence {
                shard,
                claim_revision,
                mark: self.marks[usize::from(shard)],
            }),
            _ => None,
        }
    }

    /// A txn nonce never used before by any replica: this replica's id, its lease (etcd
    /// never reuses a lease id) and a counter.
    fn next_nonce(&mut self) -> String {
        self.nonces += 1;
        format!(
            "{}/{:x}/{}",
            self.config.replica_id,
            *self.config.replica_lease.borrow(),
            self.nonces
        )
    }

    /// The next fencing token of `shard`: its latest revision known here, then a sequence
    /// number. None when the sequence is exhausted (until the shard's next write).
    fn next_token(&mut self, shard: u16) -> Option<u64> {
        let (revision, seq) = &mut self.fences[usize::from(shard)];
        if *seq >= (1 << TOKEN_SEQ_BITS) - 1 {
            return None;
        }
        *seq += 1;
        Some(((*revision).max(0) as u64) << TOKEN_SEQ_BITS | u64::from(*seq))
    }

    /// Moves `shard`'s token revision forward to `revision` (never back).
    fn raise_fence(&mut self, shard: u16, revision: i64) {
        let fence = &mut self.fences[usize::from(shard)];
        if revision > fence.0 {
            *fence = (revision, 0);
        }
    }

    /// Gets a write of `key`'s shard going, so its token revision moves on.
    fn bump_fence(&mut self, key: &SlotKey) {
        if self.blocks.contains_key(key) {
            if let Some(block) = self.blocks.get_mut(key) {
                block.again = true;
            }
            self.write_block(key);
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

    fn publish_gauges(&self) {
        let stats = &self.config.stats;
        stats.in_flight.clear();
        stats.queued.clear();
        stats.keys_at_limit.clear();
        for (key, state) in self.table.keys() {
            let labels = ResourceLabels {
                resource: key.resource.clone(),
            };
            stats
                .in_flight
                .get_or_create(&labels)
                .inc_by(i64::from(state.held()));
            stats
                .queued
                .get_or_create(&labels)
                .inc_by(i64::from(state.queued()));
            // Only a key holding slots can be at its limit: idle keys skip the look-up.
            if state.held() > 0
                && let (Some(limit), _) = self.config.limits.effective(key)
                && !limit.shadow
                && state.held() >= limit.max_in_flight
            {
                stats.keys_at_limit.get_or_create(&labels).inc();
            }
        }
        stats.shards_owned.set(self.owned.borrow().len() as i64);
    }
}

fn granted(slot: &Slot, in_flight: u32, limit: u32, shadow: bool) -> AcquireReply {
    AcquireReply {
        fencing_token: slot.token,
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
        fencing_token: 0,
    }
}

//! Strict escrow: durable blocks of a key's capacity from which the owner grants and
//! releases in memory, with no etcd write per slot.
//!
//! A block is one record under the shard's slots prefix, `{"a","r","n":count,"e":expiry}`,
//! on the bucket lease of its expiry. Its promise to a successor: *at most `count` escrow
//! slots of the key are held, and none beyond `expiry`*. The owner keeps that promise true
//! at every instant:
//!
//! - a slot is granted from escrow only while the slots granted from escrow, this one
//!   included, are at most the block's capacity, and its expiry is within the block's;
//! - the capacity is the *lesser* of what etcd is known to hold and what a write in flight
//!   may leave there (either may be what etcd holds if the write's outcome is unknown);
//! - a block is rewritten (grown, extended, shrunk, deleted) only to a count at least the
//!   slots granted from it and an expiry at least theirs.
//!
//! A slot the block does not cover yet waits, counted as held, for the next block write;
//! it is answered when that commits. Admission is unchanged: exact slots, escrow slots and
//! a predecessor's blocks (phantoms) all count against the limit on every decision.

use super::store::{BlockRecord, Write};
use super::{Ack, Engine, EngineError, granted};
use crate::model::{SlotId, SlotKey, now_ms};
use crate::table::{KeyState, Slot};

/// Longest hold granted from escrow; longer holds are exact.
pub const MAX_ESCROW_HOLD_SECS: u32 = 300;
/// A block outlives the longest hold it may cover by this much, so grants seldom wait for an
/// extension.
const BLOCK_MARGIN_MS: u64 = 30_000;
/// A block is extended when less than (longest hold + this) of it remains.
const REFRESH_BEFORE_MS: u64 = 10_000;
/// A block with no slots for this long is deleted.
const LAPSE_MS: u64 = 5_000;
/// Headroom a block grows by beyond twice its slots.
const HEADROOM: u32 = 8;

/// A count and an expiry: what a block record says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Cap {
    pub count: u32,
    pub expire_ms: u64,
}

impl Cap {
    const NONE: Cap = Cap {
        count: 0,
        expire_ms: 0,
    };

    fn min(self, other: Cap) -> Cap {
        Cap {
            count: self.count.min(other.count),
            expire_ms: self.expire_ms.min(other.expire_ms),
        }
    }
}

/// The owner's view of one key's block.
#[derive(Debug)]
pub(super) struct Block {
    /// Its record id.
    pub id: SlotId,
    /// What etcd holds (None: no record).
    durable: Option<Cap>,
    /// A write queued or in flight (count 0: a delete).
    writing: Option<Cap>,
    /// Another write is wanted once this one is done.
    pub again: bool,
    /// Longest hold granted from it (ms).
    cover_ms: u64,
    /// Last grant (ms since the epoch).
    last_grant_ms: u64,
    /// Escrow slots not covered yet, and escrow slots whose renewal is not covered yet.
    waiting: Vec<SlotId>,
}

impl Block {
    fn new(shard: u16) -> Self {
        Self {
            id: SlotId::new(shard),
            durable: None,
            writing: None,
            again: false,
            cover_ms: 0,
            last_grant_ms: 0,
            waiting: Vec::new(),
        }
    }

    /// What may be granted against: the lesser of what etcd holds and what a write in
    /// flight may leave there.
    pub fn capacity(&self) -> Cap {
        let durable = self.durable.unwrap_or(Cap::NONE);
        self.writing.map_or(durable, |w| durable.min(w))
    }

    fn covers(&self, escrowed: u32, expire_ms: u64) -> bool {
        let cap = self.capacity();
        escrowed <= cap.count && expire_ms <= cap.expire_ms
    }
}

impl Engine {
    /// Whether an Acquire may be granted from escrow.
    pub(super) fn escrow_eligible(
        &self,
        request_id: &str,
        hold_secs: u32,
        limit: Option<crate::model::LimitValue>,
    ) -> bool {
        let min = self.config.escrow_min_limit;
        min > 0
            && request_id.is_empty()
            && hold_secs <= MAX_ESCROW_HOLD_SECS
            && limit.is_some_and(|l| !l.shadow && l.max_in_flight >= min)
    }

    /// A slot just granted from escrow: answered at once if the block covers it, otherwise
    /// when the block write that will cover it commits.
    pub(super) fn escrow_grant(&mut self, slot: Slot, ack: Ack) {
        let now = now_ms();
        let escrowed = self.escrowed(&slot.key);
        let block = self
            .blocks
            .entry(slot.key.clone())
            .or_insert_with(|| Block::new(slot.key.shard()));
        block.cover_ms = block.cover_ms.max(slot.expire_ms.saturating_sub(now));
        block.last_grant_ms = now;
        if block.covers(escrowed, slot.expire_ms) {
            self.table.mark_committed(&slot.id);
            self.config.stats.escrow_grants.inc();
            answer(ack, &slot);
            return;
        }
        block.waiting.push(slot.id.clone());
        self.acks.entry(slot.id.clone()).or_default().push(ack);
        self.write_block(&slot.key);
    }

    /// A renewal of an escrow slot (already applied to the table): answered at once if the
    /// block covers the new expiry, otherwise once it is extended.
    pub(super) fn escrow_renew(&mut self, slot: Slot, ack: Ack) {
        let escrowed = self.escrowed(&slot.key);
        let Some(block) = self.blocks.get_mut(&slot.key) else {
            // A covered escrow slot always has its block; be safe anyway.
            answer_err(ack, EngineError::NotFound);
            return;
        };
        if block.covers(escrowed, slot.expire_ms) {
            answer(ack, &slot);
            return;
        }
        block.waiting.push(slot.id.clone());
        self.acks.entry(slot.id.clone()).or_default().push(ack);
        self.write_block(&slot.key);
    }

    fn escrowed(&self, key: &SlotKey) -> u32 {
        self.table.key(key).map_or(0, KeyState::escrowed)
    }

    /// Queues a write that sizes the key's block to its slots (or deletes it when it has
    /// none); at most one write per block is outstanding.
    pub(super) fn write_block(&mut self, key: &SlotKey) {
        let now = now_ms();
        let (escrowed, latest) = self.table.key(key).map_or((0, 0), |state| {
            let latest = state
                .slots()
                .filter(|s| s.escrow)
                .map(|s| s.expire_ms)
                .max()
                .unwrap_or(0);
            (state.escrowed(), latest)
        });
        let (limit, _) = self.config.limits.effective(key);
        let Some(block) = self.blocks.get_mut(key) else {
            return;
        };
        if block.writing.is_some() {
            block.again = true;
            return;
        }
        let target = if escrowed == 0 && block.waiting.is_empty() {
            Cap::NONE
        } else {
            let want = (2 * escrowed).max(escrowed + HEADROOM);
            let capped = limit.map_or(want, |l| want.min(l.max_in_flight));
            Cap {
                // Never below the slots granted from it: the block must cover them all.
                count: capped.max(escrowed).max(1),
                expire_ms: latest.max(now + block.cover_ms) + BLOCK_MARGIN_MS,
            }
        };
        if target == Cap::NONE && block.durable.is_none() {
            self.blocks.remove(key);
            return;
        }
        block.writing = Some(target);
        block.again = false;
        self.pending.push(Write::Block(BlockRecord {
            id: block.id.clone(),
            key: key.clone(),
            count: target.count,
            expire_ms: target.expire_ms,
        }));
    }

    /// A block write committed: etcd now holds it; answer the slots it covers.
    pub(super) fn block_committed(&mut self, record: &BlockRecord) {
        let escrowed = self.escrowed(&record.key);
        let Some(block) = self.blocks.get_mut(&record.key) else {
            return;
        };
        if block.id != record.id {
            return;
        }
        let cap = Cap {
            count: record.count,
            expire_ms: record.expire_ms,
        };
        block.durable = (cap.count > 0).then_some(cap);
        block.writing = None;
        // Slots answered so far: every escrow slot except those still waiting for cover.
        let waiting = std::mem::take(&mut block.waiting);
        let uncovered = waiting
            .iter()
            .filter(|id| self.table.slot(id).is_some_and(|s| !s.committed))
            .count() as u32;
        let mut answered = escrowed - uncovered;
        let mut still = Vec::new();
        for id in waiting {
            let Some(slot) = self.table.slot(&id).cloned() else {
                // Expired or released while waiting.
                self.fail_acks(&id, EngineError::NotFound);
                continue;
            };
            let fits = slot.expire_ms <= cap.expire_ms;
            if slot.committed {
                // A renewal waiting for an extension.
                if fits {
                    self.answer_acks(&slot);
                } else {
                    still.push(id);
                }
            } else if fits && answered < cap.count {
                answered += 1;
                self.table.mark_committed(&id);
                self.config.stats.escrow_grants.inc();
                self.answer_acks(&Slot {
                    committed: true,
                    ..slot
                });
            } else {
                still.push(id);
            }
        }
        let Some(block) = self.blocks.get_mut(&record.key) else {
            return;
        };
        let again = block.again || !still.is_empty();
        block.waiting = still;
        if again {
            self.write_block(&record.key);
        } else if block.durable.is_none() && self.escrowed(&record.key) == 0 {
            self.blocks.remove(&record.key);
        }
    }

    /// Once a second: extend blocks about to run short, shrink oversized ones, delete idle
    /// ones.
    pub(super) fn maintain_blocks(&mut self) {
        let now = now_ms();
        let mut due = Vec::new();
        for (key, block) in &self.blocks {
            // Only an owner deciding for the shard touches its blocks (a shard being handed
            // off is written out by the handoff).
            let owned = matches!(
                self.shards[usize::from(key.shard())],
                super::ShardState::Owned { .. }
            );
            if block.writing.is_some() || !owned {
                continue;
            }
            let escrowed = self.table.key(key).map_or(0, KeyState::escrowed);
            let Some(durable) = block.durable else {
                continue;
            };
            let idle = escrowed == 0 && now.saturating_sub(block.last_grant_ms) > LAPSE_MS;
            let short = escrowed > 0
                && durable.expire_ms.saturating_sub(now) < block.cover_ms + REFRESH_BEFORE_MS;
            let oversized = durable.count > 2 * (2 * escrowed).max(escrowed + HEADROOM) + HEADROOM;
            if idle || short || oversized {
                due.push(key.clone());
            }
        }
        for key in due {
            self.write_block(&key);
        }
    }

    /// Escrow slots of `shard` still waiting for cover: they will not get it (the shard is
    /// being handed off). Their blocks keep no waiters.
    pub(super) fn strand_waiting(&mut self, shard: u16) -> Vec<SlotId> {
        let mut stranded = Vec::new();
        for (key, block) in self.blocks.iter_mut() {
            if key.shard() != shard {
                continue;
            }
            for id in block.waiting.drain(..) {
                if self.table.slot(&id).is_some_and(|s| !s.committed) {
                    stranded.push(id);
                }
            }
        }
        stranded
    }
}

fn answer(ack: Ack, slot: &Slot) {
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

fn answer_err(ack: Ack, err: EngineError) {
    match ack {
        Ack::Grant { reply, .. } => {
            let _ = reply.send(Err(err));
        }
        Ack::Renew(reply) => {
            let _ = reply.send(Err(err));
        }
    }
}

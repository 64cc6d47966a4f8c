//! `SlotTable`: the exact in-memory state of the keys in the shards this replica owns.
//!
//! It is pure bookkeeping — no I/O, no clock of its own — so the admission rule can be
//! read and tested in isolation. The engine ([`crate::engine`]) feeds it requests, turns
//! the writes it asks for into group-committed etcd txns, and answers callers once those
//! commit.
//!
//! Admission rule: a key grants while `held < limit`, where `held` counts every slot the
//! table knows, committed or not. Uncommitted grants count from the moment they are
//! decided, so no interleaving of requests can decide more grants than the limit allows.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, VecDeque};

use crate::model::{LimitValue, SlotId, SlotKey};

/// One held slot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// Its id.
    pub id: SlotId,
    /// The key it belongs to.
    pub key: SlotKey,
    /// Idempotency key ("" when none).
    pub request_id: String,
    /// When it expires (ms since the epoch).
    pub expire_ms: u64,
    /// Whether the caller may be told of it: its record committed to etcd, or (escrow) a
    /// committed block of the key covers it.
    pub committed: bool,
    /// Granted from the key's escrow block: no record of its own in etcd.
    pub escrow: bool,
    /// Its fencing token.
    pub token: u64,
}

/// A caller waiting in a key's FIFO queue.
#[derive(Debug)]
pub struct Waiter<R> {
    /// What it asked for.
    pub request_id: String,
    /// Hold it wants once granted.
    pub hold_secs: u32,
    /// When it gives up (ms since the epoch).
    pub deadline_ms: u64,
    /// Where its answer goes.
    pub reply: R,
}

/// Counters and queue of one key.
#[derive(Debug)]
pub struct KeyState<R> {
    slots: HashMap<SlotId, Slot>,
    by_request: HashMap<String, SlotId>,
    queue: VecDeque<Waiter<R>>,
    /// Slots among `slots` granted from escrow.
    escrowed: u32,
    /// Capacity counted as held without slots of its own: escrow blocks a previous owner
    /// left, as (count, expiry ms).
    phantoms: Vec<(u32, u64)>,
    /// Grants since this replica took the key.
    pub granted_total: u64,
    /// Rejections since this replica took the key.
    pub rejected_total: u64,
    /// Would-be rejections granted in shadow mode.
    pub shadow_rejected_total: u64,
    /// Last time anything happened to the key (ms since the epoch); idle keys are forgotten.
    last_active_ms: u64,
}

impl<R> Default for KeyState<R> {
    fn default() -> Self {
        Self {
            slots: HashMap::new(),
            by_request: HashMap::new(),
            queue: VecDeque::new(),
            escrowed: 0,
            phantoms: Vec::new(),
            granted_total: 0,
            rejected_total: 0,
            shadow_rejected_total: 0,
            last_active_ms: 0,
        }
    }
}

impl<R> KeyState<R> {
    /// Slots held (committed or being committed), plus phantom capacity.
    pub fn held(&self) -> u32 {
        self.slots.len() as u32 + self.phantom()
    }

    /// Capacity a previous owner's blocks still pin.
    pub fn phantom(&self) -> u32 {
        self.phantoms.iter().map(|(n, _)| *n).sum()
    }

    /// Slots granted from escrow (covered or waiting for their block).
    pub fn escrowed(&self) -> u32 {
        self.escrowed
    }

    /// The held slots.
    pub fn slots(&self) -> impl Iterator<Item = &Slot> {
        self.slots.values()
    }

    /// Callers waiting.
    pub fn queued(&self) -> u32 {
        self.queue.len() as u32
    }

    /// Earliest expiry among held slots.
    pub fn next_expiry(&self) -> Option<u64> {
        self.slots
            .values()
            .map(|s| s.expire_ms)
            .chain(self.phantoms.iter().map(|(_, e)| *e))
            .min()
    }
}

/// What [`SlotTable::decide`] concluded for an Acquire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// A new slot; its record must be committed before the caller hears of it.
    Grant {
        /// The new slot.
        slot: Slot,
        /// Held after the grant.
        in_flight: u32,
        /// Granted only because the limit is in shadow mode.
        shadow: bool,
    },
    /// The same request_id already holds this slot.
    Existing(Slot),
    /// Over the limit, no wait: reject.
    Reject {
        /// Held now.
        in_flight: u32,
    },
    /// Over the limit: the caller was queued.
    Queued,
}

/// What [`SlotTable::drain_queue`] did: grants (slot, held after, reply) and given-up waiters.
pub type Drained<R> = (Vec<(Slot, u32, R)>, Vec<Waiter<R>>);

/// The state of every key in the shards this replica owns.
#[derive(Debug)]
pub struct SlotTable<R> {
    keys: HashMap<SlotKey, KeyState<R>>,
    index: HashMap<SlotId, SlotKey>,
    expiries: BinaryHeap<Reverse<(u64, SlotId)>>,
    /// Keys with phantom capacity, checked for its expiry.
    phantom_keys: Vec<SlotKey>,
}

impl<R> Default for SlotTable<R> {
    fn default() -> Self {
        Self {
            keys: HashMap::new(),
            index: HashMap::new(),
            expiries: BinaryHeap::new(),
            phantom_keys: Vec::new(),
        }
    }
}

impl<R> SlotTable<R> {
    /// Decides an Acquire for `key` under `limit` (`None`: unlimited) at `now_ms`. A caller
    /// that would wait is queued with `reply`; otherwise `reply` is handed back unused.
    #[allow(clippy::too_many_arguments)]
    pub fn decide(
        &mut self,
        key: &SlotKey,
        request_id: &str,
        hold_secs: u32,
        wait_ms: u32,
        limit: Option<LimitValue>,
        now_ms: u64,
        escrow: bool,
        reply: R,
    ) -> (Decision, Option<R>) {
        let state = self.keys.entry(key.clone()).or_default();
        state.last_active_ms = now_ms;
        if !request_id.is_empty()
            && let Some(slot) = state
                .by_request
                .get(request_id)
                .and_then(|id| state.slots.get(id))
        {
            return (Decision::Existing(slot.clone()), Some(reply));
        }
        let held = state.held();
        let fits = state.queue.is_empty() && limit.is_none_or(|l| held < l.max_in_flight);
        let shadow = !fits && limit.is_some_and(|l| l.shadow);
        if fits || shadow {
            if shadow {
                state.shadow_rejected_total += 1;
            }
            let slot = self.insert(key, request_id, hold_secs, now_ms, escrow);
            return (
                Decision::Grant {
                    slot,
                    in_flight: held + 1,
                    shadow,
                },
                Some(reply),
            );
        }
        let state = self.keys.entry(key.clone()).or_default();
        if wait_ms == 0 {
            state.rejected_total += 1;
            return (Decision::Reject { in_flight: held }, Some(reply));
        }
        state.queue.push_back(Waiter {
            request_id: request_id.to_owned(),
            hold_secs,
            deadline_ms: now_ms + u64::from(wait_ms),
            reply,
        });
        (Decision::Queued, None)
    }

    fn insert(
        &mut self,
        key: &SlotKey,
        request_id: &str,
        hold_secs: u32,
        now_ms: u64,
        escrow: bool,
    ) -> Slot {
        let slot = Slot {
            id: SlotId::new(key.shard()),
            key: key.clone(),
            request_id: request_id.to_owned(),
            expire_ms: now_ms + u64::from(hold_secs) * 1000,
            committed: false,
            escrow,
            token: 0,
        };
        self.load(slot.clone());
        if let Some(state) = self.keys.get_mut(key) {
            state.granted_total += 1;
        }
        slot
    }

    /// Adds a slot read back from etcd (or just decided).
    pub fn load(&mut self, slot: Slot) {
        let state = self.keys.entry(slot.key.clone()).or_default();
        if !slot.request_id.is_empty() {
            state
                .by_request
                .insert(slot.request_id.clone(), slot.id.clone());
        }
        self.expiries
            .push(Reverse((slot.expire_ms, slot.id.clone())));
        self.index.insert(slot.id.clone(), slot.key.clone());
        if slot.escrow {
            state.escrowed += 1;
        }
        if let Some(old) = state.slots.insert(slot.id.clone(), slot)
            && old.escrow
        {
            state.escrowed -= 1;
        }
    }

    /// Counts `count` slots of `key` as held until `expire_ms`: a block a previous owner
    /// left, whose holds are unknown.
    pub fn load_phantom(&mut self, key: &SlotKey, count: u32, expire_ms: u64) {
        let state = self.keys.entry(key.clone()).or_default();
        state.phantoms.push((count, expire_ms));
        self.phantom_keys.push(key.clone());
    }

    /// Sets the token of a slot just decided.
    pub fn set_token(&mut self, id: &SlotId, token: u64) {
        if let Some(slot) = self.slot_mut(id) {
            slot.token = token;
        }
    }

    /// Turns an escrow slot into an exact one (its record is being written).
    pub fn make_exact(&mut self, id: &SlotId) {
        let Some(key) = self.index.get(id).cloned() else {
            return;
        };
        if let Some(state) = self.keys.get_mut(&key)
            && let Some(slot) = state.slots.get_mut(id)
            && slot.escrow
        {
            slot.escrow = false;
            state.escrowed -= 1;
        }
    }

    /// Marks a slot's record as committed.
    pub fn mark_committed(&mut self, id: &SlotId) {
        if let Some(slot) = self.slot_mut(id) {
            slot.committed = true;
        }
    }

    /// The slot with this id, if held.
    pub fn slot(&self, id: &SlotId) -> Option<&Slot> {
        let key = self.index.get(id)?;
        self.keys.get(key)?.slots.get(id)
    }

    fn slot_mut(&mut self, id: &SlotId) -> Option<&mut Slot> {
        let key = self.index.get(id)?;
        self.keys.get_mut(key)?.slots.get_mut(id)
    }

    /// Removes a slot (released, expired or rolled back); returns it if it was held.
    pub fn remove(&mut self, id: &SlotId) -> Option<Slot> {
        let key = self.index.remove(id)?;
        let state = self.keys.get_mut(&key)?;
        let slot = state.slots.remove(id)?;
        if slot.escrow {
            state.escrowed -= 1;
        }
        if !slot.request_id.is_empty() {
            state.by_request.remove(&slot.request_id);
        }
        Some(slot)
    }

    /// Sets a new expiry on a held slot (Renew); its record must be committed again.
    pub fn renew(&mut self, id: &SlotId, expire_ms: u64) -> Option<Slot> {
        let slot = self.slot_mut(id)?;
        slot.expire_ms = expire_ms;
        let slot = slot.clone();
        self.expiries.push(Reverse((expire_ms, id.clone())));
        Some(slot)
    }

    /// Removes every slot whose expiry is at or before `now_ms`; returns the keys that freed
    /// capacity.
    pub fn expire(&mut self, now_ms: u64) -> Vec<SlotKey> {
        let mut freed = Vec::new();
        while let Some(Reverse((at, _))) = self.expiries.peek() {
            if *at > now_ms {
                break;
            }
            let Some(Reverse((at, id))) = self.expiries.pop() else {
                break;
            };
            // Entries are lazily invalidated: a renewed or released slot leaves a stale one.
            if self.slot(&id).is_some_and(|s| s.expire_ms == at)
                && let Some(slot) = self.remove(&id)
            {
                freed.push(slot.key);
            }
        }
        if !self.phantom_keys.is_empty() {
            let mut keep = Vec::new();
            for key in std::mem::take(&mut self.phantom_keys) {
                let Some(state) = self.keys.get_mut(&key) else {
                    continue;
                };
                let before = state.phantoms.len();
                state.phantoms.retain(|(_, e)| *e > now_ms);
                if state.phantoms.len() < before {
                    freed.push(key.clone());
                }
                if !state.phantoms.is_empty() {
                    keep.push(key);
                }
            }
            keep.sort();
            keep.dedup();
            self.phantom_keys = keep;
        }
        freed.sort();
        freed.dedup();
        freed
    }

    /// Grants queued callers of `key` while capacity allows, in FIFO order. Callers whose
    /// deadline passed, or for whom `alive` is false (they hung up), are handed back as
    /// timed out or dropped.
    pub fn drain_queue(
        &mut self,
        key: &SlotKey,
        limit: Option<LimitValue>,
        now_ms: u64,
        alive: impl Fn(&R) -> bool,
    ) -> Drained<R> {
        let mut granted = Vec::new();
        let mut expired = Vec::new();
        while let Some(state) = self.keys.get_mut(key) {
            let has_room = limit.is_none_or(|l| state.held() < l.max_in_flight);
            let Some(front) = state.queue.front() else {
                break;
            };
            if front.deadline_ms <= now_ms || !alive(&front.reply) {
                if let Some(waiter) = state.queue.pop_front() {
                    state.rejected_total += 1;
                    expired.push(waiter);
                }
                continue;
            }
            if !has_room {
                break;
            }
            let Some(waiter) = state.queue.pop_front() else {
                break;
            };
            let slot = self.insert(key, &waiter.request_id, waiter.hold_secs, now_ms, false);
            let in_flight = self.keys.get(key).map_or(0, KeyState::held);
            granted.push((slot, in_flight, waiter.reply));
        }
        (granted, expired)
    }

    /// Every key known here.
    pub fn keys(&self) -> impl Iterator<Item = (&SlotKey, &KeyState<R>)> {
        self.keys.iter()
    }

    /// Keys with callers waiting.
    pub fn keys_with_queues(&self) -> Vec<SlotKey> {
        self.keys
            .iter()
            .filter(|(_, s)| !s.queue.is_empty())
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// The state of one key, if known.
    pub fn key(&self, key: &SlotKey) -> Option<&KeyState<R>> {
        self.keys.get(key)
    }

    /// Every key of `account` known here.
    pub fn keys_of<'a>(
        &'a self,
        account: &'a str,
    ) -> impl Iterator<Item = (&'a SlotKey, &'a KeyState<R>)> + 'a {
        self.keys.iter().filter(move |(k, _)| k.account == account)
    }

    /// Drops everything of `shard` (ownership lost or being reloaded); hands back the queued
    /// callers so they can be told.
    pub fn drop_shard(&mut self, shard: u16) -> Vec<Waiter<R>> {
        let keys: Vec<SlotKey> = self
            .keys
            .keys()
            .filter(|k| k.shard() == shard)
            .cloned()
            .collect();
        let mut waiters = Vec::new();
        for key in keys {
            if let Some(state) = self.keys.remove(&key) {
                for id in state.slots.keys() {
                    self.index.remove(id);
                }
                waiters.extend(state.queue);
            }
        }
        waiters
    }

    /// Takes every queued caller of `shard` out of its queue (the shard is being handed off).
    pub fn take_waiters(&mut self, shard: u16) -> Vec<Waiter<R>> {
        self.keys
            .iter_mut()
            .filter(|(k, _)| k.shard() == shard)
            .flat_map(|(_, s)| s.queue.drain(..).collect::<Vec<_>>())
            .collect()
    }

    /// Forgets keys that hold nothing, queue nothing and saw no request for `idle_ms`
    /// (their usage counters go with them), so memory stays bounded by the active keys.
    pub fn forget_idle(&mut self, now_ms: u64, idle_ms: u64) {
        self.keys.retain(|_, s| {
            !s.slots.is_empty()
                || !s.queue.is_empty()
                || !s.phantoms.is_empty()
                || now_ms.saturating_sub(s.last_active_ms) < idle_ms
        });
        if self.expiries.len() > 4 * self.index.len() + 1024 {
            let live: Vec<_> = self
                .keys
                .values()
                .flat_map(|s| {
                    s.slots
                        .values()
                        .map(|slot| Reverse((slot.expire_ms, slot.id.clone())))
                })
                .collect();
            self.expiries = live.into();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> SlotKey {
        SlotKey {
            account: "AC1".into(),
            resource: "calls".into(),
        }
    }

    fn limit(max: u32) -> Option<LimitValue> {
        Some(LimitValue {
            max_in_flight: max,
            shadow: false,
        })
    }

    #[test]
    fn grants_up_to_the_limit_then_rejects() {
        let mut table = SlotTable::<u32>::default();
        for i in 1..=3 {
            assert!(
                matches!(table.decide(&key(), "", 60, 0, limit(3), 0, false, i).0, Decision::Grant { in_flight, .. } if in_flight == i)
            );
        }
        assert_eq!(
            table.decide(&key(), "", 60, 0, limit(3), 0, false, 4).0,
            Decision::Reject { in_flight: 3 }
        );
        assert_eq!(table.key(&key()).map(|s| s.rejected_total), Some(1));
    }

    #[test]
    fn a_retried_request_id_gets_the_same_slot() {
        let mut table = SlotTable::<u32>::default();
        let Decision::Grant { slot, .. } =
            table.decide(&key(), "r1", 60, 0, limit(1), 0, false, 1).0
        else {
            panic!("not granted")
        };
        assert_eq!(
            table.decide(&key(), "r1", 60, 0, limit(1), 0, false, 2).0,
            Decision::Existing(slot)
        );
        assert_eq!(table.key(&key()).map(KeyState::held), Some(1));
    }

    #[test]
    fn queued_callers_are_granted_in_order_when_room_appears() {
        let mut table = SlotTable::<u32>::default();
        let Decision::Grant { slot, .. } = table.decide(&key(), "", 60, 0, limit(1), 0, false, 0).0
        else {
            panic!("not granted")
        };
        assert_eq!(
            table.decide(&key(), "", 60, 1000, limit(1), 0, false, 1).0,
            Decision::Queued
        );
        assert_eq!(
            table.decide(&key(), "", 60, 1000, limit(1), 0, false, 2).0,
            Decision::Queued
        );
        // A newcomer that will not wait cannot overtake the queue.
        assert_eq!(
            table.decide(&key(), "", 60, 0, limit(1), 0, false, 3).0,
            Decision::Reject { in_flight: 1 }
        );
        table.remove(&slot.id);
        let (granted, expired) = table.drain_queue(&key(), limit(1), 10, |_| true);
        assert_eq!(granted.iter().map(|g| g.2).collect::<Vec<_>>(), vec![1]);
        assert!(expired.is_empty());
        let (granted, expired) = table.drain_queue(&key(), limit(1), 2000, |_| true);
        assert!(granted.is_empty());
        assert_eq!(expired.iter().map(|w| w.reply).collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn slots_expire_at_their_hold_and_renewal_moves_the_expiry() {
        let mut table = SlotTable::<u32>::default();
        let Decision::Grant { slot: a, .. } =
            table.decide(&key(), "", 1, 0, limit(5), 0, false, 0).0
        else {
            panic!()
        };
        let Decision::Grant { slot: b, .. } =
            table.decide(&key(), "", 1, 0, limit(5), 0, false, 0).0
        else {
            panic!()
        };
        table.renew(&b.id, 5000);
        assert_eq!(table.expire(999), Vec::<SlotKey>::new());
        assert_eq!(table.expire(1000), vec![key()]);
        assert!(table.slot(&a.id).is_none());
        assert!(table.slot(&b.id).is_some());
        assert_eq!(table.expire(5000), vec![key()]);
        assert_eq!(table.key(&key()).map(KeyState::held), Some(0));
    }

    #[test]
    fn shadow_mode_grants_but_counts_would_be_rejections() {
        let mut table = SlotTable::<u32>::default();
        let shadow = Some(LimitValue {
            max_in_flight: 1,
            shadow: true,
        });
        table.decide(&key(), "", 60, 0, shadow, 0, false, 0);
        assert!(matches!(
            table.decide(&key(), "", 60, 0, shadow, 0, false, 0).0,
            Decision::Grant {
                shadow: true,
                in_flight: 2,
                ..
            }
        ));
        assert_eq!(table.key(&key()).map(|s| s.shadow_rejected_total), Some(1));
    }

    #[test]
    fn a_lowered_limit_grants_nothing_until_usage_falls_under_it() {
        let mut table = SlotTable::<u32>::default();
        let mut ids = Vec::new();
        for _ in 0..3 {
            if let Decision::Grant { slot, .. } =
                table.decide(&key(), "", 60, 0, limit(3), 0, false, 0).0
            {
                ids.push(slot.id);
            }
        }
        assert!(matches!(
            table.decide(&key(), "", 60, 0, limit(1), 0, false, 0).0,
            Decision::Reject { .. }
        ));
        table.remove(&ids[0]);
        assert!(matches!(
            table.decide(&key(), "", 60, 0, limit(1), 0, false, 0).0,
            Decision::Reject { .. }
        ));
        table.remove(&ids[1]);
        table.remove(&ids[2]);
        assert!(matches!(
            table.decide(&key(), "", 60, 0, limit(1), 0, false, 0).0,
            Decision::Grant { .. }
        ));
    }

    #[test]
    fn phantom_capacity_counts_as_held_until_it_expires() {
        let mut table = SlotTable::<u32>::default();
        table.load_phantom(&key(), 2, 5_000);
        assert!(matches!(
            table.decide(&key(), "", 60, 0, limit(3), 0, true, 0).0,
            Decision::Grant { in_flight: 3, .. }
        ));
        assert_eq!(
            table.decide(&key(), "", 60, 0, limit(3), 0, true, 0).0,
            Decision::Reject { in_flight: 3 }
        );
        assert_eq!(table.key(&key()).map(KeyState::escrowed), Some(1));
        assert_eq!(table.expire(4_999), Vec::<SlotKey>::new());
        assert_eq!(table.expire(5_000), vec![key()]);
        assert_eq!(table.key(&key()).map(KeyState::held), Some(1));
    }

    #[test]
    fn idle_keys_keep_their_counters_until_the_idle_period_passes() {
        let mut table = SlotTable::<u32>::default();
        let Decision::Grant { slot, .. } =
            table.decide(&key(), "", 60, 0, limit(1), 1_000, false, 0).0
        else {
            panic!()
        };
        table.remove(&slot.id);
        table.forget_idle(2_000, 10_000);
        assert_eq!(table.key(&key()).map(|s| s.granted_total), Some(1));
        table.forget_idle(11_000, 10_000);
        assert!(table.key(&key()).is_none());
    }
}

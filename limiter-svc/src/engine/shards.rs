//! Shard ownership: the even assignment of shards to live replicas, claiming shards,
//! planned handoffs to the assigned replica, and loading or dropping a shard's records.

use std::collections::HashMap;

use plumbing::etcd::EtcdError;
use tokio::sync::mpsc;

use super::store::{CommitError, Fence, LoadedShard, hand_off, load_shard};
use super::{CLAIM_GRACE_MS, Engine, EngineError, Event, RELOAD_BACKOFF};
use crate::model::{SHARDS, SlotId, now_ms};

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
    /// The replica that should own each shard (index = shard), among the members except
    /// `without`: an even split by bounded-load rendezvous hashing. Every (shard, member)
    /// pair is scored, and pairs are taken best first, a member taking at most
    /// `SHARDS / n` shards (the first `SHARDS % n` members to fill up take one more). So
    /// every replica owns `SHARDS / n` or one more, each computes the same answer from the
    /// same membership, and a join or leave moves few shards besides those it must.
    pub fn assignment(&self, without: Option<&str>) -> Vec<Option<String>> {
        let members: Vec<&String> = self
            .members
            .keys()
            .filter(|id| Some(id.as_str()) != without)
            .collect();
        assign(&members)
    }
}

fn assign(members: &[&String]) -> Vec<Option<String>> {
    let mut assigned: Vec<Option<String>> = vec![None; usize::from(SHARDS)];
    if members.is_empty() {
        return assigned;
    }
    let base = usize::from(SHARDS) / members.len();
    let mut extra = usize::from(SHARDS) % members.len();
    let mut pairs: Vec<(u64, u16, usize)> = (0..SHARDS)
        .flat_map(|shard| {
            members
                .iter()
                .enumerate()
                .map(move |(m, id)| (rendezvous(shard, id), shard, m))
        })
        .collect();
    // Best score first; ties (practically impossible) broken by shard then member name.
    pairs.sort_by(|a, b| {
        b.0.cmp(&a.0)
            .then(a.1.cmp(&b.1))
            .then(members[a.2].cmp(members[b.2]))
    });
    let mut load = vec![0usize; members.len()];
    for (_, shard, m) in pairs {
        let slot = &mut assigned[usize::from(shard)];
        if slot.is_some() {
            continue;
        }
        let fits = if load[m] < base {
            true
        } else if load[m] == base && extra > 0 {
            extra -= 1;
            true
        } else {
            false
        };
        if fits {
            load[m] += 1;
            *slot = Some(members[m].clone());
        }
    }
    assigned
}

fn rendezvous(shard: u16, replica: &str) -> u64 {
    let mut hash: u64 =
        0xcbf2_9ce4_8422_2325 ^ u64::from(shard).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    for byte in replica.bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    // Finalise (the MurmurHash3 mixer) so that scores of neighbouring shards are unrelated.
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^ (hash >> 33)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ShardState {
    Unowned {
        since_ms: u64,
    },
    Claiming,
    Owned {
        claim_revision: i64,
    },
    Reloading {
        claim_revision: i64,
    },
    /// Deciding nothing more (callers are told NotOwner and route again); once the shard's
    /// writes have drained, its escrow slots are written out exactly and it is vacated.
    HandingOff {
        claim_revision: i64,
        started: bool,
    },
}

impl Engine {
    /// Claims unowned shards this replica is assigned (or that nobody claimed in time),
    /// hands owned shards assigned to another live replica over to it, and notices shards
    /// taken over by others.
    pub(super) fn rebalance(&mut self) {
        let view = self.config.view.borrow().clone();
        let me = self.config.replica_id.clone();
        let assignment = view.assignment(self.leaving.then_some(me.as_str()));
        let now = now_ms();
        for shard in 0..SHARDS {
            let owner = view.owners.get(&shard);
            let assigned = assignment[usize::from(shard)].as_deref();
            match (self.shards[usize::from(shard)], owner) {
                (ShardState::Owned { claim_revision }, Some(owner))
                    if owner.replica_id == me
                        && (self.leaving || assigned.is_some_and(|a| a != me)) =>
                {
                    tracing::info!(shard, to = ?assigned, "handing shard off");
                    self.begin_handoff(shard, claim_revision);
                }
                (
                    ShardState::Owned { claim_revision }
                    | ShardState::Reloading { claim_revision }
                    | ShardState::HandingOff { claim_revision, .. },
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
                    let mine = assigned == Some(me.as_str());
                    let orphaned = !self.leaving && now.saturating_sub(since_ms) > CLAIM_GRACE_MS;
                    if mine || orphaned {
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
                lease: *self.config.replica_lease.borrow(),
            },
        );
        spawn_load(shard, load, &self.events);
    }

    pub(super) fn reload(&mut self, shard: u16) {
        let ShardState::Owned { claim_revision } = self.shards[usize::from(shard)] else {
            return;
        };
        self.drop_state(
            shard,
            EngineError::Unavailable(format!("shard {shard} is reloading")),
        );
        self.shards[usize::from(shard)] = ShardState::Reloading { claim_revision };
        self.start_reload_if_waiting(shard);
        self.publish_owned();
    }

    /// Reads a reloading shard back once none of its txns is in flight any more (a txn
    /// still in flight may yet commit, and the reload must see it).
    pub(super) fn start_reload_if_waiting(&mut self, shard: u16) {
        let ShardState::Reloading { claim_revision } = self.shards[usize::from(shard)] else {
            return;
        };
        if self.in_flight.touches(shard) || self.loading.contains(&shard) {
            return;
        }
        self.loading.insert(shard);
        spawn_load(
            shard,
            load_shard(
                self.config.session.clone(),
                shard,
                Fence::Owned(claim_revision),
            ),
            &self.events,
        );
    }

    /// Stops deciding for `shard` and starts its planned handoff: queued callers are told
    /// to route again; the handoff itself starts once the shard's writes have drained.
    fn begin_handoff(&mut self, shard: u16, claim_revision: i64) {
        self.shards[usize::from(shard)] = ShardState::HandingOff {
            claim_revision,
            started: false,
        };
        for waiter in self.table.take_waiters(shard) {
            let _ = waiter.reply.send(Err(EngineError::NotOwner(shard)));
        }
        self.publish_owned();
        self.try_hand_off(shard);
    }

    /// Writes a handing-off shard out once none of its writes is queued or in flight: every
    /// escrow slot becomes an exact record, the blocks go, the ownership key goes.
    pub(super) fn try_hand_off(&mut self, shard: u16) {
        let ShardState::HandingOff {
            claim_revision,
            started: false,
        } = self.shards[usize::from(shard)]
        else {
            return;
        };
        if self.in_flight.touches(shard) || self.pending.iter().any(|w| w.shard() == shard) {
            return;
        }
        // Grants still waiting for a block that will not be written: the caller routes
        // again and is served by the next owner.
        let stranded = self.strand_waiting(shard);
        for id in stranded {
            self.table.remove(&id);
            self.fail_acks(&id, EngineError::NotOwner(shard));
        }
        let slots: Vec<_> = self
            .table
            .keys()
            .filter(|(k, _)| k.shard() == shard)
            .flat_map(|(_, state)| state.slots().filter(|s| s.escrow && s.committed).cloned())
            .collect();
        let blocks: Vec<SlotId> = self
            .blocks
            .iter()
            .filter(|(k, _)| k.shard() == shard)
            .map(|(_, b)| b.id.clone())
            .collect();
        self.shards[usize::from(shard)] = ShardState::HandingOff {
            claim_revision,
            started: true,
        };
        let events = self.events.clone();
        let Some(fence) = self.fence_of(shard) else {
            return;
        };
        let base = self.next_nonce();
        let mut part = 0;
        let handoff = hand_off(
            self.config.session.clone(),
            fence,
            slots,
            blocks,
            self.leases.clone(),
            move || {
                part += 1;
                format!("{base}/handoff/{part}")
            },
        );
        tokio::spawn(async move {
            let (leases, result) = handoff.await;
            let _ = events.send(Event::HandedOff {
                shard,
                leases,
                result,
            });
        });
    }

    pub(super) fn on_handed_off(
        &mut self,
        shard: u16,
        leases: Vec<(u64, i64)>,
        result: Result<i64, CommitError>,
    ) {
        self.leases.extend(leases);
        let ShardState::HandingOff { claim_revision, .. } = self.shards[usize::from(shard)] else {
            return;
        };
        match result {
            Ok(revision) => {
                self.raise_fence(shard, revision);
                self.drop_state(shard, EngineError::NotOwner(shard));
                self.shards[usize::from(shard)] = ShardState::Unowned { since_ms: now_ms() };
                self.config.stats.handoffs.inc();
                tracing::info!(shard, "shard handed off");
            }
            Err(err) => {
                // Part of it may have committed; a reload reads back whatever did (exact
                // records and blocks both count) and the next rebalance tries again.
                tracing::warn!(shard, error = %err, "handoff failed; reloading the shard");
                self.shards[usize::from(shard)] = ShardState::Owned { claim_revision };
                self.reload(shard);
            }
        }
        self.publish_owned();
    }

    pub(super) fn on_loaded(&mut self, shard: u16, result: Result<Option<LoadedShard>, EtcdError>) {
        self.loading.remove(&shard);
        let state = self.shards[usize::from(shard)];
        match (state, result) {
            (
                ShardState::Claiming | ShardState::Reloading { .. },
                Ok(Some((claim_revision, mark, records))),
            ) => {
                self.marks[usize::from(shard)] = mark;
                let now = now_ms();
                for slot in records.slots.into_iter().filter(|s| s.expire_ms > now) {
                    self.table.load(slot);
                }
                for block in records.blocks.into_iter().filter(|b| b.expire_ms > now) {
                    self.table
                        .load_phantom(&block.key, block.count, block.expire_ms);
                }
                self.raise_fence(shard, claim_revision);
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
                self.loading.insert(shard);
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

    /// Gives up every shard not already unowned (the replica lease was lost).
    pub(super) fn give_up_all(&mut self) {
        for shard in 0..SHARDS {
            if !matches!(self.shards[usize::from(shard)], ShardState::Unowned { .. }) {
                self.give_up(shard);
            }
        }
    }

    pub(super) fn give_up(&mut self, shard: u16) {
        self.drop_state(shard, EngineError::NotOwner(shard));
        self.shards[usize::from(shard)] = ShardState::Unowned { since_ms: now_ms() };
        self.publish_owned();
    }

    fn drop_state(&mut self, shard: u16, err: EngineError) {
        self.blocks.retain(|key, _| key.shard() != shard);
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

    pub(super) fn publish_owned(&self) {
        let owned: Vec<u16> = (0..SHARDS)
            .filter(|s| matches!(self.shards[usize::from(*s)], ShardState::Owned { .. }))
            .collect();
        self.config.stats.shards_owned.set(owned.len() as i64);
        self.owned.send_if_modified(|current| {
            let changed = *current != owned;
            *current = owned;
            changed
        });
        let held = self
            .shards
            .iter()
            .filter(|s| !matches!(s, ShardState::Unowned { .. }))
            .count();
        self.held.send_if_modified(|current| {
            let changed = *current != held;
            *current = held;
            changed
        });
    }
}

pub(super) fn spawn_load(
    shard: u16,
    load: impl std::future::Future<Output = Result<Option<LoadedShard>, EtcdError>> + Send + 'static,
    events: &mpsc::UnboundedSender<Event>,
) {
    let events = events.clone();
    tokio::spawn(async move {
        let result = load.await;
        let _ = events.send(Event::Loaded { shard, result });
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("replica-{i:02}-{:x}", i * 7919))
            .collect()
    }

    #[test]
    fn every_member_gets_an_even_share() {
        for n in 1..=10 {
            let names = members(n);
            let refs: Vec<&String> = names.iter().collect();
            let assigned = assign(&refs);
            assert!(
                assigned.iter().all(Option::is_some),
                "{n} members: a shard left out"
            );
            let mut load: HashMap<&str, usize> = HashMap::new();
            for owner in assigned.iter().flatten() {
                *load.entry(owner.as_str()).or_default() += 1;
            }
            let (lo, hi) = (usize::from(SHARDS) / n, usize::from(SHARDS).div_ceil(n));
            assert_eq!(load.len(), n, "{n} members: someone got nothing");
            assert!(
                load.values().all(|l| (lo..=hi).contains(l)),
                "{n} members: uneven {load:?}"
            );
        }
    }

    #[test]
    fn a_join_moves_about_its_share() {
        let names = members(4);
        let three: Vec<&String> = names.iter().take(3).collect();
        let four: Vec<&String> = names.iter().collect();
        let (before, after) = (assign(&three), assign(&four));
        let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
        // The newcomer must take 12; a little more churn among the others is tolerated.
        assert!((12..=20).contains(&moved), "moved {moved}");
        assert_eq!(assign(&three), before, "the assignment is deterministic");
    }

    #[test]
    fn no_members_no_assignment() {
        assert!(assign(&[]).iter().all(Option::is_none));
    }
}

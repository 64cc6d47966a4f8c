//! Shard ownership: who owns which shard, claiming orphaned shards, and loading or
//! dropping a shard's slots.

use std::collections::HashMap;

use plumbing::etcd::EtcdError;
use tokio::sync::mpsc;

use super::store::{Fence, load_shard};
use super::{CLAIM_GRACE_MS, Engine, EngineError, Event, RELOAD_BACKOFF};
use crate::model::{SHARDS, SlotId, now_ms};
use crate::table::Slot;

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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ShardState {
    Unowned { since_ms: u64 },
    Claiming,
    Owned { claim_revision: i64 },
    Reloading { claim_revision: i64 },
}

impl Engine {
    /// Claims unowned shards this replica should own (or that nobody claimed in time), and
    /// notices shards taken over by others.
    pub(super) fn rebalance(&mut self) {
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

    pub(super) fn on_loaded(
        &mut self,
        shard: u16,
        result: Result<Option<(i64, Vec<Slot>)>, EtcdError>,
    ) {
        self.loading.remove(&shard);
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

    pub(super) fn give_up(&mut self, shard: u16) {
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

    pub(super) fn publish_owned(&self) {
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

pub(super) fn spawn_load(
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

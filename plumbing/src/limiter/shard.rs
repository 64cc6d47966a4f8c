//! The limiter's shard map as a client sees it, and where each call goes: the owner of
//! the shard of its key or slot, or any replica when the owner is not known.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use proto::limiter::v1 as pb;

/// FNV-1a 64 offset basis (the limiter's key hash, see `GetShardMap` in limiter.proto).
const FNV_OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
/// FNV-1a 64 prime.
const FNV_PRIME: u64 = 0x0100_0000_01b3;

/// The shard hash of key (`account`, `resource`): FNV-1a 64 over the account's bytes, one
/// 0x00 byte, then the resource's bytes.
pub fn key_hash(account: &str, resource: &str) -> u64 {
    account
        .bytes()
        .chain([0])
        .chain(resource.bytes())
        .fold(FNV_OFFSET, |hash, byte| {
            (hash ^ u64::from(byte)).wrapping_mul(FNV_PRIME)
        })
}

/// The shard encoded in a slot id: its first two characters read as hexadecimal; `None`
/// when they are not two hex digits.
pub fn slot_shard(slot_id: &str) -> Option<u32> {
    let prefix = slot_id.get(..2)?;
    if !prefix.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    u8::from_str_radix(prefix, 16).ok().map(u32::from)
}

/// Which replica owns each shard, from one `GetShardMap` answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardMap {
    /// Owner address per shard; `None` while a shard has no owner (a handoff or failover).
    owners: Vec<Option<Arc<str>>>,
}

impl ShardMap {
    /// The map of `answer`; `None` when it names no shards (`shard_count` 0). Owners of
    /// shards out of range and empty addresses are ignored.
    pub fn from_response(answer: &pb::GetShardMapResponse) -> Option<Self> {
        let count = usize::try_from(answer.shard_count)
            .ok()
            .filter(|c| *c > 0)?;
        let mut owners = vec![None; count];
        for owner in &answer.owners {
            let slot = usize::try_from(owner.shard)
                .ok()
                .and_then(|shard| owners.get_mut(shard));
            if let Some(slot) = slot
                && !owner.address.is_empty()
            {
                *slot = Some(Arc::from(owner.address.as_str()));
            }
        }
        Some(Self { owners })
    }

    /// Number of shards.
    pub fn shard_count(&self) -> u32 {
        // At most `u32::MAX` entries: built from a u32 count.
        self.owners.len() as u32
    }

    /// Owner address of `shard`, if it has one.
    pub fn owner(&self, shard: u32) -> Option<&Arc<str>> {
        self.owners.get(usize::try_from(shard).ok()?)?.as_ref()
    }

    /// Owner address of the shard of key (`account`, `resource`).
    pub fn owner_of_key(&self, account: &str, resource: &str) -> Option<&Arc<str>> {
        let shard = key_hash(account, resource) % u64::from(self.shard_count());
        // Below `shard_count`, a u32.
        self.owner(shard as u32)
    }

    /// Owner address of the shard a slot id names.
    pub fn owner_of_slot(&self, slot_id: &str) -> Option<&Arc<str>> {
        self.owner(slot_shard(slot_id)?)
    }

    /// Every owner address, each once.
    pub fn addresses(&self) -> impl Iterator<Item = &Arc<str>> {
        let mut seen = std::collections::HashSet::new();
        self.owners
            .iter()
            .flatten()
            .filter(move |address| seen.insert(Arc::clone(address)))
    }
}

/// Owners that failed to connect lately, skipped until their mark runs out so that calls
/// do not wait for a connect timeout again and again.
#[derive(Debug, Default)]
pub(crate) struct DownOwners {
    until: HashMap<Arc<str>, Instant>,
}

impl DownOwners {
    /// Skips `address` until `until`.
    pub(crate) fn mark(&mut self, address: &Arc<str>, until: Instant) {
        self.until.insert(Arc::clone(address), until);
    }

    /// Whether `address` is marked at `now` (expired marks are dropped).
    pub(crate) fn is_down(&mut self, address: &str, now: Instant) -> bool {
        match self.until.get(address) {
            Some(until) if *until > now => true,
            Some(_) => {
                self.until.remove(address);
                false
            }
            None => false,
        }
    }
}

/// Where a call goes: straight to `owner` when the map names a reachable one, else to a
/// seed (any replica forwards to the owner).
pub(crate) fn route<'a>(
    owner: Option<&'a Arc<str>>,
    down: &mut DownOwners,
    now: Instant,
) -> Option<&'a Arc<str>> {
    owner.filter(|address| !down.is_down(address, now))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// FNV-1a 64 written out independently: byte by byte over one buffer.
    fn reference_fnv(bytes: &[u8]) -> u64 {
        let mut hash = 0xcbf29ce484222325_u64;
        for &byte in bytes {
            hash ^= byte as u64;
            hash = hash.wrapping_mul(0x100000001b3);
        }
        hash
    }

    fn map(count: u32, owners: &[(u32, &str)]) -> ShardMap {
        let answer = pb::GetShardMapResponse {
            shard_count: count,
            owners: owners
                .iter()
                .map(|(shard, address)| pb::ShardOwner {
                    shard: *shard,
                    replica_id: format!("r{shard}"),
                    address: (*address).to_owned(),
                })
                .collect(),
            members: Vec::new(),
        };
        ShardMap::from_response(&answer).unwrap_or_else(|| panic!("a map of {count} shards"))
    }

    #[test]
    fn key_hash_is_fnv1a_over_account_zero_resource() {
        // Published FNV-1a 64 vectors: "" and "a" (here account "" / "a" would add the
        // separator, so they check the reference itself).
        assert_eq!(reference_fnv(b""), 0xcbf29ce484222325);
        assert_eq!(reference_fnv(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(reference_fnv(b"foobar"), 0x85944171f73967e8);
        for (account, resource) in [
            ("", ""),
            ("AC1", "communications"),
            (
                "ACabc",
                "rpc:/switchboard.presence.v1.PresenceService/Register",
            ),
            ("é", "x"),
        ] {
            let joined = [account.as_bytes(), &[0], resource.as_bytes()].concat();
            assert_eq!(key_hash(account, resource), reference_fnv(&joined));
        }
        // By hand: "" then 0x00 then "" is one zero byte.
        assert_eq!(
            key_hash("", ""),
            0xcbf29ce484222325_u64.wrapping_mul(0x100000001b3)
        );
        // The separator matters: ("ab", "c") and ("a", "bc") differ.
        assert_ne!(key_hash("ab", "c"), key_hash("a", "bc"));
    }

    #[test]
    fn slot_shard_reads_the_first_two_hex_digits() {
        assert_eq!(slot_shard("00aaaaaaaaaaaaaaaaaaaaaaaa"), Some(0));
        assert_eq!(slot_shard("2fffffffffffffffffffffffff"), Some(47));
        assert_eq!(slot_shard("FF"), Some(255));
        assert_eq!(slot_shard("1"), None);
        assert_eq!(slot_shard(""), None);
        assert_eq!(slot_shard("+1abc"), None);
        assert_eq!(slot_shard("zz00"), None);
        assert_eq!(slot_shard("éa"), None);
    }

    #[test]
    fn owners_are_found_by_key_and_by_slot() {
        let map = map(4, &[(0, "a:1"), (1, "b:1"), (3, "a:1")]);
        let shard = (key_hash("AC1", "communications") % 4) as u32;
        assert_eq!(
            map.owner_of_key("AC1", "communications").map(|a| &**a),
            map.owner(shard).map(|a| &**a)
        );
        assert_eq!(map.owner_of_slot("01ffff").map(|a| &**a), Some("b:1"));
        assert_eq!(map.owner_of_slot("02ffff"), None, "shard 2 has no owner");
        assert_eq!(map.owner_of_slot("09ffff"), None, "shard 9 is out of range");
        assert_eq!(map.owner_of_slot("zz"), None);
        let addresses: Vec<_> = map.addresses().map(|a| a.to_string()).collect();
        assert_eq!(addresses, ["a:1", "b:1"]);
    }

    #[test]
    fn maps_ignore_empty_out_of_range_and_zero_counts() {
        let map = map(2, &[(0, ""), (5, "c:1"), (1, "b:1")]);
        assert_eq!(map.shard_count(), 2);
        assert_eq!(map.owner(0), None);
        assert_eq!(map.owner(1).map(|a| &**a), Some("b:1"));
        let empty = pb::GetShardMapResponse::default();
        assert_eq!(ShardMap::from_response(&empty), None);
    }

    #[test]
    fn calls_go_to_the_owner_unless_it_is_marked_down() {
        let map = map(1, &[(0, "a:1")]);
        let owner = map.owner(0);
        let mut down = DownOwners::default();
        let now = Instant::now();
        assert_eq!(route(owner, &mut down, now).map(|a| &**a), Some("a:1"));
        assert_eq!(route(None, &mut down, now), None, "unknown owner: a seed");
        let a: Arc<str> = Arc::from("a:1");
        down.mark(&a, now + Duration::from_secs(5));
        assert_eq!(route(owner, &mut down, now), None, "down: a seed");
        let later = now + Duration::from_secs(6);
        assert_eq!(route(owner, &mut down, later).map(|a| &**a), Some("a:1"));
    }
}

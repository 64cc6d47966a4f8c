//! Keys left over: after the services have stopped, every key under the soak's prefix is
//! put in a [`Family`] (docs/ARCHITECTURE.md, "etcd key layout"). Each family is durable
//! (meant to stay), expiring (under a lease that ends it: the remaining TTL is reported) or
//! a leak (what nothing should hold any more once sessions, slots, communications and
//! replicas are gone). Leaked families are polled until empty, for a bounded time, since a
//! killed replica's lease takes its TTL to expire.

use std::collections::BTreeMap;
use std::time::Duration;

use tokio::time::Instant;

use super::Result;
use super::fleet::Fleet;

/// What a key is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Family {
    /// `limiter/limits/…`: the soak's limits (durable).
    Limit,
    /// `limiter/commits/<nn>`: one commit marker per shard, ever (durable).
    CommitMarker,
    /// `router/apps/…`: the soak's applications (durable).
    Application,
    /// `keys/…`: account keys (durable; the soak creates none).
    AccountKey,
    /// `presence/<account>/~left/…`: why a device left, under the 60 s note lease.
    LeaveNote,
    /// `router/comms/…` under a lease: an ended communication kept for its retention.
    RetainedCommunication,
    /// `presence/<account>/<identity>/<device>`: a device still present.
    DeviceRecord,
    /// `limiter/slots/…`: a slot or escrow block still held.
    Slot,
    /// `limiter/members/…` and `limiter/shards/…`: a replica's membership or shard claim.
    Replica,
    /// `router/comms/…` without a lease: a communication still running.
    RunningCommunication,
    /// `router/owned/…`: the index entry of a running communication.
    OwnedIndex,
    /// Anything else.
    Unknown,
}

impl Family {
    fn of(key: &str, leased: bool) -> Self {
        let parts: Vec<&str> = key.split('/').collect();
        match parts.as_slice() {
            ["limiter", "limits", ..] => Self::Limit,
            ["limiter", "commits", _] => Self::CommitMarker,
            ["limiter", "slots", ..] => Self::Slot,
            ["limiter", "members" | "shards", ..] => Self::Replica,
            ["router", "apps", ..] => Self::Application,
            ["router", "comms", ..] if leased => Self::RetainedCommunication,
            ["router", "comms", ..] => Self::RunningCommunication,
            ["router", "owned", ..] => Self::OwnedIndex,
            ["presence", _, "~left", ..] => Self::LeaveNote,
            ["presence", _, _, _] => Self::DeviceRecord,
            ["keys", _] => Self::AccountKey,
            _ => Self::Unknown,
        }
    }

    /// How the report describes the family.
    pub fn kind(self) -> &'static str {
        match self {
            Self::Limit | Self::CommitMarker | Self::Application | Self::AccountKey => "durable",
            Self::LeaveNote | Self::RetainedCommunication => "expiring",
            _ => "LEAK",
        }
    }

    fn leaked(self) -> bool {
        self.kind() == "LEAK"
    }
}

/// One family's keys.
#[derive(Debug, Clone, Default)]
pub struct Count {
    /// Keys of the family.
    pub keys: u64,
    /// The longest remaining TTL of their leases, seconds (None: no lease).
    pub max_ttl: Option<i64>,
    /// A few of the keys, for the report (leaks only).
    pub samples: Vec<String>,
}

/// Every key left under the prefix, by family.
#[derive(Debug, Clone, Default)]
pub struct Leftovers {
    /// The families found.
    pub families: BTreeMap<Family, Count>,
    /// How long after the services stopped the leaked families were empty (None: they
    /// were not within the deadline).
    pub clean_after: Option<Duration>,
}

impl Leftovers {
    /// Keys of leaked families.
    pub fn leaked(&self) -> u64 {
        self.sum(Family::leaked)
    }

    /// Keys of durable families.
    pub fn durable(&self) -> u64 {
        self.sum(|f| f.kind() == "durable")
    }

    /// Keys of expiring families.
    pub fn expiring(&self) -> u64 {
        self.sum(|f| f.kind() == "expiring")
    }

    fn sum(&self, pick: impl Fn(Family) -> bool) -> u64 {
        self.families
            .iter()
            .filter(|(f, _)| pick(**f))
            .map(|(_, c)| c.keys)
            .sum()
    }
}

/// Lists and classifies the keys until no leaked family has any, or `within` has passed.
pub async fn leftovers(fleet: &Fleet, within: Duration) -> Result<Leftovers> {
    let started = Instant::now();
    loop {
        let mut found = classify(fleet).await?;
        if found.leaked() == 0 {
            found.clean_after = Some(started.elapsed());
            return Ok(found);
        }
        if started.elapsed() >= within {
            return Ok(found);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

async fn classify(fleet: &Fleet) -> Result<Leftovers> {
    let mut etcd = fleet.etcd().await?;
    let root = format!("{}/", fleet.prefix);
    let options = etcd_client::GetOptions::new()
        .with_prefix()
        .with_keys_only();
    let answer = etcd.get(root.as_str(), Some(options)).await?;
    let mut ttls: BTreeMap<i64, i64> = BTreeMap::new();
    let mut found = Leftovers::default();
    for kv in answer.kvs() {
        let key = String::from_utf8_lossy(kv.key());
        let key = key.strip_prefix(&root).unwrap_or(&key).to_owned();
        let lease = kv.lease();
        let family = Family::of(&key, lease != 0);
        let ttl = if lease == 0 {
            None
        } else if let Some(ttl) = ttls.get(&lease) {
            Some(*ttl)
        } else {
            let ttl = etcd
                .lease_time_to_live(lease, None)
                .await
                .map_or(-1, |answer| answer.ttl());
            ttls.insert(lease, ttl);
            Some(ttl)
        };
        let count = found.families.entry(family).or_default();
        count.keys += 1;
        count.max_ttl = count.max_ttl.max(ttl);
        if family.leaked() && count.samples.len() < 3 {
            count.samples.push(key);
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::Family;

    #[test]
    fn keys_fall_into_their_families() {
        let cases = [
            ("limiter/limits/AC/r", false, Family::Limit),
            ("limiter/commits/0a", false, Family::CommitMarker),
            ("limiter/slots/0a/s1", true, Family::Slot),
            ("limiter/shards/0a", true, Family::Replica),
            ("router/comms/AC/CM-1", true, Family::RetainedCommunication),
            ("router/comms/AC/CM-1", false, Family::RunningCommunication),
            ("router/owned/1f/AC/CM-1", false, Family::OwnedIndex),
            ("presence/AC/~left/alice/d1", true, Family::LeaveNote),
            ("presence/AC/alice/d1", true, Family::DeviceRecord),
            ("something/else", false, Family::Unknown),
        ];
        for (key, leased, family) in cases {
            assert_eq!(Family::of(key, leased), family, "{key}");
        }
    }
}

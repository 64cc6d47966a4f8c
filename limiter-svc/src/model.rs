//! Validated requests and the small value types the limiter works with.

use std::fmt;

use plumbing::validate::{self, FieldError};

/// Number of shards keys are spread over; each shard has one owner replica at a time. 48
/// divides evenly among 1, 2, 3, 4, 6, 8, 12 and 16 replicas, and at most one shard in
/// 48 (~2 %) moves per handoff.
pub const SHARDS: u16 = 48;
// The bounds of requests are the contract's, stated once in plumbing.
pub use plumbing::rules::{
    DEFAULT_HOLD_SECS, MAX_HOLD_SECS, MAX_LIMIT, MAX_WAIT_MS, REQUEST_ID_MAX, RESOURCE_MAX,
};

/// One limited key: (account, resource).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    /// Account id.
    pub account: String,
    /// Resource name.
    pub resource: String,
}

impl SlotKey {
    /// The shard this key lives in: a stable hash (FNV-1a), so every replica agrees.
    pub fn shard(&self) -> u16 {
        let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
        for byte in self.account.bytes().chain([0]).chain(self.resource.bytes()) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
        (hash % u64::from(SHARDS)) as u16
    }
}

impl fmt::Display for SlotKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.account, self.resource)
    }
}

/// A slot id: two hex digits of shard, then 24 random hex digits. The shard prefix lets any
/// replica route a Release or Renew to the owner without a lookup.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotId(String);

impl SlotId {
    /// A fresh id in `shard`.
    pub fn new(shard: u16) -> Self {
        Self(format!("{shard:02x}{:024x}", rand::random::<u128>() >> 32))
    }

    /// Parses a client-supplied id.
    pub fn parse(field: &str, text: &str) -> Result<Self, FieldError> {
        let valid = text.len() == 26
            && text
                .bytes()
                .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
            && u16::from_str_radix(&text[..2], 16).is_ok_and(|s| s < SHARDS);
        if valid {
            Ok(Self(text.to_owned()))
        } else {
            Err(FieldError::new(
                field,
                "is not a slot id returned by Acquire",
            ))
        }
    }

    /// The shard encoded in the id.
    pub fn shard(&self) -> u16 {
        u16::from_str_radix(&self.0[..2], 16).unwrap_or(0)
    }

    /// The id text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A validated Acquire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcquireSpec {
    /// The key.
    pub key: SlotKey,
    /// Idempotency key; empty disables it.
    pub request_id: String,
    /// Hold in seconds.
    pub hold_secs: u32,
    /// Queue wait in milliseconds (0: reject at once).
    pub wait_ms: u32,
}

impl AcquireSpec {
    /// Validates the request fields (the account has already been resolved from the token).
    pub fn new(
        account: String,
        resource: String,
        request_id: String,
        hold_seconds: u32,
        wait_timeout_ms: u32,
    ) -> Result<Self, FieldError> {
        validate::account_id("account_id", &account)?;
        resource_name("resource", &resource)?;
        if !request_id.is_empty() {
            validate::name("request_id", &request_id, REQUEST_ID_MAX)?;
        }
        let hold_secs = hold(hold_seconds, "hold_seconds")?;
        validate::in_range("wait_timeout_ms", wait_timeout_ms, 0, MAX_WAIT_MS)?;
        Ok(Self {
            key: SlotKey { account, resource },
            request_id,
            hold_secs,
            wait_ms: wait_timeout_ms,
        })
    }
}

/// `hold_seconds`: 0 means the default, otherwise 1..=86400.
pub fn hold(value: u32, field: &str) -> Result<u32, FieldError> {
    if value == 0 {
        return Ok(DEFAULT_HOLD_SECS);
    }
    validate::in_range(field, value, 1, MAX_HOLD_SECS)?;
    Ok(value)
}

/// Resource names: 1–300 characters of `A-Z a-z 0-9 . _ : / - @ +` (room for
/// `identity.communications/<identity>`).
pub fn resource_name(field: &str, value: &str) -> Result<(), FieldError> {
    if value.is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if value.len() > RESOURCE_MAX {
        return Err(FieldError::new(
            field,
            format!("must be at most {RESOURCE_MAX} characters"),
        ));
    }
    if !value
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '/' | '-' | '@' | '+'))
    {
        return Err(FieldError::new(
            field,
            "may only contain A-Z a-z 0-9 . _ : / - @ +",
        ));
    }
    Ok(())
}

/// A limit as stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct LimitValue {
    /// Most slots in flight.
    pub max_in_flight: u32,
    /// Grant everything but count would-be rejections.
    #[serde(default)]
    pub shadow: bool,
}

/// Where the limit in force comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitSource {
    /// The account's own limit.
    Account,
    /// The `*` default for the resource.
    Default,
    /// The server's `--default-limit`.
    Server,
    /// No limit at all.
    Unlimited,
}

/// Milliseconds since the Unix epoch, as the slot table keeps expiries.
pub use plumbing::time::now_ms_u64 as now_ms;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_ids_carry_their_shard_and_reject_forgeries() {
        for shard in 0..SHARDS {
            let id = SlotId::new(shard);
            assert_eq!(id.shard(), shard);
            assert_eq!(SlotId::parse("slot_id", id.as_str()).ok(), Some(id));
        }
        for bad in [
            "",
            "zz",
            "ff00000000000000000000000a",
            "0G00000000000000000000000a",
            "00",
        ] {
            assert!(SlotId::parse("slot_id", bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_shard_hash_is_the_documented_fnv1a() {
        // Vectors computed independently from the GetShardMap documentation.
        let shard = |a: &str, r: &str| {
            SlotKey {
                account: a.into(),
                resource: r.into(),
            }
            .shard()
        };
        assert_eq!(shard("AC1", "calls"), 13);
        assert_eq!(shard("ACx", "communications"), 40);
        assert_eq!(shard("", ""), 15);
    }

    #[test]
    fn shards_are_stable_and_spread() {
        let key = |a: &str| SlotKey {
            account: a.into(),
            resource: "communications".into(),
        };
        assert_eq!(key("AC1").shard(), key("AC1").shard());
        let used: std::collections::HashSet<u16> =
            (0..1000).map(|i| key(&format!("AC{i}")).shard()).collect();
        assert_eq!(used.len(), usize::from(SHARDS));
    }

    #[test]
    fn acquire_fields_are_validated_by_name() {
        let spec = |resource: &str, hold: u32, wait: u32| {
            AcquireSpec::new("AC1".into(), resource.into(), String::new(), hold, wait)
        };
        assert_eq!(
            spec("calls", 0, 0).map(|s| s.hold_secs),
            Ok(DEFAULT_HOLD_SECS)
        );
        assert!(spec("", 1, 0).is_err_and(|e| e.field == "resource"));
        assert!(spec("a b", 1, 0).is_err_and(|e| e.field == "resource"));
        assert!(spec(&"r".repeat(RESOURCE_MAX), 1, 0).is_ok());
        assert!(spec(&"r".repeat(RESOURCE_MAX + 1), 1, 0).is_err_and(|e| e.field == "resource"));
        assert!(spec("calls", 86_401, 0).is_err_and(|e| e.field == "hold_seconds"));
        assert!(spec("calls", 1, 60_001).is_err_and(|e| e.field == "wait_timeout_ms"));
        assert!(
            AcquireSpec::new("A/1".into(), "calls".into(), String::new(), 1, 0)
                .is_err_and(|e| e.field == "account_id")
        );
    }
}

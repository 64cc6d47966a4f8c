//! What presence keeps in etcd: the key layout, the device record and the leave note, and
//! their conversion to the public `Device` message.
//!
//! ```text
//! <prefix>/presence/<account>/<identity>/<device_id>          device record (JSON)
//! <prefix>/presence/<account>/~left/<identity>/<device_id>    leave note (JSON), short-lived
//! ```
//! Identities, device ids and account ids never contain `/` or `~` (see [`crate::rules`]), so
//! every key parses back unambiguously and `~left` can never be an identity.

use std::collections::BTreeMap;

use etcd_client::KeyValue;
use proto::presence::v1 as pb;
use serde::{Deserialize, Serialize};

/// The segment under an account that holds leave notes.
const NOTES_SEGMENT: &str = "~left";

/// One device of one identity of one account.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceKey {
    /// The account.
    pub account: String,
    /// The identity within the account.
    pub identity: String,
    /// The device within the identity.
    pub device_id: String,
}

/// Where presence keys live in etcd.
#[derive(Debug, Clone)]
pub struct Layout {
    root: String,
}

/// What an etcd key under the presence root is.
#[derive(Debug, PartialEq, Eq)]
pub enum ParsedKey {
    /// A device record.
    Device(DeviceKey),
    /// The leave note of a device.
    Note(DeviceKey),
}

impl Layout {
    /// The layout under `root` (`<prefix>/presence/`, with the trailing slash).
    pub fn new(root: String) -> Self {
        Self { root }
    }

    /// `<prefix>/presence/`: every presence key.
    pub fn root(&self) -> &str {
        &self.root
    }

    /// `<prefix>/presence/<account>/`: everything of one account (what a watch covers).
    pub fn account_prefix(&self, account: &str) -> String {
        format!("{}{account}/", self.root)
    }

    /// `<prefix>/presence/<account>/<identity>/`: the devices of one identity.
    pub fn identity_prefix(&self, account: &str, identity: &str) -> String {
        format!("{}{account}/{identity}/", self.root)
    }

    /// The key of a device record.
    pub fn device(&self, key: &DeviceKey) -> String {
        format!(
            "{}{}/{}/{}",
            self.root, key.account, key.identity, key.device_id
        )
    }

    /// The key of a device's leave note.
    pub fn note(&self, key: &DeviceKey) -> String {
        format!(
            "{}{}/{NOTES_SEGMENT}/{}/{}",
            self.root, key.account, key.identity, key.device_id
        )
    }

    /// What `key` is, or `None` for anything else under the root.
    pub fn parse(&self, key: &[u8]) -> Option<ParsedKey> {
        let rest = std::str::from_utf8(key).ok()?.strip_prefix(&self.root)?;
        let parts: Vec<&str> = rest.split('/').collect();
        let owned = |account: &str, identity: &str, device: &str| DeviceKey {
            account: account.to_owned(),
            identity: identity.to_owned(),
            device_id: device.to_owned(),
        };
        match parts.as_slice() {
            [account, NOTES_SEGMENT, identity, device] => {
                Some(ParsedKey::Note(owned(account, identity, device)))
            }
            [account, identity, device]
                if ![*account, *identity, *device].iter().any(|p| p.is_empty()) =>
            {
                Some(ParsedKey::Device(owned(account, identity, device)))
            }
            _ => None,
        }
    }
}

/// A device's own status (never offline: an offline device has no record).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceStatus {
    /// Takes communications.
    Available,
    /// Engaged.
    Busy,
    /// Away from the device.
    Away,
    /// Does not want to be disturbed.
    DoNotDisturb,
}

impl DeviceStatus {
    /// The aggregate order: an identity's status is its best device's.
    pub fn rank(self) -> u8 {
        match self {
            DeviceStatus::Available => 4,
            DeviceStatus::Busy => 3,
            DeviceStatus::Away => 2,
            DeviceStatus::DoNotDisturb => 1,
        }
    }

    /// The wire value.
    pub fn to_pb(self) -> pb::Status {
        match self {
            DeviceStatus::Available => pb::Status::Available,
            DeviceStatus::Busy => pb::Status::Busy,
            DeviceStatus::Away => pb::Status::Away,
            DeviceStatus::DoNotDisturb => pb::Status::DoNotDisturb,
        }
    }

    /// From a wire value; `None` for unspecified and offline.
    pub fn from_pb(status: pb::Status) -> Option<Self> {
        match status {
            pb::Status::Available => Some(DeviceStatus::Available),
            pb::Status::Busy => Some(DeviceStatus::Busy),
            pb::Status::Away => Some(DeviceStatus::Away),
            pb::Status::DoNotDisturb => Some(DeviceStatus::DoNotDisturb),
            pb::Status::Unspecified | pb::Status::Offline => None,
        }
    }
}

/// How a device is kept present.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// Register + Heartbeat, under the device's own lease.
    Registration,
    /// A live Connect stream, under the holding replica's lease.
    Stream,
}

/// A device record as stored in etcd (the account, identity and device id are in the key;
/// the revision is etcd's).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    /// The device's status.
    pub status: DeviceStatus,
    /// Free-form attributes (ordered, so equal records encode equally).
    #[serde(default)]
    pub attributes: BTreeMap<String, String>,
    /// Out-of-band contact.
    #[serde(default)]
    pub contact: String,
    /// Registration or stream.
    pub kind: Kind,
    /// Address of the replica holding the stream (streams only).
    #[serde(default)]
    pub replica: String,
    /// Id of the stream session holding the device (streams only): tells a replaced session
    /// from the current one.
    #[serde(default)]
    pub session: String,
    /// The lease the record is attached to: the device's own (registrations, so any replica
    /// can keep it alive) or the replica's (streams).
    pub lease: i64,
    /// TTL of a registration, seconds (0 for streams).
    #[serde(default)]
    pub ttl_seconds: u32,
    /// When the device became present, Unix milliseconds.
    pub register_time_ms: i64,
    /// Expiry as of this write, Unix milliseconds (registrations only).
    #[serde(default)]
    pub expire_time_ms: Option<i64>,
}

impl DeviceRecord {
    /// The stored bytes.
    pub fn encode(&self) -> Vec<u8> {
        // Serialising plain data into a Vec cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes stored bytes.
    pub fn decode(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// The public view of this record at `revision`.
    pub fn to_device(&self, key: &DeviceKey, revision: i64) -> pb::Device {
        pb::Device {
            device_id: key.device_id.clone(),
            identity: key.identity.clone(),
            account_id: key.account.clone(),
            status: self.status.to_pb() as i32,
            attributes: self
                .attributes
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            contact: self.contact.clone(),
            connection_kind: match self.kind {
                Kind::Registration => pb::ConnectionKind::Registration,
                Kind::Stream => pb::ConnectionKind::Stream,
            } as i32,
            replica: self.replica.clone(),
            register_time: Some(timestamp(self.register_time_ms)),
            expire_time: self.expire_time_ms.map(timestamp),
            revision,
            ttl_seconds: self.ttl_seconds,
        }
    }
}

/// Why a device left, written next to the deletion in the same transaction so that watchers
/// can tell. Without a note, a deletion is a lease expiry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeaveReason {
    /// Unregister.
    Unregistered,
    /// The Connect stream closed.
    Disconnected,
    /// Removed for a newer device by the device limit.
    Evicted,
}

impl LeaveReason {
    /// The wire value.
    pub fn to_pb(self) -> pb::LeaveReason {
        match self {
            LeaveReason::Unregistered => pb::LeaveReason::Unregistered,
            LeaveReason::Disconnected => pb::LeaveReason::Disconnected,
            LeaveReason::Evicted => pb::LeaveReason::Evicted,
        }
    }
}

/// The value of a leave note.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct LeaveNote {
    /// Why the device left.
    pub reason: LeaveReason,
}

impl LeaveNote {
    /// The stored bytes.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// The reason in a stored note, if it parses.
    pub fn reason_of(bytes: &[u8]) -> Option<LeaveReason> {
        serde_json::from_slice::<LeaveNote>(bytes)
            .ok()
            .map(|n| n.reason)
    }
}

/// A device record read back from etcd with its revisions.
#[derive(Debug, Clone)]
pub struct StoredDevice {
    /// Which device.
    pub key: DeviceKey,
    /// The record.
    pub record: DeviceRecord,
    /// Revision of its creation (the age order for eviction).
    pub create_revision: i64,
    /// Revision of its last change.
    pub mod_revision: i64,
}

impl StoredDevice {
    /// Decodes a device record kv; `None` for notes, foreign keys and undecodable values
    /// (logged: something other than presence-svc wrote there).
    pub fn from_kv(layout: &Layout, kv: &KeyValue) -> Option<Self> {
        let Some(ParsedKey::Device(key)) = layout.parse(kv.key()) else {
            return None;
        };
        match DeviceRecord::decode(kv.value()) {
            Ok(record) => Some(Self {
                key,
                record,
                create_revision: kv.create_revision(),
                mod_revision: kv.mod_revision(),
            }),
            Err(err) => {
                tracing::warn!(key = %String::from_utf8_lossy(kv.key()), error = %err, "ignoring an undecodable device record");
                None
            }
        }
    }

    /// The public view.
    pub fn to_device(&self) -> pb::Device {
        self.record.to_device(&self.key, self.mod_revision)
    }
}

pub use plumbing::time::now_ms;

/// A protobuf timestamp from Unix milliseconds.
pub fn timestamp(ms: i64) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: ms.div_euclid(1000),
        nanos: i32::try_from(ms.rem_euclid(1000) * 1_000_000).unwrap_or(0),
    }
}

/// A random UUID (version 4), for generated device ids.
pub fn new_uuid() -> String {
    // Version nibble 4 (bits 76..80) and variant 10 (bits 62..64).
    let bits = rand::random::<u128>() & !(0xf_u128 << 76) & !(0x3_u128 << 62);
    let bits = bits | (0x4_u128 << 76) | (0x2_u128 << 62);
    let hex = format!("{bits:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[12..16],
        &hex[16..20],
        &hex[20..32]
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn key(account: &str, identity: &str, device: &str) -> DeviceKey {
        DeviceKey {
            account: account.into(),
            identity: identity.into(),
            device_id: device.into(),
        }
    }

    #[test]
    fn keys_parse_back_to_devices_and_notes() {
        let layout = Layout::new("/sb/presence/".into());
        let device = key("AC1", "alice", "phone");
        assert_eq!(layout.device(&device), "/sb/presence/AC1/alice/phone");
        assert_eq!(
            layout.parse(layout.device(&device).as_bytes()),
            Some(ParsedKey::Device(device.clone()))
        );
        assert_eq!(
            layout.parse(layout.note(&device).as_bytes()),
            Some(ParsedKey::Note(device))
        );
        assert_eq!(layout.parse(b"/sb/presence/AC1/alice"), None);
        assert_eq!(layout.parse(b"/sb/presence/AC1//x"), None);
        assert_eq!(layout.parse(b"/sb/other/AC1/alice/phone"), None);
    }

    #[test]
    fn uuids_are_version_4() {
        let id = new_uuid();
        assert_eq!(id.len(), 36);
        assert_eq!(&id[14..15], "4");
        assert!(matches!(&id[19..20], "8" | "9" | "a" | "b"), "{id}");
    }

    #[test]
    fn timestamps_split_milliseconds() {
        let ts = timestamp(1_700_000_000_123);
        assert_eq!((ts.seconds, ts.nanos), (1_700_000_000, 123_000_000));
    }
}

//! Field rules of the presence API (INVALID_ARGUMENT naming the field and the rule), and
//! the bounds they enforce.

use std::collections::{BTreeMap, HashMap};

use plumbing::validate::{self, FieldError};
use proto::presence::v1 as pb;

use crate::record::DeviceStatus;

// The bounds themselves are the contract's, stated once in plumbing.
pub use plumbing::rules::{
    ATTRIBUTE_KEY_MAX, ATTRIBUTE_VALUE_MAX, ATTRIBUTES_BYTES_MAX, ATTRIBUTES_MAX, CONTACT_MAX,
    DEVICE_ID_MAX, IDENTITIES_MAX, IDENTITY_MAX, PARAMETER_NAME_MAX, PARAMETER_VALUE_MAX,
    PARAMETERS_MAX, TTL_DEFAULT, TTL_MAX, TTL_MIN,
};

/// Identities: 1–256 characters of `A-Z a-z 0-9 . _ - : @ +`.
pub fn identity(field: &str, value: &str) -> Result<(), FieldError> {
    validate::name(field, value, IDENTITY_MAX)
}

/// Device ids: 1–128 characters of the identity charset.
pub fn device_id(field: &str, value: &str) -> Result<(), FieldError> {
    validate::name(field, value, DEVICE_ID_MAX)
}

/// Ids chosen by the router (offer and communication ids): the identity rules.
pub fn external_id(field: &str, value: &str) -> Result<(), FieldError> {
    validate::name(field, value, IDENTITY_MAX)
}

/// A status a device sets for itself: `unspecified` means `default` (`None`: "no change"),
/// offline and unknown values are refused.
pub fn device_status(
    field: &str,
    value: i32,
    default: Option<DeviceStatus>,
) -> Result<Option<DeviceStatus>, FieldError> {
    match pb::Status::try_from(value) {
        Ok(pb::Status::Unspecified) => Ok(default),
        Ok(pb::Status::Offline) => Err(FieldError::new(
            field,
            "a device cannot set itself offline; unregister it or close its stream",
        )),
        Ok(status) => Ok(DeviceStatus::from_pb(status)),
        Err(_) => Err(unknown_enum(field, value)),
    }
}

/// A status filter: any known value (`unspecified` = any).
pub fn status_filter(field: &str, value: i32) -> Result<pb::Status, FieldError> {
    pb::Status::try_from(value).map_err(|_| unknown_enum(field, value))
}

/// "unknown value N".
pub fn unknown_enum(field: &str, value: i32) -> FieldError {
    FieldError::new(field, format!("unknown value {value}"))
}

/// Registration TTL: 0 means the default, else within bounds.
pub fn ttl(field: &str, value: u32) -> Result<u32, FieldError> {
    if value == 0 {
        return Ok(TTL_DEFAULT);
    }
    validate::in_range(field, value, TTL_MIN, TTL_MAX)?;
    Ok(value)
}

/// Device attributes: count, key charset and length, value length, total size.
pub fn attributes(
    field: &str,
    value: &HashMap<String, String>,
) -> Result<BTreeMap<String, String>, FieldError> {
    string_map(
        field,
        value,
        ATTRIBUTES_MAX,
        ATTRIBUTE_VALUE_MAX,
        ATTRIBUTES_BYTES_MAX,
    )
}

/// Offer parameters: the router's own bounds (names are free text, as in its Route and
/// `<Parameter>` rules); the request size limit bounds the total.
pub fn parameters(field: &str, value: &HashMap<String, String>) -> Result<(), FieldError> {
    if value.len() > PARAMETERS_MAX {
        return Err(FieldError::new(
            field,
            format!("at most {PARAMETERS_MAX} entries (got {})", value.len()),
        ));
    }
    for (name, item) in value {
        let length = name.chars().count();
        if length == 0 || length > PARAMETER_NAME_MAX {
            return Err(FieldError::new(
                format!("{field} key"),
                format!("must be 1 to {PARAMETER_NAME_MAX} characters"),
            ));
        }
        text(&format!("{field}[{name}]"), item, PARAMETER_VALUE_MAX)?;
    }
    Ok(())
}

fn string_map(
    field: &str,
    value: &HashMap<String, String>,
    max_entries: usize,
    max_value: usize,
    max_bytes: usize,
) -> Result<BTreeMap<String, String>, FieldError> {
    if value.len() > max_entries {
        return Err(FieldError::new(
            field,
            format!("at most {max_entries} entries (got {})", value.len()),
        ));
    }
    let mut total = 0;
    let mut sorted = BTreeMap::new();
    for (key, item) in value {
        validate::name(&format!("{field} key"), key, ATTRIBUTE_KEY_MAX)?;
        if item.chars().count() > max_value {
            return Err(FieldError::new(
                format!("{field}[{key}]"),
                format!("must be at most {max_value} characters"),
            ));
        }
        total += key.len() + item.len();
        sorted.insert(key.clone(), item.clone());
    }
    if total > max_bytes {
        return Err(FieldError::new(
            field,
            format!("keys and values must total at most {max_bytes} bytes (got {total})"),
        ));
    }
    Ok(sorted)
}

/// Contact: at most 1024 characters.
pub fn contact(field: &str, value: &str) -> Result<(), FieldError> {
    if value.chars().count() > CONTACT_MAX {
        return Err(FieldError::new(
            field,
            format!("must be at most {CONTACT_MAX} characters"),
        ));
    }
    Ok(())
}

/// Free text of bounded length (offer `from`, `to`, `channel`).
pub fn text(field: &str, value: &str, max: usize) -> Result<(), FieldError> {
    if value.chars().count() > max {
        return Err(FieldError::new(
            field,
            format!("must be at most {max} characters"),
        ));
    }
    Ok(())
}

/// `min_revision`: not negative.
pub fn min_revision(field: &str, value: i64) -> Result<i64, FieldError> {
    if value < 0 {
        return Err(FieldError::new(field, "must not be negative"));
    }
    Ok(value)
}

/// A list of identities: 1 (or 0 when `allow_empty`) to 1000 entries, each valid.
pub fn identities(field: &str, values: &[String], allow_empty: bool) -> Result<(), FieldError> {
    if values.is_empty() && !allow_empty {
        return Err(FieldError::new(field, "must name at least one identity"));
    }
    if values.len() > IDENTITIES_MAX {
        return Err(FieldError::new(
            field,
            format!("at most {IDENTITIES_MAX} entries (got {})", values.len()),
        ));
    }
    for (i, value) in values.iter().enumerate() {
        identity(&format!("{field}[{i}]"), value)?;
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn statuses_default_refuse_offline_and_unknown() {
        let available = Some(DeviceStatus::Available);
        assert_eq!(device_status("status", 0, available), Ok(available));
        assert_eq!(device_status("status", 0, None), Ok(None));
        assert_eq!(
            device_status("status", 2, None),
            Ok(Some(DeviceStatus::Busy))
        );
        let offline = device_status("status", 5, None).unwrap_err().to_string();
        assert!(offline.starts_with("status: a device cannot set itself offline"));
        assert_eq!(
            device_status("status", 42, None).unwrap_err().to_string(),
            "status: unknown value 42"
        );
    }

    #[test]
    fn ttls_default_and_stay_within_bounds() {
        assert_eq!(ttl("ttl_seconds", 0), Ok(TTL_DEFAULT));
        assert_eq!(ttl("ttl_seconds", 5), Ok(5));
        assert_eq!(
            ttl("ttl_seconds", 4).unwrap_err().to_string(),
            "ttl_seconds: must be from 5 to 3600 (got 4)"
        );
        assert!(ttl("ttl_seconds", 3601).is_err());
    }

    #[test]
    fn attributes_are_bounded_in_count_length_and_size() {
        let many: HashMap<String, String> =
            (0..33).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(
            attributes("attributes", &many)
                .unwrap_err()
                .to_string()
                .contains("at most 32 entries")
        );
        let bad_key = HashMap::from([("a b".to_owned(), "x".to_owned())]);
        assert!(
            attributes("attributes", &bad_key)
                .unwrap_err()
                .to_string()
                .starts_with("attributes key: may only contain")
        );
        let long_value = HashMap::from([("k".to_owned(), "x".repeat(257))]);
        assert!(attributes("attributes", &long_value).is_err());
        let big: HashMap<String, String> = (0..20)
            .map(|i| (format!("k{i}"), "x".repeat(250)))
            .collect();
        assert!(
            attributes("attributes", &big)
                .unwrap_err()
                .to_string()
                .contains("total at most 4096 bytes")
        );
        let fine = HashMap::from([("platform".to_owned(), "android".to_owned())]);
        assert_eq!(attributes("attributes", &fine).unwrap().len(), 1);
    }

    #[test]
    fn identities_are_bounded_and_each_checked() {
        assert!(identity("identity", &"a".repeat(256)).is_ok());
        assert!(identity("identity", &"a".repeat(257)).is_err());
        assert!(identity("identity", "a/b").is_err());
        assert!(identity("identity", "~left").is_err());
        let bad = vec!["ok".to_owned(), "not ok".to_owned()];
        assert!(
            identities("identities", &bad, false)
                .unwrap_err()
                .to_string()
                .starts_with("identities[1]:")
        );
        assert!(identities("identities", &[], false).is_err());
        assert!(identities("identities", &[], true).is_ok());
    }
}

//! Field rules shared by every service, each failure naming the field and the rule
//! (INVALID_ARGUMENT through [`crate::status`]).

/// A request field that broke a rule.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {rule}")]
pub struct FieldError {
    /// The field, as named in the proto (`limit.max_in_flight`).
    pub field: String,
    /// The rule it broke, in words.
    pub rule: String,
}

impl FieldError {
    /// A new error for `field`.
    pub fn new(field: impl Into<String>, rule: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            rule: rule.into(),
        }
    }
}

pub use crate::rules::{ACCOUNT_ID_MAX, NAME_MAX};

/// Account ids: 1–64 characters of `A-Z a-z 0-9 . _ -`.
pub fn account_id(field: &str, value: &str) -> Result<(), FieldError> {
    token_chars(
        field,
        value,
        ACCOUNT_ID_MAX,
        |c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'),
        "A-Z a-z 0-9 . _ -",
    )
}

/// Names (identities, resources, device ids, request ids): 1–`max` characters of
/// `A-Z a-z 0-9 . _ - : @ +`.
pub fn name(field: &str, value: &str, max: usize) -> Result<(), FieldError> {
    token_chars(
        field,
        value,
        max,
        |c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '@' | '+'),
        "A-Z a-z 0-9 . _ - : @ +",
    )
}

/// Must not be empty.
pub fn non_empty(field: &str, value: &str) -> Result<(), FieldError> {
    if value.is_empty() {
        Err(FieldError::new(field, "must not be empty"))
    } else {
        Ok(())
    }
}

/// At most `max` bytes.
pub fn max_len(field: &str, value: &str, max: usize) -> Result<(), FieldError> {
    if value.len() > max {
        Err(FieldError::new(
            field,
            format!("must be at most {max} bytes"),
        ))
    } else {
        Ok(())
    }
}

/// Inclusive numeric range.
pub fn in_range<T: PartialOrd + std::fmt::Display>(
    field: &str,
    value: T,
    min: T,
    max: T,
) -> Result<(), FieldError> {
    if value < min || value > max {
        Err(FieldError::new(
            field,
            format!("must be from {min} to {max} (got {value})"),
        ))
    } else {
        Ok(())
    }
}

/// Free text: 1–`max` characters, no control characters.
pub fn text(field: &str, value: &str, max: usize) -> Result<(), FieldError> {
    characters(field, value, max)?;
    if value.chars().any(char::is_control) {
        return Err(FieldError::new(
            field,
            "must not contain control characters",
        ));
    }
    Ok(())
}

/// 1–`max` characters.
fn characters(field: &str, value: &str, max: usize) -> Result<(), FieldError> {
    if value.is_empty() {
        return Err(FieldError::new(field, "must not be empty"));
    }
    if value.chars().count() > max {
        return Err(FieldError::new(
            field,
            format!("must be at most {max} characters"),
        ));
    }
    Ok(())
}

fn token_chars(
    field: &str,
    value: &str,
    max: usize,
    allowed: impl Fn(char) -> bool,
    charset: &str,
) -> Result<(), FieldError> {
    characters(field, value, max)?;
    if !value.chars().all(allowed) {
        return Err(FieldError::new(
            field,
            format!("may only contain {charset}"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_ids_follow_the_charset_and_length() {
        assert!(account_id("account_id", "AC123_x-y.z").is_ok());
        assert_eq!(
            account_id("account_id", "").map_err(|e| e.to_string()),
            Err("account_id: must not be empty".into())
        );
        assert!(account_id("account_id", "a/b").is_err());
        assert!(account_id("account_id", &"a".repeat(65)).is_err());
    }

    #[test]
    fn names_allow_phone_numbers_and_uris() {
        assert!(name("identity", "alice@example.com", NAME_MAX).is_ok());
        assert!(name("to", "+15550100", NAME_MAX).is_ok());
        assert!(name("identity", "al ice", NAME_MAX).is_err());
        assert!(name("identity", &"x".repeat(257), NAME_MAX).is_err());
    }

    #[test]
    fn ranges_name_their_bounds() {
        assert_eq!(
            in_range("hold_seconds", 0, 1, 86400).map_err(|e| e.to_string()),
            Err("hold_seconds: must be from 1 to 86400 (got 0)".into())
        );
    }
}

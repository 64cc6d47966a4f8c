//! Page sizes and page tokens of every List RPC, one rule and one format for all of them.
//!
//! `page_size`: 0 means [`DEFAULT_PAGE_SIZE`], a size above [`MAX_PAGE_SIZE`] is clamped to
//! it, a negative size is INVALID_ARGUMENT.
//!
//! A page token is opaque to clients: base64url (no padding) of `v1:<listing>:<cursor>`.
//! `v1` is the format's version. `<listing>` names the RPC and the request fields that chose
//! what is listed (its account, its filter), so a token only continues the listing it came
//! from — used with another filter or account it is refused with "must be used with the
//! same request it was returned for". `<cursor>` is where the next page starts, in the
//! listing's own order (the last item of the page before).

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

use crate::validate::FieldError;

pub use crate::rules::{DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE, MAX_PAGE_TOKEN};

/// The version tag of the token format.
const VERSION: &str = "v1";

/// `page_size` of a List request: 0 → [`DEFAULT_PAGE_SIZE`], above the maximum → the
/// maximum, negative → an error naming the field.
pub fn page_size(value: i32) -> Result<usize, FieldError> {
    match usize::try_from(value) {
        Err(_) => Err(FieldError::new("page_size", "must not be negative")),
        Ok(0) => Ok(DEFAULT_PAGE_SIZE),
        Ok(size) => Ok(size.min(MAX_PAGE_SIZE)),
    }
}

/// The token of the page that starts after `cursor` in `listing` (e.g.
/// `ListPresence/AC1/STATUS_BUSY`).
pub fn encode(listing: &str, cursor: &str) -> String {
    URL_SAFE_NO_PAD.encode(format!("{VERSION}:{}:{cursor}", escape(listing)))
}

/// The cursor of `token` ("" → `None`: the first page), if it was returned for `listing`.
pub fn decode(token: &str, listing: &str) -> Result<Option<String>, FieldError> {
    if token.is_empty() {
        return Ok(None);
    }
    let foreign = || FieldError::new("page_token", "is not a token this server returned");
    if token.len() > MAX_PAGE_TOKEN {
        return Err(foreign());
    }
    let text = URL_SAFE_NO_PAD
        .decode(token)
        .ok()
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .ok_or_else(foreign)?;
    let mut parts = text.splitn(3, ':');
    let (Some(VERSION), Some(issued_for), Some(cursor)) =
        (parts.next(), parts.next(), parts.next())
    else {
        return Err(foreign());
    };
    if issued_for != escape(listing) {
        return Err(FieldError::new(
            "page_token",
            "must be used with the same request it was returned for (same account and filters)",
        ));
    }
    Ok(Some(cursor.to_owned()))
}

/// `listing` with its `:` (the separator) and `%` percent-escaped.
fn escape(listing: &str) -> String {
    listing.replace('%', "%25").replace(':', "%3A")
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn page_sizes_default_clamp_and_refuse_negatives() {
        assert_eq!(page_size(0), Ok(DEFAULT_PAGE_SIZE));
        assert_eq!(page_size(7), Ok(7));
        assert_eq!(page_size(5000), Ok(MAX_PAGE_SIZE));
        assert!(page_size(-1).is_err_and(|e| e.field == "page_size"));
    }

    #[test]
    fn tokens_round_trip_and_continue_only_their_own_listing() {
        let token = encode("ListCommunications/AC1/ENDED", "1700000000000:CM:1");
        assert_eq!(
            decode(&token, "ListCommunications/AC1/ENDED"),
            Ok(Some("1700000000000:CM:1".to_owned()))
        );
        assert_eq!(decode("", "anything"), Ok(None));
        let other = decode(&token, "ListCommunications/AC2/ENDED").unwrap_err();
        assert!(other.rule.contains("same request"), "{other}");
        // A listing holding the separator cannot be confused with a shorter one.
        let tricky = encode("a:b", "c");
        assert!(decode(&tricky, "a").is_err());
        assert_eq!(decode(&tricky, "a:b"), Ok(Some("c".to_owned())));
    }

    #[test]
    fn anything_else_is_not_a_token_of_this_server() {
        for token in [
            "Zm9v",
            "!!!",
            &URL_SAFE_NO_PAD.encode("v2:x:y"),
            &"A".repeat(3000),
        ] {
            let err = decode(token, "x").unwrap_err();
            assert_eq!(err.field, "page_token");
            assert!(err.rule.contains("not a token"), "{token}: {err}");
        }
    }
}

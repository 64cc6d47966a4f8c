//! The limits of the public API, stated once: every bound a request is checked against
//! (lengths, counts, durations, page sizes), used by the services' validation, by the fuzz
//! targets' assertions, and listed in `docs/CONTRACT.md` §4 "Limits" (a test fails when
//! that table and [`ALL`] disagree). A request beyond a limit is refused with
//! INVALID_ARGUMENT naming the field and the rule, before anything changes.
//!
//! Internal tuning (batch sizes, buffers, caches) is not here: it is not part of the
//! contract and lives beside the code it tunes.

/// One limit as the contract states it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// The constant's name (`IDENTITY_MAX`).
    pub name: &'static str,
    /// Its value.
    pub value: u64,
    /// What it bounds, in words.
    pub what: &'static str,
}

macro_rules! rules {
    ($($(#[doc = $doc:literal])+ $name:ident: $ty:ty = $value:expr;)+) => {
        $(
            $(#[doc = $doc])+
            pub const $name: $ty = $value;
        )+
        /// Every limit, in the order the contract lists them.
        pub const ALL: &[Rule] = &[$(Rule {
            name: stringify!($name),
            value: $name as u64,
            what: concat!($($doc),+),
        }),+];
    };
}

rules! {
    // Every service.
    /// Longest account id, in characters (`A-Z a-z 0-9 . _ -`).
    ACCOUNT_ID_MAX: usize = 64;
    /// Longest name (an application address, a device's identity elsewhere), in characters.
    NAME_MAX: usize = 256;
    /// List RPCs: the page size when a request gives none.
    DEFAULT_PAGE_SIZE: usize = 100;
    /// List RPCs: the largest page (a larger `page_size` is clamped to it).
    MAX_PAGE_SIZE: usize = 1000;
    /// List RPCs: the longest page token accepted, in bytes.
    MAX_PAGE_TOKEN: usize = 2048;

    // Presence.
    /// Longest identity, in characters (`A-Z a-z 0-9 . _ - : @ +`).
    IDENTITY_MAX: usize = 256;
    /// Longest device id, in characters.
    DEVICE_ID_MAX: usize = 128;
    /// Registration TTL when the request gives none, in seconds.
    TTL_DEFAULT: u32 = 60;
    /// Shortest registration TTL, in seconds.
    TTL_MIN: u32 = 5;
    /// Longest registration TTL, in seconds.
    TTL_MAX: u32 = 3600;
    /// Most attributes on a device.
    ATTRIBUTES_MAX: usize = 32;
    /// Longest attribute key, in characters.
    ATTRIBUTE_KEY_MAX: usize = 64;
    /// Longest attribute value, in characters.
    ATTRIBUTE_VALUE_MAX: usize = 256;
    /// Most bytes of a device's attribute keys and values together.
    ATTRIBUTES_BYTES_MAX: usize = 4096;
    /// Longest contact, in characters.
    CONTACT_MAX: usize = 1024;
    /// Most identities in one BatchGetPresence or WatchPresence.
    IDENTITIES_MAX: usize = 1000;
    /// Most parameters of an offer (a Route's and a `<Client>`'s together).
    PARAMETERS_MAX: usize = ROUTE_PARAMETERS_MAX + CLIENT_PARAMETERS_MAX;
    /// Longest parameter name, in characters.
    PARAMETER_NAME_MAX: usize = 64;
    /// Longest parameter value, in characters.
    PARAMETER_VALUE_MAX: usize = 1024;

    // Limiter.
    /// Longest resource name, in characters.
    RESOURCE_MAX: usize = 300;
    /// Longest request id, in characters.
    REQUEST_ID_MAX: usize = 128;
    /// Hold when an Acquire leaves `hold_seconds` at 0, in seconds.
    DEFAULT_HOLD_SECS: u32 = 60;
    /// Longest hold of a slot, in seconds.
    MAX_HOLD_SECS: u32 = 86_400;
    /// Longest wait in a key's queue (`wait_timeout_ms`), in milliseconds.
    MAX_WAIT_MS: u32 = 60_000;
    /// Largest limit (`max_in_flight`).
    MAX_LIMIT: u32 = 1_000_000;

    // Router.
    /// Most parameters of a Route request.
    ROUTE_PARAMETERS_MAX: usize = 32;
    /// Most `<Parameter>`s of one `<Client>`.
    CLIENT_PARAMETERS_MAX: usize = 32;
    /// Longest channel (`voice`, `chat`, …), in characters of `a-z 0-9 _ -`.
    CHANNEL_MAX: usize = 32;
    /// Longest webhook URL, in bytes.
    URL_MAX: usize = 2048;
    /// Shortest application signing secret, in bytes.
    SIGNING_SECRET_MIN: usize = 16;
    /// Longest application signing secret, in bytes.
    SIGNING_SECRET_MAX: usize = 256;
    /// Largest instruction document, in bytes.
    INSTRUCTIONS_MAX_BYTES: usize = 64 * 1024;
    /// Deepest nesting of an instruction document.
    INSTRUCTIONS_MAX_DEPTH: usize = 8;
    /// Most elements of an instruction document.
    INSTRUCTIONS_MAX_ELEMENTS: usize = 1000;
    /// Most `<Client>`s in one `<Dial>`.
    DIAL_CLIENTS_MAX: usize = 20;
}

// Defaults lie within their bounds, and an offer holds a Route's and a Client's parameters.
const _: () = {
    assert!(TTL_MIN <= TTL_DEFAULT && TTL_DEFAULT <= TTL_MAX);
    assert!(DEFAULT_HOLD_SECS <= MAX_HOLD_SECS);
    assert!(DEFAULT_PAGE_SIZE <= MAX_PAGE_SIZE);
    assert!(PARAMETERS_MAX == 64);
};

#[cfg(test)]
mod tests {
    use super::*;

    /// The rows of the Limits table in docs/CONTRACT.md: `| `NAME` | value | … |`.
    fn contract_rows() -> Vec<(String, String)> {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/CONTRACT.md");
        let text = std::fs::read_to_string(path).unwrap_or_default();
        text.lines()
            .filter_map(|line| {
                let mut cells = line.split('|').map(str::trim).skip(1);
                let name = cells.next()?.strip_prefix('`')?.strip_suffix('`')?;
                let value = cells.next()?;
                Some((name.to_owned(), value.replace([',', ' ', '\u{202f}'], "")))
            })
            .collect()
    }

    #[test]
    fn the_contract_states_every_limit_with_its_value() {
        let rows = contract_rows();
        let wrong: Vec<String> = ALL
            .iter()
            .filter(|rule| {
                !rows
                    .iter()
                    .any(|(name, value)| name == rule.name && *value == rule.value.to_string())
            })
            .map(|rule| {
                format!(
                    "| `{}` | {} | {} |",
                    rule.name,
                    rule.value,
                    rule.what.trim()
                )
            })
            .collect();
        assert!(
            wrong.is_empty(),
            "docs/CONTRACT.md's Limits table lacks or misstates these rows:\n{}",
            wrong.join("\n")
        );
    }

    #[test]
    fn every_limit_has_its_own_name() {
        let mut names: Vec<&str> = ALL.iter().map(|rule| rule.name).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ALL.len());
    }
}

//! Wall-clock time since the Unix epoch, the one definition every crate uses (record
//! timestamps, token lifetimes, slot expiries).

use std::time::{SystemTime, UNIX_EPOCH};

/// Seconds since the Unix epoch (0 if the clock is before it).
pub fn now_secs() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// [`now_ms`] as the unsigned count the limiter keeps expiries in.
pub fn now_ms_u64() -> u64 {
    now_ms().max(0).unsigned_abs()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clocks_agree() {
        let (secs, ms, unsigned) = (now_secs(), now_ms(), now_ms_u64());
        assert!(secs > 1_600_000_000, "{secs}");
        assert!((ms / 1000 - secs).abs() <= 1, "{ms} vs {secs}");
        assert!(unsigned >= ms.unsigned_abs());
    }
}

//! [`AccountQuota`]: how many of something each account holds on this replica at once —
//! open watches, requests in flight — with a cap, counted in memory.
//!
//! The count is per replica: N replicas admit up to N times the cap for one account. That
//! is the point of a local cap: it needs no round trip, so it also protects the limiter
//! itself and the streams that outlive any limiter slot. A [`QuotaPermit`] gives its unit
//! back when dropped, so a permit kept with a response stream is returned when the stream
//! ends or its client goes away.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

/// A per-account cap on something held for a while.
#[derive(Debug, Clone)]
pub struct AccountQuota {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    max: usize,
    /// What is counted, for messages: e.g. `watches open`.
    what: &'static str,
    /// The flag that sets the cap, for messages.
    flag: &'static str,
    held: Mutex<HashMap<String, usize>>,
}

/// One unit of an account's quota; returned when dropped.
#[derive(Debug)]
pub struct QuotaPermit {
    inner: Arc<Inner>,
    account: String,
}

/// The account already holds its cap. The message names the cap and the flag.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "account `{account}` already has {max} {what} on this replica, the per-account limit ({flag}); retry when one ends"
)]
pub struct QuotaFull {
    /// The account.
    pub account: String,
    /// The cap.
    pub max: usize,
    /// What is counted.
    pub what: &'static str,
    /// The flag that sets the cap.
    pub flag: &'static str,
}

impl AccountQuota {
    /// At most `max` of `what` per account, set by `flag`.
    pub fn new(max: usize, what: &'static str, flag: &'static str) -> Self {
        Self {
            inner: Arc::new(Inner {
                max,
                what,
                flag,
                held: Mutex::default(),
            }),
        }
    }

    /// One unit for `account`, unless it holds the cap already.
    pub fn try_acquire(&self, account: &str) -> Result<QuotaPermit, QuotaFull> {
        let mut held = self.inner.lock();
        let count = held.entry(account.to_owned()).or_insert(0);
        if *count >= self.inner.max {
            return Err(QuotaFull {
                account: account.to_owned(),
                max: self.inner.max,
                what: self.inner.what,
                flag: self.inner.flag,
            });
        }
        *count += 1;
        Ok(QuotaPermit {
            inner: self.inner.clone(),
            account: account.to_owned(),
        })
    }

    /// What `account` holds now.
    pub fn held(&self, account: &str) -> usize {
        self.inner.lock().get(account).copied().unwrap_or(0)
    }

    /// The cap.
    pub fn max(&self) -> usize {
        self.inner.max
    }
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        // The map is consistent after every statement: a panic elsewhere cannot corrupt it.
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for QuotaPermit {
    fn drop(&mut self) {
        let mut held = self.inner.lock();
        if let Some(count) = held.get_mut(&self.account) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                held.remove(&self.account);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn each_account_has_its_own_cap_and_permits_give_units_back() {
        let quota = AccountQuota::new(2, "watches open", "--max-watches-per-account");
        let first = quota.try_acquire("A").unwrap();
        let _second = quota.try_acquire("A").unwrap();
        let full = quota.try_acquire("A").unwrap_err();
        assert_eq!(full.max, 2);
        assert!(full.to_string().contains("--max-watches-per-account"));
        assert!(
            full.to_string()
                .contains("account `A` already has 2 watches open")
        );
        let _other = quota.try_acquire("B").unwrap();
        drop(first);
        assert_eq!(quota.held("A"), 1);
        let _third = quota.try_acquire("A").unwrap();
        assert_eq!(quota.held("A"), 2);
    }

    #[test]
    fn an_account_holding_nothing_leaves_no_entry() {
        let quota = AccountQuota::new(1, "requests in flight", "--max-inflight-per-account");
        drop(quota.try_acquire("A").unwrap());
        assert!(quota.inner.lock().is_empty());
    }
}

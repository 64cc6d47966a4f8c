//! The per-account device cap (`--max-devices-per-account`), beside the per-identity one.
//!
//! The per-identity limit is exact across replicas because every admission is guarded by an
//! etcd compare on the identity's key range. The same compare on an account's range would
//! make every new device of an account conflict with every other (a reconnect storm of one
//! big account would abort itself), so the account cap is decided from the same watch-fed
//! cache plus the new devices this replica is admitting and the cache has not shown yet
//! ([`AccountPlaces`]). It is exact on one replica; across replicas, admissions that race
//! within the cache's lag (milliseconds) may overshoot it by the number of racing
//! replicas — an abuse cap, not an accounting one.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use super::DeviceStore;
use crate::cache::{IdentityView, PresenceCache};
use crate::error::Error;
use crate::record::DeviceKey;

/// New devices being admitted on this replica, by account, until the cache shows them.
#[derive(Debug, Default)]
pub(super) struct AccountPlaces {
    pending: Mutex<HashMap<String, HashSet<DeviceKey>>>,
}

/// A place held for a new device of an account; given back when dropped.
#[derive(Debug)]
pub(super) struct AccountPlace {
    places: Arc<AccountPlaces>,
    key: DeviceKey,
}

impl AccountPlaces {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, HashSet<DeviceKey>>> {
        // Every statement leaves the map consistent: a panic elsewhere cannot corrupt it.
        self.pending.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl Drop for AccountPlace {
    fn drop(&mut self) {
        let mut pending = self.places.lock();
        if let Some(keys) = pending.get_mut(&self.key.account) {
            keys.remove(&self.key);
            if keys.is_empty() {
                pending.remove(&self.key.account);
            }
        }
    }
}

/// Whether admitting `key` adds a device to its account: it evicts nobody, and neither the
/// cache's `view` nor this replica's admissions in flight (which the cache may not show yet)
/// have it.
fn adds_device(
    pending: &HashMap<String, HashSet<DeviceKey>>,
    view: &IdentityView,
    key: &DeviceKey,
    evicts: bool,
) -> bool {
    !evicts
        && view.device(&key.device_id).is_none()
        && !pending
            .get(&key.account)
            .is_some_and(|keys| keys.contains(key))
}

impl DeviceStore {
    /// Refuses `key` early when its account is full and the device would add one (it is new
    /// and `evicts` nobody); holds no place.
    pub(super) fn check_account(
        &self,
        view: &IdentityView,
        key: &DeviceKey,
        evicts: bool,
    ) -> Result<(), Error> {
        let pending = self.inner.places.lock();
        if !adds_device(&pending, view, key, evicts) {
            return Ok(());
        }
        self.account_room(&pending, key)
    }

    /// Holds a place in the account for `key` when it adds a device (it is new and evicts
    /// nobody); `None` when it adds none.
    pub(super) fn reserve_account_place(
        &self,
        view: &IdentityView,
        key: &DeviceKey,
        evicts: bool,
    ) -> Result<Option<AccountPlace>, Error> {
        let mut pending = self.inner.places.lock();
        if !adds_device(&pending, view, key, evicts) {
            return Ok(None);
        }
        self.account_room(&pending, key)?;
        pending
            .entry(key.account.clone())
            .or_default()
            .insert(key.clone());
        Ok(Some(AccountPlace {
            places: self.inner.places.clone(),
            key: key.clone(),
        }))
    }

    /// Gives `place` back once the cache shows revision `revision` (and so the device), off
    /// the request path.
    pub(super) fn release_when_cached(&self, place: Option<AccountPlace>, revision: i64) {
        let Some(place) = place else {
            return;
        };
        let cache = self.cache().clone();
        tokio::spawn(async move {
            // Past the wait the cache is behind by seconds; the place goes back regardless.
            let _ = cache.caught_up(revision).await;
            drop(place);
        });
    }

    fn account_room(
        &self,
        pending: &HashMap<String, HashSet<DeviceKey>>,
        key: &DeviceKey,
    ) -> Result<(), Error> {
        let limit = self.inner.limit.max_per_account;
        let cache: &PresenceCache = self.cache();
        let present = cache.account_device_count(&key.account);
        let pending = pending.get(&key.account);
        // Every pending admission counted is an upper bound; only near the cap is it worth
        // asking the cache which of them it already shows (a scan per admission would make
        // a reconnect storm of a big account quadratic).
        let at_most = pending.map_or(0, HashSet::len);
        if present + at_most < limit {
            return Ok(());
        }
        let admitting = pending.map_or(0, |keys| {
            keys.iter().filter(|k| cache.device(k).is_none()).count()
        });
        if present + admitting >= limit {
            return Err(Error::AccountDeviceLimit {
                account: key.account.clone(),
                limit,
            });
        }
        Ok(())
    }
}

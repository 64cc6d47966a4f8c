//! TTL registrations: each under a lease of its own, kept alive by Heartbeat from any
//! replica (a keep-alive is leader memory, not a raft write).

use std::collections::BTreeMap;

use etcd_client::{Compare, CompareOp, Txn, TxnOp};
use plumbing::etcd::{CALL_DEADLINE, EtcdError};

use super::{ATTEMPTS, Admission, DeviceStore, Written, held_by_stream, not_found, note};
use crate::error::Error;
use crate::record::{
    DeviceKey, DeviceRecord, DeviceStatus, Kind, LeaveReason, StoredDevice, now_ms,
};

impl DeviceStore {
    /// Registers a device by TTL under a lease of its own (so that any replica can keep it
    /// alive and it lapses alone).
    pub async fn register(
        &self,
        key: DeviceKey,
        status: DeviceStatus,
        attributes: BTreeMap<String, String>,
        contact: String,
        ttl: u32,
    ) -> Result<Written, Error> {
        let view = self.cache().identity_view(&key.account, &key.identity);
        // Refuse early (no lease granted) when the cache already says no.
        let evicts = !self.victims(&view, &key, Kind::Registration)?.is_empty();
        self.check_account(&view, &key, evicts)?;
        let lease = self.grant(ttl).await?;
        let now = now_ms();
        let record = DeviceRecord {
            status,
            attributes,
            contact,
            kind: Kind::Registration,
            replica: String::new(),
            session: String::new(),
            lease,
            ttl_seconds: ttl,
            register_time_ms: now,
            expire_time_ms: Some(now + i64::from(ttl) * 1000),
        };
        match self.admit(Admission { key, record }, view).await {
            Ok((written, replaced)) => {
                if let Some(old) = replaced {
                    self.revoke_later(old.record.lease);
                }
                Ok(written)
            }
            Err(err) => {
                self.revoke_later(lease);
                Err(err)
            }
        }
    }

    /// Keeps a registration alive (a lease keep-alive: no raft write); its new expiry, Unix ms.
    pub async fn heartbeat(&self, key: &DeviceKey) -> Result<i64, Error> {
        let device = self.find(key, false).await?;
        if device.record.kind == Kind::Stream {
            return Err(held_by_stream(key, "a live session needs no heartbeat"));
        }
        self.keep_alive(&device).await
    }

    /// Removes a registration at once; the revision, or `None` if it was not present.
    pub async fn unregister(&self, key: &DeviceKey) -> Result<Option<i64>, Error> {
        let layout = &self.inner.layout;
        for attempt in 0..ATTEMPTS {
            let current = match self.find(key, attempt > 0).await {
                Ok(current) => current,
                Err(Error::DeviceNotFound { .. }) => return Ok(None),
                Err(err) => return Err(err),
            };
            if current.record.kind == Kind::Stream {
                return Err(held_by_stream(key, "close the stream instead"));
            }
            let device_key = layout.device(key);
            let committed = self
                .inner
                .notes
                .commit(
                    |note_lease| {
                        Txn::new()
                            .when([Compare::mod_revision(
                                device_key.clone(),
                                CompareOp::Equal,
                                current.mod_revision,
                            )])
                            .and_then([
                                note(layout, key, LeaveReason::Unregistered, note_lease),
                                TxnOp::delete(device_key.clone(), None),
                            ])
                    },
                    vec![device_key.clone(), layout.note(key)],
                )
                .await?;
            if committed.succeeded {
                self.revoke_later(current.record.lease);
                return Ok(Some(committed.revision));
            }
        }
        Err(Error::Contention {
            identity: key.identity.clone(),
        })
    }

    pub(super) async fn keep_alive(&self, device: &StoredDevice) -> Result<i64, Error> {
        let mut client = self.inner.session.client();
        let call = client.lease_keep_alive(device.record.lease);
        match tokio::time::timeout(CALL_DEADLINE, call).await {
            // One keep-alive was sent and answered with a positive TTL; dropping the keeper
            // closes the stream.
            Ok(Ok(_)) => Ok(now_ms() + i64::from(device.record.ttl_seconds) * 1000),
            // etcd-client's answer to `ttl <= 0`: the lease has expired or was revoked.
            Ok(Err(etcd_client::Error::LeaseKeepAliveError(_))) => Err(not_found(&device.key)),
            Ok(Err(err)) => Err(EtcdError::from(err).into()),
            Err(_) => Err(EtcdError::Unavailable(format!(
                "etcd did not answer a keep-alive within {CALL_DEADLINE:?}"
            ))
            .into()),
        }
    }

    async fn grant(&self, ttl: u32) -> Result<i64, Error> {
        // A repeated grant at worst leaves a spare lease that nobody keeps alive: it expires.
        let granted = self
            .inner
            .session
            .retry(CALL_DEADLINE, |mut client| async move {
                client.lease_grant(i64::from(ttl), None).await
            })
            .await?;
        Ok(granted.id())
    }

    /// Revokes a lease no record uses any more, off the request path; if that fails it
    /// simply expires.
    pub(super) fn revoke_later(&self, lease: i64) {
        let session = self.inner.session.clone();
        tokio::spawn(async move {
            let mut client = session.client();
            if let Err(err) = session.bounded(client.lease_revoke(lease)).await {
                tracing::debug!(lease, error = %err, "unused lease not revoked; it will expire");
            }
        });
    }
}

//! The retention lease: ended communication records are kept under one shared lease at a
//! time instead of one each (a lease grant per rotation period, not per record).

use std::time::Duration;

use plumbing::etcd::{CALL_DEADLINE, EtcdError, EtcdSession};
use tokio::time::Instant;

/// The shared lease ended records are kept under: granted on first need, used for a tenth
/// of the retention, then left to expire, so each record lives 90–100 % of the retention.
pub struct Retention {
    session: EtcdSession,
    ttl: i64,
    rotate: Duration,
    current: tokio::sync::Mutex<Option<(i64, Instant)>>,
}

impl Retention {
    /// Leases for a retention of `retention`.
    pub fn new(session: EtcdSession, retention: Duration) -> Self {
        let ttl = retention.as_secs().max(1) as i64;
        Self {
            session,
            ttl,
            rotate: (retention / 10).max(Duration::from_secs(1)),
            current: tokio::sync::Mutex::new(None),
        }
    }

    /// The lease for records ending now.
    pub async fn lease(&self) -> Result<i64, EtcdError> {
        let mut current = self.current.lock().await;
        if let Some((id, granted)) = *current
            && granted.elapsed() < self.rotate
        {
            return Ok(id);
        }
        let mut client = self.session.client();
        let granted = tokio::time::timeout(CALL_DEADLINE, client.lease_grant(self.ttl, None))
            .await
            .map_err(|_| EtcdError::Unavailable("lease grant timed out".into()))??;
        *current = Some((granted.id(), Instant::now()));
        Ok(granted.id())
    }

    /// Drops the current lease (etcd no longer knows it); the next call grants one.
    pub async fn forget(&self) {
        *self.current.lock().await = None;
    }
}

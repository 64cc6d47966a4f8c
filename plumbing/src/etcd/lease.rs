//! A lease kept alive on a ticker, whose loss is reported to its owner.
//!
//! Keep-alives are not raft writes (docs/CONTRACT.md §3), so one lease per process or session is
//! cheap to keep. The keeper sends one every TTL/3, each under a TTL/3 timeout; when etcd
//! answers `ttl <= 0` the lease is gone (expired or revoked elsewhere), and when no
//! keep-alive has succeeded for a whole TTL the lease must be assumed gone too. Either way
//! the [`Lease::lost`] token fires so the owner can stop using keys bound to it.
//!
//! Then the keeper grants a new lease (retrying until etcd answers) and publishes its id
//! on [`Lease::changes`]: a replica whose lease expired behind its back (a long pause, a
//! partition from etcd) can put its records back under the new one instead of stopping.

use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::{EtcdError, EtcdSession};

/// Why a lease was declared lost.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseLost {
    /// etcd said the lease does not exist any more (expired or revoked).
    Expired,
    /// No keep-alive succeeded for a full TTL; etcd has certainly expired it by now.
    Unreachable,
}

/// A granted lease and the task keeping it alive.
#[derive(Debug)]
pub struct Lease {
    id: tokio::sync::watch::Receiver<i64>,
    ttl: i64,
    lost: CancellationToken,
    reason: std::sync::Arc<std::sync::OnceLock<LeaseLost>>,
    stop: CancellationToken,
    keeper: JoinHandle<()>,
    session: EtcdSession,
}

impl Lease {
    /// Grants a lease of `ttl` seconds and starts keeping it alive.
    pub async fn grant(session: &EtcdSession, ttl: i64) -> Result<Self, EtcdError> {
        let (first, ttl) = grant_one(session, ttl).await?;
        let (id_tx, id) = tokio::sync::watch::channel(first);
        let lost = CancellationToken::new();
        let stop = CancellationToken::new();
        let reason = std::sync::Arc::new(std::sync::OnceLock::new());
        let keeper = tokio::spawn(keep_alive(
            session.clone(),
            id_tx,
            ttl,
            lost.clone(),
            reason.clone(),
            stop.clone(),
        ));
        Ok(Self {
            id,
            ttl,
            lost,
            reason,
            stop,
            keeper,
            session: session.clone(),
        })
    }

    /// The etcd lease id in force now, to attach keys with `PutOptions::with_lease` (it
    /// changes once the lease was lost and a new one granted).
    pub fn id(&self) -> i64 {
        *self.id.borrow()
    }

    /// The lease id in force, changing each time a lost lease is replaced.
    pub fn changes(&self) -> tokio::sync::watch::Receiver<i64> {
        self.id.clone()
    }

    /// The TTL etcd granted, in seconds.
    pub fn ttl(&self) -> i64 {
        self.ttl
    }

    /// Fires when the first lease is gone; every key attached to it is gone too. (The
    /// keeper goes on with a new lease: see [`Lease::changes`].)
    pub fn lost(&self) -> CancellationToken {
        self.lost.clone()
    }

    /// Why the lease was lost, once it has been.
    pub fn lost_reason(&self) -> Option<LeaseLost> {
        self.reason.get().copied()
    }

    /// Stops the keeper and revokes the lease, deleting every key attached to it at once.
    pub async fn revoke(mut self) -> Result<(), EtcdError> {
        self.stop.cancel();
        let _ = (&mut self.keeper).await;
        let id = self.id();
        let mut client = self.session.client();
        self.session
            .bounded(client.lease_revoke(id))
            .await
            .map(|_| ())
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        // Without an explicit revoke the lease simply expires after its TTL.
        self.stop.cancel();
    }
}

async fn keep_alive(
    session: EtcdSession,
    ids: tokio::sync::watch::Sender<i64>,
    ttl: i64,
    lost: CancellationToken,
    reason: std::sync::Arc<std::sync::OnceLock<LeaseLost>>,
    stop: CancellationToken,
) {
    let mut id = *ids.borrow();
    loop {
        let why = tokio::select! {
            _ = stop.cancelled() => return,
            why = keep_one(&session, id, ttl) => why,
        };
        declare_lost(id, &lost, &reason, why);
        // Replace it: the owner puts its records back under the new lease.
        id = tokio::select! {
            _ = stop.cancelled() => return,
            id = grant_again(&session, ttl) => id,
        };
        tracing::warn!(lease = id, "a new etcd lease replaces the lost one");
        ids.send_replace(id);
    }
}

/// Grants a lease of `ttl` seconds; answers its id and the TTL etcd granted. A repeated
/// grant at worst leaves a spare lease that nobody keeps alive: it expires.
async fn grant_one(session: &EtcdSession, ttl: i64) -> Result<(i64, i64), EtcdError> {
    let granted = session
        .retry(super::CALL_DEADLINE, |mut client| async move {
            client.lease_grant(ttl, None).await
        })
        .await?;
    Ok((granted.id(), granted.ttl()))
}

/// Grants a lease of `ttl`, retrying until etcd grants one.
async fn grant_again(session: &EtcdSession, ttl: i64) -> i64 {
    loop {
        match grant_one(session, ttl).await {
            Ok((id, _)) => return id,
            Err(err) => {
                tracing::warn!(error = %err, "cannot grant a new etcd lease yet; retrying");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
}

/// Keeps lease `id` alive until it is lost; answers why.
async fn keep_one(session: &EtcdSession, id: i64, ttl: i64) -> LeaseLost {
    let period = Duration::from_millis((ttl.max(1) as u64 * 1000 / 3).max(200));
    let mut deadline = Instant::now() + Duration::from_secs(ttl.max(1) as u64);
    let mut client = session.client().lease_client();
    let mut stream = None;
    let mut ticker = tokio::time::interval(period);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let attempt = tokio::time::timeout(period, async {
            if stream.is_none() {
                // A new stream goes to the member preferred now, not the one that failed.
                client = session.client().lease_client();
                stream = Some(client.keep_alive(id).await?);
                // `keep_alive` already sent one request and checked its answer.
                return Ok::<i64, etcd_client::Error>(ttl);
            }
            let (keeper, responses) = stream
                .as_mut()
                .ok_or(etcd_client::Error::LeaseKeepAliveError("no stream".into()))?;
            keeper.keep_alive().await?;
            match responses.message().await? {
                Some(answer) => Ok(answer.ttl()),
                None => Err(etcd_client::Error::LeaseKeepAliveError(
                    "keep-alive stream closed".into(),
                )),
            }
        })
        .await;
        match attempt {
            Ok(Ok(remaining)) if remaining > 0 => {
                deadline = Instant::now() + Duration::from_secs(remaining as u64);
            }
            Ok(Ok(_)) => return LeaseLost::Expired,
            Ok(Err(err)) if super::is_lease_not_found(&err) => return LeaseLost::Expired,
            Ok(Err(err)) => {
                tracing::warn!(lease = id, error = %err, "lease keep-alive failed; retrying");
                stream = None;
                if super::is_refused_login(&err) {
                    // The auth token expired (or etcd restarted and forgot it): the next
                    // stream must carry a fresh one.
                    session.refresh_login().await;
                }
            }
            Err(_) => {
                tracing::warn!(lease = id, "lease keep-alive timed out; retrying");
                stream = None;
            }
        }
        if Instant::now() >= deadline {
            return LeaseLost::Unreachable;
        }
    }
}

fn declare_lost(
    id: i64,
    lost: &CancellationToken,
    reason: &std::sync::OnceLock<LeaseLost>,
    why: LeaseLost,
) {
    tracing::error!(lease = id, reason = ?why, "etcd lease lost");
    // The first loss is the one `lost` and `lost_reason` report.
    let _ = reason.set(why);
    lost.cancel();
}

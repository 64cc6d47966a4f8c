//! Keeping the shard map of a [`LimiterClient`] current.

use std::sync::{Arc, PoisonError, Weak};

use proto::limiter::v1 as pb;
use tokio::sync::Notify;
use tonic::Code;

use super::{FETCH_DEADLINE, LimiterClient, REFRESH_AT_MOST, REFRESH_EVERY, ShardMap, Shared};

/// Fetches the map now, then every [`REFRESH_EVERY`] or when woken, never more often than
/// [`REFRESH_AT_MOST`]; ends when the last client is dropped.
pub(super) async fn run(shared: Weak<Shared>, stale: Arc<Notify>) {
    loop {
        let Some(shared) = shared.upgrade() else {
            return;
        };
        LimiterClient { shared }.fetch_map().await;
        tokio::time::sleep(REFRESH_AT_MOST).await;
        let _ = tokio::time::timeout(REFRESH_EVERY - REFRESH_AT_MOST, stale.notified()).await;
    }
}

impl LimiterClient {
    /// One `GetShardMap` through a seed (the next one when a seed cannot be reached);
    /// keeps the old map when it fails, forgets it when the limiter has none
    /// (UNIMPLEMENTED: every call then goes to a seed).
    async fn fetch_map(&self) {
        let fetch = self.call_seed(pb::GetShardMapRequest {}, |mut seed, request| async move {
            seed.get_shard_map(request).await
        });
        let answer = tokio::time::timeout(FETCH_DEADLINE, fetch).await;
        let map = match answer {
            Ok(Ok(answer)) => ShardMap::from_response(&answer).map(Arc::new),
            Ok(Err(status)) if status.code() == Code::Unimplemented => None,
            Ok(Err(status)) => {
                tracing::debug!(code = ?status.code(), "limiter client: could not fetch the shard map");
                return;
            }
            Err(_) => {
                tracing::debug!("limiter client: the shard map did not come in time");
                return;
            }
        };
        if let Some(map) = &map {
            let live: Vec<_> = map.addresses().cloned().collect();
            self.shared
                .owners
                .retain(|address| live.iter().any(|live| &**live == address));
        }
        *self
            .shared
            .map
            .write()
            .unwrap_or_else(PoisonError::into_inner) = map;
    }
}

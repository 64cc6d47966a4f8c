//! Health-aware choice of the etcd member a request goes to.
//!
//! etcd-client balances requests over all endpoints of one channel and keeps sending a
//! share of them to a member that is down: with one of three members stopped, about 45 %
//! of writes failed with "tcp connect error" for as long as it stayed down. Here every
//! endpoint also gets a client of its own, and a prober asks each member for its status
//! every [`PROBE_EVERY`] (each probe under [`PROBE_DEADLINE`]). [`Members::pick`] answers
//! the client of the member to use: the leader when it answers (a write sent there needs
//! no forwarding hop), else any member that answers, else the balanced client as before.
//! A member that refuses connections or times out is skipped until it answers again; a
//! stopped member (SIGSTOP) is noticed by its probe timing out.
//!
//! The prober holds only a weak reference: it ends when the last session clone is gone.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock, Weak};
use std::time::Duration;

use etcd_client::{Client, ConnectOptions};

use super::RoundTrips;

/// How often each member is probed.
pub const PROBE_EVERY: Duration = Duration::from_millis(300);
/// How long a probe may take before its member counts as down.
pub const PROBE_DEADLINE: Duration = Duration::from_millis(600);
/// Written into `preferred` when no member answered its last probe.
const NONE: usize = usize::MAX;

/// One endpoint's own client (absent until connecting succeeded: with a login, connecting
/// needs the member up).
struct Member {
    endpoint: String,
    client: RwLock<Option<Client>>,
}

/// Per-endpoint clients and the member requests go to now.
pub(crate) struct Members {
    members: Vec<Member>,
    options: ConnectOptions,
    preferred: AtomicUsize,
    /// Where the members' clients (and their probes) count their requests.
    round_trips: RoundTrips,
}

impl std::fmt::Debug for Members {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let endpoints: Vec<&str> = self.members.iter().map(|m| m.endpoint.as_str()).collect();
        f.debug_struct("Members")
            .field("endpoints", &endpoints)
            .field("preferred", &self.preferred.load(Ordering::Relaxed))
            .finish()
    }
}

/// What one probe learnt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Probe {
    Down,
    Follower,
    Leader,
}

impl Members {
    /// Members for `endpoints` (none for a single endpoint: there is nothing to choose),
    /// with a prober started for them; their requests count in `round_trips`.
    pub(crate) fn start(
        endpoints: &[String],
        options: ConnectOptions,
        round_trips: RoundTrips,
    ) -> Option<Arc<Self>> {
        if endpoints.len() < 2 {
            return None;
        }
        let members = Arc::new(Self {
            members: endpoints
                .iter()
                .map(|endpoint| Member {
                    endpoint: endpoint.clone(),
                    client: RwLock::new(None),
                })
                .collect(),
            options,
            preferred: AtomicUsize::new(NONE),
            round_trips,
        });
        tokio::spawn(probe_forever(Arc::downgrade(&members)));
        Some(members)
    }

    /// The client of the member to use now, if one is known to answer.
    pub(crate) fn pick(&self) -> Option<Client> {
        let index = self.preferred.load(Ordering::Relaxed);
        let member = self.members.get(index)?;
        member.client.read().ok()?.clone()
    }

    async fn probe(&self, index: usize) -> Probe {
        let member = &self.members[index];
        let existing = member.client.read().ok().and_then(|c| c.clone());
        let mut client = match existing {
            Some(client) => client,
            None => {
                let connect = Client::connect_with_balanced_channel(
                    [member.endpoint.as_str()],
                    Some(self.options.clone()),
                    self.round_trips.clone(),
                );
                match tokio::time::timeout(PROBE_DEADLINE, connect).await {
                    Ok(Ok(client)) => {
                        if let Ok(mut slot) = member.client.write() {
                            *slot = Some(client.clone());
                        }
                        client
                    }
                    _ => return Probe::Down,
                }
            }
        };
        match tokio::time::timeout(PROBE_DEADLINE, client.status()).await {
            Ok(Ok(status)) => {
                let me = status.header().map_or(0, |h| h.member_id());
                if status.leader() != 0 && status.leader() == me {
                    Probe::Leader
                } else {
                    Probe::Follower
                }
            }
            _ => Probe::Down,
        }
    }

    /// Probes every member at once and moves `preferred` to the best one.
    async fn probe_all(&self) {
        let probes =
            futures::future::join_all((0..self.members.len()).map(|i| self.probe(i))).await;
        let best = choose(&probes);
        let before = self.preferred.swap(best, Ordering::Relaxed);
        if before != best {
            let endpoint = self.members.get(best).map(|m| m.endpoint.as_str());
            tracing::info!(endpoint = ?endpoint, probes = ?probes, "etcd requests go to another member");
        }
    }
}

/// The leader if it answered, else the first member that answered, else [`NONE`].
fn choose(probes: &[Probe]) -> usize {
    probes
        .iter()
        .position(|p| *p == Probe::Leader)
        .or_else(|| probes.iter().position(|p| *p == Probe::Follower))
        .unwrap_or(NONE)
}

async fn probe_forever(members: Weak<Members>) {
    let mut ticker = tokio::time::interval(PROBE_EVERY);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticker.tick().await;
        let Some(members) = members.upgrade() else {
            return;
        };
        members.probe_all().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_leader_is_preferred_then_any_member_that_answers() {
        use Probe::*;
        assert_eq!(choose(&[Follower, Leader, Down]), 1);
        assert_eq!(choose(&[Down, Follower, Follower]), 1);
        assert_eq!(choose(&[Down, Down, Down]), NONE);
        assert_eq!(choose(&[]), NONE);
    }
}

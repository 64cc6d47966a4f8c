//! The fault schedule: one fault every [`Plan::every`] from the start of the load, the
//! kinds of [`CYCLE`] in turn, each finished (member restarted or resumed, replica serving
//! again) before the next begins. No fault starts after the load's end.

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::fleet::Fleet;
use super::{Options, Result, progress};

/// When and for how long.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Time between the starts of two faults.
    pub every: Duration,
    /// How long a frozen member stays frozen.
    pub pause_for: Duration,
    /// How long a killed member or replica stays down.
    pub down_for: Duration,
}

impl Plan {
    /// The plan of a soak run.
    pub fn of(options: &Options) -> Self {
        Self {
            every: options.fault_every,
            pause_for: options.pause_for,
            down_for: options.down_for,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    /// SIGKILL the etcd leader, wait for the next election, restart it after `down_for`.
    KillLeader,
    /// SIGSTOP an etcd follower for `pause_for` (quorum intact, its clients must move on).
    PauseFollower,
    /// SIGKILL the second limiter replica, restart it after `down_for` (its shards move to
    /// the first and back; slots held through it must stay counted).
    KillLimiter,
    /// SIGSTOP the etcd leader for `pause_for` (an election behind a frozen leader, which
    /// then comes back as a follower).
    PauseLeader,
}

/// The kinds, in the order they are injected.
const CYCLE: [Fault; 4] = [
    Fault::KillLeader,
    Fault::PauseFollower,
    Fault::KillLimiter,
    Fault::PauseLeader,
];

/// One injected fault.
#[derive(Debug, Clone)]
pub struct Injected {
    /// When it began, since the start of the load.
    pub at: Duration,
    /// What was done and what followed.
    pub what: String,
    /// How long until the world was whole again.
    pub took: Duration,
}

/// Starts the schedule; the task ends after the last fault before `end` has finished.
pub fn start(
    fleet: Arc<Fleet>,
    plan: Plan,
    start: Instant,
    end: Instant,
) -> JoinHandle<Result<Vec<Injected>>> {
    tokio::spawn(async move {
        let mut injected = Vec::new();
        for (n, fault) in CYCLE.iter().cycle().enumerate() {
            let at = (start + plan.every * (n as u32 + 1)).max(Instant::now());
            if at >= end {
                break;
            }
            tokio::time::sleep_until(at).await;
            // The harness's cluster calls panic on failure: run each on its own task so
            // that a failed fault is an error of the soak, not a panic of the schedule.
            let fleet = fleet.clone();
            let what = tokio::spawn(async move { inject(&fleet, *fault, plan).await })
                .await
                .map_err(|err| format!("{fault:?}: {err}"))??;
            let fault = Injected {
                at: at - start,
                what,
                took: at.elapsed(),
            };
            progress(format_args!(
                "fault at {:.0} s: {} ({:.1} s)",
                fault.at.as_secs_f64(),
                fault.what,
                fault.took.as_secs_f64()
            ));
            injected.push(fault);
        }
        Ok(injected)
    })
}

async fn inject(fleet: &Fleet, fault: Fault, plan: Plan) -> Result<String> {
    match fault {
        Fault::KillLeader => Ok(kill_leader(fleet, plan).await),
        Fault::PauseFollower => Ok(pause(fleet, plan, false).await),
        Fault::KillLimiter => {
            fleet
                .kill_and_restart("limiter-svc", 1, plan.down_for)
                .await
        }
        Fault::PauseLeader => Ok(pause(fleet, plan, true).await),
    }
}

async fn kill_leader(fleet: &Fleet, plan: Plan) -> String {
    let mut cluster = fleet.cluster.lock().await;
    let leader = cluster.leader().await;
    let killed = Instant::now();
    cluster.kill(leader).await;
    let next = cluster.leader().await;
    let elected = killed.elapsed();
    tokio::time::sleep(plan.down_for).await;
    cluster.restart(leader).await;
    format!(
        "etcd leader m{leader} SIGKILLed, m{next} elected {:.1} s later, m{leader} restarted \
         after {:?}",
        elected.as_secs_f64(),
        plan.down_for
    )
}

/// Freezes the leader (`leader`) or a follower for `pause_for`, then lets it run again.
async fn pause(fleet: &Fleet, plan: Plan, leader: bool) -> String {
    let mut cluster = fleet.cluster.lock().await;
    let current = cluster.leader().await;
    let (member, role) = if leader {
        (current, "leader")
    } else {
        ((current + 1) % 3, "follower")
    };
    cluster.pause(member).await;
    tokio::time::sleep(plan.pause_for).await;
    cluster.resume(member).await;
    let after = cluster.leader().await;
    format!(
        "etcd {role} m{member} SIGSTOPped for {:?}, leader afterwards m{after}",
        plan.pause_for
    )
}

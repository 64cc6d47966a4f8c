//! Fault suite: one etcd member of three down or frozen while the services are under load
//! (issue 13, items 1 and 5).
//!
//! - A follower killed for 10 s (quorum intact): fewer than 1 % of presence writes and of
//!   limiter Acquire+Release pairs fail — the services' etcd client skips the dead member
//!   instead of sending it a share of the requests.
//! - The leader frozen with SIGSTOP (a partition: its sockets accept and never answer):
//!   the others elect a new leader; no write or grant gap longer than 2 s after the
//!   election; after SIGCONT the frozen member's stale requests change nothing — slots
//!   held across it are counted exactly.

use std::time::{Duration, Instant};

use integration::{EtcdCluster, ServiceProcess, Tokens, poll_until, unique_prefix};
use proto::presence::v1 as pb;
use tonic::Code;

use crate::fault_support::{
    Load, LoadReport, assert_counted_exactly, device_token, hold, pairs_over_all_shards, presence,
    set_limit,
};

/// docs/CONTRACT.md §5 invariant 6: no key or identity more than 2 s without service.
const OUTAGE_AFTER_ELECTION: Duration = Duration::from_secs(2);
/// How long the member stays down or frozen.
const FAULT_FOR: Duration = Duration::from_secs(10);

/// One presence replica, two limiter replicas, on a 3-member cluster, with a key at its
/// limit of 3 (3 slots held) and write loads on both services.
struct World {
    cluster: EtcdCluster,
    replicas: Vec<ServiceProcess>,
    limiters: [std::net::SocketAddr; 2],
    registers: Load,
    pairs: Load,
}

impl World {
    async fn start() -> Self {
        let cluster = EtcdCluster::start(3).await;
        let endpoints = cluster.endpoints();
        let prefix = unique_prefix();
        let replicas = vec![
            ServiceProcess::start_on("presence-svc", &endpoints, &prefix, &[]).await,
            ServiceProcess::start_on("limiter-svc", &endpoints, &prefix, &[]).await,
            ServiceProcess::start_on("limiter-svc", &endpoints, &prefix, &[]).await,
        ];
        let presence_addr = replicas[0].addr;
        let limiters = [replicas[1].addr, replicas[2].addr];
        set_limit(limiters[0], "held", 3).await;
        hold(&limiters, "held", 3).await;
        let registers = Load::start(
            "Register",
            2,
            Duration::from_millis(20),
            move |worker, _| async move {
                let request = pb::RegisterRequest {
                    device_id: format!("w{worker}"),
                    ttl_seconds: 30,
                    ..Default::default()
                };
                presence(presence_addr)
                    .register(Tokens::request(&device_token("writer"), request))
                    .await?;
                Ok(())
            },
        );
        let pairs = pairs_over_all_shards(limiters.to_vec());
        let world = Self {
            cluster,
            replicas,
            limiters,
            registers,
            pairs,
        };
        world.more_successes(20).await;
        world
    }

    /// Waits until both loads have `more` successful calls beyond what they have now.
    async fn more_successes(&self, more: usize) {
        let targets = (
            self.registers.successes() + more,
            self.pairs.successes() + more,
        );
        poll_until("more successful calls", Duration::from_secs(15), || async {
            (self.registers.successes() >= targets.0 && self.pairs.successes() >= targets.1)
                .then_some(())
        })
        .await;
    }

    /// Stops the loads; checks that no replica exited and that the key held throughout is
    /// still counted exactly (3 of 3) on both limiter replicas.
    async fn finish(mut self) -> (LoadReport, LoadReport) {
        let registers = self.registers.stop().await;
        let pairs = self.pairs.stop().await;
        println!("{}", registers.summary());
        println!("{}", pairs.summary());
        for replica in &mut self.replicas {
            assert!(
                replica.exited().is_none(),
                "a replica exited during the fault"
            );
        }
        assert_counted_exactly(&self.limiters, "held", 3).await;
        (registers, pairs)
    }
}

/// The share of `report`'s calls that failed, and a line saying so.
fn failed_share(report: &LoadReport) -> f64 {
    let failed = report.calls.iter().filter(|c| c.code != Code::Ok).count();
    let share = failed as f64 / report.calls.len().max(1) as f64;
    println!(
        "{}: {failed} of {} calls failed ({:.2} %)",
        report.name,
        report.calls.len(),
        share * 100.0
    );
    share
}

/// A follower killed for 10 s: fewer than 1 % of writes and pairs fail, and nothing held
/// is miscounted.
#[tokio::test]
async fn one_member_down_for_ten_seconds_fails_under_one_percent_of_calls() {
    let mut world = World::start().await;
    let leader = world.cluster.leader().await;
    let follower = (leader + 1) % 3;
    world.cluster.kill(follower).await;
    let killed_at = Instant::now();
    println!("follower m{follower} killed");
    while killed_at.elapsed() < FAULT_FOR {
        world.more_successes(1).await;
    }
    world.cluster.restart(follower).await;
    world.more_successes(20).await;
    let (registers, pairs) = world.finish().await;
    for report in [&registers, &pairs] {
        assert!(
            failed_share(report) < 0.01,
            "{} failed too often with a member down: {:?}",
            report.name,
            report.codes()
        );
    }
}

/// The leader frozen by SIGSTOP for 10 s: the outage after the others elect a new leader
/// is under 2 s for writes and grants, and after SIGCONT its stale requests change
/// nothing that is counted.
#[tokio::test]
async fn a_frozen_leader_costs_at_most_two_seconds_after_the_election() {
    let mut world = World::start().await;
    let leader = world.cluster.leader().await;
    let frozen_at = Instant::now();
    world.cluster.pause(leader).await;
    let next = world.cluster.leader().await;
    let elected_at = Instant::now();
    assert_ne!(next, leader, "no new leader was elected");
    println!(
        "leader m{leader} frozen; m{next} elected after {:?}",
        frozen_at.elapsed()
    );
    while frozen_at.elapsed() < FAULT_FOR {
        world.more_successes(1).await;
    }
    world.cluster.resume(leader).await;
    world.more_successes(20).await;
    let (registers, pairs) = world.finish().await;
    for report in [&registers, &pairs] {
        let after = report.outage_after(elected_at);
        println!(
            "{}: longest outage {:?}, {after:?} of it after the election",
            report.name,
            report.longest_outage()
        );
        assert!(
            after < OUTAGE_AFTER_ELECTION,
            "{} were unavailable for {after:?} after the election",
            report.name
        );
    }
}

//! A throughput probe of the router's hot path (route → offer → automatic answer → hangup),
//! in process. Ignored by default: run it with
//! `cargo test --release -p integration -- --ignored router_throughput --nocapture`.
//! The benchmark proper (`scripts/bench router`) runs the release binaries.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crate::router_support::{World, auto_answering_device};

const AGENTS: usize = 8;
const MEASURE: Duration = Duration::from_secs(10);

#[tokio::test(flavor = "multi_thread")]
#[ignore = "a measurement, not a check; run explicitly"]
async fn router_throughput() {
    let world = World::start(0).await;
    for agent in 0..AGENTS {
        world
            .inline(
                &format!("line{agent}"),
                &format!("<Response><Dial><Client>agent{agent}</Client></Dial></Response>"),
            )
            .await;
        auto_answering_device(&world, &format!("agent{agent}")).await;
    }
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let concurrency: usize = std::env::var("ROUTER_PROBE_CALLERS")
        .ok()
        .and_then(|c| c.parse().ok())
        .unwrap_or(32);
    let mut callers = Vec::new();
    for caller in 0..concurrency {
        let (router, done, failed) = (world.router(), done.clone(), failed.clone());
        callers.push(tokio::spawn(async move {
            let mut n = 0u64;
            while started.elapsed() < MEASURE {
                n += 1;
                let id = format!("CM-{caller}-{n}");
                let to = format!("line{}", (caller + n as usize) % AGENTS);
                let ok = match router.route(&to, &id).await {
                    Ok(comm)
                        if comm.state
                            == proto::router::v1::CommunicationState::Connected as i32 =>
                    {
                        router.hangup(&id).await.is_ok()
                    }
                    Ok(comm) => {
                        if failed.load(Ordering::Relaxed) < 3 {
                            eprintln!("not connected: {}", crate::router_support::story(&comm));
                        }
                        false
                    }
                    Err(status) => {
                        if failed.load(Ordering::Relaxed) < 3 {
                            eprintln!("route failed: {status:?}");
                        }
                        false
                    }
                };
                let counter = if ok { &done } else { &failed };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for caller in callers {
        caller.await.unwrap();
    }
    let elapsed = started.elapsed().as_secs_f64();
    let (done, failed) = (done.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    println!(
        "router_comms_per_s {:.0} ({done} in {elapsed:.1}s, {failed} failed, {concurrency} callers)",
        done as f64 / elapsed
    );
    assert!(done > 0);
}

//! The soak (issue 13, item 6) in CI: `integration::soak` for 40 s against the debug
//! binaries — Connect sessions churning, registrations, Acquire/Release with crashing
//! callers, communications routed end to end — through one fault of each kind (etcd leader
//! killed, a follower and the leader frozen, a limiter replica killed). `scripts/soak
//! --minutes 10` is the long run, with the release binaries (docs/OPERATIONS.md, "Soak").

use std::time::Duration;

use integration::ServiceProcess;
use integration::soak::{self, Options};

/// RSS slope that passes here, MiB per minute: debug binaries measured over 25 s, where
/// caches and pools are still filling; generous on purpose — it catches a leak per
/// operation (tens of operations a second), not a plateau. The 10-minute run's bound is
/// the soak binary's default.
const MAX_RSS_SLOPE: f64 = 30.0;

/// After 40 s of mixed load through four etcd and replica faults, and once every caller
/// has released or its hold has passed: the limiter counts no slot (nor do the callers),
/// no communication is still running, no key that should have gone is left under the
/// prefix once the services have stopped,
/// the resuming watcher saw every acknowledged presence change, no service crashed, and
/// no service's memory grows faster than [`MAX_RSS_SLOPE`] after the warm-up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_soak_through_etcd_faults_leaks_no_slot_key_or_watch_event() {
    let binaries = ServiceProcess::binary("presence-svc")
        .parent()
        .unwrap()
        .to_path_buf();
    let mut options = Options::scaled(Duration::from_secs(40), binaries);
    options.warmup = Duration::from_secs(15);
    options.max_rss_slope = MAX_RSS_SLOPE;
    options.command = "cargo test -p integration --test suite soak".to_owned();

    let report = soak::run(&options).await.unwrap();
    println!("{report}");

    assert!(
        report.figure("faults").unwrap() >= 4.0,
        "one fault of each kind"
    );
    assert_eq!(report.figure("slots_leaked"), Some(0.0), "slots leaked");
    assert_eq!(report.figure("slots_outstanding"), Some(0.0));
    assert!(
        report.figure("slots_crashed").unwrap() > 0.0,
        "no caller crashed"
    );
    assert_eq!(
        report.figure("comms_running_after_load"),
        Some(0.0),
        "communications still running after the load"
    );
    assert_eq!(report.figure("keys_leaked"), Some(0.0), "keys left over");
    assert!(report.figure("watch_acknowledged").unwrap() > 0.0);
    assert_eq!(report.figure("watch_lost"), Some(0.0), "watch events lost");
    assert!(
        report.figure("watch_streams").unwrap() > 1.0,
        "the watcher never resumed"
    );
    assert!(report.passed(), "failed checks: {:#?}", report.failures());
}

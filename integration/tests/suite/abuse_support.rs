//! Helpers of the abuse-limit tests: servers with chosen limits, and a flood of concurrent
//! callers that counts how each call ended.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use integration::{Etcd, InProcess, common_args, poll_until, serve_in_process};
use plumbing::limits::ConnectionLimits;
use plumbing::server::ServeError;
use presence_svc::PresenceArgs;
use tokio::task::JoinHandle;
use tonic::Code;

/// presence-svc in-process with these connection limits and presence flags.
pub async fn presence(
    etcd: &Etcd,
    prefix: &str,
    limits: ConnectionLimits,
    presence: PresenceArgs,
) -> InProcess<ServeError> {
    let mut common = common_args(etcd, prefix);
    common.limits = limits;
    let args = presence_svc::ServeArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        common,
    };
    serve_in_process(move |listener, stop| {
        presence_svc::run_with(args, presence, listener, async move {
            let _ = stop.await;
        })
    })
    .await
}

/// limiter-svc in-process with `--default-limit` and `--max-inflight-per-account`.
pub async fn limiter(
    etcd: &Etcd,
    prefix: &str,
    default_limit: u32,
    max_inflight_per_account: u32,
) -> InProcess<ServeError> {
    let args = limiter_svc::ServeArgs {
        listen: "127.0.0.1:0".parse().unwrap(),
        default_limit,
        common: common_args(etcd, prefix),
    };
    let limiter = limiter_svc::LimiterArgs {
        max_inflight_per_account,
        ..Default::default()
    };
    serve_in_process(move |listener, stop| {
        limiter_svc::run_with(args, limiter, listener, async move {
            let _ = stop.await;
        })
    })
    .await
}

/// router-svc in-process (no presence, no limiter) with these limits and router flags.
pub async fn router(
    etcd: &Etcd,
    prefix: &str,
    limits: ConnectionLimits,
    router: router_svc::RouterArgs,
) -> InProcess<ServeError> {
    let mut args = crate::support::router_args(etcd, prefix, "127.0.0.1:1".into(), None, true);
    args.common.limits = limits;
    crate::support::router_serving(args, router).await
}

/// How the calls of a flood ended.
#[derive(Debug, Default)]
pub struct Tally {
    /// Calls answered OK.
    pub ok: AtomicU64,
    /// Calls refused with RESOURCE_EXHAUSTED.
    pub exhausted: AtomicU64,
    /// Calls that ended otherwise.
    pub other: AtomicU64,
    /// The first refusal, to look at its details.
    pub first_refusal: Mutex<Option<tonic::Status>>,
}

/// `callers` tasks calling in a loop until stopped.
pub struct Flood {
    /// How the calls ended so far.
    pub tally: Arc<Tally>,
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
}

impl Flood {
    /// Starts `callers` tasks, each repeating `call` (given its caller index).
    pub fn start<F, Fut>(callers: usize, call: F) -> Self
    where
        F: Fn(usize) -> Fut + Clone + Send + 'static,
        Fut: Future<Output = Result<(), tonic::Status>> + Send,
    {
        let tally = Arc::new(Tally::default());
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..callers)
            .map(|index| {
                let (tally, stop, call) = (tally.clone(), stop.clone(), call.clone());
                tokio::spawn(async move {
                    while !stop.load(Ordering::Relaxed) {
                        let counter = match call(index).await {
                            Ok(()) => &tally.ok,
                            Err(status) if status.code() == Code::ResourceExhausted => {
                                tally.first_refusal.lock().unwrap().get_or_insert(status);
                                &tally.exhausted
                            }
                            Err(_) => &tally.other,
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                })
            })
            .collect();
        Self { tally, stop, tasks }
    }

    /// Waits until the flood has been refused at least once.
    pub async fn until_refused(&self) {
        poll_until(
            "the flooding account to be refused",
            Duration::from_secs(20),
            || async { (self.tally.exhausted.load(Ordering::Relaxed) > 0).then_some(()) },
        )
        .await;
    }

    /// Stops every caller and waits for them.
    pub async fn stop(self) -> Arc<Tally> {
        self.stop.store(true, Ordering::Relaxed);
        for task in self.tasks {
            task.await.unwrap();
        }
        self.tally
    }
}

/// Runs `call` `times` times one after the other, asserting each succeeds; the slowest.
pub async fn steady<F, Fut>(times: usize, mut call: F) -> Duration
where
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = Result<(), tonic::Status>>,
{
    let mut slowest = Duration::ZERO;
    for index in 0..times {
        let started = Instant::now();
        if let Err(status) = call(index).await {
            panic!("the steady account's call {index} failed: {status:?}");
        }
        slowest = slowest.max(started.elapsed());
    }
    slowest
}

/// Makes `calls` calls with `callers` tasks at once; resolves to how many ended with each
/// code (`Code::Ok` for successes).
pub fn burst<F, Fut>(callers: usize, calls: usize, call: F) -> JoinHandle<HashMap<Code, u64>>
where
    F: Fn() -> Fut + Clone + Send + 'static,
    Fut: Future<Output = Result<(), tonic::Status>> + Send,
{
    let next = Arc::new(AtomicUsize::new(0));
    let tasks: Vec<_> = (0..callers)
        .map(|_| {
            let (next, call) = (next.clone(), call.clone());
            tokio::spawn(async move {
                let mut codes = HashMap::<Code, u64>::new();
                while next.fetch_add(1, Ordering::Relaxed) < calls {
                    let code = call().await.err().map_or(Code::Ok, |status| status.code());
                    *codes.entry(code).or_default() += 1;
                }
                codes
            })
        })
        .collect();
    tokio::spawn(async move {
        let mut codes = HashMap::new();
        for task in tasks {
            for (code, count) in task.await.unwrap() {
                *codes.entry(code).or_default() += count;
            }
        }
        codes
    })
}

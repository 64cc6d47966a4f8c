//! Helpers of the fault tests (`fault_*`): tokens of one account signed with the platform key
//! (so no account key has to reach a replica's key mirror first), clients of service
//! processes, a load generator that logs the outcome and time of every call, and a presence
//! watcher that records every event it is sent.
//!
//! Bounds in the fault tests are measured on these logs: "the longest time without a
//! successful call" is the unavailability a caller saw, whatever the cause.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use integration::{PLATFORM_KEY_ID, PLATFORM_SECRET, Tokens, poll_until};
use plumbing::auth::Scope;
use proto::limiter::v1 as lpb;
use proto::limiter::v1::limiter_service_client::LimiterServiceClient;
use proto::presence::v1 as pb;
use proto::presence::v1::connect_request::Kind as Say;
use proto::presence::v1::connect_response::Kind as Recv;
use proto::presence::v1::presence_service_client::PresenceServiceClient;
use proto::presence::v1::watch_presence_response::Event;
use proto::router::v1 as rpb;
use proto::router::v1::router_service_client::RouterServiceClient;
use tokio::task::JoinHandle;
use tonic::transport::Channel;
use tonic::{Code, Status};

/// The account every fault test acts for.
pub const ACCOUNT: &str = "AC1";

/// How long one call of a load worker may take before it counts as failed (with
/// DEADLINE_EXCEEDED): longer than the services' own 5 s etcd deadline, after which they
/// must have answered (docs/CONTRACT.md §4: UNAVAILABLE, "never a hang past the deadline").
pub const CALL_TIMEOUT: Duration = Duration::from_secs(6);

/// A device token of `identity` in [`ACCOUNT`], signed with the platform key.
pub fn device_token(identity: &str) -> String {
    Tokens::signed(
        PLATFORM_KEY_ID,
        PLATFORM_SECRET,
        ACCOUNT,
        Some(identity),
        &[Scope::PresenceRegister, Scope::PresenceRead],
        600,
    )
}

/// A `presence.read` token of [`ACCOUNT`].
pub fn reader_token() -> String {
    Tokens::platform(ACCOUNT, &[Scope::PresenceRead])
}

/// A platform token with every scope, for every account.
pub fn admin() -> String {
    Tokens::platform("*", &[Scope::Admin])
}

/// A lazy channel to a server (connects on first use, reconnects after failures).
pub fn channel(addr: SocketAddr) -> Channel {
    plumbing::client::channel(&addr.to_string()).unwrap()
}

/// A PresenceService client of a server.
pub fn presence(addr: SocketAddr) -> PresenceServiceClient<Channel> {
    PresenceServiceClient::new(channel(addr))
}

/// A LimiterService client of a server.
pub fn limiter(addr: SocketAddr) -> LimiterServiceClient<Channel> {
    LimiterServiceClient::new(channel(addr))
}

/// GetPresence of `identity` in [`ACCOUNT`] at `min_revision` or later.
pub async fn presence_at(
    addr: SocketAddr,
    identity: &str,
    min_revision: i64,
) -> Result<pb::IdentityPresence, Status> {
    let request = pb::GetPresenceRequest {
        identity: identity.into(),
        min_revision,
        ..Default::default()
    };
    let response = presence(addr)
        .get_presence(Tokens::request(&reader_token(), request))
        .await?;
    Ok(response.into_inner().presence.unwrap_or_default())
}

/// Acquire with the admin token.
pub fn acquire_request(resource: &str, hold: u32, wait_ms: u32) -> lpb::AcquireRequest {
    lpb::AcquireRequest {
        account_id: ACCOUNT.into(),
        resource: resource.into(),
        request_id: String::new(),
        hold_seconds: hold,
        wait_timeout_ms: wait_ms,
    }
}

/// Sets `max_in_flight` of ([`ACCOUNT`], `resource`).
pub async fn set_limit(addr: SocketAddr, resource: &str, max: u32) {
    let limit = lpb::Limit {
        account_id: ACCOUNT.into(),
        resource: resource.into(),
        max_in_flight: max,
        shadow: false,
    };
    limiter(addr)
        .set_limit(Tokens::request(
            &admin(),
            lpb::SetLimitRequest { limit: Some(limit) },
        ))
        .await
        .unwrap();
}

/// Usage of ([`ACCOUNT`], `resource`) as `addr` reports it.
pub async fn usage(addr: SocketAddr, resource: &str) -> Result<lpb::Usage, Status> {
    let request = lpb::GetUsageRequest {
        account_id: ACCOUNT.into(),
        resource: resource.into(),
    };
    let response = limiter(addr)
        .get_usage(Tokens::request(&admin(), request))
        .await?;
    Ok(response.into_inner().usage.unwrap_or_default())
}

/// Releases a slot through `addr`; whether it freed one.
pub async fn release(addr: SocketAddr, slot_id: &str) -> Result<bool, Status> {
    let request = lpb::ReleaseRequest {
        slot_id: slot_id.into(),
    };
    let response = limiter(addr)
        .release(Tokens::request(&admin(), request))
        .await?;
    Ok(response.into_inner().released)
}

/// One Acquire (hold 5 s) and its Release through `addr`; a rejection is an error.
pub async fn acquire_and_release(addr: SocketAddr, resource: &str) -> Result<(), Status> {
    let answer = limiter(addr)
        .acquire(Tokens::request(&admin(), acquire_request(resource, 5, 0)))
        .await?
        .into_inner();
    if answer.decision != lpb::Decision::Granted as i32 {
        return Err(Status::resource_exhausted("rejected"));
    }
    release(addr, &answer.slot_id).await?;
    Ok(())
}

/// Four workers making Acquire+Release pairs on keys over all 48 shards, each pair
/// through the next of `addrs` in turn.
pub fn pairs_over_all_shards(addrs: Vec<SocketAddr>) -> Load {
    let resources = Arc::new(resources_over_all_shards("load"));
    Load::start(
        "Acquire+Release",
        4,
        Duration::from_millis(10),
        move |worker, i| {
            let resource = resources[(worker * 17 + i as usize) % resources.len()].clone();
            let addr = addrs[(worker + i as usize) % addrs.len()];
            async move { acquire_and_release(addr, &resource).await }
        },
    )
}

/// Takes `n` slots of `resource` (held 120 s), alternating over `addrs`, waiting for
/// each grant; answers their slot ids.
pub async fn hold(addrs: &[SocketAddr], resource: &str, n: usize) -> Vec<String> {
    let mut held = Vec::new();
    for i in 0..n {
        let answer = poll_until("a grant", Duration::from_secs(10), || async {
            let answer = limiter(addrs[i % addrs.len()])
                .acquire(Tokens::request(&admin(), acquire_request(resource, 120, 0)))
                .await
                .ok()?
                .into_inner();
            (answer.decision == lpb::Decision::Granted as i32).then_some(answer)
        })
        .await;
        held.push(answer.slot_id);
    }
    held
}

/// Asserts that every replica of `addrs` rejects `resource` with `in_flight` = limit =
/// `n`: the slots held across a fault are counted exactly.
pub async fn assert_counted_exactly(addrs: &[SocketAddr], resource: &str, n: u32) {
    for addr in addrs {
        let answer = limiter(*addr)
            .acquire(Tokens::request(&admin(), acquire_request(resource, 60, 0)))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            (answer.decision, answer.in_flight, answer.limit),
            (lpb::Decision::Rejected as i32, n, n),
            "the slots of `{resource}` held across the fault are not counted exactly on {addr}"
        );
    }
}

/// Resource names of account [`ACCOUNT`] that together fall into every one of the
/// limiter's shards, one name per shard, found with the documented shard hash.
pub fn resources_over_all_shards(stem: &str) -> Vec<String> {
    let shards = u64::from(limiter_svc::model::SHARDS);
    let mut per_shard: Vec<Option<String>> = vec![None; shards as usize];
    for i in 0.. {
        let name = format!("{stem}{i}");
        let shard = plumbing::limiter::key_hash(ACCOUNT, &name) % shards;
        per_shard[shard as usize].get_or_insert(name);
        if per_shard.iter().all(Option::is_some) {
            break;
        }
    }
    per_shard.into_iter().flatten().collect()
}

/// Polls etcd's shard ownership keys under `prefix` until two limiter replicas split the
/// shards evenly: every shard owned, half of them by the replica at `one_of_them`.
pub async fn await_even_split_of_two(
    etcd: &integration::Etcd,
    prefix: &str,
    one_of_them: SocketAddr,
) {
    let (shards, address) = (
        usize::from(limiter_svc::model::SHARDS),
        one_of_them.to_string(),
    );
    let shards_prefix = format!("{prefix}/limiter/shards/");
    poll_until(
        "an even split of the shards",
        Duration::from_secs(10),
        || async {
            let values = values_under(&mut etcd.client().await, &shards_prefix).await;
            let owned = values.iter().filter(|v| v.contains(&address)).count();
            (values.len() == shards && owned == shards / 2).then_some(())
        },
    )
    .await;
}

/// One call made by a load worker.
#[derive(Debug, Clone)]
pub struct Call {
    /// When it was sent.
    pub started: Instant,
    /// When its answer (or failure) came back.
    pub ended: Instant,
    /// `Code::Ok` or the status it failed with (`DeadlineExceeded` after [`CALL_TIMEOUT`]).
    pub code: Code,
    /// The failure's message (empty on success).
    pub message: String,
}

/// Workers calling a service in a loop until stopped, logging every call.
pub struct Load {
    name: String,
    stop: Arc<AtomicBool>,
    log: Arc<Mutex<Vec<Call>>>,
    workers: Vec<JoinHandle<()>>,
    started: Instant,
}

impl Load {
    /// Starts `workers` tasks, each calling `call(worker, iteration)` then pausing `pace`
    /// (a failure pauses 50 ms more, as a real client's retry would).
    pub fn start<F, Fut>(name: &str, workers: usize, pace: Duration, call: F) -> Self
    where
        F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), Status>> + Send + 'static,
    {
        let stop = Arc::new(AtomicBool::new(false));
        let log: Arc<Mutex<Vec<Call>>> = Arc::default();
        let call = Arc::new(call);
        let workers = (0..workers)
            .map(|worker| {
                let (stop, log, call) = (stop.clone(), log.clone(), call.clone());
                tokio::spawn(async move {
                    let mut iteration = 0;
                    while !stop.load(Ordering::Relaxed) {
                        let started = Instant::now();
                        let (code, message) =
                            match tokio::time::timeout(CALL_TIMEOUT, call(worker, iteration)).await
                            {
                                Ok(Ok(())) => (Code::Ok, String::new()),
                                Ok(Err(status)) => (status.code(), status.message().to_owned()),
                                Err(_) => (Code::DeadlineExceeded, "client deadline".to_owned()),
                            };
                        log.lock().unwrap().push(Call {
                            started,
                            ended: Instant::now(),
                            code,
                            message,
                        });
                        iteration += 1;
                        let pause = if code == Code::Ok {
                            pace
                        } else {
                            pace + Duration::from_millis(50)
                        };
                        tokio::time::sleep(pause).await;
                    }
                })
            })
            .collect();
        Self {
            name: name.to_owned(),
            stop,
            log,
            workers,
            started: Instant::now(),
        }
    }

    /// Successful calls so far.
    pub fn successes(&self) -> usize {
        self.log
            .lock()
            .unwrap()
            .iter()
            .filter(|c| c.code == Code::Ok)
            .count()
    }

    /// Waits until a call sent after `since` has succeeded; how long after `since` it ended.
    pub async fn first_success_after(&self, since: Instant, within: Duration) -> Duration {
        poll_until(
            &format!("a successful {} call", self.name),
            within,
            || async {
                self.log
                    .lock()
                    .unwrap()
                    .iter()
                    .filter(|c| c.code == Code::Ok && c.started >= since)
                    .map(|c| c.ended - since)
                    .min()
            },
        )
        .await
    }

    /// Stops the workers (each finishes its current call) and returns the log.
    pub async fn stop(self) -> LoadReport {
        self.stop.store(true, Ordering::Relaxed);
        for worker in self.workers {
            worker.await.unwrap();
        }
        let mut calls = self.log.lock().unwrap().clone();
        calls.sort_by_key(|c| c.ended);
        LoadReport {
            name: self.name,
            calls,
            started: self.started,
            stopped: Instant::now(),
        }
    }
}

/// The log of a [`Load`] run.
#[derive(Debug)]
pub struct LoadReport {
    /// What was called.
    pub name: String,
    /// Every call, by the time it ended.
    pub calls: Vec<Call>,
    started: Instant,
    stopped: Instant,
}

impl LoadReport {
    /// The longest time without a successful call: between two successes, or from the
    /// start or to the end of the run.
    pub fn longest_outage(&self) -> Duration {
        let mut last = self.started;
        let mut longest = Duration::ZERO;
        for call in self.calls.iter().filter(|c| c.code == Code::Ok) {
            longest = longest.max(call.ended.saturating_duration_since(last));
            last = call.ended;
        }
        longest.max(self.stopped.saturating_duration_since(last))
    }

    /// The longest time after `since` without a successful call: of each gap between
    /// successes (and the one at the end), only the part after `since` counts.
    pub fn outage_after(&self, since: Instant) -> Duration {
        let mut last = self.started;
        let mut longest = Duration::ZERO;
        let mut gap_to = |end: Instant, last: Instant| {
            longest = longest.max(end.saturating_duration_since(last.max(since)));
        };
        for call in self.calls.iter().filter(|c| c.code == Code::Ok) {
            gap_to(call.ended, last);
            last = call.ended;
        }
        gap_to(self.stopped, last);
        longest
    }

    /// The slowest successful call.
    pub fn slowest_success(&self) -> Duration {
        self.calls
            .iter()
            .filter(|c| c.code == Code::Ok)
            .map(|c| c.ended - c.started)
            .max()
            .unwrap_or_default()
    }

    /// How many calls ended with each code.
    pub fn codes(&self) -> BTreeMap<String, usize> {
        let mut codes = BTreeMap::new();
        for call in &self.calls {
            *codes.entry(format!("{:?}", call.code)).or_default() += 1;
        }
        codes
    }

    /// Calls that ended with a code other than `allowed`.
    pub fn other_than(&self, allowed: &[Code]) -> Vec<Call> {
        self.calls
            .iter()
            .filter(|c| !allowed.contains(&c.code))
            .cloned()
            .collect()
    }

    /// The calls that failed otherwise than `allowed`, leaving out (and printing) those that
    /// hit a known limiter-svc bug: a call a replica forwarded to a shard owner that died
    /// or stopped meanwhile ends with the relay's own transport failure, CANCELLED
    /// "operation was canceled" or UNKNOWN "transport error", instead of being routed again
    /// (the request never reached the owner) or answered UNAVAILABLE (outcome unknown).
    /// Only calls started before `until` (when the owner's shards had moved) are excused.
    pub fn unexpected_failures(&self, allowed: &[Code], until: Instant) -> Vec<Call> {
        let (relayed, unexpected): (Vec<_>, Vec<_>) = self
            .other_than(allowed)
            .into_iter()
            .partition(|c| c.started < until && matches!(c.code, Code::Unknown | Code::Cancelled));
        if !relayed.is_empty() {
            let seen: Vec<_> = relayed
                .iter()
                .map(|c| (c.code, c.message.as_str()))
                .collect();
            println!(
                "KNOWN BUG (limiter-svc relays a peer's transport failure): {}: {seen:?}",
                self.name
            );
        }
        unexpected
    }

    /// One line for the test output: calls by code, slowest success, longest outage.
    pub fn summary(&self) -> String {
        format!(
            "{}: {} calls {:?}, slowest success {:?}, longest outage {:?}",
            self.name,
            self.calls.len(),
            self.codes(),
            self.slowest_success(),
            self.longest_outage()
        )
    }
}

/// One WatchPresence event: (revision, kind, identity, device id, leave reason).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    /// Revision of the change.
    pub revision: i64,
    /// `joined`, `updated`, `left`, `snapshot_complete` or `compacted`.
    pub kind: &'static str,
    /// The device's identity.
    pub identity: String,
    /// The device.
    pub device_id: String,
    /// `LeaveReason` of a `left`, else 0.
    pub reason: i32,
}

/// A WatchPresence stream read by a task into a shared log.
pub struct Watcher {
    seen: Arc<Mutex<Vec<Seen>>>,
    end: Arc<Mutex<Option<Result<(), Status>>>>,
    task: JoinHandle<()>,
}

impl Watcher {
    /// Opens a watch of every identity of [`ACCOUNT`] on `addr` from `start_revision`.
    pub async fn open(addr: SocketAddr, start_revision: i64) -> Self {
        let request = pb::WatchPresenceRequest {
            start_revision,
            ..Default::default()
        };
        let mut stream = presence(addr)
            .watch_presence(Tokens::request(&reader_token(), request))
            .await
            .unwrap()
            .into_inner();
        let seen: Arc<Mutex<Vec<Seen>>> = Arc::default();
        let end: Arc<Mutex<Option<Result<(), Status>>>> = Arc::default();
        let task = tokio::spawn({
            let (seen, end) = (seen.clone(), end.clone());
            async move {
                let result = loop {
                    match stream.message().await {
                        Ok(Some(message)) => {
                            if let Some(event) = message.event {
                                seen.lock().unwrap().push(convert(message.revision, &event));
                            }
                        }
                        Ok(None) => break Ok(()),
                        Err(status) => break Err(status),
                    }
                };
                *end.lock().unwrap() = Some(result);
            }
        });
        Self { seen, end, task }
    }

    /// Every event so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }

    /// How the stream ended, `None` while it is open.
    pub fn ended(&self) -> Option<Result<(), Status>> {
        self.end.lock().unwrap().clone()
    }

    /// Waits until an event at `revision` or later has arrived.
    pub async fn reached(&self, revision: i64, within: Duration) {
        poll_until(
            &format!("the watcher to reach revision {revision}"),
            within,
            || async {
                let last = self.seen.lock().unwrap().last().map(|s| s.revision);
                last.filter(|r| *r >= revision).map(|_| ())
            },
        )
        .await;
    }

    /// Waits for the stream to end; how it ended.
    pub async fn end(&mut self, within: Duration) -> Result<(), Status> {
        tokio::time::timeout(within, &mut self.task)
            .await
            .expect("the watch did not end in time")
            .unwrap();
        self.end.lock().unwrap().clone().unwrap()
    }
}

impl Drop for Watcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn convert(revision: i64, event: &Event) -> Seen {
    let device = |d: &Option<pb::Device>| {
        d.as_ref()
            .map(|d| (d.identity.clone(), d.device_id.clone()))
            .unwrap_or_default()
    };
    let (kind, (identity, device_id), reason) = match event {
        Event::Joined(e) => ("joined", device(&e.device), 0),
        Event::Updated(e) => ("updated", device(&e.device), 0),
        Event::Left(e) => ("left", device(&e.device), e.reason),
        Event::SnapshotComplete(_) => ("snapshot_complete", Default::default(), 0),
        Event::Compacted(_) => ("compacted", Default::default(), 0),
    };
    Seen {
        revision,
        kind,
        identity,
        device_id,
        reason,
    }
}

/// The current etcd revision as `client` sees it.
pub async fn etcd_revision(client: &mut etcd_client::Client) -> i64 {
    client
        .get("revision-probe", None)
        .await
        .unwrap()
        .header()
        .unwrap()
        .revision()
}

/// Every key (as text) under `prefix` with its lease id.
pub async fn keys_under(client: &mut etcd_client::Client, prefix: &str) -> Vec<(String, i64)> {
    client
        .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
        .await
        .unwrap()
        .kvs()
        .iter()
        .map(|kv| (kv.key_str().unwrap().to_owned(), kv.lease()))
        .collect()
}

/// Every value (as text) under `prefix`.
pub async fn values_under(client: &mut etcd_client::Client, prefix: &str) -> Vec<String> {
    client
        .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
        .await
        .unwrap()
        .kvs()
        .iter()
        .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())
        .collect()
}

/// A RouterService client of a server.
pub fn router(addr: SocketAddr) -> RouterServiceClient<Channel> {
    RouterServiceClient::new(channel(addr))
}

/// PutApplication of [`ACCOUNT`] answering `address` with a Dial of client `identity`.
pub async fn put_dial_app(addr: SocketAddr, address: &str, identity: &str) -> Result<(), Status> {
    let xml =
        format!("<Response><Dial timeout=\"60\"><Client>{identity}</Client></Dial></Response>");
    put_app(addr, address, &xml).await
}

/// PutApplication of [`ACCOUNT`] answering `address` with inline instructions `xml`.
pub async fn put_app(addr: SocketAddr, address: &str, xml: &str) -> Result<(), Status> {
    let application = rpb::Application {
        account_id: ACCOUNT.into(),
        address: address.into(),
        instructions: xml.into(),
        ..Default::default()
    };
    router(addr)
        .put_application(Tokens::request(
            &admin(),
            rpb::PutApplicationRequest {
                application: Some(application),
            },
        ))
        .await?;
    Ok(())
}

/// Route of [`ACCOUNT`] from `+15550100` to `to` as `id`, through `addr`.
pub async fn route(addr: SocketAddr, to: &str, id: &str) -> Result<rpb::Communication, Status> {
    route_on(&mut router(addr), to, id).await
}

/// Route of [`ACCOUNT`] from `+15550100` to `to` as `id`, through `client`.
pub async fn route_on(
    client: &mut RouterServiceClient<Channel>,
    to: &str,
    id: &str,
) -> Result<rpb::Communication, Status> {
    let request = rpb::RouteRequest {
        account_id: ACCOUNT.into(),
        from: "+15550100".into(),
        to: to.into(),
        communication_id: id.into(),
        ..Default::default()
    };
    let response = client.route(Tokens::request(&admin(), request)).await?;
    Ok(response.into_inner().communication.unwrap_or_default())
}

/// Hangup of communication `id` of [`ACCOUNT`] through `addr`.
pub async fn hangup(addr: SocketAddr, id: &str) -> Result<rpb::Communication, Status> {
    let request = rpb::HangupRequest {
        account_id: ACCOUNT.into(),
        communication_id: id.into(),
        reason: "test".into(),
    };
    let response = router(addr)
        .hangup(Tokens::request(&admin(), request))
        .await?;
    Ok(response.into_inner().communication.unwrap_or_default())
}

/// A Connect session of `identity`/`device_id` on `addr` that accepts every offer at once
/// (or, with `answer` false, never answers); it lives until the task is aborted or its
/// stream ends. Returns the task and the device's revision.
pub async fn device_task(
    addr: SocketAddr,
    identity: &str,
    device_id: &str,
    answer: bool,
) -> (JoinHandle<Option<Status>>, i64) {
    let (sender, requests) = tokio::sync::mpsc::channel(64);
    let hello = pb::ConnectHello {
        device_id: device_id.into(),
        ..Default::default()
    };
    sender
        .send(pb::ConnectRequest {
            kind: Some(Say::Hello(hello)),
        })
        .await
        .unwrap();
    let mut inbound = presence(addr)
        .connect(Tokens::request(
            &device_token(identity),
            tokio_stream::wrappers::ReceiverStream::new(requests),
        ))
        .await
        .unwrap()
        .into_inner();
    let Some(Recv::Registered(registered)) = inbound.message().await.unwrap().and_then(|m| m.kind)
    else {
        panic!("expected `registered`");
    };
    let revision = registered.device.map_or(0, |d| d.revision);
    let task = tokio::spawn(async move {
        loop {
            match inbound.message().await {
                Ok(Some(message)) => {
                    if let (true, Some(Recv::Offer(offer))) = (answer, message.kind) {
                        let answer = pb::ConnectAnswer {
                            offer_id: offer.offer_id,
                            accept: true,
                            reject_reason: 0,
                            ..Default::default()
                        };
                        let _ = sender
                            .send(pb::ConnectRequest {
                                kind: Some(Say::Answer(answer)),
                            })
                            .await;
                    }
                }
                Ok(None) => return None,
                Err(status) => return Some(status),
            }
        }
    });
    (task, revision)
}

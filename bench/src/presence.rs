//! The `presence` scenario: one presence-svc replica on one etcd (fsync on), without
//! `--limiter` (no API guard), measured against the RPC ceiling at the same client
//! concurrency.
//!
//! Rows, on one world: `rpc_ceiling` (Health/Check on the replica), `presence_get`
//! (GetPresence of 1,000 registered identities), `watch_latency` (one WatchPresence on the
//! account while a writer changes devices at a steady rate; latency from each write's
//! answer to the watcher's event for it) and `presence_register` (Register of a new device,
//! TTL 60 s, per operation). Then, on a fresh world (so that nothing else sits in the
//! replica's memory), `connect_sessions`: 100,000 concurrent Connect sessions on the replica
//! and its resident memory once every one is registered.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use plumbing::auth::Scope;
use proto::presence::v1 as pb;
use proto::presence::v1::connect_request::Kind as ToServer;
use proto::presence::v1::connect_response::Kind as FromServer;
use proto::presence::v1::presence_service_client::PresenceServiceClient;
use proto::presence::v1::watch_presence_response::Event;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Streaming;
use tonic::transport::Channel;

use super::baseline::{self, Auth, status_text};
use super::load::{self, Plan, Sample, Worker, percentile};
use super::report::{Curve, Goal, Row, millis, thousands};
use super::stack::{Stack, WindowFacts};
use super::{OP_TIMEOUT, Options, Report, Result, progress, sys};

/// The account every row uses (platform tokens naming it).
const ACCOUNT: &str = "AC_bench";
/// Identities `u0` … `u999` registered before `presence_get`, which reads them round-robin.
const GET_IDENTITIES: usize = 1_000;
/// TTL of the registrations the rows read or update (longer than any run).
const SEED_TTL: u32 = 3_600;
/// TTL of `presence_register`'s registrations.
const REGISTER_TTL: u32 = 60;
/// Registrations in flight while seeding.
const SEED_IN_FLIGHT: usize = 64;
/// `watch_latency`: changes per second (open loop: one write starts every 1/rate s,
/// whether or not the previous one has been answered) …
const WATCH_RATE: u32 = 200;
/// … spread round-robin over this many devices (`watched0/w0` …).
const WATCH_DEVICES: usize = 16;
/// How long `watch_latency` waits after its window for the events of the window's writes.
const WATCH_GRACE: Duration = Duration::from_secs(2);
/// `connect_sessions`: the sessions one replica is to hold within 1 GiB …
const SESSIONS: usize = 100_000;
/// … on HTTP/2 connections carrying this many streams each (500 connections) …
const STREAMS_PER_CONNECTION: usize = 200;
/// … opened this many at a time.
const OPEN_IN_FLIGHT: usize = 512;
/// Pause between the last `registered` and the memory reading (allocations settle).
const SETTLE: Duration = Duration::from_secs(1);
/// While opening, the replica's RSS is read every this many sessions (the points of the
/// `presence_rss` chart; a read of `/proc/<pid>/status` each, ten in all).
const RSS_SAMPLE_EVERY: usize = 10_000;
/// Bound on setup steps (registrations visible, the watch live).
const READY_TIMEOUT: Duration = Duration::from_secs(30);

type Client = PresenceServiceClient<Channel>;

/// Runs the scenario: the first world for the throughput and watch rows, a fresh one for
/// `connect_sessions`.
pub async fn run(options: &Options, report: &mut Report) -> Result<()> {
    progress(format_args!("starting etcd (fsync on)"));
    let mut stack = Stack::start(options).await?;
    let outcome = measure(&mut stack, options, report).await;
    stop(stack, report).await;
    let mut windows = outcome?;

    progress(format_args!(
        "starting a fresh etcd and presence-svc for connect_sessions"
    ));
    let mut stack = Stack::start(options).await?;
    let outcome = connect_sessions(&mut stack, report).await;
    // The sessions stay open until the replica is gone (closing 100,000 of them first would
    // only make it write 100,000 deletions).
    stop(stack, report).await;
    let (held, facts) = outcome?;
    drop(held);
    windows.push(facts);
    report.warn_noise("presence", &windows.iter().collect::<Vec<_>>());
    Ok(())
}

async fn stop(stack: Stack, report: &mut Report) {
    progress(format_args!("stopping the services and etcd"));
    for remark in stack.shutdown().await {
        progress(format_args!("{remark}"));
        report.remarks.push(format!("presence: {remark}"));
    }
}

async fn measure(
    stack: &mut Stack,
    options: &Options,
    report: &mut Report,
) -> Result<Vec<WindowFacts>> {
    progress(format_args!(
        "starting presence-svc (1 replica, no --limiter)"
    ));
    let addr = stack.start_services("presence-svc", 1, &[]).await?[0];
    let register = Auth::platform_for(ACCOUNT, &[Scope::PresenceRegister])?;
    let read = Auth::platform_for(ACCOUNT, &[Scope::PresenceRead])?;
    let setup = PresenceServiceClient::new(stack.channel(addr)?);

    progress(format_args!("registering {GET_IDENTITIES} identities"));
    let identities: Arc<[String]> = (0..GET_IDENTITIES).map(|i| format!("u{i}")).collect();
    let seeds: Vec<(String, String)> = identities
        .iter()
        .map(|identity| (identity.clone(), "d".to_owned()))
        .collect();
    let revision = seed(&setup, &register, &seeds).await?;
    wait_visible(&setup, &read, &identities[GET_IDENTITIES - 1], revision).await?;

    progress(format_args!("measuring rpc_ceiling"));
    let (ceiling, ceiling_facts) = baseline::rpc_ceiling(options, stack, addr).await?;
    load::ensure_progress("rpc_ceiling", &ceiling)?;
    report.row(Row {
        name: "rpc_ceiling".to_owned(),
        rate: ceiling.rate(),
        unit: "calls/s",
        p50: ceiling.percentile(0.50),
        p99: ceiling.percentile(0.99),
        notes: format!(
            "grpc.health.v1.Health/Check on presence-svc#1, no auth; {}; {}{}",
            ceiling_facts.cpu,
            ceiling.error_note(),
            ceiling_facts.server_errors()
        ),
    });

    progress(format_args!("measuring presence_get"));
    let (get, get_facts) = presence_get(options, stack, addr, &read, &identities).await?;
    load::ensure_progress("presence_get", &get)?;
    report.row(Row {
        name: "presence_get".to_owned(),
        rate: get.rate(),
        unit: "calls/s",
        p50: get.percentile(0.50),
        p99: get.percentile(0.99),
        notes: format!(
            "GetPresence of {GET_IDENTITIES} registered identities round-robin (each with 1 \
             device), served from the replica's cache; platform token naming {ACCOUNT} \
             (platform callers bypass the API guard, and presence runs without --limiter \
             here: no guard at all); etcd writes in window: {}; {}; {}{}",
            get_facts.writes,
            get_facts.cpu,
            get.error_note(),
            get_facts.server_errors()
        ),
    });

    progress(format_args!("measuring watch_latency"));
    let (watch, watch_facts) = watch_latency(options, stack, addr, &register, &read).await?;
    if watch.latencies.is_empty() {
        return Err(format!(
            "watch_latency saw no event for any write of its window: {}",
            watch.error_note()
        )
        .into());
    }
    report.row(Row {
        name: "watch_latency".to_owned(),
        rate: watch.latencies.len() as f64 / watch.seconds,
        unit: "changes/s",
        p50: percentile(&watch.latencies, 0.50),
        p99: percentile(&watch.latencies, 0.99),
        notes: format!(
            "1 WatchPresence on the whole account (no snapshot, from now); 1 writer: \
             UpdateStatus (status and a `seq` attribute) started every {:.0?} (open loop, \
             {WATCH_RATE}/s) round-robin over {WATCH_DEVICES} devices; latency = from the \
             write's answer to the watcher's event with its device id and revision ({} of \
             {} events came before the answer: counted as 0); from the write's request \
             instead: p50 {}, p99 {}; {}; {}; {}; {}{}",
            Duration::from_secs(1) / WATCH_RATE,
            watch.early,
            watch.latencies.len(),
            millis(percentile(&watch.from_request, 0.50)),
            millis(percentile(&watch.from_request, 0.99)),
            watch_facts.writes_per_count(watch.latencies.len(), "change"),
            watch_facts.etcd_note(watch.seconds),
            watch_facts.cpu,
            watch.error_note(),
            watch_facts.server_errors()
        ),
    });

    progress(format_args!("measuring presence_register"));
    let (registers, register_facts) = presence_register(options, stack, addr, &register).await?;
    load::ensure_progress("presence_register", &registers)?;
    report.row(Row {
        name: "presence_register".to_owned(),
        rate: registers.rate(),
        unit: "calls/s",
        p50: registers.percentile(0.50),
        p99: registers.percentile(0.99),
        notes: format!(
            "Register of a new device (new identity, TTL {REGISTER_TTL} s: a lease grant, \
             which takes no revision, and a put batched by the replica's group commit); {}; \
             {}; {}; {}; {}{}",
            register_facts.writes_per(&registers, "register"),
            register_facts.raft_note(registers.latencies.len(), "register"),
            register_facts.etcd_note(registers.seconds),
            register_facts.cpu,
            registers.error_note(),
            register_facts.server_errors()
        ),
    });

    report.ratio(
        "presence_get_vs_rpc_ceiling",
        get.rate() / ceiling.rate(),
        Goal::AtLeast(0.5),
    );
    report.ratio(
        "watch_p99_ms",
        percentile(&watch.latencies, 0.99).as_secs_f64() * 1000.0,
        Goal::AtMost(50.0),
    );
    // The change happened somewhere between the write's request and its answer: measured
    // from the answer the latency is a lower bound, from the request an upper bound.
    report.ratio(
        "watch_p99_from_request_ms",
        percentile(&watch.from_request, 0.99).as_secs_f64() * 1000.0,
        Goal::AtMost(50.0),
    );
    Ok(vec![ceiling_facts, get_facts, watch_facts, register_facts])
}

fn register_request(identity: &str, device: &str, ttl: u32) -> pb::RegisterRequest {
    pb::RegisterRequest {
        account_id: String::new(),
        identity: identity.to_owned(),
        device_id: device.to_owned(),
        status: pb::Status::Available as i32,
        ttl_seconds: ttl,
        ..Default::default()
    }
}

/// Runs `make(0)` … `make(count - 1)` as tasks, at most `in_flight` at a time, and hands
/// each result to `done` as it comes (in completion order).
async fn bounded<T, F>(
    count: usize,
    in_flight: usize,
    mut make: impl FnMut(usize) -> F,
    mut done: impl FnMut(T),
) -> Result<()>
where
    F: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let mut tasks = JoinSet::new();
    for index in 0..count {
        if tasks.len() >= in_flight
            && let Some(joined) = tasks.join_next().await
        {
            done(joined?);
        }
        tasks.spawn(make(index));
    }
    while let Some(joined) = tasks.join_next().await {
        done(joined?);
    }
    Ok(())
}

/// Registers `(identity, device)` pairs with [`SEED_TTL`]; the highest revision written.
async fn seed(client: &Client, auth: &Auth, devices: &[(String, String)]) -> Result<i64> {
    let mut highest = 0;
    let mut failure = None;
    bounded(
        devices.len(),
        SEED_IN_FLIGHT,
        |index| {
            let (identity, device) = devices[index].clone();
            let mut client = client.clone();
            let request = auth.request(register_request(&identity, &device, SEED_TTL));
            async move {
                client
                    .register(request)
                    .await
                    .map(|answer| answer.into_inner().revision)
                    .map_err(|status| format!("Register {identity}: {}", status_text(&status)))
            }
        },
        |answer| match answer {
            Ok(revision) => highest = highest.max(revision),
            Err(text) => failure = Some(text),
        },
    )
    .await?;
    match failure {
        Some(text) => Err(text.into()),
        None => Ok(highest),
    }
}

/// Polls until the replica's cache has caught up with `revision` and shows `identity`.
async fn wait_visible(client: &Client, auth: &Auth, identity: &str, revision: i64) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let request = pb::GetPresenceRequest {
            account_id: String::new(),
            identity: identity.to_owned(),
            min_revision: revision,
        };
        let last = match client.clone().get_presence(auth.request(request)).await {
            Ok(answer) => {
                let devices = answer
                    .into_inner()
                    .presence
                    .map_or(0, |presence| presence.devices.len());
                if devices > 0 {
                    return Ok(());
                }
                format!("{identity} has no device")
            }
            Err(status) => status_text(&status),
        };
        if Instant::now() >= deadline {
            return Err(format!(
                "registrations not visible after {READY_TIMEOUT:?} (revision {revision}): {last}"
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct GetWorker {
    client: Client,
    auth: Auth,
    identities: Arc<[String]>,
    next: usize,
}

impl Worker for GetWorker {
    async fn call(&mut self) -> std::result::Result<(), String> {
        let identity = &self.identities[self.next % self.identities.len()];
        self.next = self.next.wrapping_add(1);
        let request = pb::GetPresenceRequest {
            account_id: String::new(),
            identity: identity.clone(),
            min_revision: 0,
        };
        let answer = self
            .client
            .get_presence(self.auth.request(request))
            .await
            .map_err(|s| format!("GetPresence {}", status_text(&s)))?
            .into_inner();
        match answer.presence {
            Some(presence) if !presence.devices.is_empty() => Ok(()),
            _ => Err("GetPresence answered no device for a registered identity".to_owned()),
        }
    }
}

async fn presence_get(
    options: &Options,
    stack: &Stack,
    addr: SocketAddr,
    auth: &Auth,
    identities: &Arc<[String]>,
) -> Result<(Sample, WindowFacts)> {
    let clients = load::share(options.concurrency, 1, |_| async move {
        Ok(PresenceServiceClient::new(stack.channel(addr)?))
    })
    .await?;
    let workers = clients
        .into_iter()
        .enumerate()
        .map(|(caller, (_, client))| GetWorker {
            client,
            auth: auth.clone(),
            identities: identities.clone(),
            // Callers start at different identities.
            next: caller * 97,
        })
        .collect();
    let plan = Plan::new(options);
    let window = stack.watch_window(&plan).await?;
    let sample = load::drive(&plan, workers).await?;
    Ok((sample, window.finish().await?))
}

struct RegisterWorker {
    client: Client,
    auth: Auth,
    prefix: String,
    sequence: u64,
}

impl Worker for RegisterWorker {
    async fn call(&mut self) -> std::result::Result<(), String> {
        self.sequence += 1;
        let identity = format!("{}{}", self.prefix, self.sequence);
        let request = register_request(&identity, "d", REGISTER_TTL);
        let answer = self
            .client
            .register(self.auth.request(request))
            .await
            .map_err(|s| format!("Register {}", status_text(&s)))?
            .into_inner();
        if answer.device.is_some() && answer.revision > 0 {
            Ok(())
        } else {
            Err("Register answered without a device or revision".to_owned())
        }
    }
}

async fn presence_register(
    options: &Options,
    stack: &Stack,
    addr: SocketAddr,
    auth: &Auth,
) -> Result<(Sample, WindowFacts)> {
    let clients = load::share(options.concurrency, 1, |_| async move {
        Ok(PresenceServiceClient::new(stack.channel(addr)?))
    })
    .await?;
    let workers = clients
        .into_iter()
        .enumerate()
        .map(|(caller, (_, client))| RegisterWorker {
            client,
            auth: auth.clone(),
            prefix: format!("r{caller}-"),
            sequence: 0,
        })
        .collect();
    let plan = Plan::new(options);
    let window = stack.watch_window(&plan).await?;
    let sample = load::drive(&plan, workers).await?;
    Ok((sample, window.finish().await?))
}

/// What `watch_latency` found.
#[derive(Debug, Default)]
struct WatchSample {
    /// Answer → event, per write answered in the window whose event came (sorted, ns).
    latencies: Vec<u64>,
    /// Request → event for the same writes (sorted, ns).
    from_request: Vec<u64>,
    /// Events that came before their write's answer (their latency counts as 0).
    early: usize,
    /// Seconds of the window.
    seconds: f64,
    /// Failures (writes that failed, events that never came), by text.
    errors: BTreeMap<String, u64>,
}

impl WatchSample {
    fn error_note(&self) -> String {
        let sample = Sample {
            errors: self.errors.clone(),
            window_errors: self.errors.values().sum(),
            ..Sample::default()
        };
        sample.error_note()
    }
}

/// `(device id, revision)` → when the watcher received the event.
type Seen = Arc<Mutex<HashMap<(String, i64), Instant>>>;

/// Reads the watch until it ends; every joined/updated event is noted in `seen`. Returns
/// why it ended.
async fn read_events(mut stream: Streaming<pb::WatchPresenceResponse>, seen: Seen) -> String {
    loop {
        match stream.message().await {
            Ok(Some(message)) => {
                let at = Instant::now();
                let device = match message.event {
                    Some(Event::Joined(joined)) => joined.device,
                    Some(Event::Updated(updated)) => updated.device,
                    Some(Event::Compacted(compacted)) => {
                        return format!(
                            "the watch answered Compacted (revision {})",
                            compacted.compact_revision
                        );
                    }
                    _ => None,
                };
                if let Some(device) = device {
                    let revision = if message.revision > 0 {
                        message.revision
                    } else {
                        device.revision
                    };
                    if let Ok(mut seen) = seen.lock() {
                        seen.entry((device.device_id, revision)).or_insert(at);
                    }
                }
            }
            Ok(None) => return "the watch stream ended".to_owned(),
            Err(status) => return format!("the watch failed: {}", status_text(&status)),
        }
    }
}

fn seen_at(seen: &Seen, device: &str, revision: i64) -> Option<Instant> {
    seen.lock()
        .ok()?
        .get(&(device.to_owned(), revision))
        .copied()
}

/// Changes one device (status alternating available/away, attribute `seq`); the revision.
async fn update(
    mut client: Client,
    auth: Auth,
    identity: String,
    device: String,
    seq: u64,
) -> std::result::Result<i64, String> {
    let status = if seq.is_multiple_of(2) {
        pb::Status::Available
    } else {
        pb::Status::Away
    };
    let request = pb::UpdateStatusRequest {
        account_id: String::new(),
        identity,
        device_id: device,
        status: status as i32,
        attributes: HashMap::from([("seq".to_owned(), seq.to_string())]),
    };
    let answer = client
        .update_status(auth.request(request))
        .await
        .map_err(|s| format!("UpdateStatus {}", status_text(&s)))?
        .into_inner();
    Ok(answer.revision)
}

/// One write of the window: its device, revision, and when it was sent and answered.
struct Write {
    device: String,
    revision: i64,
    sent: Instant,
    answered: Instant,
}

async fn watch_latency(
    options: &Options,
    stack: &Stack,
    addr: SocketAddr,
    register: &Auth,
    read: &Auth,
) -> Result<(WatchSample, WindowFacts)> {
    let writer = PresenceServiceClient::new(stack.channel(addr)?);
    let devices: Vec<(String, String)> = (0..WATCH_DEVICES)
        .map(|i| (format!("watched{i}"), format!("w{i}")))
        .collect();
    seed(&writer, register, &devices).await?;

    // The watcher has a connection of its own, as a real watcher would.
    let mut watcher = PresenceServiceClient::new(stack.channel(addr)?);
    let request = pb::WatchPresenceRequest {
        account_id: String::new(),
        identities: Vec::new(),
        start_revision: 0,
        snapshot: false,
    };
    let stream = watcher
        .watch_presence(read.stream_request(request))
        .await
        .map_err(|s| format!("WatchPresence: {}", status_text(&s)))?
        .into_inner();
    let seen: Seen = Arc::default();
    let reader = tokio::spawn(read_events(stream, seen.clone()));
    let outcome = watch_measure(options, stack, &writer, register, &devices, &seen, &reader).await;
    reader.abort();
    outcome
}

async fn watch_measure(
    options: &Options,
    stack: &Stack,
    writer: &Client,
    register: &Auth,
    devices: &[(String, String)],
    seen: &Seen,
    reader: &tokio::task::JoinHandle<String>,
) -> Result<(WatchSample, WindowFacts)> {
    // The watch is live once it reports a write made after it was opened.
    let deadline = Instant::now() + READY_TIMEOUT;
    let (identity, device) = devices[0].clone();
    let mut probe = 0;
    'live: loop {
        probe += 1;
        let revision = update(
            writer.clone(),
            register.clone(),
            identity.clone(),
            device.clone(),
            probe,
        )
        .await?;
        let until = Instant::now() + Duration::from_secs(1);
        while Instant::now() < until {
            if seen_at(seen, &device, revision).is_some() {
                break 'live;
            }
            if reader.is_finished() {
                return Err("the watch ended before it reported anything".into());
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if Instant::now() >= deadline {
            return Err(format!("the watch reported no write within {READY_TIMEOUT:?}").into());
        }
    }

    let plan = Plan::new(options);
    let window = stack.watch_window(&plan).await?;
    let mut ticker = tokio::time::interval(Duration::from_secs(1) / WATCH_RATE);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut writes = JoinSet::new();
    let mut sequence: u64 = 0;
    loop {
        ticker.tick().await;
        if Instant::now() >= plan.end {
            break;
        }
        sequence += 1;
        let (identity, device) = devices[sequence as usize % devices.len()].clone();
        let (client, auth) = (writer.clone(), register.clone());
        writes.spawn(async move {
            let sent = Instant::now();
            let outcome = tokio::time::timeout(
                OP_TIMEOUT,
                update(client, auth, identity, device.clone(), probe + sequence),
            )
            .await
            .unwrap_or_else(|_| Err(format!("UpdateStatus: no answer within {OP_TIMEOUT:?}")));
            (device, sent, Instant::now(), outcome)
        });
    }
    let mut sample = WatchSample {
        seconds: plan.seconds(),
        ..WatchSample::default()
    };
    let mut window_writes = Vec::new();
    while let Some(joined) = writes.join_next().await {
        let (device, sent, answered, outcome) = joined?;
        match outcome {
            Ok(revision) if answered >= plan.measure_start && answered < plan.end => {
                window_writes.push(Write {
                    device,
                    revision,
                    sent,
                    answered,
                });
            }
            Ok(_) => {}
            Err(text) => *sample.errors.entry(text).or_default() += 1,
        }
    }
    let facts = window.finish().await?;

    // Wait (a bounded time) for the events of the window's writes.
    let deadline = Instant::now() + WATCH_GRACE;
    loop {
        let missing = window_writes
            .iter()
            .filter(|w| seen_at(seen, &w.device, w.revision).is_none())
            .count();
        if missing == 0 || Instant::now() >= deadline || reader.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for write in &window_writes {
        match seen_at(seen, &write.device, write.revision) {
            Some(at) => {
                if at < write.answered {
                    sample.early += 1;
                }
                let latency = at.saturating_duration_since(write.answered);
                sample.latencies.push(latency.as_nanos() as u64);
                let from_request = at.saturating_duration_since(write.sent);
                sample.from_request.push(from_request.as_nanos() as u64);
            }
            None => {
                *sample
                    .errors
                    .entry(format!(
                        "no watch event within {WATCH_GRACE:?} after the window"
                    ))
                    .or_default() += 1;
            }
        }
    }
    if reader.is_finished() {
        *sample
            .errors
            .entry("the watch stream ended during the measurement".to_owned())
            .or_default() += 1;
    }
    sample.latencies.sort_unstable();
    sample.from_request.sort_unstable();
    Ok((sample, facts))
}

/// A Connect session kept open: dropping it ends the stream.
struct Held {
    _requests: mpsc::Sender<pb::ConnectRequest>,
    _responses: Streaming<pb::ConnectResponse>,
}

/// Opens a Connect session for identity `s<index>` (device `d`) and waits for `registered`.
async fn open_session(
    channel: Channel,
    auth: &Auth,
    index: usize,
) -> std::result::Result<Held, String> {
    let (requests, outbound) = mpsc::channel(1);
    let hello = pb::ConnectHello {
        account_id: String::new(),
        identity: format!("s{index}"),
        device_id: "d".to_owned(),
        status: pb::Status::Available as i32,
        attributes: HashMap::new(),
    };
    requests
        .try_send(pb::ConnectRequest {
            kind: Some(ToServer::Hello(hello)),
        })
        .map_err(|err| format!("queueing hello: {err}"))?;
    let mut client = PresenceServiceClient::new(channel);
    // No deadline on the call itself: a `grpc-timeout` would end the session.
    let mut responses = client
        .connect(auth.stream_request(ReceiverStream::new(outbound)))
        .await
        .map_err(|s| format!("Connect {}", status_text(&s)))?
        .into_inner();
    match responses.message().await {
        Ok(Some(pb::ConnectResponse {
            kind: Some(FromServer::Registered(_)),
        })) => Ok(Held {
            _requests: requests,
            _responses: responses,
        }),
        Ok(Some(_)) => Err("Connect: the first message was not `registered`".to_owned()),
        Ok(None) => Err("Connect: the stream ended before `registered`".to_owned()),
        Err(status) => Err(format!("Connect {}", status_text(&status))),
    }
}

/// Device records of the account in etcd (a count-only range read).
async fn records_in_etcd(stack: &Stack) -> Result<i64> {
    let mut client = stack.etcd_client().await?;
    let prefix = format!("{}/presence/{ACCOUNT}/", stack.prefix);
    let options = etcd_client::GetOptions::new()
        .with_prefix()
        .with_count_only();
    let answer = tokio::time::timeout(OP_TIMEOUT, client.get(prefix.as_str(), Some(options)))
        .await
        .map_err(|_| "etcd did not answer within the deadline")??;
    Ok(answer.count())
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

async fn connect_sessions(
    stack: &mut Stack,
    report: &mut Report,
) -> Result<(Vec<Held>, WindowFacts)> {
    progress(format_args!(
        "starting presence-svc (1 replica, no --limiter)"
    ));
    let addr = stack.start_services("presence-svc", 1, &[]).await?[0];
    let pid = stack.services[0]
        .pid
        .ok_or("the process id of presence-svc is unknown")?;
    let auth = Auth::platform_for(ACCOUNT, &[Scope::PresenceRegister])?;
    let connections = SESSIONS.div_ceil(STREAMS_PER_CONNECTION);
    let channels: Vec<Channel> = (0..connections)
        .map(|_| stack.channel(addr))
        .collect::<Result<_>>()?;
    let (idle_kib, _) = sys::memory_kib(pid).ok_or("cannot read presence-svc's memory")?;

    progress(format_args!(
        "opening {SESSIONS} Connect sessions over {connections} connections, \
         {OPEN_IN_FLIGHT} at a time"
    ));
    let start = stack.window_start().await?;
    let opening = Instant::now();
    let mut held = Vec::with_capacity(SESSIONS);
    let mut latencies = Vec::with_capacity(SESSIONS);
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    let mut rss_points = vec![(0.0, mib(idle_kib))];
    bounded(
        SESSIONS,
        OPEN_IN_FLIGHT,
        |index| {
            let channel = channels[index / STREAMS_PER_CONNECTION].clone();
            let auth = auth.clone();
            async move {
                let started = Instant::now();
                let outcome = tokio::time::timeout(OP_TIMEOUT, open_session(channel, &auth, index))
                    .await
                    .unwrap_or_else(|_| {
                        Err(format!("Connect: no `registered` within {OP_TIMEOUT:?}"))
                    });
                (outcome, started.elapsed())
            }
        },
        |(outcome, latency)| match outcome {
            Ok(session) => {
                held.push(session);
                latencies.push(latency.as_nanos() as u64);
                if held.len().is_multiple_of(RSS_SAMPLE_EVERY)
                    && let Some((rss_kib, _)) = sys::memory_kib(pid)
                {
                    rss_points.push((held.len() as f64, mib(rss_kib)));
                }
                if held.len().is_multiple_of(10_000) {
                    progress(format_args!("{} sessions open", held.len()));
                }
            }
            Err(text) => *errors.entry(text).or_default() += 1,
        },
    )
    .await?;
    let open_time = opening.elapsed();
    let facts = stack.facts_since(start).await?;
    latencies.sort_unstable();
    if held.is_empty() {
        let sample = Sample {
            errors,
            ..Sample::default()
        };
        return Err(format!(
            "connect_sessions opened no session: {}",
            sample.error_note()
        )
        .into());
    }
    let records = records_in_etcd(stack).await?;
    tokio::time::sleep(SETTLE).await;
    let (rss_kib, peak_kib) =
        sys::memory_kib(pid).ok_or("presence-svc exited while holding the sessions")?;
    let bench = sys::memory_kib(std::process::id()).map_or(0, |(rss, _)| rss);
    let sessions = held.len();
    let per_session_kib = rss_kib.saturating_sub(idle_kib) as f64 / sessions as f64;
    // Scaled to the goal's session count: exactly the RSS when every session opened.
    let scaled = |count: usize| mib(idle_kib) + per_session_kib * count as f64 / 1024.0;
    let (per_50k, scaled_mib) = (scaled(50_000), scaled(SESSIONS));
    let sample = Sample {
        window_errors: errors.values().sum(),
        errors,
        ..Sample::default()
    };
    report.row(Row {
        name: "connect_sessions".to_owned(),
        rate: sessions as f64 / open_time.as_secs_f64(),
        unit: "sessions/s",
        p50: percentile(&latencies, 0.50),
        p99: percentile(&latencies, 0.99),
        notes: format!(
            "{} concurrent Connect sessions (hello → `registered`, one identity each) held \
             on a fresh presence-svc#1 over {connections} HTTP/2 connections \
             ({STREAMS_PER_CONNECTION} streams each), opened {OPEN_IN_FLIGHT} at a time in \
             {:.1} s (ops/s: sessions opened per second; p50/p99: one open); device records \
             in etcd: {}; presence-svc RSS with all open {:.0} MiB (idle before: {:.0} MiB, \
             {:.1} KiB per session, peak {:.0} MiB); bench RSS {:.0} MiB; {}; {}; {}; {}; {}{}",
            thousands(sessions as f64),
            open_time.as_secs_f64(),
            thousands(records as f64),
            mib(rss_kib),
            mib(idle_kib),
            per_session_kib,
            mib(peak_kib),
            mib(bench),
            facts.writes_per_count(sessions, "session"),
            facts.raft_note(sessions, "session"),
            facts.etcd_note(open_time.as_secs_f64()),
            facts.cpu,
            sample.error_note(),
            facts.server_errors()
        ),
    });
    report.ratio("session_rss_mib_per_50k", per_50k, Goal::AtMost(1024.0));
    report.ratio("session_rss_mib_per_100k", scaled_mib, Goal::AtMost(1024.0));
    // The reading after SETTLE replaces the one taken as the last session opened.
    rss_points.retain(|(open, _)| *open < sessions as f64);
    rss_points.push((sessions as f64, mib(rss_kib)));
    report.curve(Curve {
        name: "presence_rss".to_owned(),
        title: "presence-svc resident memory against open Connect sessions".to_owned(),
        about: format!(
            "connect_sessions: RSS read every {} sessions while opening {OPEN_IN_FLIGHT} at \
             a time, the last {SETTLE:?} after all were open; session_rss_mib_per_100k \
             {scaled_mib:.2} (goal <= 1024)",
            thousands(RSS_SAMPLE_EVERY as f64)
        ),
        x_label: "open Connect sessions".to_owned(),
        y_label: "presence-svc RSS (MiB)".to_owned(),
        points: rss_points,
    });
    Ok((held, facts))
}

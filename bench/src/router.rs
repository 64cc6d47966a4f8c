//! The `router` scenario: etcd (fsync on), one presence-svc (no `--limiter`), one
//! limiter-svc and one router-svc (`--presence`, `--limiter`: the `communications` slot and
//! the API guard, which platform callers bypass), measured end to end.
//!
//! [`AGENTS`] auto-answering devices (Connect sessions of identities `agent0` … that accept
//! every offer at once) and as many applications `line0` … answering with inline
//! instructions `<Response><Dial timeout="10"><Client>agentN</Client></Dial></Response>`.
//! Row `router_comms`: each caller loops Route (a new communication id, callers rotating
//! over the lines) → CONNECTED → Hangup → ENDED; one communication is the whole cycle. Any
//! other answer is an error of the row. Row `router_comms_webhook`: the same through
//! applications `hook0` … whose instructions come from a local webhook (an HTTP/1.1 server
//! in this process answering the same XML; the router runs with `--allow-private-webhooks`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use plumbing::auth::Scope;
use proto::limiter::v1 as lpb;
use proto::limiter::v1::limiter_service_client::LimiterServiceClient;
use proto::presence::v1 as ppb;
use proto::presence::v1::connect_request::Kind as ToServer;
use proto::presence::v1::connect_response::Kind as FromServer;
use proto::presence::v1::presence_service_client::PresenceServiceClient;
use proto::router::v1 as pb;
use proto::router::v1::router_service_client::RouterServiceClient;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use super::baseline::{Auth, status_text};
use super::load::{self, Plan, Sample, Worker, percentile};
use super::report::{Goal, Row, millis};
use super::stack::{Stack, WindowFacts};
use super::{Options, Report, Result, progress};

/// The account of every communication (platform tokens naming it).
const ACCOUNT: &str = "AC_bench";
/// Auto-answering devices, one per identity `agentN`, each dialed by application `lineN`.
const AGENTS: usize = 64;
/// `timeout` of the Dial (never reached: the devices answer at once).
const DIAL_TIMEOUT_SECONDS: u32 = 10;
/// The account's limit of concurrent communications: far above the callers, so that
/// nothing is BUSY.
const COMMUNICATIONS_LIMIT: u32 = 1_000_000;
/// The limiter resource the router takes a slot of per communication.
const COMMUNICATIONS: &str = "communications";
/// Bound on setup steps and on the slots draining after the row.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

type Router = RouterServiceClient<Channel>;

/// Runs the scenario: starts etcd and the services, measures, stops them.
pub async fn run(options: &Options, report: &mut Report) -> Result<()> {
    progress(format_args!("starting etcd (fsync on)"));
    let mut stack = Stack::start(options).await?;
    let outcome = measure(&mut stack, options, report).await;
    progress(format_args!("stopping the services and etcd"));
    for remark in stack.shutdown().await {
        progress(format_args!("{remark}"));
        report.remarks.push(format!("router: {remark}"));
    }
    let windows = outcome?;
    report.warn_noise("router", &windows.iter().collect::<Vec<_>>());
    Ok(())
}

async fn measure(
    stack: &mut Stack,
    options: &Options,
    report: &mut Report,
) -> Result<Vec<WindowFacts>> {
    progress(format_args!(
        "starting presence-svc, limiter-svc and router-svc (1 replica each)"
    ));
    let presence = stack.start_services("presence-svc", 1, &[]).await?[0];
    let limiter = stack.start_services("limiter-svc", 1, &[]).await?[0];
    let (presence_arg, limiter_arg) = (presence.to_string(), limiter.to_string());
    let router = stack
        .start_services(
            "router-svc",
            1,
            &[
                "--presence",
                &presence_arg,
                "--limiter",
                &limiter_arg,
                "--allow-private-webhooks",
            ],
        )
        .await?[0];

    progress(format_args!(
        "setting the communications limit, {AGENTS} applications and {AGENTS} auto-answering devices"
    ));
    let admin = Auth::platform(&[Scope::Admin])?;
    let mut limits = LimiterServiceClient::new(stack.channel(limiter)?);
    set_limit(&mut limits, &admin).await?;
    let apps = Auth::platform_for(ACCOUNT, &[Scope::RouterAdmin])?;
    let mut setup = RouterServiceClient::new(stack.channel(router)?);
    for agent in 0..AGENTS {
        put_application(&mut setup, &apps, agent, Instructions::Inline).await?;
    }
    let devices = Auth::platform_for(ACCOUNT, &[Scope::PresenceRegister])?;
    let reader = Auth::platform_for(ACCOUNT, &[Scope::PresenceRead])?;
    let presence_channel = stack.channel(presence)?;
    let answered = Arc::new(AtomicU64::new(0));
    let mut agents = Agents(Vec::with_capacity(AGENTS));
    for agent in 0..AGENTS {
        let (task, revision) =
            Agent::open(presence_channel.clone(), &devices, agent, answered.clone()).await?;
        agents.0.push(task);
        wait_present(&presence_channel, &reader, agent, revision).await?;
    }
    let caller = Auth::platform_for(ACCOUNT, &[Scope::RouterRoute])?;
    wait_routable(&setup, &caller, Instructions::Inline).await?;
    let world = World {
        router,
        caller,
        answered,
        limits,
        admin,
    };

    progress(format_args!("measuring router_comms"));
    let (inline, inline_facts) =
        comms_row(&world, stack, options, report, Instructions::Inline, None).await?;

    progress(format_args!(
        "starting the local webhook; measuring router_comms_webhook"
    ));
    let webhook = Webhook::start().await?;
    for agent in 0..AGENTS {
        put_application(
            &mut setup,
            &apps,
            agent,
            Instructions::Webhook(webhook.addr),
        )
        .await?;
    }
    wait_routable(&setup, &world.caller, Instructions::Webhook(webhook.addr)).await?;
    let (_, hook_facts) = comms_row(
        &world,
        stack,
        options,
        report,
        Instructions::Webhook(webhook.addr),
        Some(&webhook.served),
    )
    .await?;

    report.ratio("router_comms_per_s", inline.rate(), Goal::AtLeast(1000.0));
    drop(agents);
    Ok(vec![inline_facts, hook_facts])
}

/// Where an application's instructions come from.
#[derive(Debug, Clone, Copy)]
enum Instructions {
    /// Inline XML: applications `lineN`.
    Inline,
    /// The local webhook at this address: applications `hookN`.
    Webhook(SocketAddr),
}

impl Instructions {
    /// Tells the communication ids of the rows apart (Route is idempotent by id).
    fn tag(self) -> &'static str {
        match self {
            Instructions::Inline => "inline",
            Instructions::Webhook(_) => "hook",
        }
    }

    fn address(self, agent: usize) -> String {
        match self {
            Instructions::Inline => format!("line{agent}"),
            Instructions::Webhook(_) => format!("hook{agent}"),
        }
    }
}

/// The XML every application answers with: dial `agent<agent>`.
fn dial_xml(agent: usize) -> String {
    format!(
        "<Response><Dial timeout=\"{DIAL_TIMEOUT_SECONDS}\"><Client>agent{agent}</Client>\
         </Dial></Response>"
    )
}

/// What the rows share.
struct World {
    router: SocketAddr,
    caller: Auth,
    answered: Arc<AtomicU64>,
    limits: LimiterServiceClient<Channel>,
    admin: Auth,
}

/// Measures one row of communications through `instructions`' applications.
async fn comms_row(
    world: &World,
    stack: &Stack,
    options: &Options,
    report: &mut Report,
    instructions: Instructions,
    webhook_served: Option<&AtomicU64>,
) -> Result<(Sample, WindowFacts)> {
    let (name, how) = match instructions {
        Instructions::Inline => (
            "router_comms",
            format!(
                "inline `<Dial timeout=\"{DIAL_TIMEOUT_SECONDS}\"><Client>agentN</Client></Dial>`"
            ),
        ),
        Instructions::Webhook(_) => (
            "router_comms_webhook",
            "the same XML from a local webhook (HTTP/1.1 POST, signed, answered at once by \
             the bench)"
                .to_owned(),
        ),
    };
    let router = world.router;
    let clients = load::share(options.concurrency, 1, |_| async move {
        Ok(RouterServiceClient::new(stack.channel(router)?))
    })
    .await?;
    let steps: Arc<Mutex<Vec<Steps>>> = Arc::default();
    let first_failure: Arc<Mutex<Option<String>>> = Arc::default();
    let workers = clients
        .into_iter()
        .enumerate()
        .map(|(caller, (_, client))| CommWorker {
            client,
            auth: world.caller.clone(),
            instructions,
            caller,
            sequence: 0,
            steps: steps.clone(),
            first_failure: first_failure.clone(),
        })
        .collect();
    let plan = Plan::new(options);
    let window = stack.watch_window(&plan).await?;
    let answered_before = world.answered.load(Ordering::Relaxed);
    let served_before = webhook_served.map(|s| s.load(Ordering::Relaxed));
    let sample = load::drive(&plan, workers).await?;
    let facts = window.finish().await?;
    let offers = world.answered.load(Ordering::Relaxed) - answered_before;
    let served = webhook_served
        .zip(served_before)
        .map(|(served, before)| {
            format!(
                "; webhook requests answered (warmup included): {}",
                served.load(Ordering::Relaxed) - before
            )
        })
        .unwrap_or_default();
    load::ensure_progress(name, &sample)?;
    let drained = slots_drained(&mut world.limits.clone(), &world.admin).await;

    let (mut routes, mut hangups): (Vec<u64>, Vec<u64>) = steps
        .lock()
        .map_err(|_| "step latencies poisoned")?
        .iter()
        .filter(|s| s.done >= plan.measure_start && s.done < plan.end)
        .map(|s| (s.route, s.hangup))
        .unzip();
    routes.sort_unstable();
    hangups.sort_unstable();
    let failure = first_failure
        .lock()
        .ok()
        .and_then(|f| f.clone())
        .map(|story| format!("; first failure: {story}"))
        .unwrap_or_default();
    let comms = sample.latencies.len();
    report.row(Row {
        name: name.to_owned(),
        rate: sample.rate(),
        unit: "comms/s",
        p50: sample.percentile(0.50),
        p99: sample.percentile(0.99),
        notes: format!(
            "one communication = Route (new id; {how}; callers rotating over {AGENTS} \
             applications and {AGENTS} auto-answering devices) answered CONNECTED, then \
             Hangup answered ENDED; p50/p99: the whole cycle; route → connected p50 {}, p99 \
             {}; hangup → ended p50 {}, p99 {}; offers the devices accepted (warmup \
             included): {offers} ({}){served}; {drained}; {}; {}; {}; {}; {}{}{failure}",
            millis(percentile(&routes, 0.50)),
            millis(percentile(&routes, 0.99)),
            millis(percentile(&hangups, 0.50)),
            millis(percentile(&hangups, 0.99)),
            if offers >= comms as u64 {
                "at least one per communication"
            } else {
                "FEWER than communications"
            },
            facts.writes_per(&sample, "comm"),
            facts.raft_note(comms, "comm"),
            facts.etcd_note(sample.seconds),
            facts.cpu,
            sample.error_note(),
            facts.server_errors(),
        ),
    });
    Ok((sample, facts))
}

/// A local HTTP/1.1 server answering `POST /hookN` (any method, any body) with
/// [`dial_xml`]`(N)`; it stops when dropped.
struct Webhook {
    addr: SocketAddr,
    served: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl Drop for Webhook {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Webhook {
    async fn start() -> Result<Self> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let served = Arc::new(AtomicU64::new(0));
        let counter = served.clone();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((stream, _)) = listener.accept().await {
                let _ = stream.set_nodelay(true);
                connections.spawn(serve_webhook(stream, counter.clone()));
                // Forget the connections that have ended.
                while connections.try_join_next().is_some() {}
            }
        });
        Ok(Self { addr, served, task })
    }
}

/// Serves one keep-alive connection: request line, headers, a `Content-Length` body; the
/// answer is the XML for the path's agent number, or 404.
async fn serve_webhook(stream: tokio::net::TcpStream, served: Arc<AtomicU64>) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line).await.unwrap_or(0) == 0 {
            return;
        }
        let path = line.split_whitespace().nth(1).unwrap_or("").to_owned();
        let mut length = 0usize;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).await.unwrap_or(0) == 0 {
                return;
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':')
                && name.trim().eq_ignore_ascii_case("content-length")
            {
                length = value.trim().parse().unwrap_or(0);
            }
        }
        let mut body = vec![0; length];
        if reader.read_exact(&mut body).await.is_err() {
            return;
        }
        let agent = path
            .split('?')
            .next()
            .and_then(|p| p.strip_prefix("/hook"))
            .and_then(|n| n.parse::<usize>().ok());
        let (status, reply) = match agent {
            Some(agent) => ("200 OK", dial_xml(agent)),
            None => ("404 Not Found", String::new()),
        };
        let answer = format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {}\r\n\r\n{reply}",
            reply.len()
        );
        if write.write_all(answer.as_bytes()).await.is_err() {
            return;
        }
        served.fetch_add(1, Ordering::Relaxed);
    }
}

async fn set_limit(limits: &mut LimiterServiceClient<Channel>, admin: &Auth) -> Result<()> {
    let limit = lpb::Limit {
        account_id: ACCOUNT.to_owned(),
        resource: COMMUNICATIONS.to_owned(),
        max_in_flight: COMMUNICATIONS_LIMIT,
        shadow: false,
    };
    limits
        .set_limit(admin.request(lpb::SetLimitRequest { limit: Some(limit) }))
        .await
        .map_err(|s| format!("SetLimit {ACCOUNT}/{COMMUNICATIONS}: {}", status_text(&s)))?;
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let usage = usage(limits, admin).await?;
        if usage.limit == COMMUNICATIONS_LIMIT {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the limiter still reports limit {} for {ACCOUNT}/{COMMUNICATIONS} after \
                 {READY_TIMEOUT:?}",
                usage.limit
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn usage(limits: &mut LimiterServiceClient<Channel>, admin: &Auth) -> Result<lpb::Usage> {
    let request = lpb::GetUsageRequest {
        account_id: ACCOUNT.to_owned(),
        resource: COMMUNICATIONS.to_owned(),
    };
    let answer = limits
        .get_usage(admin.request(request))
        .await
        .map_err(|s| format!("GetUsage: {}", status_text(&s)))?;
    Ok(answer.into_inner().usage.unwrap_or_default())
}

/// `communications slots in flight after the run: 0` once the router has released every
/// slot (polled for a bounded time), or what is still held.
async fn slots_drained(limits: &mut LimiterServiceClient<Channel>, admin: &Auth) -> String {
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        match usage(limits, admin).await {
            Ok(usage) if usage.in_flight == 0 => {
                return "communications slots in flight after the run: 0".to_owned();
            }
            Ok(usage) if Instant::now() >= deadline => {
                return format!(
                    "communications slots STILL IN FLIGHT {READY_TIMEOUT:?} after the run: {}",
                    usage.in_flight
                );
            }
            Err(err) if Instant::now() >= deadline => {
                return format!("communications slots after the run unknown: {err}");
            }
            _ => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn put_application(
    router: &mut Router,
    auth: &Auth,
    agent: usize,
    instructions: Instructions,
) -> Result<()> {
    let address = instructions.address(agent);
    let application = match instructions {
        Instructions::Inline => pb::Application {
            address: address.clone(),
            instructions: dial_xml(agent),
            ..Default::default()
        },
        Instructions::Webhook(webhook) => pb::Application {
            address: address.clone(),
            instructions_url: format!("http://{webhook}/hook{agent}"),
            method: pb::HttpMethod::Post as i32,
            ..Default::default()
        },
    };
    router
        .put_application(auth.request(pb::PutApplicationRequest {
            application: Some(application),
        }))
        .await
        .map_err(|s| format!("PutApplication {address}: {}", status_text(&s)))?;
    Ok(())
}

/// The auto-answering devices' tasks; dropping this ends their sessions.
struct Agents(Vec<JoinHandle<()>>);

impl Drop for Agents {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

struct Agent;

impl Agent {
    /// Opens the session of `agent<index>` (device `auto`) and starts its task, which
    /// accepts every offer at once and counts it in `answered`. The task, and the
    /// revision of the device's record.
    async fn open(
        channel: Channel,
        auth: &Auth,
        index: usize,
        answered: Arc<AtomicU64>,
    ) -> Result<(JoinHandle<()>, i64)> {
        let (requests, outbound) = mpsc::channel(64);
        let hello = ppb::ConnectHello {
            identity: format!("agent{index}"),
            device_id: "auto".to_owned(),
            status: ppb::Status::Available as i32,
            ..Default::default()
        };
        requests
            .send(ppb::ConnectRequest {
                kind: Some(ToServer::Hello(hello)),
            })
            .await
            .map_err(|_| "the request stream of a device closed")?;
        let mut client = PresenceServiceClient::new(channel);
        // No deadline: a `grpc-timeout` would end the session.
        let mut inbound = client
            .connect(auth.stream_request(ReceiverStream::new(outbound)))
            .await
            .map_err(|s| format!("Connect agent{index}: {}", status_text(&s)))?
            .into_inner();
        let first = tokio::time::timeout(READY_TIMEOUT, inbound.message())
            .await
            .map_err(|_| format!("Connect agent{index}: no `registered` in time"))?
            .map_err(|s| format!("Connect agent{index}: {}", status_text(&s)))?;
        let revision = match first.and_then(|m| m.kind) {
            Some(FromServer::Registered(registered)) => {
                registered.device.map_or(0, |device| device.revision)
            }
            _ => return Err(format!("Connect agent{index}: no `registered` first").into()),
        };
        let task = tokio::spawn(async move {
            while let Ok(Some(message)) = inbound.message().await {
                if let Some(FromServer::Offer(offer)) = message.kind {
                    let answer = ppb::ConnectAnswer {
                        offer_id: offer.offer_id,
                        accept: true,
                        reject_reason: 0,
                        ..Default::default()
                    };
                    let request = ppb::ConnectRequest {
                        kind: Some(ToServer::Answer(answer)),
                    };
                    if requests.send(request).await.is_err() {
                        return;
                    }
                    answered.fetch_add(1, Ordering::Relaxed);
                }
            }
        });
        Ok((task, revision))
    }
}

/// Polls until presence shows `agent<index>` at `revision` or later.
async fn wait_present(channel: &Channel, auth: &Auth, index: usize, revision: i64) -> Result<()> {
    let mut client = PresenceServiceClient::new(channel.clone());
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let request = ppb::GetPresenceRequest {
            account_id: String::new(),
            identity: format!("agent{index}"),
            min_revision: revision,
        };
        let last = match client.get_presence(auth.request(request)).await {
            Ok(answer) => {
                let present = answer
                    .into_inner()
                    .presence
                    .is_some_and(|p| !p.devices.is_empty());
                if present {
                    return Ok(());
                }
                "no device".to_owned()
            }
            Err(status) => status_text(&status),
        };
        if Instant::now() >= deadline {
            return Err(format!("agent{index} not present after {READY_TIMEOUT:?}: {last}").into());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Routes one probe communication per line until each connects (the router knows the
/// applications and reaches the devices), hanging each up.
async fn wait_routable(router: &Router, auth: &Auth, instructions: Instructions) -> Result<()> {
    let deadline = Instant::now() + READY_TIMEOUT;
    for agent in 0..AGENTS {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let id = format!("CM-probe-{}-{agent}-{attempt}", instructions.tag());
            let last = match communicate(router, auth, instructions, agent, &id).await {
                Ok(_) => break,
                Err(failure) => failure.text,
            };
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} does not connect after {READY_TIMEOUT:?}: {last}",
                    instructions.address(agent)
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// Why a communication failed: a short text for grouping, and its story when it has one.
struct Failure {
    text: String,
    story: Option<String>,
}

impl Failure {
    fn status(call: &str, status: &tonic::Status) -> Self {
        Self {
            text: format!("{call} {}", status_text(status)),
            story: None,
        }
    }
}

fn state_name(state: i32) -> String {
    pb::CommunicationState::try_from(state)
        .map_or_else(|_| state.to_string(), |s| s.as_str_name().to_owned())
}

fn outcome_name(outcome: i32) -> String {
    pb::Outcome::try_from(outcome)
        .map_or_else(|_| outcome.to_string(), |o| o.as_str_name().to_owned())
}

/// Every timeline message joined, bounded.
fn story(comm: &pb::Communication) -> String {
    let text = comm
        .timeline
        .iter()
        .map(|event| event.message.as_str())
        .collect::<Vec<_>>()
        .join(" / ");
    text.chars().take(400).collect()
}

/// Route → CONNECTED → Hangup → ENDED to application `agent` of `instructions` with
/// communication id `id`; the two steps' durations.
async fn communicate(
    router: &Router,
    auth: &Auth,
    instructions: Instructions,
    agent: usize,
    id: &str,
) -> std::result::Result<(Duration, Duration), Failure> {
    let mut client = router.clone();
    let started = Instant::now();
    let route = pb::RouteRequest {
        account_id: String::new(),
        from: "+15550100".to_owned(),
        to: instructions.address(agent),
        channel: String::new(),
        communication_id: id.to_owned(),
        parameters: Default::default(),
    };
    let comm = client
        .route(auth.request(route))
        .await
        .map_err(|s| Failure::status("Route", &s))?
        .into_inner()
        .communication
        .ok_or_else(|| Failure {
            text: "Route answered no communication".to_owned(),
            story: None,
        })?;
    let routed = Instant::now();
    if comm.state != pb::CommunicationState::Connected as i32 {
        return Err(Failure {
            text: format!(
                "Route answered {} / {}",
                state_name(comm.state),
                outcome_name(comm.outcome)
            ),
            story: Some(format!("{id}: {}", story(&comm))),
        });
    }
    let hangup = pb::HangupRequest {
        account_id: String::new(),
        communication_id: id.to_owned(),
        reason: "bench".to_owned(),
    };
    let ended = client
        .hangup(auth.request(hangup))
        .await
        .map_err(|s| Failure::status("Hangup", &s))?
        .into_inner()
        .communication
        .ok_or_else(|| Failure {
            text: "Hangup answered no communication".to_owned(),
            story: None,
        })?;
    if ended.state != pb::CommunicationState::Ended as i32 {
        return Err(Failure {
            text: format!("Hangup answered {}", state_name(ended.state)),
            story: Some(format!("{id}: {}", story(&ended))),
        });
    }
    Ok((routed - started, routed.elapsed()))
}

/// The two steps of one communication, and when it completed.
struct Steps {
    done: Instant,
    route: u64,
    hangup: u64,
}

struct CommWorker {
    client: Router,
    auth: Auth,
    instructions: Instructions,
    caller: usize,
    sequence: u64,
    steps: Arc<Mutex<Vec<Steps>>>,
    first_failure: Arc<Mutex<Option<String>>>,
}

impl Worker for CommWorker {
    async fn call(&mut self) -> std::result::Result<(), String> {
        self.sequence += 1;
        let id = format!(
            "CM-{}-{}-{}",
            self.instructions.tag(),
            self.caller,
            self.sequence
        );
        let agent = (self.caller + self.sequence as usize) % AGENTS;
        match communicate(&self.client, &self.auth, self.instructions, agent, &id).await {
            Ok((route, hangup)) => {
                if let Ok(mut steps) = self.steps.lock() {
                    steps.push(Steps {
                        done: Instant::now(),
                        route: route.as_nanos() as u64,
                        hangup: hangup.as_nanos() as u64,
                    });
                }
                Ok(())
            }
            Err(failure) => {
                if let (Some(story), Ok(mut first)) = (failure.story, self.first_failure.lock())
                    && first.is_none()
                {
                    *first = Some(story);
                }
                Err(failure.text)
            }
        }
    }
}

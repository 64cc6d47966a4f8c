//! Router load: communications routed end to end (Route → CONNECTED → Hangup → ENDED) to
//! auto-answering devices, and some to a device that never answers (the Dial times out).
//! Every Dial has a `timeLimit`, so a communication whose caller lost track of it (a Route
//! answer lost in a fault, a Hangup that never got through) still ends by itself.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use plumbing::auth::Scope;
use proto::router::v1 as rpb;
use proto::router::v1::router_service_client::RouterServiceClient;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tonic::Code;
use tonic::transport::Channel;

use super::fleet::Fleet;
use super::pace::{self, Tally};
use super::{READY_TIMEOUT, Result, call, limiter, presence, status_text, token};

/// Communications routed per second (to devices that answer), and to the silent one.
const COMMUNICATIONS_PER_S: f64 = 4.0;
const UNANSWERED_PER_S: f64 = 0.5;
/// Auto-answering devices `agent0` … (one each, on alternate presence replicas), each
/// dialled by application `line<n>`.
const AGENTS: usize = 4;
/// The Dial's `timeLimit`: the longest a connected communication lasts, seconds.
const TIME_LIMIT: u32 = 20;
/// Deadline of one Route (the devices answer at once; the silent Dial times out in 1 s).
const ROUTE_TIMEOUT: Duration = Duration::from_secs(15);
/// Hangup attempts before the caller gives up (the `timeLimit` ends it then).
const HANGUP_ATTEMPTS: usize = 6;

/// The applications and devices the communications need; dropping it ends the devices'
/// sessions.
pub struct World {
    routers: Vec<SocketAddr>,
    devices: Vec<JoinHandle<()>>,
}

impl Drop for World {
    fn drop(&mut self) {
        for device in &self.devices {
            device.abort();
        }
    }
}

impl World {
    /// Sets the limits, puts the applications, connects the devices, and routes one
    /// communication per application through each router until it connects.
    pub async fn setup(fleet: &Fleet) -> Result<Self> {
        limiter::set_limits(fleet).await?;
        let routers = fleet.addrs("router-svc");
        let presences = fleet.addrs("presence-svc");
        let admin = token(&[Scope::Admin]);
        for agent in 0..AGENTS {
            let xml = format!(
                "<Response><Dial timeout=\"10\" timeLimit=\"{TIME_LIMIT}\"><Client>agent{agent}\
                 </Client></Dial></Response>"
            );
            put_application(routers[0], &admin, &format!("line{agent}"), &xml).await?;
        }
        let silent = "<Response><Dial timeout=\"1\"><Client>silent</Client></Dial></Response>";
        put_application(routers[0], &admin, "silent", silent).await?;
        let mut devices: Vec<JoinHandle<()>> = (0..AGENTS)
            .map(|agent| {
                let addr = presences[agent % presences.len()];
                presence::device(addr, format!("agent{agent}"), "auto", true)
            })
            .collect();
        devices.push(presence::device(
            presences[0],
            "silent".to_owned(),
            "mute",
            false,
        ));
        let world = Self { routers, devices };
        world.wait_routable(&admin).await?;
        Ok(world)
    }

    async fn wait_routable(&self, admin: &str) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        for (r, router) in self.routers.iter().enumerate() {
            for agent in 0..AGENTS {
                for attempt in 0.. {
                    let id = format!("probe-{r}-{agent}-{attempt}");
                    match communicate(*router, admin, &format!("line{agent}"), &id, 0).await {
                        Ok(()) => break,
                        Err(failure) if Instant::now() >= deadline => {
                            return Err(format!("line{agent} does not connect: {failure}").into());
                        }
                        Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                    }
                }
            }
        }
        Ok(())
    }
}

fn client(addr: SocketAddr) -> std::result::Result<RouterServiceClient<Channel>, String> {
    plumbing::client::channel(&addr.to_string())
        .map(RouterServiceClient::new)
        .map_err(|err| format!("channel: {err}"))
}

async fn put_application(router: SocketAddr, admin: &str, address: &str, xml: &str) -> Result<()> {
    let application = rpb::Application {
        account_id: super::ACCOUNT.to_owned(),
        address: address.to_owned(),
        instructions: xml.to_owned(),
        ..Default::default()
    };
    let deadline = Instant::now() + READY_TIMEOUT;
    loop {
        let request = rpb::PutApplicationRequest {
            application: Some(application.clone()),
        };
        match client(router)?.put_application(call(admin, request)).await {
            Ok(_) => return Ok(()),
            Err(status) if Instant::now() >= deadline => {
                return Err(status_text(&format!("PutApplication {address}"), &status).into());
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}

/// Communications to the answering devices through both routers in turn, each hung up
/// after 0–400 ms connected.
pub fn communications(world: &World, end: Instant) -> JoinHandle<Tally> {
    let routers = world.routers.clone();
    let caller = Arc::new(token(&[Scope::RouterRoute]));
    pace::every("communication", COMMUNICATIONS_PER_S, end, move |n| {
        let (router, caller) = (routers[n as usize % routers.len()], caller.clone());
        async move {
            let to = format!("line{}", n as usize % AGENTS);
            communicate(router, &caller, &to, &format!("CM-{n}"), n % 3 * 200).await
        }
    })
}

/// Communications to the device that never answers: each must end NO_ANSWER by itself.
pub fn unanswered(world: &World, end: Instant) -> JoinHandle<Tally> {
    let routers = world.routers.clone();
    let caller = Arc::new(token(&[Scope::RouterRoute]));
    pace::every("unanswered", UNANSWERED_PER_S, end, move |n| {
        let (router, caller) = (routers[n as usize % routers.len()], caller.clone());
        async move {
            let id = format!("NA-{n}");
            match route(router, &caller, "silent", &id).await {
                Ok(comm) if comm.outcome == rpb::Outcome::NoAnswer as i32 => Ok(()),
                Ok(comm) => {
                    hang_up(router, &caller, &id).await?;
                    Err(format!("Route answered {}", summary(&comm)))
                }
                Err(failure) => {
                    hang_up(router, &caller, &id).await?;
                    Err(failure)
                }
            }
        }
    })
}

/// Route `id` to `to`; once CONNECTED, talk `talk_ms`, then Hangup until ENDED. A failed
/// Route is hung up too (it may have created the communication).
async fn communicate(
    router: SocketAddr,
    caller: &str,
    to: &str,
    id: &str,
    talk_ms: u64,
) -> std::result::Result<(), String> {
    let comm = match route(router, caller, to, id).await {
        Ok(comm) => comm,
        Err(failure) => {
            hang_up(router, caller, id).await?;
            return Err(failure);
        }
    };
    if comm.state != rpb::CommunicationState::Connected as i32 {
        return Err(format!("Route answered {}", summary(&comm)));
    }
    tokio::time::sleep(Duration::from_millis(talk_ms)).await;
    hang_up(router, caller, id).await
}

async fn route(
    router: SocketAddr,
    caller: &str,
    to: &str,
    id: &str,
) -> std::result::Result<rpb::Communication, String> {
    let request = rpb::RouteRequest {
        from: "+15550100".to_owned(),
        to: to.to_owned(),
        communication_id: id.to_owned(),
        ..Default::default()
    };
    let mut request = call(caller, request);
    request.set_timeout(ROUTE_TIMEOUT);
    let answer = client(router)?
        .route(request)
        .await
        .map_err(|s| status_text("Route", &s))?;
    answer
        .into_inner()
        .communication
        .ok_or_else(|| "Route answered no communication".to_owned())
}

/// Hangup of `id` until it answers ENDED (or NOT_FOUND: it was never created).
async fn hang_up(router: SocketAddr, caller: &str, id: &str) -> std::result::Result<(), String> {
    let mut router = client(router)?;
    let mut failure = String::new();
    for _ in 0..HANGUP_ATTEMPTS {
        let request = rpb::HangupRequest {
            communication_id: id.to_owned(),
            reason: "soak".to_owned(),
            ..Default::default()
        };
        match router.hangup(call(caller, request)).await {
            Ok(answer) => {
                let ended = answer
                    .get_ref()
                    .communication
                    .as_ref()
                    .is_some_and(|c| c.state == rpb::CommunicationState::Ended as i32);
                if ended {
                    return Ok(());
                }
                failure = "Hangup answered a communication not ENDED".to_owned();
            }
            Err(status) if status.code() == Code::NotFound => return Ok(()),
            Err(status) => failure = status_text("Hangup", &status),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(failure)
}

/// `ENDED OUTCOME_FAILED (last timeline message)`, for a communication that did not go as
/// planned.
fn summary(comm: &rpb::Communication) -> String {
    let state = rpb::CommunicationState::try_from(comm.state)
        .map_or_else(|_| comm.state.to_string(), |s| s.as_str_name().to_owned());
    let outcome = rpb::Outcome::try_from(comm.outcome)
        .map_or_else(|_| comm.outcome.to_string(), |o| o.as_str_name().to_owned());
    let last: String = comm
        .timeline
        .last()
        .map(|event| event.message.chars().take(80).collect())
        .unwrap_or_default();
    format!("{state} {outcome} ({last})")
}

/// Communications still running (entries of the routers' owned index), polled until there
/// are none or `within` has passed; how many were left, and after how long they were 0.
pub async fn await_settled(fleet: &Fleet, within: Duration) -> (Option<u64>, Option<Duration>) {
    let started = Instant::now();
    let index = format!("{}/router/owned/", fleet.prefix);
    let mut running = None;
    while started.elapsed() < within {
        if let Ok(mut etcd) = fleet.etcd().await {
            let options = etcd_client::GetOptions::new()
                .with_prefix()
                .with_count_only();
            if let Ok(answer) = etcd.get(index.as_str(), Some(options)).await {
                running = Some(answer.count() as u64);
            }
        }
        if running == Some(0) {
            return (running, Some(started.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    (running, None)
}

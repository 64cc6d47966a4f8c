//! The soak's world: a 3-member etcd cluster and two replicas of each service, started from
//! one folder of binaries, each process's log in a temporary folder (kept when something
//! went wrong), every child killed when its handle drops.
//!
//! [`crate::ServiceProcess`] finds its binary next to a test executable and hides its pid;
//! the soak runs release binaries from its own folder and samples each process's memory,
//! so it keeps its own handles.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::sync::Mutex as AsyncMutex;
use tokio::time::Instant;

use super::{Options, Result};
use crate::{EtcdCluster, PLATFORM_KEY_ID, PLATFORM_SECRET, free_port, unique_prefix};

/// `--replica-ttl` of every service, seconds (as the harness uses).
pub const REPLICA_TTL: u64 = 5;
/// How long a service may take to answer its health check as SERVING.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a SIGTERMed service may take to exit (its `--drain-timeout` is 5 s).
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// The cluster and the service replicas.
pub struct Fleet {
    /// The etcd cluster; the fault schedule takes it to kill and freeze members.
    pub cluster: AsyncMutex<EtcdCluster>,
    endpoints: Vec<String>,
    /// The key prefix of every service of the soak.
    pub prefix: String,
    /// Each replica's service name (fixed) and its process (replaced on restart).
    replicas: Vec<(&'static str, AsyncMutex<Replica>)>,
    addrs: BTreeMap<&'static str, Vec<SocketAddr>>,
    /// What the RSS sampler reads: each replica's current process.
    processes: Arc<Mutex<Vec<Process>>>,
    /// The folder of the services' logs, deleted at the end unless kept.
    logs: Mutex<Option<tempfile::TempDir>>,
    logs_path: PathBuf,
}

/// One replica's current process, as the RSS sampler sees it.
#[derive(Debug, Clone)]
pub struct Process {
    /// `limiter-svc#2`.
    pub label: String,
    /// `limiter-svc`.
    pub service: &'static str,
    /// Its pid (None if the OS did not give one).
    pub pid: Option<u32>,
    /// 0 for the first process, +1 per restart.
    pub incarnation: u32,
    /// When this process started.
    pub since: Instant,
}

/// How a replica is started; the same on every restart (same address, same flags).
struct Spec {
    index: usize,
    service: &'static str,
    label: String,
    addr: SocketAddr,
    args: Vec<String>,
    binary: PathBuf,
    log: PathBuf,
}

struct Replica {
    spec: Spec,
    child: Child,
    incarnation: u32,
    /// Stopped on purpose (SIGTERM) before the rest.
    stopped: bool,
}

impl Fleet {
    /// Starts the cluster, then limiter-svc ×2, presence-svc ×2 and router-svc ×2 (each
    /// router talking to one presence replica and to both limiters), waiting until every
    /// one is SERVING.
    pub async fn start(options: &Options) -> Result<Self> {
        for service in ["limiter-svc", "presence-svc", "router-svc"] {
            let path = options.binaries.join(service);
            if !path.exists() {
                return Err(format!(
                    "{} is not built (cargo build --workspace --bins, --release for scripts/soak)",
                    path.display()
                )
                .into());
            }
        }
        // The harness panics when etcd does not come up; turn that into an error.
        let cluster = tokio::spawn(EtcdCluster::start(3))
            .await
            .map_err(|err| format!("the etcd cluster did not start: {err}"))?;
        let endpoints = cluster.endpoints();
        let logs = tempfile::Builder::new()
            .prefix("switchboard-soak-")
            .tempdir()?;
        let mut fleet = Self {
            cluster: AsyncMutex::new(cluster),
            endpoints,
            prefix: unique_prefix(),
            replicas: Vec::new(),
            addrs: BTreeMap::new(),
            processes: Arc::default(),
            logs_path: logs.path().to_path_buf(),
            logs: Mutex::new(Some(logs)),
        };
        let plain = [Vec::new(), Vec::new()];
        let limiters = fleet.start_each(options, "limiter-svc", &plain).await?;
        let presences = fleet.start_each(options, "presence-svc", &plain).await?;
        let limiter_list = limiters
            .iter()
            .map(SocketAddr::to_string)
            .collect::<Vec<_>>()
            .join(",");
        let retention = format!("{}s", options.retention.as_secs().max(1));
        let per_router = |i: usize| {
            vec![
                "--presence".to_owned(),
                presences[i % presences.len()].to_string(),
                "--limiter".to_owned(),
                limiter_list.clone(),
                "--communication-retention".to_owned(),
                retention.clone(),
            ]
        };
        let routers = [per_router(0), per_router(1)];
        fleet.start_each(options, "router-svc", &routers).await?;
        Ok(fleet)
    }

    /// Starts one replica of `service` per entry of `args` (together, as a deployment's
    /// replicas join), then waits for each to serve.
    async fn start_each(
        &mut self,
        options: &Options,
        service: &'static str,
        args: &[Vec<String>],
    ) -> Result<Vec<SocketAddr>> {
        let mut started = Vec::new();
        for (n, args) in args.iter().enumerate() {
            let spec = Spec {
                index: self.replicas.len() + n,
                service,
                label: format!("{service}#{}", n + 1),
                addr: ([127, 0, 0, 1], free_port()).into(),
                args: args.clone(),
                binary: options.binaries.join(service),
                log: self.logs_path.join(format!("{service}-{}.log", n + 1)),
            };
            let child = spec.spawn(&self.endpoints, &self.prefix)?;
            started.push(Replica {
                spec,
                child,
                incarnation: 0,
                stopped: false,
            });
        }
        let mut addrs = Vec::new();
        for mut replica in started {
            replica.wait_serving().await?;
            self.track(&replica);
            addrs.push(replica.spec.addr);
            self.replicas.push((service, AsyncMutex::new(replica)));
        }
        self.addrs.insert(service, addrs.clone());
        Ok(addrs)
    }

    fn track(&self, replica: &Replica) {
        let process = Process {
            label: replica.spec.label.clone(),
            service: replica.spec.service,
            pid: replica.child.id(),
            incarnation: replica.incarnation,
            since: Instant::now(),
        };
        let mut processes = self
            .processes
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(slot) = processes.get_mut(replica.spec.index) {
            *slot = process;
        } else {
            processes.push(process);
        }
    }

    /// The addresses of `service`'s replicas, in start order (they keep them on restart).
    pub fn addrs(&self, service: &str) -> Vec<SocketAddr> {
        self.addrs.get(service).cloned().unwrap_or_default()
    }

    /// Every replica's current process.
    pub fn processes(&self) -> Vec<Process> {
        self.processes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// A client of the cluster (every member's endpoint).
    pub async fn etcd(&self) -> Result<etcd_client::Client> {
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(super::CALL_TIMEOUT);
        Ok(etcd_client::Client::connect(&self.endpoints, Some(options)).await?)
    }

    /// The cluster's current revision.
    pub async fn etcd_revision(&self) -> Result<i64> {
        let answer = self.etcd().await?.get("/soak-revision-probe", None).await?;
        answer
            .header()
            .map(|h| h.revision())
            .ok_or_else(|| "etcd answered without a header".into())
    }

    /// SIGKILLs replica `n` (0-based) of `service`, leaves it down for `down_for`, starts it
    /// again on the same address and waits until it serves. Describes what happened.
    pub async fn kill_and_restart(
        &self,
        service: &str,
        n: usize,
        down_for: Duration,
    ) -> Result<String> {
        let Some((_, replica)) = self.replicas.iter().filter(|r| r.0 == service).nth(n) else {
            return Err(format!("there is no replica {n} of {service}").into());
        };
        let mut replica = replica.lock().await;
        let _ = replica.child.kill().await;
        tokio::time::sleep(down_for).await;
        replica.incarnation += 1;
        replica.child = replica.spec.spawn(&self.endpoints, &self.prefix)?;
        let restarted = Instant::now();
        replica.wait_serving().await?;
        self.track(&replica);
        Ok(format!(
            "{} SIGKILLed, restarted after {down_for:?}, serving {:.1} s later",
            replica.spec.label,
            restarted.elapsed().as_secs_f64()
        ))
    }

    /// The replicas whose process exited without being told to (a crash is a finding).
    pub async fn unexpected_exits(&self) -> Vec<String> {
        let mut exited = Vec::new();
        for (_, replica) in &self.replicas {
            let mut replica = replica.lock().await;
            if let Ok(Some(status)) = replica.child.try_wait() {
                exited.push(format!(
                    "{} exited during the soak ({status})",
                    replica.spec.label
                ));
            }
        }
        exited
    }

    /// SIGTERMs replica `n` (0-based) of `service` and waits for its exit; a remark unless
    /// it exited 0 in time.
    pub async fn stop_replica(&self, service: &str, n: usize) -> Option<String> {
        let (_, replica) = self.replicas.iter().filter(|r| r.0 == service).nth(n)?;
        let mut replica = replica.lock().await;
        replica.stopped = true;
        replica.terminate().await
    }

    /// SIGTERMs every replica not stopped yet, routers first and limiters last, and waits
    /// for each to exit (SIGKILL after [`STOP_TIMEOUT`]); remarks on those that did not
    /// stop cleanly.
    pub async fn stop_services(&self) -> Vec<String> {
        let mut remarks = Vec::new();
        for (_, replica) in self.replicas.iter().rev() {
            let mut replica = replica.lock().await;
            if replica.stopped {
                continue;
            }
            replica.stopped = true;
            if let Some(remark) = replica.terminate().await {
                remarks.push(remark);
            }
        }
        remarks
    }

    /// Remarks on the services' logs (ERROR lines and panics); the logs are kept, and their
    /// folder named, when there are any or when `keep` says the soak failed.
    pub fn scan_logs(&self, keep: bool) -> Vec<String> {
        let mut remarks = Vec::new();
        let mut keep = keep;
        for (_, replica) in &self.replicas {
            // Nothing else holds a replica once the soak has ended.
            let Ok(replica) = replica.try_lock() else {
                continue;
            };
            let text = std::fs::read_to_string(&replica.spec.log).unwrap_or_default();
            let errors: Vec<&str> = text
                .lines()
                .filter_map(|l| {
                    l.find(" ERROR ")
                        .or_else(|| l.find("panicked"))
                        .map(|at| &l[at..])
                })
                .collect();
            if !errors.is_empty() {
                keep = true;
                let mut distinct: Vec<String> = errors
                    .iter()
                    .map(|e| e.trim().chars().take(160).collect())
                    .collect();
                distinct.sort_unstable();
                distinct.dedup();
                distinct.truncate(3);
                remarks.push(format!(
                    "{} logged {} ERROR lines: {}",
                    replica.spec.label,
                    errors.len(),
                    distinct.join(" / ")
                ));
            }
        }
        let mut logs = self.logs.lock().unwrap_or_else(PoisonError::into_inner);
        if keep && let Some(dir) = logs.take() {
            remarks.push(format!("service logs kept in {}", dir.keep().display()));
        }
        remarks
    }
}

impl Spec {
    fn spawn(&self, endpoints: &[String], prefix: &str) -> Result<Child> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = Command::new(&self.binary)
            .arg("--listen")
            .arg(self.addr.to_string())
            .arg("--etcd")
            .arg(endpoints.join(","))
            .arg("--etcd-prefix")
            .arg(prefix)
            .arg("--platform-key-id")
            .arg(PLATFORM_KEY_ID)
            .arg("--replica-ttl")
            .arg(REPLICA_TTL.to_string())
            .arg("--drain-timeout")
            .arg("5s")
            .args(&self.args)
            // The secret goes through the environment, never the command line.
            .env("SWITCHBOARD_PLATFORM_SECRET", PLATFORM_SECRET)
            .env("RUST_LOG", "warn")
            .env("NO_COLOR", "1")
            .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
            .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .map_err(|err| format!("cannot start {}: {err}", self.binary.display()))?;
        Ok(child)
    }
}

impl Replica {
    async fn wait_serving(&mut self) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                let (label, tail) = (&self.spec.label, tail(&self.spec.log));
                return Err(format!(
                    "{label} exited before serving ({status}); its log ends:\n{tail}"
                )
                .into());
            }
            if serving(self.spec.addr).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} at {} not SERVING after {START_TIMEOUT:?}; its log ends:\n{}",
                    self.spec.label,
                    self.spec.addr,
                    tail(&self.spec.log)
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERM, then the exit status; a remark unless it exited 0 in time.
    async fn terminate(&mut self) -> Option<String> {
        let label = &self.spec.label;
        if let Ok(Some(status)) = self.child.try_wait() {
            return Some(format!("{label} had already exited ({status})"));
        }
        let pid = self.child.id()?.to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status().await;
        match tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await {
            Ok(Ok(status)) if status.success() => None,
            Ok(Ok(status)) => Some(format!("{label} exited with {status} on SIGTERM")),
            Ok(Err(err)) => Some(format!("{label}: waiting for its exit failed: {err}")),
            Err(_) => {
                let _ = self.child.kill().await;
                Some(format!(
                    "{label} did not exit within {STOP_TIMEOUT:?} of SIGTERM (SIGKILLed)"
                ))
            }
        }
    }
}

/// Whether `addr` answers a gRPC health check with SERVING within a second.
async fn serving(addr: SocketAddr) -> bool {
    use tonic_health::pb::health_check_response::ServingStatus;
    let Ok(channel) = plumbing::client::channel(&addr.to_string()) else {
        return false;
    };
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let mut request = tonic::Request::new(tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    });
    request.set_timeout(Duration::from_secs(1));
    let answer = tokio::time::timeout(Duration::from_secs(2), health.check(request)).await;
    matches!(answer, Ok(Ok(answer)) if answer.get_ref().status == ServingStatus::Serving as i32)
}

/// The last lines of a log, for start-up errors.
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(10)..].join("\n")
}

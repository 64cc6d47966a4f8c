//! The world a scenario measures: etcd with fsync on, and release service binaries.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use integration::{Etcd, PLATFORM_KEY_ID, PLATFORM_SECRET, free_port, unique_prefix};
use plumbing::tls::ClientTls;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::time::Instant;
use tonic::transport::Channel;

use super::load::{CpuSnapshot, Plan, Sample};
use super::{Options, Result, progress, sys};

/// How long a service may take to answer its health check as SERVING.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Bound on one etcd compaction or defragmentation.
const COMPACT_TIMEOUT: Duration = Duration::from_secs(60);
/// `--replica-ttl` of every service.
const REPLICA_TTL: &str = "5";

/// etcd and the services started on it; everything dies with it.
#[derive(Debug)]
pub struct Stack {
    /// The etcd.
    pub etcd: Etcd,
    /// Its process id, for CPU accounting (None if it could not be found).
    pub etcd_pid: Option<u32>,
    /// The key prefix every service of this stack uses.
    pub prefix: String,
    /// The services, in start order.
    pub services: Vec<Service>,
    logs: tempfile::TempDir,
    ticks_per_second: f64,
    /// What clients of the services use (plain text unless the run is over TLS).
    tls: ClientTls,
    /// The TLS flags every service is started with.
    tls_args: Vec<String>,
}

/// One service process.
#[derive(Debug)]
pub struct Service {
    /// Binary name, e.g. `limiter-svc`.
    pub name: String,
    /// `name#n`, for reports.
    pub label: String,
    /// Where it listens.
    pub addr: SocketAddr,
    /// Where it serves Prometheus metrics (`--metrics-listen`).
    pub metrics: SocketAddr,
    /// Its process id.
    pub pid: Option<u32>,
    log: PathBuf,
    child: Child,
}

impl Stack {
    /// Starts a single-member etcd with fsync on; the services started later serve TLS
    /// when `options` say so.
    pub async fn start(options: &Options) -> Result<Self> {
        let (tls, tls_args) = match &options.tls {
            None => (ClientTls::plain(), Vec::new()),
            Some(files) => {
                let flags = [
                    ("--tls-cert", &files.cert),
                    ("--tls-key", &files.key),
                    ("--tls-ca", &files.ca),
                ];
                let args = flags
                    .into_iter()
                    .flat_map(|(flag, path)| [flag.to_owned(), path.display().to_string()])
                    .collect();
                (ClientTls::from_files(&files.ca, None)?, args)
            }
        };
        let binary = Etcd::binary();
        if !binary.exists() {
            return Err(format!(
                "{} not found (install etcd-server, or set SWITCHBOARD_TEST_ETCD)",
                binary.display()
            )
            .into());
        }
        let before = sys::children_named("etcd");
        // The harness panics when etcd does not come up; turn that into an error.
        let etcd = tokio::spawn(Etcd::start_with(true))
            .await
            .map_err(|err| format!("etcd did not start: {}", panic_text(err)))?;
        let etcd_pid = sys::children_named("etcd")
            .into_iter()
            .find(|pid| !before.contains(pid));
        let logs = tempfile::Builder::new()
            .prefix("switchboard-bench-")
            .tempdir()?;
        Ok(Self {
            etcd,
            etcd_pid,
            prefix: unique_prefix(),
            services: Vec::new(),
            logs,
            ticks_per_second: sys::ticks_per_second(),
            tls,
            tls_args,
        })
    }

    /// Starts `count` processes of the release binary `name` at once (so that replicas
    /// join together, as a deployment's replicas do) and waits until each is SERVING.
    pub async fn start_services(
        &mut self,
        name: &str,
        count: usize,
        args: &[&str],
    ) -> Result<Vec<SocketAddr>> {
        let binary = binary(name)?;
        let first = self.services.len();
        for _ in 0..count {
            let index = self.services.len() + 1;
            let label = format!("{name}#{index}");
            let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
            let metrics: SocketAddr = ([127, 0, 0, 1], free_port()).into();
            let log = self.logs.path().join(format!("{name}-{index}.log"));
            let file = std::fs::File::create(&log)?;
            let child = Command::new(&binary)
                .arg("--listen")
                .arg(addr.to_string())
                .arg("--etcd")
                .arg(&self.etcd.endpoint)
                .arg("--etcd-prefix")
                .arg(&self.prefix)
                .arg("--platform-key-id")
                .arg(PLATFORM_KEY_ID)
                .arg("--replica-ttl")
                .arg(REPLICA_TTL)
                .arg("--metrics-listen")
                .arg(metrics.to_string())
                .args(&self.tls_args)
                .args(args)
                .env("SWITCHBOARD_PLATFORM_SECRET", PLATFORM_SECRET)
                .env("RUST_LOG", "warn")
                .env("NO_COLOR", "1")
                .env_remove("OTEL_EXPORTER_OTLP_ENDPOINT")
                .env_remove("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                .stdin(Stdio::null())
                .stdout(file.try_clone()?)
                .stderr(file)
                .kill_on_drop(true)
                .spawn()
                .map_err(|err| format!("cannot start {}: {err}", binary.display()))?;
            self.services.push(Service {
                name: name.to_owned(),
                label,
                addr,
                metrics,
                pid: child.id(),
                log,
                child,
            });
        }
        let mut addrs = Vec::new();
        for service in &mut self.services[first..] {
            service.wait_serving(&self.tls).await?;
            addrs.push(service.addr);
        }
        Ok(addrs)
    }

    /// A gRPC channel to the service at `addr` (lazy: it connects on first use), over TLS
    /// when the run is.
    pub fn channel(&self, addr: SocketAddr) -> Result<Channel> {
        Ok(plumbing::client::channel_with(
            &addr.to_string(),
            &self.tls,
        )?)
    }

    /// A client of this stack's etcd.
    pub async fn etcd_client(&self) -> Result<etcd_client::Client> {
        let options = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_timeout(super::OP_TIMEOUT);
        Ok(etcd_client::Client::connect([self.etcd.endpoint.as_str()], Some(options)).await?)
    }

    /// The current etcd revision (from the header of a linearizable get of one key).
    pub async fn etcd_revision(client: &mut etcd_client::Client) -> Result<i64> {
        let answer = tokio::time::timeout(super::OP_TIMEOUT, client.get("/bench-revision", None))
            .await
            .map_err(|_| "etcd did not answer a get within the deadline")??;
        answer
            .header()
            .map(|h| h.revision())
            .ok_or_else(|| "etcd answered without a header".into())
    }

    /// What clients of the services use (plain text unless the run is over TLS).
    pub fn client_tls(&self) -> &ClientTls {
        &self.tls
    }

    /// The value of the gauge `metric` (series summed, labels ignored) on each service
    /// named `service`, in start order, scraped now; `None` for a service that could not
    /// be scraped or does not export it.
    pub async fn gauge(&self, service: &str, metric: &str) -> Vec<Option<f64>> {
        let mut values = Vec::new();
        for service in self.services.iter().filter(|s| s.name == service) {
            let value = scrape(service.metrics).await.and_then(|metrics| {
                let mut found = None;
                for (series, value) in &metrics {
                    if series.split('{').next() == Some(metric) {
                        *found.get_or_insert(0.0) += value;
                    }
                }
                found
            });
            values.push(value);
        }
        values
    }

    /// Compacts etcd's history up to the current revision (physically: the compaction has
    /// finished when this returns) and defragments its database, so that what one row wrote
    /// does not slow the next. Returns `compacted to revision N, db 1.2 → 0.4 MiB`.
    pub async fn compact_and_defrag(&self) -> Result<String> {
        let mut client = self.etcd_client().await?;
        let revision = Self::etcd_revision(&mut client).await?;
        let before = Self::db_size(&mut client).await;
        let compact = client.compact(
            revision,
            Some(etcd_client::CompactionOptions::new().with_physical()),
        );
        match tokio::time::timeout(COMPACT_TIMEOUT, compact).await {
            Err(_) => return Err("etcd did not compact within the deadline".into()),
            // Nothing was written since the last compaction: nothing to do.
            Ok(Err(err)) if err.to_string().contains("compacted") => {}
            Ok(Err(err)) => return Err(format!("etcd compact: {err}").into()),
            Ok(Ok(_)) => {}
        }
        tokio::time::timeout(COMPACT_TIMEOUT, client.defragment())
            .await
            .map_err(|_| "etcd did not defragment within the deadline")?
            .map_err(|err| format!("etcd defragment: {err}"))?;
        let after = Self::db_size(&mut client).await;
        let mib = |size: Option<i64>| {
            size.map_or_else(
                || "?".to_owned(),
                |bytes| format!("{:.1}", bytes as f64 / 1024.0 / 1024.0),
            )
        };
        Ok(format!(
            "compacted to revision {revision}, db {} → {} MiB",
            mib(before),
            mib(after)
        ))
    }

    async fn db_size(client: &mut etcd_client::Client) -> Option<i64> {
        tokio::time::timeout(super::OP_TIMEOUT, client.status())
            .await
            .ok()?
            .ok()
            .map(|status| status.db_size())
    }

    /// Every process of the run with a label for CPU accounting (replicas of one binary
    /// share a label, so their CPU adds up).
    fn processes(&self) -> Vec<(String, Option<u32>)> {
        let mut processes = vec![("bench".to_owned(), Some(std::process::id()))];
        for service in &self.services {
            processes.push((service.name.clone(), service.pid));
        }
        processes.push(("etcd".to_owned(), self.etcd_pid));
        processes
    }

    /// What [`Stack::probe`] needs, detached from the stack (to run on another task).
    fn prober(&self) -> Prober {
        let mut endpoints: Vec<SocketAddr> = self.services.iter().map(|s| s.metrics).collect();
        // etcd serves its own metrics (`etcd_*`, e.g. WAL fsync latency) on its client URL.
        if let Some(etcd) = self
            .etcd
            .endpoint
            .strip_prefix("http://")
            .and_then(|a| a.parse().ok())
        {
            endpoints.push(etcd);
        }
        Prober {
            processes: self.processes(),
            endpoints,
        }
    }

    /// Starts watching the measured window of `plan`: etcd revision and CPU times at its
    /// start and end.
    pub async fn watch_window(&self, plan: &Plan) -> Result<Window> {
        self.watch_window_with(plan, &[]).await
    }

    /// As [`Stack::watch_window`], also accounting the CPU of `extra` processes (label,
    /// pid) that are not the stack's own (e.g. a baseline's server).
    pub async fn watch_window_with(
        &self,
        plan: &Plan,
        extra: &[(String, Option<u32>)],
    ) -> Result<Window> {
        let client = self.etcd_client().await?;
        let mut prober = self.prober();
        prober.processes.extend(extra.iter().cloned());
        let handle = plan.probe(move || {
            let client = client.clone();
            let prober = prober.clone();
            async move { prober.probe(client).await }
        });
        Ok(Window {
            handle,
            seconds: plan.seconds(),
            ticks_per_second: self.ticks_per_second,
        })
    }

    /// Opens a window whose end is not known in advance (etcd revision, CPU times and
    /// metrics now); [`Stack::facts_since`] closes it.
    pub async fn window_start(&self) -> Result<WindowStart> {
        let probe = self.prober().probe(self.etcd_client().await?).await;
        Ok(WindowStart {
            at: Instant::now(),
            probe,
        })
    }

    /// What happened since `start`, as for a measured window.
    pub async fn facts_since(&self, start: WindowStart) -> Result<WindowFacts> {
        let seconds = start.at.elapsed().as_secs_f64();
        let last = self.prober().probe(self.etcd_client().await?).await;
        facts(start.probe, last, seconds, self.ticks_per_second)
    }

    /// Stops every process and returns the summary of the services' logs (warnings and
    /// errors they printed). The logs are kept (and their folder named) when any service
    /// exited on its own or printed an error.
    pub async fn shutdown(mut self) -> Vec<String> {
        let mut summary = Vec::new();
        let mut keep = false;
        for service in &mut self.services {
            let exited = service.child.try_wait().ok().flatten();
            if let Some(status) = exited {
                keep = true;
                summary.push(format!(
                    "{} exited during the run ({status})",
                    service.label
                ));
            }
            let _ = service.child.kill().await;
            let (warns, errors, samples) = scan_log(&service.log);
            if warns + errors > 0 {
                keep |= errors > 0;
                summary.push(format!(
                    "{} logged {warns} WARN and {errors} ERROR lines",
                    service.label
                ));
                summary.extend(samples.into_iter().map(|line| format!("    {line}")));
            }
        }
        self.etcd.kill().await;
        if keep {
            let path = self.logs.keep();
            summary.push(format!("service logs kept in {}", path.display()));
        }
        summary
    }
}

/// etcd revision, CPU times and metrics at one instant.
type Probe = (Option<i64>, CpuSnapshot, Metrics);

/// The start of a window opened by [`Stack::window_start`].
#[derive(Debug)]
pub struct WindowStart {
    at: Instant,
    probe: Probe,
}

#[derive(Debug, Clone)]
struct Prober {
    processes: Vec<(String, Option<u32>)>,
    endpoints: Vec<SocketAddr>,
}

impl Prober {
    async fn probe(&self, mut client: etcd_client::Client) -> Probe {
        let cpu = CpuSnapshot::take(&self.processes);
        let revision = Stack::etcd_revision(&mut client).await.ok();
        let metrics = scrape_all(&self.endpoints).await;
        (revision, cpu, metrics)
    }
}

/// What happened between two probes `seconds` apart.
fn facts(first: Probe, last: Probe, seconds: f64, ticks_per_second: f64) -> Result<WindowFacts> {
    let ((first_rev, first_cpu, first_metrics), (last_rev, last_cpu, last_metrics)) = (first, last);
    let (Some(first), Some(last)) = (first_rev, last_rev) else {
        return Err("could not read the etcd revision around the measurement".into());
    };
    let (cpu, other_cores) = last_cpu.cores_since(&first_cpu, seconds, ticks_per_second);
    let metrics = if first_metrics.is_empty() {
        Metrics::new()
    } else {
        last_metrics
            .iter()
            .map(|(series, value)| {
                let before = first_metrics.get(series).copied().unwrap_or(0.0);
                (series.clone(), value - before)
            })
            .collect()
    };
    Ok(WindowFacts {
        writes: last - first,
        cpu,
        other_cores,
        metrics,
    })
}

/// Prometheus series (name with labels) → value, summed over the services (and etcd)
/// scraped.
pub type Metrics = BTreeMap<String, f64>;

/// A measured window being watched.
#[derive(Debug)]
pub struct Window {
    handle: tokio::task::JoinHandle<(Probe, Probe)>,
    seconds: f64,
    ticks_per_second: f64,
}

/// What etcd and the processes did during a measured window.
#[derive(Debug, Clone)]
pub struct WindowFacts {
    /// etcd revisions consumed: one per put/delete/txn that changed something (lease
    /// grants and keep-alives do not count; a txn of many operations counts once).
    pub writes: i64,
    /// `cpu cores: bench 0.95, limiter-svc 0.80, etcd 0.10, other processes 0.02`.
    pub cpu: String,
    /// Cores the rest of the machine used during the window (noise).
    pub other_cores: Option<f64>,
    /// How much each service metric (summed over the services) grew during the window;
    /// empty when the services could not be scraped.
    pub metrics: Metrics,
}

impl WindowFacts {
    /// Growth of every series of metric `name` (labels ignored).
    pub fn metric(&self, name: &str) -> f64 {
        self.metrics
            .iter()
            .filter(|(series, _)| series.split('{').next() == Some(name))
            .map(|(_, value)| value)
            .sum()
    }

    /// `etcd fsyncs 190/s, mean 6.5 ms` (etcd's WAL fsyncs in the window).
    pub fn etcd_note(&self, seconds: f64) -> String {
        if self.metrics.is_empty() || seconds <= 0.0 {
            return "etcd fsyncs unknown".to_owned();
        }
        let count = self.metric("etcd_disk_wal_fsync_duration_seconds_count");
        if count <= 0.0 {
            return "etcd fsyncs: none in window".to_owned();
        }
        let sum = self.metric("etcd_disk_wal_fsync_duration_seconds_sum");
        format!(
            "etcd fsyncs {:.0}/s, mean {:.1} ms",
            count / seconds,
            sum / count * 1000.0
        )
    }

    /// `; SERVER ERRORS: …` from the services' request metrics (calls between services
    /// included) for every non-OK code, or nothing.
    pub fn server_errors(&self) -> String {
        let failed = self.series_without("switchboard_requests_total", "code=\"OK\"");
        if failed.is_empty() {
            return String::new();
        }
        let parts: Vec<String> = failed
            .iter()
            .map(|(series, count)| format!("{series} ×{count}"))
            .collect();
        format!("; SERVER ERRORS: {}", parts.join(", "))
    }

    /// `etcd writes 1,234 (0.050/pair)`: revisions consumed per operation of `sample`.
    pub fn writes_per(&self, sample: &Sample, what: &str) -> String {
        self.writes_per_count(sample.latencies.len(), what)
    }

    /// `etcd writes 1,234 (0.050/op)` for `count` operations.
    pub fn writes_per_count(&self, count: usize, what: &str) -> String {
        let ops = count.max(1) as f64;
        format!(
            "etcd writes {} ({:.3}/{what})",
            super::report::thousands(self.writes as f64),
            self.writes as f64 / ops
        )
    }

    /// `etcd raft proposals 1,234 (0.500/op), lease grants 617` from etcd's own metrics:
    /// every request etcd commits through raft (txns, puts, deletes, lease grants and
    /// revokes; not keep-alives), so it counts what [`WindowFacts::writes`] leaves out.
    pub fn raft_note(&self, count: usize, what: &str) -> String {
        let proposals = self.metric("etcd_server_proposals_committed_total");
        if self.metrics.is_empty() {
            return "etcd raft proposals unknown".to_owned();
        }
        format!(
            "etcd raft proposals {} ({:.3}/{what}), lease grants {}",
            super::report::thousands(proposals),
            proposals / count.max(1) as f64,
            super::report::thousands(self.metric("etcd_debugging_lease_granted_total"))
        )
    }

    /// Series of metric `name` that grew and whose labels do not contain `label`.
    pub fn series_without(&self, name: &str, label: &str) -> Vec<(&str, f64)> {
        self.metrics
            .iter()
            .filter(|(series, value)| {
                series.split('{').next() == Some(name) && !series.contains(label) && **value > 0.0
            })
            .map(|(series, value)| (series.as_str(), *value))
            .collect()
    }
}

impl Window {
    /// Waits for the end of the window's probe.
    pub async fn finish(self) -> Result<WindowFacts> {
        let (first, last) = self.handle.await?;
        facts(first, last, self.seconds, self.ticks_per_second)
    }
}

impl Service {
    async fn wait_serving(&mut self, tls: &ClientTls) -> Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Err(format!(
                    "{} exited before serving ({status}); its log ends with:\n{}",
                    self.label,
                    tail(&self.log, 20)
                )
                .into());
            }
            if serving(self.addr, tls).await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(format!(
                    "{} at {} not SERVING after {START_TIMEOUT:?}; its log ends with:\n{}",
                    self.label,
                    self.addr,
                    tail(&self.log, 20)
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn serving(addr: SocketAddr, tls: &ClientTls) -> bool {
    let Ok(channel) = plumbing::client::channel_with(&addr.to_string(), tls) else {
        return false;
    };
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
    let mut request = tonic::Request::new(tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    });
    request.set_timeout(Duration::from_secs(1));
    let answer = tokio::time::timeout(Duration::from_secs(2), health.check(request)).await;
    matches!(answer, Ok(Ok(answer)) if answer.get_ref().status
        == tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
}

/// Scrapes every endpoint and sums the series; empty if any endpoint fails (a partial sum
/// would mislead).
async fn scrape_all(endpoints: &[SocketAddr]) -> Metrics {
    let mut total = Metrics::new();
    for endpoint in endpoints {
        let Some(metrics) = scrape(*endpoint).await else {
            return Metrics::new();
        };
        for (series, value) in metrics {
            *total.entry(series).or_default() += value;
        }
    }
    total
}

/// `GET /metrics` over plain HTTP/1.0 (so no chunked answer), parsed (comments and malformed lines skipped).
async fn scrape(endpoint: SocketAddr) -> Option<Metrics> {
    let fetch = async {
        let mut stream = tokio::net::TcpStream::connect(endpoint).await.ok()?;
        let request = format!("GET /metrics HTTP/1.0\r\nHost: {endpoint}\r\n\r\n");
        stream.write_all(request.as_bytes()).await.ok()?;
        let mut body = Vec::new();
        stream.read_to_end(&mut body).await.ok()?;
        String::from_utf8(body).ok()
    };
    let text = tokio::time::timeout(Duration::from_secs(2), fetch)
        .await
        .ok()??;
    let (head, body) = text.split_once("\r\n\r\n")?;
    if !(head.starts_with("HTTP/1.") && head.lines().next()?.contains(" 200")) {
        return None;
    }
    Some(
        body.lines()
            .filter(|line| !line.starts_with('#'))
            .filter_map(|line| {
                let (series, value) = line.rsplit_once(' ')?;
                Some((series.to_owned(), value.parse::<f64>().ok()?))
            })
            .collect(),
    )
}

/// `target/<profile>/<name>`: the release binaries sit next to the `bench` executable.
fn binary(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe
        .parent()
        .ok_or("the bench executable has no parent folder")?;
    let path = dir.join(name);
    if path.exists() {
        progress(format_args!("using {}", path.display()));
        Ok(path)
    } else {
        Err(format!(
            "{} is not built: run `cargo build --release --workspace --bins` (scripts/bench does)",
            path.display()
        )
        .into())
    }
}

fn panic_text(err: tokio::task::JoinError) -> String {
    match err.try_into_panic() {
        Ok(payload) => payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_owned()))
            .unwrap_or_else(|| "panic".to_owned()),
        Err(err) => err.to_string(),
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Counts WARN and ERROR lines; returns up to 5 distinct ones (timestamps cut off).
fn scan_log(path: &Path) -> (usize, usize, Vec<String>) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let (mut warns, mut errors) = (0, 0);
    let mut samples: Vec<String> = Vec::new();
    for line in text.lines() {
        let at = if let Some(at) = line.find(" WARN ") {
            warns += 1;
            at
        } else if let Some(at) = line.find(" ERROR ").or_else(|| line.find("panicked")) {
            errors += 1;
            at
        } else {
            continue;
        };
        let body = line[at..].trim();
        let body: String = body.chars().take(240).collect();
        if samples.len() < 5 && !samples.contains(&body) {
            samples.push(body);
        }
    }
    (warns, errors, samples)
}

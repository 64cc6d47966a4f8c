//! The test harness and the soak of Switchboard.
//!
//! - [`Etcd`] starts a real etcd (Debian's `/usr/bin/etcd`, or `$SWITCHBOARD_TEST_ETCD`) on
//!   free loopback ports, with its data in a temporary folder; it can be stopped, restarted
//!   on the same ports and data, and is killed when dropped. [`Etcd::start_secure`] serves
//!   TLS and can turn authentication on ([`secure_etcd`]).
//! - [`unique_prefix`] gives each test its own etcd key prefix.
//! - [`Tokens`] mints platform and account tokens for tests.
//! - [`poll_until`] awaits a condition with a deadline, instead of sleeping.
//! - [`ServiceProcess`] runs a built service binary (for `kill -9` tests).
//!
//! Services started in-process live in each test (they need the service crates, which are
//! this crate's dev-dependencies), through [`serve_in_process`].
//!
//! [`soak`] is the whole stack under mixed load and etcd faults (`scripts/soak`, and a
//! short run in the suite). The benchmark is its own crate, `switchboard-bench` (`bench/`),
//! which uses this harness; nothing here depends on it.
#![forbid(unsafe_code)]

pub mod certs;
pub mod secure_etcd;
pub mod soak;

use std::future::Future;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use plumbing::auth::Scope;
use plumbing::auth::jwt::{self, TokenRequest};
use plumbing::config::{CommonArgs, LogFormat};
use plumbing::tls::{ClientTls, TlsArgs};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub use secure_etcd::{EtcdLogin, EtcdSecurity, secure_common_args};

/// Platform key id every test server is configured with.
pub const PLATFORM_KEY_ID: &str = "platform-test";
/// Platform secret every test server is configured with.
pub const PLATFORM_SECRET: &str = "test-platform-secret-0123456789";

/// A free TCP port on 127.0.0.1, below Linux's ephemeral range (32768–60999). Servers
/// bound to port 0 get ephemeral ports, so they can never take a port handed out here —
/// which matters when etcd is restarted on the same port while other tests run.
pub fn free_port() -> u16 {
    loop {
        let candidate = 20_000 + (rand_u64() % 12_000) as u16;
        if StdListener::bind(("127.0.0.1", candidate)).is_ok() {
            return candidate;
        }
    }
}

/// A key prefix no other test uses.
pub fn unique_prefix() -> String {
    format!("/sbtest-{:016x}", rand_u64())
}

fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
    hasher.write_u32(std::process::id());
    hasher.finish()
}

/// Waits until `check` returns `Some`, polling every 20 ms, for at most `timeout`.
/// Panics with `what` when the deadline passes.
pub async fn poll_until<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A real etcd process on loopback.
#[derive(Debug)]
pub struct Etcd {
    /// `http://127.0.0.1:PORT`.
    pub endpoint: String,
    client_port: u16,
    peer_port: u16,
    fsync: bool,
    data: tempfile::TempDir,
    child: Option<Child>,
    security: Option<secure_etcd::ServerSecurity>,
}

impl Etcd {
    /// Starts a single-member etcd without fsync (tests only).
    pub async fn start() -> Self {
        Self::start_with(false).await
    }

    /// Starts a single-member etcd; `fsync` false adds `--unsafe-no-fsync`.
    pub async fn start_with(fsync: bool) -> Self {
        Self::start_configured(fsync, None).await
    }

    async fn start_configured(fsync: bool, security: Option<secure_etcd::ServerSecurity>) -> Self {
        let data = tempfile::tempdir().unwrap_or_else(|err| panic!("tempdir: {err}"));
        let (client_port, peer_port) = (free_port(), free_port());
        let scheme = if security.is_some() { "https" } else { "http" };
        let mut etcd = Self {
            endpoint: format!("{scheme}://127.0.0.1:{client_port}"),
            client_port,
            peer_port,
            fsync,
            data,
            child: None,
            security,
        };
        etcd.launch().await;
        etcd
    }

    /// The binary: `$SWITCHBOARD_TEST_ETCD` or `/usr/bin/etcd`.
    pub fn binary() -> PathBuf {
        std::env::var_os("SWITCHBOARD_TEST_ETCD")
            .map_or_else(|| PathBuf::from("/usr/bin/etcd"), PathBuf::from)
    }

    async fn launch(&mut self) {
        let mut command = Command::new(Self::binary());
        command
            .arg("--name")
            .arg("test")
            .arg("--data-dir")
            .arg(self.data.path().join("etcd"))
            .arg("--listen-client-urls")
            .arg(&self.endpoint)
            .arg("--advertise-client-urls")
            .arg(&self.endpoint)
            .arg("--listen-peer-urls")
            .arg(format!("http://127.0.0.1:{}", self.peer_port))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://127.0.0.1:{}", self.peer_port))
            .arg("--initial-cluster")
            .arg(format!("test=http://127.0.0.1:{}", self.peer_port))
            .arg("--log-level")
            .arg("error")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true);
        if !self.fsync {
            command.arg("--unsafe-no-fsync");
        }
        self.security_args(&mut command);
        let child = command.spawn().unwrap_or_else(|err| {
            panic!(
                "cannot start {}: {err} (install it with `apt-get install -y etcd-server`)",
                Self::binary().display()
            )
        });
        self.child = Some(child);
        let address: SocketAddr = ([127, 0, 0, 1], self.client_port).into();
        let endpoint = self.endpoint.clone();
        let options = self.client_options();
        poll_until(
            &format!("etcd at {endpoint}"),
            Duration::from_secs(15),
            || {
                let endpoint = endpoint.clone();
                let options = options.clone();
                async move {
                    let stream = tokio::net::TcpStream::connect(address).await.ok()?;
                    drop(stream);
                    let mut client = etcd_client::Client::connect([endpoint.as_str()], options)
                        .await
                        .ok()?;
                    client.get("health-probe", None).await.ok().map(|_| ())
                }
            },
        )
        .await;
    }

    /// Kills etcd (SIGKILL) and waits for it to exit.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill().await;
        }
    }

    /// Kills and starts etcd again on the same ports with the same data.
    pub async fn restart(&mut self) {
        self.kill().await;
        self.launch().await;
    }

    /// A client connected to this etcd (over TLS and as root when it is secured).
    pub async fn client(&self) -> etcd_client::Client {
        etcd_client::Client::connect([self.endpoint.as_str()], self.client_options())
            .await
            .unwrap_or_else(|err| panic!("etcd client: {err}"))
    }
}

/// A 3- (or n-) member etcd cluster on loopback, for leader-change and fault tests.
#[derive(Debug)]
pub struct EtcdCluster {
    members: Vec<Member>,
    data: tempfile::TempDir,
}

#[derive(Debug)]
struct Member {
    name: String,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
}

impl EtcdCluster {
    /// Starts `size` members without fsync and waits until the cluster answers.
    pub async fn start(size: usize) -> Self {
        let data = tempfile::tempdir().unwrap_or_else(|err| panic!("tempdir: {err}"));
        let members = (0..size)
            .map(|i| Member {
                name: format!("m{i}"),
                client_port: free_port(),
                peer_port: free_port(),
                child: None,
            })
            .collect();
        let mut cluster = Self { members, data };
        for i in 0..size {
            cluster.launch(i, "new");
        }
        cluster.wait_healthy().await;
        cluster
    }

    /// Every member's client URL.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("http://127.0.0.1:{}", m.client_port))
            .collect()
    }

    fn launch(&mut self, index: usize, state: &str) {
        let initial: Vec<String> = self
            .members
            .iter()
            .map(|m| format!("{}=http://127.0.0.1:{}", m.name, m.peer_port))
            .collect();
        let dir = self.data.path().join(&self.members[index].name);
        let member = &mut self.members[index];
        let client_url = format!("http://127.0.0.1:{}", member.client_port);
        let peer_url = format!("http://127.0.0.1:{}", member.peer_port);
        let child = Command::new(Etcd::binary())
            .args(["--name", &member.name, "--data-dir"])
            .arg(dir)
            .args([
                "--listen-client-urls",
                &client_url,
                "--advertise-client-urls",
                &client_url,
            ])
            .args([
                "--listen-peer-urls",
                &peer_url,
                "--initial-advertise-peer-urls",
                &peer_url,
            ])
            .args([
                "--initial-cluster",
                &initial.join(","),
                "--initial-cluster-state",
                state,
            ])
            .args(["--unsafe-no-fsync", "--log-level", "error"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start etcd member: {err}"));
        member.child = Some(child);
    }

    async fn wait_healthy(&self) {
        let endpoints = self.endpoints();
        poll_until(
            "etcd cluster to elect a leader",
            Duration::from_secs(30),
            || {
                let endpoints = endpoints.clone();
                async move {
                    let mut client = etcd_client::Client::connect(&endpoints, None).await.ok()?;
                    client.put("health-probe", "1", None).await.ok().map(|_| ())
                }
            },
        )
        .await;
    }

    /// The index of the current leader.
    pub async fn leader(&self) -> usize {
        let endpoints = self.endpoints();
        poll_until("a leader", Duration::from_secs(30), || {
            let endpoints = endpoints.clone();
            async move {
                for (i, endpoint) in endpoints.iter().enumerate() {
                    let Ok(mut client) =
                        etcd_client::Client::connect([endpoint.as_str()], None).await
                    else {
                        continue;
                    };
                    // A paused member accepts and never answers.
                    let Ok(Ok(status)) =
                        tokio::time::timeout(Duration::from_millis(500), client.status()).await
                    else {
                        continue;
                    };
                    if status.leader() == status.header().map_or(0, |h| h.member_id()) {
                        return Some(i);
                    }
                }
                None
            }
        })
        .await
    }

    /// SIGKILLs member `index`.
    pub async fn kill(&mut self, index: usize) {
        if let Some(mut child) = self.members[index].child.take() {
            let _ = child.kill().await;
        }
    }

    /// Freezes member `index` with SIGSTOP: its sockets stay open and accept, but it
    /// answers nothing — a partition as its peers and clients see it.
    pub async fn pause(&mut self, index: usize) {
        self.signal(index, "-STOP").await;
    }

    /// Lets a paused member run again (SIGCONT).
    pub async fn resume(&mut self, index: usize) {
        self.signal(index, "-CONT").await;
    }

    async fn signal(&self, index: usize, signal: &str) {
        let pid = self.members[index]
            .child
            .as_ref()
            .and_then(Child::id)
            .unwrap_or_else(|| panic!("member m{index} is not running"));
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .await
            .unwrap_or_else(|err| panic!("kill {signal} {pid}: {err}"));
        assert!(status.success(), "kill {signal} {pid} failed");
    }

    /// Starts member `index` again with its data.
    pub async fn restart(&mut self, index: usize) {
        self.kill(index).await;
        self.launch(index, "existing");
        self.wait_healthy().await;
    }
}

/// The shared flags for a test server against `etcd` under `prefix`.
pub fn common_args(etcd: &Etcd, prefix: &str) -> CommonArgs {
    common_args_for(vec![etcd.endpoint.clone()], prefix)
}

/// The shared flags for a test server against these etcd endpoints under `prefix`.
pub fn common_args_for(etcd_endpoints: Vec<String>, prefix: &str) -> CommonArgs {
    CommonArgs {
        etcd: plumbing::etcd::EtcdArgs::plain(etcd_endpoints, prefix),
        platform_key_id: PLATFORM_KEY_ID.to_owned(),
        platform_secret: Some(plumbing::config::Secret::new(PLATFORM_SECRET)),
        platform_accept_key_id: None,
        platform_accept_secret: None,
        log_format: LogFormat::Human,
        drain_timeout: Duration::from_secs(5),
        metrics_listen: None,
        replica_ttl: 5,
        tls: TlsArgs::default(),
        limits: plumbing::limits::ConnectionLimits::default(),
    }
}

/// A server running in this process.
#[derive(Debug)]
pub struct InProcess<E> {
    /// Where it listens.
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    /// The server task; resolves when it has stopped.
    pub join: JoinHandle<Result<(), E>>,
}

impl<E> InProcess<E> {
    /// Asks for a graceful shutdown (as SIGTERM would) and waits for it.
    pub async fn shutdown(mut self) -> Result<(), E> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        match self.join.await {
            Ok(result) => result,
            Err(err) => panic!("server task failed: {err}"),
        }
    }

    /// Simulates a crash: the task is aborted, nothing is cleaned up, leases expire by TTL.
    pub fn crash(self) {
        self.join.abort();
    }

    /// `http://addr` for clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// Binds 127.0.0.1:0 and runs `run(listener, stop)` on a task, waiting until it answers.
pub async fn serve_in_process<E, F, Fut>(run: F) -> InProcess<E>
where
    F: FnOnce(tokio::net::TcpListener, oneshot::Receiver<()>) -> Fut,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Send + 'static,
{
    serve_in_process_with(&ClientTls::plain(), run).await
}

/// Like [`serve_in_process`] for a server that may serve TLS: waits until it answers a
/// client using `tls`.
pub async fn serve_in_process_with<E, F, Fut>(tls: &ClientTls, run: F) -> InProcess<E>
where
    F: FnOnce(tokio::net::TcpListener, oneshot::Receiver<()>) -> Fut,
    Fut: Future<Output = Result<(), E>> + Send + 'static,
    E: Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap_or_else(|err| panic!("bind: {err}"));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|err| panic!("local addr: {err}"));
    let (stop, stopped) = oneshot::channel();
    let join = tokio::spawn(run(listener, stopped));
    wait_serving_with(addr, tls).await;
    InProcess {
        addr,
        stop: Some(stop),
        join,
    }
}

/// Waits until `addr` answers a gRPC health check with SERVING.
pub async fn wait_serving(addr: SocketAddr) {
    wait_serving_with(addr, &ClientTls::plain()).await;
}

/// Waits until `addr` answers a gRPC health check with SERVING to a client using `tls`.
pub async fn wait_serving_with(addr: SocketAddr, tls: &ClientTls) {
    poll_until(
        &format!("server at {addr} to be SERVING"),
        Duration::from_secs(20),
        || async move {
            let channel = plumbing::client::channel_with(&addr.to_string(), tls).ok()?;
            let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
            let answer = health
                .check(tonic_health::pb::HealthCheckRequest {
                    service: String::new(),
                })
                .await
                .ok()?;
            (answer.into_inner().status
                == tonic_health::pb::health_check_response::ServingStatus::Serving as i32)
                .then_some(())
        },
    )
    .await;
}

/// Mints tokens for tests.
#[derive(Debug, Clone, Copy)]
pub struct Tokens;

impl Tokens {
    /// A platform token for `account` (`*` for all) with `scopes`.
    pub fn platform(account: &str, scopes: &[Scope]) -> String {
        Self::signed(PLATFORM_KEY_ID, PLATFORM_SECRET, account, None, scopes, 600)
    }

    /// Any token, for tests that need unusual ones.
    pub fn signed(
        key_id: &str,
        secret: &str,
        account: &str,
        identity: Option<&str>,
        scopes: &[Scope],
        ttl: i64,
    ) -> String {
        let request = TokenRequest {
            key_id,
            secret: secret.as_bytes(),
            account,
            identity,
            scopes,
            ttl_secs: ttl,
        };
        jwt::mint(&request, plumbing::auth::unix_now()).unwrap_or_else(|err| panic!("mint: {err}"))
    }

    /// Wraps `message` in a request carrying `token`.
    pub fn request<T>(token: &str, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        let value = format!("Bearer {token}")
            .parse()
            .unwrap_or_else(|err| panic!("metadata: {err}"));
        request.metadata_mut().insert("authorization", value);
        request
    }
}

/// A service binary run as a child process, killed when dropped.
#[derive(Debug)]
pub struct ServiceProcess {
    /// Where it listens.
    pub addr: SocketAddr,
    child: Child,
}

impl ServiceProcess {
    /// Path of a built binary of this workspace (`target/<profile>/<name>`), next to the
    /// test executable's `deps` folder.
    pub fn binary(name: &str) -> PathBuf {
        let exe = std::env::current_exe().unwrap_or_else(|err| panic!("current exe: {err}"));
        let dir = exe
            .parent()
            .and_then(|deps| deps.parent())
            .unwrap_or_else(|| panic!("no target dir"));
        let path = dir.join(name);
        assert!(
            path.exists(),
            "{} is not built; run `cargo build --workspace --bins` first",
            path.display()
        );
        path
    }

    /// Starts `name` with `args` on a free port, against `etcd` under `prefix`.
    pub async fn start(name: &str, etcd: &Etcd, prefix: &str, args: &[&str]) -> Self {
        Self::start_with_env(name, etcd, prefix, args, &[]).await
    }

    /// Like [`ServiceProcess::start`], with extra environment variables.
    pub async fn start_with_env(
        name: &str,
        etcd: &Etcd,
        prefix: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        Self::start_on_with_env(
            name,
            std::slice::from_ref(&etcd.endpoint),
            prefix,
            args,
            env,
        )
        .await
    }

    /// Like [`ServiceProcess::start`], against these etcd endpoints (an [`EtcdCluster`]'s
    /// [`EtcdCluster::endpoints`], all passed in `--etcd`).
    pub async fn start_on(name: &str, endpoints: &[String], prefix: &str, args: &[&str]) -> Self {
        Self::start_on_with_env(name, endpoints, prefix, args, &[]).await
    }

    /// Like [`ServiceProcess::start_on`], with extra environment variables.
    pub async fn start_on_with_env(
        name: &str,
        endpoints: &[String],
        prefix: &str,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        Self::spawn(
            name,
            endpoints,
            prefix,
            args,
            env,
            Stdio::inherit(),
            &ClientTls::plain(),
        )
        .await
    }

    /// Like [`ServiceProcess::start_with_env`], with its stderr (the logs) appended to the
    /// file `log`. `RUST_LOG` in `env` overrides the default `warn`.
    pub async fn start_logging_to(
        name: &str,
        etcd: &Etcd,
        prefix: &str,
        args: &[&str],
        env: &[(&str, &str)],
        log: &std::path::Path,
    ) -> Self {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|err| panic!("log file {}: {err}", log.display()));
        let endpoints = std::slice::from_ref(&etcd.endpoint);
        Self::spawn(
            name,
            endpoints,
            prefix,
            args,
            env,
            Stdio::from(file),
            &ClientTls::plain(),
        )
        .await
    }

    async fn spawn(
        name: &str,
        endpoints: &[String],
        prefix: &str,
        args: &[&str],
        env: &[(&str, &str)],
        stderr: Stdio,
        tls: &ClientTls,
    ) -> Self {
        let addr: SocketAddr = ([127, 0, 0, 1], free_port()).into();
        let child = Command::new(Self::binary(name))
            .env("RUST_LOG", "warn")
            .envs(env.iter().copied())
            .arg("--listen")
            .arg(addr.to_string())
            .arg("--etcd")
            .arg(endpoints.join(","))
            .arg("--etcd-prefix")
            .arg(prefix)
            .arg("--platform-key-id")
            .arg(PLATFORM_KEY_ID)
            .arg("--replica-ttl")
            .arg("5")
            .args(args)
            .env("SWITCHBOARD_PLATFORM_SECRET", PLATFORM_SECRET)
            .stdin(Stdio::null())
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start {name}: {err}"));
        wait_serving_with(addr, tls).await;
        Self { addr, child }
    }

    /// Like [`ServiceProcess::start`] for a server given TLS flags in `args`: waits until it
    /// answers a client using `tls`.
    pub async fn start_tls(
        name: &str,
        etcd: &Etcd,
        prefix: &str,
        args: &[&str],
        tls: &ClientTls,
    ) -> Self {
        let endpoints = std::slice::from_ref(&etcd.endpoint);
        Self::spawn(name, endpoints, prefix, args, &[], Stdio::inherit(), tls).await
    }

    /// Sends SIGHUP (a server serving TLS reloads its certificate).
    pub async fn hangup(&self) {
        self.signal("-HUP").await;
    }

    /// Freezes the process with SIGSTOP (a long GC pause or a partition, as etcd and its
    /// peers see it: its lease is no longer kept alive).
    pub async fn pause(&self) {
        self.signal("-STOP").await;
    }

    /// Lets a paused process run again (SIGCONT).
    pub async fn resume(&self) {
        self.signal("-CONT").await;
    }

    async fn signal(&self, signal: &str) {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .args([signal, &pid.to_string()])
                .status()
                .await;
        }
    }

    /// SIGKILL, as a crash.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }

    /// SIGTERM, then waits for the exit status.
    pub async fn terminate(&mut self) -> std::process::ExitStatus {
        self.signal("-TERM").await;
        self.child
            .wait()
            .await
            .unwrap_or_else(|err| panic!("wait: {err}"))
    }

    /// Sends SIGTERM without waiting (the process drains while the test watches);
    /// [`ServiceProcess::wait`] collects the exit status.
    pub async fn signal_terminate(&self) {
        self.signal("-TERM").await;
    }

    /// Waits for the process to exit; its status.
    pub async fn wait(&mut self) -> std::process::ExitStatus {
        self.child
            .wait()
            .await
            .unwrap_or_else(|err| panic!("wait: {err}"))
    }

    /// The exit status if the process has exited, `None` while it runs.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .try_wait()
            .unwrap_or_else(|err| panic!("try_wait: {err}"))
    }

    /// `http://addr` for clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

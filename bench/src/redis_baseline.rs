//! The Redis baseline of docs/CONTRACT.md §6: the in-flight semaphore many pick instead of a
//! limiter service — one sorted set of holders per key, scored by expiry, acquired by a
//! Lua script (EVALSHA) and released by `ZREM` — on Debian's `redis-server`, which this
//! module starts on a free loopback port (no persistence, its own temporary folder) and
//! stops when dropped.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use integration::free_port;
use redis::aio::MultiplexedConnection;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use super::load::{self, Plan, Sample, Worker};
use super::stack::{Stack, WindowFacts};
use super::{OP_TIMEOUT, Options, Result, sys};

/// Where Debian's `redis-server` lives; `SWITCHBOARD_BENCH_REDIS` names another.
const DEFAULT_BINARY: &str = "/usr/bin/redis-server";
/// How long redis-server may take to answer PING.
const START_TIMEOUT: Duration = Duration::from_secs(10);

/// Acquire: drop the expired holders, then add this one if there is room. `KEYS[1]` the
/// key; `ARGV`: now (ms since the epoch, the client's clock), the holder's expiry (ms),
/// the limit, the holder's member name. Returns 1 (granted) or 0 (full).
const ACQUIRE_LUA: &str = r"
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('ZADD', KEYS[1], ARGV[2], ARGV[4])
  return 1
end
return 0
";

/// How the bench runs redis-server, for the notes of its row.
pub const PERSISTENCE: &str = "no persistence: --save '' --appendonly no";

/// A running redis-server; killed when dropped.
#[derive(Debug)]
pub struct RedisServer {
    /// `redis://127.0.0.1:<port>/`.
    pub url: String,
    /// Its process id, for CPU accounting.
    pub pid: Option<u32>,
    /// `Redis server v=7.0.15 …`.
    pub version: String,
    child: Child,
    _dir: tempfile::TempDir,
}

/// The redis-server binary: `$SWITCHBOARD_BENCH_REDIS` or Debian's.
pub fn binary() -> PathBuf {
    std::env::var_os("SWITCHBOARD_BENCH_REDIS")
        .map_or_else(|| PathBuf::from(DEFAULT_BINARY), PathBuf::from)
}

impl RedisServer {
    /// Starts redis-server on a free loopback port with its data folder in a temporary
    /// folder and persistence off, and waits until it answers PING.
    pub async fn start() -> Result<Self> {
        let binary = binary();
        if !binary.exists() {
            return Err(format!(
                "{} not found (install Debian's redis-server — scripts/bench does when run \
                 as root — or set SWITCHBOARD_BENCH_REDIS)",
                binary.display()
            )
            .into());
        }
        let dir = tempfile::Builder::new()
            .prefix("switchboard-bench-redis-")
            .tempdir()?;
        let port = free_port();
        let log = dir.path().join("redis.log");
        let child = Command::new(&binary)
            .arg("--port")
            .arg(port.to_string())
            .args(["--bind", "127.0.0.1", "--protected-mode", "yes"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--daemonize", "no", "--databases", "1"])
            .arg("--dir")
            .arg(dir.path())
            .arg("--logfile")
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .map_err(|err| format!("cannot start {}: {err}", binary.display()))?;
        let mut server = Self {
            url: format!("redis://127.0.0.1:{port}/"),
            pid: child.id(),
            version: sys::version_of(&binary),
            child,
            _dir: dir,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = server.child.try_wait()? {
                let text = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(10).collect();
                return Err(format!(
                    "redis-server exited before answering PING ({status}); its log ends \
                     with:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
                .into());
            }
            let ping = async {
                let mut con = server.connect().await?;
                let pong: String = redis::cmd("PING").query_async(&mut con).await?;
                Ok::<_, super::Error>(pong)
            };
            match tokio::time::timeout(Duration::from_secs(1), ping).await {
                Ok(Ok(pong)) if pong == "PONG" => return Ok(server),
                _ if Instant::now() >= deadline => {
                    return Err(format!(
                        "redis-server on port {port} did not answer PING within \
                         {START_TIMEOUT:?}"
                    )
                    .into());
                }
                _ => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }

    /// A new multiplexed connection (callers share one per [`super::CALLERS_PER_CHANNEL`]).
    pub async fn connect(&self) -> Result<MultiplexedConnection> {
        let client = redis::Client::open(self.url.as_str())?;
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(Duration::from_secs(3)))
            .set_response_timeout(Some(OP_TIMEOUT));
        Ok(client
            .get_multiplexed_async_connection_with_config(&config)
            .await?)
    }

    /// Stops the server.
    pub async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

struct RedisWorker {
    con: MultiplexedConnection,
    script: Arc<redis::Script>,
    key: String,
    limit: u32,
    hold: Duration,
    member: String,
    sequence: u64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl Worker for RedisWorker {
    async fn call(&mut self) -> std::result::Result<(), String> {
        self.sequence += 1;
        let member = format!("{}-{}", self.member, self.sequence);
        let now = now_ms();
        let expiry = now + self.hold.as_millis() as u64;
        let granted: i64 = self
            .script
            .key(&self.key)
            .arg(now)
            .arg(expiry)
            .arg(self.limit)
            .arg(&member)
            .invoke_async(&mut self.con)
            .await
            .map_err(|err| format!("redis EVALSHA acquire: {err}"))?;
        if granted != 1 {
            return Err(format!("redis acquire answered {granted} (full)"));
        }
        let removed: i64 = redis::cmd("ZREM")
            .arg(&self.key)
            .arg(&member)
            .query_async(&mut self.con)
            .await
            .map_err(|err| format!("redis ZREM: {err}"))?;
        if removed == 1 {
            Ok(())
        } else {
            Err(format!(
                "redis release: ZREM removed {removed} holders, not 1"
            ))
        }
    }
}

/// Acquire+release pairs of the Redis semaphore: caller `i` on key `keys[i % len]` with
/// `limit`, holds of `hold` (released at once). Returns the sample and the window's facts
/// (redis-server's CPU included).
pub async fn semaphore(
    options: &Options,
    stack: &Stack,
    server: &RedisServer,
    keys: &[String],
    limit: u32,
    hold: Duration,
) -> Result<(Sample, WindowFacts)> {
    let script = Arc::new(redis::Script::new(ACQUIRE_LUA));
    // Load it once, so that every measured call is a plain EVALSHA.
    let mut first = server.connect().await?;
    let _: String = script.prepare_invoke().load_async(&mut first).await?;
    // Start from empty sets.
    let _: () = redis::cmd("FLUSHALL").query_async(&mut first).await?;
    let connections = load::share(options.concurrency, 1, |_| server.connect()).await?;
    let run = format!("{:08x}", std::process::id());
    let workers: Vec<RedisWorker> = connections
        .into_iter()
        .enumerate()
        .map(|(caller, (_, con))| RedisWorker {
            con,
            script: script.clone(),
            key: keys[caller % keys.len().max(1)].clone(),
            limit,
            hold,
            member: format!("{run}-{caller}"),
            sequence: 0,
        })
        .collect();
    let plan = Plan::new(options);
    let window = stack
        .watch_window_with(&plan, &[("redis-server".to_owned(), server.pid)])
        .await?;
    let sample = load::drive(&plan, workers).await?;
    Ok((sample, window.finish().await?))
}

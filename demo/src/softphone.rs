//! The softphones the demo runs: real `softphone` processes for the demo identity, each
//! writing its event lines (`offer CM… …`, `connected CM… …`, `ended CM… reason=…`) to a
//! log file the demo reads, as a reader would `tail -f` it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::Failure;

/// How long a softphone gets to print an expected line.
const LINE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a softphone gets to close its session after SIGTERM, before SIGKILL.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// What starting a softphone needs: the binary, where presence listens, the device token.
#[derive(Debug, Clone)]
pub struct SoftphoneLauncher {
    /// The `softphone` binary.
    pub binary: PathBuf,
    /// Folder of the log files (`NAME.log`).
    pub logs: PathBuf,
    /// presence-svc's address.
    pub presence: String,
    /// A token with scope `presence.register` for the demo identity.
    pub token: String,
}

/// One running softphone; killed if dropped while running.
#[derive(Debug)]
pub struct Softphone {
    /// Its name in the demo's output and the name of its log (`NAME.log`).
    pub name: String,
    log: PathBuf,
    child: Child,
    /// Log lines already printed by [`Softphone::show`].
    shown: usize,
}

impl SoftphoneLauncher {
    /// Starts a softphone named `name` for `device` with `flags`, and waits until it
    /// printed `registered identity=IDENTITY device=DEVICE `.
    pub async fn start(
        &self,
        name: &str,
        identity: &str,
        device: &str,
        flags: &[&str],
    ) -> Result<Softphone, Failure> {
        let log = self.logs.join(format!("{name}.log"));
        let file = std::fs::File::create(&log)
            .map_err(|err| Failure::new(format!("cannot create {}: {err}", log.display())))?;
        let output = file
            .try_clone()
            .map_err(|err| Failure::new(format!("{}: {err}", log.display())))?;
        let child = Command::new(&self.binary)
            .arg("--presence")
            .arg(&self.presence)
            .arg("--device-id")
            .arg(device)
            .args(flags)
            .env("SWITCHBOARD_TOKEN", &self.token)
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(output)
            .stderr(file)
            // Its own process group: a Ctrl-C reaches the demo, which stops it.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|err| {
                Failure::new(format!("cannot start {}: {err}", self.binary.display()))
            })?;
        let mut softphone = Softphone {
            name: name.to_owned(),
            log,
            child,
            shown: 0,
        };
        let registered = format!("registered identity={identity} device={device} ");
        softphone.wait_for(&registered).await?;
        Ok(softphone)
    }
}

impl Softphone {
    /// Waits until the log has a line starting with `text`.
    pub async fn wait_for(&mut self, text: &str) -> Result<(), Failure> {
        let deadline = Instant::now() + LINE_TIMEOUT;
        loop {
            if read(&self.log).lines().any(|line| line.starts_with(text)) {
                return Ok(());
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(Failure::new(format!(
                    "{} exited ({status}) before printing \"{text}\"; its log ends with:\n{}",
                    self.name,
                    tail(&self.log, 10)
                )));
            }
            if Instant::now() >= deadline {
                return Err(Failure::new(format!(
                    "{} did not print \"{text}\" within {LINE_TIMEOUT:?} (see {})",
                    self.name,
                    self.log.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits for a line starting with `text` (`connected CM_demo_1`), then prints the
    /// lines about that communication not printed before, as `    NAME: LINE`.
    pub async fn saw(&mut self, text: &str) -> Result<(), Failure> {
        self.wait_for(text).await?;
        let id = text.split(' ').nth(1).unwrap_or_default();
        let log = read(&self.log);
        let lines: Vec<&str> = log.lines().collect();
        for line in lines.iter().skip(self.shown) {
            if line.split(' ').nth(1) == Some(id) {
                println!("    {}: {line}", self.name);
            }
        }
        self.shown = lines.len();
        Ok(())
    }

    /// SIGTERM (it closes its session, so its device goes offline), then SIGKILL if it
    /// is still running after [`STOP_TIMEOUT`].
    pub async fn stop(mut self) {
        if let Some(pid) = self
            .child
            .id()
            .and_then(|pid| rustix::process::Pid::from_raw(pid as i32))
        {
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::TERM);
            if tokio::time::timeout(STOP_TIMEOUT, self.child.wait())
                .await
                .is_ok()
            {
                return;
            }
        }
        let _ = self.child.kill().await;
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

fn tail(path: &Path, lines: usize) -> String {
    let text = read(path);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

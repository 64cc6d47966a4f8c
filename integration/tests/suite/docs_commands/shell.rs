//! The processes of the docs test: the stack (`scripts/stack`), the shell the documented
//! commands run in (one bash, so variables and jobs carry from one command to the next, as
//! in a reader's terminal) and terminals beside it (a bash under `script`, so a softphone
//! sees a real terminal and reads single keys). Every command's output goes to a file of
//! its own in the test's folder; nothing here prints it (it may hold secrets).

use std::fs::{self, File};
use std::io::Write;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// How long `scripts/stack` gets to build nothing, start etcd and three services, and seed.
const STACK_READY: Duration = Duration::from_secs(90);
/// How long the stack gets to stop after SIGTERM (each component gets 5 s).
const STACK_STOP: Duration = Duration::from_secs(30);
/// The line `scripts/stack` prints once everything is up and seeded.
const STACK_READY_LINE: &str = "Ctrl-C stops everything.";

/// Polls `check` every 20 ms until it gives `Some`, for at most `timeout`.
pub fn poll<T>(timeout: Duration, mut check: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = check() {
            return Some(value);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Text of a file the processes write, `\r` removed (terminals write `\r\n`); empty when
/// it does not exist yet.
pub fn read(path: &Path) -> String {
    fs::read(path)
        .map(|bytes| String::from_utf8_lossy(&bytes).replace('\r', ""))
        .unwrap_or_default()
}

fn signal(signal: &str, target: &str) {
    let _ = Command::new("kill")
        .args([signal, "--", target])
        .stderr(Stdio::null())
        .status();
}

fn log_file(path: &Path) -> (Stdio, Stdio) {
    let file = File::create(path).unwrap_or_else(|err| panic!("create {}: {err}", path.display()));
    let copy = file.try_clone().expect("clone a file handle");
    (Stdio::from(file), Stdio::from(copy))
}

/// `scripts/stack --no-build` on the debug binaries, with its state folder and ports moved
/// (`SWITCHBOARD_STACK_DIR`, `SWITCHBOARD_STACK_PORTS`) so that it runs beside other tests
/// and beside a developer's own stack. Stopped (SIGTERM, as Ctrl-C) when dropped.
pub struct Stack {
    child: Child,
    /// Its state folder: `env`, logs, etcd's data.
    pub state: PathBuf,
    /// What it printed (tokens among it: never shown as is).
    pub log: PathBuf,
}

impl Stack {
    /// Starts the stack and waits until it is up and seeded. `ports`: etcd client and peer,
    /// presence, limiter, router.
    pub fn start(root: &Path, dir: &Path, ports: [u16; 5]) -> Result<Self, String> {
        let state = dir.join("state");
        let log = dir.join("stack.log");
        let (stdout, stderr) = log_file(&log);
        let ports = ports.map(|p| p.to_string()).join(",");
        let child = Command::new(root.join("scripts/stack"))
            .arg("--no-build")
            .env("SWITCHBOARD_STACK_PROFILE", "debug")
            .env("SWITCHBOARD_STACK_DIR", &state)
            .env("SWITCHBOARD_STACK_PORTS", ports)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .map_err(|err| format!("cannot run scripts/stack: {err}"))?;
        let mut stack = Self { child, state, log };
        let ready = poll(STACK_READY, || {
            if read(&stack.log).contains(STACK_READY_LINE) {
                return Some(Ok(()));
            }
            match stack.child.try_wait() {
                Ok(Some(status)) => Some(Err(format!("scripts/stack exited ({status})"))),
                _ => None,
            }
        });
        match ready {
            Some(Ok(())) => Ok(stack),
            Some(Err(why)) => Err(why),
            None => Err(format!("scripts/stack not ready after {STACK_READY:?}")),
        }
    }

    /// Stops the stack as Ctrl-C would; its exit status.
    pub fn stop(&mut self) -> Result<ExitStatus, String> {
        if let Ok(Some(status)) = self.child.try_wait() {
            return Ok(status);
        }
        signal("-TERM", &self.child.id().to_string());
        poll(STACK_STOP, || self.child.try_wait().ok().flatten()).ok_or_else(|| {
            signal("-KILL", &self.child.id().to_string());
            format!("scripts/stack did not stop within {STACK_STOP:?} of SIGTERM")
        })
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        let _ = self.stop();
        let _ = self.child.wait();
    }
}

/// A command sent to a [`Shell`], running or ended.
pub struct Pending {
    output: PathBuf,
    status: PathBuf,
}

impl Pending {
    /// Its exit status, once it ended.
    pub fn status(&self) -> Option<i32> {
        fs::read_to_string(&self.status).ok()?.trim().parse().ok()
    }

    /// What it printed so far (stdout and stderr).
    pub fn output(&self) -> String {
        read(&self.output)
    }
}

/// One bash, reading the commands from a pipe; each command is a file sourced in that
/// shell with stdin from /dev/null (the pipe is the shell's), its output to a file.
/// The shell leads a process group of its own: dropping it kills the group, background
/// jobs (`… &`) included.
pub struct Shell {
    child: Child,
    stdin: ChildStdin,
    dir: PathBuf,
    name: String,
    count: usize,
}

impl Shell {
    /// A shell in `root` (the repository, where the documentation's commands run), keeping
    /// its files in `dir` under `name`, with `path` in front of `PATH`.
    pub fn start(root: &Path, dir: &Path, name: &str, path: &Path) -> Self {
        let (stdout, stderr) = log_file(&dir.join(format!("{name}.shell.log")));
        let mut child = Command::new("bash")
            .args(["--noprofile", "--norc"])
            .current_dir(root)
            .env("PATH", with_path(path))
            .stdin(Stdio::piped())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|err| panic!("cannot start bash: {err}"));
        let mut stdin = child.stdin.take().expect("piped stdin");
        stdin
            .write_all(b"set -o pipefail\n")
            .expect("write to the shell");
        Self {
            child,
            stdin,
            dir: dir.to_owned(),
            name: name.to_owned(),
            count: 0,
        }
    }

    /// Sends `text` (one command of the documentation) to the shell.
    pub fn run(&mut self, text: &str) -> Pending {
        self.count += 1;
        let base = self.dir.join(format!("{}-{}", self.name, self.count));
        let script = base.with_extension("sh");
        fs::write(&script, format!("{text}\n")).expect("write a command file");
        let pending = Pending {
            output: base.with_extension("out"),
            status: base.with_extension("status"),
        };
        let line = format!(
            "{{ . {script}; }} >{out} 2>&1 </dev/null; echo $? >{status}.tmp; mv {status}.tmp {status}\n",
            script = quote(&script),
            out = quote(&pending.output),
            status = quote(&pending.status),
        );
        self.stdin
            .write_all(line.as_bytes())
            .expect("write to the shell");
        pending
    }
}

impl Drop for Shell {
    fn drop(&mut self) {
        signal("-KILL", &format!("-{}", self.child.id()));
        let _ = self.child.wait();
    }
}

/// A terminal beside the main shell: `script` giving a bash a pseudo-terminal, the bash
/// running a block's commands in order, each one's exit status to a file; everything it
/// shows goes to one transcript. Keys typed go to `script`'s stdin, i.e. the terminal.
/// Dropping it kills `script`, which hangs the terminal up (SIGHUP to what runs in it).
pub struct Terminal {
    /// Its name in the markers (`terminal softphone`).
    pub name: String,
    child: Child,
    stdin: ChildStdin,
    transcript: PathBuf,
    statuses: Vec<PathBuf>,
}

impl Terminal {
    /// Starts running `commands` in a new terminal in `root`.
    pub fn start(root: &Path, dir: &Path, name: &str, path: &Path, commands: &[String]) -> Self {
        let mut program = format!("set -o pipefail\ncd {}\n", quote(root));
        let mut statuses = Vec::new();
        for (index, text) in commands.iter().enumerate() {
            let base = dir.join(format!("terminal-{name}-{}", index + 1));
            fs::write(base.with_extension("sh"), format!("{text}\n"))
                .expect("write a command file");
            let status = base.with_extension("status");
            program.push_str(&format!(
                "{{ . {script}; }}; echo $? >{status}.tmp; mv {status}.tmp {status}\n",
                script = quote(&base.with_extension("sh")),
                status = quote(&status),
            ));
            statuses.push(status);
        }
        let program_file = dir.join(format!("terminal-{name}.sh"));
        fs::write(&program_file, program).expect("write the terminal's script");
        let transcript = dir.join(format!("terminal-{name}.out"));
        let (stdout, stderr) = log_file(&transcript);
        let mut child = Command::new("script")
            .args(["-q", "-f", "-e", "-c"])
            .arg(format!("bash --noprofile --norc {}", quote(&program_file)))
            .arg("/dev/null")
            .current_dir(root)
            .env("PATH", with_path(path))
            .stdin(Stdio::piped())
            .stdout(stdout)
            .stderr(stderr)
            .process_group(0)
            .spawn()
            .unwrap_or_else(|err| panic!("cannot run `script` (util-linux) for a terminal: {err}"));
        let stdin = child.stdin.take().expect("piped stdin");
        Self {
            name: name.to_owned(),
            child,
            stdin,
            transcript,
            statuses,
        }
    }

    /// Everything the terminal showed so far.
    pub fn transcript(&self) -> String {
        read(&self.transcript)
    }

    /// The exit status of its command `index` (from 0), once it ended.
    pub fn status(&self, index: usize) -> Option<i32> {
        fs::read_to_string(&self.statuses[index])
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// How many commands it runs.
    pub fn len(&self) -> usize {
        self.statuses.len()
    }

    /// Types `keys` into the terminal.
    pub fn type_keys(&mut self, keys: &str) -> Result<(), String> {
        self.stdin
            .write_all(keys.as_bytes())
            .and_then(|()| self.stdin.flush())
            .map_err(|err| format!("typing into terminal {}: {err}", self.name))
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        signal("-KILL", &format!("-{}", self.child.id()));
        let _ = self.child.wait();
    }
}

/// `path` in front of the inherited `PATH` (the documentation's operators have the
/// binaries on their PATH).
fn with_path(path: &Path) -> String {
    match std::env::var("PATH") {
        Ok(rest) if !rest.is_empty() => format!("{}:{rest}", path.display()),
        _ => path.display().to_string(),
    }
}

/// A path as one single-quoted shell word.
fn quote(path: &Path) -> String {
    format!("'{}'", path.display().to_string().replace('\'', r"'\''"))
}

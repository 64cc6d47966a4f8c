//! The run of the documented commands: one shell, the terminals beside it, the answers so
//! far (for `…` values), and the failures found.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::doc::{Block, Command, Marker};
use super::expect::{Expected, values_of};
use super::shell::{Pending, Shell, Terminal, poll};
use super::values::{fill, redact};

/// How long one command may run.
const COMMAND_DEADLINE: Duration = Duration::from_secs(30);
/// How long an `eventually` command is retried.
const EVENTUALLY: Duration = Duration::from_secs(5);
/// How long documented output of something running (a terminal, a job) may take to show.
const SHOWS_UP: Duration = Duration::from_secs(15);

/// A `type … on "TEXT"` waiting for its text.
struct Trigger {
    terminal: String,
    text: String,
    keys: String,
    fired: bool,
}

/// A terminal opened by a block, with what its commands must show.
struct Open {
    terminal: Terminal,
    place: String,
    expected: Vec<Expected>,
    keeps_running: bool,
}

/// The run: the shell, open terminals, the answers so far (for `…` values) and failures.
pub struct Tour {
    root: PathBuf,
    dir: PathBuf,
    bin: PathBuf,
    shell: Shell,
    terminals: Vec<Open>,
    answers: Vec<String>,
    secrets: Vec<String>,
    failures: Vec<String>,
}

impl Tour {
    /// A run in `root` (the repository) with a first shell, its files in `dir`, `bin` on
    /// its PATH, `secrets` kept out of its messages.
    pub fn new(root: &Path, dir: &Path, bin: &Path, secrets: Vec<String>) -> Self {
        Self {
            root: root.to_owned(),
            dir: dir.to_owned(),
            bin: bin.to_owned(),
            shell: Shell::start(root, dir, "readme", bin),
            terminals: Vec::new(),
            answers: Vec::new(),
            secrets,
            failures: Vec::new(),
        }
    }

    /// Goes on in a new shell `name`, where `preamble` runs first.
    pub fn new_shell(&mut self, name: &str, preamble: &str) {
        self.shell = Shell::start(&self.root, &self.dir, name, &self.bin);
        let command = Command {
            place: format!("(the {name} shell's preamble)"),
            text: preamble.to_owned(),
            documented: Vec::new(),
        };
        self.command(&command, false, &mut []);
    }

    /// What went wrong; the shell and terminals are stopped.
    pub fn into_failures(mut self) -> Vec<String> {
        std::mem::take(&mut self.failures)
    }

    /// Runs (or checks) one block of the documentation.
    pub fn block(&mut self, block: &Block) {
        if block.markers.iter().any(|m| matches!(m, Marker::Skip(_))) {
            return;
        }
        if block.lang != "sh" {
            match block.markers.as_slice() {
                [Marker::OutputOf(name)] => {
                    self.shows_up(name, &Expected::Lines(block.lines.clone()), &block.place)
                }
                _ => self.failures.push(format!(
                    "{}: a ``` block neither run nor marked",
                    block.place
                )),
            }
            return;
        }
        let mut triggers = Vec::new();
        let mut eventually = false;
        for marker in &block.markers {
            match marker {
                Marker::Terminal {
                    name,
                    answers_later,
                    keeps_running,
                } => {
                    return self.open(block, name, *answers_later, *keeps_running);
                }
                Marker::Type {
                    keys,
                    into,
                    on: Some(text),
                    ..
                } => {
                    triggers.push(Trigger {
                        terminal: into.clone(),
                        text: text.clone(),
                        keys: keys.clone(),
                        fired: false,
                    });
                }
                Marker::Type {
                    keys,
                    into,
                    on: None,
                    wait_for_end,
                } => self.type_now(&block.place, into, keys, *wait_for_end),
                Marker::Eventually => eventually = true,
                Marker::Skip(_) | Marker::OutputOf(_) => {}
            }
        }
        for command in &block.commands {
            self.command(command, eventually, &mut triggers);
        }
        for trigger in triggers.iter().filter(|t| !t.fired) {
            self.failures.push(format!(
                "{}: terminal {} never showed `{}`",
                block.place, trigger.terminal, trigger.text
            ));
        }
    }

    /// Runs one command in the shell and checks it.
    fn command(&mut self, command: &Command, eventually: bool, triggers: &mut [Trigger]) {
        let names: Vec<String> = self
            .terminals
            .iter()
            .map(|o| o.terminal.name.clone())
            .collect();
        let (mut own, mut elsewhere) = (Vec::new(), Vec::new());
        for line in &command.documented {
            match terminal_line(line, &names) {
                Some(found) => elsewhere.push(found),
                None => own.push(line.clone()),
            }
        }
        let prepared = fill(&command.text, &self.answers).and_then(|(text, values)| {
            self.secrets.extend(values);
            Ok((text, Expected::parse(&own)?))
        });
        let (text, expected) = match prepared {
            Ok(prepared) => prepared,
            Err(why) => return self.fail(&command.place, &command.text, &why, ""),
        };
        let background = text.trim_end().ends_with('&') && !text.trim_end().ends_with("&&");
        let deadline = Instant::now() + EVENTUALLY;
        let (output, status, verdict) = loop {
            let pending = self.shell.run(&text);
            let status = self.wait(&pending, triggers);
            let verdict = judge(&pending, status, &expected, background);
            if verdict.is_ok() || !eventually || Instant::now() >= deadline {
                break (pending.output(), status, verdict);
            }
            std::thread::sleep(Duration::from_millis(100)); // between retries of `eventually`
        };
        if status.is_none() {
            // The shell is stuck in that command: go on in a new one (its variables are
            // lost, but this run has failed already).
            let name = format!("restarted-{}", self.answers.len());
            self.shell = Shell::start(&self.root, &self.dir, &name, &self.bin);
        }
        for field in ["secret", "signingSecret"] {
            self.secrets.extend(values_of(&output, field));
        }
        if let Err(why) = verdict {
            self.fail(&command.place, &command.text, &why, &output);
        }
        self.answers.push(output);
        for (name, line) in elsewhere {
            match Expected::parse(&[line]) {
                Ok(expected) => self.shows_up(&name, &expected, &command.place),
                Err(why) => self.fail(&command.place, &command.text, &why, ""),
            }
        }
    }

    /// Waits for `pending` to end, typing the keys of `triggers` as their text shows up.
    fn wait(&mut self, pending: &Pending, triggers: &mut [Trigger]) -> Option<i32> {
        let deadline = Instant::now() + COMMAND_DEADLINE;
        loop {
            for trigger in triggers.iter_mut().filter(|t| !t.fired) {
                let open = self
                    .terminals
                    .iter_mut()
                    .find(|o| o.terminal.name == trigger.terminal);
                if let Some(open) = open
                    && open.terminal.transcript().contains(&trigger.text)
                {
                    trigger.fired = true;
                    if let Err(why) = open.terminal.type_keys(&trigger.keys) {
                        self.failures.push(why);
                    }
                }
            }
            if let Some(status) = pending.status() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts a `terminal` block.
    fn open(&mut self, block: &Block, name: &str, answers_later: bool, keeps_running: bool) {
        let mut texts = Vec::new();
        let mut expected = Vec::new();
        for command in &block.commands {
            match fill(&command.text, &self.answers)
                .and_then(|(text, _)| Ok((text, Expected::parse(&command.documented)?)))
            {
                Ok((text, documented)) => {
                    texts.push(text);
                    expected.push(documented);
                }
                Err(why) => return self.fail(&command.place, &command.text, &why, ""),
            }
        }
        let terminal = Terminal::start(&self.root, &self.dir, name, &self.bin, &texts);
        let open = Open {
            terminal,
            place: block.place.clone(),
            expected,
            keeps_running,
        };
        let last = open.terminal.len().saturating_sub(1);
        let ready = answers_later
            || poll(SHOWS_UP, || {
                let transcript = open.terminal.transcript();
                let ended = (0..last).all(|i| open.terminal.status(i).is_some());
                (ended
                    && open
                        .expected
                        .iter()
                        .all(|e| e.check(&transcript, false).is_ok()))
                .then_some(())
            })
            .is_some();
        if !ready {
            let why =
                format!("terminal {name} did not show its documented output within {SHOWS_UP:?}");
            self.fail(
                &block.place,
                &block.lines.join("\n"),
                &why,
                &open.terminal.transcript(),
            );
        }
        self.terminals.push(open);
    }

    /// Types keys into a terminal before a block; with `wait_for_end`, waits for its last
    /// command to end, with status 0.
    fn type_now(&mut self, place: &str, name: &str, keys: &str, wait_for_end: bool) {
        let Some(open) = self.terminals.iter_mut().find(|o| o.terminal.name == name) else {
            return self
                .failures
                .push(format!("{place}: no terminal {name} to type into"));
        };
        if let Err(why) = open.terminal.type_keys(keys) {
            return self.failures.push(format!("{place}: {why}"));
        }
        let last = open.terminal.len() - 1;
        if wait_for_end && poll(SHOWS_UP, || open.terminal.status(last)) != Some(0) {
            let why = format!(
                "after typing {keys:?}, terminal {name} did not end with status 0 within {SHOWS_UP:?}"
            );
            let transcript = open.terminal.transcript();
            self.fail(place, keys, &why, &transcript);
        }
    }

    /// Waits for documented output in terminal `name`.
    fn shows_up(&mut self, name: &str, expected: &Expected, place: &str) {
        let Some(open) = self.terminals.iter().find(|o| o.terminal.name == name) else {
            return self.failures.push(format!("{place}: no terminal {name}"));
        };
        if poll(SHOWS_UP, || {
            expected.check(&open.terminal.transcript(), false).ok()
        })
        .is_none()
        {
            let why = expected
                .check(&open.terminal.transcript(), false)
                .err()
                .unwrap_or_default();
            let transcript = open.terminal.transcript();
            self.fail(place, &format!("(terminal {name})"), &why, &transcript);
        }
    }

    /// Every terminal's commands showed their output and ended as documented (or go on,
    /// with `keeps running`); then the terminals are closed.
    pub fn finish_terminals(&mut self) {
        for open in std::mem::take(&mut self.terminals) {
            let last = open.terminal.len().saturating_sub(1);
            for (index, expected) in open.expected.iter().enumerate() {
                let shown = poll(SHOWS_UP, || {
                    expected.check(&open.terminal.transcript(), false).ok()
                });
                let status = if index == last && open.keeps_running {
                    open.terminal.status(index).or(Some(expected.exit_status()))
                } else {
                    poll(SHOWS_UP, || open.terminal.status(index))
                };
                let why = match (shown, status) {
                    (None, _) => expected
                        .check(&open.terminal.transcript(), false)
                        .err()
                        .unwrap_or_default(),
                    (_, None) => format!("command {} did not end within {SHOWS_UP:?}", index + 1),
                    (_, Some(status)) if status != expected.exit_status() => {
                        format!(
                            "command {} exited {status}, not {}",
                            index + 1,
                            expected.exit_status()
                        )
                    }
                    _ => continue,
                };
                let what = format!("(terminal {})", open.terminal.name);
                self.fail(&open.place, &what, &why, &open.terminal.transcript());
            }
        }
    }

    /// Records a failure: where, the command as documented (`$TOKEN`s unexpanded), why,
    /// and the end of the output, secrets redacted.
    fn fail(&mut self, place: &str, command: &str, why: &str, output: &str) {
        let lines: Vec<&str> = output.lines().collect();
        let tail = lines[lines.len().saturating_sub(40)..].join("\n        ");
        let shown = command.replace('\n', "\n      ");
        let output = if tail.is_empty() {
            String::new()
        } else {
            format!("\n    output (end):\n        {tail}")
        };
        self.failures.push(redact(
            &format!("{place}: {why}\n    $ {shown}{output}"),
            &self.secrets,
        ));
    }
}

/// Checks an ended (or, `background`, started) command against its documented output.
fn judge(
    pending: &Pending,
    status: Option<i32>,
    expected: &Expected,
    background: bool,
) -> Result<(), String> {
    let status = status.ok_or_else(|| format!("did not end within {COMMAND_DEADLINE:?}"))?;
    if status != expected.exit_status() {
        return Err(format!("exited {status}, not {}", expected.exit_status()));
    }
    if background {
        return match poll(SHOWS_UP, || expected.check(&pending.output(), false).ok()) {
            Some(()) => Ok(()),
            None => expected.check(&pending.output(), false),
        };
    }
    expected.check(&pending.output(), true)
}

/// `NAME: rest` when NAME is one of `terminals`.
pub fn terminal_line(line: &str, terminals: &[String]) -> Option<(String, String)> {
    let (name, rest) = line.split_once(": ")?;
    terminals
        .iter()
        .any(|t| t == name)
        .then(|| (name.to_owned(), rest.trim().to_owned()))
}

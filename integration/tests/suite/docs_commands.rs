//! The docs stay true: every command of the README's grpcurl tour, and every grpcurl block
//! of docs/OPERATIONS.md, run against the stack, each checked against the output its
//! `# …` lines document (see [`expect`] for how `…`, JSON-ish and `Code:` lines compare).
//!
//! **The stack** is started the way the README says, `scripts/stack`, in its cheaper form
//! `scripts/stack --no-build` on the debug binaries (`SWITCHBOARD_STACK_PROFILE=debug`:
//! CI builds only those, `cargo build --workspace --bins` in `scripts/test`), with its own
//! state folder and free ports (`SWITCHBOARD_STACK_DIR`, `SWITCHBOARD_STACK_PORTS`: other
//! tests' servers bind port 0, which can be 50051). The commands run as the reader runs
//! them, in the repository, with the documented addresses, `.stack/`, `target/release/`,
//! `/tmp/sb-hooks` and the webhook port 8088 replaced by this run's. The quick start's two
//! commands are not re-run: the first (set-up, release build, the stack) is what this test
//! runs in its cheaper form, and the second, `scripts/test`, is what `.ci/run` runs — both
//! facts are checked by [`quick_start_shows_what_this_test_and_ci_run`].
//!
//! **Running.** All commands share one bash (variables and `… &` jobs carry over); each
//! must exit 0, or 64 + the gRPC code when its documented output is an error. A command
//! ending in `&` goes on in the background; the test goes on once its documented output
//! appeared. A `…` in a command is a value the reader copies from an earlier answer:
//! `NAME=ak_…  # the keyId printed above` or `-d '{"key_id": "ak_…"}'` take the `keyId`
//! of the latest answer that has one. Documented lines `# NAME: …` are expected in
//! terminal NAME (e.g. `# softphone: ended …`).
//!
//! **Markers**, one `<!-- docs-test: … -->` line each just above a block, for what cannot
//! run verbatim in one shell: `skip (why)`; `terminal NAME[, answers later][, keeps
//! running]` (the block runs in a terminal of its own, the test goes on once its documented
//! output appeared — at once with `answers later`; by the end every terminal's commands
//! must have ended as documented, unless `keeps running`); `type "KEYS" into NAME[ on
//! "TEXT"][ and wait for it to end]`; `eventually` (each command retried for 5 s: effects
//! documented as taking up to a second); `output of NAME` (a plain block of lines that
//! terminal NAME shows). A tour block that is neither `sh` nor marked, an unknown marker,
//! or a `…` the test cannot fill fails the test: a new command cannot escape the check.
//!
//! Output is never printed as is: tokens and secrets are redacted from failure messages.

mod doc;
mod expect;
mod shell;
mod tour;
mod values;

use std::path::{Path, PathBuf};
use std::time::Instant;

use integration::{ServiceProcess, free_port};

use doc::{Block, Marker};
use expect::Expected;
use shell::Stack;
use tour::{Tour, terminal_line};
use values::{fill_with, redact, stack_secrets};

/// Blocks of docs/OPERATIONS.md not run (that file carries no markers), by a text they hold.
const OPERATIONS_NOT_RUN: &[(&str, &str)] = &[(
    "grpcurl -cacert",
    "needs a TLS deployment; the stack is plaintext (tls.rs tests TLS)",
)];

#[test]
fn quick_start_shows_what_this_test_and_ci_run() {
    let root = root();
    let readme = std::fs::read_to_string(root.join("README.md")).unwrap();
    let blocks = doc::blocks("README.md", &readme, |h| h == "Two commands").unwrap();
    let [block] = blocks.as_slice() else {
        panic!("`## Two commands` should hold one block")
    };
    let commands: Vec<&str> = block
        .lines
        .iter()
        .map(|line| line.split('#').next().unwrap_or_default().trim())
        .filter(|command| !command.is_empty())
        .collect();
    assert_eq!(
        commands,
        ["scripts/stack", "scripts/test"],
        "the quick start changed: update this test"
    );
    let ci = std::fs::read_to_string(root.join(".ci/run")).unwrap();
    assert!(
        ci.lines()
            .any(|line| matches!(line.trim(), "exec scripts/test" | "scripts/test")),
        ".ci/run should run scripts/test, as the README says CI does"
    );
}

/// The README's `scripts/stack demo`: the stack, then every step of `switchboard-demo`
/// against it, exits 0 (on the debug binaries, with its own folder and ports).
#[test]
fn the_stack_demo_passes_every_step() {
    let root = root();
    let dir = tempfile::tempdir().unwrap();
    let mut ports: Vec<u16> = Vec::new();
    while ports.len() < 5 {
        let port = free_port();
        if !ports.contains(&port) {
            ports.push(port);
        }
    }
    let log = dir.path().join("demo.log");
    let output = std::fs::File::create(&log).unwrap();
    let mut child = std::process::Command::new(root.join("scripts/stack"))
        .args(["--no-build", "demo"])
        .env("SWITCHBOARD_STACK_PROFILE", "debug")
        .env("SWITCHBOARD_STACK_DIR", dir.path().join("state"))
        .env(
            "SWITCHBOARD_STACK_PORTS",
            ports
                .iter()
                .map(u16::to_string)
                .collect::<Vec<_>>()
                .join(","),
        )
        .stdin(std::process::Stdio::null())
        .stdout(output.try_clone().unwrap())
        .stderr(output)
        .spawn()
        .expect("run scripts/stack");
    let status = shell::poll(std::time::Duration::from_secs(300), || {
        child.try_wait().ok().flatten()
    });
    let Some(status) = status else {
        let _ = child.kill();
        panic!(
            "scripts/stack demo did not end within 5 minutes; its output:\n{}",
            redact(&shell::read(&log), &[])
        );
    };
    let printed = shell::read(&log);
    assert!(
        status.success() && printed.contains("== 6. ") && printed.contains("demo passed"),
        "scripts/stack demo exited {status}; its output:\n{}",
        redact(&printed, &[])
    );
}

#[test]
fn every_tour_block_is_run_or_marked() {
    let blocks = documented_blocks(&root(), &[]);
    let mut terminals = Vec::new();
    for block in &blocks {
        for marker in &block.markers {
            match marker {
                Marker::Terminal { name, .. } => terminals.push(name.clone()),
                Marker::Type { into: name, .. } | Marker::OutputOf(name) => {
                    assert!(
                        terminals.contains(name),
                        "{}: no terminal {name} opened above",
                        block.place
                    )
                }
                Marker::Skip(_) | Marker::Eventually => {}
            }
        }
        let skipped = block.markers.iter().any(|m| matches!(m, Marker::Skip(_)));
        let checked = skipped
            || block
                .markers
                .iter()
                .any(|m| matches!(m, Marker::OutputOf(_)));
        assert!(
            block.lang == "sh" || checked,
            "{}: a ``` block neither run nor marked",
            block.place
        );
        for command in block.commands.iter().filter(|_| !skipped) {
            let documented: Vec<String> = command
                .documented
                .iter()
                .map(|line| terminal_line(line, &terminals).map_or(line.clone(), |(_, rest)| rest))
                .collect();
            Expected::parse(&documented).unwrap_or_else(|why| panic!("{}: {why}", command.place));
            fill_with(&command.text, |_, pattern| Ok(pattern.replace('…', "x")))
                .unwrap_or_else(|why| panic!("{}: {why}", command.place));
        }
    }
}

#[test]
fn readme_tour_and_operations_commands_give_their_documented_results() {
    let root = root();
    let bin = root.join("target/debug");
    let built = ServiceProcess::binary("presence-svc");
    assert_eq!(
        built.parent(),
        Some(bin.as_path()),
        "scripts/stack runs target/debug"
    );
    let tools = std::process::Command::new("bash")
        .args([
            "-c",
            "command -v grpcurl && command -v python3 && command -v script",
        ])
        .output()
        .unwrap();
    assert!(
        tools.status.success(),
        "the tour needs grpcurl, python3 and script (util-linux) on PATH; found only:\n{}",
        String::from_utf8_lossy(&tools.stdout)
    );
    let dir = tempfile::tempdir().unwrap();
    let mut ports = Vec::new();
    while ports.len() < 6 {
        let port = free_port();
        if !ports.contains(&port) {
            ports.push(port);
        }
    }
    let stack_ports = [ports[0], ports[1], ports[2], ports[3], ports[4]];
    let mut stack = Stack::start(&root, dir.path(), stack_ports).unwrap_or_else(|why| {
        let log = shell::read(&dir.path().join("stack.log"));
        panic!("{why}; its output:\n{}", redact(&log, &[]))
    });
    let env = stack.state.join("env");
    let substitutions = [
        ("127.0.0.1:50051", format!("127.0.0.1:{}", ports[2])),
        ("127.0.0.1:50052", format!("127.0.0.1:{}", ports[3])),
        ("127.0.0.1:50053", format!("127.0.0.1:{}", ports[4])),
        (":8088", format!(":{}", ports[5])),
        (" 8088 ", format!(" {} ", ports[5])),
        ("target/release/", format!("{}/", bin.display())),
        (".stack/", format!("{}/", stack.state.display())),
        (
            "/tmp/sb-hooks",
            dir.path().join("sb-hooks").display().to_string(),
        ),
    ]
    .map(|(from, to)| (from.to_owned(), to));
    let blocks = documented_blocks(&root, &substitutions);
    let (readme, operations): (Vec<&Block>, Vec<&Block>) =
        blocks.iter().partition(|b| b.place.starts_with("README"));

    let started = Instant::now();
    let mut tour = Tour::new(&root, dir.path(), &bin, stack_secrets(&env));
    for block in readme {
        tour.block(block);
    }
    tour.finish_terminals();
    // An operator's shell has the platform secret in its environment: the stack's env file.
    tour.new_shell("operations", &format!(". '{}'", env.display()));
    for block in operations {
        let not_run = OPERATIONS_NOT_RUN
            .iter()
            .any(|(text, _)| block.lines.iter().any(|l| l.contains(text)));
        if !not_run {
            tour.block(block);
        }
    }
    tour.finish_terminals();
    let mut failures = tour.into_failures();
    match stack.stop() {
        Ok(status) if status.success() => {}
        Ok(status) => failures.push(format!("scripts/stack exited {status} on SIGTERM, not 0")),
        Err(why) => failures.push(why),
    }
    assert!(
        failures.is_empty(),
        "{} documented command(s) do not do what the docs say (ran {:.1?}):\n\n{}",
        failures.len(),
        started.elapsed(),
        failures.join("\n\n")
    );
}

/// The repository.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the workspace")
        .to_owned()
}

/// The README's tour blocks, then docs/OPERATIONS.md's blocks with grpcurl in them, with
/// `substitutions` applied.
fn documented_blocks(root: &Path, substitutions: &[(String, String)]) -> Vec<Block> {
    let read = |file: &str| {
        let text =
            std::fs::read_to_string(root.join(file)).unwrap_or_else(|err| panic!("{file}: {err}"));
        substitutions
            .iter()
            .fold(text, |text, (from, to)| text.replace(from, to))
    };
    let mut blocks =
        doc::blocks("README.md", &read("README.md"), |h| h == "A grpcurl tour").unwrap();
    assert!(
        blocks.len() > 10,
        "the README's `## A grpcurl tour` is gone? this test runs its blocks"
    );
    let operations =
        doc::blocks("docs/OPERATIONS.md", &read("docs/OPERATIONS.md"), |_| true).unwrap();
    blocks.extend(
        operations
            .into_iter()
            .filter(|b| b.lang == "sh" && b.lines.iter().any(|l| l.contains("grpcurl "))),
    );
    blocks
}

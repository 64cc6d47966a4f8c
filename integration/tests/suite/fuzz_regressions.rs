//! Replays the fuzz targets' seed corpus (`fuzz/corpus/<target>/`) and every input a fuzzer
//! ever crashed on (`fuzz/regressions/<target>/`) through the same functions the targets
//! call, on stable: a crash fixed once stays fixed. `scripts/fuzz` runs the fuzzers.

use std::path::{Path, PathBuf};

/// The body of a fuzz target.
type Target = fn(&[u8]);

/// Every target and the function its fuzz target calls.
const TARGETS: [(&str, Target); 5] = [
    ("instruction_xml", router_svc::fuzzing::instruction_xml),
    ("jwt_verify", plumbing::fuzzing::jwt_verify),
    (
        "presence_requests",
        presence_svc::fuzzing::presence_requests,
    ),
    ("limiter_requests", limiter_svc::fuzzing::limiter_requests),
    ("router_requests", router_svc::fuzzing::router_requests),
];

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz")
}

/// The inputs under `fuzz/<kind>/<target>/` (hidden files such as `.gitkeep` aside).
fn inputs(kind: &str, target: &str) -> Vec<(PathBuf, Vec<u8>)> {
    let dir = fuzz_dir().join(kind).join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|p| {
            let data = std::fs::read(&p).unwrap();
            (p, data)
        })
        .collect()
}

fn replay(kind: &str) -> usize {
    let mut replayed = 0;
    for (target, run) in TARGETS {
        for (path, data) in inputs(kind, target) {
            let outcome = std::panic::catch_unwind(|| run(&data));
            assert!(outcome.is_ok(), "{target} panics on {}", path.display());
            replayed += 1;
        }
    }
    replayed
}

#[test]
fn fuzz_seed_corpus_replays_without_a_panic() {
    for (target, _) in TARGETS {
        assert!(
            !inputs("corpus", target).is_empty(),
            "fuzz/corpus/{target} has no seeds"
        );
    }
    assert!(replay("corpus") > 0);
}

#[test]
fn fuzz_crash_inputs_stay_fixed() {
    replay("regressions");
}

#[test]
fn fuzz_seeds_are_valid_inputs() {
    for (path, data) in inputs("corpus", "instruction_xml") {
        let document = std::str::from_utf8(&data).unwrap();
        let parsed = router_svc::xml::parse(document);
        assert!(parsed.is_ok(), "{}: {parsed:?}", path.display());
    }
    let verifier = plumbing::fuzzing::verifier();
    for name in ["raw_account_token", "raw_bearer_platform"] {
        let path = fuzz_dir().join("corpus/jwt_verify").join(name);
        let token = String::from_utf8(std::fs::read(path).unwrap()[1..].to_vec()).unwrap();
        let value = if token.starts_with("Bearer ") {
            token
        } else {
            format!("Bearer {token}")
        };
        let caller = verifier.verify(Some(&value), plumbing::fuzzing::NOW);
        assert!(caller.is_ok(), "{name}: {caller:?}");
    }
}

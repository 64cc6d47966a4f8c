//! Where the demo finds the stack: the environment file `scripts/stack` writes
//! (`.stack/env`, `export NAME='value'` lines), then the process environment.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use crate::Failure;

/// The values of one environment file, looked up before the process environment.
#[derive(Debug, Default)]
pub struct StackEnv {
    /// The file read (for messages), `None` when there was none.
    file: Option<PathBuf>,
    values: BTreeMap<String, String>,
}

impl StackEnv {
    /// Reads `path`; a missing file gives an empty set (the process environment may hold
    /// every value), an unreadable one an error.
    pub fn read(path: &Path) -> Result<Self, Failure> {
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(Self {
                file: Some(path.to_path_buf()),
                values: parse(&text),
            }),
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => Ok(Self::default()),
            Err(err) => Err(Failure::new(format!(
                "cannot read {}: {err}",
                path.display()
            ))),
        }
    }

    /// `name` from the file, else from the process environment.
    pub fn get(&self, name: &str) -> Option<String> {
        self.values
            .get(name)
            .cloned()
            .or_else(|| std::env::var(name).ok())
            .filter(|value| !value.is_empty())
    }

    /// As [`StackEnv::get`], failing with where it looked when `name` is set nowhere.
    pub fn require(&self, name: &str) -> Result<String, Failure> {
        self.get(name).ok_or_else(|| {
            let file = self.file.as_ref().map_or_else(
                || "no environment file".to_owned(),
                |file| format!("not in {}", file.display()),
            );
            Failure::new(format!(
                "{name} is not set ({file}, nor in the environment): start the stack with \
                 scripts/stack, or pass --env FILE"
            ))
        })
    }
}

/// `export NAME='value'` (or `NAME=value`) lines; comments and other lines are skipped.
/// The stack's values never hold a quote, so no shell unquoting beyond the outer pair.
fn parse(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .map(str::trim)
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let line = line.strip_prefix("export ").unwrap_or(line);
            let (name, value) = line.split_once('=')?;
            let value = value
                .strip_prefix('\'')
                .and_then(|v| v.strip_suffix('\''))
                .or_else(|| value.strip_prefix('"').and_then(|v| v.strip_suffix('"')))
                .unwrap_or(value);
            Some((name.trim().to_owned(), value.to_owned()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_export_lines_and_skips_comments() {
        let values = parse(
            "# Written by scripts/stack\nexport DEMO_TOKEN='eyJ.a.b'\nROUTER_ADDR=127.0.0.1:1\n\
             export EMPTY=''\nnot a value\n",
        );
        assert_eq!(
            values.get("DEMO_TOKEN").map(String::as_str),
            Some("eyJ.a.b")
        );
        assert_eq!(
            values.get("ROUTER_ADDR").map(String::as_str),
            Some("127.0.0.1:1")
        );
        assert_eq!(values.get("EMPTY").map(String::as_str), Some(""));
        assert_eq!(values.len(), 3);
    }
}

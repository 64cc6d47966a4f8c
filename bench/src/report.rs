//! The printed report: header, one markdown row per measurement, then `ratio` lines. It also
//! keeps what the charts ([`super::chart`]) need: which scenario added which rows, and
//! curves measured along the way.

use std::io::Write as _;
use std::ops::Range;
use std::time::Duration;

use super::stack::WindowFacts;
use super::{CALLERS_PER_CHANNEL, OP_TIMEOUT, Options, sys};

/// Cores other processes may use during a measurement before the report warns.
const NOISE_CORES: f64 = 0.2;

/// One headline figure and its goal.
#[derive(Debug, Clone)]
pub struct Ratio {
    /// `limiter_vs_naive_etcd`.
    pub name: String,
    /// The figure.
    pub value: f64,
    /// The goal, e.g. `≥ 4`.
    pub goal: Goal,
}

/// A goal of docs/CONTRACT.md §6.
#[derive(Debug, Clone, Copy)]
pub enum Goal {
    /// The figure must be at least this.
    AtLeast(f64),
    /// The figure must be at most this.
    AtMost(f64),
    /// No goal of its own: reported to explain another figure.
    Report,
}

impl Goal {
    fn met(self, value: f64) -> bool {
        match self {
            Goal::AtLeast(goal) => value >= goal,
            Goal::AtMost(goal) => value <= goal,
            Goal::Report => true,
        }
    }

    pub(super) fn text(self) -> String {
        match self {
            Goal::AtLeast(goal) => format!(">= {goal}"),
            Goal::AtMost(goal) => format!("<= {goal}"),
            Goal::Report => "none".to_owned(),
        }
    }
}

/// One table row.
#[derive(Debug, Clone)]
pub struct Row {
    /// `limiter_pairs`.
    pub name: String,
    /// Operations per second.
    pub rate: f64,
    /// What an operation is: `calls/s`, `pairs/s`.
    pub unit: &'static str,
    /// Median latency.
    pub p50: Duration,
    /// 99th percentile latency.
    pub p99: Duration,
    /// Anything worth saying.
    pub notes: String,
}

/// Measured points of one quantity against another, not printed: a chart draws them.
#[derive(Debug, Clone)]
pub struct Curve {
    /// The chart's file name without `.svg`: `presence_rss`.
    pub name: String,
    /// The chart's title.
    pub title: String,
    /// How the points were taken (the chart's subtitle).
    pub about: String,
    /// The horizontal axis: `open Connect sessions`.
    pub x_label: String,
    /// The vertical axis: `presence-svc RSS (MiB)`.
    pub y_label: String,
    /// `(x, y)`, in the order measured.
    pub points: Vec<(f64, f64)>,
}

/// The report of a run; rows print as they are added.
#[derive(Debug, Default)]
pub struct Report {
    /// Rows so far.
    pub rows: Vec<Row>,
    /// Headline figures so far.
    pub ratios: Vec<Ratio>,
    /// Lines printed after the ratios (service log summaries, remarks).
    pub remarks: Vec<String>,
    /// The scenarios run so far, each with the index of its first row (for the charts).
    pub scenarios: Vec<(&'static str, usize)>,
    /// Curves measured so far (for the charts).
    pub curves: Vec<Curve>,
}

impl Report {
    /// Prints the header and the table's head.
    pub fn start(options: &Options, command: &str) -> Self {
        let etcd = integration::Etcd::binary();
        let build = if cfg!(debug_assertions) {
            "DEBUG build: figures are meaningless, use --release"
        } else {
            "release"
        };
        out(&format!(
            "# Switchboard benchmark\n\n\
             - date: {}\n\
             - machine: {} (load average at start: {})\n\
             - command: `{command}`\n\
             - etcd: {} ({}), single member on loopback, fsync on\n\
             - build: {build}\n\
             - load: {} concurrent callers, one HTTP/2 channel (or etcd client) per {} callers of a target, \
             warmup {:.0?} then {:.0?} measured per row, {:.0?} deadline per operation\n\n\
             | name | ops/s | p50 | p99 | notes |\n\
             |---|---:|---:|---:|---|",
            sys::now_utc(),
            sys::machine(),
            sys::load_average(),
            etcd.display(),
            sys::version_of(&etcd),
            options.concurrency,
            CALLERS_PER_CHANNEL,
            options.warmup,
            options.duration,
            OP_TIMEOUT,
        ));
        Self::default()
    }

    /// Marks the start of `scenario`: the rows added from now on are its own.
    pub fn begin_scenario(&mut self, scenario: &'static str) {
        self.scenarios.push((scenario, self.rows.len()));
    }

    /// Each scenario run with the range of its rows in [`Report::rows`], in order.
    pub fn scenario_rows(&self) -> Vec<(&'static str, Range<usize>)> {
        let ends =
            (self.scenarios.iter().skip(1).map(|(_, first)| *first)).chain([self.rows.len()]);
        self.scenarios
            .iter()
            .zip(ends)
            .map(|((name, first), end)| (*name, *first..end))
            .collect()
    }

    /// Adds a curve (drawn by the charts, not printed).
    pub fn curve(&mut self, curve: Curve) {
        self.curves.push(curve);
    }

    /// Adds and prints a row.
    pub fn row(&mut self, row: Row) {
        out(&format!(
            "| {} | {} {} | {} | {} | {} |",
            row.name,
            thousands(row.rate),
            row.unit,
            millis(row.p50),
            millis(row.p99),
            row.notes.replace('|', "/")
        ));
        self.rows.push(row);
    }

    /// Adds a headline figure (printed by [`Report::finish`]).
    pub fn ratio(&mut self, name: &str, value: f64, goal: Goal) {
        self.ratios.push(Ratio {
            name: name.to_owned(),
            value,
            goal,
        });
    }

    /// Adds a WARNING remark when other processes used more than [`NOISE_CORES`] during
    /// any of `windows` (the measurements of `scenario`).
    pub fn warn_noise(&mut self, scenario: &str, windows: &[&WindowFacts]) {
        let noise = windows
            .iter()
            .filter_map(|facts| facts.other_cores)
            .fold(0.0_f64, f64::max);
        if noise > NOISE_CORES {
            self.remarks.push(format!(
                "WARNING: other processes used up to {noise:.2} cores during the {scenario} \
                 measurements; the machine was not quiet and these figures are disturbed"
            ));
        }
    }

    /// Prints the ratio lines, the goals, and the remarks.
    pub fn finish(&self) {
        let mut text = String::from("\n");
        for ratio in &self.ratios {
            text.push_str(&format!("ratio {} {:.2}\n", ratio.name, ratio.value));
        }
        if !self.ratios.is_empty() {
            text.push_str("\ngoals (docs/CONTRACT.md §6):\n");
            for ratio in &self.ratios {
                let verdict = match ratio.goal {
                    Goal::Report => "reported",
                    goal if goal.met(ratio.value) => "met",
                    _ => "MISSED",
                };
                text.push_str(&format!(
                    "- {} {:.2} (goal {}): {verdict}\n",
                    ratio.name,
                    ratio.value,
                    ratio.goal.text(),
                ));
            }
        }
        if !self.remarks.is_empty() {
            text.push('\n');
            for remark in &self.remarks {
                text.push_str(remark);
                text.push('\n');
            }
        }
        out(text.trim_end());
    }
}

fn out(text: &str) {
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{text}");
    let _ = stdout.flush();
}

/// `12,345`.
pub fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value.max(0.0));
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// `1.23 ms`.
pub fn millis(value: Duration) -> String {
    format!("{:.2} ms", value.as_secs_f64() * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::thousands;

    #[test]
    fn thousands_separators() {
        assert_eq!(thousands(0.4), "0");
        assert_eq!(thousands(999.0), "999");
        assert_eq!(thousands(1234.0), "1,234");
        assert_eq!(thousands(1_234_567.0), "1,234,567");
    }
}

//! The soak's report: the checks, then what the load, the faults, the slots, the keys and
//! the processes' memory did, as markdown tables, then one `soak NAME VALUE` line per
//! figure (the same figures [`Report::figure`] answers).

use std::fmt::{self, Write as _};
use std::time::Duration;

use super::Options;
use super::faults::Injected;
use super::keys::Leftovers;
use super::limiter::SlotFigures;
use super::pace::Tally;
use super::rss::ProcessRss;
use super::watch::WatchFigures;

/// Everything a soak run found.
#[derive(Debug, Clone)]
pub struct Report {
    pub(super) options: Options,
    pub(super) tallies: Vec<Tally>,
    pub(super) faults: Vec<Injected>,
    pub(super) watch: WatchFigures,
    pub(super) slots: SlotFigures,
    /// Communications still running once the load had ended (routers' owned index), and
    /// how long after they were none.
    pub(super) running_after_load: (Option<u64>, Option<Duration>),
    /// The same once router-svc#2 had stopped and router-svc#1 had had time to settle what
    /// it left.
    pub(super) running_after_router_stop: (Option<u64>, Option<Duration>),
    pub(super) keys: Leftovers,
    pub(super) rss: Vec<ProcessRss>,
    pub(super) exited: Vec<String>,
    /// Notes: services that did not stop cleanly, ERROR lines in their logs.
    pub remarks: Vec<String>,
}

/// One check: what was measured against what passes.
struct Check {
    name: String,
    value: String,
    bound: String,
    passed: bool,
}

const SERVICES: [&str; 3] = ["limiter-svc", "presence-svc", "router-svc"];

impl Report {
    /// Whether every check held.
    pub fn passed(&self) -> bool {
        self.checks().iter().all(|c| c.passed)
    }

    /// The checks that failed, one line each.
    pub fn failures(&self) -> Vec<String> {
        self.checks()
            .into_iter()
            .filter(|c| !c.passed)
            .map(|c| format!("{}: {} (bound {})", c.name, c.value, c.bound))
            .collect()
    }

    /// The figure `name` of the `soak NAME VALUE` lines.
    pub fn figure(&self, name: &str) -> Option<f64> {
        self.figures()
            .into_iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v)
    }

    /// The highest slope among `service`'s processes, MiB per minute.
    fn slope_of(&self, service: &str) -> Option<f64> {
        self.rss
            .iter()
            .filter(|p| p.service == service)
            .filter_map(|p| p.slope)
            .reduce(f64::max)
    }

    /// The largest growth (last − first after the warm-up) among `service`'s processes.
    fn growth_of(&self, service: &str) -> Option<f64> {
        self.rss
            .iter()
            .filter(|p| p.service == service && p.samples > 0)
            .map(|p| p.last_mib - p.first_mib)
            .reduce(f64::max)
    }

    fn checks(&self) -> Vec<Check> {
        let count = |n: u64| n.to_string();
        let mut checks = vec![
            Check {
                name: "slots leaked (limiter in_flight after the drain)".to_owned(),
                value: self.slots.leaked.map_or("unknown".to_owned(), count),
                bound: "0".to_owned(),
                passed: self.slots.leaked == Some(0),
            },
            Check {
                name: "slots outstanding in the callers' ledger".to_owned(),
                value: count(self.slots.client_outstanding),
                bound: "0".to_owned(),
                passed: self.slots.client_outstanding == 0,
            },
            Check {
                name: "etcd keys left over that should not be".to_owned(),
                value: count(self.keys.leaked()),
                bound: "0".to_owned(),
                passed: self.keys.leaked() == 0,
            },
            Check {
                name: "watch events lost".to_owned(),
                value: format!(
                    "{} of {} acknowledged changes",
                    self.watch.lost, self.watch.acknowledged
                ),
                bound: "0".to_owned(),
                passed: self.watch.lost == 0 && self.watch.acknowledged > 0,
            },
            Check {
                name: "communications still running 30 s after the load".to_owned(),
                value: running_text(self.running_after_load),
                bound: "0 (every Dial has timeLimit 20 s)".to_owned(),
                passed: self.running_after_load.1.is_some(),
            },
            Check {
                name: "services exited unexpectedly".to_owned(),
                value: count(self.exited.len() as u64),
                bound: "0".to_owned(),
                passed: self.exited.is_empty(),
            },
        ];
        for service in SERVICES {
            let slope = self.slope_of(service);
            checks.push(Check {
                name: format!("RSS slope after warm-up, {service}"),
                value: slope.map_or("no window".to_owned(), |s| format!("{s:+.2} MiB/min")),
                bound: format!("≤ {:.2} MiB/min", self.options.max_rss_slope),
                passed: slope.is_some_and(|s| s <= self.options.max_rss_slope),
            });
        }
        for tally in &self.tallies {
            checks.push(Check {
                name: format!("{} operations that succeeded", tally.name),
                value: format!("{} of {}", tally.ok, tally.started),
                bound: "> 0".to_owned(),
                passed: tally.ok > 0,
            });
        }
        checks
    }

    fn figures(&self) -> Vec<(String, f64)> {
        let mut figures = vec![
            (
                "minutes".to_owned(),
                self.options.duration.as_secs_f64() / 60.0,
            ),
            ("faults".to_owned(), self.faults.len() as f64),
            (
                "slots_leaked".to_owned(),
                self.slots.leaked.map_or(f64::NAN, |n| n as f64),
            ),
            (
                "slots_outstanding".to_owned(),
                self.slots.client_outstanding as f64,
            ),
            ("slots_granted".to_owned(), self.slots.granted as f64),
            ("slots_crashed".to_owned(), self.slots.crashed as f64),
            ("keys_leaked".to_owned(), self.keys.leaked() as f64),
            ("keys_durable".to_owned(), self.keys.durable() as f64),
            ("keys_expiring".to_owned(), self.keys.expiring() as f64),
            (
                "watch_acknowledged".to_owned(),
                self.watch.acknowledged as f64,
            ),
            ("watch_lost".to_owned(), self.watch.lost as f64),
            ("watch_streams".to_owned(), self.watch.streams as f64),
            (
                "comms_running_after_load".to_owned(),
                self.running_after_load.0.map_or(f64::NAN, |n| n as f64),
            ),
            ("services_exited".to_owned(), self.exited.len() as f64),
        ];
        for service in SERVICES {
            let slope = self.slope_of(service).unwrap_or(f64::NAN);
            figures.push((format!("rss_slope_mib_per_min.{service}"), slope));
            let growth = self.growth_of(service).unwrap_or(f64::NAN);
            figures.push((format!("rss_growth_mib.{service}"), growth));
        }
        for tally in &self.tallies {
            figures.push((format!("ops_ok.{}", tally.name), tally.ok as f64));
            figures.push((format!("ops_failed.{}", tally.name), tally.failed() as f64));
        }
        figures.push(("passed".to_owned(), f64::from(u8::from(self.passed()))));
        figures
    }
}

/// `none after 0.3 s`, `2 still running at the deadline`.
fn running_text((running, settled): (Option<u64>, Option<Duration>)) -> String {
    match (running, settled) {
        (_, Some(d)) => format!("none after {}", secs(d)),
        (Some(n), None) => format!("{n} still running at the deadline"),
        (None, None) => "unknown (etcd unreadable)".to_owned(),
    }
}

fn secs(d: Duration) -> String {
    format!("{:.1} s", d.as_secs_f64())
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let o = &self.options;
        writeln!(
            f,
            "## Soak: {:.1} min, warm-up {}, a fault every {}\n",
            o.duration.as_secs_f64() / 60.0,
            secs(o.warmup),
            secs(o.fault_every)
        )?;
        writeln!(
            f,
            "`{}` — {} cores; 3-member etcd, 2 replicas of each service from {}\n",
            o.command,
            std::thread::available_parallelism().map_or(0, usize::from),
            o.binaries.display()
        )?;
        writeln!(
            f,
            "| check | value | passes at | result |\n|---|---|---|---|"
        )?;
        for c in self.checks() {
            let result = if c.passed { "ok" } else { "**FAILED**" };
            writeln!(f, "| {} | {} | {} | {result} |", c.name, c.value, c.bound)?;
        }
        self.write_load(f)?;
        self.write_slots_and_watch(f)?;
        self.write_keys(f)?;
        self.write_rss(f)?;
        for remark in self.exited.iter().chain(&self.remarks) {
            writeln!(f, "- {remark}")?;
        }
        writeln!(f)?;
        for (name, value) in self.figures() {
            writeln!(f, "soak {name} {}", trim(value))?;
        }
        Ok(())
    }
}

impl Report {
    fn write_load(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "\n| load | started | ok | failed | failures (first failing call) |\n|---|---|---|---|---|"
        )?;
        for t in &self.tallies {
            let mut failures = String::new();
            for (text, n) in &t.failures {
                let _ = write!(failures, "{text} ×{n}; ");
            }
            writeln!(
                f,
                "| {} | {} | {} | {} | {} |",
                t.name,
                t.started,
                t.ok,
                t.failed(),
                failures.trim_end_matches("; ").replace('|', "/")
            )?;
        }
        writeln!(f, "\nFaults injected ({}):", self.faults.len())?;
        for fault in &self.faults {
            writeln!(
                f,
                "- at {:.0} s: {} (whole again after {})",
                fault.at.as_secs_f64(),
                fault.what,
                secs(fault.took)
            )?;
        }
        Ok(())
    }

    fn write_slots_and_watch(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.slots;
        writeln!(
            f,
            "\nSlots: {} granted, {} rejected, {} released, {} held by callers that crashed; \
             {} releases answered not-held at the first attempt, {} releases and {} acquires \
             that failed every attempt. Right after the load the limiter counted {} in \
             flight, the callers {} unexpired; {}{}.",
            s.granted,
            s.rejected,
            s.released,
            s.crashed,
            s.refused,
            s.abandoned,
            s.unknown,
            s.server_at_load_end
                .map_or("unknown".to_owned(), |n| n.to_string()),
            s.client_at_load_end,
            s.drained_after
                .map_or("NOT drained before the deadline".to_owned(), |d| {
                    format!("both were 0 {} after the load", secs(d))
                }),
            if s.left.is_empty() {
                String::new()
            } else {
                format!(" (left: {})", s.left.join(", "))
            }
        )?;
        writeln!(
            f,
            "\nCommunications running (routers' owned index) after the load: {}; after \
             router-svc#2 stopped: {}.",
            running_text(self.running_after_load),
            running_text(self.running_after_router_stop)
        )?;
        let w = &self.watch;
        writeln!(
            f,
            "\nWatch: {} acknowledged presence changes, {} lost{}; {} events received over {} \
             streams ({} broke by themselves, the rest moved on purpose), {} compacted; {}.",
            w.acknowledged,
            w.lost,
            if w.lost_samples.is_empty() {
                String::new()
            } else {
                format!(" (e.g. {})", w.lost_samples.join("; "))
            },
            w.events,
            w.streams,
            w.breaks,
            w.compacted,
            if w.caught_up {
                "it reached the last acknowledged revision"
            } else {
                "it did NOT reach the last acknowledged revision in time"
            }
        )
    }

    fn write_keys(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "\nKeys under the prefix after the services stopped ({}):\n\n\
             | family | kind | keys | longest lease TTL left | e.g. |\n|---|---|---|---|---|",
            self.keys
                .clean_after
                .map_or("leaks still there at the deadline".to_owned(), |d| {
                    format!("no leaked family {} after the stop", secs(d))
                })
        )?;
        for (family, count) in &self.keys.families {
            writeln!(
                f,
                "| {family:?} | {} | {} | {} | {} |",
                family.kind(),
                count.keys,
                count
                    .max_ttl
                    .map_or("no lease".to_owned(), |t| format!("{t} s")),
                count.samples.join(", ")
            )?;
        }
        Ok(())
    }

    fn write_rss(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "\n| process | restarts | samples after warm-up | RSS then | RSS at the end | peak | \
             slope |\n|---|---|---|---|---|---|---|"
        )?;
        for p in &self.rss {
            writeln!(
                f,
                "| {} | {} | {} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {} |",
                p.label,
                p.restarts,
                p.samples,
                p.first_mib,
                p.last_mib,
                p.peak_mib,
                p.slope
                    .map_or("no window".to_owned(), |s| format!("{s:+.2} MiB/min"))
            )?;
        }
        writeln!(f)
    }
}

/// `3`, `0.25`, `nan`: whole numbers without decimals.
fn trim(value: f64) -> String {
    if value.is_finite() && value.fract() == 0.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.3}")
    }
}

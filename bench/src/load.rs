//! The closed-loop load generator: N callers, a warmup, a measured window.

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio::time::Instant;

use super::{CALLERS_PER_CHANNEL, OP_TIMEOUT, Options, Result, sys};

/// Pause of a caller after a failed operation, so that a failing target is not spun on.
const ERROR_PAUSE: Duration = Duration::from_millis(10);
/// Distinct error texts kept per measurement; the rest are counted as "other".
const ERROR_KINDS: usize = 16;

/// One caller's operation, run in a loop.
pub trait Worker: Send + 'static {
    /// Does one operation; `Err` holds what went wrong (code and message).
    fn call(&mut self) -> impl Future<Output = std::result::Result<(), String>> + Send;
}

/// When a measurement's phases begin and end.
#[derive(Debug, Clone, Copy)]
pub struct Plan {
    /// Start of the measured window (end of the warmup).
    pub measure_start: Instant,
    /// End of the measured window; callers start nothing after it.
    pub end: Instant,
}

impl Plan {
    /// A plan starting now.
    pub fn new(options: &Options) -> Self {
        let measure_start = Instant::now() + options.warmup;
        Self {
            measure_start,
            end: measure_start + options.duration,
        }
    }

    /// Seconds of the measured window.
    pub fn seconds(&self) -> f64 {
        (self.end - self.measure_start).as_secs_f64()
    }

    /// Runs `probe` at the start and at the end of the measured window, on its own task.
    pub fn probe<T, F, Fut>(&self, mut probe: F) -> tokio::task::JoinHandle<(T, T)>
    where
        T: Send + 'static,
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = T> + Send,
    {
        let plan = *self;
        tokio::spawn(async move {
            tokio::time::sleep_until(plan.measure_start).await;
            let first = probe().await;
            tokio::time::sleep_until(plan.end).await;
            let last = probe().await;
            (first, last)
        })
    }
}

/// What a measurement found.
#[derive(Debug, Default)]
pub struct Sample {
    /// Latencies of the operations completed in the window, sorted (nanoseconds).
    pub latencies: Vec<u64>,
    /// Seconds of the window.
    pub seconds: f64,
    /// Failed operations in the window.
    pub window_errors: u64,
    /// Every failure of the measurement (warmup included), by text.
    pub errors: BTreeMap<String, u64>,
}

impl Sample {
    /// Completed operations per second.
    pub fn rate(&self) -> f64 {
        if self.seconds > 0.0 {
            self.latencies.len() as f64 / self.seconds
        } else {
            0.0
        }
    }

    /// Nearest-rank percentile `q` (0–1) of the latencies.
    pub fn percentile(&self, q: f64) -> Duration {
        percentile(&self.latencies, q)
    }

    /// `errors N (text ×count; …)` or `no errors`.
    pub fn error_note(&self) -> String {
        let total: u64 = self.errors.values().sum();
        if total == 0 {
            return "no errors".to_owned();
        }
        let kinds: Vec<String> = self
            .errors
            .iter()
            .take(3)
            .map(|(text, count)| format!("{text} ×{count}"))
            .collect();
        format!(
            "ERRORS {total} ({} in window): {}",
            self.window_errors,
            kinds.join("; ")
        )
    }
}

/// A measurement that completed nothing is a broken run, not a figure.
pub fn ensure_progress(name: &str, sample: &Sample) -> Result<()> {
    if sample.latencies.is_empty() {
        Err(format!("{name} completed no operation: {}", sample.error_note()).into())
    } else {
        Ok(())
    }
}

/// Nearest-rank percentile `q` (0–1) of sorted `latencies` (nanoseconds).
pub fn percentile(latencies: &[u64], q: f64) -> Duration {
    if latencies.is_empty() {
        return Duration::ZERO;
    }
    let rank = (q * latencies.len() as f64).ceil() as usize;
    let index = rank.clamp(1, latencies.len()) - 1;
    Duration::from_nanos(latencies[index])
}

/// Runs `workers` (one task each) through `plan`; every operation has [`OP_TIMEOUT`], and the
/// whole measurement is abandoned (an error) if the callers do not stop in time.
pub async fn drive<W: Worker>(plan: &Plan, workers: Vec<W>) -> Result<Sample> {
    let mut tasks = JoinSet::new();
    for mut worker in workers {
        let plan = *plan;
        tasks.spawn(async move {
            let mut latencies = Vec::with_capacity(4096);
            let mut errors: BTreeMap<String, u64> = BTreeMap::new();
            let mut window_errors = 0;
            loop {
                let started = Instant::now();
                if started >= plan.end {
                    break;
                }
                let outcome = match tokio::time::timeout(OP_TIMEOUT, worker.call()).await {
                    Ok(outcome) => outcome,
                    Err(_) => Err(format!("no answer within {OP_TIMEOUT:?}")),
                };
                let done = Instant::now();
                let counted = done >= plan.measure_start && done < plan.end;
                match outcome {
                    Ok(()) if counted => latencies.push((done - started).as_nanos() as u64),
                    Ok(()) => {}
                    Err(text) => {
                        window_errors += u64::from(counted);
                        let key = if errors.len() < ERROR_KINDS || errors.contains_key(&text) {
                            text
                        } else {
                            "other errors".to_owned()
                        };
                        *errors.entry(key).or_default() += 1;
                        tokio::time::sleep(ERROR_PAUSE).await;
                    }
                }
            }
            (latencies, errors, window_errors)
        });
    }
    let deadline = plan.end + OP_TIMEOUT + Duration::from_secs(5);
    let mut sample = Sample {
        seconds: plan.seconds(),
        ..Sample::default()
    };
    loop {
        match tokio::time::timeout_at(deadline, tasks.join_next()).await {
            Ok(None) => break,
            Ok(Some(Ok((latencies, errors, window_errors)))) => {
                sample.latencies.extend(latencies);
                sample.window_errors += window_errors;
                for (text, count) in errors {
                    *sample.errors.entry(text).or_default() += count;
                }
            }
            Ok(Some(Err(err))) => {
                tasks.abort_all();
                return Err(format!("a caller failed: {err}").into());
            }
            Err(_) => {
                tasks.abort_all();
                return Err("callers did not stop within their deadline".into());
            }
        }
    }
    sample.latencies.sort_unstable();
    Ok(sample)
}

/// Gives each of `concurrency` callers a client: caller `i` talks to target
/// `i % targets`, and every [`CALLERS_PER_CHANNEL`] callers of a target share one client
/// made by `make(target)`. Returns `(target, client)` per caller.
pub async fn share<T, F, Fut>(
    concurrency: usize,
    targets: usize,
    mut make: F,
) -> Result<Vec<(usize, T)>>
where
    T: Clone,
    F: FnMut(usize) -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let targets = targets.max(1);
    let mut made: HashMap<(usize, usize), T> = HashMap::new();
    let mut out = Vec::with_capacity(concurrency);
    for caller in 0..concurrency {
        let target = caller % targets;
        let group = caller / targets / CALLERS_PER_CHANNEL;
        let client = match made.get(&(target, group)) {
            Some(client) => client.clone(),
            None => {
                let client = make(target).await?;
                made.insert((target, group), client.clone());
                client
            }
        };
        out.push((target, client));
    }
    Ok(out)
}

/// CPU times of labelled processes, and of the whole machine, at one instant.
#[derive(Debug, Clone, Default)]
pub struct CpuSnapshot {
    processes: Vec<(String, Option<u64>)>,
    machine: Option<u64>,
}

impl CpuSnapshot {
    /// Reads the CPU time of each `(label, pid)`; several pids may share a label.
    pub fn take(processes: &[(String, Option<u32>)]) -> Self {
        Self {
            processes: processes
                .iter()
                .map(|(label, pid)| (label.clone(), pid.and_then(sys::cpu_ticks)))
                .collect(),
            machine: sys::machine_busy_ticks(),
        }
    }

    /// `cpu cores: bench 0.95, limiter-svc 0.80, etcd 0.10, other 0.05`, per label in
    /// first-seen order; `other` is what the rest of the machine used meanwhile (returned
    /// too, in cores).
    pub fn cores_since(
        &self,
        earlier: &Self,
        seconds: f64,
        ticks_per_second: f64,
    ) -> (String, Option<f64>) {
        let mut order: Vec<&str> = Vec::new();
        let mut used: HashMap<&str, Option<u64>> = HashMap::new();
        let mut ours = Some(0);
        for ((label, after), (_, before)) in self.processes.iter().zip(&earlier.processes) {
            let delta = match (after, before) {
                (Some(a), Some(b)) => Some(a.saturating_sub(*b)),
                _ => None,
            };
            if !order.contains(&label.as_str()) {
                order.push(label);
            }
            let entry = used.entry(label).or_insert(Some(0));
            *entry = entry.zip(delta).map(|(sum, d)| sum + d);
            ours = ours.zip(delta).map(|(sum, d)| sum + d);
        }
        let cores = |ticks: Option<u64>| match ticks {
            Some(ticks) if seconds > 0.0 => {
                format!("{:.2}", ticks as f64 / ticks_per_second / seconds)
            }
            _ => "?".to_owned(),
        };
        let mut parts: Vec<String> = order
            .iter()
            .map(|label| format!("{label} {}", cores(used.get(label).copied().flatten())))
            .collect();
        let machine = self
            .machine
            .zip(earlier.machine)
            .map(|(after, before)| after.saturating_sub(before));
        let other = machine
            .zip(ours)
            .map(|(machine, ours)| machine.saturating_sub(ours));
        parts.push(format!("other processes {}", cores(other)));
        let other = other
            .filter(|_| seconds > 0.0)
            .map(|ticks| ticks as f64 / ticks_per_second / seconds);
        (format!("cpu cores: {}", parts.join(", ")), other)
    }
}

#[cfg(test)]
mod tests {
    use super::Sample;
    use std::time::Duration;

    #[test]
    fn nearest_rank_percentiles() {
        let sample = Sample {
            latencies: (1..=100).collect(),
            seconds: 2.0,
            ..Sample::default()
        };
        assert_eq!(sample.percentile(0.5), Duration::from_nanos(50));
        assert_eq!(sample.percentile(0.99), Duration::from_nanos(99));
        assert_eq!(sample.percentile(1.0), Duration::from_nanos(100));
        assert!((sample.rate() - 50.0).abs() < 1e-9);
    }
}

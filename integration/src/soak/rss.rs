//! RSS growth: every service process's resident memory (`VmRSS` in `/proc/<pid>/status`)
//! sampled on a ticker; after the warm-up, per process, the first and last value and the
//! least-squares slope in MiB per minute.
//!
//! A restarted process (the limiter replica the faults kill) starts a new series; its
//! figure comes from the incarnation with the most samples past its own warm-up (time
//! since it started, as for the others), and none when no incarnation has enough.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::fleet::Fleet;

/// Fewest samples a slope is fitted on.
const MIN_SAMPLES: usize = 5;
const KIB_PER_MIB: f64 = 1024.0;

/// One reading of one process.
#[derive(Debug, Clone)]
pub struct Sample {
    /// Seconds since the start of the load.
    pub at: f64,
    label: String,
    service: &'static str,
    incarnation: u32,
    /// When this incarnation started, seconds since the start of the load (0 if before).
    since: f64,
    kib: u64,
}

/// The sampling task.
pub struct Sampler {
    stop: oneshot::Sender<()>,
    task: JoinHandle<Vec<Sample>>,
}

impl Sampler {
    /// Samples every process of `fleet` every `every` from now on.
    pub fn start(fleet: Arc<Fleet>, start: Instant, every: Duration) -> Self {
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut samples = Vec::new();
            let mut ticker = tokio::time::interval(every);
            loop {
                tokio::select! {
                    _ = ticker.tick() => {}
                    _ = &mut stopped => return samples,
                }
                let at = start.elapsed().as_secs_f64();
                for process in fleet.processes() {
                    let Some(kib) = process.pid.and_then(rss_kib) else {
                        continue;
                    };
                    samples.push(Sample {
                        at,
                        label: process.label,
                        service: process.service,
                        incarnation: process.incarnation,
                        since: process.since.saturating_duration_since(start).as_secs_f64(),
                        kib,
                    });
                }
            }
        });
        Self { stop, task }
    }

    /// Stops sampling; every sample taken.
    pub async fn stop(self) -> Vec<Sample> {
        let _ = self.stop.send(());
        self.task.await.unwrap_or_default()
    }
}

/// Resident memory of a live process, KiB.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line["VmRSS:".len()..]
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// One process's figures after the warm-up.
#[derive(Debug, Clone)]
pub struct ProcessRss {
    /// `presence-svc#1`.
    pub label: String,
    /// `presence-svc`.
    pub service: &'static str,
    /// Times it was restarted (by the faults).
    pub restarts: u32,
    /// Samples in the fitted window (0: no window long enough).
    pub samples: usize,
    /// RSS at the start and at the end of the window, and the highest in it, MiB.
    pub first_mib: f64,
    pub last_mib: f64,
    pub peak_mib: f64,
    /// Least-squares slope over the window, MiB per minute.
    pub slope: Option<f64>,
}

/// The figures of every process, in label order.
pub fn analyse(samples: &[Sample], warmup: Duration) -> Vec<ProcessRss> {
    let warmup = warmup.as_secs_f64();
    let mut labels: Vec<&str> = samples.iter().map(|s| s.label.as_str()).collect();
    labels.sort_unstable();
    labels.dedup();
    labels
        .into_iter()
        .map(|label| {
            let mine: Vec<&Sample> = samples.iter().filter(|s| s.label == label).collect();
            let restarts = mine.iter().map(|s| s.incarnation).max().unwrap_or(0);
            let window = (0..=restarts)
                .map(|incarnation| {
                    mine.iter()
                        .filter(|s| s.incarnation == incarnation && s.at >= s.since + warmup)
                        .copied()
                        .collect::<Vec<_>>()
                })
                .max_by_key(Vec::len)
                .unwrap_or_default();
            let mib = |s: &Sample| s.kib as f64 / KIB_PER_MIB;
            let points: Vec<(f64, f64)> = window.iter().map(|s| (s.at / 60.0, mib(s))).collect();
            ProcessRss {
                label: label.to_owned(),
                service: mine.first().map_or("", |s| s.service),
                restarts,
                samples: window.len(),
                first_mib: window.first().map_or(0.0, |s| mib(s)),
                last_mib: window.last().map_or(0.0, |s| mib(s)),
                peak_mib: points.iter().map(|p| p.1).fold(0.0, f64::max),
                slope: (window.len() >= MIN_SAMPLES)
                    .then(|| slope(&points))
                    .flatten(),
            }
        })
        .collect()
}

/// Least-squares slope of `(x, y)` points; None when x does not vary.
fn slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let (mut sxy, mut sxx) = (0.0, 0.0);
    for (x, y) in points {
        sxy += (x - mean_x) * (y - mean_y);
        sxx += (x - mean_x) * (x - mean_x);
    }
    (sxx > 0.0).then(|| sxy / sxx)
}

#[cfg(test)]
mod tests {
    use super::slope;

    #[test]
    fn least_squares_slope_of_a_noisy_line() {
        let points: Vec<(f64, f64)> = (0..10)
            .map(|i| {
                (
                    f64::from(i),
                    3.0 + 0.5 * f64::from(i) + if i % 2 == 0 { 0.1 } else { -0.1 },
                )
            })
            .collect();
        let fitted = slope(&points).unwrap_or(f64::NAN);
        assert!((fitted - 0.5).abs() < 0.05, "{fitted}");
        assert_eq!(slope(&[(1.0, 1.0), (1.0, 2.0)]), None);
    }
}

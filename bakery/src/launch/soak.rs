//! The watched soak: after a flip, the new group's traffic (request count, 5xx ratio, p99
//! latency over a window) is judged against thresholds and against the old group's figures
//! taken before the flip. A breach switches back by itself; a clean soak destroys the old group.
//! Pure figures and judgement here; the engine samples and acts ([`super::engine`]).

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// The least p99 a breach is judged against when the limit comes from the baseline.
const P99_FLOOR_MS: u64 = 500;

/// One group's traffic over a window.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Traffic {
    pub requests: u64,
    /// Answers with a 5xx status.
    pub errors: u64,
    pub p99_ms: u64,
    pub window_secs: u64,
}

impl Traffic {
    /// The figures of requests given as (status, total milliseconds).
    pub fn of(requests: &[(u16, u64)], window: Duration) -> Traffic {
        let mut times: Vec<u64> = requests.iter().map(|(_, ms)| *ms).collect();
        times.sort_unstable();
        // Nearest-rank p99.
        let p99_ms = match times.len() {
            0 => 0,
            n => times[(n * 99).div_ceil(100) - 1],
        };
        Traffic {
            requests: requests.len() as u64,
            errors: requests.iter().filter(|(status, _)| *status >= 500).count() as u64,
            p99_ms,
            window_secs: window.as_secs(),
        }
    }

    pub fn error_rate(&self) -> f64 {
        match self.requests {
            0 => 0.0,
            n => self.errors as f64 / n as f64,
        }
    }
}

/// When a soak breaches.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    /// Largest acceptable share of 5xx answers (0.01 = 1 %).
    pub max_error_rate: f64,
    /// Largest acceptable p99; None: twice the baseline's, and at least 500 ms.
    pub max_p99_ms: Option<u64>,
    pub window_secs: u64,
    /// Fewer requests than this in a window say nothing either way.
    pub min_requests: u64,
}

/// As `launcher deploy --soak` judges by default: 1 % 5xx, p99 from the baseline, 60 s windows
/// of at least 20 requests.
impl Default for Thresholds {
    fn default() -> Self {
        Thresholds { max_error_rate: 0.01, max_p99_ms: None, window_secs: 60, min_requests: 20 }
    }
}

impl Thresholds {
    /// The p99 limit in force, given the old group's figures.
    pub fn p99_limit(&self, baseline: Option<&Traffic>) -> u64 {
        self.max_p99_ms.unwrap_or_else(|| baseline.map_or(0, |b| b.p99_ms * 2).max(P99_FLOOR_MS))
    }
}

/// A deploy's soak, kept in its record: what a watcher (any watcher, after any restart) needs.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Soak {
    /// Unix seconds the soak ends.
    pub until: u64,
    pub thresholds: Thresholds,
    /// The old group's figures before the flip.
    pub baseline: Option<Traffic>,
    /// The new group's last window.
    pub latest: Option<Traffic>,
    /// `watching`, `passed`, or why it rolled back.
    pub verdict: String,
}

#[derive(Debug, PartialEq)]
pub enum Judgement {
    /// Too few requests in the window to say.
    Quiet,
    Healthy,
    Breach(String),
}

pub fn judge(latest: &Traffic, baseline: Option<&Traffic>, thresholds: &Thresholds) -> Judgement {
    if latest.requests < thresholds.min_requests {
        return Judgement::Quiet;
    }
    let rate = latest.error_rate();
    if rate > thresholds.max_error_rate {
        return Judgement::Breach(format!(
            "{:.1}% of {} requests failed over {}s (limit {:.1}%)",
            rate * 100.0,
            latest.requests,
            latest.window_secs,
            thresholds.max_error_rate * 100.0
        ));
    }
    let limit = thresholds.p99_limit(baseline);
    if latest.p99_ms > limit {
        return Judgement::Breach(format!(
            "p99 latency {} ms over {}s (limit {limit} ms)",
            latest.p99_ms, latest.window_secs
        ));
    }
    Judgement::Healthy
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thresholds() -> Thresholds {
        Thresholds { max_error_rate: 0.01, max_p99_ms: None, window_secs: 60, min_requests: 20 }
    }

    #[test]
    fn figures_count_5xx_and_take_the_nearest_rank_p99() {
        let mut requests: Vec<(u16, u64)> = (1..=100).map(|ms| (200, ms)).collect();
        requests[0].0 = 500;
        requests[1].0 = 404;
        let traffic = Traffic::of(&requests, Duration::from_secs(60));
        assert_eq!((traffic.requests, traffic.errors, traffic.p99_ms), (100, 1, 99));
        assert_eq!(Traffic::of(&[], Duration::from_secs(60)).p99_ms, 0);
    }

    #[test]
    fn a_soak_breaches_on_errors_or_latency_and_says_nothing_when_quiet() {
        let traffic = |requests, errors, p99_ms| Traffic { requests, errors, p99_ms, window_secs: 60 };
        let baseline = traffic(1000, 0, 300);
        assert_eq!(judge(&traffic(10, 10, 9000), Some(&baseline), &thresholds()), Judgement::Quiet);
        assert_eq!(judge(&traffic(1000, 5, 400), Some(&baseline), &thresholds()), Judgement::Healthy);
        assert!(
            matches!(judge(&traffic(1000, 20, 400), Some(&baseline), &thresholds()), Judgement::Breach(why) if why.contains("2.0%"))
        );
        // p99 limit: twice the baseline's 300 ms.
        assert!(
            matches!(judge(&traffic(1000, 0, 601), Some(&baseline), &thresholds()), Judgement::Breach(why) if why.contains("600 ms"))
        );
        // ...but never under 500 ms, and an explicit limit wins.
        assert_eq!(thresholds().p99_limit(Some(&traffic(10, 0, 100))), 500);
        assert_eq!(Thresholds { max_p99_ms: Some(50), ..thresholds() }.p99_limit(Some(&baseline)), 50);
    }
}

//! Chaos Monkey: clusters opt in, and then their in-service instances may be terminated on
//! purpose, as a host failure would, to prove that the cluster heals without a failed request.
//! Which clusters opted in and every action taken are kept where the cloud keeps its deploy
//! state ([`ChaosStore`]): for local clusters in the state directory ([`ChaosFiles`]:
//! `STATE/chaos/<cluster>.json` and `STATE/chaos/audit.jsonl`), on aws in the launcher's
//! DynamoDB table, so that every host that runs a monkey sees one consent and one log.
//! Choosing victims is pure; the engine acts under the cluster lock ([`super::engine`]).

use super::cloud::{Group, Health};
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};
use snafu::{ResultExt, Snafu};
use std::io::Write;
use std::path::{Path, PathBuf};

#[derive(Debug, Snafu)]
pub enum Error {
    #[snafu(display("chaos state {}: {source}", path.display()))]
    Io { path: PathBuf, source: std::io::Error },

    #[snafu(display("chaos state {}: {source}", path.display()))]
    Json { path: PathBuf, source: serde_json::Error },

    #[snafu(display("chaos state in {store}: {source}"))]
    Store { store: String, source: Box<dyn std::error::Error + Send + Sync> },
}

pub type Result<T> = std::result::Result<T, Error>;

/// A cluster's consent, with the limits the scheduler keeps to.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Config {
    pub cluster: String,
    /// Mean seconds between two kills while inside the window.
    pub mean_interval_secs: u64,
    /// Local time of day the monkey may act in, `HH:MM-HH:MM`.
    pub window: String,
    pub max_per_day: u32,
    /// Unix seconds.
    pub enabled_at: u64,
}

/// One action of a monkey, as the audit log keeps it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AuditEntry {
    /// Unix seconds.
    pub time: u64,
    pub cluster: String,
    pub group: String,
    pub instance: String,
    pub monkey: String,
    pub action: String,
    /// `done`, `dry run`, or what went wrong.
    pub result: String,
}

/// Where the consent of clusters and the audit log are kept.
pub trait ChaosStore {
    fn config(&self, cluster: &str) -> Result<Option<Config>>;
    /// Opts in (again, with new limits).
    fn enable(&self, config: &Config) -> Result<()>;
    /// Every cluster that opted in, by name.
    fn enabled(&self) -> Result<Vec<Config>>;
    /// Opting out twice is no error.
    fn disable(&self, cluster: &str) -> Result<()>;
    /// Adds `entries` to the audit log.
    fn record(&self, entries: &[AuditEntry]) -> Result<()>;
    /// The audit log, oldest first, of one cluster or all.
    fn log(&self, cluster: Option<&str>) -> Result<Vec<AuditEntry>>;
    /// Takes one of the cluster's kills for the local day that `now` falls in, for the
    /// scheduler; false when the day's `max_per_day` is used up by any host. A store used from
    /// one host only has nothing to add to what [`is_due`] counted in the log.
    fn claim_kill(&self, _config: &Config, _now: u64) -> Result<bool> {
        Ok(true)
    }
}

/// The state directory's chaos records.
pub struct ChaosFiles {
    dir: PathBuf,
}

impl ChaosFiles {
    pub fn new(state_dir: &Path) -> ChaosFiles {
        ChaosFiles { dir: state_dir.join("chaos") }
    }

    fn config_path(&self, cluster: &str) -> PathBuf {
        self.dir.join(format!("{cluster}.json"))
    }
}

impl ChaosStore for ChaosFiles {
    fn config(&self, cluster: &str) -> Result<Option<Config>> {
        let path = self.config_path(cluster);
        crate::atomic::read_json(&path).context(IoSnafu { path })
    }

    fn enable(&self, config: &Config) -> Result<()> {
        std::fs::create_dir_all(&self.dir).context(IoSnafu { path: &self.dir })?;
        let path = self.config_path(&config.cluster);
        crate::atomic::write_json(&path, config).context(IoSnafu { path })
    }

    fn enabled(&self) -> Result<Vec<Config>> {
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).context(IoSnafu { path: &self.dir }),
        };
        let mut configs = Vec::new();
        for entry in entries {
            let name = entry.context(IoSnafu { path: &self.dir })?.file_name().to_string_lossy().into_owned();
            if let Some(cluster) = name.strip_suffix(".json") {
                configs.extend(self.config(cluster)?);
            }
        }
        configs.sort_by(|a, b| a.cluster.cmp(&b.cluster));
        Ok(configs)
    }

    fn disable(&self, cluster: &str) -> Result<()> {
        let path = self.config_path(cluster);
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e).context(IoSnafu { path }),
            _ => Ok(()),
        }
    }

    /// One JSON object a line, appended.
    fn record(&self, entries: &[AuditEntry]) -> Result<()> {
        std::fs::create_dir_all(&self.dir).context(IoSnafu { path: &self.dir })?;
        let path = self.dir.join("audit.jsonl");
        let mut lines = String::new();
        for entry in entries {
            lines += &serde_json::to_string(entry).context(JsonSnafu { path: &path })?;
            lines.push('\n');
        }
        let mut log =
            std::fs::OpenOptions::new().create(true).append(true).open(&path).context(IoSnafu { path: &path })?;
        log.write_all(lines.as_bytes()).context(IoSnafu { path })
    }

    fn log(&self, cluster: Option<&str>) -> Result<Vec<AuditEntry>> {
        let path = self.dir.join("audit.jsonl");
        let text = match std::fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(e).context(IoSnafu { path }),
        };
        let mut entries = Vec::new();
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let entry: AuditEntry = serde_json::from_str(line).context(JsonSnafu { path: &path })?;
            if cluster.is_none_or(|c| entry.cluster == c) {
                entries.push(entry);
            }
        }
        Ok(entries)
    }
}

/// Whether `window` reads `HH:MM-HH:MM`.
pub fn valid_window(window: &str) -> bool {
    let time = |t: &str| {
        let (h, m) = t.split_once(':').unwrap_or(("", ""));
        h.len() == 2 && m.len() == 2 && h.parse::<u8>().is_ok_and(|h| h < 24) && m.parse::<u8>().is_ok_and(|m| m < 60)
    };
    window.split_once('-').is_some_and(|(from, to)| time(from) && time(to))
}

/// Whether the local time of day `minute` (0..1440) falls in `window` (`HH:MM-HH:MM`; one
/// ending before it starts runs past midnight).
pub fn in_window(window: &str, minute: u32) -> bool {
    let minutes = |t: &str| {
        let (h, m) = t.split_once(':')?;
        Some(h.parse::<u32>().ok()? * 60 + m.parse::<u32>().ok()?)
    };
    let Some((from, to)) = window.split_once('-').and_then(|(f, t)| Some((minutes(f)?, minutes(t)?))) else {
        return false;
    };
    match from <= to {
        true => from <= minute && minute < to,
        false => minute >= from || minute < to,
    }
}

/// The chance that a scheduler looking every `interval` kills on this look, for kills that
/// come on average every `mean` (a Poisson process, so the times between kills are random).
pub fn kill_chance(interval_secs: u64, mean_secs: u64) -> f64 {
    1.0 - (-(interval_secs as f64) / mean_secs.max(1) as f64).exp()
}

/// The local time of day of `unix` in minutes, and the Unix seconds of that day's local
/// midnight (the host's time zone, as the window is written).
pub fn local_day(unix: u64) -> (u32, u64) {
    let time = unix as libc::time_t;
    // SAFETY: localtime_r only writes the tm it is given.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    let found = unsafe { !libc::localtime_r(&time, &mut tm).is_null() };
    let seconds_into_day = if found { (tm.tm_hour * 3600 + tm.tm_min * 60 + tm.tm_sec) as u64 } else { unix % 86_400 };
    ((seconds_into_day / 60) as u32, unix - seconds_into_day)
}

/// Whether the scheduler kills in `cluster` on this look: inside its window, under its daily
/// limit (counted from the audit log, so a restarted scheduler counts what it did before), and
/// drawn with [`kill_chance`].
pub fn is_due(config: &Config, now: u64, log: &[AuditEntry], interval_secs: u64, draw: f64) -> bool {
    let (minute, midnight) = local_day(now);
    let today = log
        .iter()
        .filter(|e| e.cluster == config.cluster && e.monkey == "chaos" && e.result == "done" && e.time >= midnight)
        .count();
    in_window(&config.window, minute)
        && today < config.max_per_day as usize
        && draw < kill_chance(interval_secs, config.mean_interval_secs)
}

/// Up to `count` (group, instance) pairs to terminate, at random among the healthy members of
/// groups in service, never a group's last healthy member.
pub fn choose_victims(groups: &[Group], count: usize, rng: &mut impl rand::Rng) -> Vec<(String, String)> {
    let mut spare: Vec<(String, String)> = Vec::new();
    for group in groups.iter().filter(|g| g.in_service) {
        let mut healthy: Vec<&str> =
            group.members.iter().filter(|m| m.health == Health::Healthy).map(|m| m.id.as_str()).collect();
        healthy.shuffle(rng);
        // One stays.
        spare.extend(healthy.iter().skip(1).map(|id| (group.name.clone(), id.to_string())));
    }
    spare.shuffle(rng);
    spare.truncate(count);
    spare
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launch::cloud::Member;
    use crate::launch::plan::tests::group;
    use rand::SeedableRng;

    fn member(id: &str, health: Health) -> Member {
        Member { id: id.into(), zone: "local-a".into(), health, address: None, registry_status: None, launched: None }
    }

    #[test]
    fn victims_are_healthy_in_service_members_and_never_a_groups_last() {
        let mut serving = group("hello-prod-v001", "ami-2", 2, true, 3);
        serving.members =
            vec![member("i-1", Health::Healthy), member("i-2", Health::Healthy), member("i-3", Health::Starting)];
        let mut disabled = group("hello-prod-v000", "ami-1", 1, false, 3);
        disabled.members = vec![member("i-4", Health::Healthy), member("i-5", Health::Healthy)];
        let groups = [disabled, serving];
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..20 {
            let victims = choose_victims(&groups, 5, &mut rng);
            assert_eq!(victims.len(), 1, "one of the two healthy serving members: {victims:?}");
            assert_eq!(victims[0].0, "hello-prod-v001");
            assert!(["i-1", "i-2"].contains(&victims[0].1.as_str()));
        }
        assert!(choose_victims(&groups, 0, &mut rng).is_empty());
    }

    #[test]
    fn the_scheduler_keeps_to_the_window_the_daily_limit_and_the_mean() {
        assert!(in_window("09:00-15:00", 9 * 60) && !in_window("09:00-15:00", 15 * 60));
        assert!(
            in_window("22:00-02:00", 23 * 60) && in_window("22:00-02:00", 60) && !in_window("22:00-02:00", 12 * 60)
        );
        assert!((kill_chance(60, 3600) - 0.0165).abs() < 0.001);
        assert!(kill_chance(3600, 1) > 0.999);

        let (minute, midnight) = local_day(1_800_000_000);
        assert!(minute < 1440 && midnight <= 1_800_000_000 && 1_800_000_000 - midnight < 86_400);
        let window = |from: u32, to: u32| format!("{:02}:{:02}-{:02}:{:02}", from / 60, from % 60, to / 60, to % 60);
        let now = midnight + 12 * 3600;
        let config = Config {
            cluster: "c".into(),
            mean_interval_secs: 1,
            window: window(11 * 60, 13 * 60),
            max_per_day: 2,
            enabled_at: 0,
        };
        let kill = |time: u64, result: &str| AuditEntry {
            time,
            cluster: "c".into(),
            group: "c-v000".into(),
            instance: "i-1".into(),
            monkey: "chaos".into(),
            action: "terminate".into(),
            result: result.into(),
        };
        assert!(is_due(&config, now, &[], 60, 0.5));
        // Yesterday's kills and failed attempts do not count against today.
        assert!(is_due(&config, now, &[kill(midnight - 10, "done"), kill(now - 5, "failed: x")], 60, 0.5));
        assert!(!is_due(&config, now, &[kill(now - 20, "done"), kill(now - 10, "done")], 60, 0.5));
        let outside = Config { window: window(13 * 60, 14 * 60), ..config.clone() };
        assert!(!is_due(&outside, now, &[], 60, 0.5));
        let rare = Config { mean_interval_secs: 86_400, ..config };
        assert!(!is_due(&rare, now, &[], 60, 0.5), "a 1-day mean rarely kills in a minute");
    }

    #[test]
    fn windows_are_times_of_day() {
        assert!(valid_window("09:00-15:00") && valid_window("22:30-02:00"));
        assert!(!valid_window("9-15") && !valid_window("09:00-24:00") && !valid_window("09:00"));
    }

    #[test]
    fn the_audit_log_appends_and_filters_by_cluster() {
        let dir = tempfile::tempdir().unwrap();
        let chaos = ChaosFiles::new(dir.path());
        assert_eq!(chaos.log(None).unwrap(), []);
        let entry = |cluster: &str| AuditEntry {
            time: 1,
            cluster: cluster.into(),
            group: format!("{cluster}-v000"),
            instance: "i-1".into(),
            monkey: "chaos".into(),
            action: "terminate".into(),
            result: "done".into(),
        };
        chaos.record(&[entry("a")]).unwrap();
        let config = Config {
            cluster: "a".into(),
            mean_interval_secs: 3600,
            window: "09:00-15:00".into(),
            max_per_day: 3,
            enabled_at: 1,
        };
        chaos.enable(&config).unwrap();
        assert_eq!(chaos.config("a").unwrap(), Some(config.clone()));
        assert_eq!(chaos.enabled().unwrap(), [config]);
        chaos.record(&[entry("b"), entry("a")]).unwrap();
        assert_eq!(chaos.log(Some("a")).unwrap().len(), 2);
        assert_eq!(chaos.log(None).unwrap().len(), 3);
        chaos.disable("a").unwrap();
        assert_eq!(chaos.config("a").unwrap(), None);
    }
}

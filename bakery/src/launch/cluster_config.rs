//! `cluster.toml`: what a cluster's groups launch with, kept in the app's repository so that a
//! cluster's first deploy (which has no group to copy from) is written down rather than typed.
//! Every key mirrors a `launcher deploy` flag, and a flag given on the command line wins.
//!
//! ```toml
//! instance_type = "m5.large"
//! security_groups = ["sg-0123456789abcdef0"]
//! instance_profile = "hello-prod"
//! key_name = "ops"
//! user_data_file = "user-data.sh"     # relative to this file
//! health_check_type = "ELB"
//! health_check_grace = "5m"
//! termination_policies = ["OldestLaunchTemplate", "OldestInstance"]
//! subnets = ["subnet-1", "subnet-2", "subnet-3"]
//! target_groups = ["arn:aws:elasticloadbalancing:…:targetgroup/hello/…"]
//! health_url = "/hello/health"
//! registry_namespace = "prod"
//! min = 3
//! desired = 3
//! max = 6
//! ```
//!
//! Like a recipe, the file is checked all at once: every problem is reported with its line.

use super::cloud::{termination_policy_problem, HealthCheckType, LaunchSettings};
use crate::recipe::{lines, Problem};
use clap::ValueEnum;
use snafu::Snafu;
use std::path::{Path, PathBuf};
use toml::Value;

/// EC2 takes at most 16 KiB of user data; the launcher keeps 1 KiB of it for its own part.
pub const MAX_TEAM_USER_DATA: usize = 15 * 1024;

#[derive(Debug, Snafu)]
pub enum Error {
    #[snafu(display("could not read cluster config {}: {source}", path.display()))]
    Read { path: PathBuf, source: std::io::Error },

    #[snafu(display("{}", problems.iter().map(Problem::to_string).collect::<Vec<_>>().join("\n")))]
    Invalid { problems: Vec<Problem> },
}

/// A checked `cluster.toml`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterConfig {
    pub launch: LaunchSettings,
    pub subnets: Vec<String>,
    pub target_groups: Vec<String>,
    pub health_url: Option<String>,
    pub registry_namespace: Option<String>,
    pub min: Option<u32>,
    pub max: Option<u32>,
    pub desired: Option<u32>,
}

const KEYS: [&str; 15] = [
    "instance_type",
    "security_groups",
    "instance_profile",
    "key_name",
    "user_data_file",
    "health_check_type",
    "health_check_grace",
    "termination_policies",
    "subnets",
    "target_groups",
    "health_url",
    "registry_namespace",
    "min",
    "max",
    "desired",
];

/// A team's user data file, refused when EC2 could not take it with the launcher's part.
pub fn read_user_data(path: &Path) -> Result<Vec<u8>, String> {
    let data = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    match data.len() {
        0 => Err(format!("{} is empty", path.display())),
        n if n > MAX_TEAM_USER_DATA => {
            Err(format!("{} is {n} bytes; user data may be at most {MAX_TEAM_USER_DATA}", path.display()))
        }
        _ => Ok(data),
    }
}

pub fn load(path: &Path) -> Result<ClusterConfig, Error> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::Read { path: path.into(), source })?;
    let mut checker = Checker { file: path, text: &text, problems: Vec::new() };
    let table = match text.parse::<toml::Table>() {
        Ok(table) => table,
        Err(e) => {
            let line = e.span().map(|span| lines::line_at(&text, span.start));
            checker.problems.push(Problem { file: path.into(), key: String::new(), line, message: e.message().into() });
            return InvalidSnafu { problems: checker.problems }.fail();
        }
    };
    for key in table.keys().filter(|k| !KEYS.contains(&k.as_str())) {
        checker.problem(key, format!("is not a cluster setting (known: {})", KEYS.join(", ")));
    }
    let mut config = ClusterConfig {
        launch: LaunchSettings {
            instance_type: checker.string(&table, "instance_type", instance_type_problem),
            security_groups: checker.list(&table, "security_groups", |id| id_problem(id, "sg-")),
            instance_profile: checker.string(&table, "instance_profile", plain_problem),
            key_name: checker.string(&table, "key_name", key_name_problem),
            user_data: None,
            health_check_type: checker
                .string(&table, "health_check_type", |v| {
                    HealthCheckType::from_str(v, false).is_err().then_some("must be \"ELB\" or \"EC2\"")
                })
                .and_then(|v| HealthCheckType::from_str(&v, false).ok()),
            health_check_grace: None,
            termination_policies: checker.list(&table, "termination_policies", termination_policy_problem),
        },
        subnets: checker.list(&table, "subnets", |id| id_problem(id, "subnet-")).unwrap_or_default(),
        target_groups: checker.list(&table, "target_groups", |id| id_problem(id, "arn:")).unwrap_or_default(),
        health_url: checker.string(&table, "health_url", health_url_problem),
        registry_namespace: checker.string(&table, "registry_namespace", plain_problem),
        min: checker.count(&table, "min"),
        max: checker.count(&table, "max"),
        desired: checker.count(&table, "desired"),
    };
    if let Some(file) = checker.string(&table, "user_data_file", |v| v.is_empty().then_some("is empty")) {
        let full = path.parent().unwrap_or(Path::new("")).join(file);
        match read_user_data(&full) {
            Ok(data) => config.launch.user_data = Some(data),
            Err(message) => checker.problem("user_data_file", message),
        }
    }
    match table.get("health_check_grace") {
        None => {}
        Some(Value::Integer(seconds)) if *seconds >= 0 => config.launch.health_check_grace = Some(*seconds as u64),
        Some(Value::String(text)) => match humantime::parse_duration(text) {
            Ok(grace) => config.launch.health_check_grace = Some(grace.as_secs()),
            Err(e) => checker.problem("health_check_grace", format!("{text:?}: {e}")),
        },
        Some(_) => checker.problem("health_check_grace", "must be a duration such as \"5m\" or seconds".into()),
    }
    if let (Some(min), Some(desired), Some(max)) = (config.min, config.desired, config.max) {
        if !(min <= desired && desired <= max) {
            checker.problem("desired", format!("min {min} <= desired {desired} <= max {max} does not hold"));
        }
    }
    match checker.problems.is_empty() {
        true => Ok(config),
        false => InvalidSnafu { problems: checker.problems }.fail(),
    }
}

fn id_problem(id: &str, prefix: &str) -> Option<String> {
    (!id.starts_with(prefix) || id.len() == prefix.len()).then(|| format!("is not an id starting {prefix}"))
}

fn plain_problem(value: &str) -> Option<&'static str> {
    (value.is_empty() || value.contains(char::is_whitespace)).then_some("is empty or holds spaces")
}

/// EC2 key pair names may hold spaces, but not at either end.
fn key_name_problem(value: &str) -> Option<&'static str> {
    (value.trim().is_empty() || value.trim() != value).then_some("is empty or starts or ends with a space")
}

fn health_url_problem(value: &str) -> Option<&'static str> {
    (!value.starts_with('/')).then_some("must start with /")
}

fn instance_type_problem(value: &str) -> Option<&'static str> {
    (plain_problem(value).is_some() || !value.contains('.')).then_some("is not an instance type such as t3.small")
}

/// What is wrong with settings given as `launcher deploy` flags, checked as the same keys of a
/// cluster config are.
pub fn flag_problems(
    launch: &LaunchSettings,
    subnets: &[String],
    target_groups: &[String],
    health_url: Option<&str>,
    registry_namespace: Option<&str>,
) -> Vec<String> {
    let mut problems = Vec::new();
    let mut one = |flag: &str, value: &str, problem: Option<String>| {
        problems.extend(problem.map(|problem| format!("{flag} {value:?}: {problem}")));
    };
    if let Some(kind) = &launch.instance_type {
        one("--instance-type", kind, instance_type_problem(kind).map(String::from));
    }
    for id in launch.security_groups.iter().flatten() {
        one("--security-group", id, id_problem(id, "sg-"));
    }
    if let Some(profile) = &launch.instance_profile {
        one("--instance-profile", profile, plain_problem(profile).map(String::from));
    }
    if let Some(key) = &launch.key_name {
        one("--key-name", key, key_name_problem(key).map(String::from));
    }
    if let Some(url) = health_url {
        one("--health-url", url, health_url_problem(url).map(String::from));
    }
    if let Some(namespace) = registry_namespace {
        one("--registry-namespace", namespace, plain_problem(namespace).map(String::from));
    }
    for id in subnets {
        one("--subnets", id, id_problem(id, "subnet-"));
    }
    for arn in target_groups {
        one("--target-group", arn, id_problem(arn, "arn:"));
    }
    problems
}

struct Checker<'a> {
    file: &'a Path,
    text: &'a str,
    problems: Vec<Problem>,
}

impl Checker<'_> {
    fn problem(&mut self, key: &str, message: String) {
        let line = lines::line_of(self.text, key);
        self.problems.push(Problem { file: self.file.into(), key: key.into(), line, message });
    }

    /// A string, unless `wrong` says what is wrong with it.
    fn string(
        &mut self,
        table: &toml::Table,
        key: &str,
        wrong: impl Fn(&str) -> Option<&'static str>,
    ) -> Option<String> {
        match table.get(key)? {
            Value::String(value) => match wrong(value) {
                None => Some(value.clone()),
                Some(message) => {
                    self.problem(key, format!("{value:?} {message}"));
                    None
                }
            },
            _ => {
                self.problem(key, "must be a string".into());
                None
            }
        }
    }

    /// A non-empty list of strings, each unless `wrong` says what is wrong with it.
    fn list(&mut self, table: &toml::Table, key: &str, wrong: impl Fn(&str) -> Option<String>) -> Option<Vec<String>> {
        let Value::Array(values) = table.get(key)? else {
            self.problem(key, "must be a list of strings".into());
            return None;
        };
        let mut ids = Vec::new();
        for (i, value) in values.iter().enumerate() {
            match value.as_str().map(|v| (v, wrong(v))) {
                Some((item, None)) => ids.push(item.to_string()),
                Some((item, Some(message))) => self.problem(&format!("{key}[{i}]"), format!("{item:?} {message}")),
                None => self.problem(&format!("{key}[{i}]"), format!("{value} is not a string")),
            }
        }
        if values.is_empty() {
            self.problem(key, "is empty; leave it out instead".into());
        }
        (ids.len() == values.len() && !ids.is_empty()).then_some(ids)
    }

    /// An instance count, at least 3 as every cluster's.
    fn count(&mut self, table: &toml::Table, key: &str) -> Option<u32> {
        match table.get(key)? {
            Value::Integer(n) if *n >= super::plan::MIN_INSTANCES as i64 && *n <= 10_000 => Some(*n as u32),
            other => {
                let least = super::plan::MIN_INSTANCES;
                self.problem(key, format!("{other} is not a count of at least {least} instances"));
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, text: &str) -> PathBuf {
        let path = dir.join("cluster.toml");
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn a_full_config_reads_every_setting() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("user-data.sh"), "#!/bin/sh\necho hi\n").unwrap();
        let path = write(
            dir.path(),
            "instance_type = \"m5.large\"\nsecurity_groups = [\"sg-1\", \"sg-2\"]\ninstance_profile = \"hello\"\n\
             key_name = \"ops\"\nuser_data_file = \"user-data.sh\"\nhealth_check_type = \"EC2\"\n\
             health_check_grace = \"2m\"\nsubnets = [\"subnet-a\", \"subnet-b\", \"subnet-c\"]\n\
             health_url = \"/health\"\nmin = 3\ndesired = 4\nmax = 6\n",
        );
        let config = load(&path).unwrap();
        assert_eq!(config.launch.instance_type.as_deref(), Some("m5.large"));
        assert_eq!(config.launch.security_groups, Some(vec!["sg-1".to_string(), "sg-2".to_string()]));
        assert_eq!(config.launch.user_data.as_deref(), Some(&b"#!/bin/sh\necho hi\n"[..]));
        assert_eq!(config.launch.health_check_type, Some(HealthCheckType::Ec2));
        assert_eq!(config.launch.health_check_grace, Some(120));
        assert_eq!((config.min, config.desired, config.max), (Some(3), Some(4), Some(6)));
        assert_eq!(config.subnets.len(), 3);
    }

    #[test]
    fn every_mistake_is_reported_at_once_with_its_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "instance_type = \"big\"\nsecurity_groups = [\"sg-1\", \"default\"]\nhealth_check_type = \"HTTP\"\n\
             health_check_grace = \"soon\"\nuser_data_file = \"missing.sh\"\nmin = 1\ncolour = \"red\"\n\
             health_url = \"health\"\n",
        );
        let Err(Error::Invalid { problems }) = load(&path) else { panic!("accepted") };
        let found: Vec<(&str, Option<usize>)> = problems.iter().map(|p| (p.key.as_str(), p.line)).collect();
        for expected in [
            ("colour", Some(7)),
            ("instance_type", Some(1)),
            ("security_groups[1]", Some(2)),
            ("health_check_type", Some(3)),
            ("health_url", Some(8)),
            ("min", Some(6)),
            ("user_data_file", Some(5)),
            ("health_check_grace", Some(4)),
        ] {
            assert!(found.contains(&expected), "{expected:?} not in {problems:#?}");
        }
        assert_eq!(problems.len(), 8, "{problems:#?}");
        let shown = Error::Invalid { problems }.to_string();
        assert!(shown.contains("cluster.toml:3: health_check_type: \"HTTP\" must be \"ELB\" or \"EC2\""), "{shown}");
    }

    #[test]
    fn flags_are_checked_as_the_config_keys_are() {
        let launch = LaunchSettings {
            instance_type: Some("big".into()),
            security_groups: Some(vec!["sg-1".into(), "default".into()]),
            key_name: Some(String::new()),
            ..LaunchSettings::default()
        };
        let problems = flag_problems(&launch, &["subnet-1".into(), "net-2".into()], &[], Some("health"), None);
        assert_eq!(
            problems,
            [
                "--instance-type \"big\": is not an instance type such as t3.small",
                "--security-group \"default\": is not an id starting sg-",
                "--key-name \"\": is empty or starts or ends with a space",
                "--health-url \"health\": must start with /",
                "--subnets \"net-2\": is not an id starting subnet-",
            ]
        );
        assert!(flag_problems(&LaunchSettings::default(), &[], &[], Some("/"), Some("prod")).is_empty());
        let spaced = LaunchSettings { key_name: Some("ops team".into()), ..LaunchSettings::default() };
        assert!(flag_problems(&spaced, &[], &[], None, None).is_empty(), "a key pair name may hold a space");
    }

    #[test]
    fn user_data_too_large_for_ec2_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.sh");
        std::fs::write(&big, vec![b'#'; MAX_TEAM_USER_DATA + 1]).unwrap();
        assert!(read_user_data(&big).unwrap_err().contains("at most"));
        let broken = write(dir.path(), "min = [");
        let Err(Error::Invalid { problems }) = load(&broken) else { panic!("accepted") };
        assert_eq!(problems[0].line, Some(1));
    }
}

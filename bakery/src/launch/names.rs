//! Frigga names: a cluster is `app[-stack[-detail]]`, a group of it is `cluster-vNNN`. Names are
//! how Asgard/Spinnaker-era tooling finds clusters, so every rule is enforced and each refusal
//! names the rule it breaks.

use snafu::{ensure, OptionExt, Snafu};
use std::collections::BTreeSet;
use std::fmt;

/// Asgard's limit on application names.
pub const MAX_APP_LEN: usize = 28;
/// Asgard's limit on group names (the longest name AWS tooling of the time accepted).
pub const MAX_GROUP_LEN: usize = 96;
/// Versions wrap around after v999.
const VERSIONS: u32 = 1000;

#[derive(Debug, Snafu, PartialEq, Eq)]
pub enum Error {
    #[snafu(display("cluster name is empty"))]
    Empty,

    #[snafu(display("app {app:?} is empty or holds characters other than letters, digits, '.' and '_'"))]
    BadApp { app: String },

    #[snafu(display("app {app:?} is {len} characters long: at most {MAX_APP_LEN} are allowed"))]
    AppTooLong { app: String, len: usize },

    #[snafu(display("stack {stack:?} holds characters other than letters, digits, '.' and '_'"))]
    BadStack { stack: String },

    #[snafu(display("detail {detail:?} is empty or holds characters other than letters, digits and . _ - ~ ^"))]
    BadDetail { detail: String },

    #[snafu(display("{part} {value:?} holds a version token (v followed by 3 to 6 digits between dashes)"))]
    VersionToken { part: &'static str, value: String },

    #[snafu(display("{name:?} ends with an empty stack: write `app`, `app-stack` or `app--detail`"))]
    EmptyStack { name: String },

    #[snafu(display("group name {name:?} would be {len} characters long: at most {MAX_GROUP_LEN} are allowed"))]
    GroupTooLong { name: String, len: usize },

    #[snafu(display("group name {name:?} does not end with a version such as -v001"))]
    NoVersion { name: String },

    #[snafu(display("all {VERSIONS} versions of cluster {cluster} are taken: destroy old groups first"))]
    AllTaken { cluster: String },
}

pub type Result<T> = std::result::Result<T, Error>;

/// `app[-stack[-detail]]`. An absent stack with a detail is written `app--detail`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Cluster {
    pub app: String,
    pub stack: Option<String>,
    pub detail: Option<String>,
}

/// `cluster-vNNN`.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GroupName {
    pub cluster: Cluster,
    pub version: u32,
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '.' || c == '_'
}

fn is_detail_char(c: char) -> bool {
    is_name_char(c) || matches!(c, '-' | '~' | '^')
}

/// `v` followed by 3–6 digits, the whole of `s`.
fn parse_version(s: &str) -> Option<u32> {
    let digits = s.strip_prefix('v')?;
    if !(3..=6).contains(&digits.len()) || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Whether `s` matches `(^|-)v\d{3,6}(-|$)`: a dash-separated part that is a version.
fn has_version_token(s: &str) -> bool {
    s.split('-').any(|part| parse_version(part).is_some())
}

impl Cluster {
    /// Parses and validates a cluster name such as `hello-prod-canary`.
    pub fn parse(name: &str) -> Result<Cluster> {
        ensure!(!name.is_empty(), EmptySnafu);
        let mut parts = name.splitn(3, '-');
        let app = parts.next().unwrap_or_default().to_string();
        let stack = parts.next().map(str::to_string);
        let detail = parts.next().map(str::to_string);
        // `app-` and `app-stack-` would print back differently: refuse rather than normalise.
        ensure!(stack.as_deref() != Some("") || detail.is_some(), EmptyStackSnafu { name });
        let cluster = Cluster { app, stack: stack.filter(|s| !s.is_empty()), detail };
        cluster.validate()?;
        Ok(cluster)
    }

    /// Checks every rule; used by [`Cluster::parse`] and for clusters built field by field.
    pub fn validate(&self) -> Result<()> {
        let app = &self.app;
        ensure!(!app.is_empty() && app.chars().all(is_name_char), BadAppSnafu { app });
        ensure!(app.len() <= MAX_APP_LEN, AppTooLongSnafu { app, len: app.len() });
        if let Some(stack) = &self.stack {
            ensure!(stack.chars().all(is_name_char), BadStackSnafu { stack });
            ensure!(!has_version_token(stack), VersionTokenSnafu { part: "stack", value: stack });
        }
        if let Some(detail) = &self.detail {
            ensure!(!detail.is_empty() && detail.chars().all(is_detail_char), BadDetailSnafu { detail });
            ensure!(!has_version_token(detail), VersionTokenSnafu { part: "detail", value: detail });
        }
        // Every group of the cluster must fit, so check with the shortest version suffix.
        let longest = format!("{self}-v000");
        ensure!(longest.len() <= MAX_GROUP_LEN, GroupTooLongSnafu { len: longest.len(), name: longest });
        Ok(())
    }
}

impl fmt::Display for Cluster {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.app)?;
        match (&self.stack, &self.detail) {
            (None, None) => Ok(()),
            (Some(stack), None) => write!(f, "-{stack}"),
            (stack, Some(detail)) => write!(f, "-{}-{detail}", stack.as_deref().unwrap_or_default()),
        }
    }
}

impl GroupName {
    /// Parses `cluster-vNNN` (3 to 6 version digits, as Frigga does).
    pub fn parse(name: &str) -> Result<GroupName> {
        let (cluster, version) = name.rsplit_once('-').context(NoVersionSnafu { name })?;
        let version = parse_version(version).context(NoVersionSnafu { name })?;
        let cluster = Cluster::parse(cluster)?;
        ensure!(name.len() <= MAX_GROUP_LEN, GroupTooLongSnafu { name, len: name.len() });
        Ok(GroupName { cluster, version })
    }
}

impl fmt::Display for GroupName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-v{:03}", self.cluster, self.version)
    }
}

/// The next group of `cluster` given its existing groups as (name, creation time): the newest
/// by creation plus one, modulo 1000, skipping names in use. The first group is v000.
pub fn next_group<'a>(cluster: &Cluster, existing: impl IntoIterator<Item = (&'a str, u64)>) -> Result<GroupName> {
    let mut taken = BTreeSet::new();
    let mut newest: Option<(u64, u32)> = None;
    for (name, created) in existing {
        taken.insert(name.to_string());
        // Names of other clusters or without a version cannot be "the newest" of this one.
        if let Some(group) = GroupName::parse(name).ok().filter(|g| g.cluster == *cluster) {
            newest = newest.max(Some((created, group.version)));
        }
    }
    let start = newest.map_or(0, |(_, version)| version + 1);
    (0..VERSIONS)
        .map(|step| GroupName { cluster: cluster.clone(), version: (start + step) % VERSIONS })
        .find(|candidate| !taken.contains(&candidate.to_string()))
        .context(AllTakenSnafu { cluster: cluster.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(name: &str) -> Cluster {
        Cluster::parse(name).unwrap()
    }

    #[test]
    fn clusters_parse_into_app_stack_and_detail() {
        assert_eq!(cluster("hello"), Cluster { app: "hello".into(), stack: None, detail: None });
        assert_eq!(cluster("hello-prod"), Cluster { app: "hello".into(), stack: Some("prod".into()), detail: None });
        let c = cluster("hello-prod-eu-west~1^x");
        assert_eq!((c.stack.as_deref(), c.detail.as_deref()), (Some("prod"), Some("eu-west~1^x")));
        for name in ["hello", "hello-prod", "hello-prod-canary-2", "my_app.v2-prod"] {
            assert_eq!(cluster(name).to_string(), name);
        }
    }

    #[test]
    fn a_detail_without_a_stack_is_written_with_two_dashes() {
        let c = cluster("hello--canary");
        assert_eq!((c.stack, c.detail.as_deref()), (None, Some("canary")));
        let built = Cluster { app: "hello".into(), stack: None, detail: Some("canary".into()) };
        assert_eq!(built.to_string(), "hello--canary");
        assert_eq!(GroupName { cluster: built, version: 7 }.to_string(), "hello--canary-v007");
    }

    #[test]
    fn bad_characters_are_refused_with_the_rule() {
        assert_eq!(Cluster::parse(""), Err(Error::Empty));
        assert!(matches!(Cluster::parse("hel lo"), Err(Error::BadApp { .. })));
        assert!(matches!(Cluster::parse("hello-pr~od"), Err(Error::BadStack { .. })));
        assert!(matches!(Cluster::parse("hello-prod-a/b"), Err(Error::BadDetail { .. })));
        assert!(matches!(Cluster::parse("hello-"), Err(Error::EmptyStack { .. })));
        assert!(matches!(Cluster::parse("hello-prod-"), Err(Error::BadDetail { .. })));
        let message = Cluster::parse("hel$lo").unwrap_err().to_string();
        assert!(message.contains("letters, digits, '.' and '_'"), "{message}");
    }

    #[test]
    fn version_tokens_in_stack_or_detail_are_refused() {
        for name in ["hello-v001", "hello-v123456", "hello-prod-v001", "hello-prod-x-v0001-y", "hello--v999"] {
            assert!(matches!(Cluster::parse(name), Err(Error::VersionToken { .. })), "{name}");
        }
        // Not tokens: too few or too many digits, or not a whole dash-separated part.
        for name in ["hello-v01", "hello-v1234567", "hello-prod-xv001", "hello-prod-v001x", "hello-prod-v1"] {
            assert!(Cluster::parse(name).is_ok(), "{name}");
        }
        let message = Cluster::parse("hello-prod-v001").unwrap_err().to_string();
        assert!(message.contains("detail") && message.contains("version token"), "{message}");
    }

    #[test]
    fn lengths_are_capped() {
        assert!(Cluster::parse(&"a".repeat(28)).is_ok());
        assert!(matches!(Cluster::parse(&"a".repeat(29)), Err(Error::AppTooLong { len: 29, .. })));
        // 5 + 1 + 85 + "-v000" = 96
        let fits = format!("hello-{}", "s".repeat(85));
        assert!(Cluster::parse(&fits).is_ok());
        let too_long = format!("hello-{}", "s".repeat(86));
        assert!(matches!(Cluster::parse(&too_long), Err(Error::GroupTooLong { len: 97, .. })));
        assert!(matches!(GroupName::parse(&format!("{fits}-v1000")), Err(Error::GroupTooLong { .. })));
    }

    #[test]
    fn group_names_parse_three_to_six_digit_versions_and_print_three() {
        let g = GroupName::parse("hello-prod-v003").unwrap();
        assert_eq!((g.cluster, g.version), (cluster("hello-prod"), 3));
        let g = GroupName::parse("hello-prod-canary-v123456").unwrap();
        assert_eq!((g.cluster.detail.as_deref(), g.version), (Some("canary"), 123456));
        assert_eq!(GroupName::parse("hello-v0042").unwrap().to_string(), "hello-v042");
        for name in ["hello-prod", "hello-v01", "hello-v1234567", "v001", "hello-prod-vabc"] {
            assert!(GroupName::parse(name).is_err(), "{name}");
        }
    }

    #[test]
    fn the_first_group_is_v000_and_the_next_follows_the_newest_by_creation() {
        let c = cluster("hello-prod");
        assert_eq!(next_group(&c, []).unwrap().to_string(), "hello-prod-v000");
        // v005 is newer by creation than v010, so v006 is next (not v011).
        let existing = [("hello-prod-v010", 100), ("hello-prod-v005", 200)];
        assert_eq!(next_group(&c, existing).unwrap().to_string(), "hello-prod-v006");
        // Groups of other clusters or without versions do not count.
        let existing = [("hello-prod-v002", 100), ("hello-prod-canary-v050", 300), ("hello-prod", 400)];
        assert_eq!(next_group(&c, existing).unwrap().to_string(), "hello-prod-v003");
    }

    #[test]
    fn versions_wrap_and_skip_names_in_use() {
        let c = cluster("hello");
        assert_eq!(next_group(&c, [("hello-v999", 1)]).unwrap().to_string(), "hello-v000");
        assert_eq!(next_group(&c, [("hello-v999", 2), ("hello-v000", 1)]).unwrap().to_string(), "hello-v001");
        assert_eq!(next_group(&c, [("hello-v1000", 1)]).unwrap().to_string(), "hello-v001");
        let skip = [("hello-v004", 9), ("hello-v005", 1), ("hello-v006", 2)];
        assert_eq!(next_group(&c, skip).unwrap().to_string(), "hello-v007");
    }

    #[test]
    fn all_versions_taken_is_an_error() {
        let c = cluster("hello");
        let names: Vec<String> = (0..1000).map(|v| format!("hello-v{v:03}")).collect();
        let all = names.iter().enumerate().map(|(i, n)| (n.as_str(), i as u64));
        let err = next_group(&c, all).unwrap_err();
        assert_eq!(err, Error::AllTaken { cluster: "hello".into() });
        assert!(err.to_string().contains("destroy old groups"));
        let but_one = names.iter().filter(|n| *n != "hello-v500").map(|n| (n.as_str(), 1));
        assert_eq!(next_group(&c, but_one).unwrap().version, 500);
    }
}

//! What a cloud must offer the launcher: server groups of a cluster, their health, putting them
//! in and out of service, a per-cluster lock and a place to keep the current deploy's record.
//! Every operation is idempotent so that a deploy interrupted anywhere can simply be rerun.

use super::registry::Instance;
use super::soak::{Soak, Traffic};
use serde::{Deserialize, Serialize};
use std::time::Duration;

pub type Error = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T> = std::result::Result<T, Error>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    pub min: u32,
    pub max: u32,
    pub desired: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    Starting,
    Healthy,
    Unhealthy,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub id: String,
    pub zone: String,
    pub health: Health,
    pub address: Option<String>,
    /// As clients of the service registry see it (`UP`, `OUT_OF_SERVICE`, …); None where the
    /// cloud has no registry or the instance has not registered.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_status: Option<String>,
    /// Unix seconds it was started at, where the cloud says.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub launched: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Group {
    /// Frigga name, `cluster-vNNN`.
    pub name: String,
    pub image_id: String,
    /// Unix seconds.
    pub created: u64,
    pub capacity: Capacity,
    /// Registered in the target groups / balancer.
    pub in_service: bool,
    /// Launch, Terminate and AddToLoadBalancer suspended.
    pub suspended: bool,
    /// Unix seconds, from a tag; what `finish --soak` measures from.
    pub disabled_at: Option<u64>,
    pub deploy_id: Option<String>,
    /// Its instances register in the service registry, and count as healthy only once `UP` there.
    #[serde(default)]
    pub registers: bool,
    /// Instances the group replaced (where the provider heals groups itself, as local does).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replacements: Vec<Replacement>,
    /// Health already includes the provider's health-URL / target-health check.
    pub members: Vec<Member>,
}

/// An instance a group replaced, as an Auto Scaling group's activity history says it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Replacement {
    /// Unix seconds.
    pub at: u64,
    pub instance: String,
    pub replaced_by: String,
    pub reason: String,
}

/// How an Auto Scaling group judges its instances' health.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum HealthCheckType {
    /// The load balancer's health checks (and EC2 status).
    #[serde(rename = "ELB")]
    #[value(name = "ELB")]
    Elb,
    /// EC2 status checks only.
    #[serde(rename = "EC2")]
    #[value(name = "EC2")]
    Ec2,
}

impl HealthCheckType {
    pub fn as_str(self) -> &'static str {
        match self {
            HealthCheckType::Elb => "ELB",
            HealthCheckType::Ec2 => "EC2",
        }
    }
}

/// What a group launches with besides its image (aws: launch template and Auto Scaling
/// settings). Each one not given is copied from the group's ancestor, or is the cloud's default
/// for a cluster's first group.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct LaunchSettings {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_type: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub security_groups: Option<Vec<String>>,
    /// An instance profile's name or ARN.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance_profile: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_name: Option<String>,
    /// The team's own user data (the launcher's is merged with it, never over it). Never
    /// written out: it may hold what a team considers secret.
    #[serde(skip)]
    pub user_data: Option<Vec<u8>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_check_type: Option<HealthCheckType>,
    /// Seconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_check_grace: Option<u64>,
    /// Which instances a scale-in ends first (Auto Scaling's names, or a Lambda function's ARN).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub termination_policies: Option<Vec<String>>,
}

/// Auto Scaling's own termination policies (a Lambda function's ARN is the other kind).
pub const TERMINATION_POLICIES: [&str; 7] = [
    "Default",
    "AllocationStrategy",
    "OldestLaunchTemplate",
    "OldestLaunchConfiguration",
    "ClosestToNextInstanceHour",
    "NewestInstance",
    "OldestInstance",
];

/// Why `policy` is not a termination policy, if it is not.
pub fn termination_policy_problem(policy: &str) -> Option<String> {
    let known = TERMINATION_POLICIES.contains(&policy) || policy.starts_with("arn:aws:lambda:");
    (!known).then(|| format!("is not a termination policy ({} or a Lambda ARN)", TERMINATION_POLICIES.join(", ")))
}

impl LaunchSettings {
    /// These settings where given, `under`'s elsewhere.
    pub fn over(self, under: LaunchSettings) -> LaunchSettings {
        LaunchSettings {
            instance_type: self.instance_type.or(under.instance_type),
            security_groups: self.security_groups.or(under.security_groups),
            instance_profile: self.instance_profile.or(under.instance_profile),
            key_name: self.key_name.or(under.key_name),
            user_data: self.user_data.or(under.user_data),
            health_check_type: self.health_check_type.or(under.health_check_type),
            health_check_grace: self.health_check_grace.or(under.health_check_grace),
            termination_policies: self.termination_policies.or(under.termination_policies),
        }
    }

    /// The settings given that only a cloud with launch templates can apply.
    pub fn cloud_only(&self) -> Vec<&'static str> {
        [
            ("--security-group", self.security_groups.is_some()),
            ("--instance-profile", self.instance_profile.is_some()),
            ("--key-name", self.key_name.is_some()),
            ("--user-data-file", self.user_data.is_some()),
            ("--health-check-type", self.health_check_type.is_some()),
            ("--health-check-grace", self.health_check_grace.is_some()),
            ("--termination-policy", self.termination_policies.is_some()),
        ]
        .into_iter()
        .filter_map(|(flag, given)| given.then_some(flag))
        .collect()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupSpec {
    pub name: String,
    pub cluster: String,
    pub image_id: String,
    /// What was asked for; the rest comes from `ancestor`.
    #[serde(default)]
    pub launch: LaunchSettings,
    /// The group whose launch settings, scaling policies and scheduled actions the new one
    /// copies (Spinnaker's "copy from the previous server group"); None for a cluster's first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ancestor: Option<String>,
    pub capacity: Capacity,
    pub subnets: Vec<String>,
    pub target_groups: Vec<String>,
    pub health_url: String,
    /// aws: the Cloud Map namespace the instances register in (local instances always register
    /// in the state directory's registry).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registry_namespace: Option<String>,
    pub deploy_id: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LockHolder {
    pub deploy_id: String,
    pub owner: String,
    pub host: String,
    pub pid: u32,
    /// The process's start time as the provider's `alive` check understands it (clock ticks since
    /// boot on Linux), so that a reused pid is not mistaken for the holder.
    pub start_time: u64,
    /// Unix seconds.
    pub expires: u64,
}

impl LockHolder {
    /// Whether the lock may be taken over: it expired, or its holder ran on this host and is gone.
    /// `alive(pid, start_time)` says whether that process still runs here.
    pub fn is_stale(&self, now: u64, this_host: &str, alive: impl Fn(u32, u64) -> bool) -> bool {
        now >= self.expires || (self.host == this_host && !alive(self.pid, self.start_time))
    }

    /// [`LockHolder::is_stale`] seen from this process's host.
    pub fn is_stale_here(&self, now: u64) -> bool {
        self.is_stale(now, &this_host(), |pid, start| crate::process::is_running(pid as i32, start))
    }
}

/// This host's name, as lock holders record it.
pub fn this_host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "unknown".into())
}

/// What the record describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Action {
    Deploy,
    Rollback,
    Finish,
    Destroy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Running,
    /// Flipped, and watched until the soak ends (or switched back on a breach).
    Soaking,
    Succeeded,
    Failed,
    /// Stopped on request between steps; a rerun converges.
    Cancelled,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Pending,
    Ok,
    /// Not run: already done, or not reached (the message says which).
    Skipped,
    Failed,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: String,
    pub outcome: Outcome,
    pub message: Option<String>,
    pub duration_ms: u64,
}

/// The last launcher operation on a cluster, saved after every step: what `status` shows, what a
/// rerun after a crash converges from, and the JSON result of a command. Providers store it as
/// opaque JSON, one per cluster.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeployRecord {
    pub deploy_id: String,
    pub action: Action,
    pub cluster: String,
    /// The image being deployed (deploys only).
    pub image_id: Option<String>,
    pub strategy: Option<String>,
    pub new_group: Option<String>,
    pub previous_group: Option<String>,
    pub phase: Phase,
    /// Why there was nothing to do, or why it failed.
    pub message: Option<String>,
    pub steps: Vec<StepRecord>,
    /// Unix seconds.
    pub started: u64,
    pub updated: u64,
    /// Who ran it, as `owner on host` (the console's logins as `name (console, from ADDRESS)`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub started_by: Option<String>,
    /// The watched soak after the flip, when the deploy asked for one (and kept on the record
    /// of the rollback or finish that ended it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub soak: Option<Soak>,
}

impl DeployRecord {
    /// A deploy that did not reach its end: a rerun for the same image continues it.
    pub fn is_unfinished_deploy_of(&self, image_id: &str) -> bool {
        let ended = matches!(self.phase, Phase::Succeeded | Phase::Soaking);
        self.action == Action::Deploy && !ended && self.image_id.as_deref() == Some(image_id)
    }
}

/// Something that uses an image, so that `bakery images prune` never deletes it.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ImageReference {
    pub image_id: String,
    /// What, as `group hello-prod-v004 (serving)` or `instance i-0abc (stopped)`.
    pub by: String,
    /// A group in service launches from it.
    pub serving: bool,
}

impl ImageReference {
    /// A use that is not a serving group.
    pub fn new(image_id: &str, by: String) -> ImageReference {
        ImageReference { image_id: image_id.to_string(), by, serving: false }
    }
}

/// The images of every cluster's groups, serving or not.
pub fn cluster_references(cloud: &(impl Cloud + ?Sized)) -> Result<Vec<ImageReference>> {
    let mut references = Vec::new();
    for cluster in cloud.clusters()? {
        for group in cloud.groups(&cluster)? {
            let state = if group.in_service { "serving" } else { "disabled" };
            references.push(ImageReference {
                image_id: group.image_id.clone(),
                by: format!("group {} ({state})", group.name),
                serving: group.in_service,
            });
        }
    }
    Ok(references)
}

/// One cloud (or this host) as the launcher sees it. Removal succeeds when the thing is already
/// gone and creation succeeds when a matching thing exists, so every step can run twice.
pub trait Cloud: Send + Sync {
    /// `"aws"` or `"local"`.
    fn kind(&self) -> &'static str;
    fn clusters(&self) -> Result<Vec<String>>;
    fn groups(&self, cluster: &str) -> Result<Vec<Group>>;
    /// Launch template + group, not in service. Already exists → Ok.
    fn create_group(&self, spec: &GroupSpec) -> Result<()>;
    fn resize_group(&self, group: &str, capacity: Capacity) -> Result<()>;
    /// Resumes the suspended processes without registering in the target groups, so that a
    /// disabled group can grow and be checked before it takes traffic again (rollback).
    fn resume_group(&self, group: &str) -> Result<()>;
    /// Resumes processes, registers in the target groups / balancer, clears `disabled_at`.
    fn add_to_service(&self, group: &str) -> Result<()>;
    /// Suspends processes, deregisters, tags `disabled_at` (an existing tag is kept); instances
    /// keep running. Missing → Ok.
    fn remove_from_service(&self, group: &str, at: u64) -> Result<()>;
    /// Group, instances and launch template. Missing → Ok.
    fn destroy_group(&self, group: &str) -> Result<()>;
    /// What makes a deploy one this cloud could not carry out as asked, each problem named with
    /// what would do; it is refused before anything is made unless there is none.
    fn check_request(&self, _request: &super::plan::DeployRequest) -> Vec<String> {
        Vec::new()
    }
    /// What makes a planned group one this cloud could not make (what it copies from its
    /// ancestor included), as `check_request`; an error when it could not look.
    fn check_group(&self, _spec: &GroupSpec) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
    /// None: the lock is ours now (also when `holder.deploy_id` already held it: that refreshes
    /// `expires`). Some(h): held by the live holder h.
    fn acquire_lock(&self, cluster: &str, holder: &LockHolder) -> Result<Option<LockHolder>>;
    /// Only if `deploy_id` holds it; otherwise Ok.
    fn release_lock(&self, cluster: &str, deploy_id: &str) -> Result<()>;
    fn save_deploy(&self, record: &DeployRecord) -> Result<()>;
    fn load_deploy(&self, cluster: &str) -> Result<Option<DeployRecord>>;
    /// The cluster's records, newest first, as far back as the cloud keeps them (at least the
    /// last one).
    fn history(&self, cluster: &str) -> Result<Vec<DeployRecord>> {
        Ok(self.load_deploy(cluster)?.into_iter().collect())
    }
    /// Who holds the cluster's deploy lock, if a live run does.
    fn lock_holder(&self, cluster: &str) -> Result<Option<LockHolder>>;
    /// Where the cluster's traffic arrives (local: `http://127.0.0.1:PORT`).
    fn balancer_url(&self, cluster: &str) -> Option<String>;
    /// Stops what the provider runs for a cluster that has no groups left (local: its balancer;
    /// on AWS the load balancer is the user's, so nothing). Refused while groups remain.
    fn retire_cluster(&self, cluster: &str) -> Result<()>;
    /// The group's traffic over the last `window` (requests, 5xx, p99), for the watched soak;
    /// None where the cloud cannot tell.
    fn traffic(&self, _cluster: &str, _group: &str, _window: Duration) -> Result<Option<Traffic>> {
        Ok(None)
    }
    /// Replaces the instances of the cluster's groups in service that died or stayed unhealthy
    /// past their grace period, keeping each group's capacity; disabled groups are left alone,
    /// as a suspended Auto Scaling group is. Nothing where the cloud heals groups itself.
    fn heal(&self, _cluster: &str) -> Result<Vec<Replacement>> {
        Ok(Vec::new())
    }
    /// Ends an instance abruptly, as a host failure would (Chaos Monkey); its group replaces it
    /// and keeps its desired capacity.
    fn terminate_instance(&self, group: &str, instance: &str) -> Result<()>;
    /// Latency Monkey: delays the traffic the balancer sends `instance` by `delay` ± `jitter`
    /// until Unix second `until`, after which it ends by itself (and the healer tidies up).
    fn inject_latency(
        &self,
        _group: &str,
        instance: &str,
        _delay: Duration,
        _jitter: Duration,
        _until: u64,
    ) -> Result<()> {
        Err(format!("{instance}: Latency Monkey is not available on the {} provider yet", self.kind()).into())
    }
    /// How often the engine looks at a group it waits for: the flip follows the last instance
    /// `UP` within this, so as often as reading the groups is cheap enough.
    fn poll_interval(&self) -> Duration {
        Duration::from_secs(5)
    }
    /// Where Chaos Monkey's consent and audit log are kept: the state directory, unless the
    /// cloud keeps its deploy state elsewhere (aws: the launcher's table).
    fn chaos_store(&self, state_dir: &std::path::Path) -> Box<dyn super::chaos::ChaosStore + '_> {
        Box::new(super::chaos::ChaosFiles::new(state_dir))
    }
    /// What uses images here: every cluster's groups, and whatever else the cloud can launch
    /// an image from.
    fn image_references(&self) -> Result<Vec<ImageReference>> {
        cluster_references(self)
    }
    /// The instances registered in the service registry for `cluster` (all when None), as
    /// clients see them; empty where the cloud has no registry.
    fn registrations(&self, _cluster: Option<&str>) -> Result<Vec<Instance>> {
        Ok(Vec::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(host: &str, expires: u64) -> LockHolder {
        LockHolder { deploy_id: "d1".into(), owner: "ann".into(), host: host.into(), pid: 42, start_time: 7, expires }
    }

    #[test]
    fn a_lock_is_stale_when_expired_or_its_local_holder_is_gone() {
        let alive = |pid, start| pid == 42 && start == 7;
        let dead = |_, _| false;
        assert!(!holder("here", 100).is_stale(99, "here", alive));
        assert!(holder("here", 100).is_stale(100, "here", alive));
        assert!(holder("here", 100).is_stale(50, "here", dead));
        // A pid on another host cannot be checked from here: only expiry frees it.
        assert!(!holder("there", 100).is_stale(50, "here", dead));
        assert!(holder("there", 100).is_stale(150, "here", dead));
    }

    #[test]
    fn given_settings_win_and_the_cloud_only_ones_are_named() {
        let given = LaunchSettings { key_name: Some("ops2".into()), ..LaunchSettings::default() };
        let configured = LaunchSettings {
            key_name: Some("ops".into()),
            security_groups: Some(vec!["sg-1".into()]),
            ..LaunchSettings::default()
        };
        let merged = given.over(configured);
        assert_eq!(
            (merged.key_name.as_deref(), merged.security_groups.as_deref()),
            (Some("ops2"), Some(&["sg-1".to_string()][..]))
        );
        assert_eq!(merged.cloud_only(), ["--security-group", "--key-name"]);
        assert!(LaunchSettings { instance_type: Some("t3.small".into()), ..LaunchSettings::default() }
            .cloud_only()
            .is_empty());
        assert_eq!(termination_policy_problem("OldestInstance"), None);
        assert!(termination_policy_problem("Oldest").is_some_and(|p| p.contains("NewestInstance")));
    }

    #[test]
    fn an_unfinished_deploy_is_one_not_succeeded_for_the_same_image() {
        let mut record = DeployRecord {
            deploy_id: "d1".into(),
            action: Action::Deploy,
            cluster: "hello".into(),
            image_id: Some("ami-1".into()),
            strategy: Some("red-black".into()),
            new_group: Some("hello-v001".into()),
            previous_group: None,
            phase: Phase::Cancelled,
            message: None,
            steps: vec![],
            started: 1,
            updated: 2,
            started_by: None,
            soak: None,
        };
        assert!(record.is_unfinished_deploy_of("ami-1"));
        assert!(!record.is_unfinished_deploy_of("ami-2"));
        record.phase = Phase::Succeeded;
        assert!(!record.is_unfinished_deploy_of("ami-1"));
        record.phase = Phase::Running;
        record.action = Action::Rollback;
        assert!(!record.is_unfinished_deploy_of("ami-1"));
        let json = serde_json::to_string(&record).unwrap();
        assert_eq!(serde_json::from_str::<DeployRecord>(&json).unwrap(), record);
    }
}

//! Deploy, rollback and cleanup as plans: lists of small idempotent operations decided from the
//! cluster's groups and its last deploy record alone. Nothing here touches a cloud, so every
//! strategy is tested without one, and a rerun after a crash re-plans from what exists.

use super::cloud::{Capacity, DeployRecord, Group, GroupSpec, LaunchSettings};
use super::names::{self, Cluster};
use super::soak::Thresholds;
use snafu::{ensure, OptionExt, ResultExt, Snafu};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

/// One instance per zone over at least three zones.
pub const MIN_INSTANCES: u32 = 3;

#[derive(Debug, Snafu)]
pub enum Error {
    #[snafu(display("cluster {cluster:?}: {source}"))]
    BadCluster { cluster: String, source: names::Error },

    #[snafu(display("choosing the next group: {source}"))]
    NextGroup { source: names::Error },

    #[snafu(display("no image given"))]
    NoImage,

    #[snafu(display(
        "--{which} {value} is below {MIN_INSTANCES}: a cluster keeps at least one instance in each of 3 zones"
    ))]
    BelowMinimum { which: &'static str, value: u32 },

    #[snafu(display(
        "capacity min {min} / desired {desired} / max {max} is inconsistent: need min <= desired <= max \
         (values not given come from {from})"
    ))]
    BadCapacity { min: u32, desired: u32, max: u32, from: String },

    #[snafu(display("--soak needs the old group kept to switch back to: use red-black with --keep 1 or more"))]
    SoakWithoutRollback,

    #[snafu(display("unknown strategy {given:?}: use red-black or highlander"))]
    UnknownStrategy { given: String },

    #[snafu(display("cluster {cluster} has no group in service to roll back from"))]
    NothingServing { cluster: String },

    #[snafu(display("cluster {cluster} has no group older than {newest} to roll back to"))]
    NothingToRollBackTo { cluster: String, newest: String },
}

pub type Result<T> = std::result::Result<T, Error>;

/// One idempotent step; running it twice has the effect of running it once.
#[derive(Clone, Debug, PartialEq)]
pub enum Operation {
    CreateGroup(Box<GroupSpec>),
    /// Resume suspended processes without taking traffic.
    Resume(String),
    Resize(String, Capacity),
    /// The health gate: `desired` members, all healthy, within `timeout`.
    WaitHealthy {
        group: String,
        desired: u32,
        timeout: Duration,
    },
    AddToService(String),
    RemoveFromService(String),
    DestroyGroup(String),
}

impl Operation {
    /// The group the operation acts on.
    pub fn group(&self) -> &str {
        match self {
            Operation::CreateGroup(spec) => &spec.name,
            Operation::WaitHealthy { group, .. } => group,
            Operation::Resume(group)
            | Operation::Resize(group, _)
            | Operation::AddToService(group)
            | Operation::RemoveFromService(group)
            | Operation::DestroyGroup(group) => group,
        }
    }
}

impl fmt::Display for Operation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Operation::CreateGroup(spec) => {
                let Capacity { min, max, desired } = spec.capacity;
                let like = match (&spec.launch.instance_type, &spec.ancestor) {
                    (Some(kind), _) => format!("{desired} x {kind}"),
                    (None, Some(ancestor)) => format!("{desired} like {ancestor}"),
                    (None, None) => format!("{desired} instances"),
                };
                write!(f, "create {} from {} ({like}, min {min}, max {max})", spec.name, spec.image_id)
            }
            Operation::Resume(group) => write!(f, "resume the processes of {group}"),
            Operation::Resize(group, Capacity { min, max, desired }) => {
                write!(f, "resize {group} to min {min}, desired {desired}, max {max}")
            }
            Operation::WaitHealthy { group, desired, timeout } => {
                write!(
                    f,
                    "wait up to {} for {desired} healthy instances in {group}",
                    humantime::format_duration(*timeout)
                )
            }
            Operation::AddToService(group) => write!(f, "put {group} in service"),
            Operation::RemoveFromService(group) => write!(f, "take {group} out of service, instances kept running"),
            Operation::DestroyGroup(group) => write!(f, "destroy {group} and its launch template"),
        }
    }
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// The group serving once the plan has run.
    pub new_group: Option<String>,
    /// The group that served before.
    pub previous_group: Option<String>,
    pub steps: Vec<Operation>,
    /// Run instead of the remaining steps when a health gate fails.
    pub on_gate_failure: Vec<Operation>,
    /// Why the plan is empty.
    pub message: Option<String>,
}

/// Everything a plan is decided from.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterState {
    pub cluster: String,
    pub groups: Vec<Group>,
    /// The last launcher operation on the cluster, possibly interrupted.
    pub record: Option<DeployRecord>,
}

impl ClusterState {
    pub fn group(&self, name: &str) -> Option<&Group> {
        self.groups.iter().find(|g| g.name == name)
    }
}

/// Newest first by creation; the name breaks ties between groups created in the same second.
fn age(group: &Group) -> (u64, &str) {
    (group.created, &group.name)
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum StrategyKind {
    #[default]
    RedBlack,
    Highlander,
}

impl StrategyKind {
    pub fn strategy(self) -> &'static dyn Strategy {
        match self {
            StrategyKind::RedBlack => &RedBlack,
            StrategyKind::Highlander => &Highlander,
        }
    }
}

impl FromStr for StrategyKind {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "red-black" => Ok(StrategyKind::RedBlack),
            "highlander" => Ok(StrategyKind::Highlander),
            _ => UnknownStrategySnafu { given: s }.fail(),
        }
    }
}

/// What `launcher deploy` was asked. Capacity values not given come from the serving group.
#[derive(Clone, Debug, PartialEq)]
pub struct DeployRequest {
    pub cluster: String,
    pub image_id: String,
    pub strategy: StrategyKind,
    pub min: Option<u32>,
    pub max: Option<u32>,
    pub desired: Option<u32>,
    /// Launch settings given for this deploy; the rest are copied from the serving group.
    pub launch: LaunchSettings,
    /// Empty: the provider's default subnets.
    pub subnets: Vec<String>,
    pub target_groups: Vec<String>,
    pub health_url: String,
    /// aws: register the instances in this Cloud Map namespace and gate on it.
    pub registry_namespace: Option<String>,
    pub health_timeout: Duration,
    /// Disabled groups kept after the flip (red/black only).
    pub keep: usize,
    /// Watch the new group for this long after the flip, with these thresholds.
    pub soak: Option<(Duration, Thresholds)>,
}

/// A way to replace the serving group. Strategies only plan; the engine executes.
pub trait Strategy: Sync {
    fn name(&self) -> &'static str;
    fn plan_deploy(&self, state: &ClusterState, request: &DeployRequest, deploy_id: &str) -> Result<Plan>;
}

/// Bring up the new group beside the old, flip traffic, keep `--keep` disabled groups for rollback.
pub struct RedBlack;

/// Red/black that destroys every other group once the new one serves.
pub struct Highlander;

impl Strategy for RedBlack {
    fn name(&self) -> &'static str {
        "red-black"
    }
    fn plan_deploy(&self, state: &ClusterState, request: &DeployRequest, deploy_id: &str) -> Result<Plan> {
        plan_flip(state, request, deploy_id, request.keep)
    }
}

impl Strategy for Highlander {
    fn name(&self) -> &'static str {
        "highlander"
    }
    fn plan_deploy(&self, state: &ClusterState, request: &DeployRequest, deploy_id: &str) -> Result<Plan> {
        plan_flip(state, request, deploy_id, 0)
    }
}

/// The final capacity of the new group: the request's values, the rest from the previous group
/// (or the minimum), with inherited values giving way to explicit ones.
fn capacity(request: &DeployRequest, previous: Option<&Group>) -> Result<Capacity> {
    for (which, value) in [("min", request.min), ("desired", request.desired), ("max", request.max)] {
        if let Some(value) = value {
            ensure!(value >= MIN_INSTANCES, BelowMinimumSnafu { which, value });
        }
    }
    let base = previous.map_or(Capacity { min: 0, max: 0, desired: 0 }, |g| g.capacity);
    let mut c = Capacity {
        min: request.min.unwrap_or(base.min.max(MIN_INSTANCES)),
        max: request.max.unwrap_or(base.max.max(MIN_INSTANCES)),
        desired: request.desired.unwrap_or(base.desired.max(MIN_INSTANCES)),
    };
    if request.desired.is_none() {
        c.desired = c.desired.max(c.min);
        if request.max.is_some() {
            c.desired = c.desired.min(c.max);
        }
    }
    if request.max.is_none() {
        c.max = c.max.max(c.desired);
    }
    if request.min.is_none() {
        c.min = c.min.min(c.desired);
    }
    let from = previous.map_or("the defaults".to_string(), |g| g.name.clone());
    let Capacity { min, max, desired } = c;
    ensure!(min <= desired && desired <= max, BadCapacitySnafu { min, desired, max, from });
    Ok(c)
}

/// Red/black with `keep` disabled groups left afterwards (highlander: none).
fn plan_flip(state: &ClusterState, request: &DeployRequest, deploy_id: &str, keep: usize) -> Result<Plan> {
    let cluster = Cluster::parse(&request.cluster).context(BadClusterSnafu { cluster: &request.cluster })?;
    ensure!(!request.image_id.is_empty(), NoImageSnafu);
    // Subnets are the cloud's to check (aws: their zones, whether given or copied).
    ensure!(request.soak.is_none() || keep > 0, SoakWithoutRollbackSnafu);

    // A rerun after a crash continues the unfinished deploy of this image instead of starting a
    // second group; every step of the plan is idempotent, so re-planning all of it is safe.
    let resumed = state
        .record
        .as_ref()
        .filter(|r| r.is_unfinished_deploy_of(&request.image_id))
        .and_then(|r| Some((state.group(r.new_group.as_deref()?)?, r.previous_group.as_deref())));
    let serving: Vec<&Group> = state.groups.iter().filter(|g| g.in_service).collect();
    let (new_name, previous) = match resumed {
        Some((group, previous)) => (group.name.clone(), previous.and_then(|p| state.group(p))),
        None => {
            if let [only] = serving[..] {
                if only.image_id == request.image_id {
                    return Ok(Plan {
                        new_group: Some(only.name.clone()),
                        message: Some(format!("{} already serves {} alone", only.name, request.image_id)),
                        ..Plan::default()
                    });
                }
            }
            let existing = state.groups.iter().map(|g| (g.name.as_str(), g.created));
            let name = names::next_group(&cluster, existing).context(NextGroupSnafu)?;
            (name.to_string(), serving.iter().copied().max_by_key(|g| age(g)))
        }
    };

    let target = capacity(request, previous)?;
    // Settings come from the group being replaced, or else the newest one the cluster has.
    let newest = state.groups.iter().filter(|g| g.name != new_name).max_by_key(|g| age(g));
    let ancestor = previous.or(newest).map(|g| g.name.clone());
    // Pinned at desired until it serves: an idle group would otherwise be scaled in by its policies.
    let launch = Capacity { min: target.desired, ..target };
    let spec = GroupSpec {
        name: new_name.clone(),
        cluster: request.cluster.clone(),
        image_id: request.image_id.clone(),
        launch: request.launch.clone(),
        ancestor,
        capacity: launch,
        subnets: request.subnets.clone(),
        target_groups: request.target_groups.clone(),
        health_url: request.health_url.clone(),
        registry_namespace: request.registry_namespace.clone(),
        deploy_id: deploy_id.to_string(),
    };
    let mut steps = vec![
        Operation::CreateGroup(Box::new(spec)),
        Operation::WaitHealthy { group: new_name.clone(), desired: target.desired, timeout: request.health_timeout },
        Operation::AddToService(new_name.clone()),
    ];
    steps.extend(serving.iter().filter(|g| g.name != new_name).map(|g| Operation::RemoveFromService(g.name.clone())));
    if launch != target {
        steps.push(Operation::Resize(new_name.clone(), target));
    }
    // After the flip every other group is disabled; keep the newest `keep` of them.
    let mut others: Vec<&Group> = state.groups.iter().filter(|g| g.name != new_name).collect();
    others.sort_by_key(|g| std::cmp::Reverse(age(g)));
    steps.extend(others.iter().skip(keep).map(|g| Operation::DestroyGroup(g.name.clone())));

    // Normally the previous group still serves and only the new one goes. A resumed deploy may
    // have disabled it already: then it goes back in service first.
    let mut on_gate_failure = vec![];
    if let Some(previous) = previous.filter(|g| !g.in_service) {
        on_gate_failure.push(Operation::AddToService(previous.name.clone()));
    }
    on_gate_failure.push(Operation::DestroyGroup(new_name.clone()));

    Ok(Plan {
        new_group: Some(new_name),
        previous_group: previous.map(|g| g.name.clone()),
        steps,
        on_gate_failure,
        message: None,
    })
}

/// Put the group before the serving one (or the group `to`, such as the one a soaking deploy
/// replaced) back in service at no less than its capacity, then disable the serving one.
pub fn plan_rollback(state: &ClusterState, health_timeout: Duration, to: Option<&str>) -> Result<Plan> {
    let cluster = &state.cluster;
    let newest = state.groups.iter().filter(|g| g.in_service).max_by_key(|g| age(g));
    let newest = newest.context(NothingServingSnafu { cluster })?;
    // Groups newer than the serving one are unfinished deploys, never a rollback target.
    let older = state.groups.iter().filter(|g| age(g) < age(newest) && to.is_none_or(|to| g.name == to));
    let previous = older.max_by_key(|g| age(g));
    let previous = previous.context(NothingToRollBackToSnafu { cluster, newest: &newest.name })?;
    let (old, new) = (previous.capacity, newest.capacity);
    let capacity =
        Capacity { min: old.min.max(new.min), max: old.max.max(new.max), desired: old.desired.max(new.desired) };
    let name = previous.name.clone();
    let steps = vec![
        // A suspended group cannot launch: resume first, without taking traffic.
        Operation::Resume(name.clone()),
        Operation::Resize(name.clone(), capacity),
        Operation::WaitHealthy { group: name.clone(), desired: capacity.desired, timeout: health_timeout },
        Operation::AddToService(name.clone()),
        Operation::RemoveFromService(newest.name.clone()),
    ];
    // The newest group was not touched before the gate: only undo what was done to the previous.
    let on_gate_failure = if previous.in_service {
        vec![]
    } else {
        vec![Operation::Resize(name.clone(), old), Operation::RemoveFromService(name.clone())]
    };
    Ok(Plan { new_group: Some(name), previous_group: Some(newest.name.clone()), steps, on_gate_failure, message: None })
}

/// Destroy the disabled groups that have soaked for `soak` by `now` (unix seconds).
pub fn plan_finish(state: &ClusterState, soak: Duration, now: u64) -> Plan {
    let soaked = |g: &&Group| !g.in_service && g.disabled_at.is_some_and(|at| at.saturating_add(soak.as_secs()) <= now);
    let steps: Vec<Operation> =
        state.groups.iter().filter(soaked).map(|g| Operation::DestroyGroup(g.name.clone())).collect();
    let message = steps
        .is_empty()
        .then(|| format!("no disabled group of {} has soaked for {}", state.cluster, humantime::format_duration(soak)));
    let serving = state.groups.iter().filter(|g| g.in_service).max_by_key(|g| age(g));
    Plan { new_group: serving.map(|g| g.name.clone()), steps, message, ..Plan::default() }
}

/// Every group of the cluster destroyed, newest first; the serving one goes last.
pub fn plan_destroy(state: &ClusterState) -> Plan {
    let mut groups: Vec<&Group> = state.groups.iter().collect();
    groups.sort_by_key(|g| (g.in_service, std::cmp::Reverse(age(g))));
    let steps = groups.into_iter().map(|g| Operation::DestroyGroup(g.name.clone())).collect();
    Plan { steps, ..Plan::default() }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::launch::cloud::{Action, Phase};

    pub fn group(name: &str, image: &str, created: u64, in_service: bool, desired: u32) -> Group {
        Group {
            name: name.into(),
            image_id: image.into(),
            created,
            capacity: Capacity { min: desired, max: desired * 2, desired },
            in_service,
            suspended: !in_service,
            disabled_at: (!in_service).then_some(created + 10),
            deploy_id: None,
            registers: false,
            replacements: vec![],
            members: vec![],
        }
    }

    pub fn request(image: &str) -> DeployRequest {
        DeployRequest {
            cluster: "hello-prod".into(),
            image_id: image.into(),
            strategy: StrategyKind::RedBlack,
            min: None,
            max: None,
            desired: None,
            launch: LaunchSettings::default(),
            subnets: vec![],
            target_groups: vec!["arn:tg".into()],
            health_url: "/hello/health".into(),
            registry_namespace: None,
            health_timeout: Duration::from_secs(600),
            keep: 2,
            soak: None,
        }
    }

    fn state(groups: Vec<Group>) -> ClusterState {
        ClusterState { cluster: "hello-prod".into(), groups, record: None }
    }

    fn deploy(state: &ClusterState, request: &DeployRequest) -> Result<Plan> {
        request.strategy.strategy().plan_deploy(state, request, "d1")
    }

    fn described(ops: &[Operation]) -> Vec<String> {
        ops.iter().map(|op| op.to_string()).collect()
    }

    #[test]
    fn a_first_deploy_creates_v000_at_three_and_disables_nothing() {
        let plan = deploy(&state(vec![]), &request("ami-1")).unwrap();
        assert_eq!(plan.new_group.as_deref(), Some("hello-prod-v000"));
        assert_eq!(plan.previous_group, None);
        let Operation::CreateGroup(spec) = &plan.steps[0] else { panic!("{:?}", plan.steps) };
        assert_eq!(spec.capacity, Capacity { min: 3, max: 3, desired: 3 });
        assert_eq!((spec.deploy_id.as_str(), spec.image_id.as_str()), ("d1", "ami-1"));
        assert_eq!(
            described(&plan.steps[1..]),
            ["wait up to 10m for 3 healthy instances in hello-prod-v000", "put hello-prod-v000 in service"]
        );
        assert_eq!(plan.on_gate_failure, [Operation::DestroyGroup("hello-prod-v000".into())]);
    }

    #[test]
    fn a_second_deploy_takes_the_serving_groups_capacity_and_restores_min_after_the_flip() {
        let mut old = group("hello-prod-v004", "ami-1", 100, true, 5);
        old.capacity = Capacity { min: 4, max: 10, desired: 5 };
        let plan = deploy(&state(vec![old]), &request("ami-2")).unwrap();
        assert_eq!(plan.new_group.as_deref(), Some("hello-prod-v005"));
        assert_eq!(plan.previous_group.as_deref(), Some("hello-prod-v004"));
        let new = "hello-prod-v005".to_string();
        let Operation::CreateGroup(spec) = &plan.steps[0] else { panic!() };
        assert_eq!(spec.capacity, Capacity { min: 5, max: 10, desired: 5 });
        assert_eq!(
            plan.steps[1..],
            [
                Operation::WaitHealthy { group: new.clone(), desired: 5, timeout: Duration::from_secs(600) },
                Operation::AddToService(new.clone()),
                Operation::RemoveFromService("hello-prod-v004".into()),
                Operation::Resize(new.clone(), Capacity { min: 4, max: 10, desired: 5 }),
            ]
        );
        // The gate comes before anything touches the old group.
        assert_eq!(plan.on_gate_failure, [Operation::DestroyGroup(new)]);
    }

    #[test]
    fn capacity_is_at_least_three_and_explicit_values_win() {
        let small = group("hello-prod-v001", "ami-1", 100, true, 1);
        let s = state(vec![small]);
        let create = |req: &DeployRequest| match deploy(&s, req).map(|p| p.steps[0].clone()) {
            Ok(Operation::CreateGroup(spec)) => Ok(spec.capacity),
            other => Err(format!("{other:?}")),
        };
        assert_eq!(create(&request("ami-2")), Ok(Capacity { min: 3, max: 3, desired: 3 }));
        let req = DeployRequest { desired: Some(6), ..request("ami-2") };
        assert_eq!(create(&req), Ok(Capacity { min: 6, max: 6, desired: 6 }));
        let req = DeployRequest { min: Some(3), max: Some(9), desired: Some(4), ..request("ami-2") };
        assert_eq!(create(&req), Ok(Capacity { min: 4, max: 9, desired: 4 }));
        for req in [
            DeployRequest { min: Some(2), ..request("ami-2") },
            DeployRequest { desired: Some(1), ..request("ami-2") },
            DeployRequest { min: Some(5), desired: Some(4), ..request("ami-2") },
        ] {
            let err = deploy(&s, &req).unwrap_err();
            assert!(matches!(err, Error::BelowMinimum { .. } | Error::BadCapacity { .. }), "{err}");
        }
        let err = deploy(&s, &DeployRequest { min: Some(2), ..request("ami-2") }).unwrap_err().to_string();
        assert!(err.contains("--min 2 is below 3"), "{err}");
    }

    #[test]
    fn bad_requests_are_refused() {
        let s = state(vec![]);
        let bad_name = DeployRequest { cluster: "hello-v001".into(), ..request("ami-1") };
        assert!(deploy(&s, &bad_name).unwrap_err().to_string().contains("version token"));
        assert!(matches!(deploy(&s, &request("")), Err(Error::NoImage)));
        assert!("blue-green".parse::<StrategyKind>().is_err());
        assert_eq!("highlander".parse::<StrategyKind>().unwrap(), StrategyKind::Highlander);
    }

    #[test]
    fn keep_counts_disabled_groups_after_the_flip() {
        let groups = vec![
            group("hello-prod-v001", "ami-1", 100, false, 3),
            group("hello-prod-v002", "ami-2", 200, false, 3),
            group("hello-prod-v003", "ami-3", 300, false, 3),
            group("hello-prod-v004", "ami-4", 400, true, 3),
        ];
        let destroyed = |keep| {
            let plan = deploy(&state(groups.clone()), &DeployRequest { keep, ..request("ami-5") }).unwrap();
            plan.steps
                .iter()
                .filter(|op| matches!(op, Operation::DestroyGroup(_)))
                .map(|op| op.group().to_string())
                .collect::<Vec<_>>()
        };
        // After the flip v004 is disabled too: four disabled groups, the newest `keep` stay.
        assert_eq!(destroyed(2), ["hello-prod-v002", "hello-prod-v001"]);
        assert_eq!(destroyed(4), Vec::<String>::new());
        assert_eq!(destroyed(0).len(), 4);
    }

    #[test]
    fn highlander_disables_then_destroys_every_other_group() {
        let groups =
            vec![group("hello-prod-v001", "ami-1", 100, false, 3), group("hello-prod-v002", "ami-2", 200, true, 3)];
        let req = DeployRequest { strategy: StrategyKind::Highlander, keep: 5, ..request("ami-3") };
        let plan = deploy(&state(groups), &req).unwrap();
        let tail: Vec<Operation> = plan.steps[2..].to_vec();
        assert_eq!(
            tail,
            [
                Operation::AddToService("hello-prod-v003".into()),
                Operation::RemoveFromService("hello-prod-v002".into()),
                Operation::DestroyGroup("hello-prod-v002".into()),
                Operation::DestroyGroup("hello-prod-v001".into()),
            ]
        );
    }

    #[test]
    fn the_same_image_already_serving_alone_is_nothing_to_do() {
        let plan = deploy(&state(vec![group("hello-prod-v002", "ami-2", 200, true, 3)]), &request("ami-2")).unwrap();
        assert!(plan.steps.is_empty());
        assert_eq!(plan.new_group.as_deref(), Some("hello-prod-v002"));
        assert!(plan.message.unwrap().contains("already serves"));
    }

    #[test]
    fn an_unfinished_deploy_of_the_same_image_reuses_its_group() {
        let old = group("hello-prod-v001", "ami-1", 100, false, 4);
        let mut new = group("hello-prod-v002", "ami-2", 200, true, 4);
        new.capacity = Capacity { min: 4, max: 8, desired: 4 };
        let record = DeployRecord {
            deploy_id: "d0".into(),
            action: Action::Deploy,
            cluster: "hello-prod".into(),
            image_id: Some("ami-2".into()),
            strategy: Some("red-black".into()),
            new_group: Some("hello-prod-v002".into()),
            previous_group: Some("hello-prod-v001".into()),
            phase: Phase::Running,
            message: None,
            steps: vec![],
            started: 1,
            updated: 2,
            started_by: None,
            soak: None,
        };
        // Crashed after the old group was disabled: the new one serves alone, but the rest of the
        // deploy (restoring min, pruning) has not run.
        let s = ClusterState { record: Some(record.clone()), ..state(vec![old.clone(), new.clone()]) };
        let plan = deploy(&s, &request("ami-2")).unwrap();
        assert_eq!(plan.new_group.as_deref(), Some("hello-prod-v002"));
        assert_eq!(plan.previous_group.as_deref(), Some("hello-prod-v001"));
        assert_eq!(plan.steps[0].group(), "hello-prod-v002");
        // Should the gate fail now, the old group goes back in service before the new one goes.
        assert_eq!(
            plan.on_gate_failure,
            [Operation::AddToService("hello-prod-v001".into()), Operation::DestroyGroup("hello-prod-v002".into())]
        );
        // A finished record, or one for another image, starts afresh.
        let done = DeployRecord { phase: Phase::Succeeded, ..record };
        let s = ClusterState { record: Some(done), ..state(vec![old, new]) };
        assert!(deploy(&s, &request("ami-2")).unwrap().steps.is_empty());
    }

    #[test]
    fn rollback_resumes_and_grows_the_previous_group_before_disabling_the_newest() {
        let mut old = group("hello-prod-v001", "ami-1", 100, false, 3);
        old.capacity = Capacity { min: 3, max: 12, desired: 3 };
        let newest = group("hello-prod-v002", "ami-2", 200, true, 5);
        let orphan = group("hello-prod-v003", "ami-3", 300, false, 3);
        let plan = plan_rollback(&state(vec![old, newest, orphan]), Duration::from_secs(60), None).unwrap();
        assert_eq!(
            (plan.new_group.as_deref(), plan.previous_group.as_deref()),
            (Some("hello-prod-v001"), Some("hello-prod-v002"))
        );
        let v1 = "hello-prod-v001".to_string();
        assert_eq!(
            plan.steps,
            [
                Operation::Resume(v1.clone()),
                Operation::Resize(v1.clone(), Capacity { min: 5, max: 12, desired: 5 }),
                Operation::WaitHealthy { group: v1.clone(), desired: 5, timeout: Duration::from_secs(60) },
                Operation::AddToService(v1.clone()),
                Operation::RemoveFromService("hello-prod-v002".into()),
            ]
        );
        assert_eq!(
            plan.on_gate_failure,
            [Operation::Resize(v1.clone(), Capacity { min: 3, max: 12, desired: 3 }), Operation::RemoveFromService(v1)]
        );
    }

    #[test]
    fn a_rollback_to_a_named_group_skips_newer_disabled_ones() {
        let good = group("hello-prod-v001", "ami-1", 100, false, 3);
        let failed = group("hello-prod-v002", "ami-2", 200, false, 3);
        let serving = group("hello-prod-v003", "ami-3", 300, true, 3);
        let groups = state(vec![good, failed, serving]);
        let plan = plan_rollback(&groups, Duration::ZERO, Some("hello-prod-v001")).unwrap();
        assert_eq!(plan.new_group.as_deref(), Some("hello-prod-v001"));
        assert_eq!(plan_rollback(&groups, Duration::ZERO, None).unwrap().new_group.as_deref(), Some("hello-prod-v002"));
    }

    #[test]
    fn rollback_needs_a_serving_group_and_an_older_one() {
        let err = plan_rollback(&state(vec![]), Duration::ZERO, None).unwrap_err();
        assert!(matches!(err, Error::NothingServing { .. }));
        let only = state(vec![group("hello-prod-v001", "ami-1", 100, true, 3)]);
        assert!(plan_rollback(&only, Duration::ZERO, None).unwrap_err().to_string().contains("no group older than"));
    }

    #[test]
    fn finish_destroys_only_disabled_groups_past_the_soak() {
        let mut groups = vec![
            group("hello-prod-v001", "ami-1", 100, false, 3), // disabled at 110
            group("hello-prod-v002", "ami-2", 200, false, 3), // disabled at 210
            group("hello-prod-v003", "ami-3", 300, true, 3),
            group("hello-prod-v004", "ami-4", 400, false, 3),
        ];
        groups[3].disabled_at = None; // never served: an unfinished deploy, not ours to clean
        let s = state(groups);
        let soak = Duration::from_secs(100);
        assert_eq!(plan_finish(&s, soak, 250).steps, [Operation::DestroyGroup("hello-prod-v001".into())]);
        let both = plan_finish(&s, soak, 1000);
        assert_eq!(both.steps.len(), 2);
        assert_eq!(both.new_group.as_deref(), Some("hello-prod-v003"));
        let none = plan_finish(&s, soak, 200);
        assert!(none.steps.is_empty() && none.message.unwrap().contains("soaked for 1m 40s"));
    }
}

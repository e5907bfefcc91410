//! Executes plans against a [`Cloud`]: under the cluster's lock, saving the deploy record after
//! every step so that `status` can show it and a rerun after a crash converges. The health gate
//! polls with an injected clock, so tests run instantly.

use super::chaos;
use super::cloud::{
    self, Action, Cloud, DeployRecord, Group, GroupSpec, Health, LockHolder, Outcome, Phase, StepRecord,
};
use super::names::{self, Cluster};
use super::plan::{self, ClusterState, DeployRequest, Operation, Plan};
use super::registry;
use super::soak::{self, Judgement, Soak};
use crate::events::{Discard, Event, Sink};
use serde::Serialize;
use snafu::{OptionExt, ResultExt, Snafu};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(Debug, Snafu)]
pub enum Error {
    #[snafu(display("cluster {cluster:?}: {source}"))]
    BadCluster { cluster: String, source: names::Error },

    #[snafu(display(
        "cluster {cluster} is locked by deploy {} of {} on {} (pid {}) until {}",
        holder.deploy_id, holder.owner, holder.host, holder.pid, rfc3339(holder.expires)
    ))]
    Locked { cluster: String, holder: LockHolder },

    #[snafu(display("cluster {cluster} has no {what} to put latency on"))]
    NoTarget { cluster: String, what: String },

    #[snafu(display("cluster {cluster}, instance {instance}: {source}"))]
    Chaos { cluster: String, instance: String, source: cloud::Error },

    #[snafu(display("lost the lock on cluster {cluster} to deploy {} of {}", holder.deploy_id, holder.owner))]
    LockLost { cluster: String, holder: LockHolder },

    #[snafu(display("locking cluster {cluster}: {source}"))]
    Lock { cluster: String, source: cloud::Error },

    #[snafu(display("releasing the lock on cluster {cluster}: {source}"))]
    Release { cluster: String, source: cloud::Error },

    #[snafu(display("reading cluster {cluster}: {source}"))]
    Read { cluster: String, source: cloud::Error },

    #[snafu(display("listing clusters: {source}"))]
    Clusters { source: cloud::Error },

    #[snafu(display("{source}"))]
    Plan { source: plan::Error },

    #[snafu(display("deploy to {cluster} refused:\n  {}", problems.join("\n  ")))]
    Refused { cluster: String, problems: Vec<String> },

    #[snafu(display("checking the deploy to {cluster}: {source}"))]
    Check { cluster: String, source: cloud::Error },

    #[snafu(display("saving the deploy record of {cluster}: {source}"))]
    Save { cluster: String, source: cloud::Error },

    #[snafu(display("{step}: {message}"))]
    Step { step: String, message: String, record: Box<DeployRecord> },

    #[snafu(display("health gate of {group} failed: {reason}; {rescue}"))]
    Gate { group: String, reason: String, rescue: String, record: Box<DeployRecord> },

    #[snafu(display("cancelled; rerun the same command to continue"))]
    Cancelled { record: Box<DeployRecord> },
}

/// The groups a plan creates.
fn new_groups(plan: &Plan) -> impl Iterator<Item = &GroupSpec> {
    plan.steps.iter().filter_map(|step| match step {
        Operation::CreateGroup(spec) => Some(spec.as_ref()),
        _ => None,
    })
}

/// The groups a plan creates, each with the ancestor it copies.
fn created_groups(plan: &Plan) -> Vec<(&str, Option<&str>)> {
    new_groups(plan).map(|spec| (spec.name.as_str(), spec.ancestor.as_deref())).collect()
}

/// A deploy with problems is refused (as bad input) with every one of them.
fn refuse(cluster: &str, problems: Vec<String>) -> Result<()> {
    snafu::ensure!(problems.is_empty(), RefusedSnafu { cluster, problems });
    Ok(())
}

impl Error {
    /// Exit status: 3 bad input, 4 nothing to act on, 5 locked, 6 health gate failed, 130
    /// cancelled, 1 anything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::BadCluster { .. } | Error::Refused { .. } => 3,
            Error::Plan { source } => match source {
                plan::Error::NothingServing { .. } | plan::Error::NothingToRollBackTo { .. } => 4,
                _ => 3,
            },
            Error::NoTarget { .. } => 4,
            Error::Locked { .. } => 5,
            Error::Gate { .. } => 6,
            Error::Cancelled { .. } => 130,
            _ => 1,
        }
    }

    /// The record of a run that got as far as executing its plan (for the JSON result).
    pub fn record(&self) -> Option<&DeployRecord> {
        match self {
            Error::Step { record, .. } | Error::Gate { record, .. } | Error::Cancelled { record } => Some(record),
            _ => None,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// How long the old group may take to be healthy again when a soak switches back by itself.
const AUTOMATIC_ROLLBACK_TIMEOUT: Duration = Duration::from_secs(600);

fn rfc3339(unix: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(unix)).to_string()
}

/// Time as the engine sees it; tests substitute one whose sleep only advances it.
pub trait Clock: Send + Sync {
    /// Since the Unix epoch.
    fn now(&self) -> Duration;
    fn sleep(&self, duration: Duration);
}

pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
    }
    fn sleep(&self, duration: Duration) {
        std::thread::sleep(duration)
    }
}

/// Who holds the lock: enough for a person to find the deploy and for a provider on the same
/// host to tell that its process is gone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Identity {
    pub owner: String,
    pub host: String,
    pub pid: u32,
    pub start_time: u64,
}

impl Identity {
    /// This process, given its start time as the provider's liveness check reads it.
    pub fn current(start_time: u64) -> Identity {
        let user = || nix::unistd::User::from_uid(nix::unistd::getuid()).ok().flatten().map(|user| user.name);
        let owner = std::env::var("USER")
            .or_else(|_| std::env::var("LOGNAME"))
            .ok()
            .or_else(user)
            .unwrap_or_else(|| "unknown".into());
        Identity { owner, host: cloud::this_host(), pid: std::process::id(), start_time }
    }
}

/// What `launcher status` shows.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Status {
    pub cluster: String,
    pub cloud: &'static str,
    pub balancer_url: Option<String>,
    pub groups: Vec<Group>,
    pub deploy: Option<DeployRecord>,
}

pub struct Engine<'a> {
    pub cloud: &'a dyn Cloud,
    pub clock: &'a dyn Clock,
    /// Checked between steps and polls: a cancelled run stops and leaves a record to converge from.
    pub cancel: &'a AtomicBool,
    pub identity: Identity,
    pub poll_interval: Duration,
    /// Renewed while the run lives, so only a dead run's lock expires.
    pub lock_ttl: Duration,
    /// Where each operation, gate poll and phase change is reported.
    pub events: &'a dyn Sink,
}

/// Why a step did not complete.
enum StepError {
    Cloud(cloud::Error),
    Gate(String),
    Cancelled,
    Lock(Box<Error>),
}

impl From<cloud::Error> for StepError {
    fn from(e: cloud::Error) -> Self {
        StepError::Cloud(e)
    }
}

/// One locked run on one cluster.
struct Run<'e, 'a> {
    engine: &'e Engine<'a>,
    cluster: String,
    deploy_id: String,
    expires: u64,
}

impl<'a> Engine<'a> {
    pub fn new(cloud: &'a dyn Cloud, clock: &'a dyn Clock, cancel: &'a AtomicBool, identity: Identity) -> Self {
        Engine {
            cloud,
            clock,
            cancel,
            identity,
            poll_interval: cloud.poll_interval(),
            lock_ttl: Duration::from_secs(15 * 60),
            events: &Discard,
        }
    }

    pub fn clusters(&self) -> Result<Vec<String>> {
        self.cloud.clusters().context(ClustersSnafu)
    }

    pub fn status(&self, cluster: &str) -> Result<Status> {
        let state = self.state(cluster)?;
        Ok(Status {
            cluster: state.cluster,
            cloud: self.cloud.kind(),
            balancer_url: self.cloud.balancer_url(cluster),
            groups: state.groups,
            deploy: state.record,
        })
    }

    pub fn deploy(&self, request: &DeployRequest) -> Result<DeployRecord> {
        let strategy = request.strategy.strategy();
        // Checked on a plan made before locking, so a refused deploy takes no lock (nor makes
        // the cloud's state store), and again under the lock if a run that got in between
        // changed which groups it creates from which ancestors.
        let preview = self.plan_deploy(request)?;
        self.locked(&request.cluster, |run, state| {
            let plan = strategy.plan_deploy(state, request, &run.deploy_id).context(PlanSnafu)?;
            if created_groups(&plan) != created_groups(&preview) {
                self.check_groups(&plan, &request.cluster)?;
            }
            // The same image again while it soaks: nothing to do, and the soak goes on.
            if let Some(soaking) = state.record.as_ref().filter(|r| plan.steps.is_empty() && r.phase == Phase::Soaking)
            {
                return Ok(soaking.clone());
            }
            let mut record = run.record(Action::Deploy, &plan);
            record.image_id = Some(request.image_id.clone());
            record.strategy = Some(strategy.name().to_string());
            // The old group's figures, taken while it still serves: the soak's baseline.
            let soaked = match (&request.soak, &plan.previous_group, plan.steps.is_empty()) {
                (Some((duration, thresholds)), Some(previous), false) => {
                    let window = Duration::from_secs(thresholds.window_secs);
                    let baseline = self
                        .cloud
                        .traffic(&request.cluster, previous, window)
                        .context(ReadSnafu { cluster: &request.cluster })?;
                    Some((*duration, thresholds.clone(), baseline))
                }
                _ => None,
            };
            let mut record = run.execute(&plan, record)?;
            if let Some((duration, thresholds, baseline)) = soaked {
                let until = self.now() + duration.as_secs();
                record.soak = Some(Soak { until, thresholds, baseline, latest: None, verdict: "watching".into() });
                run.save_phase(&mut record, Phase::Soaking)?;
            }
            Ok(record)
        })
    }

    /// One look at a soaking cluster, under its lock (so two watchers never act on one cluster
    /// at once): a breach rolls back, a soak that ran its course destroys the old group,
    /// otherwise the figures are recorded. None when the cluster is not soaking, or when
    /// another run holds it (try again later).
    pub fn watch(&self, cluster: &str) -> Result<Option<DeployRecord>> {
        let soaking = |record: &Option<DeployRecord>| record.as_ref().is_some_and(|r| r.phase == Phase::Soaking);
        if !soaking(&self.cloud.load_deploy(cluster).context(ReadSnafu { cluster })?) {
            return Ok(None);
        }
        let watched = self.locked(cluster, |run, state| {
            // Read again under the lock: another watcher may have ended it meanwhile.
            let Some(mut record) = state.record.clone().filter(|r| r.phase == Phase::Soaking) else { return Ok(None) };
            let mut soak = record.soak.clone().expect("a soaking record has its soak");
            let new_group = record.new_group.clone().unwrap_or_default();
            if self.now() >= soak.until {
                soak.verdict = format!("passed: {new_group} soaked without a breach");
                let plan = plan::plan_finish(state, Duration::ZERO, self.now());
                let mut finish = run.record(Action::Finish, &plan);
                finish.message = Some(soak.verdict.clone());
                finish.soak = Some(soak);
                return run.execute(&plan, finish).map(Some);
            }
            let window = Duration::from_secs(soak.thresholds.window_secs);
            let latest = self.cloud.traffic(cluster, &new_group, window).context(ReadSnafu { cluster })?;
            let judged = latest.as_ref().map(|l| soak::judge(l, soak.baseline.as_ref(), &soak.thresholds));
            soak.latest = latest;
            match judged {
                Some(Judgement::Breach(reason)) => {
                    soak.verdict = format!("breach in {new_group}: {reason}; switched back");
                    // Back to the group this deploy replaced, whatever else is disabled.
                    let previous = record.previous_group.as_deref();
                    let plan = plan::plan_rollback(state, AUTOMATIC_ROLLBACK_TIMEOUT, previous).context(PlanSnafu)?;
                    let mut rollback = run.record(Action::Rollback, &plan);
                    rollback.message = Some(format!("automatic rollback: {}", soak.verdict));
                    rollback.soak = Some(soak);
                    run.execute(&plan, rollback).map(Some)
                }
                judgement => {
                    soak.verdict = match judgement {
                        Some(Judgement::Quiet) => "watching (too few requests to judge)".into(),
                        None => "watching (this cloud reports no traffic figures)".into(),
                        _ => "watching (healthy)".into(),
                    };
                    record.soak = Some(soak);
                    run.save(&mut record)?;
                    Ok(Some(record))
                }
            }
        });
        match watched {
            Err(Error::Locked { .. }) => Ok(None),
            other => other,
        }
    }

    /// Chaos Monkey's kill, under the cluster lock (never in the middle of a deploy): up to
    /// `count` random healthy members of groups in service, never a group's last healthy one.
    /// Each (group, instance) with what came of it; nothing is terminated on a dry run.
    pub fn chaos_kill(
        &self,
        cluster: &str,
        count: usize,
        dry_run: bool,
        rng: &mut impl rand::Rng,
    ) -> Result<Vec<(String, String, String)>> {
        self.locked(cluster, |_, state| {
            let victims = chaos::choose_victims(&state.groups, count, rng);
            Ok(victims
                .into_iter()
                .map(|(group, instance)| {
                    let result = match dry_run {
                        true => "dry run".to_string(),
                        false => match self.cloud.terminate_instance(&group, &instance) {
                            Ok(()) => "done".to_string(),
                            Err(error) => format!("failed: {error}"),
                        },
                    };
                    (group, instance, result)
                })
                .collect())
        })
    }

    /// Latency Monkey, under the cluster lock: delays `instance` (or a random healthy member of
    /// a group in service) until `until`. Returns (group, instance).
    pub fn chaos_latency(
        &self,
        cluster: &str,
        instance: Option<&str>,
        delay: Duration,
        jitter: Duration,
        until: u64,
        rng: &mut impl rand::Rng,
    ) -> Result<(String, String)> {
        self.locked(cluster, |_, state| {
            let chosen = match instance {
                Some(id) => state
                    .groups
                    .iter()
                    .filter(|g| g.in_service)
                    .find(|g| g.members.iter().any(|m| m.id == id))
                    .map(|g| (g.name.clone(), id.to_string())),
                None => chaos::choose_victims(&state.groups, 1, rng).pop(),
            };
            let what = instance.map_or("a healthy instance of a group in service", |id| id);
            let (group, instance) = chosen.context(NoTargetSnafu { cluster, what })?;
            self.cloud
                .inject_latency(&group, &instance, delay, jitter, until)
                .context(ChaosSnafu { cluster, instance: &instance })?;
            Ok((group, instance))
        })
    }

    /// What a deploy would do now, planned on the cluster as it is, without doing it.
    pub fn plan_deploy(&self, request: &DeployRequest) -> Result<Plan> {
        refuse(&request.cluster, self.cloud.check_request(request))?;
        let state = self.state(&request.cluster)?;
        let plan = request.strategy.strategy().plan_deploy(&state, request, "preview").context(PlanSnafu)?;
        self.check_groups(&plan, &request.cluster)?;
        Ok(plan)
    }

    /// The cloud's own check of every group the plan would create, all problems at once.
    fn check_groups(&self, plan: &Plan, cluster: &str) -> Result<()> {
        let mut problems = Vec::new();
        for spec in new_groups(plan) {
            problems.extend(self.cloud.check_group(spec).context(CheckSnafu { cluster })?);
        }
        refuse(cluster, problems)
    }

    /// What a rollback would do now.
    pub fn plan_rollback(&self, cluster: &str, health_timeout: Duration) -> Result<Plan> {
        plan::plan_rollback(&self.state(cluster)?, health_timeout, None).context(PlanSnafu)
    }

    /// What a finish would do now.
    pub fn plan_finish(&self, cluster: &str, soak: Duration) -> Result<Plan> {
        Ok(plan::plan_finish(&self.state(cluster)?, soak, self.now()))
    }

    pub fn rollback(&self, cluster: &str, health_timeout: Duration) -> Result<DeployRecord> {
        self.locked(cluster, |run, state| {
            let plan = plan::plan_rollback(state, health_timeout, None).context(PlanSnafu)?;
            run.execute(&plan, run.record(Action::Rollback, &plan))
        })
    }

    pub fn finish(&self, cluster: &str, soak: Duration) -> Result<DeployRecord> {
        self.locked(cluster, |run, state| {
            let plan = plan::plan_finish(state, soak, self.now());
            run.execute(&plan, run.record(Action::Finish, &plan))
        })
    }

    /// Destroys every group of the cluster, then retires what served it (the local balancer).
    pub fn destroy(&self, cluster: &str) -> Result<DeployRecord> {
        let record = self.locked(cluster, |run, state| {
            let plan = plan::plan_destroy(state);
            run.execute(&plan, run.record(Action::Destroy, &plan))
        })?;
        self.cloud.retire_cluster(cluster).context(ReadSnafu { cluster })?;
        Ok(record)
    }

    fn now(&self) -> u64 {
        self.clock.now().as_secs()
    }

    fn state(&self, cluster: &str) -> Result<ClusterState> {
        Cluster::parse(cluster).context(BadClusterSnafu { cluster })?;
        let groups = self.cloud.groups(cluster).context(ReadSnafu { cluster })?;
        let record = self.cloud.load_deploy(cluster).context(ReadSnafu { cluster })?;
        Ok(ClusterState { cluster: cluster.to_string(), groups, record })
    }

    /// Runs `body` holding the cluster's lock, with the state read under it; releases it after.
    fn locked<T>(&self, cluster: &str, body: impl FnOnce(&mut Run, &ClusterState) -> Result<T>) -> Result<T> {
        Cluster::parse(cluster).context(BadClusterSnafu { cluster })?;
        static RUNS: AtomicU32 = AtomicU32::new(0);
        let n = RUNS.fetch_add(1, Ordering::Relaxed);
        let deploy_id = format!("{}-{}-{n}", self.clock.now().as_millis(), self.identity.pid);
        let mut run = Run { engine: self, cluster: cluster.to_string(), deploy_id, expires: 0 };
        if let Some(holder) = run.lock()? {
            return LockedSnafu { cluster, holder }.fail();
        }
        let result = self.state(cluster).and_then(|state| body(&mut run, &state));
        let released = self.cloud.release_lock(cluster, &run.deploy_id).context(ReleaseSnafu { cluster });
        // The run's own error says more than a failed release; the lock expires anyway.
        let value = result?;
        released?;
        Ok(value)
    }
}

impl Run<'_, '_> {
    /// Takes or renews the lock; Some(holder) when another live run holds it.
    fn lock(&mut self) -> Result<Option<LockHolder>> {
        let engine = self.engine;
        let expires = engine.now() + engine.lock_ttl.as_secs();
        let id = &engine.identity;
        let holder = LockHolder {
            deploy_id: self.deploy_id.clone(),
            owner: id.owner.clone(),
            host: id.host.clone(),
            pid: id.pid,
            start_time: id.start_time,
            expires,
        };
        let cluster = &self.cluster;
        let other = engine.cloud.acquire_lock(cluster, &holder).context(LockSnafu { cluster })?;
        if other.is_none() {
            self.expires = expires;
        }
        Ok(other)
    }

    /// Renews the lock once half its lifetime has passed.
    fn keep_lock(&mut self) -> Result<()> {
        if self.engine.now() + self.engine.lock_ttl.as_secs() / 2 < self.expires {
            return Ok(());
        }
        match self.lock()? {
            None => Ok(()),
            Some(holder) => LockLostSnafu { cluster: &self.cluster, holder }.fail(),
        }
    }

    fn record(&self, action: Action, plan: &Plan) -> DeployRecord {
        let now = self.engine.now();
        DeployRecord {
            deploy_id: self.deploy_id.clone(),
            action,
            cluster: self.cluster.clone(),
            image_id: None,
            strategy: None,
            new_group: plan.new_group.clone(),
            previous_group: plan.previous_group.clone(),
            phase: Phase::Running,
            message: plan.message.clone(),
            steps: plan.steps.iter().map(|op| pending(op.to_string())).collect(),
            started: now,
            updated: now,
            started_by: Some(format!("{} on {}", self.engine.identity.owner, self.engine.identity.host)),
            soak: None,
        }
    }

    fn save(&self, record: &mut DeployRecord) -> Result<()> {
        record.updated = self.engine.now();
        self.engine.cloud.save_deploy(record).context(SaveSnafu { cluster: &self.cluster })
    }

    /// Saves the record and reports its phase when it changed.
    fn save_phase(&self, record: &mut DeployRecord, phase: Phase) -> Result<()> {
        record.phase = phase;
        self.save(record)?;
        self.engine.events.emit(&Event::Phase {
            cluster: self.cluster.clone(),
            action: snake(&record.action),
            phase: snake(&phase),
            message: record.message.clone(),
        });
        Ok(())
    }

    fn report_step(&self, step: &StepRecord, number: usize, total: usize) {
        self.engine.events.emit(&Event::OperationFinished {
            cluster: self.cluster.clone(),
            operation: step.step.clone(),
            number,
            total,
            outcome: snake(&step.outcome),
            message: step.message.clone(),
            duration_ms: step.duration_ms,
        });
    }

    fn execute(&mut self, plan: &Plan, mut record: DeployRecord) -> Result<DeployRecord> {
        self.save_phase(&mut record, Phase::Running)?;
        let total = plan.steps.len();
        for (i, op) in plan.steps.iter().enumerate() {
            let result = if self.engine.cancel.load(Ordering::SeqCst) {
                Err(StepError::Cancelled)
            } else {
                self.keep_lock()?;
                let operation = op.to_string();
                let (cluster, number) = (self.cluster.clone(), i + 1);
                self.engine.events.emit(&Event::OperationStarted { cluster, operation, number, total });
                let started = self.engine.clock.now();
                let result = self.run(op);
                let step = &mut record.steps[i];
                step.duration_ms = (self.engine.clock.now().saturating_sub(started)).as_millis() as u64;
                result
            };
            match result {
                Ok(skipped) => {
                    let step = &mut record.steps[i];
                    step.outcome = if skipped.is_some() { Outcome::Skipped } else { Outcome::Ok };
                    step.message = skipped;
                    self.report_step(&record.steps[i], i + 1, total);
                }
                // Another run owns the cluster now: its record is not ours to overwrite.
                Err(StepError::Lock(e)) => return Err(*e),
                Err(StepError::Cancelled) => {
                    not_reached(&mut record.steps[i..], "cancelled");
                    self.save_phase(&mut record, Phase::Cancelled)?;
                    return CancelledSnafu { record }.fail();
                }
                Err(StepError::Gate(reason)) => {
                    fail(&mut record.steps[i], &reason);
                    self.report_step(&record.steps[i], i + 1, total);
                    not_reached(&mut record.steps[i + 1..], "the health gate failed");
                    let rescue = self.rescue(&plan.on_gate_failure, &mut record)?;
                    record.message = Some(format!("health gate of {} failed: {reason}; {rescue}", op.group()));
                    self.save_phase(&mut record, Phase::Failed)?;
                    return GateSnafu { group: op.group(), reason, rescue, record }.fail();
                }
                Err(StepError::Cloud(e)) => {
                    let message = e.to_string();
                    fail(&mut record.steps[i], &message);
                    self.report_step(&record.steps[i], i + 1, total);
                    not_reached(&mut record.steps[i + 1..], "an earlier step failed");
                    record.message = Some(format!("{op}: {message}"));
                    self.save_phase(&mut record, Phase::Failed)?;
                    return StepSnafu { step: op.to_string(), message, record }.fail();
                }
            }
            self.save(&mut record)?;
        }
        self.save_phase(&mut record, Phase::Succeeded)?;
        Ok(record)
    }

    /// Runs the gate-failure plan, every step even if one fails, and says how it went.
    fn rescue(&mut self, steps: &[Operation], record: &mut DeployRecord) -> Result<String> {
        let mut failed = vec![];
        for op in steps {
            let started = self.engine.clock.now();
            let mut step = pending(format!("after the failed gate: {op}"));
            match self.run(op) {
                Ok(_) => step.outcome = Outcome::Ok,
                Err(StepError::Lock(e)) => return Err(*e),
                Err(StepError::Cloud(e)) => fail(&mut step, &e.to_string()),
                Err(StepError::Gate(m)) => fail(&mut step, &m),
                Err(StepError::Cancelled) => fail(&mut step, "cancelled"),
            }
            step.duration_ms = (self.engine.clock.now().saturating_sub(started)).as_millis() as u64;
            if step.outcome == Outcome::Failed {
                failed.push(op.to_string());
            }
            record.steps.push(step);
            self.save(record)?;
        }
        if !failed.is_empty() {
            return Ok(format!("cleanup failed, rerun the deploy or clean up by hand: {}", failed.join(", ")));
        }
        Ok(steps.iter().map(|op| op.to_string()).collect::<Vec<_>>().join(", ") + ": done")
    }

    /// One operation; Ok(Some(why)) when it was already done.
    fn run(&mut self, op: &Operation) -> std::result::Result<Option<String>, StepError> {
        let cloud = self.engine.cloud;
        match op {
            Operation::CreateGroup(spec) => {
                // A rerun finds the group of the interrupted deploy; a different image under the
                // same name is someone else's group and must not be adopted.
                let groups = cloud.groups(&self.cluster)?;
                if let Some(existing) = groups.iter().find(|g| g.name == spec.name) {
                    if existing.image_id != spec.image_id {
                        let message = format!("{} already exists with image {}", spec.name, existing.image_id);
                        return Err(StepError::Cloud(message.into()));
                    }
                    // Creating again finishes what an interrupted create left undone (aws: the
                    // scaling policies copied after the group).
                    cloud.create_group(spec)?;
                    return Ok(Some("already exists".into()));
                }
                cloud.create_group(spec)?
            }
            Operation::Resume(group) => cloud.resume_group(group)?,
            Operation::Resize(group, capacity) => cloud.resize_group(group, *capacity)?,
            Operation::WaitHealthy { group, desired, timeout } => self.wait_healthy(group, *desired, *timeout)?,
            Operation::AddToService(group) => cloud.add_to_service(group)?,
            Operation::RemoveFromService(group) => cloud.remove_from_service(group, self.engine.now())?,
            Operation::DestroyGroup(group) => cloud.destroy_group(group)?,
        }
        Ok(None)
    }

    /// Polls until `desired` members are there and all healthy, or `timeout` passes.
    fn wait_healthy(&mut self, group: &str, desired: u32, timeout: Duration) -> std::result::Result<(), StepError> {
        let clock = self.engine.clock;
        let deadline = clock.now() + timeout;
        loop {
            let last = match self.engine.cloud.groups(&self.cluster) {
                Ok(groups) => {
                    let found = groups.into_iter().find(|g| g.name == group);
                    let g = found.ok_or_else(|| StepError::Gate(format!("{group} no longer exists")))?;
                    let healthy = g.members.iter().filter(|m| m.health == Health::Healthy).count();
                    let unhealthy = g.members.iter().filter(|m| m.health == Health::Unhealthy).count();
                    let starting = g.members.len() - healthy - unhealthy;
                    let registered_up = g.registers.then(|| {
                        g.members.iter().filter(|m| m.registry_status.as_deref() == Some(registry::UP)).count() as u32
                    });
                    self.engine.events.emit(&Event::Gate {
                        cluster: self.cluster.clone(),
                        group: group.to_string(),
                        desired,
                        healthy: healthy as u32,
                        starting: starting as u32,
                        unhealthy: unhealthy as u32,
                        registered_up,
                        waiting_for: g
                            .members
                            .iter()
                            .filter(|m| m.health != Health::Healthy)
                            .map(|m| m.id.clone())
                            .collect(),
                    });
                    if healthy >= desired as usize && healthy == g.members.len() {
                        return Ok(());
                    }
                    let registry = registered_up.map(|up| format!(", {up} UP in the registry")).unwrap_or_default();
                    format!("{healthy} of {desired} instances healthy, {starting} starting, {unhealthy} unhealthy{registry}")
                }
                // One failed poll is not a failed gate: the next may succeed.
                Err(e) => format!("reading the group failed: {e}"),
            };
            let now = clock.now();
            if now >= deadline {
                return Err(StepError::Gate(format!("after {}, {last}", humantime::format_duration(timeout))));
            }
            if self.engine.cancel.load(Ordering::SeqCst) {
                return Err(StepError::Cancelled);
            }
            self.keep_lock().map_err(|e| StepError::Lock(Box::new(e)))?;
            clock.sleep(self.engine.poll_interval.min(deadline - now));
        }
    }
}

/// An enum's serde name (`succeeded`, `red_black`…), as the record's JSON spells it.
fn snake(value: &impl Serialize) -> String {
    serde_json::to_value(value).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

fn pending(step: String) -> StepRecord {
    StepRecord { step, outcome: Outcome::Pending, message: None, duration_ms: 0 }
}

fn fail(step: &mut StepRecord, message: &str) {
    step.outcome = Outcome::Failed;
    step.message = Some(message.to_string());
}

fn not_reached(steps: &mut [StepRecord], why: &str) {
    for step in steps {
        step.outcome = Outcome::Skipped;
        step.message = Some(format!("not run: {why}"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launch::plan::tests::request;
    use crate::launch::plan::StrategyKind;
    use crate::launch::sim::{FakeClock, SimCloud, SIM_HOST};
    use std::sync::Arc;

    struct Stand {
        clock: Arc<FakeClock>,
        sim: SimCloud,
        cancel: AtomicBool,
    }

    impl Stand {
        fn new() -> Stand {
            let clock = Arc::new(FakeClock::new(1_700_000_000));
            Stand { sim: SimCloud::new(clock.clone()), clock, cancel: AtomicBool::new(false) }
        }

        fn engine(&self, pid: u32) -> Engine<'_> {
            let identity = Identity { owner: "ann".into(), host: SIM_HOST.into(), pid, start_time: 1 };
            Engine::new(&self.sim, &*self.clock, &self.cancel, identity)
        }

        fn serving(&self) -> Vec<String> {
            self.sim.groups("hello-prod").unwrap().into_iter().filter(|g| g.in_service).map(|g| g.name).collect()
        }

        fn group(&self, name: &str) -> Option<Group> {
            self.sim.groups("hello-prod").unwrap().into_iter().find(|g| g.name == name)
        }

        /// A live run of another process (pid 77) on this host, holding for ten minutes.
        fn rival(&self) -> LockHolder {
            LockHolder {
                deploy_id: "other".into(),
                owner: "bob".into(),
                host: SIM_HOST.into(),
                pid: 77,
                start_time: 1,
                expires: self.clock.now().as_secs() + 600,
            }
        }
    }

    #[test]
    fn chaos_kills_only_spare_healthy_members_and_never_during_a_deploy() {
        let stand = Stand::new();
        let engine = stand.engine(10);
        engine.deploy(&request("ami-1")).unwrap();
        let before: Vec<String> = stand.group("hello-prod-v000").unwrap().members.into_iter().map(|m| m.id).collect();
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(1);
        let dry = engine.chaos_kill("hello-prod", 5, true, &mut rng).unwrap();
        assert_eq!(dry.len(), 2, "one of the three stays: {dry:?}");
        assert!(dry.iter().all(|(group, _, result)| group == "hello-prod-v000" && result == "dry run"));
        assert!(!stand.sim.calls().iter().any(|c| c.starts_with("terminate_instance")));
        let killed = engine.chaos_kill("hello-prod", 1, false, &mut rng).unwrap();
        assert_eq!(killed.len(), 1);
        assert_eq!(killed[0].2, "done");
        let after: Vec<String> = stand.group("hello-prod-v000").unwrap().members.into_iter().map(|m| m.id).collect();
        assert!(before.contains(&killed[0].1) && !after.contains(&killed[0].1) && after.len() == 3);
        // A deploy holding the lock (a live run of another process) keeps the monkey out.
        assert_eq!(stand.sim.acquire_lock("hello-prod", &stand.rival()).unwrap(), None);
        assert!(matches!(engine.chaos_kill("hello-prod", 1, false, &mut rng), Err(Error::Locked { .. })));
    }

    #[test]
    fn destroy_removes_every_group_then_retires_the_cluster() {
        let stand = Stand::new();
        let engine = stand.engine(10);
        engine.deploy(&request("ami-1")).unwrap();
        engine.deploy(&request("ami-2")).unwrap();
        let destroyed = engine.destroy("hello-prod").unwrap();
        assert_eq!(destroyed.action, Action::Destroy);
        let steps: Vec<&str> = destroyed.steps.iter().map(|s| s.step.as_str()).collect();
        assert!(
            steps[0].contains("hello-prod-v000") && steps[1].contains("hello-prod-v001"),
            "serving last: {steps:?}"
        );
        assert_eq!(stand.sim.calls().last().map(String::as_str), Some("retire_cluster hello-prod"));
        assert!(stand.sim.groups("hello-prod").unwrap().is_empty());
        assert!(stand.sim.templates().is_empty(), "templates go with their groups");
        // Nothing left: destroying again succeeds with nothing to do.
        assert!(engine.destroy("hello-prod").unwrap().steps.is_empty());
    }

    #[test]
    fn a_deploy_reports_its_phases_operations_and_what_the_gate_waits_for() {
        let stand = Stand::new();
        let recorder = crate::events::Recorder::default();
        let mut engine = stand.engine(10);
        engine.events = &recorder;
        engine.deploy(&request("ami-1")).unwrap();
        let events = recorder.events();
        let phases: Vec<&str> = events
            .iter()
            .filter_map(|e| match e {
                Event::Phase { phase, .. } => Some(phase.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(phases, ["running", "succeeded"]);
        let gates: Vec<(u32, u32, usize)> = events
            .iter()
            .filter_map(|e| match e {
                Event::Gate { healthy, desired, waiting_for, .. } => Some((*healthy, *desired, waiting_for.len())),
                _ => None,
            })
            .collect();
        assert!(gates.len() >= 2, "the gate polled more than once: {gates:?}");
        assert_eq!(gates.last(), Some(&(3, 3, 0)), "{gates:?}");
        assert!(gates.first().is_some_and(|(healthy, _, waiting)| *healthy < 3 && *waiting > 0), "{gates:?}");
        let started = events.iter().filter(|e| matches!(e, Event::OperationStarted { .. })).count();
        let finished: Vec<&str> = events
            .iter()
            .filter_map(|e| match e {
                Event::OperationFinished { outcome, .. } => Some(outcome.as_str()),
                _ => None,
            })
            .collect();
        assert_eq!(started, finished.len());
        assert!(finished.iter().all(|o| *o == "ok"), "{finished:?}");
    }

    fn soaked(image: &str, minutes: u64) -> DeployRequest {
        let thresholds = soak::Thresholds { max_error_rate: 0.01, max_p99_ms: None, window_secs: 60, min_requests: 20 };
        DeployRequest { soak: Some((Duration::from_secs(minutes * 60), thresholds)), ..request(image) }
    }

    fn traffic(requests: u64, errors: u64) -> soak::Traffic {
        soak::Traffic { requests, errors, p99_ms: 100, window_secs: 60 }
    }

    #[test]
    fn a_soak_that_breaches_switches_back_by_itself_and_says_why() {
        let stand = Stand::new();
        let engine = stand.engine(10);
        engine.deploy(&request("ami-1")).unwrap();
        stand.sim.set_traffic("hello-prod-v000", traffic(1000, 1));
        let deployed = engine.deploy(&soaked("ami-2", 30)).unwrap();
        assert_eq!(deployed.phase, Phase::Soaking);
        assert_eq!(deployed.soak.as_ref().unwrap().baseline, Some(traffic(1000, 1)), "taken before the flip");
        assert_eq!(stand.serving(), ["hello-prod-v001"]);

        stand.sim.set_traffic("hello-prod-v001", traffic(1000, 3));
        let healthy = engine.watch("hello-prod").unwrap().unwrap();
        assert_eq!((healthy.phase, healthy.soak.unwrap().verdict.as_str()), (Phase::Soaking, "watching (healthy)"));
        stand.sim.set_traffic("hello-prod-v001", traffic(1000, 50));
        let back = engine.watch("hello-prod").unwrap().unwrap();
        assert_eq!((back.action, back.phase), (Action::Rollback, Phase::Succeeded));
        assert!(back.message.as_deref().unwrap().contains("5.0% of 1000 requests failed"), "{back:?}");
        assert_eq!(stand.serving(), ["hello-prod-v000"]);
        assert_eq!(
            engine.status("hello-prod").unwrap().deploy.unwrap().soak.unwrap().verdict,
            back.soak.unwrap().verdict
        );
        assert_eq!(engine.watch("hello-prod").unwrap(), None, "nothing soaks any more");
    }

    #[test]
    fn the_same_deploy_again_while_it_soaks_leaves_the_soak_alone() {
        let stand = Stand::new();
        let engine = stand.engine(10);
        engine.deploy(&request("ami-1")).unwrap();
        let soaking = engine.deploy(&soaked("ami-2", 30)).unwrap();
        let again = engine.deploy(&soaked("ami-2", 30)).unwrap();
        assert_eq!(again, soaking, "the soaking record is returned untouched");
        assert_eq!(engine.status("hello-prod").unwrap().deploy.unwrap().phase, Phase::Soaking);
        let highlander = DeployRequest { strategy: StrategyKind::Highlander, ..soaked("ami-3", 30) };
        let refused = engine.deploy(&highlander).unwrap_err().to_string();
        assert!(refused.contains("--soak needs the old group"), "{refused}");
    }

    #[test]
    fn a_clean_soak_destroys_the_old_group_when_it_ends() {
        let stand = Stand::new();
        let engine = stand.engine(10);
        engine.deploy(&request("ami-1")).unwrap();
        engine.deploy(&soaked("ami-2", 30)).unwrap();
        stand.sim.set_traffic("hello-prod-v001", traffic(5, 5));
        let quiet = engine.watch("hello-prod").unwrap().unwrap();
        assert!(quiet.soak.unwrap().verdict.contains("too few requests"), "five failures say nothing yet");
        stand.clock.advance(Duration::from_secs(31 * 60));
        let finished = engine.watch("hello-prod").unwrap().unwrap();
        assert_eq!((finished.action, finished.phase), (Action::Finish, Phase::Succeeded));
        assert!(stand.group("hello-prod-v000").is_none(), "the old group is destroyed");
        assert_eq!(stand.serving(), ["hello-prod-v001"]);
    }

    #[test]
    fn deploy_rollback_and_finish_run_end_to_end() {
        let stand = Stand::new();
        let engine = stand.engine(10);
        let first = engine.deploy(&request("ami-1")).unwrap();
        assert_eq!((first.phase, first.new_group.as_deref()), (Phase::Succeeded, Some("hello-prod-v000")));
        assert!(first.steps.iter().all(|s| s.outcome == Outcome::Ok), "{:?}", first.steps);

        let second = engine.deploy(&request("ami-2")).unwrap();
        assert_eq!(second.new_group.as_deref(), Some("hello-prod-v001"));
        assert_eq!(second.previous_group.as_deref(), Some("hello-prod-v000"));
        assert_eq!(stand.serving(), ["hello-prod-v001"]);
        let old = stand.group("hello-prod-v000").unwrap();
        assert!(old.suspended && old.disabled_at.is_some() && old.members.len() == 3, "{old:?}");
        let json = serde_json::to_value(&second).unwrap();
        assert_eq!(json["new_group"], "hello-prod-v001");
        assert_eq!(json["steps"][1]["outcome"], "ok");
        assert!(json["steps"][1]["duration_ms"].as_u64().unwrap() > 0, "the gate waited: {json}");

        // The same image again: nothing to do.
        let again = engine.deploy(&request("ami-2")).unwrap();
        assert!(again.steps.is_empty() && again.message.is_some());

        let back = engine.rollback("hello-prod", Duration::from_secs(300)).unwrap();
        assert_eq!(back.phase, Phase::Succeeded);
        assert_eq!(stand.serving(), ["hello-prod-v000"]);
        assert!(!stand.group("hello-prod-v000").unwrap().suspended);
        assert!(stand.group("hello-prod-v001").unwrap().disabled_at.is_some());

        let early = engine.finish("hello-prod", Duration::from_secs(3600)).unwrap();
        assert!(early.steps.is_empty(), "{early:?}");
        stand.clock.advance(Duration::from_secs(7200));
        let done = engine.finish("hello-prod", Duration::from_secs(3600)).unwrap();
        assert_eq!(done.steps.len(), 1);
        assert!(stand.group("hello-prod-v001").is_none());
        assert_eq!(stand.sim.templates(), ["hello-prod-v000"]);

        let status = engine.status("hello-prod").unwrap();
        assert_eq!(status.deploy.unwrap().action, Action::Finish);
        assert_eq!(status.groups.len(), 1);
        assert_eq!(engine.clusters().unwrap(), ["hello-prod"]);
    }

    #[test]
    fn a_failed_gate_destroys_the_new_group_and_leaves_the_old_serving() {
        let stand = Stand::new();
        let engine = stand.engine(10);
        engine.deploy(&request("ami-1")).unwrap();
        stand.sim.never_healthy("ami-2");
        let calls_before = stand.sim.calls().len();
        let err = engine.deploy(&request("ami-2")).unwrap_err();
        assert!(matches!(err, Error::Gate { .. }), "{err}");
        assert!(err.to_string().contains("0 of 3 instances healthy, 0 starting, 3 unhealthy"), "{err}");
        assert_eq!(stand.serving(), ["hello-prod-v000"]);
        assert!(stand.group("hello-prod-v001").is_none());
        assert_eq!(stand.sim.templates(), ["hello-prod-v000"]);
        // Nothing but reads touched the old group.
        let touched: Vec<String> =
            stand.sim.calls()[calls_before..].iter().filter(|c| c.ends_with("hello-prod-v000")).cloned().collect();
        assert!(touched.is_empty(), "{touched:?}");
        let record = err.record().unwrap();
        assert_eq!(record.phase, Phase::Failed);
        let outcomes: Vec<Outcome> = record.steps.iter().map(|s| s.outcome).collect();
        assert_eq!(outcomes, [Outcome::Ok, Outcome::Failed, Outcome::Skipped, Outcome::Skipped, Outcome::Ok]);
        assert_eq!(stand.sim.load_deploy("hello-prod").unwrap().as_ref(), Some(record));
        // The lock was released: the next deploy runs.
        stand.sim.never_healthy("none");
        engine.deploy(&request("ami-3")).unwrap();
    }

    #[test]
    fn a_second_deploy_is_refused_while_the_lock_is_held_by_a_live_run() {
        let stand = Stand::new();
        assert_eq!(stand.sim.acquire_lock("hello-prod", &stand.rival()).unwrap(), None);
        let err = stand.engine(10).deploy(&request("ami-1")).unwrap_err();
        let message = err.to_string();
        assert!(
            matches!(err, Error::Locked { .. }) && message.contains("bob") && message.contains("pid 77"),
            "{message}"
        );
        assert!(stand.sim.groups("hello-prod").unwrap().is_empty());
        // Once the holder's process is gone the lock is stale and taken over.
        stand.sim.kill(77);
        stand.engine(10).deploy(&request("ami-1")).unwrap();
    }

    #[test]
    fn a_rerun_after_a_crash_converges_to_one_new_group_in_service() {
        let stand = Stand::new();
        stand.engine(10).deploy(&request("ami-1")).unwrap();
        stand.sim.crash_after("create_group");
        let crashed =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| stand.engine(11).deploy(&request("ami-2"))));
        assert!(crashed.is_err());
        let record = stand.sim.load_deploy("hello-prod").unwrap().unwrap();
        assert_eq!((record.phase, record.steps[0].outcome), (Phase::Running, Outcome::Pending));
        assert!(stand.group("hello-prod-v001").is_some_and(|g| !g.in_service));
        // The dead run's lock holds while its process might live, then goes stale.
        assert!(matches!(stand.engine(12).deploy(&request("ami-2")), Err(Error::Locked { .. })));
        stand.sim.kill(11);
        let rerun = stand.engine(12).deploy(&request("ami-2")).unwrap();
        assert_eq!(rerun.new_group.as_deref(), Some("hello-prod-v001"));
        assert_eq!(rerun.steps[0].outcome, Outcome::Skipped);
        assert_eq!(stand.serving(), ["hello-prod-v001"]);
        let groups = stand.sim.groups("hello-prod").unwrap();
        assert_eq!(groups.iter().filter(|g| g.image_id == "ami-2").count(), 1);
        assert_eq!(groups.len(), 2);
    }

    #[test]
    fn a_cancelled_deploy_stops_and_a_rerun_finishes_it() {
        let stand = Stand::new();
        stand.cancel.store(true, Ordering::SeqCst);
        let err = stand.engine(10).deploy(&request("ami-1")).unwrap_err();
        let record = err.record().unwrap();
        assert_eq!(record.phase, Phase::Cancelled);
        assert!(record.steps.iter().all(|s| s.outcome == Outcome::Skipped));
        stand.cancel.store(false, Ordering::SeqCst);
        stand.engine(10).deploy(&request("ami-1")).unwrap();
        assert_eq!(stand.serving(), ["hello-prod-v000"]);
    }

    #[test]
    fn highlander_leaves_only_the_new_group() {
        let stand = Stand::new();
        let engine = stand.engine(10);
        let highlander = |image| DeployRequest { strategy: StrategyKind::Highlander, ..request(image) };
        engine.deploy(&highlander("ami-1")).unwrap();
        engine.deploy(&highlander("ami-2")).unwrap();
        assert_eq!(stand.sim.templates(), ["hello-prod-v001"]);
        assert_eq!(stand.serving(), ["hello-prod-v001"]);
    }

    #[test]
    fn removing_or_destroying_a_missing_group_succeeds() {
        let stand = Stand::new();
        let engine = stand.engine(10);
        let plan = Plan {
            steps: vec![
                Operation::RemoveFromService("hello-prod-v404".into()),
                Operation::DestroyGroup("hello-prod-v404".into()),
            ],
            ..Plan::default()
        };
        let record = engine
            .locked("hello-prod", |run, _| {
                let record = run.record(Action::Finish, &plan);
                run.execute(&plan, record)
            })
            .unwrap();
        assert!(record.steps.iter().all(|s| s.outcome == Outcome::Ok), "{:?}", record.steps);
    }

    #[test]
    fn a_long_gate_keeps_renewing_the_lock() {
        let stand = Stand::new();
        stand.sim.healthy_after(40);
        let mut engine = stand.engine(10);
        engine.poll_interval = Duration::from_secs(60);
        engine.lock_ttl = Duration::from_secs(600);
        let record =
            engine.deploy(&DeployRequest { health_timeout: Duration::from_secs(3600), ..request("ami-1") }).unwrap();
        // 40 polls a minute apart outlast the lock's ten minutes several times over.
        assert!(record.steps[1].duration_ms >= 39 * 60_000, "{:?}", record.steps[1]);
        let renewals = stand.sim.calls().iter().filter(|c| c.starts_with("acquire_lock")).count();
        assert!(renewals >= 6, "{renewals}");
    }
}

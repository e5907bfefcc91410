//! An in-memory [`Cloud`] for tests: groups whose instances turn healthy after a few polls,
//! images that never do, locks with dead processes, a crash after any call, and a log of calls.
//! It enforces what a real group does so that plans in the wrong order fail here: a suspended
//! group neither launches nor terminates instances.

use super::cloud::{Capacity, Cloud, DeployRecord, Group, GroupSpec, Health, LockHolder, Member, Result};
use super::engine::Clock;
use super::soak::Traffic;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// The host name the simulated cloud runs on: locks held from it are checked for liveness.
pub const SIM_HOST: &str = "sim";

/// A clock whose sleep advances it instantly.
pub struct FakeClock {
    millis: AtomicU64,
}

impl FakeClock {
    pub fn new(unix_secs: u64) -> FakeClock {
        FakeClock { millis: AtomicU64::new(unix_secs * 1000) }
    }

    pub fn advance(&self, by: Duration) {
        self.millis.fetch_add(by.as_millis() as u64, Ordering::SeqCst);
    }
}

impl Clock for FakeClock {
    fn now(&self) -> Duration {
        Duration::from_millis(self.millis.load(Ordering::SeqCst))
    }
    fn sleep(&self, duration: Duration) {
        self.advance(duration)
    }
}

struct SimGroup {
    cluster: String,
    group: Group,
    /// Poll count at each member's launch.
    born: BTreeMap<String, u64>,
}

#[derive(Default)]
struct State {
    groups: BTreeMap<String, SimGroup>,
    /// Launch templates by group name: they must go with their group.
    templates: BTreeSet<String>,
    locks: BTreeMap<String, LockHolder>,
    /// Records kept as JSON, as a provider would.
    records: BTreeMap<String, String>,
    dead_pids: BTreeSet<u32>,
    sick_images: BTreeSet<String>,
    healthy_after: u64,
    polls: u64,
    launched: u64,
    crash_after: Option<String>,
    calls: Vec<String>,
    /// What `traffic` reports, by group.
    traffic: BTreeMap<String, Traffic>,
}

pub struct SimCloud {
    clock: Arc<FakeClock>,
    state: Mutex<State>,
}

impl SimCloud {
    pub fn new(clock: Arc<FakeClock>) -> SimCloud {
        SimCloud { clock, state: Mutex::new(State { healthy_after: 2, ..State::default() }) }
    }

    /// Polls of `groups` before a new instance reports healthy.
    pub fn healthy_after(&self, polls: u64) {
        self.state().healthy_after = polls;
    }

    /// Instances of this image report unhealthy instead (replaces any earlier choice).
    pub fn never_healthy(&self, image_id: &str) {
        self.state().sick_images = BTreeSet::from([image_id.to_string()]);
    }

    /// Panics right after the named call has taken effect, as a process killed there would.
    pub fn crash_after(&self, call: &str) {
        self.state().crash_after = Some(call.to_string());
    }

    /// The process no longer exists: its locks on this host are stale.
    pub fn kill(&self, pid: u32) {
        self.state().dead_pids.insert(pid);
    }

    /// What the group's traffic looks like from now on.
    pub fn set_traffic(&self, group: &str, traffic: Traffic) {
        self.state().traffic.insert(group.to_string(), traffic);
    }

    /// Every call so far as `name argument`.
    pub fn calls(&self) -> Vec<String> {
        self.state().calls.clone()
    }

    /// Launch templates that exist.
    pub fn templates(&self) -> Vec<String> {
        self.state().templates.iter().cloned().collect()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // A test that panicked mid-call poisons nothing this simulation relies on.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Logs the call, runs it, then crashes if asked to (after the guard is gone, so the state
    /// stays usable for the rerun).
    fn call<T>(&self, name: &str, arg: &str, body: impl FnOnce(&mut State) -> Result<T>) -> Result<T> {
        let result = {
            let mut state = self.state();
            state.calls.push(format!("{name} {arg}"));
            body(&mut state)
        };
        let crash = self.state().crash_after.as_deref() == Some(name);
        if crash {
            self.state().crash_after = None;
            panic!("simulated crash after {name} {arg}");
        }
        result
    }
}

impl State {
    fn group(&mut self, name: &str) -> Result<&mut SimGroup> {
        self.groups.get_mut(name).ok_or_else(|| format!("group {name} does not exist").into())
    }

    /// What the group's scaling does: launch or terminate toward desired, unless suspended.
    fn reconcile(&mut self, name: &str) {
        let (polls, launched) = (self.polls, &mut self.launched);
        let Some(sim) = self.groups.get_mut(name) else { return };
        let g = &mut sim.group;
        if g.suspended {
            return;
        }
        let desired = g.capacity.desired as usize;
        while g.members.len() < desired {
            *launched += 1;
            let id = format!("i-{launched:017x}");
            let zone = ["zone-a", "zone-b", "zone-c"][g.members.len() % 3].to_string();
            sim.born.insert(id.clone(), polls);
            g.members.push(Member {
                id,
                zone,
                health: Health::Starting,
                address: None,
                registry_status: None,
                launched: None,
            });
        }
        g.members.truncate(desired);
    }
}

impl Cloud for SimCloud {
    fn kind(&self) -> &'static str {
        "sim"
    }

    fn clusters(&self) -> Result<Vec<String>> {
        self.call("clusters", "", |s| {
            let clusters: BTreeSet<String> = s.groups.values().map(|g| g.cluster.clone()).collect();
            Ok(clusters.into_iter().collect())
        })
    }

    fn groups(&self, cluster: &str) -> Result<Vec<Group>> {
        self.call("groups", cluster, |s| {
            s.polls += 1;
            let (polls, after) = (s.polls, s.healthy_after);
            let mut found = vec![];
            for sim in s.groups.values_mut().filter(|g| g.cluster == cluster) {
                let sick = s.sick_images.contains(&sim.group.image_id);
                for member in &mut sim.group.members {
                    if member.health == Health::Starting && polls - sim.born[&member.id] >= after {
                        member.health = if sick { Health::Unhealthy } else { Health::Healthy };
                    }
                }
                found.push(sim.group.clone());
            }
            Ok(found)
        })
    }

    fn create_group(&self, spec: &GroupSpec) -> Result<()> {
        let created = self.clock.now().as_secs();
        self.call("create_group", &spec.name, |s| {
            if let Some(existing) = s.groups.get(&spec.name) {
                let image = &existing.group.image_id;
                if *image != spec.image_id {
                    return Err(format!("group {} exists with image {image}", spec.name).into());
                }
                return Ok(());
            }
            let group = Group {
                name: spec.name.clone(),
                image_id: spec.image_id.clone(),
                created,
                capacity: spec.capacity,
                in_service: false,
                suspended: false,
                disabled_at: None,
                deploy_id: Some(spec.deploy_id.clone()),
                registers: false,
                replacements: vec![],
                members: vec![],
            };
            s.templates.insert(spec.name.clone());
            s.groups
                .insert(spec.name.clone(), SimGroup { cluster: spec.cluster.clone(), group, born: BTreeMap::new() });
            s.reconcile(&spec.name);
            Ok(())
        })
    }

    fn resize_group(&self, group: &str, capacity: Capacity) -> Result<()> {
        self.call("resize_group", group, |s| {
            s.group(group)?.group.capacity = capacity;
            s.reconcile(group);
            Ok(())
        })
    }

    fn resume_group(&self, group: &str) -> Result<()> {
        self.call("resume_group", group, |s| {
            s.group(group)?.group.suspended = false;
            s.reconcile(group);
            Ok(())
        })
    }

    fn add_to_service(&self, group: &str) -> Result<()> {
        self.call("add_to_service", group, |s| {
            let g = &mut s.group(group)?.group;
            (g.suspended, g.in_service, g.disabled_at) = (false, true, None);
            s.reconcile(group);
            Ok(())
        })
    }

    fn remove_from_service(&self, group: &str, at: u64) -> Result<()> {
        self.call("remove_from_service", group, |s| {
            if let Some(sim) = s.groups.get_mut(group) {
                let g = &mut sim.group;
                (g.suspended, g.in_service) = (true, false);
                g.disabled_at.get_or_insert(at);
            }
            Ok(())
        })
    }

    fn destroy_group(&self, group: &str) -> Result<()> {
        self.call("destroy_group", group, |s| {
            s.groups.remove(group);
            s.templates.remove(group);
            Ok(())
        })
    }

    /// As an Auto Scaling group: the member goes, and a new one is launched in its place.
    fn terminate_instance(&self, group: &str, instance: &str) -> Result<()> {
        self.call("terminate_instance", group, |s| {
            if let Some(sim) = s.groups.get_mut(group) {
                sim.group.members.retain(|m| m.id != instance);
            }
            s.reconcile(group);
            Ok(())
        })
    }

    fn acquire_lock(&self, cluster: &str, holder: &LockHolder) -> Result<Option<LockHolder>> {
        let now = self.clock.now().as_secs();
        self.call("acquire_lock", cluster, |s| {
            if let Some(current) = s.locks.get(cluster) {
                let alive = |pid, _| !s.dead_pids.contains(&pid);
                if current.deploy_id != holder.deploy_id && !current.is_stale(now, SIM_HOST, alive) {
                    return Ok(Some(current.clone()));
                }
            }
            s.locks.insert(cluster.to_string(), holder.clone());
            Ok(None)
        })
    }

    fn lock_holder(&self, cluster: &str) -> Result<Option<LockHolder>> {
        self.call("lock_holder", cluster, |s| Ok(s.locks.get(cluster).cloned()))
    }

    fn release_lock(&self, cluster: &str, deploy_id: &str) -> Result<()> {
        self.call("release_lock", cluster, |s| {
            if s.locks.get(cluster).is_some_and(|h| h.deploy_id == deploy_id) {
                s.locks.remove(cluster);
            }
            Ok(())
        })
    }

    fn save_deploy(&self, record: &DeployRecord) -> Result<()> {
        let json = serde_json::to_string(record)?;
        self.call("save_deploy", &record.cluster, |s| {
            s.records.insert(record.cluster.clone(), json);
            Ok(())
        })
    }

    fn load_deploy(&self, cluster: &str) -> Result<Option<DeployRecord>> {
        self.call("load_deploy", cluster, |s| match s.records.get(cluster) {
            Some(json) => Ok(Some(serde_json::from_str(json)?)),
            None => Ok(None),
        })
    }

    fn traffic(&self, _cluster: &str, group: &str, _window: std::time::Duration) -> Result<Option<Traffic>> {
        Ok(self.state().traffic.get(group).cloned())
    }

    fn retire_cluster(&self, cluster: &str) -> Result<()> {
        self.call("retire_cluster", cluster, |state| {
            let prefix = format!("{cluster}-v");
            let left: Vec<&String> = state.groups.keys().filter(|name| name.starts_with(&prefix)).collect();
            match left.is_empty() {
                true => Ok(()),
                false => Err(format!("cluster {cluster} still has groups {left:?}").into()),
            }
        })
    }

    fn balancer_url(&self, _cluster: &str) -> Option<String> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, desired: u32) -> GroupSpec {
        GroupSpec {
            name: name.into(),
            cluster: "hello".into(),
            image_id: "ami-1".into(),
            launch: Default::default(),
            ancestor: None,
            capacity: Capacity { min: desired, max: desired, desired },
            subnets: vec![],
            target_groups: vec![],
            health_url: "/health".into(),
            registry_namespace: None,
            deploy_id: "d1".into(),
        }
    }

    #[test]
    fn missing_groups_are_removed_and_destroyed_without_error() {
        let sim = SimCloud::new(Arc::new(FakeClock::new(0)));
        sim.remove_from_service("hello-v404", 1).unwrap();
        sim.destroy_group("hello-v404").unwrap();
        sim.destroy_group("hello-v404").unwrap();
        assert!(sim.resume_group("hello-v404").is_err(), "resuming needs the group");
    }

    #[test]
    fn creating_twice_is_one_group_and_a_different_image_is_refused() {
        let sim = SimCloud::new(Arc::new(FakeClock::new(0)));
        sim.create_group(&spec("hello-v000", 3)).unwrap();
        sim.create_group(&spec("hello-v000", 3)).unwrap();
        assert_eq!(sim.groups("hello").unwrap().len(), 1);
        let other = GroupSpec { image_id: "ami-2".into(), ..spec("hello-v000", 3) };
        assert!(sim.create_group(&other).is_err());
    }

    #[test]
    fn a_suspended_group_neither_grows_nor_shrinks_until_resumed() {
        let sim = SimCloud::new(Arc::new(FakeClock::new(0)));
        sim.create_group(&spec("hello-v000", 3)).unwrap();
        sim.remove_from_service("hello-v000", 5).unwrap();
        sim.resize_group("hello-v000", Capacity { min: 5, max: 5, desired: 5 }).unwrap();
        assert_eq!(sim.groups("hello").unwrap()[0].members.len(), 3);
        sim.remove_from_service("hello-v000", 9).unwrap();
        assert_eq!(sim.groups("hello").unwrap()[0].disabled_at, Some(5), "the first disable time is kept");
        sim.resume_group("hello-v000").unwrap();
        let g = &sim.groups("hello").unwrap()[0];
        assert_eq!((g.members.len(), g.in_service), (5, false));
    }
}

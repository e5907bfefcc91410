//! The launcher's `local` provider: a group's instances are images booted on this host
//! (`instance::start`, container method), each on its own loopback address and port, a
//! cluster's balancer is a HAProxy (haproxy.rs), and instances register themselves in the
//! state directory's service registry (registry.rs).
//!
//! A member is healthy when its health URL answers 200 *and* its agent reports it `UP` in the
//! registry: a group whose instances never register never passes its gate. Taking a group out
//! of service also holds its instances `OUT_OF_SERVICE` in the registry (clients that discover
//! through it stop calling them, as Asgard did through Eureka); putting it back releases them.
//!
//! Instances outlive the launcher: each one's journal is handed over to its systemd-nspawn
//! process, so `bakery gc` spares it while that process runs and reclaims it once the process
//! is gone; stopping one is adopting its journal and unwinding it.
//!
//! State lives under `STATE/clusters/<cluster>/`: `groups/<group>.json` (spec, capacity, flags
//! and members), `balancer.json` and HAProxy's files, `lock.json` (the deploy lock) and
//! `deploy.json` (the last deploy record). Changes to a cluster are serialised by a `flock` on
//! its `state.lock`.

use super::cloud::{self, Capacity, Cloud, DeployRecord, Group, GroupSpec, Health, LockHolder, Member, Replacement};
use super::haproxy::{self, Balancer, Server};
use super::registry::{self, Instance, Registry};
use super::soak::Traffic;
use crate::ids::unix_now as now;
use crate::instance::{self, Endpoint, Method};
use crate::journal::{self, Journal};
use crate::local::LocalProvider;
use crate::process::Identity;
use crate::provider::Provider as _;
use nix::fcntl::{Flock, FlockArg};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use snafu::{OptionExt, ResultExt, Snafu};
use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a member of a group that heals may stay unhealthy before it is replaced, as an
/// Auto Scaling group's health check grace period (a container answers within seconds).
const HEAL_GRACE: Duration = Duration::from_secs(120);
/// Replacements a group remembers, for `status`.
const REPLACEMENTS_KEPT: usize = 20;
/// Deploy records a cluster's history keeps.
const HISTORY_KEPT: usize = 50;

/// Members go round-robin over these, as an ASG spreads instances over availability zones.
const ZONES: [&str; 3] = ["local-a", "local-b", "local-c"];

#[derive(Debug, Snafu)]
pub enum Error {
    #[snafu(display("launcher state I/O on {}: {source}", path.display()))]
    Io { path: PathBuf, source: std::io::Error },

    #[snafu(display("could not lock {}: {source}", path.display()))]
    Lock { path: PathBuf, source: nix::Error },

    #[snafu(display("opening the local provider: {source}"))]
    Open { source: crate::provider::Error },

    #[snafu(display("{what} name {name:?} is not a plain name ([A-Za-z0-9._~^-], not starting with '.')"))]
    Name { what: &'static str, name: String },

    #[snafu(display("health URL {url:?} must be a path (such as /hello/health)"))]
    HealthUrl { url: String },

    #[snafu(display("group {group} already exists with image {image}"))]
    Exists { group: String, image: String },

    #[snafu(display("group {group} does not exist"))]
    NoGroup { group: String },

    #[snafu(display("group {group} has no instance {instance}"))]
    NoMember { group: String, instance: String },

    #[snafu(display("killing instance {instance}: {source}"))]
    Kill { instance: String, source: std::io::Error },

    #[snafu(display("Latency Monkey's relay: {source}"))]
    Relay { source: super::daemon::Error },

    #[snafu(display("Latency Monkey's relay did not listen on port {port} within 5 s"))]
    RelayNotListening { port: u16 },

    #[snafu(display("no free loopback address for another instance"))]
    NoAddress,

    #[snafu(display("no free port on {address}: {source}"))]
    Port { address: Ipv4Addr, source: std::io::Error },

    #[snafu(display("starting an instance of {group}: {source}"))]
    Boot { group: String, source: instance::Error },

    #[snafu(display("instance journal: {source}"))]
    Journal { source: journal::Error },

    #[snafu(display("balancer of cluster {cluster}: {source}"))]
    Balancer { cluster: String, source: haproxy::Error },

    #[snafu(display("service registry: {source}"))]
    Registry { source: registry::Error },

    #[snafu(display("cluster {cluster:?}: {source}"))]
    Cluster { cluster: String, source: super::names::Error },

    #[snafu(display("looking up image {image}: {source}"))]
    Image { image: String, source: crate::provider::Error },

    #[snafu(display("cluster {cluster} still has groups: {}", groups.join(", ")))]
    NotEmpty { cluster: String, groups: Vec<String> },

    #[snafu(display("{} set(s) what only a cloud's launch templates have; local instances take none of it", flags.join(", ")))]
    CloudOnly { flags: Vec<&'static str> },
}

pub type Result<T> = std::result::Result<T, Error>;

/// `groups/<group>.json`.
#[derive(Debug, Serialize, Deserialize)]
struct GroupState {
    spec: GroupSpec,
    created: u64,
    capacity: Capacity,
    in_service: bool,
    suspended: bool,
    disabled_at: Option<u64>,
    members: Vec<MemberState>,
    /// The latest instances the healer replaced, oldest first.
    #[serde(default)]
    replacements: Vec<Replacement>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct MemberState {
    id: String,
    zone: String,
    address: Ipv4Addr,
    port: u16,
    /// The handed-over journal that the instance's process keeps live.
    journal: String,
    process: Identity,
    /// Unix seconds since the healer first saw it not healthy in a row (None: healthy).
    #[serde(default)]
    unhealthy_since: Option<u64>,
    /// Latency Monkey's relay in front of it, while it lasts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    latency: Option<LatencyState>,
}

/// A member's traffic detoured through a delaying relay (`launcher chaos relay`, a helper
/// process that stops by itself at `until`; the healer then points the balancer back).
#[derive(Clone, Debug, Serialize, Deserialize)]
struct LatencyState {
    /// Unix seconds.
    until: u64,
    port: u16,
    /// The relay's handed-over journal.
    journal: String,
}

impl MemberState {
    fn server(&self) -> Server {
        Server { id: self.id.clone(), address: self.address, port: self.port }
    }
}

pub struct LocalCloud {
    provider: LocalProvider,
    registry: Registry,
    state_dir: PathBuf,
}

impl LocalCloud {
    pub fn open(state_dir: &Path) -> Result<LocalCloud> {
        let provider = LocalProvider::open(state_dir).context(OpenSnafu)?;
        Ok(LocalCloud { provider, registry: Registry::new(state_dir), state_dir: state_dir.to_path_buf() })
    }

    /// The state directory's service registry.
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// What the group's instances register as: the cluster's app, the image's version.
    fn registration(&self, spec: &GroupSpec) -> Result<instance::Registration> {
        let app = super::names::Cluster::parse(&spec.cluster).context(ClusterSnafu { cluster: &spec.cluster })?.app;
        let image = self.provider.images().find_image(&spec.image_id).context(ImageSnafu { image: &spec.image_id })?;
        let version = image.and_then(|i| i.tags.get("version").cloned()).unwrap_or_else(|| spec.image_id.clone());
        Ok(instance::Registration {
            registry_url: self.registry.ensure().context(RegistrySnafu)?,
            app,
            cluster: spec.cluster.clone(),
            group: spec.name.clone(),
            zone: String::new(),
            version,
            health_path: spec.health_url.clone(),
        })
    }

    /// Stops the cluster's balancer (its URL goes away) once it has no groups left; the deploy
    /// record and lock stay. `destroy_group` leaves the balancer running on purpose: a cluster
    /// between two deploys keeps its address.
    pub fn stop_cluster(&self, cluster: &str) -> Result<()> {
        let _lock = self.lock(cluster)?;
        let groups: Vec<String> = self.group_states(cluster)?.into_iter().map(|g| g.spec.name).collect();
        snafu::ensure!(groups.is_empty(), NotEmptySnafu { cluster, groups });
        self.balancer(cluster).stop().context(BalancerSnafu { cluster })
    }

    fn clusters_dir(&self) -> PathBuf {
        self.state_dir.join("clusters")
    }

    fn cluster_dir(&self, cluster: &str) -> PathBuf {
        self.clusters_dir().join(cluster)
    }

    fn group_path(&self, cluster: &str, group: &str) -> PathBuf {
        self.cluster_dir(cluster).join("groups").join(format!("{group}.json"))
    }

    fn balancer(&self, cluster: &str) -> Balancer {
        Balancer::new(&self.state_dir, &self.cluster_dir(cluster))
    }

    /// The cluster's state lock, held while its state changes.
    fn lock(&self, cluster: &str) -> Result<Flock<File>> {
        check_name("cluster", cluster)?;
        let dir = self.cluster_dir(cluster).join("groups");
        fs::create_dir_all(&dir).context(IoSnafu { path: &dir })?;
        exclusive(&self.cluster_dir(cluster).join("state.lock"))
    }

    fn group_states(&self, cluster: &str) -> Result<Vec<GroupState>> {
        let dir = self.cluster_dir(cluster).join("groups");
        let mut groups = Vec::new();
        for name in entries(&dir)? {
            if let Some(group) = name.strip_suffix(".json") {
                groups.extend(read_json::<GroupState>(&self.group_path(cluster, group))?);
            }
        }
        groups.sort_by(|a, b| (a.created, &a.spec.name).cmp(&(b.created, &b.spec.name)));
        Ok(groups)
    }

    /// The cluster's history records, newest first (names start with the zero-padded start time).
    fn history_files(&self, cluster: &str) -> Result<Vec<PathBuf>> {
        let dir = self.cluster_dir(cluster).join("history");
        let mut names: Vec<String> = entries(&dir)?.into_iter().filter(|n| n.ends_with(".json")).collect();
        names.sort_unstable_by(|a, b| b.cmp(a));
        Ok(names.into_iter().map(|name| dir.join(name)).collect())
    }

    /// The group's state with its cluster locked, or None when no cluster has it.
    fn locked_group(&self, group: &str) -> Result<Option<(Flock<File>, GroupState)>> {
        check_name("group", group)?;
        for cluster in self.cluster_names()? {
            if self.group_path(&cluster, group).exists() {
                let lock = self.lock(&cluster)?;
                // Read under the lock: it may have changed or gone while we waited.
                return Ok(read_json(&self.group_path(&cluster, group))?.map(|state| (lock, state)));
            }
        }
        Ok(None)
    }

    fn save_group(&self, state: &GroupState) -> Result<()> {
        write_json(&self.group_path(&state.spec.cluster, &state.spec.name), state)
    }

    fn cluster_names(&self) -> Result<Vec<String>> {
        Ok(entries(&self.clusters_dir())?.into_iter().filter(|name| !name.starts_with('.')).collect())
    }

    /// Boots members until the group has `count`, each saved as soon as it runs.
    fn grow(&self, state: &mut GroupState, count: usize) -> Result<()> {
        // Held while choosing addresses and until the members holding them are saved.
        let _addresses = exclusive(&self.clusters_dir().join(".addresses.lock"))?;
        let mut used = BTreeSet::new();
        for cluster in self.cluster_names()? {
            for group in self.group_states(&cluster)? {
                used.extend(group.members.iter().map(|m| m.address));
            }
        }
        used.extend(state.members.iter().map(|m| m.address));
        let registration = match state.members.len() < count {
            true => Some(self.registration(&state.spec)?),
            false => None,
        };
        while state.members.len() < count {
            // 127.0.0.x is left to `bakery verify` and tests; 127.0.1.1 is Debian's host name.
            let address = (10..=254u8)
                .flat_map(|x| (1..=254u8).map(move |y| Ipv4Addr::new(127, 0, x, y)))
                .find(|a| !used.contains(a))
                .context(NoAddressSnafu)?;
            let endpoint = Endpoint::free(address).context(PortSnafu { address })?;
            let zone =
                *ZONES.iter().min_by_key(|z| state.members.iter().filter(|m| m.zone == **z).count()).expect("zones");
            let (id, group) = (crate::ids::new_id("instance"), state.spec.name.clone());
            let what = format!("instance of {group} in {zone}");
            let mut journal = Journal::begin(&self.state_dir, &id, &what, "local").context(JournalSnafu)?;
            let image = &state.spec.image_id;
            let registration =
                registration.as_ref().map(|r| instance::Registration { zone: zone.to_string(), ..r.clone() });
            let (provider, state_dir) = (&self.provider, &self.state_dir);
            let started = instance::start(
                provider,
                state_dir,
                &mut journal,
                image,
                Method::Container,
                endpoint,
                registration.as_ref(),
            );
            let instance = match started {
                Ok(instance) => instance,
                Err(source) => {
                    if let Err(error) = journal.unwind_all(&journal::HostOnly) {
                        tracing::error!(%error, "could not undo a failed instance start; `bakery gc` will");
                    }
                    return Err(Error::Boot { group, source });
                }
            };
            let process = instance.process();
            state.members.push(MemberState {
                id: instance.id,
                zone: zone.to_string(),
                address,
                port: endpoint.port,
                journal: id,
                process,
                unhealthy_since: None,
                latency: None,
            });
            used.insert(address);
            // Recorded before the journal is handed over: a launcher killed in between leaves a
            // dead journal gc reclaims, never an instance that runs on with no group naming it.
            self.save_group(state)?;
            journal.hand_over(process).context(JournalSnafu)?;
        }
        Ok(())
    }

    /// Takes `members` out of the balancer, stops them (at once: each waits for its system to
    /// shut down) and drops them from the group; stopped ones are dropped even if others fail.
    fn shrink(&self, state: &mut GroupState, members: &[MemberState]) -> Result<()> {
        let cluster = state.spec.cluster.clone();
        let ids: Vec<String> = members.iter().map(|m| m.id.clone()).collect();
        self.balancer(&cluster).disable(&ids).context(BalancerSnafu { cluster })?;
        // Gone instances deregister themselves; their overrides go with them.
        self.registry.set_override(&ids, None).context(RegistrySnafu)?;
        let results: Vec<(String, Result<()>)> = std::thread::scope(|scope| {
            let stopping: Vec<_> =
                members.iter().map(|member| (member.id.clone(), scope.spawn(|| self.stop_member(member)))).collect();
            stopping.into_iter().map(|(id, thread)| (id, thread.join().expect("stopping thread panicked"))).collect()
        });
        let mut first_error = None;
        for (id, result) in results {
            match result {
                Ok(()) => state.members.retain(|m| m.id != id),
                Err(error) => {
                    tracing::error!(member = %id, %error, "could not stop instance");
                    first_error.get_or_insert(error);
                }
            }
        }
        self.save_group(state)?;
        first_error.map_or(Ok(()), Err)
    }

    fn stop_member(&self, member: &MemberState) -> Result<()> {
        if let Some(latency) = &member.latency {
            super::daemon::stop(&self.state_dir, &latency.journal).context(JournalSnafu)?;
        }
        match Journal::adopt(&self.state_dir, &member.journal).context(JournalSnafu)? {
            Some(journal) => journal.unwind_all(&journal::HostOnly).context(JournalSnafu),
            None => Ok(()), // reclaimed by gc after its process died
        }
    }

    /// One healer's look at a group that is not disabled: members whose process is gone, or
    /// that stayed unhealthy past [`HEAL_GRACE`], are replaced by fresh ones from the group's
    /// image; members of a group in service go into the balancer once healthy.
    fn heal_group(&self, state: &mut GroupState) -> Result<Vec<Replacement>> {
        let cluster = state.spec.cluster.clone();
        let registered = self.registry.instances(Some(&cluster)).context(RegistrySnafu)?;
        let reported =
            |id: &str| registered.iter().find(|i| i.registration.instance_id == id).map(|i| i.reported_status.as_str());
        let agent = probe_agent();
        let now = now();
        // Latency Monkey's detours that ran their course end here (their relay has stopped).
        for member in state.members.iter_mut() {
            if let Some(latency) = member.latency.take_if(|l| l.until <= now) {
                self.balancer(&cluster).detour(&member.id, None).context(BalancerSnafu { cluster: &cluster })?;
                super::daemon::stop(&self.state_dir, &latency.journal).context(JournalSnafu)?;
                tracing::info!(instance = %member.id, "latency removed");
            }
        }
        let healths: Vec<Health> =
            state.members.iter().map(|m| self.health(&agent, state, m, reported(&m.id))).collect();
        let mut failed = Vec::new();
        for (member, health) in state.members.iter_mut().zip(&healths) {
            if *health == Health::Healthy {
                member.unhealthy_since = None;
                continue;
            }
            let since = *member.unhealthy_since.get_or_insert(now);
            if *health == Health::Unhealthy {
                failed.push((member.clone(), "its process exited".to_string()));
            } else if now.saturating_sub(since) > HEAL_GRACE.as_secs() {
                let why = format!("unhealthy for more than {}s", HEAL_GRACE.as_secs());
                failed.push((member.clone(), why));
            }
        }
        let mut replaced = Vec::new();
        if !failed.is_empty() {
            // Live ones are stopped first (none may run on with no group naming it); dead ones
            // only leave the balancer, and their remains are cleared once the replacements boot.
            let (dead, live): (Vec<MemberState>, Vec<MemberState>) =
                failed.iter().map(|(m, _)| m.clone()).partition(|m| !m.process.is_running());
            self.shrink(state, &live)?;
            let dead_ids: Vec<String> = dead.iter().map(|m| m.id.clone()).collect();
            self.balancer(&cluster).disable(&dead_ids).context(BalancerSnafu { cluster: &cluster })?;
            self.registry.set_override(&dead_ids, None).context(RegistrySnafu)?;
            state.members.retain(|m| !dead_ids.contains(&m.id));
            let before: BTreeSet<String> = state.members.iter().map(|m| m.id.clone()).collect();
            self.grow(state, state.capacity.desired as usize)?;
            for member in &dead {
                if let Err(error) = self.stop_member(member) {
                    tracing::warn!(instance = %member.id, %error, "could not clear a dead instance; `bakery gc` will");
                }
            }
            let fresh = state.members.iter().filter(|m| !before.contains(&m.id)).map(|m| m.id.clone());
            for ((member, reason), replaced_by) in failed.into_iter().zip(fresh) {
                tracing::warn!(instance = %member.id, %replaced_by, %reason, "replaced");
                replaced.push(Replacement { at: now, instance: member.id, replaced_by, reason });
            }
            state.replacements.extend(replaced.iter().cloned());
            let excess = state.replacements.len().saturating_sub(REPLACEMENTS_KEPT);
            state.replacements.drain(..excess);
        } else if state.in_service {
            let healthy: Vec<Server> = state
                .members
                .iter()
                .zip(&healths)
                .filter(|(_, h)| **h == Health::Healthy)
                .map(|(m, _)| m.server())
                .collect();
            self.balancer(&cluster).enable(&healthy).context(BalancerSnafu { cluster })?;
        }
        self.save_group(state)?;
        Ok(replaced)
    }

    /// Healthy: running, answering its health URL, and reported `UP` by its agent.
    fn health(&self, agent: &ureq::Agent, state: &GroupState, member: &MemberState, reported: Option<&str>) -> Health {
        if !member.process.is_running() {
            return Health::Unhealthy;
        }
        let url = format!("http://{}:{}{}", member.address, member.port, state.spec.health_url);
        match (crate::verify::probe(agent, &url, "").status, reported) {
            (Some(200), Some(registry::UP)) => Health::Healthy,
            _ => Health::Starting,
        }
    }
}

impl Cloud for LocalCloud {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn clusters(&self) -> cloud::Result<Vec<String>> {
        Ok(self.cluster_names()?)
    }

    fn groups(&self, cluster: &str) -> cloud::Result<Vec<Group>> {
        check_name("cluster", cluster)?;
        if !self.cluster_dir(cluster).exists() {
            return Ok(Vec::new());
        }
        let _lock = self.lock(cluster)?;
        self.balancer(cluster).refresh().context(BalancerSnafu { cluster })?;
        let agent = probe_agent();
        let states = self.group_states(cluster)?;
        if !states.is_empty() {
            // Health needs the registry: a dead one is restarted on its data, as the balancer is.
            self.registry.ensure().context(RegistrySnafu)?;
        }
        let registered = self.registry.instances(Some(cluster)).context(RegistrySnafu)?;
        let entry = |id: &str| registered.iter().find(|i| i.registration.instance_id == id);
        let groups = states.into_iter().map(|state| Group {
            members: state
                .members
                .iter()
                .map(|m| Member {
                    id: m.id.clone(),
                    zone: m.zone.clone(),
                    health: self.health(&agent, &state, m, entry(&m.id).map(|i| i.reported_status.as_str())),
                    address: Some(format!("{}:{}", m.address, m.port)),
                    registry_status: entry(&m.id).map(|i| i.registration.status.clone()),
                    launched: crate::process::unix_start_time(m.process.start_time),
                })
                .collect(),
            name: state.spec.name.clone(),
            image_id: state.spec.image_id.clone(),
            created: state.created,
            capacity: state.capacity,
            in_service: state.in_service,
            suspended: state.suspended,
            disabled_at: state.disabled_at,
            deploy_id: Some(state.spec.deploy_id),
            registers: true,
            replacements: state.replacements,
        });
        Ok(groups.collect())
    }

    fn check_request(&self, request: &super::plan::DeployRequest) -> Vec<String> {
        let mut flags = request.launch.cloud_only();
        if !request.subnets.is_empty() {
            flags.push("--subnets");
        }
        match flags.is_empty() {
            true => Vec::new(),
            false => vec![Error::CloudOnly { flags }.to_string()],
        }
    }

    fn create_group(&self, spec: &GroupSpec) -> cloud::Result<()> {
        check_name("group", &spec.name)?;
        snafu::ensure!(spec.health_url.starts_with('/'), HealthUrlSnafu { url: &spec.health_url });
        let _lock = self.lock(&spec.cluster)?;
        if let Some(existing) = read_json::<GroupState>(&self.group_path(&spec.cluster, &spec.name))? {
            let image = existing.spec.image_id;
            snafu::ensure!(image == spec.image_id, ExistsSnafu { group: &spec.name, image });
            return Ok(());
        }
        let mut state = GroupState {
            spec: spec.clone(),
            created: now(),
            capacity: spec.capacity,
            in_service: false,
            suspended: false,
            disabled_at: None,
            members: Vec::new(),
            replacements: Vec::new(),
        };
        self.save_group(&state)?;
        Ok(self.grow(&mut state, spec.capacity.desired as usize)?)
    }

    fn resize_group(&self, group: &str, capacity: Capacity) -> cloud::Result<()> {
        let (_lock, mut state) = self.locked_group(group)?.context(NoGroupSnafu { group })?;
        state.capacity = capacity;
        self.save_group(&state)?;
        let desired = capacity.desired as usize;
        if state.members.len() <= desired {
            return Ok(self.grow(&mut state, desired)?);
        }
        // Newest first from the fullest zone, so that the zones stay balanced.
        let mut left = state.members.clone();
        let mut victims = Vec::new();
        while left.len() > desired {
            let fullest = ZONES.iter().max_by_key(|z| left.iter().filter(|m| m.zone == **z).count()).expect("zones");
            let newest = left.iter().rposition(|m| m.zone == *fullest).expect("the fullest zone has a member");
            victims.push(left.remove(newest));
        }
        Ok(self.shrink(&mut state, &victims)?)
    }

    fn resume_group(&self, group: &str) -> cloud::Result<()> {
        let (_lock, mut state) = self.locked_group(group)?.context(NoGroupSnafu { group })?;
        state.suspended = false;
        Ok(self.save_group(&state)?)
    }

    fn add_to_service(&self, group: &str) -> cloud::Result<()> {
        let (_lock, mut state) = self.locked_group(group)?.context(NoGroupSnafu { group })?;
        let cluster = &state.spec.cluster;
        let servers: Vec<Server> = state.members.iter().map(MemberState::server).collect();
        let ids: Vec<String> = state.members.iter().map(|m| m.id.clone()).collect();
        self.registry.set_override(&ids, None).context(RegistrySnafu)?;
        self.balancer(cluster).enable(&servers).context(BalancerSnafu { cluster })?;
        state.in_service = true;
        state.suspended = false;
        state.disabled_at = None;
        Ok(self.save_group(&state)?)
    }

    fn remove_from_service(&self, group: &str, at: u64) -> cloud::Result<()> {
        let Some((_lock, mut state)) = self.locked_group(group)? else { return Ok(()) };
        let cluster = &state.spec.cluster;
        let ids: Vec<String> = state.members.iter().map(|m| m.id.clone()).collect();
        self.registry.set_override(&ids, Some(registry::OUT_OF_SERVICE)).context(RegistrySnafu)?;
        self.balancer(cluster).disable(&ids).context(BalancerSnafu { cluster })?;
        state.in_service = false;
        state.suspended = true;
        // The soak counts from the first time it was disabled.
        state.disabled_at = state.disabled_at.or(Some(at));
        Ok(self.save_group(&state)?)
    }

    fn destroy_group(&self, group: &str) -> cloud::Result<()> {
        let Some((_lock, mut state)) = self.locked_group(group)? else { return Ok(()) };
        let members = state.members.clone();
        self.shrink(&mut state, &members)?;
        let path = self.group_path(&state.spec.cluster, group);
        Ok(fs::remove_file(&path).context(IoSnafu { path })?)
    }

    fn acquire_lock(&self, cluster: &str, holder: &LockHolder) -> cloud::Result<Option<LockHolder>> {
        let _lock = self.lock(cluster)?;
        let path = self.cluster_dir(cluster).join("lock.json");
        if let Some(current) = read_json::<LockHolder>(&path)? {
            if current.deploy_id != holder.deploy_id && !current.is_stale_here(now()) {
                return Ok(Some(current));
            }
        }
        write_json(&path, holder)?;
        Ok(None)
    }

    fn release_lock(&self, cluster: &str, deploy_id: &str) -> cloud::Result<()> {
        let _lock = self.lock(cluster)?;
        let path = self.cluster_dir(cluster).join("lock.json");
        if read_json::<LockHolder>(&path)?.is_some_and(|h| h.deploy_id == deploy_id) {
            fs::remove_file(&path).context(IoSnafu { path })?;
        }
        Ok(())
    }

    /// The record, and a copy in the cluster's history (the newest [`HISTORY_KEPT`] runs).
    fn save_deploy(&self, record: &DeployRecord) -> cloud::Result<()> {
        let _lock = self.lock(&record.cluster)?;
        let dir = self.cluster_dir(&record.cluster);
        write_json(&dir.join("deploy.json"), record)?;
        let history = dir.join("history");
        fs::create_dir_all(&history).context(IoSnafu { path: &history })?;
        let copy = history.join(format!("{:011}-{}.json", record.started, record.deploy_id));
        // A run saves after every step; only its first save adds a record to prune for.
        let new_run = !copy.exists();
        write_json(&copy, record)?;
        if new_run {
            for old in self.history_files(&record.cluster)?.into_iter().skip(HISTORY_KEPT) {
                fs::remove_file(&old).context(IoSnafu { path: old })?;
            }
        }
        Ok(())
    }

    fn history(&self, cluster: &str) -> cloud::Result<Vec<DeployRecord>> {
        check_name("cluster", cluster)?;
        let mut records = Vec::new();
        for path in self.history_files(cluster)? {
            records.extend(read_json::<DeployRecord>(&path)?);
        }
        Ok(records)
    }

    fn lock_holder(&self, cluster: &str) -> cloud::Result<Option<LockHolder>> {
        check_name("cluster", cluster)?;
        let holder = read_json::<LockHolder>(&self.cluster_dir(cluster).join("lock.json"))?;
        Ok(holder.filter(|h| !h.is_stale_here(now())))
    }

    fn load_deploy(&self, cluster: &str) -> cloud::Result<Option<DeployRecord>> {
        check_name("cluster", cluster)?;
        Ok(read_json(&self.cluster_dir(cluster).join("deploy.json"))?)
    }

    /// From the balancer's request ring: the requests its members answered in the window.
    fn traffic(&self, cluster: &str, group: &str, window: Duration) -> cloud::Result<Option<Traffic>> {
        check_name("cluster", cluster)?;
        let Some(state) = read_json::<GroupState>(&self.group_path(cluster, group))? else { return Ok(None) };
        let servers: BTreeSet<String> = state.members.iter().map(|m| format!("{}:{}", m.address, m.port)).collect();
        let since = now().saturating_sub(window.as_secs());
        let requests = self.balancer(cluster).requests(since).context(BalancerSnafu { cluster })?;
        // With no server up, HAProxy answers 503 itself (no server address): an outage of the
        // group in service.
        let ours = |server: &str| servers.contains(server) || (state.in_service && server.starts_with('-'));
        let answered: Vec<(u16, u64)> =
            requests.into_iter().filter(|(server, _, _)| ours(server)).map(|(_, s, ms)| (s, ms)).collect();
        Ok(Some(Traffic::of(&answered, window)))
    }

    fn heal(&self, cluster: &str) -> cloud::Result<Vec<Replacement>> {
        check_name("cluster", cluster)?;
        let mut replaced = Vec::new();
        for name in self.group_states(cluster)?.into_iter().filter(|g| !g.suspended).map(|g| g.spec.name) {
            // A deploy may have disabled it since the listing: a disabled group does not heal.
            let Some((_lock, mut state)) = self.locked_group(&name)?.filter(|(_, s)| !s.suspended) else { continue };
            replaced.extend(self.heal_group(&mut state)?);
        }
        Ok(replaced)
    }

    /// Starts `launcher chaos relay` (this executable) as a helper process in front of the
    /// member, and points the balancer's slot at it.
    fn inject_latency(
        &self,
        group: &str,
        instance: &str,
        delay: Duration,
        jitter: Duration,
        until: u64,
    ) -> cloud::Result<()> {
        let (_lock, mut state) = self.locked_group(group)?.context(NoGroupSnafu { group })?;
        let cluster = state.spec.cluster.clone();
        let index = state.members.iter().position(|m| m.id == instance).context(NoMemberSnafu { group, instance })?;
        if let Some(old) = state.members[index].latency.take() {
            super::daemon::stop(&self.state_dir, &old.journal).context(JournalSnafu)?;
        }
        let member = state.members[index].clone();
        let localhost = Ipv4Addr::LOCALHOST;
        let port = Endpoint::free(localhost).context(PortSnafu { address: localhost })?.port;
        let starting = super::daemon::begin(&self.state_dir, "relay", &format!("Latency Monkey's relay to {instance}"))
            .context(RelaySnafu)?;
        let journal = starting.id().to_string();
        starting
            .launch(&[], || {
                let mut relay = std::process::Command::new(std::env::current_exe()?);
                relay
                    .args(["chaos", "relay", "--listen", &format!("{localhost}:{port}")])
                    .args(["--target", &format!("{}:{}", member.address, member.port)])
                    .args(["--delay", &format!("{}ms", delay.as_millis())])
                    .args(["--jitter", &format!("{}ms", jitter.as_millis())])
                    .args(["--until", &until.to_string()])
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null());
                super::daemon::spawn_detached(relay)
            })
            .context(RelaySnafu)?;
        let listening = crate::wait::until(Duration::from_secs(5), Duration::from_millis(20), || {
            std::net::TcpStream::connect((localhost, port)).ok().map(|_| ())
        });
        if listening.is_none() {
            super::daemon::stop(&self.state_dir, &journal).context(JournalSnafu)?;
            return Err(Error::RelayNotListening { port }.into());
        }
        state.members[index].latency = Some(LatencyState { until, port, journal });
        self.save_group(&state)?;
        self.balancer(&cluster).detour(instance, Some((localhost, port))).context(BalancerSnafu { cluster })?;
        Ok(())
    }

    /// SIGKILL to the instance's nspawn, the init of its PID namespace: everything in it dies
    /// at once, with no shutdown and no deregistration.
    fn terminate_instance(&self, group: &str, instance: &str) -> cloud::Result<()> {
        let (_lock, state) = self.locked_group(group)?.context(NoGroupSnafu { group })?;
        let member = state.members.iter().find(|m| m.id == instance).context(NoMemberSnafu { group, instance })?;
        if member.process.is_running() {
            let pid = nix::unistd::Pid::from_raw(member.process.pid);
            nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL)
                .map_err(std::io::Error::from)
                .context(KillSnafu { instance })?;
        }
        Ok(())
    }

    /// Reading a group here costs local files, HAProxy's socket, etcd and a health probe each.
    fn poll_interval(&self) -> Duration {
        Duration::from_millis(500)
    }

    fn registrations(&self, cluster: Option<&str>) -> cloud::Result<Vec<Instance>> {
        Ok(self.registry.instances(cluster).context(RegistrySnafu)?)
    }

    fn retire_cluster(&self, cluster: &str) -> cloud::Result<()> {
        Ok(self.stop_cluster(cluster)?)
    }

    fn balancer_url(&self, cluster: &str) -> Option<String> {
        check_name("cluster", cluster).ok()?;
        self.balancer(cluster).url().ok().flatten()
    }
}

/// For health probes: an instance that does not answer at once is not healthy.
fn probe_agent() -> ureq::Agent {
    ureq::AgentBuilder::new().timeout_connect(Duration::from_millis(500)).timeout(Duration::from_secs(2)).build()
}

/// Names become path components under the state directory.
fn check_name(what: &'static str, name: &str) -> Result<()> {
    let plain = name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._~^-".contains(&b));
    snafu::ensure!(!name.is_empty() && plain && !name.starts_with('.'), NameSnafu { what, name });
    Ok(())
}

fn exclusive(path: &Path) -> Result<Flock<File>> {
    let file = OpenOptions::new().create(true).truncate(false).write(true).open(path).context(IoSnafu { path })?;
    Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, errno)| errno).context(LockSnafu { path })
}

/// File names in `dir`; none when it does not exist.
fn entries(dir: &Path) -> Result<Vec<String>> {
    let list = match fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        other => other.context(IoSnafu { path: dir })?,
    };
    let mut names = Vec::new();
    for entry in list {
        names.push(entry.context(IoSnafu { path: dir })?.file_name().to_string_lossy().into_owned());
    }
    names.sort();
    Ok(names)
}

fn read_json<T: DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    crate::atomic::read_json(path).context(IoSnafu { path })
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<()> {
    crate::atomic::write_json(path, value).context(IoSnafu { path })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_plain_path_components() {
        assert!(check_name("group", "hello-prod-v000").is_ok());
        assert!(check_name("group", "hello--canary~1").is_ok());
        for bad in ["", ".hidden", "a/b", "..", "a b"] {
            assert!(check_name("group", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_lock_is_stale_when_expired_or_its_local_holder_is_gone() {
        let host = crate::launch::cloud::this_host();
        let me = Identity::of(std::process::id() as i32).unwrap();
        let holder = |host: &str, start_time, expires| LockHolder {
            deploy_id: "d".into(),
            owner: "o".into(),
            host: host.into(),
            pid: me.pid as u32,
            start_time,
            expires,
        };
        assert!(!holder(&host, me.start_time, now() + 60).is_stale_here(now()));
        assert!(holder(&host, me.start_time, now() - 1).is_stale_here(now()), "expired");
        assert!(holder(&host, me.start_time + 1, now() + 60).is_stale_here(now()), "the process is gone");
        assert!(!holder("elsewhere", me.start_time + 1, now() + 60).is_stale_here(now()), "another host's process");
    }
}

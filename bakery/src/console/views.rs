//! What the console's pages and API show, read from the same library calls the command lines
//! make (`launcher status`, `bakery images list`, `launcher registry list`): the API returns
//! these as JSON, the pages render them.

use super::actions::Request;
use super::Error;
use crate::launch::cloud::{Cloud, DeployRecord, Group, LockHolder, Phase};
use crate::launch::engine::{Engine, Identity, Status, SystemClock};
use crate::launch::names::Cluster;
use crate::provider::{Image, ImageRegistry};
use serde::Serialize;
use sha2::{Digest, Sha256};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

/// Images an application's row shows.
const NEWEST_SHOWN: usize = 3;

/// Reads never stop half way: there is nothing to cancel.
static NEVER_CANCELLED: AtomicBool = AtomicBool::new(false);

fn reader(cloud: &dyn Cloud) -> Engine<'_> {
    Engine::new(cloud, &SystemClock, &NEVER_CANCELLED, Identity::current(0))
}

/// A cluster name from a URL, checked as the launcher checks it.
pub fn cluster_name(name: &str) -> Result<Cluster, Error> {
    Cluster::parse(name).map_err(|e| Error::BadInput { message: format!("cluster {name:?}: {e}") })
}

/// Every image, newest first (`bakery images list` order reversed), those of `app` only if given.
pub fn images(registry: &dyn ImageRegistry, app: Option<&str>) -> Result<Vec<Image>, Error> {
    let mut images = registry.list_images().map_err(|source| Error::Images { source })?;
    images.retain(|i| app.is_none_or(|app| i.tags.get("app").is_some_and(|a| a == app)));
    images.sort_by(|a, b| (&b.created, &b.id).cmp(&(&a.created, &a.id)));
    Ok(images)
}

#[derive(Serialize)]
pub struct Application {
    pub name: String,
    pub clusters: Vec<String>,
    /// The newest few.
    pub images: Vec<Image>,
    pub image_count: usize,
}

/// Every application that has a cluster or an image, by name.
pub fn applications(cloud: &dyn Cloud, images: &[Image]) -> Result<Vec<Application>, Error> {
    let clusters = cloud.clusters().map_err(|source| Error::Cloud { source })?;
    let mut apps: BTreeMap<String, Application> = BTreeMap::new();
    fn entry<'a>(apps: &'a mut BTreeMap<String, Application>, name: &str) -> &'a mut Application {
        apps.entry(name.to_string()).or_insert_with(|| Application {
            name: name.to_string(),
            clusters: Vec::new(),
            images: Vec::new(),
            image_count: 0,
        })
    }
    for cluster in clusters {
        if let Ok(parsed) = Cluster::parse(&cluster) {
            entry(&mut apps, &parsed.app).clusters.push(cluster);
        }
    }
    for image in images {
        if let Some(app) = image.tags.get("app") {
            let application = entry(&mut apps, app);
            application.image_count += 1;
            if application.images.len() < NEWEST_SHOWN {
                application.images.push(image.clone());
            }
        }
    }
    Ok(apps.into_values().collect())
}

/// A cluster as its page shows it: `launcher status`, plus who holds its lock and its history.
#[derive(Serialize)]
pub struct ClusterView {
    #[serde(flatten)]
    pub status: Status,
    pub app: String,
    pub lock: Option<LockHolder>,
    /// Newest first.
    pub history: Vec<DeployRecord>,
    /// Each group's image's `version` tag, where the image is known.
    pub versions: BTreeMap<String, String>,
}

impl ClusterView {
    /// `in service`, `soaking` (in service, and watched after its deploy's flip) or `disabled`.
    pub fn state_of(&self, group: &Group) -> &'static str {
        let soaking = self
            .status
            .deploy
            .as_ref()
            .is_some_and(|r| r.phase == Phase::Soaking && r.new_group.as_deref() == Some(group.name.as_str()));
        match (group.in_service, soaking) {
            (true, true) => "soaking",
            (true, false) => "in service",
            (false, _) => "disabled",
        }
    }

    pub fn group(&self, name: &str) -> Option<&Group> {
        self.status.groups.iter().find(|g| g.name == name)
    }

    /// The newest group in service.
    pub fn serving(&self) -> Option<&Group> {
        self.status.groups.iter().filter(|g| g.in_service).max_by_key(|g| (g.created, &g.name))
    }
}

/// What an action would do to a cluster now: the plan's steps as the launcher names them, and a
/// fingerprint of them that a confirmation carries back (the action runs only if it still holds).
pub struct Review {
    pub steps: Vec<String>,
    pub fingerprint: String,
}

pub fn review(cloud: &dyn Cloud, cluster: &str, request: &Request) -> Result<Review, Error> {
    let engine = reader(cloud);
    let plan = match request {
        Request::Deploy(deploy) => engine.plan_deploy(deploy),
        Request::Rollback { health_timeout_secs } => {
            engine.plan_rollback(cluster, Duration::from_secs(*health_timeout_secs))
        }
        Request::Finish { soak_secs } => engine.plan_finish(cluster, Duration::from_secs(*soak_secs)),
    };
    let plan = plan.map_err(|source| Error::Engine { source: Box::new(source) })?;
    if plan.steps.is_empty() {
        let message = plan.message.unwrap_or_else(|| format!("nothing to {} on {cluster}", request.name()));
        return Err(Error::Conflict { message });
    }
    let steps: Vec<String> = plan.steps.iter().map(ToString::to_string).collect();
    let fingerprint = hex::encode(&Sha256::digest(steps.join("\n").as_bytes())[..12]);
    Ok(Review { steps, fingerprint })
}

/// Instances by registry status (`UP: 3`), where any registered.
pub fn registry_counts(group: &Group) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for status in group.members.iter().filter_map(|m| m.registry_status.clone()) {
        *counts.entry(status).or_insert(0) += 1;
    }
    counts
}

pub fn cluster(cloud: &dyn Cloud, registry: &dyn ImageRegistry, name: &str) -> Result<ClusterView, Error> {
    let parsed = cluster_name(name)?;
    let status = reader(cloud).status(name).map_err(|source| Error::Engine { source: Box::new(source) })?;
    let history = cloud.history(name).map_err(|source| Error::Cloud { source })?;
    if status.groups.is_empty() && history.is_empty() {
        return Err(Error::NotFound { what: format!("cluster {name}") });
    }
    let lock = cloud.lock_holder(name).map_err(|source| Error::Cloud { source })?;
    // One look per image in use, not a listing of every image.
    let mut versions = BTreeMap::new();
    for id in status.groups.iter().map(|g| g.image_id.as_str()).collect::<BTreeSet<_>>() {
        let image = registry.find_image(id).map_err(|source| Error::Images { source })?;
        if let Some(version) = image.and_then(|i| i.tags.get("version").cloned()) {
            versions.insert(id.to_string(), version);
        }
    }
    Ok(ClusterView { status, app: parsed.app, lock, history, versions })
}

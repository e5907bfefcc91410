//! `bakery images prune`: an app's old images go, with their snapshots (and copies in other
//! regions); an image anything still uses never does, nor the newest ones asked to be kept.
//!
//! What uses an image is the launcher's cloud's to say ([`Cloud::image_references`]): every
//! cluster's groups (serving, disabled or soaking), and on aws also every launch template
//! version, launch configuration and pending, running or stopped instance. Where the registry
//! can, the image of each serving group is protected from deregistration, and an image kept
//! only because something still uses it is marked deprecated (aws: `DeprecationTime`), so that
//! nothing new picks it.

use crate::launch::cloud::{self, Cloud, ImageReference};
use crate::provider::{self, Image, Provider};
use crate::tags;
use serde::Serialize;
use snafu::{ResultExt, Snafu};
use std::collections::BTreeMap;
use std::time::Duration;

#[derive(Debug, Snafu)]
pub enum Error {
    #[snafu(display("listing the images of {app}: {source}"))]
    List { app: String, source: provider::Error },

    #[snafu(display("finding what uses images (the launcher's {kind} clusters, templates, instances): {source}"))]
    References { kind: String, source: cloud::Error },

    #[snafu(display("--keep 0 would leave {app} nothing to roll back to; keep at least 1"))]
    KeepNothing { app: String },
}

pub type Result<T> = std::result::Result<T, Error>;

pub struct Request {
    pub app: String,
    /// The newest this many are kept whatever uses them.
    pub keep: usize,
    /// Images younger than this are kept.
    pub older_than: Option<Duration>,
    pub dry_run: bool,
}

impl Request {
    /// Refuses a request that would leave nothing to roll back to.
    pub fn check(&self) -> Result<()> {
        snafu::ensure!(self.keep > 0, KeepNothingSnafu { app: &self.app });
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Pruned {
    pub id: String,
    pub name: String,
    pub created: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Kept {
    pub id: String,
    pub name: String,
    pub created: String,
    /// Why, as `one of the newest 3`, `younger than 30days`, `group hello-prod-v004 (serving)`.
    pub reasons: Vec<String>,
}

#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub app: String,
    pub dry_run: bool,
    /// Deleted, or to be deleted on a dry run.
    pub deleted: Vec<Pruned>,
    pub kept: Vec<Kept>,
    /// Images of serving groups given deregistration protection (aws).
    pub protected: Vec<String>,
    /// Images kept only because something uses them, marked deprecated (aws).
    pub deprecated: Vec<String>,
    /// Images whose deletion (or marking) failed; the others went on.
    pub failed: Vec<String>,
}

/// Which of `images` go and which stay (and why): the pure part of a prune. The newest are
/// those with the latest creation time; one whose time cannot be read is kept and counts for
/// none of the newest.
pub fn plan(
    images: Vec<Image>,
    keep: usize,
    older_than: Option<Duration>,
    now: u64,
    references: &[ImageReference],
) -> (Vec<Image>, Vec<(Image, Vec<String>)>) {
    let mut dated: Vec<(Option<u64>, Image)> = images.into_iter().map(|i| (created_secs(&i.created), i)).collect();
    // Newest first, the unreadable last.
    dated.sort_by(|(a, x), (b, y)| b.is_some().cmp(&a.is_some()).then(b.cmp(a)).then_with(|| y.id.cmp(&x.id)));
    let mut used: BTreeMap<&str, Vec<String>> = BTreeMap::new();
    for reference in references {
        used.entry(reference.image_id.as_str()).or_default().push(reference.by.clone());
    }
    let (mut gone, mut kept) = (Vec::new(), Vec::new());
    for (rank, (created, image)) in dated.into_iter().enumerate() {
        let mut reasons = Vec::new();
        match created {
            None => reasons.push(format!("its creation time {:?} is unreadable", image.created)),
            Some(_) if rank < keep => reasons.push(format!("one of the newest {keep}")),
            _ => {}
        }
        if let (Some(age), Some(created)) = (older_than, created) {
            if now.saturating_sub(created) < age.as_secs() {
                reasons.push(format!("younger than {}", humantime::format_duration(age)));
            }
        }
        // A copy elsewhere, or an account it is shared with, may run it: nothing here can tell.
        if let Some(copies) = image.tags.get(tags::COPIES).filter(|c| !c.is_empty()) {
            reasons.push(format!("copied to other regions ({copies}), which may run it"));
        }
        reasons.extend(used.get(image.id.as_str()).cloned().unwrap_or_default());
        match reasons.is_empty() {
            true => gone.push(image),
            false => kept.push((image, reasons)),
        }
    }
    (gone, kept)
}

fn created_secs(created: &str) -> Option<u64> {
    let at = humantime::parse_rfc3339_weak(created.trim_end_matches('Z')).ok()?;
    at.duration_since(std::time::UNIX_EPOCH).ok().map(|d| d.as_secs())
}

pub fn prune(provider: &dyn Provider, cloud: &dyn Cloud, request: &Request) -> Result<Report> {
    request.check()?;
    let images = provider.images().images_tagged("app", &request.app).context(ListSnafu { app: &request.app })?;
    let references = cloud.image_references().context(ReferencesSnafu { kind: cloud.kind() })?;
    let now = crate::ids::unix_now();
    let (candidates, mut kept) = plan(images, request.keep, request.older_than, now, &references);
    let registry = provider.images();
    // Another account may run a shared image: nothing here can tell, so it stays.
    let mut gone = Vec::new();
    for image in candidates {
        let accounts = registry.shared_with(&image.id).context(ListSnafu { app: &request.app })?;
        match accounts.is_empty() {
            true => gone.push(image),
            false => {
                let reason = format!("shared with {}, which may run it", accounts.join(", "));
                kept.push((image, vec![reason]));
            }
        }
    }
    let mut report = Report { app: request.app.clone(), dry_run: request.dry_run, ..Report::default() };
    for (image, reasons) in kept {
        let used_by = references.iter().filter(|r| r.image_id == image.id);
        let serving = used_by.clone().any(|r| r.serving);
        // Deprecated only when nothing but its use keeps it.
        let only_used = used_by.count() == reasons.len();
        if !request.dry_run {
            let marked = match (serving, only_used) {
                // Serving again after a rollback: no longer deprecated either.
                (true, _) => registry
                    .protect_image(&image.id, true)
                    .and_then(|()| registry.deprecate_image(&image.id, false))
                    .map(|()| report.protected.push(image.id.clone())),
                (false, true) => {
                    registry.deprecate_image(&image.id, true).map(|()| report.deprecated.push(image.id.clone()))
                }
                _ => Ok(()),
            };
            if let Err(error) = marked {
                report.failed.push(format!("{}: {error}", image.id));
            }
        }
        report.kept.push(Kept { id: image.id, name: image.name, created: image.created, reasons });
    }
    for image in gone {
        if !request.dry_run {
            // Unused now: a protection from when it served comes off first.
            let deleted = registry.protect_image(&image.id, false).and_then(|()| provider.delete_image(&image.id));
            if let Err(error) = deleted {
                tracing::error!(image = %image.id, %error, "could not delete an image");
                report.failed.push(format!("{}: {error}", image.id));
                continue;
            }
        }
        report.deleted.push(Pruned { id: image.id, name: image.name, created: image.created });
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(id: &str, created: &str) -> Image {
        Image {
            id: id.into(),
            name: format!("hello-{id}"),
            description: String::new(),
            snapshot_id: format!("snap-{id}"),
            volume_size: 0,
            architecture: "x86_64".into(),
            root_device_name: "/dev/xvda".into(),
            created: created.into(),
            tags: BTreeMap::new(),
        }
    }

    #[test]
    fn the_newest_the_young_and_the_used_stay() {
        let now = created_secs("2026-12-01T00:00:00Z").unwrap();
        let tagged = |id: &str, key: &str, value: &str| {
            let mut image = image(id, "2026-01-01T00:00:00Z");
            image.tags.insert(key.into(), value.into());
            image
        };
        let images = vec![
            tagged("g", tags::COPIES, "eu-west-1=ami-1"),
            image("a", "2026-01-01T00:00:00Z"),
            image("b", "2026-02-01T00:00:00.000Z"),
            image("c", "2026-03-01T00:00:00Z"),
            image("d", "2026-11-20T00:00:00Z"),
            image("e", "2026-11-30T00:00:00Z"),
            image("f", "garbled"),
        ];
        let references = [
            ImageReference::new("b", "launch template lt-1 version 2".into()),
            ImageReference::new("c", "instance i-1 (stopped)".into()),
        ];
        let month = Duration::from_secs(30 * 86_400);
        let (gone, kept) = plan(images, 1, Some(month), now, &references);
        assert_eq!(gone.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), ["a"]);
        let why: BTreeMap<&str, Vec<String>> = kept.iter().map(|(i, r)| (i.id.as_str(), r.clone())).collect();
        assert_eq!(why["f"], ["its creation time \"garbled\" is unreadable"], "kept, and not one of the newest");
        assert_eq!(why["e"], ["one of the newest 1", "younger than 30days"]);
        assert_eq!(why["d"], ["younger than 30days"]);
        assert_eq!(why["c"], ["instance i-1 (stopped)"]);
        assert_eq!(why["b"], ["launch template lt-1 version 2"]);
        assert!(why["g"][0].starts_with("copied to other regions (eu-west-1=ami-1)"), "{why:?}");
        let (gone, _) =
            plan(vec![image("a", "2026-01-01T00:00:00Z"), image("b", "2026-02-01T00:00:00Z")], 1, None, now, &[]);
        assert_eq!(gone.iter().map(|i| i.id.as_str()).collect::<Vec<_>>(), ["a"], "the older goes");
    }
}

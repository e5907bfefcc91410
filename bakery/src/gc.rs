//! `bakery gc`: finishes the undo of bakes that died (their journals are unlocked) and of
//! handed-over journals whose process is gone (a launcher's instance or balancer), then sweeps
//! what no live journal names: first on this host (mounts and loop devices under the state
//! directory, scratch files), then in the provider's volume backend (volumes, snapshots, blocks,
//! and in a cloud, what dead bakes left there). Live ones are never touched.

use crate::journal::{self, Resource};
use crate::provider::{GcReport, Provider};
use crate::{loopdev, mounts};
use snafu::{ResultExt, Snafu};
use std::fs;
use std::path::{Path, PathBuf};

#[derive(Debug, Snafu)]
pub enum Error {
    #[snafu(display("reading bake journals: {source}"))]
    Census { source: journal::Error },

    #[snafu(display("sweeping orphans: {source}"))]
    Sweep { source: crate::provider::Error },

    #[snafu(display("sweeping {}: {source}", path.display()))]
    Host { path: PathBuf, source: std::io::Error },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Host scratch directories of a state directory: bake mounts, build scratch, instances.
const SCRATCH: [&str; 3] = ["mnt", "tmp", "instances"];

pub fn collect(provider: &dyn Provider, state_dir: &Path, dry_run: bool) -> Result<GcReport> {
    // Taken before the census: while we hold it, no bake can start.
    let sweep = journal::try_lock_sweep(state_dir).context(CensusSnafu)?;
    let census = journal::census(state_dir).context(CensusSnafu)?;
    let mut report = GcReport::default();
    for (record, path, _lock) in census.dead.iter().filter(|(record, _, _)| record.provider == provider.kind()) {
        if !dry_run {
            // One journal that cannot be undone must not stop the others from being reclaimed.
            if let Err(error) = journal::reclaim(provider, record, path) {
                tracing::error!(journal = %record.id, %error, "could not undo a dead bake; its journal stays");
                report.failed.push(format!("{}: {error}", record.id));
                continue;
            }
        }
        report
            .removed
            .extend(record.resources.iter().rev().map(|r| format!("{r} (from dead {} {})", record.what, record.id)));
    }
    // Orphans no journal names are only swept when nothing runs: a bake that is starting may
    // own a volume or blocks that no journal names yet.
    if let Some(_exclusive) = sweep {
        // No bake runs now, but handed-over journals (running instances) may be live.
        let live: Vec<Resource> = census.live.iter().flat_map(|r| r.resources.iter().cloned()).collect();
        report.removed.extend(sweep_host(state_dir, dry_run, &live)?);
        report.merge(provider.collect_garbage(dry_run, &live).context(SweepSnafu)?);
    }
    report.kept_live.extend(census.live.iter().map(|r| {
        let pid = r.held_by.map_or(r.pid as i32, |p| p.pid);
        format!("live {} {} (pid {pid})", r.what, r.id)
    }));
    Ok(report)
}

/// Mounts under the scratch directories, then loop devices on files of the state directory (but
/// not the copy-on-write pool's), then scratch files: the reverse of creation.
fn sweep_host(state_dir: &Path, dry_run: bool, live: &[Resource]) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let spared = |path: &Path| live.iter().any(|resource| resource.holds(path));
    let scratch: Vec<PathBuf> = SCRATCH.iter().map(|dir| state_dir.join(dir)).collect();
    for prefix in &scratch {
        for point in mounts::mounted_under(prefix).into_iter().filter(|p| !spared(p)) {
            if !dry_run {
                mounts::unmount_tree(&point).map_err(|e| Error::Sweep { source: e.into() })?;
            }
            removed.push(format!("mount {}", point.display()));
        }
    }
    let pool = crate::blockstore::pool::pool_file(state_dir);
    let ours = |file: &Path| file.starts_with(state_dir) && file != pool;
    for (device, file) in loopdev::list().into_iter().filter(|(device, file)| ours(file) && !spared(device)) {
        if !dry_run {
            loopdev::detach_if_backed_by(&device, &file).map_err(|e| Error::Sweep { source: e.into() })?;
        }
        removed.push(format!("loop device {} ({})", device.display(), file.display()));
    }
    for prefix in &scratch {
        let entries = match fs::read_dir(prefix) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            other => other.map_err(|source| Error::Host { path: prefix.clone(), source })?,
        };
        for entry in entries.flatten().filter(|e| !spared(&e.path())) {
            let path = entry.path();
            if !dry_run {
                let result = if path.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
                result.map_err(|source| Error::Host { path: path.clone(), source })?;
            }
            removed.push(format!("leftover {}", path.display()));
        }
    }
    // No journal is open while the sweep lock is ours: a temporary copy beside one is a killed
    // save's (reclaim removes those of journals it finds; this also gets a bake killed mid-begin).
    let journals = journal::journal_dir(state_dir);
    for entry in fs::read_dir(&journals).into_iter().flatten().flatten() {
        let path = entry.path();
        if crate::atomic::is_temporary(&path) {
            if !dry_run {
                fs::remove_file(&path).map_err(|source| Error::Host { path: path.clone(), source })?;
            }
            removed.push(format!("leftover {}", path.display()));
        }
    }
    Ok(removed)
}

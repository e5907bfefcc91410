//! `bakery gc`: finishes the undo of bakes that died (their journals are unlocked) and of
//! handed-over journals whose process is gone (a launcher's instance or balancer), then asks the
//! provider to sweep what no live journal names. Live ones are never touched.

use crate::journal;
use crate::provider::{GcReport, Provider};
use snafu::{ResultExt, Snafu};
use std::path::Path;

#[derive(Debug, Snafu)]
pub enum Error {
    #[snafu(display("reading bake journals: {source}"))]
    Census { source: journal::Error },

    #[snafu(display("sweeping orphans: {source}"))]
    Sweep { source: crate::provider::Error },
}

pub type Result<T> = std::result::Result<T, Error>;

pub fn collect(provider: &dyn Provider, state_dir: &Path, dry_run: bool) -> Result<GcReport> {
    // Taken before the census: while we hold it, no bake can start.
    let sweep = journal::try_lock_sweep(state_dir).context(CensusSnafu)?;
    let census = journal::census(state_dir).context(CensusSnafu)?;
    let mut removed = Vec::new();
    let mut failed = Vec::new();
    for (record, path, _lock) in census.dead.iter().filter(|(record, _, _)| record.provider == provider.kind()) {
        if !dry_run {
            // One journal that cannot be undone must not stop the others from being reclaimed.
            if let Err(error) = journal::reclaim(provider, record, path) {
                tracing::error!(journal = %record.id, %error, "could not undo a dead bake; its journal stays");
                failed.push(format!("{}: {error}", record.id));
                continue;
            }
        }
        removed.extend(record.resources.iter().rev().map(|r| format!("{r} (from dead {} {})", record.what, record.id)));
    }
    // Orphans no journal names are only swept when nothing runs: a bake that is starting may
    // own a volume or blocks that no journal names yet.
    let mut report = match sweep {
        Some(_exclusive) => {
            // No bake runs now, but handed-over journals (running instances) may be live.
            let live: Vec<_> = census.live.iter().flat_map(|r| r.resources.iter().cloned()).collect();
            provider.collect_garbage(dry_run, &live).context(SweepSnafu)?
        }
        None => GcReport::default(),
    };
    removed.append(&mut report.removed);
    report.removed = removed;
    report.kept_live.extend(census.live.iter().map(|r| {
        let pid = r.held_by.map_or(r.pid as i32, |p| p.pid);
        format!("live {} {} (pid {pid})", r.what, r.id)
    }));
    report.failed = failed;
    Ok(report)
}

//! `bakery gc`: finishes the undo of bakes that died (their journals are unlocked), then asks
//! the provider to sweep what no journal names. Live bakes are never touched.

use crate::journal;
use crate::provider::{GcReport, Provider};
use snafu::{ResultExt, Snafu};
use std::path::Path;

#[derive(Debug, Snafu)]
pub enum Error {
    #[snafu(display("reading bake journals: {source}"))]
    Census { source: journal::Error },

    #[snafu(display("undoing dead bake {id}: {source}"))]
    Reclaim { id: String, source: journal::Error },

    #[snafu(display("sweeping orphans: {source}"))]
    Sweep { source: crate::provider::Error },
}

pub type Result<T> = std::result::Result<T, Error>;

pub fn collect(provider: &dyn Provider, state_dir: &Path, dry_run: bool) -> Result<GcReport> {
    let census = journal::census(state_dir).context(CensusSnafu)?;
    let mut removed = Vec::new();
    for (record, path) in census.dead.iter().filter(|(record, _)| record.provider == provider.kind()) {
        if !dry_run {
            journal::reclaim(provider, record, path).context(ReclaimSnafu { id: &record.id })?;
        }
        removed.extend(record.resources.iter().rev().map(|r| format!("{r} (from dead {} {})", record.what, record.id)));
    }
    let live: Vec<String> = census.live.iter().map(|record| record.id.clone()).collect();
    let mut report = provider.collect_garbage(&live, dry_run).context(SweepSnafu)?;
    removed.append(&mut report.removed);
    report.removed = removed;
    report.kept_live.extend(census.live.iter().map(|r| format!("live {} {} (pid {})", r.what, r.id, r.pid)));
    Ok(report)
}

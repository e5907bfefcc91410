//! `bakery gc --provider aws`: what no journal names, in the mirror and in the cloud. Mirrors
//! of snapshots that were deleted go first (their blocks and disks follow), then volumes tagged
//! with a bake id and snapshots still tagged in-progress, once older than `--older-than`
//! (younger ones may belong to a bake on another host).

use super::ec2::Ec2;
use super::host::Identity;
use super::mirror::Mirror;
use crate::journal::Resource;
use crate::provider::{GcReport, Result, VolumeBackend};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use tokio::runtime::Runtime;

pub struct Sweep {
    pub ec2: Ec2,
    pub runtime: Arc<Runtime>,
    pub older_than: Duration,
    /// On an EC2 host, a dead bake's volume may still be attached here.
    pub host: Option<Identity>,
}

impl Sweep {
    pub fn collect(&self, mirror: &Mirror, dry_run: bool, live: &[Resource]) -> Result<GcReport> {
        let store = mirror.volumes.store();
        let mut kept = BTreeSet::new();
        let mut evicted = Vec::new();
        for id in store.snapshot_ids()? {
            if self.runtime.block_on(self.ec2.snapshot_exists(&id))? {
                kept.insert(id);
                continue;
            }
            if !dry_run {
                store.delete_snapshot(&id)?;
            }
            evicted.push(format!("cached mirror of deleted snapshot {id}"));
        }
        let mut report = mirror.volumes.collect_garbage(dry_run, live, &kept)?;
        report.removed.extend(evicted);
        self.sweep_cloud(dry_run, live, &mut report)?;
        Ok(report)
    }

    fn sweep_cloud(&self, dry_run: bool, live: &[Resource], report: &mut GcReport) -> Result<()> {
        let cutoff = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_sub(self.older_than)
            .as_secs() as i64;
        let live: BTreeSet<&str> = live
            .iter()
            .filter_map(|r| match r {
                Resource::Volume { id } | Resource::Snapshot { id } => Some(id.as_str()),
                _ => None,
            })
            .collect();
        let ec2 = &self.ec2;
        self.runtime.block_on(async {
            let volumes = ec2.bake_volumes().await?.into_iter().map(|(id, bake, created)| (id, bake, created, true));
            let snapshots =
                ec2.unfinished_snapshots().await?.into_iter().map(|(id, bake, created)| (id, bake, created, false));
            for (id, bake, created, is_volume) in volumes.chain(snapshots) {
                let what =
                    if is_volume { format!("volume {id} of bake {bake}") } else { format!("unfinished snapshot {id}") };
                if created > cutoff || live.contains(id.as_str()) {
                    report.kept_live.push(format!("{what} (younger than --older-than, or a live bake's)"));
                    continue;
                }
                if !dry_run {
                    let removed = match is_volume {
                        true => {
                            if let Some(host) = &self.host {
                                let _ = ec2.detach(&id, &host.instance_id).await;
                            }
                            ec2.delete_volume(&id).await
                        }
                        false => ec2.delete_snapshot(&id).await,
                    };
                    // One resource that cannot go must not keep gc from the others.
                    if let Err(error) = removed {
                        report.failed.push(format!("{what}: {error}"));
                        continue;
                    }
                }
                report.removed.push(what);
            }
            Ok::<_, crate::provider::Error>(())
        })
    }
}

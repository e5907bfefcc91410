//! Direct mode (any Linux host): volumes are loop volumes over the [`Mirror`] of the base
//! snapshot, and a snapshot uploads only the blocks that differ from the base into a child EBS
//! snapshot (`ParentSnapshotId`) with the EBS direct APIs.

use super::ebs::Upload;
use super::ec2::Ec2;
use super::mirror::{in_progress_tags, Mirror, Uploader};
use super::sweep::Sweep;
use crate::blockstore::store::SnapshotManifest;
use crate::journal::Resource;
use crate::provider::{GcReport, Progress, Result, SnapshotResult, VolumeBackend};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

pub struct DirectVolumes {
    pub mirror: Mirror,
    pub uploader: Uploader,
    pub sweep: Sweep,
}

impl DirectVolumes {
    fn ec2(&self) -> &Ec2 {
        &self.uploader.ec2
    }
}

/// Block indexes where `child` differs from `base`, blocks that became zero included.
fn changed_blocks(child: &SnapshotManifest, base: Option<&SnapshotManifest>) -> Vec<u64> {
    let empty = BTreeMap::new();
    let base_blocks = base.map_or(&empty, |b| &b.blocks);
    let changed: BTreeSet<u64> = child
        .blocks
        .iter()
        .filter(|(i, h)| base_blocks.get(i) != Some(h))
        .map(|(i, _)| *i)
        .chain(base_blocks.keys().filter(|i| !child.blocks.contains_key(i)).copied())
        .collect();
    changed.into_iter().collect()
}

impl VolumeBackend for DirectVolumes {
    fn create_volume(&self, snapshot_id: &str, bake_id: &str) -> Result<String> {
        self.mirror.ensure(snapshot_id)?;
        self.mirror.volumes.create_volume(snapshot_id, bake_id)
    }

    fn attach_volume(&self, volume_id: &str) -> Result<PathBuf> {
        self.mirror.volumes.attach_volume(volume_id)
    }

    fn detach_volume(&self, volume_id: &str, device: &Path) -> Result<()> {
        self.mirror.volumes.detach_volume(volume_id, device)
    }

    fn delete_volume(&self, volume_id: &str) -> Result<()> {
        self.mirror.volumes.delete_volume(volume_id)
    }

    fn snapshot_volume(
        &self,
        volume_id: &str,
        parent: Option<&str>,
        description: &str,
        cancel: &AtomicBool,
        progress: Progress,
    ) -> Result<SnapshotResult> {
        // The local snapshot says which blocks differ from the base; only those are uploaded.
        let volumes = &self.mirror.volumes;
        let local = volumes.snapshot_manifest(volume_id, parent, description, cancel, progress)?;
        let store = volumes.store();
        let local_id = local.id.clone();
        let result = (|| -> Result<SnapshotResult> {
            let base = parent.map(|p| store.snapshot(p)).transpose()?;
            let upload = Upload {
                parent: parent.map(str::to_string),
                volume_size: local.volume_size,
                description: description.to_string(),
                client_token: local.id.clone(),
                tags: in_progress_tags(),
                kms_key: self.uploader.kms_key.clone(),
                blocks: changed_blocks(&local, base.as_ref()),
                skip_zero: parent.is_none(),
            };
            let uploaded = self.uploader.upload(&volumes.volume_file(volume_id), upload, cancel, progress)?;
            // Keep the result in the mirror under its EBS id: a bake on top of this image, or
            // an export of it, then downloads nothing.
            let volume_size = local.volume_size;
            store.save_snapshot(&SnapshotManifest { id: uploaded.snapshot_id.clone(), ..local })?;
            Ok(SnapshotResult {
                id: uploaded.snapshot_id,
                volume_size,
                changed_blocks: uploaded.blocks,
                stored_bytes: uploaded.bytes,
            })
        })();
        if let Err(error) = store.delete_snapshot(&local_id) {
            tracing::warn!(snapshot = %local_id, %error, "could not remove the local snapshot record; gc will");
        }
        result
    }

    fn import_disk(
        &self,
        path: &Path,
        description: &str,
        cancel: &AtomicBool,
        progress: Progress,
    ) -> Result<SnapshotResult> {
        self.uploader.import_disk(path, description, cancel, progress)
    }

    fn delete_snapshot(&self, snapshot_id: &str) -> Result<()> {
        self.mirror.volumes.forget_snapshot(snapshot_id)?;
        Ok(self.uploader.runtime.block_on(self.ec2().delete_snapshot(snapshot_id))?)
    }

    fn export_snapshot(&self, snapshot_id: &str, out: &Path, cancel: &AtomicBool) -> Result<()> {
        self.mirror.ensure(snapshot_id)?;
        self.mirror.volumes.export_snapshot(snapshot_id, out, cancel)
    }

    fn collect_garbage(&self, dry_run: bool, live: &[Resource], _registered: &BTreeSet<String>) -> Result<GcReport> {
        self.sweep.collect(&self.mirror, dry_run, live)
    }
}

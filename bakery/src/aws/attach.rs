//! Attach mode (on an EC2 host, as Aminator does): a real EBS volume from the base snapshot,
//! attached to this instance under a host-wide device lock; the snapshot is taken by EC2.

use super::ec2::{self, Ec2};
use super::host::{self, Identity};
use super::mirror::{in_progress_tags, Mirror, Uploader};
use super::sweep::Sweep;
use crate::journal::Resource;
use crate::provider::{GcReport, Progress, Result, SnapshotResult, VolumeBackend};
use crate::tags;
use snafu::{OptionExt, ResultExt, Snafu};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Duration;

#[derive(Debug, Snafu)]
pub enum Error {
    #[snafu(display("no free device name under /dev/sd[f-p] on this instance"))]
    NoFreeDevice,

    #[snafu(display("volume {volume} is attached as {device} but no such block device appeared"))]
    DeviceMissing { volume: String, device: String },

    #[snafu(display("locking device names: {source}"))]
    DeviceLock { source: std::io::Error },
}

pub struct AttachedVolumes {
    pub host: Identity,
    /// For exports.
    pub mirror: Mirror,
    pub uploader: Uploader,
    pub sweep: Sweep,
}

impl AttachedVolumes {
    fn ec2(&self) -> &Ec2 {
        &self.uploader.ec2
    }

    fn block_on<T>(&self, future: impl std::future::Future<Output = T>) -> T {
        self.uploader.runtime.block_on(future)
    }
}

impl VolumeBackend for AttachedVolumes {
    fn create_volume(&self, snapshot_id: &str, bake_id: &str) -> Result<String> {
        let mut tags = in_progress_tags();
        tags.insert(tags::BAKE_ID.to_string(), bake_id.to_string());
        tags.insert("Name".to_string(), format!("bakery {bake_id}"));
        let kms = self.uploader.kms_key.as_deref();
        let id = self.block_on(self.ec2().create_volume(snapshot_id, &self.host.zone, kms, &tags, bake_id))?;
        if let Err(error) = self.block_on(self.ec2().wait_volume(&id, "available")) {
            // The journal learns of the volume only when this returns.
            let _ = self.block_on(self.ec2().delete_volume(&id));
            return Err(error.into());
        }
        Ok(id)
    }

    fn attach_volume(&self, volume_id: &str) -> Result<PathBuf> {
        let instance = &self.host.instance_id;
        let _devices = host::lock_devices().context(DeviceLockSnafu)?;
        let in_use: BTreeSet<String> = self.block_on(self.ec2().attached_devices(instance))?;
        let device = host::free_device(&in_use).context(NoFreeDeviceSnafu)?;
        let attached = self.block_on(self.ec2().attach(volume_id, instance, &device)).map_err(Into::into);
        let found = attached.and_then(|()| {
            let appeared = self.block_on(ec2::wait_for(
                &format!("volume {volume_id} appearing as a block device"),
                Duration::from_secs(120),
                || async { Ok(host::find_device(volume_id, &device)) },
            ));
            appeared.map_err(|_| Error::DeviceMissing { volume: volume_id.to_string(), device: device.clone() }.into())
        });
        if found.is_err() {
            // The journal records the attachment only once this returns: undo it here.
            let _ = self.block_on(self.ec2().detach(volume_id, instance));
        }
        found
    }

    /// gc on this host opens attach mode for every dead journal, a direct-mode bake's too: its
    /// volume is a loop device on the mirror's store. Both undos are no-ops on the other kind.
    fn detach_volume(&self, volume_id: &str, device: &Path) -> Result<()> {
        self.mirror.volumes.detach_volume(volume_id, device)?;
        Ok(self.block_on(self.ec2().detach(volume_id, &self.host.instance_id))?)
    }

    /// Only volumes a journal names reach here (the bake's own, or a dead bake's): an EBS one
    /// still attached anywhere is detached first; a direct-mode bake's goes from the store.
    fn delete_volume(&self, volume_id: &str) -> Result<()> {
        self.mirror.volumes.delete_volume(volume_id)?;
        Ok(self.block_on(self.ec2().detach_and_delete_volume(volume_id))?)
    }

    /// EC2 takes the snapshot, so its changed blocks are not counted here.
    fn snapshot_volume(
        &self,
        volume_id: &str,
        _parent: Option<&str>,
        description: &str,
        _cancel: &AtomicBool,
        _progress: Progress,
    ) -> Result<SnapshotResult> {
        let id = self.block_on(self.ec2().create_snapshot(volume_id, description, &in_progress_tags()))?;
        if let Err(error) = self.block_on(self.ec2().wait_snapshot_completed(&id)) {
            let _ = self.block_on(self.ec2().delete_snapshot(&id));
            return Err(error.into());
        }
        Ok(SnapshotResult { id, volume_size: 0, changed_blocks: 0, stored_bytes: 0 })
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
        Ok(self.block_on(self.ec2().delete_snapshot(snapshot_id))?)
    }

    fn export_snapshot(&self, snapshot_id: &str, out: &Path, cancel: &AtomicBool) -> Result<()> {
        self.mirror.ensure(snapshot_id)?;
        self.mirror.volumes.export_snapshot(snapshot_id, out, cancel)
    }

    fn collect_garbage(&self, dry_run: bool, live: &[Resource], _registered: &BTreeSet<String>) -> Result<GcReport> {
        self.sweep.collect(&self.mirror, dry_run, live)
    }
}

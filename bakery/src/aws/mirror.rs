//! EBS snapshots on this host, over the EBS direct APIs: the [`Mirror`] copies a snapshot's
//! blocks into the block store once per snapshot id (direct-mode volumes are loop volumes over
//! it, and exports read it); the [`Uploader`] sends blocks of a local file
//! into a new EBS snapshot (direct-mode bakes and `bakery push`).

use super::ebs::{self, Ebs, Upload};
use super::ec2::Ec2;
use crate::blockstore::{self, Volumes, BLOCK_SIZE};
use crate::provider::{Progress, Result, SnapshotResult};
use crate::tags;
use snafu::{ResultExt, Snafu};
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use tokio::runtime::Runtime;

#[derive(Debug, Snafu)]
pub enum Error {
    #[snafu(display("opening {}: {source}", path.display()))]
    Open { path: PathBuf, source: std::io::Error },

    #[snafu(display("locking the mirror of {}: {source}", path.display()))]
    MirrorLock { path: PathBuf, source: std::io::Error },
}

/// Tags of a snapshot until the image that owns it is registered.
pub fn in_progress_tags() -> BTreeMap<String, String> {
    BTreeMap::from([(tags::STATUS.to_string(), "in-progress".to_string())])
}

pub struct Mirror {
    pub volumes: Volumes,
    ebs: Ebs,
    runtime: Arc<Runtime>,
    locks: PathBuf,
    cancel: Arc<AtomicBool>,
}

impl Mirror {
    /// The mirror of one region's snapshots: blocks under `STATE/aws/REGION`, volumes and cached
    /// disks on the state directory's copy-on-write filesystem.
    pub fn open(
        state_dir: &Path,
        region: &str,
        ebs: Ebs,
        runtime: Arc<Runtime>,
        cancel: Arc<AtomicBool>,
    ) -> Result<Mirror> {
        let store_dir = state_dir.join("aws").join(region);
        let cow_dir = blockstore::pool::cow_dir(state_dir).join("aws").join(region);
        let volumes = Volumes::open(&store_dir, &cow_dir)?;
        let locks = cow_dir.join("cache");
        Ok(Mirror { volumes, ebs, runtime, locks, cancel })
    }

    /// The snapshot's blocks in the block store, downloaded the first time only.
    pub fn ensure(&self, snapshot_id: &str) -> Result<()> {
        let path = self.locks.join(format!("{snapshot_id}.mirror.lock"));
        let lock = File::create(&path).context(MirrorLockSnafu { path: &path })?;
        let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| std::io::Error::from(e))
            .context(MirrorLockSnafu { path })?;
        if self.volumes.store().snapshot(snapshot_id).is_ok() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let store = self.volumes.store();
        let manifest = self.runtime.block_on(self.ebs.mirror(store, snapshot_id, &self.cancel, &|_, _| {}))?;
        tracing::info!(snapshot = snapshot_id, blocks = manifest.blocks.len(), elapsed = ?started.elapsed(), "mirrored the snapshot's blocks");
        Ok(())
    }
}

/// Uploads into new EBS snapshots, deleting a started snapshot again when anything fails.
pub struct Uploader {
    pub ebs: Ebs,
    pub ec2: Ec2,
    pub runtime: Arc<Runtime>,
    pub kms_key: Option<String>,
}

impl Uploader {
    /// Uploads `upload.blocks` of `path` and waits for the snapshot to complete.
    pub fn upload(
        &self,
        path: &Path,
        upload: Upload,
        cancel: &AtomicBool,
        progress: Progress,
    ) -> Result<ebs::Uploaded> {
        let file = Arc::new(File::open(path).context(OpenSnafu { path })?);
        let result = self.runtime.block_on(async {
            let uploaded = self.ebs.upload(file, path.to_path_buf(), upload, cancel, progress).await;
            let uploaded = uploaded.map_err(|(started, error)| (started, crate::provider::Error::from(error)))?;
            match self.ec2.wait_snapshot_completed(&uploaded.snapshot_id).await {
                Ok(()) => Ok(uploaded),
                Err(error) => Err((Some(uploaded.snapshot_id), error.into())),
            }
        });
        result.map_err(|(started, error)| {
            if let Some(snapshot) = started {
                if let Err(cleanup) = self.runtime.block_on(self.ec2.delete_snapshot(&snapshot)) {
                    tracing::error!(%snapshot, %cleanup, "could not delete the unfinished snapshot; `bakery gc --provider aws` will");
                }
            }
            error
        })
    }

    /// A whole raw disk as a new snapshot. Holes are never read: a 4 GiB disk with 700 MB of
    /// data costs 700 MB of reading.
    pub fn import_disk(
        &self,
        path: &Path,
        description: &str,
        cancel: &AtomicBool,
        progress: Progress,
    ) -> Result<SnapshotResult> {
        let file = File::open(path).context(OpenSnafu { path })?;
        let size = file.metadata().context(OpenSnafu { path })?.len();
        let blocks = blockstore::sparse::data_blocks(&file, BLOCK_SIZE as u64)?.without_parent().to_read;
        let upload = Upload {
            parent: None,
            volume_size: size,
            description: description.to_string(),
            client_token: crate::ids::new_id("push"),
            tags: in_progress_tags(),
            kms_key: self.kms_key.clone(),
            blocks,
            skip_zero: true,
        };
        let uploaded = self.upload(path, upload, cancel, progress)?;
        Ok(SnapshotResult {
            id: uploaded.snapshot_id,
            volume_size: size,
            changed_blocks: uploaded.blocks,
            stored_bytes: uploaded.bytes,
        })
    }
}

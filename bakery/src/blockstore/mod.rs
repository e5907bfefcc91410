//! The block store and the loop-backed volumes on it, shared by every provider that bakes on
//! this host (`local`, and `aws` in direct mode, whose mirror of an EBS snapshot lives here):
//! - [`store`]: a content-addressed store of 512 KiB blocks (the EBS block size) and the
//!   snapshot manifests that map block indexes to them;
//! - [`sparse`]: sparse files, reflink clones and extent maps;
//! - [`pool`]: the copy-on-write filesystem volumes live on, set up by itself where the state
//!   directory cannot reflink;
//! - [`Volumes`]: volumes as sparse files (O(1) clones of their snapshot's cached image where
//!   the filesystem can reflink) attached as loop devices, snapshotted into the store.

pub mod pool;
pub mod sparse;
pub mod store;

use crate::journal::Resource;
use crate::loopdev;
use crate::provider::{GcReport, Progress, Result, SnapshotResult, VolumeBackend};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use store::{ChangeHint, SnapshotManifest, Store};

pub use store::BLOCK_SIZE;

#[derive(Debug, snafu::Snafu)]
pub enum Error {
    #[snafu(display("block store I/O on {}: {source}", path.display()))]
    Io { path: PathBuf, source: std::io::Error },

    #[snafu(display("volume {id} does not exist"))]
    NoSuchVolume { id: String },
}

fn io<T>(path: &Path, result: std::io::Result<T>) -> std::result::Result<T, Error> {
    result.map_err(|source| Error::Io { path: path.to_path_buf(), source })
}

/// What is known about a volume beyond its bytes.
#[derive(Debug, Serialize, Deserialize)]
struct VolumeMeta {
    id: String,
    snapshot_id: String,
    bake_id: String,
    /// Cloned from the snapshot's cached image, so FIEMAP can find the changed extents.
    reflinked: bool,
}

/// Loop-backed volumes over a block store: `<store>/blocks`, `<store>/snapshots`, and on the
/// copy-on-write filesystem `<cow>/volumes` and `<cow>/cache` (snapshots materialised once as
/// whole disks, cloned into volumes).
pub struct Volumes {
    store: Store,
    volumes: PathBuf,
    cache: PathBuf,
}

impl Volumes {
    /// `store_dir` holds blocks and manifests; `cow_dir` (see [`pool::cow_dir`]) volumes and
    /// cached disks, which must share a filesystem for clones to be O(1).
    pub fn open(store_dir: &Path, cow_dir: &Path) -> Result<Volumes> {
        let volumes =
            Volumes { store: Store::open(store_dir)?, volumes: cow_dir.join("volumes"), cache: cow_dir.join("cache") };
        for dir in [&volumes.volumes, &volumes.cache] {
            io(dir, fs::create_dir_all(dir))?;
        }
        Ok(volumes)
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    /// A volume with a given id.
    fn create_volume_as(&self, id: &str, snapshot_id: &str, bake_id: &str) -> Result<()> {
        let manifest = self.store.snapshot(snapshot_id)?;
        let cached = self.cached_image(&manifest)?;
        let path = self.volume_file(id);
        // The record goes first (gc treats a volume file without one as an orphan), and is
        // rewritten once we know whether the clone shares extents with the cache.
        let mut meta = VolumeMeta {
            id: id.to_string(),
            snapshot_id: snapshot_id.to_string(),
            bake_id: bake_id.to_string(),
            reflinked: false,
        };
        let meta_path = path.with_extension("json");
        io(&meta_path, crate::atomic::write(&meta_path, &serde_json::to_vec(&meta)?))?;
        let source = io(&cached, File::open(&cached))?;
        let dest = io(&path, File::create_new(&path))?;
        meta.reflinked = sparse::clone_or_copy(&source, &dest)?;
        io(&path, dest.sync_all())?;
        io(&meta_path, crate::atomic::write(&meta_path, &serde_json::to_vec(&meta)?))?;
        let reflinked = meta.reflinked;
        tracing::info!(volume = %id, snapshot = snapshot_id, reflinked, "created volume");
        Ok(())
    }

    /// The file behind a volume.
    pub fn volume_file(&self, id: &str) -> PathBuf {
        self.volumes.join(format!("{id}.raw"))
    }

    fn volume_meta(&self, id: &str) -> std::result::Result<VolumeMeta, Error> {
        let path = self.volumes.join(format!("{id}.json"));
        let bytes = fs::read(&path).map_err(|_| Error::NoSuchVolume { id: id.to_string() })?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Io { path, source: e.into() })
    }

    /// The snapshot's blocks as one file, built once and shared read-only by the volumes and
    /// instances created from it (as clones where the filesystem can).
    pub fn cached_image(&self, manifest: &SnapshotManifest) -> Result<PathBuf> {
        let path = self.cache.join(format!("{}.raw", manifest.id));
        let lock_path = self.cache.join(format!("{}.lock", manifest.id));
        let lock_file = io(&lock_path, File::create(&lock_path))?;
        let _lock = Flock::lock(lock_file, FlockArg::LockExclusive).map_err(|(_, e)| e)?;
        if !path.exists() {
            let partial = self.cache.join(format!("{}.partial", manifest.id));
            let cancel = AtomicBool::new(false);
            // A baked image is its parent plus a few blocks: start from the parent's image.
            match manifest.parent.as_deref().map(|id| self.store.snapshot(id)) {
                Some(Ok(parent)) => {
                    let parent_path = self.cached_image(&parent)?;
                    self.store.materialize_over(manifest, (&parent, &parent_path), &partial, &cancel)?;
                }
                _ => self.store.materialize(manifest, &partial, &cancel)?,
            }
            io(&path, fs::rename(&partial, &path))?;
        }
        Ok(path)
    }

    /// Snapshots a file into the store (a new manifest over `parent`).
    fn snapshot_file(
        &self,
        path: &Path,
        parent: Option<&str>,
        hint: ChangeHint,
        description: &str,
        cancel: &AtomicBool,
        progress: Progress,
    ) -> Result<SnapshotManifest> {
        let parent = parent.map(|id| self.store.snapshot(id)).transpose()?;
        let (blocks, changed_blocks, stored_bytes) =
            self.store.snapshot_volume(path, parent.as_ref(), hint, cancel, progress)?;
        let manifest = SnapshotManifest {
            id: crate::ids::new_id("snap"),
            parent: parent.map(|p| p.id),
            volume_size: io(path, fs::metadata(path))?.len(),
            block_size: BLOCK_SIZE,
            created: crate::ids::now_rfc3339(),
            description: description.to_string(),
            changed_blocks,
            stored_bytes,
            tags: BTreeMap::new(),
            blocks,
        };
        self.store.save_snapshot(&manifest)?;
        Ok(manifest)
    }

    /// Snapshots a volume into the store and returns the manifest (for a caller that uploads it).
    pub fn snapshot_manifest(
        &self,
        volume_id: &str,
        parent: Option<&str>,
        description: &str,
        cancel: &AtomicBool,
        progress: Progress,
    ) -> Result<SnapshotManifest> {
        let meta = self.volume_meta(volume_id)?;
        let hint = match parent {
            Some(parent) if meta.reflinked && parent == meta.snapshot_id => ChangeHint::ReflinkedFromParent,
            _ => ChangeHint::None,
        };
        self.snapshot_file(&self.volume_file(volume_id), parent, hint, description, cancel, progress)
    }

    /// Removes a snapshot's manifest and cached disk; its blocks go at the next gc.
    pub fn forget_snapshot(&self, snapshot_id: &str) -> Result<()> {
        self.store.delete_snapshot(snapshot_id)?;
        match fs::remove_file(self.cache.join(format!("{snapshot_id}.raw"))) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.into()),
            _ => Ok(()),
        }
    }
}

fn result_of(manifest: SnapshotManifest) -> SnapshotResult {
    SnapshotResult {
        id: manifest.id,
        volume_size: manifest.volume_size,
        changed_blocks: manifest.changed_blocks,
        stored_bytes: manifest.stored_bytes,
    }
}

impl VolumeBackend for Volumes {
    fn create_volume(&self, snapshot_id: &str, bake_id: &str) -> Result<String> {
        let id = crate::ids::new_id("vol");
        self.create_volume_as(&id, snapshot_id, bake_id)?;
        Ok(id)
    }

    fn attach_volume(&self, volume_id: &str) -> Result<PathBuf> {
        self.volume_meta(volume_id)?;
        Ok(loopdev::attach(&self.volume_file(volume_id), false)?)
    }

    fn detach_volume(&self, volume_id: &str, device: &Path) -> Result<()> {
        Ok(loopdev::detach_if_backed_by(device, &self.volume_file(volume_id))?)
    }

    fn delete_volume(&self, volume_id: &str) -> Result<()> {
        let path = self.volume_file(volume_id);
        for file in [path.with_extension("json"), path] {
            match fs::remove_file(&file) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(Error::Io { path: file, source: e }.into())
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn snapshot_volume(
        &self,
        volume_id: &str,
        parent: Option<&str>,
        description: &str,
        cancel: &AtomicBool,
        progress: Progress,
    ) -> Result<SnapshotResult> {
        self.snapshot_manifest(volume_id, parent, description, cancel, progress).map(result_of)
    }

    fn import_disk(
        &self,
        path: &Path,
        description: &str,
        cancel: &AtomicBool,
        progress: Progress,
    ) -> Result<SnapshotResult> {
        self.snapshot_file(path, None, ChangeHint::None, description, cancel, progress).map(result_of)
    }

    fn delete_snapshot(&self, snapshot_id: &str) -> Result<()> {
        self.forget_snapshot(snapshot_id)
    }

    fn export_snapshot(&self, snapshot_id: &str, out: &Path, cancel: &AtomicBool) -> Result<()> {
        let manifest = self.store.snapshot(snapshot_id)?;
        Ok(self.store.materialize(&manifest, out, cancel)?)
    }

    /// Volume files no live journal holds, snapshots not in `keep`, cached disks of snapshots
    /// that are gone, unreferenced blocks and partial block writes. Loop devices on these files
    /// were detached by the host sweep before.
    fn collect_garbage(&self, dry_run: bool, live: &[Resource], keep: &BTreeSet<String>) -> Result<GcReport> {
        let mut report = GcReport::default();
        let mut note = |what: String| report.removed.push(what);
        let spared = |path: &Path| live.iter().any(|resource| resource.holds(path));
        for entry in io(&self.volumes, fs::read_dir(&self.volumes))?.flatten().filter(|e| !spared(&e.path())) {
            let path = entry.path();
            if !dry_run {
                io(&path, fs::remove_file(&path))?;
            }
            note(format!("leftover {}", path.display()));
        }

        let mut referenced = BTreeSet::new();
        for id in self.store.snapshot_ids()? {
            if keep.contains(&id) {
                referenced.extend(self.store.snapshot(&id)?.blocks.into_values());
            } else {
                if !dry_run {
                    self.store.delete_snapshot(&id)?;
                }
                note(format!("unregistered snapshot {id}"));
            }
        }
        // A cached disk (and its lock files) lives as long as its snapshot is kept.
        for entry in io(&self.cache, fs::read_dir(&self.cache))?.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let id = name.split('.').next().unwrap_or_default();
            if !keep.contains(id) && !spared(&path) {
                if !dry_run {
                    io(&path, fs::remove_file(&path))?;
                }
                note(format!("cache {}", path.display()));
            }
        }
        let mut unreferenced = 0;
        for hash in self.store.all_blocks()? {
            if !referenced.contains(&hash) {
                if !dry_run {
                    self.store.remove_block(&hash)?;
                }
                unreferenced += 1;
            }
        }
        if unreferenced > 0 {
            note(format!("{unreferenced} unreferenced blocks"));
        }
        for partial in self.store.incoming_files()? {
            if !dry_run {
                io(&partial, fs::remove_file(&partial))?;
            }
            note(format!("partial block {}", partial.display()));
        }
        Ok(report)
    }
}

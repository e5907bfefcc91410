//! The embedded `local` provider: volumes are sparse files (reflink clones where the filesystem
//! allows) attached as loop devices, snapshots live in a content-addressed block store, and
//! images are records in an on-disk registry. Everything sits under one state directory.

pub mod registry;
pub mod sparse;
pub mod store;

use crate::journal::Resource;
use crate::provider::{GcReport, Image, ImageRequest, Progress, Provider, Result, SnapshotResult};
use crate::{ids, loopdev, mounts};
use nix::fcntl::{Flock, FlockArg};
use registry::Registry;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use store::{ChangeHint, SnapshotManifest, Store};

/// The tag that names a base image family (`debian12-jre17-tomcat10`).
pub const BASE_NAME_TAG: &str = "bakery:base-name";

#[derive(Debug, snafu::Snafu)]
pub enum Error {
    #[snafu(display("local state I/O on {}: {source}", path.display()))]
    Io { path: PathBuf, source: std::io::Error },

    #[snafu(display("volume {id} does not exist"))]
    NoSuchVolume { id: String },

    #[snafu(display("image {id} does not exist"))]
    NoSuchImage { id: String },

    #[snafu(display("snapshot {id} is still used by image {image}"))]
    SnapshotInUse { id: String, image: String },
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

pub struct LocalProvider {
    state_dir: PathBuf,
    store: Store,
    registry: Registry,
    /// A block cache for another provider (mirrored EBS snapshots) rather than an image store:
    /// its snapshots belong to no local image, and gc must keep them.
    cache_only: bool,
}

fn io<T>(path: &Path, result: std::io::Result<T>) -> std::result::Result<T, Error> {
    result.map_err(|source| Error::Io { path: path.to_path_buf(), source })
}

impl LocalProvider {
    pub fn open(state_dir: &Path) -> Result<LocalProvider> {
        for sub in ["volumes", "cache", "mnt", "tmp", "instances"] {
            let dir = state_dir.join(sub);
            io(&dir, fs::create_dir_all(&dir))?;
        }
        Ok(LocalProvider {
            state_dir: state_dir.to_path_buf(),
            store: Store::open(state_dir)?,
            registry: Registry::open(state_dir)?,
            cache_only: false,
        })
    }

    /// A local provider used as another provider's block cache (see `cache_only`).
    pub fn open_cache(state_dir: &Path) -> Result<LocalProvider> {
        Ok(LocalProvider { cache_only: true, ..LocalProvider::open(state_dir)? })
    }

    /// A volume with a given id: the local twin of a cloud volume (tests of attach mode).
    pub fn create_volume_as(&self, id: &str, snapshot_id: &str, bake_id: &str) -> Result<()> {
        let manifest = self.store.snapshot(snapshot_id)?;
        let cached = self.cached_image(&manifest)?;
        let path = self.volume_path(id);
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
        self.volume_path(id)
    }

    pub fn has_volume(&self, id: &str) -> bool {
        self.volume_meta(id).is_ok()
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    fn volume_path(&self, id: &str) -> PathBuf {
        self.state_dir.join("volumes").join(format!("{id}.raw"))
    }

    fn volume_meta(&self, id: &str) -> std::result::Result<VolumeMeta, Error> {
        let path = self.state_dir.join("volumes").join(format!("{id}.json"));
        let bytes = fs::read(&path).map_err(|_| Error::NoSuchVolume { id: id.to_string() })?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Io { path, source: e.into() })
    }

    /// The snapshot's blocks as one file, built once and shared read-only by the volumes
    /// created from it (as clones where the filesystem can).
    pub fn cached_image(&self, manifest: &SnapshotManifest) -> Result<PathBuf> {
        let cache = self.state_dir.join("cache");
        let path = cache.join(format!("{}.raw", manifest.id));
        let lock_path = cache.join(format!("{}.lock", manifest.id));
        let lock_file = io(&lock_path, File::create(&lock_path))?;
        let _lock = Flock::lock(lock_file, FlockArg::LockExclusive).map_err(|(_, e)| e)?;
        if !path.exists() {
            let partial = cache.join(format!("{}.partial", manifest.id));
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

    fn snapshot_file(
        &self,
        path: &Path,
        parent: Option<&str>,
        hint: ChangeHint,
        description: &str,
        cancel: &AtomicBool,
        progress: Progress,
    ) -> Result<SnapshotResult> {
        let parent = parent.map(|id| self.store.snapshot(id)).transpose()?;
        let (blocks, changed_blocks, stored_bytes) =
            self.store.snapshot_volume(path, parent.as_ref(), hint, cancel, progress)?;
        let manifest = SnapshotManifest {
            id: ids::new_id("snap"),
            parent: parent.map(|p| p.id),
            volume_size: io(path, fs::metadata(path))?.len(),
            block_size: store::BLOCK_SIZE,
            created: ids::now_rfc3339(),
            description: description.to_string(),
            changed_blocks,
            stored_bytes,
            tags: BTreeMap::new(),
            blocks,
        };
        self.store.save_snapshot(&manifest)?;
        Ok(SnapshotResult { id: manifest.id, changed_blocks, stored_bytes })
    }
}

impl Provider for LocalProvider {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn find_image(&self, reference: &str) -> Result<Option<Image>> {
        if ids::is_id("ami", reference) {
            return Ok(self.registry.get(reference)?);
        }
        let images = self.registry.list()?;
        let by_name = images.iter().find(|i| i.name == reference);
        let by_family = images.iter().find(|i| i.tags.get(BASE_NAME_TAG).is_some_and(|n| n == reference));
        Ok(by_name.or(by_family).cloned())
    }

    fn images_tagged(&self, key: &str, value: &str) -> Result<Vec<Image>> {
        let images = self.registry.list()?;
        Ok(images.into_iter().filter(|i| i.tags.get(key).is_some_and(|v| v == value)).collect())
    }

    fn list_images(&self) -> Result<Vec<Image>> {
        Ok(self.registry.list()?)
    }

    fn create_volume(&self, snapshot_id: &str, bake_id: &str) -> Result<String> {
        let id = ids::new_id("vol");
        self.create_volume_as(&id, snapshot_id, bake_id)?;
        Ok(id)
    }

    fn attach_volume(&self, volume_id: &str) -> Result<PathBuf> {
        self.volume_meta(volume_id)?;
        Ok(loopdev::attach(&self.volume_path(volume_id), false)?)
    }

    fn detach_volume(&self, volume_id: &str, device: &Path) -> Result<()> {
        Ok(loopdev::detach_if_backed_by(device, &self.volume_path(volume_id))?)
    }

    fn delete_volume(&self, volume_id: &str) -> Result<()> {
        let path = self.volume_path(volume_id);
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
        let meta = self.volume_meta(volume_id)?;
        let hint = match parent {
            Some(parent) if meta.reflinked && parent == meta.snapshot_id => ChangeHint::ReflinkedFromParent,
            _ => ChangeHint::None,
        };
        self.snapshot_file(&self.volume_path(volume_id), parent, hint, description, cancel, progress)
    }

    fn import_disk(
        &self,
        path: &Path,
        description: &str,
        cancel: &AtomicBool,
        progress: Progress,
    ) -> Result<SnapshotResult> {
        self.snapshot_file(path, None, ChangeHint::None, description, cancel, progress)
    }

    fn delete_snapshot(&self, snapshot_id: &str) -> Result<()> {
        if let Some(image) = self.registry.list()?.into_iter().find(|i| i.snapshot_id == snapshot_id) {
            return Err(Error::SnapshotInUse { id: snapshot_id.to_string(), image: image.id }.into());
        }
        self.store.delete_snapshot(snapshot_id)?;
        let cached = self.state_dir.join("cache").join(format!("{snapshot_id}.raw"));
        let _ = fs::remove_file(cached);
        Ok(())
    }

    fn register_image(&self, request: &ImageRequest) -> Result<Image> {
        let snapshot = self.store.snapshot(&request.snapshot_id)?;
        let image = Image {
            id: ids::new_id("ami"),
            name: request.name.clone(),
            description: request.description.clone(),
            snapshot_id: request.snapshot_id.clone(),
            volume_size: snapshot.volume_size,
            architecture: "x86_64".into(),
            root_device_name: "/dev/xvda".into(),
            created: ids::now_rfc3339(),
            tags: request.tags.clone(),
        };
        self.registry.register(&image)?;
        Ok(image)
    }

    fn tag_image(&self, image_id: &str, tags: &BTreeMap<String, String>) -> Result<()> {
        match self.registry.tag(image_id, tags)? {
            true => Ok(()),
            false => Err(Error::NoSuchImage { id: image_id.to_string() }.into()),
        }
    }

    fn delete_image(&self, image_id: &str) -> Result<()> {
        let Some(image) = self.registry.get(image_id)? else { return Ok(()) };
        self.registry.remove(image_id)?;
        self.delete_snapshot(&image.snapshot_id)
    }

    fn export_image(&self, image_id: &str, out: &Path, cancel: &AtomicBool) -> Result<()> {
        let image = self.registry.get(image_id)?.ok_or_else(|| Error::NoSuchImage { id: image_id.to_string() })?;
        let manifest = self.store.snapshot(&image.snapshot_id)?;
        Ok(self.store.materialize(&manifest, out, cancel)?)
    }

    fn collect_garbage(&self, dry_run: bool, live: &[Resource]) -> Result<GcReport> {
        let mut report = GcReport::default();
        let mut note = |what: String| report.removed.push(what);
        let spared = |path: &Path| live.iter().any(|resource| resource.holds(path));
        let scratch = [self.state_dir.join("mnt"), self.state_dir.join("tmp"), self.state_dir.join("instances")];

        // Mounts first, then the loop devices under them, then files: the reverse of creation.
        for prefix in &scratch {
            for point in mounts::mounted_under(prefix).into_iter().filter(|p| !spared(p)) {
                if !dry_run {
                    mounts::unmount_tree(&point)?;
                }
                note(format!("mount {}", point.display()));
            }
        }
        let ours = |file: &Path| {
            ["volumes", "cache"].iter().any(|d| file.starts_with(self.state_dir.join(d)))
                || scratch.iter().any(|s| file.starts_with(s))
        };
        for (device, file) in loopdev::list().into_iter().filter(|(device, file)| ours(file) && !spared(device)) {
            if !dry_run {
                loopdev::detach_if_backed_by(&device, &file)?;
            }
            note(format!("loop device {} ({})", device.display(), file.display()));
        }
        let volumes = self.state_dir.join("volumes");
        for prefix in scratch.iter().chain([&volumes]) {
            for entry in io(prefix, fs::read_dir(prefix))?.flatten().filter(|e| !spared(&e.path())) {
                let path = entry.path();
                if !dry_run {
                    io(&path, if path.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) })?;
                }
                note(format!("leftover {}", path.display()));
            }
        }

        let images = self.registry.list()?;
        let used: BTreeSet<&str> = images.iter().map(|i| i.snapshot_id.as_str()).collect();
        let mut referenced = BTreeSet::new();
        for id in self.store.snapshot_ids()? {
            if used.contains(id.as_str()) || self.cache_only {
                referenced.extend(self.store.snapshot(&id)?.blocks.into_values());
            } else {
                if !dry_run {
                    self.store.delete_snapshot(&id)?;
                }
                note(format!("unregistered snapshot {id}"));
            }
        }
        // A cached disk (and its lock files) lives as long as its snapshot is registered, or, in a
        // block cache, as long as its snapshot is kept.
        let kept = match self.cache_only {
            true => self.store.snapshot_ids()?.into_iter().collect(),
            false => used.iter().map(|id| id.to_string()).collect::<BTreeSet<String>>(),
        };
        let cache = self.state_dir.join("cache");
        for entry in io(&cache, fs::read_dir(&cache))?.flatten() {
            let path = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            let id = name.split('.').next().unwrap_or_default();
            if !kept.contains(id) && !spared(&path) {
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

//! What a cloud must offer for Bakery to bake on it, split by role:
//! - an [`ImageRegistry`]: register, find, tag, list and deregister images;
//! - a [`VolumeBackend`]: volumes from snapshots, attached as block devices, snapshots of them.
//!
//! A [`Provider`] is a composition of one of each: `local` is loop volumes on the block store +
//! the local registry; `aws` direct is loop volumes + the EBS direct uploader + the EC2 registry;
//! `aws` attach is EBS volumes + the EC2 registry. Everything else (mounting, installing, recipes,
//! manifests) is the baker's own, host-side.

use crate::journal::{self, Resource};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

/// A registered machine image.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Image {
    pub id: String,
    pub name: String,
    pub description: String,
    pub snapshot_id: String,
    pub volume_size: u64,
    pub architecture: String,
    pub root_device_name: String,
    pub created: String,
    pub tags: BTreeMap<String, String>,
}

/// What to register: the snapshot and everything that says what is inside it.
#[derive(Debug, Clone)]
pub struct ImageRequest {
    pub name: String,
    pub description: String,
    pub snapshot_id: String,
    /// Bytes of the snapshot's volume.
    pub volume_size: u64,
    pub tags: BTreeMap<String, String>,
    /// The image this one derives from (the base of a bake, the local original of a push):
    /// architecture, root device, size and boot mode carry over from it.
    pub parent: Option<Image>,
    /// What the bake wrote into the image's /var/lib/bakery/, for a registry that keeps them
    /// next to the image as well.
    pub documents: BTreeMap<Document, Vec<u8>>,
}

/// A document that says what is inside an image: a bake writes each into the image, in
/// /var/lib/bakery/, and the registry keeps them next to it where it can.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Document {
    /// What was installed, file by file with SHA-256, from which package onto which base.
    Manifest,
    /// Software bill of materials, CycloneDX 1.5 JSON: every Debian package and the app's files.
    Sbom,
    /// How the image was made: an in-toto statement with a SLSA provenance predicate.
    Provenance,
}

impl Document {
    pub const ALL: [Document; 3] = [Document::Manifest, Document::Sbom, Document::Provenance];

    pub fn as_str(self) -> &'static str {
        match self {
            Document::Manifest => "manifest",
            Document::Sbom => "sbom",
            Document::Provenance => "provenance",
        }
    }

    /// Where the bake writes it inside the image.
    pub fn image_path(self) -> &'static str {
        match self {
            Document::Manifest => "/var/lib/bakery/manifest.json",
            Document::Sbom => "/var/lib/bakery/sbom.cdx.json",
            Document::Provenance => "/var/lib/bakery/provenance.intoto.json",
        }
    }
}

/// The outcome of snapshotting a volume.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotResult {
    pub id: String,
    /// Bytes of the volume (0 where the cloud took the snapshot and did not say).
    pub volume_size: u64,
    /// Blocks that differ from the parent snapshot.
    pub changed_blocks: u64,
    /// Bytes that had to be stored (or uploaded) for this snapshot.
    pub stored_bytes: u64,
}

/// What `gc` found or removed.
#[derive(Debug, Default, Clone, Serialize)]
pub struct GcReport {
    pub removed: Vec<String>,
    pub kept_live: Vec<String>,
    /// Dead bakes whose undo failed (their journals stay for the next gc).
    pub failed: Vec<String>,
}

impl GcReport {
    pub fn merge(&mut self, other: GcReport) {
        self.removed.extend(other.removed);
        self.kept_live.extend(other.kept_live);
        self.failed.extend(other.failed);
    }
}

/// Progress callback: units done, units in all.
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Sync);

pub type Error = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T> = std::result::Result<T, Error>;

/// Where images are registered. Removal succeeds when the image is already gone.
pub trait ImageRegistry: Send + Sync {
    /// An image by id, by exact name, or the newest image whose [`crate::tags::BASE_NAME`]
    /// tag matches.
    fn find_image(&self, reference: &str) -> Result<Option<Image>>;
    fn images_tagged(&self, key: &str, value: &str) -> Result<Vec<Image>>;
    fn list_images(&self) -> Result<Vec<Image>>;
    fn register_image(&self, request: &ImageRequest) -> Result<Image>;
    /// Adds or replaces tags on an image (as EC2 CreateTags does).
    fn tag_image(&self, image_id: &str, tags: &BTreeMap<String, String>) -> Result<()>;
    /// Deregisters an image (and whatever the registry made of it, such as copies in other
    /// regions) and returns it, so that its snapshot can be deleted; None when it is gone.
    fn deregister_image(&self, image_id: &str) -> Result<Option<Image>>;
    /// One of the image's documents where the registry keeps it next to the image (local);
    /// None where it is only inside the image (aws, for now).
    fn document(&self, _image_id: &str, _document: Document) -> Result<Option<Vec<u8>>> {
        Ok(None)
    }
    /// Who else may launch the image (accounts it is shared with), where the registry can tell.
    fn shared_with(&self, _image_id: &str) -> Result<Vec<String>> {
        Ok(Vec::new())
    }
    /// Turns the registry's protection against deregistration on or off, where it has one
    /// (aws); elsewhere nothing to do.
    fn protect_image(&self, _image_id: &str, _protected: bool) -> Result<()> {
        Ok(())
    }
    /// Marks an image deprecated from now, or no longer, where the registry can (aws
    /// `DeprecationTime`): what uses it goes on; nothing new should pick it.
    fn deprecate_image(&self, _image_id: &str, _deprecated: bool) -> Result<()> {
        Ok(())
    }
}

/// Volumes and snapshots. Every operation that removes something succeeds when it is already
/// gone, so that undo can run twice.
pub trait VolumeBackend: Send + Sync {
    fn create_volume(&self, snapshot_id: &str, bake_id: &str) -> Result<String>;
    /// Attaches a volume and returns the block device of the whole disk.
    fn attach_volume(&self, volume_id: &str) -> Result<PathBuf>;
    fn detach_volume(&self, volume_id: &str, device: &Path) -> Result<()>;
    fn delete_volume(&self, volume_id: &str) -> Result<()>;
    /// Snapshots a detached volume, storing only what differs from `parent`.
    fn snapshot_volume(
        &self,
        volume_id: &str,
        parent_snapshot_id: Option<&str>,
        description: &str,
        cancel: &AtomicBool,
        progress: Progress,
    ) -> Result<SnapshotResult>;
    /// Snapshots a raw disk image file (base images, `push`).
    fn import_disk(
        &self,
        path: &Path,
        description: &str,
        cancel: &AtomicBool,
        progress: Progress,
    ) -> Result<SnapshotResult>;
    fn delete_snapshot(&self, snapshot_id: &str) -> Result<()>;
    /// Writes a snapshot's blocks to a raw file.
    fn export_snapshot(&self, snapshot_id: &str, out: &Path, cancel: &AtomicBool) -> Result<()>;
    /// Removes what dead bakes left that their journals do not name. Called only while no bake
    /// runs; spares what `live` (resources of live handed-over journals) holds and the
    /// snapshots of `registered` images.
    fn collect_garbage(&self, dry_run: bool, live: &[Resource], registered: &BTreeSet<String>) -> Result<GcReport>;
}

/// One cloud (or this host): a registry and a volume backend.
pub trait Provider: Send + Sync {
    /// `local` or `aws`.
    fn kind(&self) -> &'static str;
    fn images(&self) -> &dyn ImageRegistry;
    fn volumes(&self) -> &dyn VolumeBackend;

    /// Deregisters an image and deletes its snapshot.
    fn delete_image(&self, image_id: &str) -> Result<()> {
        if let Some(image) = self.images().deregister_image(image_id)? {
            if !image.snapshot_id.is_empty() {
                self.volumes().delete_snapshot(&image.snapshot_id)?;
            }
        }
        Ok(())
    }

    /// Writes an image's root disk to a raw file.
    fn export_image(&self, image_id: &str, out: &Path, cancel: &AtomicBool) -> Result<()> {
        let image = self.images().find_image(image_id)?.ok_or_else(|| format!("image {image_id} not found"))?;
        if image.snapshot_id.is_empty() {
            return Err(format!("image {image_id} has no root snapshot for {}", image.root_device_name).into());
        }
        self.volumes().export_snapshot(&image.snapshot_id, out, cancel)
    }

    /// Sweeps the volume backend's orphans, sparing the snapshots of registered images.
    fn collect_garbage(&self, dry_run: bool, live: &[Resource]) -> Result<GcReport> {
        let registered: BTreeSet<String> = self.images().list_images()?.into_iter().map(|i| i.snapshot_id).collect();
        self.volumes().collect_garbage(dry_run, live, &registered)
    }
}

/// A provider undoes the cloud resources of its journals.
impl<P: Provider + ?Sized> journal::Undo for P {
    fn delete_volume(&self, id: &str) -> journal::UndoResult {
        self.volumes().delete_volume(id)
    }
    fn detach_volume(&self, volume: &str, device: &Path) -> journal::UndoResult {
        self.volumes().detach_volume(volume, device)
    }
    /// A crash between registering an image and journaling it leaves the image's snapshot in
    /// the journal: a snapshot that an image uses is never deleted by an undo.
    fn delete_snapshot(&self, id: &str) -> journal::UndoResult {
        if let Some(image) = self.images().list_images()?.into_iter().find(|i| i.snapshot_id == id) {
            return Err(format!("snapshot {id} is still used by image {}", image.id).into());
        }
        self.volumes().delete_snapshot(id)
    }
    fn delete_image(&self, id: &str) -> journal::UndoResult {
        Provider::delete_image(self, id)
    }
}

//! The narrow interface a cloud must offer for Bakery to bake on it: volumes from snapshots,
//! attachment as a block device, snapshots of volumes, and an image registry.
//! Everything else (mounting, installing, recipes, manifests) is the baker's own, host-side.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
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
    pub tags: BTreeMap<String, String>,
    /// The image this one derives from (the base of a bake, the local original of a push):
    /// architecture, root device, size and boot mode carry over from it.
    pub parent: Option<Image>,
}

/// The outcome of snapshotting a volume.
#[derive(Debug, Clone, Serialize)]
pub struct SnapshotResult {
    pub id: String,
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

/// Progress callback: units done, units in all.
pub type Progress<'a> = &'a (dyn Fn(u64, u64) + Sync);

pub type Error = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T> = std::result::Result<T, Error>;

/// One cloud (or this host) seen through the operations a bake needs. Every operation that
/// removes something succeeds when it is already gone, so undo can run twice.
pub trait Provider: Send + Sync {
    /// `local` or `aws`.
    fn kind(&self) -> &'static str;

    /// An image by id, by exact name, or the newest image whose `bakery:base-name` tag matches.
    fn find_image(&self, reference: &str) -> Result<Option<Image>>;
    fn images_tagged(&self, key: &str, value: &str) -> Result<Vec<Image>>;
    fn list_images(&self) -> Result<Vec<Image>>;

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

    fn register_image(&self, request: &ImageRequest) -> Result<Image>;
    /// Adds or replaces tags on an image (as EC2 CreateTags does).
    fn tag_image(&self, image_id: &str, tags: &BTreeMap<String, String>) -> Result<()>;
    /// Deregisters an image and deletes its snapshot.
    fn delete_image(&self, image_id: &str) -> Result<()>;
    /// Writes an image's root disk to a raw file.
    fn export_image(&self, image_id: &str, out: &Path, cancel: &AtomicBool) -> Result<()>;

    /// Removes what dead bakes left that their journals do not name (orphans of a crash
    /// between creating a resource and recording it). Called only while no bake runs; spares
    /// what `live` (the resources of live handed-over journals) holds.
    fn collect_garbage(&self, dry_run: bool, live: &[crate::journal::Resource]) -> Result<GcReport>;
}

//! The embedded `local` provider: loop volumes on the block store ([`crate::blockstore`]) and
//! images as records in an on-disk registry, all under one state directory.

pub mod registry;

use crate::blockstore::{self, store::SnapshotManifest, Volumes};
use crate::provider::{Document, Image, ImageRegistry, ImageRequest, Provider, Result, VolumeBackend};
use crate::{ids, tags};
use registry::Registry;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, snafu::Snafu)]
pub enum Error {
    #[snafu(display("image {id} does not exist"))]
    NoSuchImage { id: String },
}

pub struct LocalProvider {
    volumes: Volumes,
    registry: Registry,
}

impl LocalProvider {
    pub fn open(state_dir: &Path) -> Result<LocalProvider> {
        let cow = blockstore::pool::cow_dir(state_dir);
        Ok(LocalProvider { volumes: Volumes::open(state_dir, &cow)?, registry: Registry::open(state_dir)? })
    }

    /// The loop volumes and block store (instances boot from their cached disks).
    pub fn block_volumes(&self) -> &Volumes {
        &self.volumes
    }

    /// An image's disk, materialised once and shared read-only.
    pub fn image_disk(&self, image: &Image) -> Result<PathBuf> {
        let manifest: SnapshotManifest = self.volumes.store().snapshot(&image.snapshot_id)?;
        self.volumes.cached_image(&manifest)
    }
}

impl ImageRegistry for Registry {
    fn find_image(&self, reference: &str) -> Result<Option<Image>> {
        if ids::is_id("ami", reference) {
            return Ok(self.get(reference)?);
        }
        let images = self.list()?;
        let by_name = images.iter().find(|i| i.name == reference);
        let by_family = images.iter().find(|i| i.tags.get(tags::BASE_NAME).is_some_and(|n| n == reference));
        Ok(by_name.or(by_family).cloned())
    }

    fn images_tagged(&self, key: &str, value: &str) -> Result<Vec<Image>> {
        let images = self.list()?;
        Ok(images.into_iter().filter(|i| i.tags.get(key).is_some_and(|v| v == value)).collect())
    }

    fn list_images(&self) -> Result<Vec<Image>> {
        Ok(self.list()?)
    }

    fn register_image(&self, request: &ImageRequest) -> Result<Image> {
        let image = Image {
            id: ids::new_id("ami"),
            name: request.name.clone(),
            description: request.description.clone(),
            snapshot_id: request.snapshot_id.clone(),
            volume_size: request.volume_size,
            architecture: "x86_64".into(),
            root_device_name: "/dev/xvda".into(),
            created: ids::now_rfc3339(),
            tags: request.tags.clone(),
        };
        self.register(&image)?;
        for (document, content) in &request.documents {
            self.put_document(&image.id, *document, content)?;
        }
        Ok(image)
    }

    fn tag_image(&self, image_id: &str, tags: &BTreeMap<String, String>) -> Result<()> {
        match self.tag(image_id, tags)? {
            true => Ok(()),
            false => Err(Error::NoSuchImage { id: image_id.to_string() }.into()),
        }
    }

    fn deregister_image(&self, image_id: &str) -> Result<Option<Image>> {
        let Some(image) = self.get(image_id)? else { return Ok(None) };
        self.remove(image_id)?;
        Ok(Some(image))
    }

    fn document(&self, image_id: &str, document: Document) -> Result<Option<Vec<u8>>> {
        Ok(self.get_document(image_id, document)?)
    }
}

impl Provider for LocalProvider {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn images(&self) -> &dyn ImageRegistry {
        &self.registry
    }

    fn volumes(&self) -> &dyn VolumeBackend {
        &self.volumes
    }
}

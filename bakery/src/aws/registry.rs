//! Images in EC2: registered with the base's architecture, root device and boot mode, ENA and
//! IMDSv2, tagged (with CreateTags too, so DescribeImages shows them), shared, and copied to
//! other regions in parallel; its documents stored in S3 and linked from its tags where a bucket
//! is given. Deleting an image deletes its copies and its documents.

use super::artifacts::Artifacts;
use super::ec2::{Ec2, Registration};
use crate::provider::{Document, Image, ImageRegistry, ImageRequest, Result};
use crate::tags;
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::runtime::Runtime;

pub struct Ec2Registry {
    pub ec2: Ec2,
    pub runtime: Arc<Runtime>,
    pub config: aws_config::SdkConfig,
    pub region: String,
    pub kms_key: Option<String>,
    pub copy_to_regions: Vec<String>,
    pub share_with: Vec<String>,
    pub artifacts: Artifacts,
}

/// The copies an image lists in its [`tags::COPIES`] tag: (region, image id).
fn copies(image: &Image) -> Vec<(String, String)> {
    image
        .tags
        .get(tags::COPIES)
        .map(|list| list.split(',').filter_map(|c| c.split_once('=')).map(|(r, i)| (r.into(), i.into())).collect())
        .unwrap_or_default()
}

/// What registering made besides the image, for its undo when a later part fails.
#[derive(Default)]
struct Made {
    copies: Vec<(String, String)>,
    links: BTreeMap<String, String>,
}

impl Ec2Registry {
    fn ec2_in(&self, region: &str) -> Ec2 {
        let config = self.config.to_builder().region(aws_config::Region::new(region.to_string())).build();
        Ec2 { client: aws_sdk_ec2::Client::new(&config), ..self.ec2.clone() }
    }

    /// Copies into every `--copy-to-region` at once; on any failure the copies made (images and
    /// their snapshots) are deleted again.
    async fn copy_to_regions(&self, image: &Image) -> Result<Vec<(String, String)>> {
        let kms = self.kms_key.as_deref();
        let copies = self.copy_to_regions.iter().map(|region| {
            let ec2 = self.ec2_in(region);
            async move {
                let started = ec2.copy_from(&self.region, image, kms, &format!("{}-{region}", image.id)).await;
                let result = match started {
                    Ok(id) => match ec2.wait_image_available(&id).await.and(ec2.tag(&[&id], &image.tags).await) {
                        Ok(()) => Ok(id),
                        Err(error) => Err((Some(id), error)),
                    },
                    Err(error) => Err((None, error)),
                };
                (region.clone(), result)
            }
        });
        let mut made = Vec::new();
        let mut failure = None;
        for (region, result) in futures::future::join_all(copies).await {
            match result {
                Ok(id) => made.push((region, id)),
                Err((started, error)) => {
                    made.extend(started.map(|id| (region, id)));
                    failure = Some(error);
                }
            }
        }
        if let Some(error) = failure {
            self.delete_copies(&made).await;
            return Err(error.into());
        }
        Ok(made)
    }

    /// Best effort: a copy that cannot be deleted is logged (it carries the image's tags).
    async fn delete_copies(&self, copies: &[(String, String)]) {
        for (region, id) in copies {
            if let Err(error) = self.delete_everywhere(&self.ec2_in(region), id).await {
                tracing::error!(%region, image = %id, %error, "could not delete a copy of the image");
            }
        }
    }

    /// Deregisters an image and its copies; the copies' snapshots go too (the original's is
    /// the volume backend's to delete). Returns the image, None when it was gone.
    async fn deregister_with_copies(&self, ec2: &Ec2, image_id: &str) -> Result<Option<Image>> {
        let Some(image) = ec2.images(&[image_id], &[]).await?.into_iter().next() else { return Ok(None) };
        for (region, copy) in copies(&image) {
            Box::pin(self.delete_everywhere(&self.ec2_in(&region), &copy)).await?;
        }
        ec2.deregister(image_id).await?;
        self.artifacts.delete(image_id, &image.tags).await;
        Ok(Some(image))
    }

    async fn delete_everywhere(&self, ec2: &Ec2, image_id: &str) -> Result<()> {
        if let Some(image) = self.deregister_with_copies(ec2, image_id).await? {
            if !image.snapshot_id.is_empty() {
                ec2.delete_snapshot(&image.snapshot_id).await?;
            }
        }
        Ok(())
    }

    async fn finish_registration(&self, id: &str, request: &ImageRequest, made: &mut Made) -> Result<Image> {
        self.ec2.tag(&[id, &request.snapshot_id], &request.tags).await?;
        self.ec2.wait_image_available(id).await?;
        made.links = self.artifacts.put(id, &request.documents).await?;
        if !made.links.is_empty() {
            self.ec2.tag(&[id], &made.links).await?;
        }
        let registered = BTreeMap::from([(tags::STATUS.to_string(), "registered".to_string())]);
        self.ec2.tag(&[&request.snapshot_id], &registered).await?;
        if !self.share_with.is_empty() {
            self.ec2.share(id, &request.snapshot_id, &self.share_with).await?;
        }
        let mut image = self
            .ec2
            .images(&[id], &[])
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| format!("image {id} vanished right after it was registered"))?;
        made.copies = self.copy_to_regions(&image).await?;
        if !made.copies.is_empty() {
            let list = made.copies.iter().map(|(r, i)| format!("{r}={i}")).collect::<Vec<_>>().join(",");
            let tag = BTreeMap::from([(tags::COPIES.to_string(), list)]);
            self.ec2.tag(&[id], &tag).await?;
            image.tags.extend(tag);
        }
        Ok(image)
    }
}

impl ImageRegistry for Ec2Registry {
    fn find_image(&self, reference: &str) -> Result<Option<Image>> {
        self.runtime.block_on(async {
            let found = if crate::ids::is_id("ami", reference) {
                self.ec2.images(&[reference], &[]).await?
            } else {
                let by_name = self.ec2.images(&[], &[("name", reference)]).await?;
                if by_name.is_empty() {
                    let tag = format!("tag:{}", tags::BASE_NAME);
                    self.ec2.images(&[], &[(tag.as_str(), reference)]).await?
                } else {
                    by_name
                }
            };
            Ok(found.into_iter().next())
        })
    }

    fn images_tagged(&self, key: &str, value: &str) -> Result<Vec<Image>> {
        let tag = format!("tag:{key}");
        Ok(self.runtime.block_on(self.ec2.images(&[], &[(tag.as_str(), value)]))?)
    }

    fn list_images(&self) -> Result<Vec<Image>> {
        Ok(self.runtime.block_on(self.ec2.images(&[], &[]))?)
    }

    fn register_image(&self, request: &ImageRequest) -> Result<Image> {
        self.runtime.block_on(async {
            let parent = request.parent.as_ref();
            let boot_mode = match parent {
                Some(p) if crate::ids::is_id("ami", &p.id) => self.ec2.boot_mode(&p.id).await?,
                _ => None,
            };
            let volume_size = parent.map_or(request.volume_size, |p| p.volume_size).div_ceil(1 << 30).max(1);
            let id = self
                .ec2
                .register(&Registration {
                    name: &request.name,
                    description: &request.description,
                    snapshot_id: &request.snapshot_id,
                    architecture: parent.map_or("x86_64", |p| p.architecture.as_str()),
                    root_device_name: parent.map_or("/dev/xvda", |p| p.root_device_name.as_str()),
                    volume_size_gib: volume_size as i32,
                    // Base images built by bakery boot GRUB from BIOS.
                    boot_mode: boot_mode.as_deref().unwrap_or("legacy-bios"),
                    tags: &request.tags,
                })
                .await?;
            let mut made = Made::default();
            match self.finish_registration(&id, request, &mut made).await {
                Ok(image) => Ok(image),
                Err(error) => {
                    // The journal only learns of the image once this returns: undo it here.
                    self.delete_copies(&made.copies).await;
                    self.artifacts.delete(&id, &made.links).await;
                    if let Err(cleanup) = self.ec2.deregister(&id).await {
                        tracing::error!(image = %id, %cleanup, "could not deregister the unfinished image");
                    }
                    Err(error)
                }
            }
        })
    }

    fn tag_image(&self, image_id: &str, tags: &BTreeMap<String, String>) -> Result<()> {
        Ok(self.runtime.block_on(self.ec2.tag(&[image_id], tags))?)
    }

    fn deregister_image(&self, image_id: &str) -> Result<Option<Image>> {
        self.runtime.block_on(self.deregister_with_copies(&self.ec2, image_id))
    }

    fn protect_image(&self, image_id: &str, protected: bool) -> Result<()> {
        Ok(self.runtime.block_on(self.ec2.protect(image_id, protected))?)
    }

    fn shared_with(&self, image_id: &str) -> Result<Vec<String>> {
        Ok(self.runtime.block_on(self.ec2.launch_permissions(image_id))?)
    }

    fn deprecate_image(&self, image_id: &str, deprecated: bool) -> Result<()> {
        Ok(self.runtime.block_on(self.ec2.deprecate(image_id, deprecated))?)
    }

    fn document(&self, image_id: &str, document: Document) -> Result<Option<Vec<u8>>> {
        self.runtime.block_on(async {
            let Some(image) = self.ec2.images(&[image_id], &[]).await?.into_iter().next() else { return Ok(None) };
            self.artifacts.get(&image, document).await
        })
    }
}

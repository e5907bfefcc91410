//! The `aws` provider: the official AWS SDK for Rust (EC2, EBS direct), the standard credential
//! chain, `AWS_REGION` and `AWS_ENDPOINT_URL` honoured.
//!
//! Two ways to bake, behind the same [`Provider`] interface:
//! - **attach** (on an EC2 host, as Aminator does): a real EBS volume from the base snapshot,
//!   attached to this instance; the snapshot is taken by EC2.
//! - **direct** (any Linux host): the base snapshot's blocks are mirrored into a local block
//!   store (once per snapshot), the bake runs on a loop device, and only the blocks that differ
//!   from the base are uploaded into a child snapshot with the EBS direct APIs.

pub mod ebs;
pub mod ec2;
pub mod host;
pub mod retry;

use crate::local::{sparse, store::BLOCK_SIZE, LocalProvider};
use crate::provider::{GcReport, Image, ImageRequest, Progress, Provider, Result, SnapshotResult};
use aws_config::BehaviorVersion;
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;
use ebs::{Ebs, Upload};
use ec2::{Ec2, Registration, BAKE_ID_TAG, STATUS_TAG};
use snafu::{OptionExt, ResultExt, Snafu};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Snafu)]
pub enum Error {
    #[snafu(display("no AWS region: pass --region or set AWS_REGION"))]
    NoRegion,

    #[snafu(display("attach mode bakes on an EC2 instance, and the instance metadata service (IMDSv2) did not answer; use --mode direct to bake from any host"))]
    NotOnEc2,

    #[snafu(display("starting the AWS runtime: {source}"))]
    Runtime { source: std::io::Error },

    #[snafu(display("no free device name under /dev/sd[f-p] on this instance"))]
    NoFreeDevice,

    #[snafu(display("volume {volume} is attached as {device} but no such block device appeared"))]
    DeviceMissing { volume: String, device: String },

    #[snafu(display("locking device names: {source}"))]
    DeviceLock { source: std::io::Error },

    #[snafu(display("opening {}: {source}", path.display()))]
    Open { path: PathBuf, source: std::io::Error },

    #[snafu(display("locking the mirror of {}: {source}", path.display()))]
    MirrorLock { path: PathBuf, source: std::io::Error },
}

/// Tag listing the copies of an image in other regions (`region=ami-…,…`), so deleting the
/// image deletes them too.
pub const COPIES_TAG: &str = "bakery:copies";

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Attach,
    Direct,
}

/// Everything the `aws` provider is told on the command line.
#[derive(Debug, Clone, Default)]
pub struct Options {
    pub region: Option<String>,
    pub mode: Option<Mode>,
    pub kms_key: Option<String>,
    pub copy_to_regions: Vec<String>,
    pub share_with: Vec<String>,
    /// gc leaves bake-tagged volumes and unfinished snapshots younger than this alone: they may
    /// belong to a bake running on another host.
    pub gc_older_than: Duration,
    /// Set on Ctrl-C: mirrors and waits stop at their next block or poll.
    pub cancel: Arc<AtomicBool>,
}

/// A runtime for the SDK's futures and the configuration every bakery client uses: the standard
/// chain for credentials and region (`--region` first), the SDK's own retries off (`retry::retry`
/// is the one layer), and timeouts on connecting, on each attempt and on each call.
pub fn sdk(region: Option<String>) -> std::result::Result<(tokio::runtime::Runtime, aws_config::SdkConfig), Error> {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context(RuntimeSnafu)?;
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(5))
        .operation_attempt_timeout(Duration::from_secs(60))
        .operation_timeout(Duration::from_secs(120))
        .build();
    let mut loader =
        aws_config::defaults(BehaviorVersion::latest()).retry_config(RetryConfig::disabled()).timeout_config(timeouts);
    if let Some(region) = region {
        loader = loader.region(aws_config::Region::new(region));
    }
    let config = runtime.block_on(loader.load());
    snafu::ensure!(config.region().is_some(), NoRegionSnafu);
    Ok((runtime, config))
}

pub struct AwsProvider {
    runtime: tokio::runtime::Runtime,
    config: aws_config::SdkConfig,
    ec2: Ec2,
    ebs: Ebs,
    region: String,
    mode: Mode,
    host: Option<host::Identity>,
    /// Test stand-in for the kernel's view of attached volumes: a loop device over a local
    /// twin filled from the snapshot's blocks (`BAKERY_AWS_DEVICE_SOURCE=loop`).
    loop_devices: bool,
    cache: LocalProvider,
    cache_dir: PathBuf,
    options: Options,
}

impl AwsProvider {
    pub fn open(state_dir: &Path, options: Options) -> std::result::Result<AwsProvider, crate::provider::Error> {
        let (runtime, config) = sdk(options.region.clone())?;
        let region = config.region().map(|r| r.to_string()).context(NoRegionSnafu)?;
        let policy = retry::Policy::from_env();
        let ec2 = Ec2 {
            client: aws_sdk_ec2::Client::new(&config),
            policy,
            timeout: Duration::from_secs(1800),
            cancel: options.cancel.clone(),
        };
        let ebs = Ebs { client: aws_sdk_ebs::Client::new(&config), policy, concurrency: 32 };
        let host = match options.mode {
            Some(Mode::Direct) => None,
            _ => host::metadata_endpoint().and_then(|endpoint| host::identify(&endpoint, Duration::from_secs(1))),
        };
        let mode = options.mode.unwrap_or(if host.is_some() { Mode::Attach } else { Mode::Direct });
        if mode == Mode::Attach && host.is_none() {
            return Err(Error::NotOnEc2.into());
        }
        let cache_dir = state_dir.join("aws").join(&region);
        let cache = LocalProvider::open_cache(&cache_dir)?;
        let loop_devices = std::env::var("BAKERY_AWS_DEVICE_SOURCE").is_ok_and(|v| v == "loop");
        tracing::debug!(%region, ?mode, "aws provider");
        Ok(AwsProvider { runtime, config, ec2, ebs, region, mode, host, loop_devices, cache, cache_dir, options })
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn region(&self) -> &str {
        &self.region
    }

    /// The snapshot's blocks in the local cache, downloaded the first time only.
    fn mirror(&self, snapshot_id: &str) -> Result<()> {
        let path = self.cache_dir.join("cache").join(format!("{snapshot_id}.mirror.lock"));
        let lock = File::create(&path).context(MirrorLockSnafu { path: &path })?;
        let _lock = nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| std::io::Error::from(e))
            .context(MirrorLockSnafu { path })?;
        if self.cache.store().snapshot(snapshot_id).is_ok() {
            return Ok(());
        }
        let started = std::time::Instant::now();
        let cancel = &self.options.cancel;
        let manifest = self.runtime.block_on(self.ebs.mirror(self.cache.store(), snapshot_id, cancel, &|_, _| {}))?;
        tracing::info!(snapshot = snapshot_id, blocks = manifest.blocks.len(), elapsed = ?started.elapsed(), "mirrored the snapshot's blocks");
        Ok(())
    }

    fn host(&self) -> &host::Identity {
        self.host.as_ref().expect("attach mode always has a host identity")
    }

    /// Uploads blocks of `path` into a new snapshot, deleting it again if anything fails.
    fn upload(&self, path: &Path, upload: Upload, cancel: &AtomicBool, progress: Progress) -> Result<ebs::Uploaded> {
        let file = Arc::new(File::open(path).context(OpenSnafu { path })?);
        let result = self.runtime.block_on(async {
            let uploaded = self.ebs.upload(file, path.to_path_buf(), upload, cancel, progress).await;
            let uploaded = uploaded.map_err(|(started, error)| (started, crate::provider::Error::from(error)))?;
            match self.ec2.wait_snapshot_completed(&uploaded.snapshot_id).await {
                Ok(()) => Ok(uploaded),
                Err(error) => Err((Some(uploaded.snapshot_id), error.into())),
            }
        });
        match result {
            Ok(uploaded) => Ok(uploaded),
            Err((started, error)) => {
                if let Some(snapshot) = started {
                    if let Err(cleanup) = self.runtime.block_on(self.ec2.delete_snapshot(&snapshot)) {
                        tracing::error!(%snapshot, %cleanup, "could not delete the unfinished snapshot; `bakery gc --provider aws` will");
                    }
                }
                Err(error)
            }
        }
    }

    fn in_progress_tags(&self) -> BTreeMap<String, String> {
        BTreeMap::from([(STATUS_TAG.to_string(), "in-progress".to_string())])
    }

    fn copies(image: &Image) -> Vec<(String, String)> {
        image
            .tags
            .get(COPIES_TAG)
            .map(|list| list.split(',').filter_map(|c| c.split_once('=')).map(|(r, i)| (r.into(), i.into())).collect())
            .unwrap_or_default()
    }

    fn ec2_in(&self, region: &str) -> Ec2 {
        let config = self.config.to_builder().region(aws_config::Region::new(region.to_string())).build();
        Ec2 { client: aws_sdk_ec2::Client::new(&config), ..self.ec2.clone() }
    }

    /// Copies into every `--copy-to-region` at once; on any failure the copies made (images and
    /// their snapshots) are deleted again.
    async fn copy_to_regions(&self, image: &Image) -> Result<Vec<(String, String)>> {
        let kms = self.options.kms_key.as_deref();
        let copies = self.options.copy_to_regions.iter().map(|region| {
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
                (region.clone(), ec2, result)
            }
        });
        let mut made = Vec::new();
        let mut failure = None;
        for (region, ec2, result) in futures::future::join_all(copies).await {
            match result {
                Ok(id) => made.push((region, id, ec2)),
                Err((started, error)) => {
                    made.extend(started.map(|id| (region, id, ec2)));
                    failure = Some(error);
                }
            }
        }
        let copies: Vec<(String, String)> = made.iter().map(|(region, id, _)| (region.clone(), id.clone())).collect();
        if let Some(error) = failure {
            self.delete_copies(&copies).await;
            return Err(error.into());
        }
        Ok(copies)
    }

    /// Best effort: a copy that cannot be deleted is logged (it carries the image's tags).
    async fn delete_copies(&self, copies: &[(String, String)]) {
        for (region, id) in copies {
            if let Err(error) = self.delete_image_async(&self.ec2_in(region), id).await {
                tracing::error!(%region, image = %id, %error, "could not delete a copy of the image");
            }
        }
    }

    async fn delete_image_async(&self, ec2: &Ec2, image_id: &str) -> Result<()> {
        let Some(image) = ec2.images(&[image_id], &[]).await?.into_iter().next() else { return Ok(()) };
        for (region, copy) in Self::copies(&image) {
            Box::pin(self.delete_image_async(&self.ec2_in(&region), &copy)).await?;
        }
        ec2.deregister(image_id).await?;
        if !image.snapshot_id.is_empty() {
            ec2.delete_snapshot(&image.snapshot_id).await?;
        }
        Ok(())
    }
}

impl Provider for AwsProvider {
    fn kind(&self) -> &'static str {
        "aws"
    }

    fn find_image(&self, reference: &str) -> Result<Option<Image>> {
        self.runtime.block_on(async {
            let found = if crate::ids::is_id("ami", reference) {
                self.ec2.images(&[reference], &[]).await?
            } else {
                let by_name = self.ec2.images(&[], &[("name", reference)]).await?;
                if by_name.is_empty() {
                    let tag = format!("tag:{}", crate::local::BASE_NAME_TAG);
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

    fn create_volume(&self, snapshot_id: &str, bake_id: &str) -> Result<String> {
        match self.mode {
            Mode::Direct => {
                self.mirror(snapshot_id)?;
                self.cache.create_volume(snapshot_id, bake_id)
            }
            Mode::Attach => {
                let mut tags = self.in_progress_tags();
                tags.insert(BAKE_ID_TAG.to_string(), bake_id.to_string());
                tags.insert("Name".to_string(), format!("bakery {bake_id}"));
                let zone = self.host().zone.clone();
                let kms = self.options.kms_key.as_deref();
                let id = self.runtime.block_on(self.ec2.create_volume(snapshot_id, &zone, kms, &tags, bake_id))?;
                if let Err(error) = self.runtime.block_on(self.ec2.wait_volume(&id, "available")) {
                    // The journal learns of the volume only when this returns.
                    let _ = self.runtime.block_on(self.ec2.delete_volume(&id));
                    return Err(error.into());
                }
                if self.loop_devices {
                    self.mirror(snapshot_id)?;
                    self.cache.create_volume_as(&id, snapshot_id, bake_id)?;
                }
                Ok(id)
            }
        }
    }

    fn attach_volume(&self, volume_id: &str) -> Result<PathBuf> {
        if self.mode == Mode::Direct {
            return self.cache.attach_volume(volume_id);
        }
        let instance = self.host().instance_id.clone();
        let _devices = host::lock_devices().context(DeviceLockSnafu)?;
        let in_use: BTreeSet<String> = self.runtime.block_on(self.ec2.attached_devices(&instance))?;
        let device = host::free_device(&in_use).context(NoFreeDeviceSnafu)?;
        let attached = self.runtime.block_on(self.ec2.attach(volume_id, &instance, &device)).map_err(Into::into);
        let found = attached.and_then(|()| {
            if self.loop_devices {
                return self.cache.attach_volume(volume_id);
            }
            let appeared = self.runtime.block_on(ec2::wait_for(
                &format!("volume {volume_id} appearing as a block device"),
                Duration::from_secs(120),
                || async { Ok(host::find_device(volume_id, &device)) },
            ));
            appeared.map_err(|_| Error::DeviceMissing { volume: volume_id.to_string(), device: device.clone() }.into())
        });
        if found.is_err() {
            // The journal records the attachment only once this returns: undo it here.
            let _ = self.runtime.block_on(self.ec2.detach(volume_id, &instance));
        }
        found
    }

    fn detach_volume(&self, volume_id: &str, device: &Path) -> Result<()> {
        if self.mode == Mode::Direct || self.loop_devices {
            self.cache.detach_volume(volume_id, device)?;
        }
        if self.mode == Mode::Attach {
            self.runtime.block_on(self.ec2.detach(volume_id, &self.host().instance_id))?;
        }
        Ok(())
    }

    fn delete_volume(&self, volume_id: &str) -> Result<()> {
        let local = self.cache.has_volume(volume_id);
        if local {
            self.cache.delete_volume(volume_id)?;
        }
        if self.mode == Mode::Attach {
            self.runtime.block_on(self.ec2.delete_volume(volume_id))?;
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
        if self.mode == Mode::Attach {
            let id =
                self.runtime.block_on(self.ec2.create_snapshot(volume_id, description, &self.in_progress_tags()))?;
            if let Err(error) = self.runtime.block_on(self.ec2.wait_snapshot_completed(&id)) {
                let _ = self.runtime.block_on(self.ec2.delete_snapshot(&id));
                return Err(error.into());
            }
            return Ok(SnapshotResult { id, changed_blocks: 0, stored_bytes: 0 });
        }

        // The local snapshot says which blocks differ from the base; only those are uploaded.
        let local = self.cache.snapshot_volume(volume_id, parent, description, cancel, progress)?;
        let store = self.cache.store();
        let result = (|| -> Result<SnapshotResult> {
            let child = store.snapshot(&local.id)?;
            let base = parent.map(|p| store.snapshot(p)).transpose()?;
            let empty = BTreeMap::new();
            let base_blocks = base.as_ref().map_or(&empty, |b| &b.blocks);
            let changed: BTreeSet<u64> = child
                .blocks
                .iter()
                .filter(|(i, h)| base_blocks.get(i) != Some(h))
                .map(|(i, _)| *i)
                .chain(base_blocks.keys().filter(|i| !child.blocks.contains_key(i)).copied())
                .collect();
            let upload = Upload {
                parent: parent.map(str::to_string),
                volume_size: child.volume_size,
                description: description.to_string(),
                client_token: local.id.clone(),
                tags: self.in_progress_tags(),
                kms_key: self.options.kms_key.clone(),
                blocks: changed.into_iter().collect(),
                skip_zero: parent.is_none(),
            };
            let uploaded = self.upload(&self.cache.volume_file(volume_id), upload, cancel, progress)?;
            // Keep the result in the cache under its EBS id: a bake on top of this image, or
            // an export of it, then downloads nothing.
            store
                .save_snapshot(&crate::local::store::SnapshotManifest { id: uploaded.snapshot_id.clone(), ..child })?;
            Ok(SnapshotResult {
                id: uploaded.snapshot_id,
                changed_blocks: uploaded.blocks,
                stored_bytes: uploaded.bytes,
            })
        })();
        if let Err(error) = store.delete_snapshot(&local.id) {
            tracing::warn!(snapshot = %local.id, %error, "could not remove the local snapshot record; gc will");
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
        let file = File::open(path).context(OpenSnafu { path })?;
        let size = file.metadata().context(OpenSnafu { path })?.len();
        // Holes are never read: a 4 GiB disk with 700 MB of data costs 700 MB of reading.
        let blocks = sparse::data_blocks(&file, BLOCK_SIZE as u64)?.without_parent().to_read;
        let upload = Upload {
            parent: None,
            volume_size: size,
            description: description.to_string(),
            client_token: crate::ids::new_id("push"),
            tags: self.in_progress_tags(),
            kms_key: self.options.kms_key.clone(),
            blocks,
            skip_zero: true,
        };
        let uploaded = self.upload(path, upload, cancel, progress)?;
        Ok(SnapshotResult { id: uploaded.snapshot_id, changed_blocks: uploaded.blocks, stored_bytes: uploaded.bytes })
    }

    fn delete_snapshot(&self, snapshot_id: &str) -> Result<()> {
        self.cache.store().delete_snapshot(snapshot_id)?;
        Ok(self.runtime.block_on(self.ec2.delete_snapshot(snapshot_id))?)
    }

    fn register_image(&self, request: &ImageRequest) -> Result<Image> {
        self.runtime.block_on(async {
            let parent = request.parent.as_ref();
            let boot_mode = match parent {
                Some(p) if crate::ids::is_id("ami", &p.id) => self.ec2.boot_mode(&p.id).await?,
                _ => None,
            };
            let volume_size = parent.map_or(0, |p| p.volume_size).div_ceil(1 << 30).max(1);
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
            let mut copies = Vec::new();
            let finish = async {
                self.ec2.tag(&[&id, &request.snapshot_id], &request.tags).await?;
                self.ec2.wait_image_available(&id).await?;
                let registered = BTreeMap::from([(STATUS_TAG.to_string(), "registered".to_string())]);
                self.ec2.tag(&[&request.snapshot_id], &registered).await?;
                if !self.options.share_with.is_empty() {
                    self.ec2.share(&id, &request.snapshot_id, &self.options.share_with).await?;
                }
                let mut image = self
                    .ec2
                    .images(&[&id], &[])
                    .await?
                    .into_iter()
                    .next()
                    .ok_or_else(|| format!("image {id} vanished right after it was registered"))?;
                copies = self.copy_to_regions(&image).await?;
                if !copies.is_empty() {
                    let list = copies.iter().map(|(r, i)| format!("{r}={i}")).collect::<Vec<_>>().join(",");
                    let tag = BTreeMap::from([(COPIES_TAG.to_string(), list)]);
                    self.ec2.tag(&[&id], &tag).await?;
                    image.tags.extend(tag);
                }
                Ok::<_, crate::provider::Error>(image)
            };
            match finish.await {
                Ok(image) => Ok(image),
                Err(error) => {
                    // The journal only learns of the image once this returns: undo it here.
                    self.delete_copies(&copies).await;
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

    fn delete_image(&self, image_id: &str) -> Result<()> {
        self.runtime.block_on(self.delete_image_async(&self.ec2, image_id))
    }

    fn export_image(&self, image_id: &str, out: &Path, cancel: &AtomicBool) -> Result<()> {
        let image = self.find_image(image_id)?.ok_or_else(|| format!("image {image_id} not found"))?;
        let snapshot = ec2::root_snapshot(&image)?;
        self.mirror(snapshot)?;
        let manifest = self.cache.store().snapshot(snapshot)?;
        Ok(self.cache.store().materialize(&manifest, out, cancel)?)
    }

    fn collect_garbage(&self, dry_run: bool, live: &[crate::journal::Resource]) -> Result<GcReport> {
        // Mirrors of snapshots that no longer exist go first, so their blocks and disks follow.
        let mut evicted = Vec::new();
        for id in self.cache.store().snapshot_ids()? {
            let gone = self.runtime.block_on(self.ec2.snapshot_exists(&id)).map(|exists| !exists)?;
            if gone {
                if !dry_run {
                    self.cache.store().delete_snapshot(&id)?;
                }
                evicted.push(format!("cached mirror of deleted snapshot {id}"));
            }
        }
        let mut report = self.cache.collect_garbage(dry_run, live)?;
        report.removed.extend(evicted);
        let cutoff = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_sub(self.options.gc_older_than)
            .as_secs() as i64;
        let live: BTreeSet<String> = live
            .iter()
            .filter_map(|r| match r {
                crate::journal::Resource::Volume { id } | crate::journal::Resource::Snapshot { id } => Some(id.clone()),
                _ => None,
            })
            .collect();
        self.runtime.block_on(async {
            let volumes =
                self.ec2.bake_volumes().await?.into_iter().map(|(id, bake, created)| (id, bake, created, true));
            let snapshots = self
                .ec2
                .unfinished_snapshots()
                .await?
                .into_iter()
                .map(|(id, bake, created)| (id, bake, created, false));
            for (id, bake, created, is_volume) in volumes.chain(snapshots) {
                let what =
                    if is_volume { format!("volume {id} of bake {bake}") } else { format!("unfinished snapshot {id}") };
                if created > cutoff || live.contains(&id) {
                    report.kept_live.push(format!("{what} (younger than --older-than, or a live bake's)"));
                    continue;
                }
                if !dry_run {
                    let removed = match is_volume {
                        true => {
                            if let Some(host) = &self.host {
                                let _ = self.ec2.detach(&id, &host.instance_id).await;
                            }
                            self.ec2.delete_volume(&id).await
                        }
                        false => self.ec2.delete_snapshot(&id).await,
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
        })?;
        Ok(report)
    }
}

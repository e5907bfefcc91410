//! The EC2 calls a bake makes: images, volumes, attachments, snapshots and tags. Every call
//! goes through the one retry layer; every wait is bounded.

use super::retry::{retry, CallError, Policy};
use crate::provider::Image;
use aws_sdk_ec2::types::{
    ArchitectureValues, BlockDeviceMapping, BootModeValues, EbsBlockDevice, Filter, ImageAttributeName,
    ImdsSupportValues, LaunchPermission, LaunchPermissionModifications, OperationType, ResourceType,
    SnapshotAttributeName, Tag, TagSpecification, VolumeType,
};
use snafu::{ResultExt, Snafu};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Debug, Snafu)]
pub enum Error {
    #[snafu(display("{source}"))]
    Call { source: CallError },

    #[snafu(display("{what} did not happen within {}", humantime::format_duration(*timeout)))]
    Timeout { what: String, timeout: Duration },

    #[snafu(display("{what} failed: {state}"))]
    Failed { what: String, state: String },

    #[snafu(display("cancelled while waiting for {what}"))]
    Cancelled { what: String },
}

pub type Result<T> = std::result::Result<T, Error>;

fn tags(map: &BTreeMap<String, String>) -> Vec<Tag> {
    map.iter().map(|(k, v)| Tag::builder().key(k).value(v).build()).collect()
}

fn tag_spec(kind: ResourceType, map: &BTreeMap<String, String>) -> TagSpecification {
    TagSpecification::builder().resource_type(kind).set_tags(Some(tags(map))).build()
}

fn filter(name: &str, value: &str) -> Filter {
    Filter::builder().name(name).values(value).build()
}

/// Polls `check` with a growing interval until it yields a value or `timeout` passes.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let started = Instant::now();
    let mut interval = Duration::from_millis(100);
    loop {
        if let Some(value) = check().await? {
            return Ok(value);
        }
        if started.elapsed() >= timeout {
            return TimeoutSnafu { what, timeout }.fail();
        }
        tokio::time::sleep(interval).await;
        interval = (interval * 2).min(Duration::from_secs(5));
    }
}

/// What RegisterImage needs beyond the snapshot: copied from the base image.
pub struct Registration<'a> {
    pub name: &'a str,
    pub description: &'a str,
    pub snapshot_id: &'a str,
    pub architecture: &'a str,
    pub root_device_name: &'a str,
    pub volume_size_gib: i32,
    pub boot_mode: &'a str,
    pub tags: &'a BTreeMap<String, String>,
}

#[derive(Clone)]
pub struct Ec2 {
    pub client: aws_sdk_ec2::Client,
    pub policy: Policy,
    /// Bound on every wait.
    pub timeout: Duration,
    /// Ctrl-C: waits stop at their next poll.
    pub cancel: Arc<AtomicBool>,
}

impl Ec2 {
    /// [`wait_for`] bounded by `self.timeout` that stops when Ctrl-C sets `self.cancel`.
    pub async fn wait<T, F, Fut>(&self, what: &str, mut check: F) -> Result<T>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<Option<T>>>,
    {
        wait_for(what, self.timeout, || {
            let cancelled = self.cancel.load(Ordering::Relaxed);
            let poll = check();
            async move {
                snafu::ensure!(!cancelled, CancelledSnafu { what });
                poll.await
            }
        })
        .await
    }

    pub async fn images(&self, ids: &[&str], filters: &[(&str, &str)]) -> Result<Vec<Image>> {
        let ids: Vec<String> = ids.iter().map(|s| s.to_string()).collect();
        let filters: Vec<Filter> = filters.iter().map(|(n, v)| filter(n, v)).collect();
        let output = retry(self.policy, "DescribeImages", || {
            // By id, any image we may launch (a public base too); by filter, only our own.
            self.client
                .describe_images()
                .set_owners(ids.is_empty().then(|| vec!["self".to_string()]))
                .set_image_ids((!ids.is_empty()).then(|| ids.clone()))
                .set_filters((!filters.is_empty()).then(|| filters.clone()))
                .send()
        })
        .await;
        let output = match output {
            Err(e) if e.is_not_found() || e.code.as_deref() == Some("InvalidAMIID.Malformed") => return Ok(vec![]),
            other => other.context(CallSnafu)?,
        };
        // DescribeImages shows a deregistered image for a while after: it is gone.
        let live = output.images().iter().filter(|i| i.state() != Some(&aws_sdk_ec2::types::ImageState::Deregistered));
        let mut images: Vec<Image> = live.map(to_image).collect();
        images.sort_by(|a, b| b.created.cmp(&a.created));
        Ok(images)
    }

    /// The boot mode of an image; `None` when it has none or is not in this cloud (the local
    /// original of a push).
    pub async fn boot_mode(&self, image_id: &str) -> Result<Option<String>> {
        let output =
            retry(self.policy, "DescribeImages", || self.client.describe_images().image_ids(image_id).send()).await;
        let output = match output {
            Err(e) if e.is_not_found() => return Ok(None),
            other => other.context(CallSnafu)?,
        };
        Ok(output.images().first().and_then(|i| i.boot_mode()).map(|m| m.as_str().to_string()))
    }

    /// Registers the image, its tags in the request; the caller also sets them with CreateTags,
    /// which is what DescribeImages is sure to show. A retry whose first attempt went through
    /// finds the image by its (unique) name and adopts it when it holds our snapshot.
    pub async fn register(&self, r: &Registration<'_>) -> Result<String> {
        let mapping = BlockDeviceMapping::builder()
            .device_name(r.root_device_name)
            .ebs(
                EbsBlockDevice::builder()
                    .snapshot_id(r.snapshot_id)
                    .volume_size(r.volume_size_gib)
                    .volume_type(VolumeType::Gp3)
                    .delete_on_termination(true)
                    .build(),
            )
            .build();
        let output = retry(self.policy, "RegisterImage", || {
            self.client
                .register_image()
                .name(r.name)
                .description(r.description)
                .architecture(ArchitectureValues::from(r.architecture))
                .root_device_name(r.root_device_name)
                .block_device_mappings(mapping.clone())
                .virtualization_type("hvm")
                .ena_support(true)
                .sriov_net_support("simple")
                .boot_mode(BootModeValues::from(r.boot_mode))
                .imds_support(ImdsSupportValues::V20)
                .tag_specifications(tag_spec(ResourceType::Image, r.tags))
                .send()
        })
        .await;
        match output {
            Ok(output) => Ok(output.image_id().unwrap_or_default().to_string()),
            Err(e) if e.attempts > 1 && e.code.as_deref() == Some("InvalidAMIName.Duplicate") => {
                let ours = self.images(&[], &[("name", r.name)]).await?;
                match ours.into_iter().find(|i| i.snapshot_id == r.snapshot_id) {
                    Some(image) => Ok(image.id),
                    None => Err(e).context(CallSnafu),
                }
            }
            Err(e) => Err(e).context(CallSnafu),
        }
    }

    pub async fn wait_image_available(&self, id: &str) -> Result<()> {
        self.wait(&format!("image {id} becoming available"), || async {
            let output =
                retry(self.policy, "DescribeImages", || self.client.describe_images().image_ids(id).send()).await;
            let output = match output {
                // Eventual consistency: a new image may not be visible yet.
                Err(e) if e.is_not_found() => return Ok(None),
                other => other.context(CallSnafu)?,
            };
            match output.images().first().and_then(|i| i.state()).map(|s| s.as_str()) {
                Some("available") => Ok(Some(())),
                Some(state @ ("failed" | "error" | "invalid")) => {
                    FailedSnafu { what: format!("image {id}"), state }.fail()
                }
                _ => Ok(None),
            }
        })
        .await
    }

    pub async fn tag(&self, resources: &[&str], map: &BTreeMap<String, String>) -> Result<()> {
        let ids: Vec<String> = resources.iter().map(|s| s.to_string()).collect();
        retry(self.policy, "CreateTags", || {
            self.client.create_tags().set_resources(Some(ids.clone())).set_tags(Some(tags(map))).send()
        })
        .await
        .context(CallSnafu)?;
        Ok(())
    }

    /// Deregistration protection on or off (off at once: no cooldown). Missing: done.
    pub async fn protect(&self, id: &str, protected: bool) -> Result<()> {
        let changed = match protected {
            true => retry(self.policy, "EnableImageDeregistrationProtection", || {
                self.client.enable_image_deregistration_protection().image_id(id).send()
            })
            .await
            .map(|_| ()),
            false => retry(self.policy, "DisableImageDeregistrationProtection", || {
                self.client.disable_image_deregistration_protection().image_id(id).send()
            })
            .await
            .map(|_| ()),
        };
        ignore_missing(changed)
    }

    /// Deprecated from now on, or no longer. Missing: done.
    pub async fn deprecate(&self, id: &str, deprecated: bool) -> Result<()> {
        if !deprecated {
            return ignore_missing(
                retry(self.policy, "DisableImageDeprecation", || {
                    self.client.disable_image_deprecation().image_id(id).send()
                })
                .await,
            );
        }
        // EC2 rounds the time to the minute and wants it in the future.
        let at = aws_smithy_types::DateTime::from_secs(crate::ids::unix_now() as i64 + 60);
        ignore_missing(
            retry(self.policy, "EnableImageDeprecation", || {
                self.client.enable_image_deprecation().image_id(id).deprecate_at(at).send()
            })
            .await,
        )
    }

    pub async fn deregister(&self, id: &str) -> Result<()> {
        ignore_missing(
            retry(self.policy, "DeregisterImage", || self.client.deregister_image().image_id(id).send()).await,
        )
    }

    pub async fn delete_snapshot(&self, id: &str) -> Result<()> {
        ignore_missing(
            retry(self.policy, "DeleteSnapshot", || self.client.delete_snapshot().snapshot_id(id).send()).await,
        )
    }

    /// Creates the volume and returns its id at once; the caller waits for it (and deletes it if
    /// the wait fails). `token` makes a retried call return the same volume.
    pub async fn create_volume(
        &self,
        snapshot_id: &str,
        zone: &str,
        kms_key: Option<&str>,
        map: &BTreeMap<String, String>,
        token: &str,
    ) -> Result<String> {
        let output = retry(self.policy, "CreateVolume", || {
            self.client
                .create_volume()
                .client_token(token)
                .snapshot_id(snapshot_id)
                .availability_zone(zone)
                .volume_type(VolumeType::Gp3)
                .set_encrypted(kms_key.map(|_| true))
                .set_kms_key_id(kms_key.map(str::to_string))
                .tag_specifications(tag_spec(ResourceType::Volume, map))
                .send()
        })
        .await
        .context(CallSnafu)?;
        Ok(output.volume_id().unwrap_or_default().to_string())
    }

    /// Waits for a volume to reach `state`, or for its attachment to reach it when the state is
    /// an attachment state (`attached`).
    pub async fn wait_volume(&self, id: &str, state: &str) -> Result<()> {
        self.wait(&format!("volume {id} becoming {state}"), || async {
            let output =
                retry(self.policy, "DescribeVolumes", || self.client.describe_volumes().volume_ids(id).send()).await;
            let output = match output {
                // Eventual consistency: a new volume may not be visible yet.
                Err(e) if e.is_not_found() => return Ok(None),
                other => other.context(CallSnafu)?,
            };
            let Some(volume) = output.volumes().first() else { return Ok(None) };
            let volume_state = volume.state().map(|s| s.as_str()).unwrap_or_default();
            if volume_state == "error" {
                return FailedSnafu { what: format!("volume {id}"), state: volume_state }.fail();
            }
            let attachment = volume.attachments().first().and_then(|a| a.state()).map(|s| s.as_str());
            Ok((volume_state == state || attachment == Some(state)).then_some(()))
        })
        .await
    }

    pub async fn attach(&self, volume: &str, instance: &str, device: &str) -> Result<()> {
        retry(self.policy, "AttachVolume", || {
            self.client.attach_volume().volume_id(volume).instance_id(instance).device(device).send()
        })
        .await
        .context(CallSnafu)?;
        self.wait_volume(volume, "attached").await
    }

    /// Detaches (InstanceId included: it is what EC2 needs to find the attachment quickly, and
    /// moto needs it at all) and waits for the volume to be available. Already detached: done.
    pub async fn detach(&self, volume: &str, instance: &str) -> Result<()> {
        let detached = retry(self.policy, "DetachVolume", || {
            self.client.detach_volume().volume_id(volume).instance_id(instance).send()
        })
        .await;
        match detached {
            Err(e) if e.is_not_found() => return Ok(()),
            // Already detached, or detaching: available soon, if not already.
            Err(e) if e.code.as_deref() == Some("IncorrectState") => {}
            other => {
                other.context(CallSnafu)?;
            }
        };
        self.wait_volume(volume, "available").await
    }

    /// Device names EC2 has given to volumes attached to `instance`.
    pub async fn attached_devices(&self, instance: &str) -> Result<std::collections::BTreeSet<String>> {
        let output = retry(self.policy, "DescribeVolumes", || {
            self.client.describe_volumes().filters(filter("attachment.instance-id", instance)).send()
        })
        .await
        .context(CallSnafu)?;
        Ok(output
            .volumes()
            .iter()
            .flat_map(|v| v.attachments())
            .filter(|a| a.instance_id() == Some(instance))
            .filter_map(|a| a.device().map(str::to_string))
            .collect())
    }

    /// Deletes a dead bake's volume, detaching it first from whatever instance EC2 says it is
    /// attached to: a bake killed after attaching leaves it so, and its device name taken.
    pub async fn detach_and_delete_volume(&self, id: &str) -> Result<()> {
        let described =
            retry(self.policy, "DescribeVolumes", || self.client.describe_volumes().volume_ids(id).send()).await;
        let described = match described {
            Err(e) if e.is_not_found() => return Ok(()),
            other => other.context(CallSnafu)?,
        };
        for attachment in described.volumes().iter().flat_map(|v| v.attachments()) {
            if let Some(instance) = attachment.instance_id() {
                self.detach(id, instance).await?;
            }
        }
        self.delete_volume(id).await
    }

    pub async fn delete_volume(&self, id: &str) -> Result<()> {
        ignore_missing(retry(self.policy, "DeleteVolume", || self.client.delete_volume().volume_id(id).send()).await)
    }

    /// Snapshots `volume`, which must be the caller's own (a bake's): CreateSnapshot takes no
    /// client token, so when an attempt's reply was lost its snapshot is found as another
    /// snapshot of the volume and deleted.
    pub async fn create_snapshot(
        &self,
        volume: &str,
        description: &str,
        map: &BTreeMap<String, String>,
    ) -> Result<String> {
        let attempts = std::sync::atomic::AtomicU32::new(0);
        let output = retry(self.policy, "CreateSnapshot", || {
            attempts.fetch_add(1, Ordering::Relaxed);
            self.client
                .create_snapshot()
                .volume_id(volume)
                .description(description)
                .tag_specifications(tag_spec(ResourceType::Snapshot, map))
                .send()
        })
        .await
        .context(CallSnafu)?;
        let id = output.snapshot_id().unwrap_or_default().to_string();
        if attempts.load(Ordering::Relaxed) > 1 {
            let of_volume = retry(self.policy, "DescribeSnapshots", || {
                self.client.describe_snapshots().owner_ids("self").filters(filter("volume-id", volume)).send()
            })
            .await
            .context(CallSnafu)?;
            for other in of_volume.snapshots().iter().filter_map(|s| s.snapshot_id()).filter(|other| *other != id) {
                tracing::info!(snapshot = other, "deleting the snapshot of an attempt whose reply was lost");
                self.delete_snapshot(other).await?;
            }
        }
        Ok(id)
    }

    pub async fn wait_snapshot_completed(&self, id: &str) -> Result<()> {
        self.wait(&format!("snapshot {id} completing"), || async {
            let output =
                retry(self.policy, "DescribeSnapshots", || self.client.describe_snapshots().snapshot_ids(id).send())
                    .await;
            let output = match output {
                Err(e) if e.is_not_found() => return Ok(None),
                other => other.context(CallSnafu)?,
            };
            let state = output.snapshots().first().and_then(|s| s.state()).map(|s| s.as_str().to_string());
            match state.as_deref() {
                Some("completed") => Ok(Some(())),
                Some("error") => FailedSnafu { what: format!("snapshot {id}"), state: "error" }.fail(),
                _ => Ok(None),
            }
        })
        .await
    }

    pub async fn snapshot_exists(&self, id: &str) -> Result<bool> {
        let output =
            retry(self.policy, "DescribeSnapshots", || self.client.describe_snapshots().snapshot_ids(id).send()).await;
        match output {
            Err(e) if e.is_not_found() => Ok(false),
            other => Ok(!other.context(CallSnafu)?.snapshots().is_empty()),
        }
    }

    /// Who else may launch `image`: account ids, `group:all` when it is public. Missing: none.
    pub async fn launch_permissions(&self, image: &str) -> Result<Vec<String>> {
        let output = retry(self.policy, "DescribeImageAttribute", || {
            self.client
                .describe_image_attribute()
                .image_id(image)
                .attribute(ImageAttributeName::LaunchPermission)
                .send()
        })
        .await;
        let output = match output {
            Err(e) if e.is_not_found() => return Ok(Vec::new()),
            other => other.context(CallSnafu)?,
        };
        Ok(output
            .launch_permissions()
            .iter()
            .filter_map(|p| {
                p.user_id()
                    .map(str::to_string)
                    .or_else(|| p.group().map(|g| format!("group:{}", g.as_str())))
                    .or_else(|| p.organization_arn().map(str::to_string))
                    .or_else(|| p.organizational_unit_arn().map(str::to_string))
            })
            .collect())
    }

    /// Grants launch permission on the image and create-volume permission on its snapshot.
    pub async fn share(&self, image: &str, snapshot: &str, accounts: &[String]) -> Result<()> {
        let launch: Vec<LaunchPermission> =
            accounts.iter().map(|a| LaunchPermission::builder().user_id(a).build()).collect();
        retry(self.policy, "ModifyImageAttribute", || {
            self.client
                .modify_image_attribute()
                .image_id(image)
                .launch_permission(LaunchPermissionModifications::builder().set_add(Some(launch.clone())).build())
                .send()
        })
        .await
        .context(CallSnafu)?;
        // The OperationType + UserId form: EC2 takes it as it takes the structured one.
        retry(self.policy, "ModifySnapshotAttribute", || {
            self.client
                .modify_snapshot_attribute()
                .snapshot_id(snapshot)
                .attribute(SnapshotAttributeName::CreateVolumePermission)
                .operation_type(OperationType::Add)
                .set_user_ids(Some(accounts.to_vec()))
                .send()
        })
        .await
        .context(CallSnafu)?;
        Ok(())
    }

    /// Starts copying an image from `source_region` into this client's region, tagged alike;
    /// returns the copy's id at once (the caller waits, and deletes it on failure).
    pub async fn copy_from(
        &self,
        source_region: &str,
        image: &Image,
        kms_key: Option<&str>,
        token: &str,
    ) -> Result<String> {
        let output = retry(self.policy, "CopyImage", || {
            self.client
                .copy_image()
                .source_region(source_region)
                .source_image_id(&image.id)
                .name(&image.name)
                .description(&image.description)
                .client_token(token)
                .set_encrypted(kms_key.map(|_| true))
                .set_kms_key_id(kms_key.map(str::to_string))
                .tag_specifications(tag_spec(ResourceType::Image, &image.tags))
                .send()
        })
        .await
        .context(CallSnafu)?;
        Ok(output.image_id().unwrap_or_default().to_string())
    }

    /// Volumes a bake tagged: id, bake id, creation time (unix seconds). Every page, each read
    /// through the retry layer.
    pub async fn bake_volumes(&self) -> Result<Vec<(String, String, i64)>> {
        let mut found = Vec::new();
        let mut token = None;
        loop {
            let page = retry(self.policy, "DescribeVolumes", || {
                self.client
                    .describe_volumes()
                    .filters(filter("tag-key", crate::tags::BAKE_ID))
                    .set_next_token(token.clone())
                    .send()
            })
            .await
            .context(CallSnafu)?;
            found.extend(page.volumes().iter().map(|v| {
                let created = v.create_time().map(|t| t.secs()).unwrap_or_default();
                (v.volume_id().unwrap_or_default().to_string(), bake_id(v.tags()), created)
            }));
            token = page.next_token().map(str::to_string);
            if token.is_none() {
                return Ok(found);
            }
        }
    }

    /// Snapshots still tagged `in-progress`: id, bake id, start time (unix seconds).
    pub async fn unfinished_snapshots(&self) -> Result<Vec<(String, String, i64)>> {
        let mut found = Vec::new();
        let mut token = None;
        loop {
            let page = retry(self.policy, "DescribeSnapshots", || {
                self.client
                    .describe_snapshots()
                    .owner_ids("self")
                    .filters(filter(&format!("tag:{}", crate::tags::STATUS), "in-progress"))
                    .set_next_token(token.clone())
                    .send()
            })
            .await
            .context(CallSnafu)?;
            found.extend(page.snapshots().iter().map(|s| {
                let created = s.start_time().map(|t| t.secs()).unwrap_or_default();
                (s.snapshot_id().unwrap_or_default().to_string(), bake_id(s.tags()), created)
            }));
            token = page.next_token().map(str::to_string);
            if token.is_none() {
                return Ok(found);
            }
        }
    }
}

/// The bake a resource was tagged with, or "" for none.
fn bake_id(tags: &[Tag]) -> String {
    tags.iter().find(|t| t.key() == Some(crate::tags::BAKE_ID)).and_then(|t| t.value()).unwrap_or_default().to_string()
}

fn ignore_missing<T>(result: std::result::Result<T, CallError>) -> Result<()> {
    match result {
        Err(e) if e.is_not_found() => Ok(()),
        other => other.map(|_| ()).context(CallSnafu),
    }
}

fn to_image(image: &aws_sdk_ec2::types::Image) -> Image {
    let root = image.root_device_name().unwrap_or("/dev/xvda").to_string();
    let ebs = image.block_device_mappings().iter().find(|m| m.device_name() == Some(&root)).and_then(|m| m.ebs());
    Image {
        id: image.image_id().unwrap_or_default().to_string(),
        name: image.name().unwrap_or_default().to_string(),
        description: image.description().unwrap_or_default().to_string(),
        snapshot_id: ebs.and_then(|e| e.snapshot_id()).unwrap_or_default().to_string(),
        volume_size: ebs.and_then(|e| e.volume_size()).unwrap_or_default() as u64 * (1 << 30),
        architecture: image.architecture().map(|a| a.as_str()).unwrap_or("x86_64").to_string(),
        root_device_name: root,
        created: image.creation_date().unwrap_or_default().to_string(),
        tags: image
            .tags()
            .iter()
            .filter_map(|t| Some((t.key()?.to_string(), t.value().unwrap_or_default().to_string())))
            .collect(),
    }
}

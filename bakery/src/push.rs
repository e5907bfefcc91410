//! `bakery push`: a locally built image (a base image, usually) into a cloud provider. Its disk
//! is uploaded as a new snapshot (the target's `import_disk`: holes skipped, only non-zero
//! blocks sent), then registered with the local image's name and tags. Pushing the same local
//! image again returns the image pushed before.

use crate::events::{Sink, Unit};
use crate::journal::Resource;
use crate::local::LocalProvider;
use crate::provider::{Image, ImageRequest, Provider, SnapshotResult};
use crate::tags;
use crate::txn::{self, Step, StepResult, Tx};
use serde::Serialize;
use snafu::{OptionExt, ResultExt, Snafu};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::time::Instant;

#[derive(Debug, Snafu)]
pub enum Error {
    #[snafu(display("local image {id} not found"))]
    NotFound { id: String },

    #[snafu(display("{step}: {source}"))]
    Lookup { step: &'static str, source: crate::provider::Error },

    #[snafu(display("{source}"))]
    Run { source: txn::Error },
}

impl Error {
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::NotFound { .. } => 4,
            Error::Run { source } => source.exit_code(),
            Error::Lookup { .. } => 1,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct PushOutcome {
    pub image_id: String,
    pub snapshot_id: String,
    pub name: String,
    pub source_image_id: String,
    pub uploaded_blocks: u64,
    pub uploaded_bytes: u64,
    pub duration_ms: u64,
    pub reused: bool,
}

/// What the push's steps share.
struct Push {
    source: Image,
    disk: PathBuf,
    snapshot: Option<SnapshotResult>,
    image: Option<Image>,
}

const STEPS: &[Step<Push>] =
    &[Step { name: "upload the disk", run: upload }, Step { name: "register the image", run: register }];

pub fn push(
    local: &LocalProvider,
    target: &dyn Provider,
    state_dir: &Path,
    image_id: &str,
    events: &dyn Sink,
    cancel: &AtomicBool,
) -> Result<PushOutcome, Error> {
    let started = Instant::now();
    let image = local
        .images()
        .find_image(image_id)
        .context(LookupSnafu { step: "looking up the local image" })?
        .context(NotFoundSnafu { id: image_id })?;
    let pushed = target
        .images()
        .images_tagged(tags::PUSHED_FROM, &image.id)
        .context(LookupSnafu { step: "looking for an earlier push" })?;
    if let Some(earlier) = pushed.into_iter().next() {
        return Ok(PushOutcome {
            image_id: earlier.id,
            snapshot_id: earlier.snapshot_id,
            name: earlier.name,
            source_image_id: image.id,
            uploaded_blocks: 0,
            uploaded_bytes: 0,
            duration_ms: started.elapsed().as_millis() as u64,
            reused: true,
        });
    }
    let disk = local.image_disk(&image).context(LookupSnafu { step: "materialising the local disk" })?;

    let id = crate::ids::new_id("push");
    let what = format!("push {}", image.id);
    let mut push = Push { source: image, disk, snapshot: None, image: None };
    let kept = |push: &Push| txn::image_and_snapshot(&push.image, &push.snapshot);
    txn::run(state_dir, &id, &what, target, cancel, events, &mut push, STEPS, kept).context(RunSnafu)?;
    let registered = push.image.expect("the register step sets the image");
    let snapshot = push.snapshot.expect("the upload step sets the snapshot");
    Ok(PushOutcome {
        image_id: registered.id,
        snapshot_id: snapshot.id,
        name: registered.name,
        source_image_id: push.source.id,
        uploaded_blocks: snapshot.changed_blocks,
        uploaded_bytes: snapshot.stored_bytes,
        duration_ms: started.elapsed().as_millis() as u64,
        reused: false,
    })
}

fn upload(push: &mut Push, tx: &mut Tx) -> StepResult {
    let progress = tx.progress(Unit::Blocks);
    let description = format!("{} (pushed from local image {})", push.source.description, push.source.id);
    let snapshot = tx.provider.volumes().import_disk(&push.disk, &description, tx.cancel, &progress)?;
    tx.created(Resource::Snapshot { id: snapshot.id.clone() })?;
    push.snapshot = Some(snapshot);
    Ok(())
}

fn register(push: &mut Push, tx: &mut Tx) -> StepResult {
    let snapshot = push.snapshot.as_ref().expect("the upload step ran");
    let mut tags = push.source.tags.clone();
    tags.insert(tags::PUSHED_FROM.to_string(), push.source.id.clone());
    let request = ImageRequest {
        name: push.source.name.clone(),
        description: push.source.description.clone(),
        snapshot_id: snapshot.id.clone(),
        volume_size: push.source.volume_size,
        tags,
        parent: Some(push.source.clone()),
        documents: Default::default(),
    };
    let registered = tx.provider.images().register_image(&request)?;
    tx.created(Resource::Image { id: registered.id.clone() })?;
    push.image = Some(registered);
    Ok(())
}

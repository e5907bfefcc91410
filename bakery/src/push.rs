//! `bakery push`: a locally built image (a base image, usually) into a cloud provider. Its disk
//! is uploaded as a new snapshot (the provider's `import_disk`: holes skipped, only non-zero
//! blocks sent), then registered with the local image's name and tags. Pushing the same local
//! image again returns the image pushed before.

use crate::journal::{Journal, Resource};
use crate::local::LocalProvider;
use crate::provider::{ImageRequest, Provider};
use crate::ui::Ui;
use serde::Serialize;
use snafu::{OptionExt, ResultExt, Snafu};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Tag on a pushed image naming the local image it came from.
pub const PUSHED_FROM_TAG: &str = "bakery:pushed-from";

#[derive(Debug, Snafu)]
pub enum Error {
    #[snafu(display("local image {id} not found"))]
    NotFound { id: String },

    #[snafu(display("{step}: {source}"))]
    Step { step: &'static str, source: crate::provider::Error },

    #[snafu(display("push journal: {source}"))]
    Journal { source: crate::journal::Error },

    #[snafu(display("interrupted; the partial upload was removed"))]
    Interrupted,
}

impl Error {
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::NotFound { .. } => 4,
            Error::Interrupted => 130,
            _ => 1,
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

pub fn push(
    local: &LocalProvider,
    target: &dyn Provider,
    state_dir: &Path,
    image_id: &str,
    ui: &Ui,
    cancel: &AtomicBool,
) -> Result<PushOutcome, Error> {
    let started = Instant::now();
    let step = |step: &'static str| move |source: crate::provider::Error| Error::Step { step, source };
    let image = local
        .find_image(image_id)
        .map_err(step("looking up the local image"))?
        .context(NotFoundSnafu { id: image_id })?;
    let pushed = target.images_tagged(PUSHED_FROM_TAG, &image.id).map_err(step("looking for an earlier push"))?;
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
    let manifest =
        local.store().snapshot(&image.snapshot_id).map_err(|e| step("reading the local snapshot")(e.into()))?;
    let disk = local.cached_image(&manifest).map_err(step("materialising the local disk"))?;

    let push_id = crate::ids::new_id("push");
    let mut journal =
        Journal::begin(state_dir, &push_id, &format!("push {}", image.id), target.kind()).context(JournalSnafu)?;
    let result = (|| {
        let bar = ui.bar(0, "upload blocks", false);
        let description = format!("{} (pushed from local image {})", image.description, image.id);
        let snapshot = target
            .import_disk(&disk, &description, cancel, &|done, total| {
                bar.set_length(total);
                bar.set_position(done);
            })
            .map_err(step("uploading the disk"))?;
        bar.finish_and_clear();
        journal.push(Resource::Snapshot { id: snapshot.id.clone() }).context(JournalSnafu)?;
        if cancel.load(Ordering::Relaxed) {
            return InterruptedSnafu.fail();
        }
        let mut tags = image.tags.clone();
        tags.insert(PUSHED_FROM_TAG.to_string(), image.id.clone());
        let request = ImageRequest {
            name: image.name.clone(),
            description: image.description.clone(),
            snapshot_id: snapshot.id.clone(),
            tags,
            parent: Some(image.clone()),
        };
        let registered = target.register_image(&request).map_err(step("registering the image"))?;
        journal.push(Resource::Image { id: registered.id.clone() }).context(JournalSnafu)?;
        Ok((snapshot, registered))
    })();
    match result {
        Ok((snapshot, registered)) => {
            for kept in [Resource::Image { id: registered.id.clone() }, Resource::Snapshot { id: snapshot.id.clone() }]
            {
                journal.keep(&kept).context(JournalSnafu)?;
            }
            journal.unwind_all(target).context(JournalSnafu)?;
            Ok(PushOutcome {
                image_id: registered.id,
                snapshot_id: snapshot.id,
                name: registered.name,
                source_image_id: image.id,
                uploaded_blocks: snapshot.changed_blocks,
                uploaded_bytes: snapshot.stored_bytes,
                duration_ms: started.elapsed().as_millis() as u64,
                reused: false,
            })
        }
        Err(error) => {
            if let Err(cleanup) = journal.unwind_all(target) {
                tracing::error!(%cleanup, "undoing the push failed; `bakery gc --provider aws` will finish it");
            }
            // Ctrl-C during the upload surfaces as the upload's error: report it as an interruption.
            Err(if cancel.load(Ordering::Relaxed) { Error::Interrupted } else { error })
        }
    }
}

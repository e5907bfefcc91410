//! Base images built by the project itself: `base-images/NAME.toml` says which Debian suite and
//! packages, `base-images/build-disk.sh` turns that into a bootable GPT raw disk with mmdebstrap,
//! and the disk is imported as a snapshot and registered. Results are cached by a hash of the
//! recipe and the builder script: a rebuild with nothing changed costs a lookup.

use crate::journal::{Journal, Resource};
use crate::provider::{ImageRequest, Provider};
use crate::ui::Ui;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use snafu::{ensure, ResultExt, Snafu};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

pub const RECIPE_HASH_TAG: &str = "bakery:base-recipe-hash";
const BUILDER_SCRIPT: &str = "build-disk.sh";

#[derive(Debug, Snafu)]
pub enum Error {
    #[snafu(display("reading {}: {source}", path.display()))]
    Read { path: PathBuf, source: std::io::Error },

    #[snafu(display("{}: {source}", path.display()))]
    Parse { path: PathBuf, source: toml::de::Error },

    #[snafu(display("{}: {problem}", path.display()))]
    Invalid { path: PathBuf, problem: String },

    #[snafu(display("{source}"))]
    Journal { source: crate::journal::Error },

    #[snafu(display("{step}: {source}"))]
    Provider { step: &'static str, source: crate::provider::Error },

    #[snafu(display("running {}: {source}", script.display()))]
    Spawn { script: PathBuf, source: std::io::Error },

    #[snafu(display("{} failed ({status}); see its output above", script.display()))]
    BuildFailed { script: PathBuf, status: std::process::ExitStatus },

    #[snafu(display("interrupted; everything the build created was removed"))]
    Interrupted,
}

impl Error {
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Read { .. } | Error::Parse { .. } | Error::Invalid { .. } => 3,
            Error::Interrupted => 130,
            _ => 1,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// `base-images/*.toml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseRecipe {
    pub name: String,
    pub description: String,
    pub suite: String,
    pub disk_size_mib: u64,
    pub hostname: String,
    pub packages: Vec<String>,
}

#[derive(Debug, Serialize)]
pub struct BaseOutcome {
    pub image_id: String,
    pub name: String,
    pub snapshot_id: String,
    pub recipe_hash: String,
    pub stored_bytes: u64,
    pub duration_ms: u64,
    pub reused: bool,
}

fn load(path: &Path) -> Result<(BaseRecipe, String)> {
    let text = std::fs::read_to_string(path).context(ReadSnafu { path })?;
    let recipe: BaseRecipe = toml::from_str(&text).context(ParseSnafu { path })?;
    let invalid = |problem: &str| InvalidSnafu { path, problem: problem.to_string() };
    ensure!(
        !recipe.name.is_empty() && recipe.name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)),
        invalid("name must be letters, digits, '-', '.' or '_'")
    );
    ensure!(
        recipe.disk_size_mib >= 512 && recipe.disk_size_mib.is_multiple_of(2),
        invalid("disk_size_mib must be an even number ≥ 512")
    );
    ensure!(!recipe.packages.is_empty(), invalid("packages is empty"));
    let script = builder_script(path);
    let script_text = std::fs::read(&script).context(ReadSnafu { path: &script })?;
    let mut hasher = Sha256::new();
    hasher.update(text.as_bytes());
    hasher.update(&script_text);
    Ok((recipe, hex::encode(hasher.finalize())))
}

fn builder_script(recipe_path: &Path) -> PathBuf {
    recipe_path.parent().unwrap_or(Path::new(".")).join(BUILDER_SCRIPT)
}

/// Builds (or finds in the cache) the base image a recipe describes.
pub fn build(
    provider: &dyn Provider,
    state_dir: &Path,
    path: &Path,
    rebuild: bool,
    ui: &Ui,
    cancel: &AtomicBool,
) -> Result<BaseOutcome> {
    let started = Instant::now();
    let (recipe, hash) = load(path)?;
    if !rebuild {
        let cached =
            provider.images_tagged(RECIPE_HASH_TAG, &hash).context(ProviderSnafu { step: "looking up the cache" })?;
        if let Some(image) = cached.into_iter().next() {
            return Ok(BaseOutcome {
                image_id: image.id,
                name: image.name,
                snapshot_id: image.snapshot_id,
                recipe_hash: hash,
                stored_bytes: 0,
                duration_ms: started.elapsed().as_millis() as u64,
                reused: true,
            });
        }
    }

    let id = crate::ids::new_id("base");
    let mut journal = Journal::begin(state_dir, &id, &format!("base build {}", recipe.name), provider.kind())
        .context(JournalSnafu)?;
    let result = build_and_register(provider, state_dir, path, &recipe, &hash, &mut journal, ui, cancel);
    match result {
        Ok(outcome) => {
            journal.keep(&Resource::Image { id: outcome.image_id.clone() }).context(JournalSnafu)?;
            journal.keep(&Resource::Snapshot { id: outcome.snapshot_id.clone() }).context(JournalSnafu)?;
            journal.unwind_all(provider).context(JournalSnafu)?;
            Ok(BaseOutcome { duration_ms: started.elapsed().as_millis() as u64, ..outcome })
        }
        Err(error) => {
            if let Err(cleanup) = journal.unwind_all(provider) {
                tracing::error!(%cleanup, "cleanup after the failed build also failed; run `bakery gc`");
            }
            Err(error)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn build_and_register(
    provider: &dyn Provider,
    state_dir: &Path,
    path: &Path,
    recipe: &BaseRecipe,
    hash: &str,
    journal: &mut Journal,
    ui: &Ui,
    cancel: &AtomicBool,
) -> Result<BaseOutcome> {
    let work = state_dir.join("tmp").join(journal.id());
    journal.push(Resource::Dir { path: work.clone() }).context(JournalSnafu)?;
    std::fs::create_dir_all(&work).context(ReadSnafu { path: &work })?;
    // The builder wants its output outside its scratch directory.
    let disk = state_dir.join("tmp").join(format!("{}.raw", journal.id()));
    journal.push(Resource::File { path: disk.clone() }).context(JournalSnafu)?;
    // Run a copy: bash reads a script as it goes, so editing the original mid-build would bite.
    let script = work.join(BUILDER_SCRIPT);
    std::fs::copy(builder_script(path), &script).context(ReadSnafu { path: &script })?;
    ui.step(1, 3, "build the root filesystem and disk (mmdebstrap)");
    let mut child = Command::new("bash")
        .arg(&script)
        .args(["--suite", &recipe.suite, "--packages", &recipe.packages.join(",")])
        .args(["--disk-size-mib", &recipe.disk_size_mib.to_string(), "--hostname", &recipe.hostname])
        .arg("--out")
        .arg(&disk)
        .arg("--work")
        .arg(&work)
        .spawn()
        .context(SpawnSnafu { script: &script })?;
    let status = loop {
        if let Some(status) = child.try_wait().context(SpawnSnafu { script: &script })? {
            break status;
        }
        if cancel.load(Ordering::Relaxed) {
            // The script's own trap unmounts and detaches what it made.
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::SIGTERM);
            let _ = child.wait();
            return InterruptedSnafu.fail();
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    ensure!(status.success(), BuildFailedSnafu { script: &script, status });

    ui.step(2, 3, "import the disk into the block store");
    let bar = ui.bar(0, "blocks", false);
    let snapshot = provider
        .import_disk(&disk, &recipe.description, cancel, &|done, total| {
            bar.set_length(total);
            bar.set_position(done);
        })
        .context(ProviderSnafu { step: "importing the disk" })?;
    bar.finish_and_clear();
    journal.push(Resource::Snapshot { id: snapshot.id.clone() }).context(JournalSnafu)?;

    ui.step(3, 3, "register the base image");
    let stamp = crate::ids::now_rfc3339().replace(['-', ':', 'T', 'Z'], "");
    let tags: BTreeMap<String, String> = [
        (crate::local::BASE_NAME_TAG, recipe.name.as_str()),
        (RECIPE_HASH_TAG, hash),
        ("os", "debian"),
        ("os_suite", recipe.suite.as_str()),
        ("creator", "bakery"),
        ("bakery:version", env!("CARGO_PKG_VERSION")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .chain([("creation_time".to_string(), crate::ids::now_rfc3339())])
    .collect();
    let image = provider
        .register_image(&ImageRequest {
            name: format!("{}-{stamp}", recipe.name),
            description: recipe.description.clone(),
            snapshot_id: snapshot.id.clone(),
            tags,
            parent: None,
        })
        .context(ProviderSnafu { step: "registering the image" })?;
    journal.push(Resource::Image { id: image.id.clone() }).context(JournalSnafu)?;
    Ok(BaseOutcome {
        image_id: image.id,
        name: image.name,
        snapshot_id: snapshot.id,
        recipe_hash: hash.to_string(),
        stored_bytes: snapshot.stored_bytes,
        duration_ms: 0,
        reused: false,
    })
}

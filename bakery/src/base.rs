//! Base images built by the project itself: `base-images/NAME.toml` says which Debian suite and
//! packages, `base-images/build-disk.sh` turns that into a bootable GPT raw disk with mmdebstrap,
//! and the disk is imported as a snapshot and registered. Results are cached by a hash of the
//! recipe and the builder script: a rebuild with nothing changed costs a lookup.

use crate::events::{Sink, Unit};
use crate::journal::Resource;
use crate::provider::{Image, ImageRequest, Provider, SnapshotResult};
use crate::tags;
use crate::txn::{self, Step, StepResult, Tx};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use snafu::{ensure, ResultExt, Snafu};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const BUILDER_SCRIPT: &str = "build-disk.sh";
/// Next to the recipe, with the script: what the base is built from besides the recipe (the
/// script installs the registration agent from its own directory).
const BUILDER_FILES: [&str; 2] = [BUILDER_SCRIPT, "bakery-agent"];

#[derive(Debug, Snafu)]
pub enum Error {
    #[snafu(display("reading {}: {source}", path.display()))]
    Read { path: PathBuf, source: std::io::Error },

    #[snafu(display("{}: {source}", path.display()))]
    Parse { path: PathBuf, source: toml::de::Error },

    #[snafu(display("{}: {problem}", path.display()))]
    Invalid { path: PathBuf, problem: String },

    #[snafu(display("{source}"))]
    Run { source: txn::Error },

    #[snafu(display("{step}: {source}"))]
    Provider { step: &'static str, source: crate::provider::Error },

    #[snafu(display("running {}: {source}", script.display()))]
    Spawn { script: PathBuf, source: std::io::Error },

    #[snafu(display("{} failed ({status}); see its output above", script.display()))]
    BuildFailed { script: PathBuf, status: std::process::ExitStatus },
}

impl Error {
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Read { .. } | Error::Parse { .. } | Error::Invalid { .. } => 3,
            Error::Run { source } => source.exit_code(),
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
    let mut hasher = Sha256::new();
    hasher.update(text.as_bytes());
    for file in BUILDER_FILES {
        let builder = builder_file(path, file);
        hasher.update(std::fs::read(&builder).context(ReadSnafu { path: &builder })?);
    }
    Ok((recipe, hex::encode(hasher.finalize())))
}

fn builder_file(recipe_path: &Path, name: &str) -> PathBuf {
    recipe_path.parent().unwrap_or(Path::new(".")).join(name)
}

/// What the build's steps share.
struct Build {
    id: String,
    work: PathBuf,
    disk: PathBuf,
    path: PathBuf,
    recipe: BaseRecipe,
    hash: String,
    snapshot: Option<SnapshotResult>,
    image: Option<Image>,
}

const STEPS: &[Step<Build>] = &[
    Step { name: "build the root filesystem and disk (mmdebstrap)", run: build_disk },
    Step { name: "import the disk into the block store", run: import_disk },
    Step { name: "register the base image", run: register },
];

/// Builds (or finds in the cache) the base image a recipe describes.
pub fn build(
    provider: &dyn Provider,
    state_dir: &Path,
    path: &Path,
    rebuild: bool,
    events: &dyn Sink,
    cancel: &AtomicBool,
) -> Result<BaseOutcome> {
    let started = Instant::now();
    let (recipe, hash) = load(path)?;
    if !rebuild {
        let cached = provider
            .images()
            .images_tagged(tags::BASE_RECIPE_HASH, &hash)
            .context(ProviderSnafu { step: "looking up the cache" })?;
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
    let what = format!("base build {}", recipe.name);
    let mut build = Build {
        work: state_dir.join("tmp").join(&id),
        // The builder wants its output outside its scratch directory.
        disk: state_dir.join("tmp").join(format!("{id}.raw")),
        id: id.clone(),
        path: path.to_path_buf(),
        recipe,
        hash,
        snapshot: None,
        image: None,
    };
    let kept = |build: &Build| txn::image_and_snapshot(&build.image, &build.snapshot);
    txn::run(state_dir, &id, &what, provider, cancel, events, &mut build, STEPS, kept).context(RunSnafu)?;
    let image = build.image.expect("the register step sets the image");
    let snapshot = build.snapshot.expect("the import step sets the snapshot");
    Ok(BaseOutcome {
        image_id: image.id,
        name: image.name,
        snapshot_id: snapshot.id,
        recipe_hash: build.hash,
        stored_bytes: snapshot.stored_bytes,
        duration_ms: started.elapsed().as_millis() as u64,
        reused: false,
    })
}

fn build_disk(build: &mut Build, tx: &mut Tx) -> StepResult {
    let work = &build.work;
    tx.created(Resource::Dir { path: work.clone() })?;
    std::fs::create_dir_all(work).context(ReadSnafu { path: work })?;
    tx.created(Resource::File { path: build.disk.clone() })?;
    // Run a copy: bash reads a script as it goes, so editing the original mid-build would bite.
    for file in BUILDER_FILES {
        let copy = work.join(file);
        std::fs::copy(builder_file(&build.path, file), &copy).context(ReadSnafu { path: &copy })?;
    }
    let script = work.join(BUILDER_SCRIPT);
    let recipe = &build.recipe;
    let mut child = Command::new("bash")
        .arg(&script)
        .args(["--suite", &recipe.suite, "--packages", &recipe.packages.join(",")])
        .args(["--disk-size-mib", &recipe.disk_size_mib.to_string(), "--hostname", &recipe.hostname])
        .arg("--out")
        .arg(&build.disk)
        .arg("--work")
        .arg(work)
        .spawn()
        .context(SpawnSnafu { script: &script })?;
    let status = loop {
        if let Some(status) = child.try_wait().context(SpawnSnafu { script: &script })? {
            break status;
        }
        if tx.cancel.load(Ordering::Relaxed) {
            // The script's own trap unmounts and detaches what it made; the runner reports the
            // interruption.
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::SIGTERM);
            let _ = child.wait();
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    ensure!(status.success(), BuildFailedSnafu { script: &script, status });
    Ok(())
}

fn import_disk(build: &mut Build, tx: &mut Tx) -> StepResult {
    let progress = tx.progress(Unit::Blocks);
    let description = &build.recipe.description;
    let snapshot = tx.provider.volumes().import_disk(&build.disk, description, tx.cancel, &progress)?;
    tx.created(Resource::Snapshot { id: snapshot.id.clone() })?;
    build.snapshot = Some(snapshot);
    Ok(())
}

fn register(build: &mut Build, tx: &mut Tx) -> StepResult {
    let snapshot = build.snapshot.as_ref().expect("the import step ran");
    let recipe = &build.recipe;
    let stamp = crate::ids::now_rfc3339().replace(['-', ':', 'T', 'Z'], "");
    let tags: BTreeMap<String, String> = [
        (tags::BASE_NAME, recipe.name.as_str()),
        (tags::BASE_RECIPE_HASH, build.hash.as_str()),
        ("os", "debian"),
        ("os_suite", recipe.suite.as_str()),
        ("creator", "bakery"),
        (tags::VERSION, env!("CARGO_PKG_VERSION")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .chain([("creation_time".to_string(), crate::ids::now_rfc3339())])
    .collect();
    let image = tx.provider.images().register_image(&ImageRequest {
        name: format!("{}-{stamp}", recipe.name),
        description: recipe.description.clone(),
        snapshot_id: snapshot.id.clone(),
        volume_size: snapshot.volume_size,
        tags,
        parent: None,
        manifest: None,
    })?;
    tx.created(Resource::Image { id: image.id.clone() })?;
    tracing::info!(image = %image.id, build = %build.id, "registered the base image");
    build.image = Some(image);
    Ok(())
}

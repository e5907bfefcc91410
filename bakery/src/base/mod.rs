//! Base images built by the project itself: `base-images/NAME.toml` says which Debian suite and
//! packages, `base-images/build-disk.sh` turns that into a bootable GPT raw disk with mmdebstrap,
//! and the disk is imported as a snapshot and registered. A team's base `extends` another base
//! recipe: that base is built (or found) first, and the team's layer (apt sources, packages,
//! files, commands) is applied to a volume of its image by the bake pipeline, so only the blocks
//! the layer changes are stored. Results are cached by a hash of the recipe and what it is built
//! from (the builder script, or the extended base's image and the source keys), and for a base
//! from Debian packages, what upstream published ([`upstream`]): a rebuild with nothing changed
//! costs a lookup. Each base keeps the list of its Debian packages next to it (`base show`).

mod upstream;

use crate::events::{Sink, Unit};
use crate::journal::Resource;
use crate::provider::{Image, ImageRequest, Provider, SnapshotResult};
use crate::recipe::{self, BaseRecipe, Origin};
use crate::tags;
use crate::txn::{self, Step, StepResult, Tx};
use serde::Serialize;
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

    #[snafu(display("{source}"))]
    Recipe { source: recipe::Error },

    #[snafu(display("{source}"))]
    Layer { source: crate::bake::Error },

    #[snafu(display("base recipes extend each other in a cycle: {cycle}"))]
    ExtendsCycle { cycle: String },

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
            Error::Read { .. } | Error::Recipe { .. } | Error::ExtendsCycle { .. } => 3,
            Error::Run { source } => source.exit_code(),
            Error::Layer { source } => source.exit_code(),
            _ => 1,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

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

/// The recipe's cache key: its text and what it is built from besides (the builder's files, or
/// the extended base's image and the apt sources' keys).
fn cache_key(path: &Path, recipe: &BaseRecipe, parent: Option<&Image>) -> Result<String> {
    let mut hasher = Sha256::new();
    hasher.update(std::fs::read(path).context(ReadSnafu { path })?);
    match &recipe.from {
        Origin::Debian { .. } => {
            for file in BUILDER_FILES {
                let builder = builder_file(path, file);
                hasher.update(std::fs::read(&builder).context(ReadSnafu { path: &builder })?);
            }
        }
        Origin::Base(layer) => {
            hasher.update(parent.map(|p| p.id.as_str()).unwrap_or_default());
            for source in &layer.apt_sources {
                hasher.update(&source.key);
            }
        }
    }
    Ok(hex::encode(hasher.finalize()))
}

/// The newest image built from the recipe with this key and, when known, from this upstream.
fn cached(provider: &dyn Provider, hash: &str, upstream: Option<&str>) -> Result<Option<Image>> {
    let images = provider.images().images_tagged(tags::BASE_RECIPE_HASH, hash);
    let images = images.context(ProviderSnafu { step: "looking up the cache" })?;
    Ok(images
        .into_iter()
        .find(|image| upstream.is_none_or(|u| image.tags.get(tags::BASE_UPSTREAM).map(String::as_str) == Some(u))))
}

/// What a base from Debian packages is built from upstream, unless `offline`; None (with a
/// warning) when the mirror cannot say, so a cached base is used as offline would.
fn upstream_identity(suite: &str, offline: bool) -> Option<String> {
    if offline {
        return None;
    }
    let sources = upstream::host_sources(Path::new(crate::chroot::apt::HOST_APT), suite);
    match upstream::identity(&sources) {
        Ok(identity) => Some(identity),
        Err(cause) => {
            tracing::warn!("{cause}; the cached base is used, as with --offline");
            None
        }
    }
}

impl BaseOutcome {
    /// `image`, built now (`snapshot`: what it stored) or found in the cache (None).
    fn of(image: &Image, snapshot: Option<&SnapshotResult>, hash: String, started: Instant) -> BaseOutcome {
        BaseOutcome {
            image_id: image.id.clone(),
            name: image.name.clone(),
            snapshot_id: image.snapshot_id.clone(),
            recipe_hash: hash,
            stored_bytes: snapshot.map_or(0, |s| s.stored_bytes),
            duration_ms: started.elapsed().as_millis() as u64,
            reused: snapshot.is_none(),
        }
    }
}

/// The tags of a base image.
fn base_tags(name: &str, hash: &str, suite: &str) -> BTreeMap<String, String> {
    [
        (tags::BASE_NAME, name),
        (tags::BASE_RECIPE_HASH, hash),
        ("os", "debian"),
        ("os_suite", suite),
        ("creator", "bakery"),
        (tags::VERSION, env!("CARGO_PKG_VERSION")),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .chain([("creation_time".to_string(), crate::ids::now_rfc3339())])
    .collect()
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
    /// What upstream published, when the mirror said.
    upstream: Option<String>,
    /// The Debian packages on the disk.
    packages: Vec<crate::dpkg::Package>,
    snapshot: Option<SnapshotResult>,
    image: Option<Image>,
}

const STEPS: &[Step<Build>] = &[
    Step { name: "build the root filesystem and disk (mmdebstrap)", run: build_disk },
    Step { name: "list the installed packages", run: list_packages },
    Step { name: "import the disk into the block store", run: import_disk },
    Step { name: "register the base image", run: register },
];

/// How `base build` goes about it.
#[derive(Debug, Clone, Copy, Default)]
pub struct BuildOptions {
    /// Build even when a cached image matches (this recipe only, not the one it extends).
    pub rebuild: bool,
    /// Do not ask the Debian mirror what it publishes: a cached image of the recipe is used
    /// whatever upstream has published since.
    pub offline: bool,
}

/// Builds (or finds in the cache) the base image a recipe describes; for a team's base, the
/// base it extends first.
pub fn build(
    provider: &dyn Provider,
    state_dir: &Path,
    path: &Path,
    options: BuildOptions,
    events: &dyn Sink,
    cancel: &AtomicBool,
) -> Result<BaseOutcome> {
    let started = Instant::now();
    let (image, snapshot, hash) = build_extending(provider, state_dir, path, options, events, cancel, &mut Vec::new())?;
    Ok(BaseOutcome::of(&image, snapshot.as_ref(), hash, started))
}

/// [`build`], with the recipes that extend this one (`chain`), so a cycle is named, not followed.
/// Returns the image, its snapshot when it was built now, and its cache key.
fn build_extending(
    provider: &dyn Provider,
    state_dir: &Path,
    path: &Path,
    options: BuildOptions,
    events: &dyn Sink,
    cancel: &AtomicBool,
    chain: &mut Vec<PathBuf>,
) -> Result<(Image, Option<SnapshotResult>, String)> {
    let canonical = std::fs::canonicalize(path).context(ReadSnafu { path })?;
    if let Some(start) = chain.iter().position(|p| *p == canonical) {
        let cycle: Vec<String> = chain[start..].iter().chain([&canonical]).map(|p| p.display().to_string()).collect();
        return ExtendsCycleSnafu { cycle: cycle.join(" -> ") }.fail();
    }
    chain.push(canonical);
    let recipe = recipe::load_base(path).context(RecipeSnafu)?;
    let (parent, upstream) = match &recipe.from {
        Origin::Base(layer) => {
            let parent_options = BuildOptions { rebuild: false, ..options };
            let (parent, ..) =
                build_extending(provider, state_dir, &layer.extends, parent_options, events, cancel, chain)?;
            (Some(parent), None)
        }
        Origin::Debian { suite, .. } => (None, upstream_identity(suite, options.offline)),
    };
    let hash = cache_key(path, &recipe, parent.as_ref())?;
    if !options.rebuild {
        if let Some(image) = cached(provider, &hash, upstream.as_deref())? {
            return Ok((image, None, hash));
        }
    }
    let (image, snapshot) = match (&recipe.from, parent) {
        (Origin::Base(layer), Some(parent)) => {
            let suite = parent.tags.get("os_suite").cloned().unwrap_or_default();
            let mut tags = base_tags(&recipe.name, &hash, &suite);
            tags.insert(tags::BASE_PARENT.to_string(), parent.id.clone());
            let request = crate::bake::LayerRequest {
                parent,
                name: &recipe.name,
                description: &recipe.description,
                recipe: layer.as_recipe(&recipe.packages, path),
                recipe_path: path.to_path_buf(),
                key: hash.clone(),
                tags,
            };
            crate::bake::layer(provider, state_dir.to_path_buf(), request, events, cancel).context(LayerSnafu)?
        }
        (Origin::Debian { .. }, _) => {
            build_standard(provider, state_dir, path, recipe, (hash.clone(), upstream), events, cancel)?
        }
        (Origin::Base(_), None) => unreachable!("a team's base has its parent built above"),
    };
    Ok((image, Some(snapshot), hash))
}

/// A base from Debian packages: the builder script makes the disk, which is imported.
fn build_standard(
    provider: &dyn Provider,
    state_dir: &Path,
    path: &Path,
    recipe: BaseRecipe,
    (hash, upstream): (String, Option<String>),
    events: &dyn Sink,
    cancel: &AtomicBool,
) -> Result<(Image, SnapshotResult)> {
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
        upstream,
        packages: Vec::new(),
        snapshot: None,
        image: None,
    };
    let kept = |build: &Build| txn::image_and_snapshot(&build.image, &build.snapshot);
    txn::run(state_dir, &id, &what, provider, cancel, events, &mut build, STEPS, kept).context(RunSnafu)?;
    Ok((
        build.image.expect("the register step sets the image"),
        build.snapshot.expect("the import step sets the snapshot"),
    ))
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
    let Origin::Debian { suite, disk_size_mib, hostname } = &recipe.from else {
        unreachable!("only a base from Debian packages is built from scratch")
    };
    let mut child = Command::new("bash")
        .arg(&script)
        .args(["--suite", suite, "--packages", &recipe.packages.join(",")])
        .args(["--disk-size-mib", &disk_size_mib.to_string(), "--hostname", hostname])
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

/// Reads the disk's dpkg database through a read-only loop device on its root partition.
fn list_packages(build: &mut Build, tx: &mut Tx) -> StepResult {
    let partition = crate::gpt::root_partition(&build.disk)?;
    let device = crate::loopdev::attach_partition_read_only(&build.disk, partition.offset(), partition.size())?;
    tx.created(Resource::LoopDevice { device: device.clone(), file: build.disk.clone() })?;
    let root = build.work.join("packages-root");
    tx.created(Resource::Mount { path: root.clone() })?;
    crate::mounts::mount_ext4(&device, &root, true)?;
    build.packages = crate::dpkg::installed(&root)?;
    Ok(())
}

/// A base's Debian packages, from the document kept next to it; None where there is none.
pub fn packages(provider: &dyn Provider, image_id: &str) -> crate::provider::Result<Option<Vec<crate::dpkg::Package>>> {
    let Some(document) = provider.images().document(image_id, crate::provider::Document::Manifest)? else {
        return Ok(None);
    };
    Ok(Some(crate::dpkg::read_list_document(&document)?))
}

/// Every base image, newest first.
pub fn list(provider: &dyn Provider) -> crate::provider::Result<Vec<Image>> {
    let images = provider.images().list_images()?;
    Ok(images.into_iter().filter(|image| image.tags.contains_key(tags::BASE_NAME)).collect())
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
    let suite = match &recipe.from {
        Origin::Debian { suite, .. } => suite.as_str(),
        Origin::Base(_) => "",
    };
    let mut tags = base_tags(&recipe.name, &build.hash, suite);
    tags.insert(tags::BASE_UPSTREAM.to_string(), build.upstream.clone().unwrap_or_else(|| "unknown".into()));
    let image = tx.provider.images().register_image(&ImageRequest {
        name: format!("{}-{stamp}", recipe.name),
        description: recipe.description.clone(),
        snapshot_id: snapshot.id.clone(),
        volume_size: snapshot.volume_size,
        tags,
        parent: None,
        documents: BTreeMap::from([(crate::provider::Document::Manifest, crate::dpkg::list_document(&build.packages))]),
    })?;
    tx.created(Resource::Image { id: image.id.clone() })?;
    tracing::info!(image = %image.id, build = %build.id, "registered the base image");
    build.image = Some(image);
    Ok(())
}

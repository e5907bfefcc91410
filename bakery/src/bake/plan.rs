//! Everything decided before a bake touches a disk: the base image, the recipe rendered for
//! this package, the package checksum, the bake key, the image's name and tags. Bad input is
//! refused here, before anything is created.

use crate::provider::{Image, Provider};
use crate::recipe::{self, Recipe};
use crate::tags;
use nix::fcntl::{Flock, FlockArg};
use serde::Serialize;
use sha2::{Digest, Sha256};
use snafu::{ensure, OptionExt, ResultExt, Snafu};
use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

/// The tag that makes bakes idempotent: same base, package and recipe → same image.

#[derive(Debug, Snafu)]
pub enum Error {
    #[snafu(display("base image {base:?} not found (give an image id, an image name or a base family built with `bakery base build`)"))]
    BaseNotFound { base: String },

    #[snafu(display("looking up images: {source}"))]
    Lookup { source: crate::provider::Error },

    #[snafu(display("{source}"))]
    Recipe {
        #[snafu(source(from(recipe::Error, Box::new)))]
        source: Box<recipe::Error>,
    },

    #[snafu(display("--app {app:?} is not a valid application name: use letters, digits, '.' and '_'"))]
    BadApp { app: String },

    #[snafu(display("--version {version:?} is not a valid version: use letters, digits and . _ ~ + -"))]
    BadVersion { version: String },

    #[snafu(display("--tag {tag:?}: {problem}"))]
    BadTag { tag: String, problem: String },

    #[snafu(display("--sha256 {given:?} is not 64 hexadecimal digits"))]
    BadSha256 { given: String },

    #[snafu(display("no --sha256 given and no {package}.sha256 sidecar found: the package's checksum is required"))]
    MissingChecksum { package: String },

    #[snafu(display("package {package}: {source}"))]
    Package {
        package: String,
        #[snafu(source(from(crate::package::Error, Box::new)))]
        source: Box<crate::package::Error>,
    },

    #[snafu(display("package {} does not exist or is not a file", path.display()))]
    NoPackage { path: PathBuf },

    #[snafu(display("locking bake key {}: {source}", path.display()))]
    KeyLock { path: PathBuf, source: std::io::Error },
}

impl Error {
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::BaseNotFound { .. } => 4,
            Error::Lookup { .. } | Error::KeyLock { .. } => 1,
            _ => 3,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// What the user asked for.
#[derive(Debug, Clone, Default)]
pub struct BakeRequest {
    pub base: String,
    pub recipe: PathBuf,
    pub package: String,
    pub sha256: Option<String>,
    pub app: String,
    pub version: String,
    pub build_job: Option<String>,
    pub build_number: Option<String>,
    pub commit: Option<String>,
    pub tags: Vec<String>,
    pub rebake: bool,
}

/// What will be baked.
#[derive(Debug, Clone)]
pub struct BakePlan {
    pub bake_id: String,
    pub base: Image,
    pub recipe: Recipe,
    pub recipe_path: PathBuf,
    pub package: String,
    pub package_sha256: String,
    pub bake_key: String,
    pub app: String,
    pub version: String,
    pub name: String,
    pub description: String,
    pub tags: BTreeMap<String, String>,
}

#[derive(Serialize)]
struct KeyInputs<'a> {
    format: u32,
    base_snapshot: &'a str,
    package_sha256: &'a str,
    app: &'a str,
    version: &'a str,
    recipe: String,
}

fn valid_app(app: &str) -> bool {
    !app.is_empty() && app.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_')
}

fn valid_version(version: &str) -> bool {
    !version.is_empty() && version.bytes().all(|b| b.is_ascii_alphanumeric() || b"._~+-".contains(&b))
}

impl BakePlan {
    /// The package's path or URL as it may be recorded: a URL without its password.
    pub fn package_shown(&self) -> String {
        crate::package::http::redacted(&self.package)
    }
}

pub fn resolve(provider: &dyn Provider, request: &BakeRequest) -> Result<BakePlan> {
    ensure!(valid_app(&request.app), BadAppSnafu { app: &request.app });
    ensure!(valid_version(&request.version), BadVersionSnafu { version: &request.version });
    let mut user_tags = BTreeMap::new();
    for tag in &request.tags {
        let (key, value) = tag.split_once('=').context(BadTagSnafu { tag, problem: "expected KEY=VALUE" })?;
        ensure!(!key.is_empty(), BadTagSnafu { tag, problem: "the key is empty" });
        ensure!(
            !key.starts_with(tags::RESERVED_PREFIX),
            BadTagSnafu { tag, problem: "keys starting with bakery: are reserved" }
        );
        user_tags.insert(key.to_string(), value.to_string());
    }

    // Read everything the user gave us first, so one run reports input problems before any lookup.
    let recipe = recipe::load(&request.recipe).context(RecipeSnafu)?;
    if !crate::package::is_url(&request.package) {
        let path = Path::new(&request.package);
        ensure!(path.is_file(), NoPackageSnafu { path });
    }
    let package_sha256 = match &request.sha256 {
        Some(given) => {
            ensure!(given.len() == 64 && given.bytes().all(|b| b.is_ascii_hexdigit()), BadSha256Snafu { given });
            given.to_ascii_lowercase()
        }
        None => {
            let shown = crate::package::http::redacted(&request.package);
            crate::package::sidecar_sha256(&request.package)
                .context(PackageSnafu { package: &shown })?
                .context(MissingChecksumSnafu { package: &shown })?
        }
    };
    let base = provider
        .images()
        .find_image(&request.base)
        .context(LookupSnafu)?
        .context(BaseNotFoundSnafu { base: &request.base })?;

    let optional = |value: &Option<String>| value.clone().unwrap_or_default();
    let builtins: BTreeMap<String, String> = [
        ("app", request.app.clone()),
        ("version", request.version.clone()),
        ("package_sha256", package_sha256.clone()),
        ("build_job", optional(&request.build_job)),
        ("build_number", optional(&request.build_number)),
        ("commit", optional(&request.commit)),
        ("base_image", base.id.clone()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    let recipe = recipe.rendered(&builtins).context(RecipeSnafu)?;

    let key_inputs = KeyInputs {
        format: 1,
        base_snapshot: &base.snapshot_id,
        package_sha256: &package_sha256,
        app: &request.app,
        version: &request.version,
        recipe: recipe.canonical_json(),
    };
    let bake_key = hex::encode(Sha256::digest(serde_json::to_vec(&key_inputs).expect("serialisable")));
    let bake_id = crate::ids::new_id("bake");

    let stamp = crate::ids::now_rfc3339().replace(['-', ':', 'T', 'Z'], "");
    let build = request.build_number.as_ref().map(|n| format!("-h{n}")).unwrap_or_default();
    let name = format!("{}-{}{build}-{stamp}-{}", request.app, request.version, &bake_id[5..11]);
    let description = format!(
        "{}-{} on {} ({}), baked by bakery {}",
        request.app,
        request.version,
        base.name,
        base.id,
        env!("CARGO_PKG_VERSION")
    );

    let mut tags = recipe.tags.clone();
    tags.extend(user_tags);
    let mut put = |key: &str, value: &str| {
        if !value.is_empty() {
            tags.insert(key.to_string(), value.to_string());
        }
    };
    put("app", &request.app);
    put("version", &request.version);
    put("appversion", &format!("{}-{}{build}", request.app, request.version));
    put("base_image_id", &base.id);
    put("base_image_name", &base.name);
    put("package_sha256", &package_sha256);
    put("build_job", &optional(&request.build_job));
    put("build_number", &optional(&request.build_number));
    put("commit", &optional(&request.commit));
    put("creator", "bakery");
    put("creation_time", &crate::ids::now_rfc3339());
    put(tags::VERSION, env!("CARGO_PKG_VERSION"));
    put(tags::BAKE_ID, &bake_id);
    put(tags::RECIPE, &request.recipe.file_name().unwrap_or_default().to_string_lossy());
    put(tags::BAKE_KEY, &bake_key);

    Ok(BakePlan {
        bake_id,
        base,
        recipe,
        recipe_path: request.recipe.clone(),
        package: request.package.clone(),
        package_sha256,
        bake_key,
        app: request.app.clone(),
        version: request.version.clone(),
        name,
        description,
        tags,
    })
}

/// Holds the bake key's lock; a second bake with the same key waits here for the first, and
/// gives up when cancelled.
pub fn lock_bake_key(state_dir: &Path, key: &str, cancel: &AtomicBool) -> super::Result<Flock<File>> {
    let dir = state_dir.join("locks");
    let path = dir.join(format!("{key}.lock"));
    let mut file = std::fs::create_dir_all(&dir)
        .and_then(|()| File::create(&path))
        .context(KeyLockSnafu { path: &path })
        .context(super::PlanSnafu)?;
    let mut waiting = false;
    loop {
        match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => return Ok(lock),
            Err((returned, nix::errno::Errno::EWOULDBLOCK)) => file = returned,
            Err((_, source)) => return Err(source).context(super::BusySnafu { path }),
        }
        if cancel.load(Ordering::Relaxed) {
            let interrupted = crate::txn::Error::Interrupted { step: "waiting for the bake with the same key" };
            return Err(super::Error::Run { source: interrupted });
        }
        if !waiting {
            tracing::info!(key, "a bake with the same key is running; waiting for it");
            waiting = true;
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

pub fn existing_image(provider: &dyn Provider, plan: &BakePlan) -> Result<Option<Image>> {
    let images = provider.images().images_tagged(tags::BAKE_KEY, &plan.bake_key).context(LookupSnafu)?;
    Ok(images.into_iter().next())
}

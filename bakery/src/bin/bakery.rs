//! The `bakery` command line: a thin layer over the library.

use bakery::bake::{self, BakeRequest};
use bakery::instance::Method;
use bakery::provider::{Document, Image, Provider};
use bakery::ui::{OutputFormat, Ui};
use bakery::verify::{self, Expect};
use bakery::{base, gc, local, push, recipe};
use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

/// Bake application packages into machine images, without booting an instance.
///
/// A bake creates a volume from a base image's root snapshot, mounts it, streams the package
/// into it (SHA-256 checked as it streams), applies a recipe in a chroot, then snapshots only
/// the changed blocks and registers an image tagged with what is inside.
///
/// Exit status: 0 success, 2 usage, 3 bad input (recipe, package, checksum), 4 not found,
/// 5 busy, 6 the image failed verification, 130 interrupted, 1 anything else.
#[derive(Parser)]
#[command(version, max_term_width = 100, args_override_self = true)]
struct Cli {
    /// Where images are baked and registered.
    #[arg(long, global = true, env = "BAKERY_PROVIDER", value_enum, default_value_t = ProviderKind::Local)]
    provider: ProviderKind,

    /// State of the local provider: block store, image registry, journals, scratch space.
    #[arg(long, global = true, env = "BAKERY_STATE_DIR", default_value = "/var/lib/bakery")]
    state_dir: PathBuf,

    /// `json` prints exactly one JSON object on stdout, for CI.
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Text)]
    output: OutputFormat,

    /// More log output on stderr (-v info, -vv debug); BAKERY_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,

    #[command(flatten)]
    aws: AwsArgs,

    #[command(subcommand)]
    command: Commands,
}

/// Options of the aws provider. Credentials come from the standard chain (environment, profile,
/// instance role); AWS_ENDPOINT_URL points every service at another endpoint.
#[derive(clap::Args)]
#[command(next_help_heading = "AWS provider")]
struct AwsArgs {
    /// AWS region (default: AWS_REGION or the profile's region).
    #[arg(long, global = true)]
    region: Option<String>,
    /// attach: a real EBS volume attached to this EC2 instance. direct: bake on a loop device
    /// and upload only the changed blocks with the EBS direct APIs, from any Linux host.
    /// Default: attach when IMDSv2 answers (on EC2), direct elsewhere.
    #[arg(long, global = true, value_enum)]
    mode: Option<ModeArg>,
    /// Encrypt volumes and snapshots with this KMS key.
    #[arg(long, global = true, value_name = "ARN")]
    kms_key: Option<String>,
    /// Also copy the image to REGION (repeatable; copies run in parallel and are tagged alike).
    #[arg(long = "copy-to-region", global = true, value_name = "REGION")]
    copy_to_regions: Vec<String>,
    /// Grant ACCOUNT launch permission on the image and its snapshot (repeatable). Images are
    /// private otherwise.
    #[arg(long = "share-with", global = true, value_name = "ACCOUNT")]
    share_with: Vec<String>,
    /// Store each baked image's manifest, SBOM and provenance in this S3 bucket
    /// (s3://BUCKET/bakery/images/IMAGE/…), linked from the image's tags (bakery:sbom-url, …);
    /// `images sbom` and the console fetch them there, `images rm` deletes them.
    #[arg(long, global = true, value_name = "BUCKET")]
    artifact_bucket: Option<String>,
}

/// How `verify` boots an image.
#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum MethodArg {
    Container,
    Vm,
}

impl From<MethodArg> for Method {
    fn from(method: MethodArg) -> Method {
        match method {
            MethodArg::Container => Method::Container,
            MethodArg::Vm => Method::Vm,
        }
    }
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum ModeArg {
    Attach,
    Direct,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum ProviderKind {
    Local,
    Aws,
}

#[derive(Subcommand)]
enum Commands {
    /// Build base images (Debian + JRE + Tomcat) from base-images/*.toml.
    #[command(subcommand)]
    Base(BaseCommand),

    /// Bake a package onto a base image and register the result.
    ///
    /// The same base, package and recipe give the same bake key: the existing image is returned
    /// (`reused: true`) unless --rebake.
    ///
    /// Example:
    ///   bakery bake --base debian12-jre17-tomcat10 --recipe recipes/tomcat-webapp.toml \
    ///     --package build/hello-1.4.2.tar.gz --app hello --version 1.4.2 --build-number 42
    #[command(verbatim_doc_comment)]
    Bake(Box<BakeArgs>),

    /// Boot an image on this host and check that it serves the app.
    ///
    /// `container` boots the image's own systemd in systemd-nspawn on a copy-on-write overlay
    /// (seconds); `vm` boots the whole disk in QEMU: firmware, GRUB, kernel on NVMe, DHCP
    /// (a minute or more without KVM). Each --expect PATH=TEXT passes when GET PATH answers 200
    /// with TEXT in the body; without any, GET / must answer 200. A failure prints the guest's
    /// last console lines and exits 6.
    ///
    /// Example:
    ///   bakery verify ami-0123456789abcdef0 --expect /hello/version.txt=1.4.2
    #[command(verbatim_doc_comment)]
    Verify(VerifyArgs),

    /// List, show, remove and export registered images.
    #[command(subcommand)]
    Images(ImagesCommand),

    /// Validate recipes, reporting every problem at once.
    #[command(subcommand)]
    Recipe(RecipeCommand),

    /// Remove what crashed or killed bakes left behind: mounts, loop devices, volumes,
    /// scratch files, unregistered snapshots and unreferenced blocks. Live bakes are untouched.
    ///
    /// With --provider aws, also volumes and unfinished snapshots that bakes tagged, once they
    /// are older than --older-than (they may belong to a bake on another host until then).
    Gc {
        /// Only list what would be removed.
        #[arg(long)]
        dry_run: bool,
        /// aws: leave bake resources younger than this alone, e.g. 30m, 2h.
        #[arg(long, default_value = "2h", value_parser = humantime::parse_duration)]
        older_than: std::time::Duration,
    },

    /// Upload a local image (e.g. a base built here) to AWS as a snapshot and register it.
    ///
    /// Only blocks holding data are read and sent, over the EBS direct APIs. Pushing the same
    /// local image again returns the image pushed before (tag bakery:pushed-from).
    ///
    /// Example:
    ///   bakery push debian12-jre17-tomcat10 --region eu-west-1 --output json
    #[command(verbatim_doc_comment)]
    Push {
        /// Local image id, name or base family.
        image: String,
    },
}

#[derive(Subcommand)]
enum BaseCommand {
    /// Build a base image from its recipe, or return the cached one.
    ///
    /// A base from Debian packages is cached by its recipe, its builder and what the Debian
    /// mirror publishes for its suite (the InRelease files): a security update upstream builds
    /// a new base. A team's base (a recipe with `extends`) is a layer on the base it extends,
    /// which is built or found first.
    ///
    /// Example:
    ///   bakery base build base-images/hello-team.toml
    Build {
        /// A base recipe, e.g. base-images/debian12-jre17-tomcat10.toml.
        recipe: PathBuf,
        /// Build even when a cached image matches (this recipe only).
        #[arg(long)]
        rebuild: bool,
        /// Do not ask the Debian mirror what it publishes: reuse a cached image of the recipe.
        #[arg(long)]
        offline: bool,
    },
    /// List base images, newest first, with their recipe hash, upstream (or the base they are
    /// on) and creation time.
    List,
    /// Show a base image and the versions of its Debian packages.
    Show {
        /// An image id, an image name, or a base family such as hello-team.
        id: String,
    },
}

#[derive(clap::Args)]
struct BakeArgs {
    /// Base image: an image id (ami-…), an image name, or a base family such as debian12-jre17-tomcat10.
    #[arg(long)]
    base: String,
    /// The recipe (TOML) that says where the package goes and how the image is customised.
    #[arg(long)]
    recipe: PathBuf,
    /// The application package: a .tar.gz path or an http(s) URL (streamed, never stored whole).
    /// A URL is fetched with BAKERY_HTTP_TOKEN (bearer) or BAKERY_HTTP_BASIC (user:token) for
    /// its own host, or the netrc entry ($NETRC, ~/.netrc) of each host; a dropped download
    /// resumes where it broke off.
    #[arg(long)]
    package: String,
    /// SHA-256 of the package; optional when a `<package>.sha256` sidecar exists.
    #[arg(long)]
    sha256: Option<String>,
    /// Application name ([A-Za-z0-9._]).
    #[arg(long)]
    app: String,
    /// Application version.
    #[arg(long)]
    version: String,
    /// CI job that built the package (tagged on the image).
    #[arg(long)]
    build_job: Option<String>,
    /// CI build number (tagged, and part of the image name as -hN).
    #[arg(long)]
    build_number: Option<String>,
    /// Source commit (tagged).
    #[arg(long)]
    commit: Option<String>,
    /// Extra image tag KEY=VALUE; repeatable.
    #[arg(long = "tag", value_name = "KEY=VALUE")]
    tags: Vec<String>,
    /// Bake even when an image with the same bake key exists.
    #[arg(long)]
    rebake: bool,
    /// Boot the new image (container method) and run the --expect checks; a failure tags the
    /// image bakery:verified=false and exits 6.
    #[arg(long)]
    verify: bool,
    /// With --verify: GET PATH must answer 200 with TEXT in the body; repeatable.
    #[arg(long, value_name = "PATH=TEXT", requires = "verify")]
    expect: Vec<Expect>,
    /// With --verify: how long the image may take to pass, e.g. 90s, 5m.
    #[arg(long, default_value = "300s", value_parser = humantime::parse_duration, requires = "verify")]
    verify_timeout: std::time::Duration,
}

#[derive(clap::Args)]
struct VerifyArgs {
    /// Image id or name.
    image: String,
    /// How to boot it.
    #[arg(long, value_enum, default_value_t = MethodArg::Container)]
    method: MethodArg,
    /// GET PATH must answer 200 with TEXT in the body; repeatable.
    #[arg(long, value_name = "PATH=TEXT")]
    expect: Vec<Expect>,
    /// How long the image may take to pass, e.g. 90s, 5m.
    #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
    timeout: std::time::Duration,
}

#[derive(Subcommand)]
enum ImagesCommand {
    /// List images, newest first.
    List,
    /// Show one image with its tags.
    Show { id: String },
    /// Deregister an image and delete its snapshot.
    Rm { id: String },
    /// Delete an app's old images with their snapshots (and copies in other regions), but
    /// never the newest --keep, one younger than --older-than, or one anything uses: a group of
    /// any cluster (serving, disabled or soaking), and on aws any launch template version,
    /// launch configuration or instance not terminated. On aws the image of each serving group
    /// is also protected from deregistration, and one kept only because it is used is marked
    /// deprecated. Each kept image says why.
    ///
    /// Examples:
    ///   bakery images prune --app hello --keep 5 --dry-run
    ///   bakery --provider aws images prune --app hello --keep 5 --older-than 30d
    #[command(verbatim_doc_comment)]
    Prune {
        /// The app, as its images are tagged (`app`).
        #[arg(long)]
        app: String,
        /// How many of the newest to keep whatever uses them (at least 1).
        #[arg(long)]
        keep: usize,
        /// Keep images younger than this, e.g. 30d.
        #[arg(long, value_parser = humantime::parse_duration)]
        older_than: Option<std::time::Duration>,
        /// List what would go and what stays, and change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Write an image's root disk as a raw (sparse) file.
    Export {
        id: String,
        #[arg(short, long)]
        output_file: PathBuf,
    },
    /// Print what the bake installed, file by file with SHA-256, and the image's Debian packages.
    Manifest { id: String },
    /// Print the image's software bill of materials (CycloneDX 1.5 JSON): every Debian package
    /// with its version and package URL, and the application with each file's SHA-256. The
    /// image's `bakery:sbom-sha256` tag is its digest.
    Sbom { id: String },
    /// Print how the image was made: an in-toto statement with a SLSA provenance predicate
    /// naming the base image and snapshot, the package and its SHA-256, the recipe and its
    /// hash, the bakery version and the CI build.
    Provenance { id: String },
}

#[derive(Subcommand)]
enum RecipeCommand {
    /// Check app recipes and base recipes (those with a `name`); every problem in every file is
    /// reported, each with its line.
    Check { files: Vec<PathBuf> },
}

/// `bake`'s one JSON object: the bake, plus the verification when --verify asked for one.
#[derive(Serialize)]
struct BakeResult<'a> {
    #[serde(flatten)]
    outcome: &'a bake::BakeOutcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    verification: Option<&'a verify::VerifyOutcome>,
}

/// A failure with its exit status. `reported` when the JSON result already went to stdout.
struct Failure {
    code: u8,
    message: String,
    reported: bool,
}

fn failure(code: i32, error: impl std::fmt::Display) -> Failure {
    Failure { code: code as u8, message: error.to_string(), reported: false }
}

/// A failure whose result object (e.g. a failed verification) was already printed.
fn reported_failure(code: i32, error: impl std::fmt::Display) -> Failure {
    Failure { reported: true, ..failure(code, error) }
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    // Mount tables and loop devices speak in resolved absolute paths; so must we.
    if std::fs::create_dir_all(&cli.state_dir).is_ok() {
        if let Ok(canonical) = cli.state_dir.canonicalize() {
            cli.state_dir = canonical;
        }
    }
    bakery::ui::init_logging(cli.verbose);
    let ui = Ui::new(cli.output);
    match run(&cli, &ui) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            if cli.output == OutputFormat::Json && !failure.reported {
                let error = serde_json::json!({ "error": failure.message, "exit_code": failure.code });
                println!("{error}");
            }
            eprintln!("error: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

fn open_provider(cli: &Cli, cancel: &Arc<AtomicBool>) -> Result<Box<dyn Provider>, Failure> {
    match cli.provider {
        ProviderKind::Local if cli.aws.artifact_bucket.is_some() => Err(failure(
            2,
            "--artifact-bucket is for --provider aws: the local registry keeps each image's documents next to it",
        )),
        ProviderKind::Local => open_local(cli).map(|p| Box::new(p) as Box<dyn Provider>),
        ProviderKind::Aws => open_aws(cli, cancel),
    }
}

#[cfg(feature = "aws")]
fn open_aws(cli: &Cli, cancel: &Arc<AtomicBool>) -> Result<Box<dyn Provider>, Failure> {
    use bakery::aws;
    // A bake needs to know whether it runs on EC2, and gc too: a dead attach-mode bake's volume
    // is detached from this instance. Everything else skips the IMDS probe.
    let on_host = matches!(cli.command, Commands::Bake(_) | Commands::Gc { .. });
    let mode = cli.aws.mode.map(|mode| match mode {
        ModeArg::Attach => aws::Mode::Attach,
        ModeArg::Direct => aws::Mode::Direct,
    });
    let options = aws::Options {
        region: cli.aws.region.clone(),
        mode: mode.or((!on_host).then_some(aws::Mode::Direct)),
        kms_key: cli.aws.kms_key.clone(),
        copy_to_regions: cli.aws.copy_to_regions.clone(),
        share_with: cli.aws.share_with.clone(),
        artifact_bucket: cli.aws.artifact_bucket.clone(),
        gc_older_than: match &cli.command {
            Commands::Gc { older_than, .. } => *older_than,
            _ => std::time::Duration::from_secs(2 * 3600),
        },
        cancel: cancel.clone(),
    };
    let provider =
        aws::AwsProvider::open(&cli.state_dir, options).map_err(|e| failure(2, format!("aws provider: {e}")))?;
    Ok(Box::new(provider))
}

#[cfg(not(feature = "aws"))]
fn open_aws(_cli: &Cli, _cancel: &Arc<AtomicBool>) -> Result<Box<dyn Provider>, Failure> {
    Err(failure(2, bakery::AWS_NOT_BUILT))
}

/// Booting images is this host's business: verify needs the local provider's disks.
fn open_local(cli: &Cli) -> Result<local::LocalProvider, Failure> {
    local::LocalProvider::open(&cli.state_dir)
        .map_err(|e| failure(1, format!("opening the local state in {}: {e}", cli.state_dir.display())))
}

/// Runs a verification and records its verdict on the image.
fn verify_image(
    cli: &Cli,
    image_id: &str,
    method: Method,
    expects: &[Expect],
    timeout: std::time::Duration,
    cancel: &AtomicBool,
) -> Result<verify::VerifyOutcome, Failure> {
    let local = open_local(cli)?;
    let outcome = verify::verify(&local, &cli.state_dir, image_id, method, expects, timeout, cancel)
        .map_err(|e| failure(e.exit_code(), e))?;
    verify::record_verdict(&local, &outcome).map_err(|e| failure(1, e))?;
    Ok(outcome)
}

fn describe_verification(v: &verify::VerifyOutcome) -> String {
    let mut lines = vec![match v.boot_ms {
        Some(ms) => format!("verified {} ({:?}): serving after {:.1}s", v.image_id, v.method, ms as f64 / 1000.0),
        None => format!("FAILED verification of {} ({:?})", v.image_id, v.method),
    }];
    for check in &v.checks {
        let status = check.status.map_or("no answer".to_string(), |s| s.to_string());
        lines.push(format!("  {} {} → {status}", if check.matched { "ok  " } else { "FAIL" }, check.url));
    }
    if let Some(tail) = &v.console_tail {
        lines.push("  last console lines:".into());
        lines.extend(tail.lines().map(|l| format!("    {l}")));
    }
    lines.join("\n")
}

fn run(cli: &Cli, ui: &Ui) -> Result<(), Failure> {
    if let Commands::Recipe(RecipeCommand::Check { files }) = &cli.command {
        return check_recipes(files, ui, cli.output);
    }
    let cancel = bakery::ui::cancellation();
    if let Commands::Push { image } = &cli.command {
        let outcome =
            push::push(&open_local(cli)?, open_aws(cli, &cancel)?.as_ref(), &cli.state_dir, image, ui, &cancel)
                .map_err(|e| failure(e.exit_code(), e))?;
        ui.print(&outcome, |o| {
            let how = if o.reused { "already pushed" } else { "pushed" };
            format!(
                "{how}: {} → {} ({}), {} blocks / {} bytes uploaded in {:.1}s",
                o.source_image_id,
                o.image_id,
                o.snapshot_id,
                o.uploaded_blocks,
                o.uploaded_bytes,
                o.duration_ms as f64 / 1000.0
            )
        });
        return Ok(());
    }
    let verifies = matches!(&cli.command, Commands::Verify(_)) || matches!(&cli.command, Commands::Bake(a) if a.verify);
    if verifies && cli.provider == ProviderKind::Aws {
        return Err(failure(2, "verify boots images on this host: it works with --provider local only"));
    }
    let provider = open_provider(cli, &cancel)?;
    let provider = provider.as_ref();
    match &cli.command {
        Commands::Recipe(_) | Commands::Push { .. } => unreachable!("handled above"),
        Commands::Base(BaseCommand::Build { recipe, rebuild, offline }) => {
            let options = base::BuildOptions { rebuild: *rebuild, offline: *offline };
            let outcome = base::build(provider, &cli.state_dir, recipe, options, ui, &cancel)
                .map_err(|e| failure(e.exit_code(), e))?;
            ui.print(&outcome, |o| {
                let how = if o.reused { "cached" } else { "built" };
                format!("{} {how}: {} ({}) in {:.1}s", o.name, o.image_id, o.snapshot_id, o.duration_ms as f64 / 1000.0)
            });
        }
        Commands::Base(BaseCommand::List) => {
            let bases = base::list(provider).map_err(|e| failure(1, e))?;
            ui.print(&bases, |bases| {
                let tag = |image: &Image, key: &str| image.tags.get(key).cloned().unwrap_or_else(|| "-".into());
                let mut lines =
                    vec![format!("{:<22} {:<26} {:<13} {:<13} {}", "IMAGE", "BASE", "RECIPE", "UPSTREAM", "CREATED")];
                lines.extend(bases.iter().map(|image| {
                    let short = |value: String| value.chars().take(12).collect::<String>();
                    let upstream = match image.tags.get(bakery::tags::BASE_PARENT) {
                        Some(parent) => format!("on {parent}"),
                        None => short(tag(image, bakery::tags::BASE_UPSTREAM)),
                    };
                    format!(
                        "{:<22} {:<26} {:<13} {:<13} {}",
                        image.id,
                        tag(image, bakery::tags::BASE_NAME),
                        short(tag(image, bakery::tags::BASE_RECIPE_HASH)),
                        upstream,
                        image.created
                    )
                }));
                lines.join("\n")
            });
        }
        Commands::Base(BaseCommand::Show { id }) => {
            let image = find_image(provider, id)?;
            let packages = base::packages(provider, &image.id).map_err(|e| failure(1, e))?.unwrap_or_default();
            let result = serde_json::json!({ "image": image, "packages": packages });
            ui.print(&result, |_| {
                let mut lines = vec![format!("{} {}", image.id, image.name)];
                lines.extend(image.tags.iter().map(|(k, v)| format!("  {k} = {v}")));
                match packages.is_empty() {
                    true => lines.push("packages: none recorded next to this image".into()),
                    false => lines.push(format!("packages ({}):", packages.len())),
                }
                lines.extend(packages.iter().map(|p| format!("  {:<40} {}", p.name, p.version)));
                lines.join("\n")
            });
        }
        Commands::Bake(args) => {
            let request = BakeRequest {
                base: args.base.clone(),
                recipe: args.recipe.clone(),
                package: args.package.clone(),
                sha256: args.sha256.clone(),
                app: args.app.clone(),
                version: args.version.clone(),
                build_job: args.build_job.clone(),
                build_number: args.build_number.clone(),
                commit: args.commit.clone(),
                tags: args.tags.clone(),
                rebake: args.rebake,
            };
            let outcome = bake::bake(provider, cli.state_dir.clone(), &request, ui, &cancel)
                .map_err(|e| failure(e.exit_code(), e))?;
            let verification = match args.verify {
                true => Some(verify_image(
                    cli,
                    &outcome.image_id,
                    Method::Container,
                    &args.expect,
                    args.verify_timeout,
                    &cancel,
                )?),
                false => None,
            };
            let passed = verification.as_ref().is_none_or(|v| v.passed);
            let result = BakeResult { outcome: &outcome, verification: verification.as_ref() };
            ui.print(&result, |_| {
                let what = if outcome.reused { "reused (same bake key)" } else { "baked" };
                let mut text = format!(
                    "{what}: {} {}\n  snapshot {} over base {}\n  {} changed blocks, {} bytes stored, {:.1}s\n  package sha256 {}",
                    outcome.image_id,
                    outcome.name,
                    outcome.snapshot_id,
                    outcome.base_image_id,
                    outcome.changed_blocks,
                    outcome.stored_bytes,
                    outcome.duration_ms as f64 / 1000.0,
                    outcome.package_sha256
                );
                if let Some(v) = &verification {
                    text.push_str(&format!("\n{}", describe_verification(v)));
                }
                text
            });
            if !passed {
                return Err(reported_failure(6, format!("image {} failed verification", outcome.image_id)));
            }
        }
        Commands::Verify(args) => {
            let outcome = verify_image(cli, &args.image, args.method.into(), &args.expect, args.timeout, &cancel)?;
            ui.print(&outcome, describe_verification);
            if !outcome.passed {
                return Err(reported_failure(6, format!("image {} failed verification", outcome.image_id)));
            }
        }
        Commands::Images(command) => images(cli, provider, command, ui, &cancel)?,
        Commands::Gc { dry_run, .. } => {
            let report = gc::collect(provider, &cli.state_dir, *dry_run).map_err(|e| failure(1, e))?;
            ui.print(&report, |r| {
                let verb = if *dry_run { "would remove" } else { "removed" };
                let mut lines: Vec<String> = r.removed.iter().map(|x| format!("{verb}: {x}")).collect();
                lines.extend(r.kept_live.iter().map(|x| format!("kept (live): {x}")));
                lines.extend(r.failed.iter().map(|x| format!("FAILED to undo: {x}")));
                if lines.is_empty() {
                    lines.push("nothing to collect".into());
                }
                lines.join("\n")
            });
            if !report.failed.is_empty() {
                return Err(reported_failure(1, format!("{} dead bake(s) could not be undone", report.failed.len())));
            }
        }
    }
    Ok(())
}

fn describe_prune(report: &bakery::prune::Report) -> String {
    let verb = if report.dry_run { "would delete" } else { "deleted" };
    let mut lines: Vec<String> =
        report.deleted.iter().map(|i| format!("{verb} {} {} ({})", i.id, i.name, i.created)).collect();
    lines.extend(report.kept.iter().map(|i| format!("kept {} {}: {}", i.id, i.name, i.reasons.join("; "))));
    lines.extend(report.protected.iter().map(|id| format!("protected {id} from deregistration (it serves)")));
    lines.extend(report.deprecated.iter().map(|id| format!("deprecated {id} (kept only because it is used)")));
    lines.extend(report.failed.iter().map(|x| format!("FAILED: {x}")));
    if report.deleted.is_empty() && report.kept.is_empty() {
        lines.push(format!("no images of {}", report.app));
    }
    lines.join("\n")
}

/// The launcher's view of the same provider: what uses images.
fn open_cloud(cli: &Cli) -> Result<Box<dyn bakery::launch::cloud::Cloud>, Failure> {
    let kind = match cli.provider {
        ProviderKind::Local => bakery::launch::CloudKind::Local,
        ProviderKind::Aws => bakery::launch::CloudKind::Aws,
    };
    // The launcher's state table is not read: only what uses images.
    bakery::launch::open_cloud(kind, &cli.state_dir, cli.aws.region.clone(), None)
        .map_err(|e| failure(2, format!("the launcher's clusters: {e}")))
}

/// An image by id, name or base family; exit 4 when there is none.
fn find_image(provider: &dyn Provider, id: &str) -> Result<Image, Failure> {
    provider
        .images()
        .find_image(id)
        .map_err(|e| failure(1, e))?
        .ok_or_else(|| failure(4, format!("image {id} not found")))
}

fn images(
    cli: &Cli,
    provider: &dyn Provider,
    command: &ImagesCommand,
    ui: &Ui,
    cancel: &AtomicBool,
) -> Result<(), Failure> {
    let find = |id: &str| find_image(provider, id);
    match command {
        ImagesCommand::List => {
            let images = provider.images().list_images().map_err(|e| failure(1, e))?;
            ui.print(&images, |images| {
                let mut lines = vec![format!("{:<22} {:<20} {:<12} {}", "IMAGE", "CREATED", "VERSION", "NAME")];
                lines.extend(images.iter().map(|i| {
                    let version = i.tags.get("version").map(String::as_str).unwrap_or("-");
                    format!("{:<22} {:<20} {:<12} {}", i.id, i.created, version, i.name)
                }));
                lines.join("\n")
            });
        }
        ImagesCommand::Show { id } => {
            let image = find(id)?;
            ui.print(&image, |i| {
                let mut lines = vec![
                    format!("id:          {}", i.id),
                    format!("name:        {}", i.name),
                    format!("description: {}", i.description),
                    format!("snapshot:    {}", i.snapshot_id),
                    format!("size:        {} MiB", i.volume_size >> 20),
                    format!("created:     {}", i.created),
                    "tags:".to_string(),
                ];
                lines.extend(i.tags.iter().map(|(k, v)| format!("  {k} = {v}")));
                lines.join("\n")
            });
        }
        ImagesCommand::Rm { id } => {
            let image = find(id)?;
            provider.delete_image(&image.id).map_err(|e| failure(1, e))?;
            ui.print(&serde_json::json!({ "removed": image.id }), |_| format!("removed {}", image.id));
        }
        ImagesCommand::Export { id, output_file } => {
            let image = find(id)?;
            provider.export_image(&image.id, output_file, cancel).map_err(|e| failure(1, e))?;
            let result = serde_json::json!({ "image_id": image.id, "path": output_file });
            ui.print(&result, |_| format!("wrote {} to {}", image.id, output_file.display()));
        }
        ImagesCommand::Prune { app, keep, older_than, dry_run } => {
            let request =
                bakery::prune::Request { app: app.clone(), keep: *keep, older_than: *older_than, dry_run: *dry_run };
            request.check().map_err(|e| failure(3, e))?;
            let cloud = open_cloud(cli)?;
            let report = bakery::prune::prune(provider, cloud.as_ref(), &request).map_err(|e| failure(1, e))?;
            ui.print(&report, describe_prune);
            if !report.failed.is_empty() {
                return Err(reported_failure(1, format!("{} image(s) could not be pruned", report.failed.len())));
            }
        }
        ImagesCommand::Manifest { id } => print_document(provider, &find(id)?, Document::Manifest)?,
        ImagesCommand::Sbom { id } => print_document(provider, &find(id)?, Document::Sbom)?,
        ImagesCommand::Provenance { id } => print_document(provider, &find(id)?, Document::Provenance)?,
    }
    Ok(())
}

/// Prints one of an image's documents as it was written: the document is the JSON result.
fn print_document(provider: &dyn Provider, image: &Image, document: Document) -> Result<(), Failure> {
    let content = provider.images().document(&image.id, document).map_err(|e| failure(1, e))?;
    let content = content.ok_or_else(|| {
        let (name, path) = (document.as_str(), document.image_path());
        failure(
            4,
            format!(
                "the {provider} registry keeps no {name} next to {}: it is inside the image, {path}",
                image.id,
                provider = provider.kind()
            ),
        )
    })?;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(&content).and_then(|()| stdout.write_all(b"\n")).map_err(|e| failure(1, e))
}

/// With `--output json`, the result lists every problem as {file, key, line, message}, also
/// when there are problems (exit 3).
fn check_recipes(files: &[PathBuf], ui: &Ui, output: OutputFormat) -> Result<(), Failure> {
    let check = |file: &PathBuf| match recipe::is_base_recipe(file) {
        true => recipe::load_base(file).err(),
        false => recipe::load(file).err(),
    };
    let problems: Vec<recipe::Problem> = files.iter().filter_map(check).flat_map(|error| error.problems()).collect();
    let result = serde_json::json!({ "checked": files, "problems": problems });
    if problems.is_empty() {
        ui.print(&result, |_| format!("{} recipe(s) OK", files.len()));
        return Ok(());
    }
    if output == OutputFormat::Json {
        ui.print(&result, |_| String::new());
        return Err(reported_failure(3, format!("{} problem(s) in the recipes", problems.len())));
    }
    Err(failure(3, problems.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }
}

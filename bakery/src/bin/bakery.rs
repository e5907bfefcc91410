//! The `bakery` command line: a thin layer over the library.

use bakery::bake::{self, BakeRequest};
use bakery::provider::Provider;
use bakery::ui::{OutputFormat, Ui};
use bakery::{base, gc, local, recipe};
use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;
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
/// 5 busy, 130 interrupted, 1 anything else.
#[derive(Parser)]
#[command(version, max_term_width = 100)]
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

    #[command(subcommand)]
    command: Commands,
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
    Bake(BakeArgs),

    /// List, show, remove and export registered images.
    #[command(subcommand)]
    Images(ImagesCommand),

    /// Validate recipes, reporting every problem at once.
    #[command(subcommand)]
    Recipe(RecipeCommand),

    /// Remove what crashed or killed bakes left behind: mounts, loop devices, volumes,
    /// scratch files, unregistered snapshots and unreferenced blocks. Live bakes are untouched.
    Gc {
        /// Only list what would be removed.
        #[arg(long)]
        dry_run: bool,
    },
}

#[derive(Subcommand)]
enum BaseCommand {
    /// Build a base image from its recipe, or return the cached one with the same recipe hash.
    Build {
        /// A base recipe, e.g. base-images/debian12-jre17-tomcat10.toml.
        recipe: PathBuf,
        /// Build even when an image with the same recipe hash exists.
        #[arg(long)]
        rebuild: bool,
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
}

#[derive(Subcommand)]
enum ImagesCommand {
    /// List images, newest first.
    List,
    /// Show one image with its tags.
    Show { id: String },
    /// Deregister an image and delete its snapshot.
    Rm { id: String },
    /// Write an image's root disk as a raw (sparse) file.
    Export {
        id: String,
        #[arg(short, long)]
        output_file: PathBuf,
    },
}

#[derive(Subcommand)]
enum RecipeCommand {
    /// Check recipes; every problem in every file is reported.
    Check { files: Vec<PathBuf> },
}

/// A failure with its exit status.
struct Failure {
    code: u8,
    message: String,
}

fn failure(code: i32, error: impl std::fmt::Display) -> Failure {
    Failure { code: code as u8, message: error.to_string() }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    let ui = Ui::new(cli.output);
    match run(&cli, &ui) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            if cli.output == OutputFormat::Json {
                let error = serde_json::json!({ "error": failure.message, "exit_code": failure.code });
                println!("{error}");
            }
            eprintln!("error: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

fn init_logging(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("BAKERY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("bakery={default},warn")));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
}

/// Ctrl-C or SIGTERM asks the running step to stop and undo; a second one exits at once.
fn cancellation() -> Arc<AtomicBool> {
    let cancel = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(signal, 130, Arc::clone(&cancel)).expect("signal handler");
        signal_hook::flag::register(signal, Arc::clone(&cancel)).expect("signal handler");
    }
    cancel
}

fn open_provider(cli: &Cli) -> Result<Box<dyn Provider>, Failure> {
    match cli.provider {
        ProviderKind::Local => local::LocalProvider::open(&cli.state_dir)
            .map(|p| Box::new(p) as Box<dyn Provider>)
            .map_err(|e| failure(1, format!("opening the local state in {}: {e}", cli.state_dir.display()))),
        ProviderKind::Aws => Err(failure(2, "the aws provider is not part of this build yet; use --provider local")),
    }
}

fn print<T: Serialize>(ui: &Ui, value: &T, text: impl FnOnce(&T) -> String) {
    match ui.format {
        OutputFormat::Json => println!("{}", serde_json::to_string(value).expect("serialisable")),
        OutputFormat::Text => println!("{}", text(value)),
    }
}

fn run(cli: &Cli, ui: &Ui) -> Result<(), Failure> {
    if let Commands::Recipe(RecipeCommand::Check { files }) = &cli.command {
        return check_recipes(files, ui);
    }
    let provider = open_provider(cli)?;
    let provider = provider.as_ref();
    let cancel = cancellation();
    match &cli.command {
        Commands::Recipe(_) => unreachable!("handled above"),
        Commands::Base(BaseCommand::Build { recipe, rebuild }) => {
            let outcome = base::build(provider, &cli.state_dir, recipe, *rebuild, ui, &cancel)
                .map_err(|e| failure(e.exit_code(), e))?;
            print(ui, &outcome, |o| {
                let how = if o.reused { "cached" } else { "built" };
                format!("{} {how}: {} ({}) in {:.1}s", o.name, o.image_id, o.snapshot_id, o.duration_ms as f64 / 1000.0)
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
            print(ui, &outcome, |o| {
                let what = if o.reused { "reused (same bake key)" } else { "baked" };
                format!(
                    "{what}: {} {}\n  snapshot {} over base {}\n  {} changed blocks, {} bytes stored, {:.1}s\n  package sha256 {}",
                    o.image_id,
                    o.name,
                    o.snapshot_id,
                    o.base_image_id,
                    o.changed_blocks,
                    o.stored_bytes,
                    o.duration_ms as f64 / 1000.0,
                    o.package_sha256
                )
            });
        }
        Commands::Images(command) => images(provider, command, ui, &cancel)?,
        Commands::Gc { dry_run } => {
            let report = gc::collect(provider, &cli.state_dir, *dry_run).map_err(|e| failure(1, e))?;
            print(ui, &report, |r| {
                let verb = if *dry_run { "would remove" } else { "removed" };
                let mut lines: Vec<String> = r.removed.iter().map(|x| format!("{verb}: {x}")).collect();
                lines.extend(r.kept_live.iter().map(|x| format!("kept (live): {x}")));
                if lines.is_empty() {
                    lines.push("nothing to collect".into());
                }
                lines.join("\n")
            });
        }
    }
    Ok(())
}

fn images(provider: &dyn Provider, command: &ImagesCommand, ui: &Ui, cancel: &AtomicBool) -> Result<(), Failure> {
    let find = |id: &str| {
        provider.find_image(id).map_err(|e| failure(1, e))?.ok_or_else(|| failure(4, format!("image {id} not found")))
    };
    match command {
        ImagesCommand::List => {
            let images = provider.list_images().map_err(|e| failure(1, e))?;
            print(ui, &images, |images| {
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
            print(ui, &image, |i| {
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
            print(ui, &serde_json::json!({ "removed": image.id }), |_| format!("removed {}", image.id));
        }
        ImagesCommand::Export { id, output_file } => {
            let image = find(id)?;
            provider.export_image(&image.id, output_file, cancel).map_err(|e| failure(1, e))?;
            let result = serde_json::json!({ "image_id": image.id, "path": output_file });
            print(ui, &result, |_| format!("wrote {} to {}", image.id, output_file.display()));
        }
    }
    Ok(())
}

fn check_recipes(files: &[PathBuf], ui: &Ui) -> Result<(), Failure> {
    let mut problems = Vec::new();
    for file in files {
        if let Err(error) = recipe::load(file) {
            problems.push(error.to_string());
        }
    }
    let result = serde_json::json!({ "checked": files, "problems": problems });
    if problems.is_empty() {
        print(ui, &result, |_| format!("{} recipe(s) OK", files.len()));
        return Ok(());
    }
    Err(failure(3, problems.join("\n")))
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

//! Recipes: what an app team customizes when baking its package onto a base image.
//!
//! A recipe is a TOML file that may `extends` another. Loading one checks everything that can
//! be checked before a bake and reports every problem at once, each against the file that holds
//! the offending key, so a team fixes a recipe in one round trip rather than one error per run.

use serde::Serialize;
use snafu::{ResultExt, Snafu};
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use toml::Table;

mod base;
mod check;
pub(crate) mod lines;
mod template;

pub use base::{is_base_recipe, load_base, AptSource, BaseRecipe, Origin, TeamLayer};

use check::{check_templates, Checker};
use template::render;

/// Template names whose values come from the bake rather than from `[vars]`.
pub const BUILTIN_VARS: &[&str] =
    &["app", "version", "package_sha256", "build_job", "build_number", "commit", "base_image"];

pub(super) const DEFAULT_ACCOUNT: &str = "root";
pub(super) const DEFAULT_FILE_MODE: u32 = 0o644;
const DEFAULT_MAX_EXPANDED_BYTES: u64 = 4 << 30;

#[derive(Debug, Snafu)]
pub enum Error {
    #[snafu(display("could not read recipe {}: {source}", path.display()))]
    Read { path: PathBuf, source: std::io::Error },

    #[snafu(display("{}: {source}", path.display()))]
    Parse { path: PathBuf, line: Option<usize>, source: Box<toml::de::Error> },

    #[snafu(display("{}", problems.iter().map(Problem::to_string).collect::<Vec<_>>().join("\n")))]
    Invalid { problems: Vec<Problem> },

    #[snafu(display("could not render {what}: {message}"))]
    Render { what: String, message: String },
}

/// One thing wrong with a recipe; `key` is a path such as `files[1].mode` (empty where the
/// whole file is wrong), `line` where it is in the file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Problem {
    pub file: PathBuf,
    pub key: String,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        match self.key.as_str() {
            "" => write!(f, ": {}", self.message),
            key => write!(f, ": {key}: {}", self.message),
        }
    }
}

impl Error {
    /// What is wrong, as problem records (`recipe check --output json`): a file that cannot be
    /// read or parsed is one problem.
    pub fn problems(&self) -> Vec<Problem> {
        let whole_file =
            |path: &Path, line, message: String| Problem { file: path.into(), key: String::new(), line, message };
        match self {
            Error::Invalid { problems } => problems.clone(),
            Error::Read { path, source } => vec![whole_file(path, None, format!("could not read it: {source}"))],
            Error::Parse { path, line, source } => vec![whole_file(path, *line, source.message().to_string())],
            Error::Render { what, message } => {
                vec![whole_file(Path::new(""), None, format!("could not render {what}: {message}"))]
            }
        }
    }
}

/// A recipe with its `extends` chain merged and defaults applied.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Recipe {
    /// The file loaded first, then its ancestors.
    pub files_loaded: Vec<PathBuf>,
    pub description: Option<String>,
    pub package: PackageSpec,
    /// Sorted by path: distinct paths don't depend on each other, and a fixed order makes
    /// equivalent recipes compare (and hash) equal.
    pub files: Vec<FileSpec>,
    pub commands: Vec<String>,
    pub services: Services,
    pub vars: BTreeMap<String, String>,
    pub tags: BTreeMap<String, String>,
}

/// How the package is unpacked into the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PackageSpec {
    pub install_root: String,
    /// Names, resolved later against the image's own /etc/passwd and /etc/group.
    pub owner: String,
    pub group: String,
    pub strip_components: usize,
    pub max_expanded_bytes: u64,
    pub allow_device_nodes: bool,
    pub allow_external_hardlinks: bool,
}

/// A file written into the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FileSpec {
    pub path: String,
    pub content: String,
    pub mode: u32,
    pub owner: String,
    pub group: String,
}

/// Systemd units to enable and disable, each sorted and without duplicates.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Services {
    pub enable: Vec<String>,
    pub disable: Vec<String>,
}

/// Loads the recipe at `path` and the chain of recipes it extends.
pub fn load(path: &Path) -> Result<Recipe, Error> {
    let mut problems = Vec::new();
    let (layer, mut declares_extends) = read_layer(path, &mut problems)?;
    let mut seen = vec![fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())];
    let mut layers = vec![layer];
    // Checks that need the whole chain (required keys, template names) would only produce
    // noise when part of it couldn't be loaded; the reason it couldn't is reported instead.
    let mut complete = true;

    loop {
        let child = layers.last().expect("the chain starts with the loaded file");
        let Some(extends) = &child.extends else {
            complete &= !declares_extends;
            break;
        };
        let parent = child.file.parent().unwrap_or(Path::new("")).join(extends);
        let extends_problem =
            |message: String| Problem { file: child.file.clone(), key: "extends".into(), line: None, message };
        let unreadable = |e: &std::io::Error| format!("cannot read {}: {e}", parent.display());
        let canonical = match fs::canonicalize(&parent) {
            Ok(canonical) => canonical,
            Err(e) => {
                problems.push(extends_problem(unreadable(&e)));
                complete = false;
                break;
            }
        };
        if let Some(start) = seen.iter().position(|p| *p == canonical) {
            let cycle: Vec<String> = layers[start..]
                .iter()
                .map(|l| l.file.display().to_string())
                .chain([parent.display().to_string()])
                .collect();
            let cycle = cycle.join(" -> ");
            problems.push(extends_problem(format!("extends chain is a cycle: {cycle}")));
            complete = false;
            break;
        }
        let (layer, extends_key) = match read_layer(&parent, &mut problems) {
            Ok(read) => read,
            Err(Error::Read { source, .. }) => {
                problems.push(extends_problem(unreadable(&source)));
                complete = false;
                break;
            }
            Err(e) => return Err(e),
        };
        declares_extends = extends_key;
        seen.push(canonical);
        layers.push(layer);
    }

    if complete {
        let mut known: BTreeSet<&str> = BUILTIN_VARS.iter().copied().collect();
        known.extend(layers.iter().flat_map(|l| l.vars.keys().map(String::as_str)));
        for layer in &layers {
            check_templates(layer, &known, &mut problems);
        }
    }

    let install_root = layers.iter().find_map(|l| l.install_root.clone());
    if complete && install_root.is_none() {
        problems.push(Problem {
            file: path.to_path_buf(),
            key: "package.install_root".into(),
            line: None,
            message: "is required (in this recipe or one it extends)".into(),
        });
    }
    match install_root {
        Some(install_root) if problems.is_empty() => Ok(merge(layers, install_root)),
        _ => {
            let texts: BTreeMap<&Path, String> =
                layers.iter().filter_map(|l| Some((l.file.as_path(), fs::read_to_string(&l.file).ok()?))).collect();
            for problem in &mut problems {
                let text = texts.get(problem.file.as_path());
                problem.line = problem.line.or_else(|| lines::line_of(text?, &problem.key));
            }
            // Group by file, in chain order; within a file, discovery order.
            let order: Vec<&Path> = layers.iter().map(|l| l.file.as_path()).collect();
            problems.sort_by_key(|p| order.iter().position(|f| *f == p.file));
            InvalidSnafu { problems }.fail()
        }
    }
}

impl Recipe {
    /// Everything that affects the built image, as deterministic JSON for the bake key. Where
    /// recipe files live and the human description don't change the image, so they're left out.
    pub fn canonical_json(&self) -> String {
        #[derive(Serialize)]
        struct Canonical<'a> {
            package: &'a PackageSpec,
            files: &'a [FileSpec],
            commands: &'a [String],
            services: &'a Services,
            vars: &'a BTreeMap<String, String>,
            tags: &'a BTreeMap<String, String>,
        }
        serde_json::to_string(&Canonical {
            package: &self.package,
            files: &self.files,
            commands: &self.commands,
            services: &self.services,
            vars: &self.vars,
            tags: &self.tags,
        })
        .expect("a recipe has only string map keys, so it serializes")
    }

    /// The recipe with templates expanded from `[vars]` and `builtins` (values for
    /// [`BUILTIN_VARS`]; other names in it are ignored so they can't shadow vars).
    pub fn rendered(&self, builtins: &BTreeMap<String, String>) -> Result<Recipe, Error> {
        let values: BTreeMap<&str, &str> = self
            .vars
            .iter()
            .chain(builtins.iter().filter(|(k, _)| BUILTIN_VARS.contains(&k.as_str())))
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let render_one =
            |text: &str, what: String| render(text, &values).map_err(|message| RenderSnafu { what, message }.build());
        let mut out = self.clone();
        for file in &mut out.files {
            file.content = render_one(&file.content, format!("the content of {}", file.path))?;
        }
        for (i, command) in out.commands.iter_mut().enumerate() {
            *command = render_one(command, format!("commands[{i}]"))?;
        }
        for (key, value) in &mut out.tags {
            *value = render_one(value, format!("tag {key}"))?;
        }
        Ok(out)
    }
}

/// One recipe file's own settings, before merging with the files it extends.
///
/// Invalid values are reported and then either dropped or replaced by placeholders, so one
/// mistake doesn't cascade (a mistyped var still counts as defined; a bad install_root still
/// counts as given). Placeholders never reach a `Recipe`: any problem prevents building one.
#[derive(Default)]
struct Layer {
    file: PathBuf,
    extends: Option<String>,
    description: Option<String>,
    install_root: Option<String>,
    owner: Option<String>,
    group: Option<String>,
    strip_components: Option<usize>,
    max_expanded_bytes: Option<u64>,
    allow_device_nodes: Option<bool>,
    allow_external_hardlinks: Option<bool>,
    vars: BTreeMap<String, String>,
    /// Each with its index in this file's `files` array, to name it in problems.
    files: Vec<(usize, FileSpec)>,
    commands: Vec<String>,
    enable: Vec<String>,
    disable: Vec<String>,
    tags: BTreeMap<String, String>,
}

/// Reads and checks one file; also says whether it has an `extends` key at all, valid or not.
fn read_layer(path: &Path, problems: &mut Vec<Problem>) -> Result<(Layer, bool), Error> {
    tracing::debug!(recipe = %path.display(), "loading recipe");
    let text = fs::read_to_string(path).context(ReadSnafu { path })?;
    let table: Table = text.parse().map_err(|source: toml::de::Error| {
        let line = source.span().map(|span| lines::line_at(&text, span.start));
        Error::Parse { path: path.to_path_buf(), line, source: Box::new(source) }
    })?;
    let mut checker = Checker { file: path, problems };
    Ok((checker.layer(&table), table.contains_key("extends")))
}

/// Merges a chain of layers (the loaded file first) from the root ancestor down.
fn merge(layers: Vec<Layer>, install_root: String) -> Recipe {
    let files_loaded = layers.iter().map(|l| l.file.clone()).collect();
    let mut description = None;
    let mut owner = None;
    let mut group = None;
    let mut strip_components = None;
    let mut max_expanded_bytes = None;
    let mut allow_device_nodes = None;
    let mut allow_external_hardlinks = None;
    let mut vars = BTreeMap::new();
    let mut files = BTreeMap::new();
    let mut commands = Vec::new();
    let mut enable = BTreeSet::new();
    let mut disable = BTreeSet::new();
    let mut tags = BTreeMap::new();
    for layer in layers.into_iter().rev() {
        description = layer.description.or(description);
        owner = layer.owner.or(owner);
        group = layer.group.or(group);
        strip_components = layer.strip_components.or(strip_components);
        max_expanded_bytes = layer.max_expanded_bytes.or(max_expanded_bytes);
        allow_device_nodes = layer.allow_device_nodes.or(allow_device_nodes);
        allow_external_hardlinks = layer.allow_external_hardlinks.or(allow_external_hardlinks);
        vars.extend(layer.vars);
        files.extend(layer.files.into_iter().map(|(_, f)| (f.path.clone(), f)));
        commands.extend(layer.commands);
        for service in layer.disable {
            enable.remove(&service);
            disable.insert(service);
        }
        for service in layer.enable {
            disable.remove(&service);
            enable.insert(service);
        }
        tags.extend(layer.tags);
    }
    Recipe {
        files_loaded,
        description,
        package: PackageSpec {
            install_root,
            owner: owner.unwrap_or_else(|| DEFAULT_ACCOUNT.into()),
            group: group.unwrap_or_else(|| DEFAULT_ACCOUNT.into()),
            strip_components: strip_components.unwrap_or(0),
            max_expanded_bytes: max_expanded_bytes.unwrap_or(DEFAULT_MAX_EXPANDED_BYTES),
            allow_device_nodes: allow_device_nodes.unwrap_or(false),
            allow_external_hardlinks: allow_external_hardlinks.unwrap_or(false),
        },
        files: files.into_values().collect(),
        commands,
        services: Services { enable: enable.into_iter().collect(), disable: disable.into_iter().collect() },
        vars,
        tags,
    }
}

#[cfg(test)]
mod tests {
    use super::check::{closest, parse_mode, parse_size, TOP_KEYS};
    use super::*;
    use std::collections::BTreeSet;

    const RECIPES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../recipes");

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        fs::write(&path, text).unwrap();
        path
    }

    fn problems_of(result: Result<Recipe, Error>) -> Vec<Problem> {
        match result {
            Err(Error::Invalid { problems }) => problems,
            other => panic!("expected problems, got {other:?}"),
        }
    }

    fn keys(problems: &[Problem]) -> BTreeSet<&str> {
        problems.iter().map(|p| p.key.as_str()).collect()
    }

    fn builtins() -> BTreeMap<String, String> {
        BUILTIN_VARS.iter().map(|name| (name.to_string(), format!("<{name}>"))).collect()
    }

    #[test]
    fn sample_webapp_recipe_loads_merged() {
        let path = Path::new(RECIPES).join("tomcat-webapp.toml");
        let recipe = load(&path).unwrap();
        assert_eq!(recipe.files_loaded, [path.clone(), Path::new(RECIPES).join("tomcat-base.toml")]);
        assert_eq!(recipe.package.install_root, "/var/lib/tomcat10/webapps");
        assert_eq!((recipe.package.owner.as_str(), recipe.package.group.as_str()), ("tomcat", "tomcat"));
        assert_eq!(recipe.package.max_expanded_bytes, 2 << 30);
        assert_eq!(recipe.services.enable, ["tomcat10"]);
        assert_eq!(recipe.vars["heap"], "384m");
        assert_eq!(recipe.files.len(), 1);
        assert_eq!(recipe.files[0].mode, 0o644);
        assert_eq!(recipe.commands.len(), 1);

        let rendered = recipe.rendered(&builtins()).unwrap();
        assert!(rendered.files[0].content.contains("-Xmx384m -Dapp.version=<version>"));
        assert_eq!(rendered.commands[0], "chown -R tomcat:tomcat /var/lib/tomcat10/webapps/<app>");
        assert_eq!(rendered.tags["team"], "hello");
    }

    #[test]
    fn sample_base_recipe_loads_alone() {
        let recipe = load(&Path::new(RECIPES).join("tomcat-base.toml")).unwrap();
        assert_eq!(recipe.files_loaded.len(), 1);
        assert_eq!(recipe.vars["heap"], "256m");
        assert!(recipe.commands.is_empty());
    }

    #[test]
    fn broken_example_reports_every_problem_at_once() {
        let problems = problems_of(load(&Path::new(RECIPES).join("examples/broken.toml")));
        let expected = BTreeSet::from([
            "comands",
            "package.install_root",
            "package.owner",
            "package.max_expanded_size",
            "vars.heap",
            "files[0].mode",
            "files[0].content",
            "files[1].path",
            "files[1].content",
            "services.enable[0]",
        ]);
        assert_eq!(keys(&problems), expected, "{problems:#?}");
        assert_eq!(problems.len(), expected.len(), "{problems:#?}");
        assert!(problems.iter().all(|p| p.file.ends_with("examples/broken.toml")));
    }

    #[test]
    fn problems_display_one_line_each() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "bad.toml",
            "[package]\ninstall_root = \"/srv\"\n[[files]]\npath = \"/a\"\ncontent = \"\"\n\
             [[files]]\npath = \"/b\"\ncontent = \"\"\nmode = \"0999\"\n",
        );
        let error = load(&path).unwrap_err();
        assert_eq!(
            error.to_string(),
            format!("{}:9: files[1].mode: \"0999\" is not an octal file mode", path.display())
        );

        write(dir.path(), "bad.toml", "[package]\ninstal_root = \"/srv\"\n");
        let lines = load(&path).unwrap_err().to_string();
        let lines: Vec<&str> = lines.lines().collect();
        assert_eq!(lines.len(), 2, "{lines:?}");
        assert!(
            lines[0].ends_with(":2: package.instal_root: unknown key (did you mean \"install_root\"?)"),
            "{lines:?}"
        );
        assert!(lines[1].ends_with("package.install_root: is required (in this recipe or one it extends)"));
    }

    #[test]
    fn extends_merges_tables_lists_and_services() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "c.toml",
            r#"
            commands = ["c1"]
            [package]
            install_root = "/srv/c"
            owner = "c"
            strip_components = 2
            [vars]
            x = "c"
            y = "c"
            [[files]]
            path = "/etc/shared"
            content = "from c"
            [[files]]
            path = "/etc/c"
            content = "c"
            [services]
            enable = ["a", "b"]
            disable = ["d"]
            [tags]
            t = "c"
            "#,
        );
        fs::create_dir(dir.path().join("sub")).unwrap();
        write(
            dir.path(),
            "sub/b.toml",
            r#"
            extends = "../c.toml"
            commands = ["b1", "b2"]
            [package]
            group = "b"
            [vars]
            y = "b"
            [services]
            enable = ["d"]
            "#,
        );
        let a = write(
            dir.path(),
            "a.toml",
            r#"
            description = "a"
            extends = "sub/b.toml"
            commands = ["a1"]
            [package]
            install_root = "/srv/a"
            [[files]]
            path = "/etc/shared"
            content = "from a"
            mode = "0600"
            [services]
            disable = ["b"]
            [tags]
            t = "a"
            u = "a"
            "#,
        );
        let recipe = load(&a).unwrap();
        assert_eq!(recipe.files_loaded, [a, dir.path().join("sub/b.toml"), dir.path().join("sub/../c.toml")]);
        assert_eq!(recipe.description.as_deref(), Some("a"));
        let package = &recipe.package;
        assert_eq!(package.install_root, "/srv/a");
        assert_eq!((package.owner.as_str(), package.group.as_str()), ("c", "b"));
        assert_eq!(package.strip_components, 2);
        assert_eq!(package.max_expanded_bytes, DEFAULT_MAX_EXPANDED_BYTES);
        assert_eq!(recipe.commands, ["c1", "b1", "b2", "a1"]);
        let files: Vec<(&str, &str, u32)> =
            recipe.files.iter().map(|f| (f.path.as_str(), f.content.as_str(), f.mode)).collect();
        assert_eq!(files, [("/etc/c", "c", 0o644), ("/etc/shared", "from a", 0o600)]);
        assert_eq!(recipe.services.enable, ["a", "d"]);
        assert_eq!(recipe.services.disable, ["b"]);
        assert_eq!(recipe.vars, BTreeMap::from([("x".into(), "c".into()), ("y".into(), "b".into())]));
        assert_eq!(recipe.tags, BTreeMap::from([("t".into(), "a".into()), ("u".into(), "a".into())]));
    }

    #[test]
    fn problems_are_reported_against_the_file_holding_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let base =
            write(dir.path(), "base.toml", "[[files]]\npath = \"/etc/x\"\ncontent = \"{{ name }}\"\nmode = \"888\"\n");
        let child = write(
            dir.path(),
            "child.toml",
            "extends = \"base.toml\"\n[package]\ninstall_root = \"/srv/../etc\"\n[vars]\nname = \"ok\"\n",
        );
        let problems = problems_of(load(&child));
        let found: Vec<(&Path, &str)> = problems.iter().map(|p| (p.file.as_path(), p.key.as_str())).collect();
        assert_eq!(found, [(child.as_path(), "package.install_root"), (base.as_path(), "files[0].mode")]);
    }

    #[test]
    fn extends_cycle_names_the_files() {
        let dir = tempfile::tempdir().unwrap();
        let a = write(dir.path(), "a.toml", "extends = \"b.toml\"\n");
        let b = write(dir.path(), "b.toml", "extends = \"a.toml\"\n");
        let problems = problems_of(load(&a));
        assert_eq!(problems.len(), 1, "{problems:#?}");
        assert_eq!((problems[0].file.as_path(), problems[0].key.as_str()), (b.as_path(), "extends"));
        let chain = [&a, &b, &a].map(|p| p.display().to_string()).join(" -> ");
        assert_eq!(problems[0].message, format!("extends chain is a cycle: {chain}"));

        let own = write(dir.path(), "own.toml", "extends = \"own.toml\"\n");
        assert!(problems_of(load(&own))[0].message.contains("cycle"));
    }

    #[test]
    fn missing_extends_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let child = write(dir.path(), "child.toml", "extends = \"nowhere.toml\"\n[vars]\n\"1x\" = \"a\"\n");
        let problems = problems_of(load(&child));
        // The bad var is still reported; the missing install_root is not, since the
        // missing file might have set it.
        assert_eq!(keys(&problems), BTreeSet::from(["extends", "vars.1x"]), "{problems:#?}");
        let missing = problems.iter().find(|p| p.key == "extends").unwrap();
        assert!(missing.message.contains(&dir.path().join("nowhere.toml").display().to_string()));
    }

    #[test]
    fn syntax_errors_name_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "syntax.toml", "description = \"x\"\n[package\n");
        let error = load(&path).unwrap_err();
        assert!(matches!(error, Error::Parse { .. }), "{error:?}");
        let message = error.to_string();
        assert!(message.starts_with(&path.display().to_string()), "{message}");
        assert!(message.contains("line 2"), "{message}");

        let child = write(dir.path(), "child.toml", "extends = \"syntax.toml\"\n");
        assert!(matches!(load(&child), Err(Error::Parse { path: p, .. }) if p == path));
    }

    #[test]
    fn templates_are_checked_and_rendered() {
        let dir = tempfile::tempdir().unwrap();
        let good = write(
            dir.path(),
            "good.toml",
            r#"
            commands = ["echo {{app}}:{{ version }}:{{  greeting }}", "no templates"]
            [package]
            install_root = "/srv"
            [vars]
            greeting = "hi"
            [tags]
            build = "{{ build_job }}#{{ build_number }}"
            "#,
        );
        let recipe = load(&good).unwrap();
        let rendered = recipe.rendered(&builtins()).unwrap();
        assert_eq!(rendered.commands, ["echo <app>:<version>:hi", "no templates"]);
        assert_eq!(rendered.tags["build"], "<build_job>#<build_number>");

        let partial = BTreeMap::from([("app".to_string(), "hello".to_string())]);
        let error = recipe.rendered(&partial).unwrap_err().to_string();
        assert_eq!(error, "could not render commands[0]: no value was given for built-in \"version\"");

        let bad = write(
            dir.path(),
            "bad.toml",
            r#"
            commands = ["{{ greting }}", "{{ app", "{{ two words }}", "{{ app }} {{ nope }} {{ nope }}"]
            [package]
            install_root = "/srv"
            [vars]
            greeting = "hi"
            app = "shadow"
            "#,
        );
        let problems = problems_of(load(&bad));
        let found: Vec<(&str, &str)> = problems.iter().map(|p| (p.key.as_str(), p.message.as_str())).collect();
        assert_eq!(
            found,
            [
                ("vars.app", "is a built-in template name and cannot be set"),
                ("commands[0]", "unknown template name \"greting\" (did you mean \"greeting\"?)"),
                ("commands[1]", "\"{{\" without a closing \"}}\" at \"{{ app\""),
                ("commands[2]", "\"{{ two words }}\" is not a template reference"),
                ("commands[3]", "unknown template name \"nope\""),
            ]
        );
    }

    #[test]
    fn canonical_json_ignores_layout_but_not_values() {
        let dir = tempfile::tempdir().unwrap();
        let one = write(
            dir.path(),
            "one.toml",
            r#"
            description = "first"
            commands = ["a", "b"]
            [package]
            install_root = "/srv"
            max_expanded_size = "1GiB"
            [[files]]
            path = "/etc/x"
            content = "x"
            [[files]]
            path = "/etc/y"
            content = "y"
            mode = "644"
            [services]
            enable = ["b", "a", "a"]
            [vars]
            v = "1"
            w = "2"
            "#,
        );
        write(
            dir.path(),
            "base.toml",
            "[package]\ninstall_root = \"/elsewhere\"\nowner = \"root\"\n[vars]\nw = \"2\"\n",
        );
        let two = write(
            dir.path(),
            "two.toml",
            r#"
extends = "base.toml"
description = "second, with the same effect"
commands = [ "a",
  "b" ]
[vars]
v = "1"
[services]
enable = ["a", "b"]
[[files]]
content = "y"
path = "/etc/y"
mode = "0o644"
[[files]]
path = "/etc/x"
content = 'x'
[package]
max_expanded_size = 1073741824
install_root = "/srv"
"#,
        );
        let three = write(dir.path(), "three.toml", &fs::read_to_string(&one).unwrap().replace("\"b\"]", "\"c\"]"));
        let json = |path: &Path| load(path).unwrap().canonical_json();
        assert_eq!(json(&one), json(&two));
        assert_ne!(json(&one), json(&three));
    }

    #[test]
    fn field_checks() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "fields.toml",
            r#"
            extends = 3
            [package]
            install_root = "/srv"
            strip_components = -1
            max_expanded_size = 0
            allow_device_nodes = "no"
            group = "a:b"
            [[files]]
            path = "/etc/dir/"
            mode = 420
            [[files]]
            path = "relative"
            content = "x"
            owner = " "
            [services]
            enable = ["-x", "ok"]
            disable = ["ok"]
            [tags]
            "aws:name" = "x"
            commands = ["oops"]
            "#,
        );
        let found: BTreeMap<String, String> =
            problems_of(load(&path)).into_iter().map(|p| (p.key, p.message)).collect();
        let expected = [
            ("extends", "must be a string, not integer"),
            ("package.strip_components", "-1 is not a number of path components"),
            ("package.max_expanded_size", "must be greater than zero"),
            ("package.allow_device_nodes", "must be true or false, not string"),
            ("package.group", "\"a:b\" is not a user or group name"),
            ("files[0].path", "\"/etc/dir/\" names a directory, not a file"),
            ("files[0].mode", "must be an octal string such as \"0644\", not integer"),
            ("files[0].content", "is required"),
            ("files[1].path", "\"relative\" is not an absolute path"),
            ("files[1].owner", "\" \" is not a user or group name"),
            ("services.enable[0]", "\"-x\" is not a systemd unit name"),
            ("services.disable", "\"ok\" is also in services.enable"),
            ("tags.aws:name", "tag keys starting with \"aws:\" are reserved"),
            (
                "tags.commands",
                "must be a string, not array (top-level keys like \"commands\" must come before the first [table] header)",
            ),
        ];
        let expected: BTreeMap<String, String> =
            expected.into_iter().map(|(k, m)| (k.to_string(), m.to_string())).collect();
        assert_eq!(found, expected);
    }

    #[test]
    fn modes() {
        assert_eq!(parse_mode("0644"), Some(0o644));
        assert_eq!(parse_mode("755"), Some(0o755));
        assert_eq!(parse_mode("04755"), Some(0o4755));
        assert_eq!(parse_mode("0o7777"), Some(0o7777));
        for bad in ["", "0999", "10000", "0o", "-644", "64 4", "0x1ff"] {
            assert_eq!(parse_mode(bad), None, "{bad}");
        }
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("10KiB"), Some(10 * 1024));
        assert_eq!(parse_size("512MiB"), Some(512 << 20));
        assert_eq!(parse_size("2 GiB"), Some(2 << 30));
        assert_eq!(parse_size("100MB"), Some(100_000_000));
        assert_eq!(parse_size("1TiB"), Some(1 << 40));
        assert_eq!(parse_size("7B"), Some(7));
        for bad in ["", "GiB", "2 gigs", "1.5GiB", "-1", "2gib", "99999999999TiB"] {
            assert_eq!(parse_size(bad), None, "{bad}");
        }
    }

    #[test]
    fn did_you_mean() {
        assert_eq!(closest("comands", TOP_KEYS.iter().copied()), Some("commands"));
        assert_eq!(closest("hepa", ["heap", "app"].into_iter()), Some("heap"));
        assert_eq!(closest("zzzzzz", TOP_KEYS.iter().copied()), None);
    }
}

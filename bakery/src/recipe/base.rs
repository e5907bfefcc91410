//! Base recipes (`base-images/*.toml`), checked as app recipes are: every problem at once, each
//! with its file, key and line.
//!
//! A standard base is built from Debian packages (`suite`, `disk_size_mib`, `hostname`,
//! `packages`). A team's base `extends` another base recipe and is a layer on top of that
//! base's image: extra apt sources (each signed by a key file next to the recipe), packages to
//! add and to remove, files, and commands, all applied in the image's chroot.

use super::check::Checker;
use super::template::render;
use super::{lines, Error, FileSpec, Layer, PackageSpec, Problem, Recipe, RenderSnafu, DEFAULT_ACCOUNT};
use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use toml::{Table, Value};

const STANDARD_KEYS: &[&str] = &["name", "description", "suite", "disk_size_mib", "hostname", "packages"];
const TEAM_KEYS: &[&str] =
    &["name", "description", "extends", "packages", "remove", "apt_sources", "files", "commands", "vars"];
const SOURCE_KEYS: &[&str] = &["name", "uris", "suites", "components", "key"];

/// A base recipe, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct BaseRecipe {
    pub name: String,
    pub description: String,
    /// Packages: all of them for a standard base, those to add for a team's.
    pub packages: Vec<String>,
    pub from: Origin,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    /// Built from Debian packages.
    Debian { suite: String, disk_size_mib: u64, hostname: String },
    /// A layer on another base.
    Base(Box<TeamLayer>),
}

/// What a team's base adds to the base it extends.
#[derive(Debug, Clone, PartialEq)]
pub struct TeamLayer {
    /// The base recipe extended, resolved against this recipe's directory.
    pub extends: PathBuf,
    pub remove: Vec<String>,
    pub apt_sources: Vec<AptSource>,
    /// Rendered from `[vars]`, sorted by path.
    pub files: Vec<FileSpec>,
    /// Rendered from `[vars]`.
    pub commands: Vec<String>,
}

/// An extra apt source, written into the image as `/etc/apt/sources.list.d/NAME.sources`
/// signed by `/etc/apt/keyrings/NAME.asc`.
#[derive(Debug, Clone, PartialEq)]
pub struct AptSource {
    pub name: String,
    pub uris: Vec<String>,
    pub suites: Vec<String>,
    pub components: Vec<String>,
    /// The key file's path and its ASCII-armored text.
    pub key_file: PathBuf,
    pub key: String,
}

impl AptSource {
    pub fn keyring_path(&self) -> String {
        format!("/etc/apt/keyrings/{}.asc", self.name)
    }

    /// The deb822 stanza apt reads.
    pub fn stanza(&self) -> String {
        format!(
            "Types: deb\nURIs: {}\nSuites: {}\nComponents: {}\nSigned-By: {}\n",
            self.uris.join(" "),
            self.suites.join(" "),
            self.components.join(" "),
            self.keyring_path()
        )
    }
}

impl TeamLayer {
    /// Files the layer writes: each source's key and stanza, then the recipe's own files.
    pub fn all_files(&self) -> Vec<FileSpec> {
        let file = |path: String, content: String| FileSpec {
            path,
            content,
            mode: 0o644,
            owner: "root".into(),
            group: "root".into(),
        };
        let mut files: Vec<FileSpec> = self
            .apt_sources
            .iter()
            .flat_map(|source| {
                [
                    file(source.keyring_path(), source.key.clone()),
                    file(format!("/etc/apt/sources.list.d/{}.sources", source.name), source.stanza()),
                ]
            })
            .collect();
        files.extend(self.files.iter().cloned());
        files
    }

    /// The layer as a recipe the bake pipeline applies: its files, then its commands.
    pub fn as_recipe(&self, packages: &[String], path: &Path) -> Recipe {
        Recipe {
            files_loaded: vec![path.to_path_buf()],
            description: None,
            package: PackageSpec {
                install_root: "/".into(),
                owner: DEFAULT_ACCOUNT.into(),
                group: DEFAULT_ACCOUNT.into(),
                strip_components: 0,
                max_expanded_bytes: 0,
                allow_device_nodes: false,
                allow_external_hardlinks: false,
            },
            files: self.all_files(),
            commands: self.all_commands(packages),
            services: Default::default(),
            vars: BTreeMap::new(),
            tags: BTreeMap::new(),
        }
    }

    /// The commands that apply the layer: update and install, purge, then the recipe's own.
    pub fn all_commands(&self, packages: &[String]) -> Vec<String> {
        let mut commands = Vec::new();
        if !packages.is_empty() {
            commands.push(format!("apt-get update -q && apt-get install -y -q {}", packages.join(" ")));
        }
        if !self.remove.is_empty() {
            commands.push(format!("apt-get purge -y -q {}", self.remove.join(" ")));
        }
        commands.extend(self.commands.iter().cloned());
        commands
    }
}

/// Whether a recipe file is a base recipe (it has a `name`) rather than an app recipe.
pub fn is_base_recipe(path: &Path) -> bool {
    let table = fs::read_to_string(path).ok().and_then(|text| text.parse::<Table>().ok());
    table.is_some_and(|table| table.contains_key("name"))
}

/// Loads and checks a base recipe; every problem is reported at once.
pub fn load_base(path: &Path) -> Result<BaseRecipe, Error> {
    let text = fs::read_to_string(path).map_err(|source| Error::Read { path: path.into(), source })?;
    let table: Table = text.parse().map_err(|source: toml::de::Error| {
        let line = source.span().map(|span| lines::line_at(&text, span.start));
        Error::Parse { path: path.to_path_buf(), line, source: Box::new(source) }
    })?;
    let mut problems = Vec::new();
    let recipe = check(path, &table, &mut problems);
    for problem in &mut problems {
        problem.line = problem.line.or_else(|| lines::line_of(&text, &problem.key));
    }
    match recipe {
        Some(recipe) if problems.is_empty() => Ok(recipe),
        _ => Err(Error::Invalid { problems }),
    }
}

fn check(path: &Path, table: &Table, problems: &mut Vec<Problem>) -> Option<BaseRecipe> {
    let mut checker = Checker { file: path, problems };
    let team = table.contains_key("extends");
    let known = if team { TEAM_KEYS } else { STANDARD_KEYS };
    let mut layer = Layer { file: path.to_path_buf(), ..Layer::default() };
    let mut fields: BTreeMap<&str, &Value> = BTreeMap::new();
    for (key, value) in table {
        if !known.contains(&key.as_str()) {
            if !team && TEAM_KEYS.contains(&key.as_str()) {
                checker.report(key, "is for a base that extends another: add `extends` (a standard base takes suite, disk_size_mib, hostname and packages)");
            } else {
                checker.unknown(key, key, known);
            }
            continue;
        }
        match key.as_str() {
            "files" => checker.files(value, &mut layer),
            "commands" => checker.commands(value, &mut layer),
            "vars" => {
                if let Some(vars) = checker.table(key, value) {
                    checker.vars(vars, &mut layer);
                }
            }
            _ => {
                fields.insert(key.as_str(), value);
            }
        }
    }
    let string = |checker: &mut Checker, key: &str| -> Option<String> {
        let Some(value) = fields.get(key) else {
            checker.report(key, "is required");
            return None;
        };
        let text = checker.string(key, value)?;
        if text.trim().is_empty() {
            checker.report(key, "must not be empty");
            return None;
        }
        Some(text)
    };
    let name = string(&mut checker, "name").filter(|name| {
        let valid = name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b));
        if !valid {
            checker.report("name", "must be letters, digits, '-', '.' or '_'");
        }
        valid
    });
    let description = string(&mut checker, "description");
    let packages = package_names(&mut checker, "packages", fields.get("packages").copied());

    let from = if team {
        let extends = string(&mut checker, "extends").map(|e| path.parent().unwrap_or(Path::new("")).join(e));
        if let Some(parent) = &extends {
            if !parent.is_file() {
                checker.report("extends", format!("{} is not a base recipe file", parent.display()));
            }
        }
        let remove = package_names(&mut checker, "remove", fields.get("remove").copied());
        let apt_sources = apt_sources(&mut checker, path, fields.get("apt_sources").copied());
        let known: BTreeSet<&str> = layer.vars.keys().map(String::as_str).collect();
        for (i, file) in &layer.files {
            checker.template(&format!("files[{i}].content"), &file.content, &known);
        }
        for (i, command) in layer.commands.iter().enumerate() {
            checker.template(&format!("commands[{i}]"), command, &known);
        }
        let extends = extends?;
        Origin::Base(Box::new(TeamLayer {
            extends,
            remove,
            apt_sources,
            files: layer.files.into_iter().map(|(_, f)| f).collect(),
            commands: layer.commands,
        }))
    } else {
        if packages.is_empty() && fields.contains_key("packages") {
            checker.report("packages", "must name at least one package");
        } else if !fields.contains_key("packages") {
            checker.report("packages", "is required");
        }
        let suite = string(&mut checker, "suite");
        let hostname = string(&mut checker, "hostname");
        let disk_size_mib = match fields.get("disk_size_mib") {
            None => {
                checker.report("disk_size_mib", "is required");
                None
            }
            Some(value) => checker.integer("disk_size_mib", value).and_then(|n| {
                let size = u64::try_from(n).ok().filter(|n| *n >= 512 && n % 2 == 0);
                if size.is_none() {
                    checker.report("disk_size_mib", format!("{n} is not an even number of MiB, 512 or more"));
                }
                size
            }),
        };
        Origin::Debian { suite: suite?, disk_size_mib: disk_size_mib?, hostname: hostname? }
    };
    let mut recipe = BaseRecipe { name: name?, description: description?, packages, from };
    if let Origin::Base(team) = &mut recipe.from {
        render_layer(team, &layer.vars).ok()?;
    }
    Some(recipe)
}

/// Expands `{{ var }}` in the layer's files and commands.
fn render_layer(team: &mut TeamLayer, vars: &BTreeMap<String, String>) -> Result<(), Error> {
    let values: BTreeMap<&str, &str> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let render_one =
        |text: &str, what: String| render(text, &values).map_err(|message| RenderSnafu { what, message }.build());
    for file in &mut team.files {
        file.content = render_one(&file.content, format!("the content of {}", file.path))?;
    }
    for (i, command) in team.commands.iter_mut().enumerate() {
        *command = render_one(command, format!("commands[{i}]"))?;
    }
    team.files.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(())
}

/// Debian package names (as apt takes them: no options, no spaces).
fn package_names(checker: &mut Checker, key: &str, value: Option<&Value>) -> Vec<String> {
    let Some(value) = value else { return Vec::new() };
    let mut names = Vec::new();
    for (i, name) in checker.strings(key, value).into_iter().enumerate() {
        let Some(name) = name else { continue };
        let valid = name.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && name.chars().all(|c| c.is_ascii_alphanumeric() || "+-.:=~_".contains(c));
        if valid {
            names.push(name);
        } else {
            checker.report(&format!("{key}[{i}]"), format!("\"{name}\" is not a Debian package name"));
        }
    }
    names
}

fn apt_sources(checker: &mut Checker, recipe: &Path, value: Option<&Value>) -> Vec<AptSource> {
    let Some(value) = value else { return Vec::new() };
    let Some(entries) = value.as_array() else {
        checker.report("apt_sources", "must be an array of [[apt_sources]] tables");
        return Vec::new();
    };
    let mut sources = Vec::new();
    let mut names = BTreeSet::new();
    for (i, entry) in entries.iter().enumerate() {
        let key = format!("apt_sources[{i}]");
        let Some(table) = checker.table(&key, entry) else { continue };
        for name in table.keys().filter(|k| !SOURCE_KEYS.contains(&k.as_str())) {
            checker.unknown(&format!("{key}.{name}"), name, SOURCE_KEYS);
        }
        let field = |checker: &mut Checker, name: &str| -> Option<&Value> {
            let value = table.get(name);
            if value.is_none() {
                let message = match name {
                    "key" => "is required: a source must be signed (the key file, next to the recipe)",
                    _ => "is required",
                };
                checker.report(&format!("{key}.{name}"), message);
            }
            value
        };
        let text = |checker: &mut Checker, field: Option<&Value>, name: &str| {
            field.and_then(|value| checker.string(&format!("{key}.{name}"), value))
        };
        let words = |checker: &mut Checker, field: Option<&Value>, name: &str| -> Vec<String> {
            let Some(value) = field else { return Vec::new() };
            let list: Vec<String> = match value {
                Value::String(text) => text.split_whitespace().map(str::to_string).collect(),
                _ => checker.strings(&format!("{key}.{name}"), value).into_iter().flatten().collect(),
            };
            if list.is_empty() {
                checker.report(&format!("{key}.{name}"), "must not be empty");
            }
            list
        };
        let name_value = field(checker, "name");
        let name = text(checker, name_value, "name").filter(|name| {
            let valid = !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_".contains(c));
            if !valid {
                checker.report(&format!("{key}.name"), "must be letters, digits, '-' or '_' (it names files)");
            } else if !names.insert(name.clone()) {
                checker.report(&format!("{key}.name"), format!("\"{name}\" names another source too"));
            }
            valid
        });
        let uris_value = field(checker, "uris");
        let uris = words(checker, uris_value, "uris");
        for uri in &uris {
            if !uri.contains("://") && !uri.starts_with("file:") {
                checker.report(&format!("{key}.uris"), format!("\"{uri}\" is not a URI"));
            }
        }
        let suites_value = field(checker, "suites");
        let suites = words(checker, suites_value, "suites");
        let components_value = field(checker, "components");
        let components = words(checker, components_value, "components");
        let key_value = field(checker, "key");
        let key_file = text(checker, key_value, "key").map(|k| recipe.parent().unwrap_or(Path::new("")).join(k));
        let key_text = key_file.as_ref().and_then(|file| match fs::read_to_string(file) {
            Ok(text) if text.contains("-----BEGIN PGP PUBLIC KEY BLOCK-----") => Some(text),
            Ok(_) | Err(_) if !file.is_file() => {
                checker.report(&format!("{key}.key"), format!("{} is not a file", file.display()));
                None
            }
            _ => {
                let message = format!(
                    "{} is not an ASCII-armored OpenPGP public key (export it with `gpg --armor --export`)",
                    file.display()
                );
                checker.report(&format!("{key}.key"), message);
                None
            }
        });
        if let (Some(name), Some(key_file), Some(key)) = (name, key_file, key_text) {
            sources.push(AptSource { name, uris, suites, components, key_file, key });
        }
    }
    sources
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../base-images");
    const KEY: &str = "-----BEGIN PGP PUBLIC KEY BLOCK-----\n\nmQINBF\n-----END PGP PUBLIC KEY BLOCK-----\n";

    fn problems(path: &Path) -> Vec<Problem> {
        match load_base(path) {
            Err(Error::Invalid { problems }) => problems,
            other => panic!("expected problems, got {other:?}"),
        }
    }

    #[test]
    fn the_shipped_bases_load() {
        let standard = load_base(&Path::new(BASES).join("debian12-jre17-tomcat10.toml")).unwrap();
        assert!(matches!(standard.from, Origin::Debian { ref suite, .. } if suite == "bookworm"));
        let team = load_base(&Path::new(BASES).join("hello-team.toml")).unwrap();
        let Origin::Base(layer) = &team.from else { panic!("a team base extends") };
        assert!(layer.extends.ends_with("debian12-jre17-tomcat10.toml"));
        assert!(!team.packages.is_empty() && !layer.files.is_empty() && !layer.commands.is_empty());
    }

    #[test]
    fn a_team_base_is_checked_all_at_once_with_lines() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("parent.toml"), "name = \"p\"\n").unwrap();
        std::fs::write(dir.path().join("team.asc"), KEY).unwrap();
        std::fs::write(dir.path().join("binary.gpg"), [0x99u8, 1, 2]).unwrap();
        let path = dir.path().join("team.toml");
        std::fs::write(
            &path,
            r#"name = "team base"
description = "x"
extends = "parent.toml"
packages = ["jq", "--force-yes"]
remove = ["less"]
commands = ["echo {{ greeting }}", "echo {{ nope }}"]
sutie = "bookworm"

[vars]
greeting = "hi"

[[apt_sources]]
name = "vendor"
uris = "https://vendor.invalid/apt"
suites = ["stable"]
components = "main"
key = "team.asc"

[[apt_sources]]
name = "vendor"
uris = "not a uri"
suites = "stable"
components = "main"

[[apt_sources]]
name = "other"
uris = "https://other.invalid/apt"
suites = "stable"
components = "main"
key = "binary.gpg"
"#,
        )
        .unwrap();
        let found = problems(&path);
        let keyed: Vec<(&str, Option<usize>)> = found.iter().map(|p| (p.key.as_str(), p.line)).collect();
        for (key, line) in [
            ("name", Some(1)),
            ("packages[1]", Some(4)),
            ("commands[1]", Some(6)),
            ("sutie", Some(7)),
            ("apt_sources[1].name", Some(20)),
            ("apt_sources[1].uris", Some(21)),
            ("apt_sources[1].key", Some(19)),
            ("apt_sources[2].key", Some(30)),
        ] {
            assert!(keyed.contains(&(key, line)), "{key} at line {line:?} in {found:#?}");
        }
        assert!(found.iter().any(|p| p.message.contains("must be signed")), "{found:#?}");
        assert!(found.iter().any(|p| p.message.contains("ASCII-armored")), "{found:#?}");
    }

    #[test]
    fn a_good_team_base_renders_its_vars_and_writes_signed_sources() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("parent.toml"), "name = \"p\"\n").unwrap();
        std::fs::write(dir.path().join("vendor.asc"), KEY).unwrap();
        let path = dir.path().join("team.toml");
        std::fs::write(
            &path,
            "name = \"team\"\ndescription = \"d\"\nextends = \"parent.toml\"\npackages = [\"jq\"]\n\
             commands = [\"echo {{ greeting }} > /etc/motd\"]\n[vars]\ngreeting = \"hi\"\n\
             [[apt_sources]]\nname = \"vendor\"\nuris = \"https://vendor.invalid/apt\"\nsuites = \"stable\"\n\
             components = [\"main\", \"extra\"]\nkey = \"vendor.asc\"\n",
        )
        .unwrap();
        let recipe = load_base(&path).unwrap();
        let Origin::Base(layer) = &recipe.from else { panic!() };
        assert_eq!(layer.commands, ["echo hi > /etc/motd"]);
        let files = layer.all_files();
        assert_eq!(files[0].path, "/etc/apt/keyrings/vendor.asc");
        assert_eq!(files[0].content, KEY);
        assert_eq!(
            files[1].content,
            "Types: deb\nURIs: https://vendor.invalid/apt\nSuites: stable\nComponents: main extra\n\
             Signed-By: /etc/apt/keyrings/vendor.asc\n"
        );
        assert_eq!(
            layer.all_commands(&recipe.packages),
            ["apt-get update -q && apt-get install -y -q jq", "echo hi > /etc/motd"]
        );
    }

    #[test]
    fn a_standard_base_takes_no_layer_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("std.toml");
        std::fs::write(&path, "name = \"s\"\ndescription = \"d\"\nsuite = \"bookworm\"\ndisk_size_mib = 500\npackages = []\ncommands = [\"x\"]\n").unwrap();
        let found = problems(&path);
        let keys: BTreeSet<&str> = found.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, BTreeSet::from(["commands", "disk_size_mib", "hostname", "packages"]), "{found:#?}");
    }
}

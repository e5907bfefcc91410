//! Checking one recipe file: every key and value, with every problem reported (and a "did you
//! mean" where a key is a typo away from a known one), so a recipe is fixed in one round trip.

use super::template::{is_template_name, parse_template, Piece};
use super::{FileSpec, Layer, Problem, BUILTIN_VARS, DEFAULT_ACCOUNT, DEFAULT_FILE_MODE};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Component, Path};
use toml::{Table, Value};

pub(super) const TOP_KEYS: &[&str] =
    &["description", "extends", "package", "vars", "files", "commands", "services", "tags"];
const PACKAGE_KEYS: &[&str] = &[
    "install_root",
    "owner",
    "group",
    "strip_components",
    "max_expanded_size",
    "allow_device_nodes",
    "allow_external_hardlinks",
];
const FILE_KEYS: &[&str] = &["path", "content", "mode", "owner", "group"];
const SERVICES_KEYS: &[&str] = &["enable", "disable"];

/// Reports unknown template names, which need every file's vars and so come after reading.
pub(super) fn check_templates(layer: &Layer, known: &BTreeSet<&str>, problems: &mut Vec<Problem>) {
    let mut checker = Checker { file: &layer.file, problems };
    for (i, file) in &layer.files {
        checker.template(&format!("files[{i}].content"), &file.content, known);
    }
    for (i, command) in layer.commands.iter().enumerate() {
        checker.template(&format!("commands[{i}]"), command, known);
    }
    for (key, value) in &layer.tags {
        checker.template(&format!("tags.{key}"), value, known);
    }
}

/// Walks one file's table, recording problems against that file.
pub(super) struct Checker<'a> {
    pub(super) file: &'a Path,
    pub(super) problems: &'a mut Vec<Problem>,
}

impl Checker<'_> {
    pub(super) fn report(&mut self, key: &str, message: impl Into<String>) {
        let (file, key, message) = (self.file.to_path_buf(), key.to_string(), message.into());
        self.problems.push(Problem { file, key, line: None, message });
    }

    pub(super) fn layer(&mut self, table: &Table) -> Layer {
        let mut layer = Layer { file: self.file.to_path_buf(), ..Layer::default() };
        for (key, value) in table {
            match key.as_str() {
                "description" => layer.description = self.string(key, value),
                "extends" => {
                    layer.extends = self.string(key, value).filter(|extends| {
                        let empty = extends.is_empty();
                        if empty {
                            self.report(key, "must not be empty");
                        }
                        !empty
                    })
                }
                "package" => {
                    if let Some(package) = self.table(key, value) {
                        self.package(package, &mut layer);
                    }
                }
                "vars" => {
                    if let Some(vars) = self.table(key, value) {
                        self.vars(vars, &mut layer);
                    }
                }
                "files" => self.files(value, &mut layer),
                "commands" => self.commands(value, &mut layer),
                "services" => {
                    if let Some(services) = self.table(key, value) {
                        self.services(services, &mut layer);
                    }
                }
                "tags" => {
                    if let Some(tags) = self.table(key, value) {
                        self.tags(tags, &mut layer);
                    }
                }
                _ => self.unknown(key, key, TOP_KEYS),
            }
        }
        layer
    }

    pub(super) fn commands(&mut self, value: &Value, layer: &mut Layer) {
        for (i, command) in self.strings("commands", value).into_iter().enumerate() {
            let command = command.unwrap_or_default();
            if command.trim().is_empty() {
                self.report(&format!("commands[{i}]"), "must not be empty");
            }
            // Invalid entries stay as placeholders so indexes keep naming entries.
            layer.commands.push(command);
        }
    }

    fn package(&mut self, table: &Table, layer: &mut Layer) {
        for (name, value) in table {
            let key = format!("package.{name}");
            match name.as_str() {
                "install_root" => {
                    let root = self.string(&key, value).unwrap_or_default();
                    if !root.is_empty() {
                        self.absolute_path(&key, &root);
                    }
                    layer.install_root = Some(root);
                }
                "owner" => layer.owner = self.account(&key, value),
                "group" => layer.group = self.account(&key, value),
                "strip_components" => {
                    layer.strip_components = self.integer(&key, value).and_then(|n| {
                        let count = usize::try_from(n).ok();
                        if count.is_none() {
                            self.report(&key, format!("{n} is not a number of path components"));
                        }
                        count
                    })
                }
                "max_expanded_size" => layer.max_expanded_bytes = self.size(&key, value),
                "allow_device_nodes" => layer.allow_device_nodes = self.boolean(&key, value),
                "allow_external_hardlinks" => layer.allow_external_hardlinks = self.boolean(&key, value),
                _ => self.unknown(&key, name, PACKAGE_KEYS),
            }
        }
    }

    pub(super) fn vars(&mut self, table: &Table, layer: &mut Layer) {
        for (name, value) in table {
            let key = format!("vars.{name}");
            if BUILTIN_VARS.contains(&name.as_str()) {
                self.report(&key, "is a built-in template name and cannot be set");
            } else if !is_template_name(name) {
                self.report(&key, "is not a valid template name (use letters, digits, _ and -)");
            }
            let text = self.string_in_table(&key, name, value);
            layer.vars.insert(name.clone(), text.unwrap_or_default());
        }
    }

    pub(super) fn files(&mut self, value: &Value, layer: &mut Layer) {
        let Some(entries) = value.as_array() else {
            let found = value.type_str();
            self.report("files", format!("must be an array of [[files]] tables, not {found}"));
            return;
        };
        let mut first_with_path: BTreeMap<String, usize> = BTreeMap::new();
        for (i, entry) in entries.iter().enumerate() {
            let key = format!("files[{i}]");
            let Some(table) = self.table(&key, entry) else {
                continue;
            };
            let file = self.file_spec(&key, table);
            if !file.path.is_empty() {
                if let Some(first) = first_with_path.get(&file.path) {
                    let path = &file.path;
                    self.report(&format!("{key}.path"), format!("\"{path}\" is already the path of files[{first}]"));
                } else {
                    first_with_path.insert(file.path.clone(), i);
                }
            }
            layer.files.push((i, file));
        }
    }

    /// One `[[files]]` entry; an empty path stands for a missing or invalid one.
    fn file_spec(&mut self, key: &str, table: &Table) -> FileSpec {
        let mut path = None;
        let mut content = None;
        let mut mode = None;
        let mut owner = None;
        let mut group = None;
        for (name, value) in table {
            let key = format!("{key}.{name}");
            match name.as_str() {
                "path" => {
                    path = self.string(&key, value).filter(|p| self.file_path(&key, p));
                }
                "content" => content = self.string(&key, value),
                "mode" => mode = self.mode(&key, value),
                "owner" => owner = self.account(&key, value),
                "group" => group = self.account(&key, value),
                _ => self.unknown(&key, name, FILE_KEYS),
            }
        }
        for (name, present) in [("path", table.contains_key("path")), ("content", table.contains_key("content"))] {
            if !present {
                self.report(&format!("{key}.{name}"), "is required");
            }
        }
        FileSpec {
            path: path.unwrap_or_default(),
            content: content.unwrap_or_default(),
            mode: mode.unwrap_or(DEFAULT_FILE_MODE),
            owner: owner.unwrap_or_else(|| DEFAULT_ACCOUNT.into()),
            group: group.unwrap_or_else(|| DEFAULT_ACCOUNT.into()),
        }
    }

    fn services(&mut self, table: &Table, layer: &mut Layer) {
        for (name, value) in table {
            let key = format!("services.{name}");
            let list = match name.as_str() {
                "enable" => &mut layer.enable,
                "disable" => &mut layer.disable,
                _ => {
                    self.unknown(&key, name, SERVICES_KEYS);
                    continue;
                }
            };
            for (i, service) in self.strings(&key, value).into_iter().enumerate() {
                let Some(service) = service else { continue };
                if is_unit_name(&service) {
                    list.push(service);
                } else {
                    self.report(&format!("{key}[{i}]"), format!("\"{service}\" is not a systemd unit name"));
                }
            }
        }
        for service in layer.disable.iter().filter(|s| layer.enable.contains(s)) {
            self.report("services.disable", format!("\"{service}\" is also in services.enable"));
        }
    }

    fn tags(&mut self, table: &Table, layer: &mut Layer) {
        for (name, value) in table {
            let key = format!("tags.{name}");
            // EC2's limits and reserved prefix, so a recipe fails here rather than at the end
            // of a bake.
            if name.is_empty() || name.chars().count() > 128 {
                self.report(&key, "tag keys must be 1 to 128 characters long");
            } else if name.to_ascii_lowercase().starts_with("aws:") {
                self.report(&key, "tag keys starting with \"aws:\" are reserved");
            }
            if let Some(text) = self.string_in_table(&key, name, value) {
                layer.tags.insert(name.clone(), text);
            }
        }
    }

    pub(super) fn template(&mut self, key: &str, text: &str, known: &BTreeSet<&str>) {
        let pieces = match parse_template(text) {
            Ok(pieces) => pieces,
            Err(message) => return self.report(key, message),
        };
        let mut reported = BTreeSet::new();
        for piece in pieces {
            let Piece::Name(name) = piece else { continue };
            if known.contains(name) || !reported.insert(name) {
                continue;
            }
            let hint = match closest(name, known.iter().copied()) {
                Some(near) => format!(" (did you mean \"{near}\"?)"),
                None => String::new(),
            };
            self.report(key, format!("unknown template name \"{name}\"{hint}"));
        }
    }

    pub(super) fn unknown(&mut self, key: &str, name: &str, known: &[&str]) {
        let hint = if let Some(near) = closest(name, known.iter().copied()) {
            format!(" (did you mean \"{near}\"?)")
        } else if key != name {
            misplaced_hint(name)
        } else {
            String::new()
        };
        self.report(key, format!("unknown key{hint}"));
    }

    fn wrong_type(&mut self, key: &str, expected: &str, value: &Value) {
        let found = value.type_str();
        self.report(key, format!("must be {expected}, not {found}"));
    }

    pub(super) fn string(&mut self, key: &str, value: &Value) -> Option<String> {
        match value {
            Value::String(text) => Some(text.clone()),
            _ => {
                self.wrong_type(key, "a string", value);
                None
            }
        }
    }

    /// A string in a table of free-form keys, where a top-level key lands by mistake when it
    /// is written after the table's header.
    fn string_in_table(&mut self, key: &str, name: &str, value: &Value) -> Option<String> {
        match value {
            Value::String(text) => Some(text.clone()),
            _ => {
                let found = value.type_str();
                let hint = misplaced_hint(name);
                self.report(key, format!("must be a string, not {found}{hint}"));
                None
            }
        }
    }

    pub(super) fn integer(&mut self, key: &str, value: &Value) -> Option<i64> {
        match value {
            Value::Integer(n) => Some(*n),
            _ => {
                self.wrong_type(key, "an integer", value);
                None
            }
        }
    }

    fn boolean(&mut self, key: &str, value: &Value) -> Option<bool> {
        match value {
            Value::Boolean(b) => Some(*b),
            _ => {
                self.wrong_type(key, "true or false", value);
                None
            }
        }
    }

    pub(super) fn table<'v>(&mut self, key: &str, value: &'v Value) -> Option<&'v Table> {
        match value {
            Value::Table(table) => Some(table),
            _ => {
                self.wrong_type(key, "a table", value);
                None
            }
        }
    }

    /// An array of strings; entries of the wrong type are reported and come back as `None`.
    pub(super) fn strings(&mut self, key: &str, value: &Value) -> Vec<Option<String>> {
        let Value::Array(entries) = value else {
            self.wrong_type(key, "an array of strings", value);
            return Vec::new();
        };
        entries.iter().enumerate().map(|(i, entry)| self.string(&format!("{key}[{i}]"), entry)).collect()
    }

    /// A user or group name; resolved later against the image, so only its shape is checked.
    fn account(&mut self, key: &str, value: &Value) -> Option<String> {
        let name = self.string(key, value)?;
        if name.is_empty() {
            self.report(key, "must not be empty");
        } else if name.contains(|c: char| c == ':' || c.is_whitespace()) {
            self.report(key, format!("\"{name}\" is not a user or group name"));
        } else {
            return Some(name);
        }
        None
    }

    /// A TOML integer could be a decimal 644 meant as octal, so only strings are accepted.
    fn mode(&mut self, key: &str, value: &Value) -> Option<u32> {
        let Value::String(text) = value else {
            let found = value.type_str();
            let message = format!("must be an octal string such as \"0644\", not {found}");
            self.report(key, message);
            return None;
        };
        let mode = parse_mode(text);
        if mode.is_none() {
            self.report(key, format!("\"{text}\" is not an octal file mode"));
        }
        mode
    }

    fn size(&mut self, key: &str, value: &Value) -> Option<u64> {
        let size = match value {
            Value::Integer(n) => u64::try_from(*n).ok(),
            Value::String(text) => parse_size(text),
            _ => {
                self.wrong_type(key, "a size such as \"2GiB\" or a number of bytes", value);
                return None;
            }
        };
        match size {
            Some(0) => self.report(key, "must be greater than zero"),
            Some(bytes) => return Some(bytes),
            None => self.report(
                key,
                format!(
                    "{value} is not a size (use bytes, or a whole number with one of the units {})",
                    SIZE_UNITS.iter().map(|(unit, _)| *unit).collect::<Vec<_>>().join(", ")
                ),
            ),
        }
        None
    }

    /// Reports and returns false unless `path` is absolute and has no `..`, which could
    /// otherwise point outside the image.
    pub(super) fn absolute_path(&mut self, key: &str, path: &str) -> bool {
        if !path.starts_with('/') {
            self.report(key, format!("\"{path}\" is not an absolute path"));
            false
        } else if Path::new(path).components().any(|c| c == Component::ParentDir) {
            self.report(key, format!("\"{path}\" must not contain \"..\""));
            false
        } else {
            true
        }
    }

    fn file_path(&mut self, key: &str, path: &str) -> bool {
        if !self.absolute_path(key, path) {
            false
        } else if path.ends_with('/') {
            self.report(key, format!("\"{path}\" names a directory, not a file"));
            false
        } else {
            true
        }
    }
}

/// Suggests moving a top-level key that TOML put into the table above it.
fn misplaced_hint(name: &str) -> String {
    if TOP_KEYS.contains(&name) {
        format!(" (top-level keys like \"{name}\" must come before the first [table] header)")
    } else {
        String::new()
    }
}

/// The nearest candidate within a couple of typos, for "did you mean" hints.
pub(super) fn closest<'a>(word: &str, candidates: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    candidates
        .map(|candidate| (strsim::levenshtein(word, candidate), candidate))
        .filter(|(distance, _)| *distance <= 2 && *distance < word.chars().count())
        .min_by_key(|(distance, _)| *distance)
        .map(|(_, candidate)| candidate)
}

/// Plausible systemd unit names; a leading '-' would reach systemctl as an option.
fn is_unit_name(name: &str) -> bool {
    !name.is_empty() && !name.starts_with('-') && name.chars().all(|c| c.is_ascii_alphanumeric() || "@._-".contains(c))
}

/// Parses a file mode such as "0644", "644" or "0o4755".
pub(super) fn parse_mode(text: &str) -> Option<u32> {
    let digits = text.strip_prefix("0o").unwrap_or(text);
    if digits.is_empty() || digits.len() > 5 || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b)) {
        return None;
    }
    u32::from_str_radix(digits, 8).ok().filter(|mode| *mode <= 0o7777)
}

const SIZE_UNITS: &[(&str, u64)] = &[
    ("B", 1),
    ("KB", 1000),
    ("MB", 1000 * 1000),
    ("GB", 1000 * 1000 * 1000),
    ("TB", 1000 * 1000 * 1000 * 1000),
    ("KiB", 1 << 10),
    ("MiB", 1 << 20),
    ("GiB", 1 << 30),
    ("TiB", 1 << 40),
];

/// Parses "4096", "512MiB", "2 GiB", "100MB"...; `None` if malformed or over `u64::MAX`.
pub(super) fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let digits = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
    let (number, unit) = text.split_at(digits);
    let unit = unit.trim_start();
    let multiplier = if unit.is_empty() { 1 } else { SIZE_UNITS.iter().find(|(name, _)| *name == unit)?.1 };
    number.parse::<u64>().ok()?.checked_mul(multiplier)
}

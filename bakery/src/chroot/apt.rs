//! apt for recipe commands: inside the image it reaches the mirrors the way the host does.
//!
//! For one bake a host directory holds everything apt reads and writes beyond the image's
//! dpkg database, and each command sees it on [`MOUNT_POINT`] with `APT_CONFIG` naming its
//! `apt.conf`: the image's own sources and the host's (the host's file wins where both have
//! one of the same name), the host's `Acquire::` settings (a proxy, a snapshot mirror's
//! validity), and the package lists and downloaded `.deb`s. `apt-get update` in one command
//! serves `apt-get install` in the next, and none of the host's files, lists or downloads
//! reach the image. A host source signed by a key the image lacks is left out, since apt in
//! the image would refuse it and fail the whole update.

use snafu::{ResultExt, Snafu};
use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, Snafu)]
pub enum Error {
    #[snafu(display("cannot prepare apt's directory {}: {source}", path.display()))]
    Write { path: PathBuf, source: io::Error },

    #[snafu(display("cannot read apt sources in {}: {source}", path.display()))]
    ReadSources { path: PathBuf, source: io::Error },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Where a command sees the bake's apt directory: on the tmpfs mounted over the image's /run,
/// so the mount point itself is never written into the image.
pub const MOUNT_POINT: &str = "/run/bakery/apt";

/// The host's apt configuration.
pub const HOST_APT: &str = "/etc/apt";

/// Makes `dir` apt's directory for a bake: its lists and downloads, and its `apt.conf` with the
/// host's `Acquire::` settings (`host_acquire`, as `apt-config dump` prints them).
pub fn prepare(dir: &Path, host_acquire: &str) -> Result<()> {
    for sub in [dir.join("sources.list.d"), dir.join("lists/partial"), dir.join("archives/partial")] {
        fs::create_dir_all(&sub).context(WriteSnafu { path: &sub })?;
    }
    // The host's Acquire settings may hold a proxy's credentials: readable by root alone.
    let conf = dir.join("apt.conf");
    fs::write(&conf, apt_conf(host_acquire)).context(WriteSnafu { path: &conf })?;
    fs::set_permissions(&conf, fs::Permissions::from_mode(0o600)).context(WriteSnafu { path: &conf })?;
    Ok(())
}

/// Puts in `dir` the sources apt is to read for the next command: the image's own (as they are
/// now: an earlier command or the recipe may have added one) and the host's from `host_apt`.
/// Returns one line for each host source left out, for the log.
pub fn sync_sources(dir: &Path, host_apt: &Path, image_root: &Path) -> Result<Vec<String>> {
    let sources_dir = dir.join("sources.list.d");
    // What an earlier command's image had and this one's does not must go too.
    match fs::remove_dir_all(&sources_dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e).context(WriteSnafu { path: &sources_dir }),
        _ => {}
    }
    fs::create_dir_all(&sources_dir).context(WriteSnafu { path: &sources_dir })?;
    let mut left_out = Vec::new();
    let mut one_line_list = String::new();
    let has_key = |key: &str| image_root.join(key.trim_start_matches('/')).exists();
    for (etc_apt, from_host) in [(image_root.join("etc/apt"), false), (host_apt.to_path_buf(), true)] {
        let mut keep = |text: &str, file: &Path, deb822: bool| -> String {
            if !from_host {
                return text.to_string();
            }
            let (kept, dropped) = if deb822 { filter_deb822(text, &has_key) } else { filter_one_line(text, &has_key) };
            left_out.extend(dropped.into_iter().map(|(source, key)| {
                format!("host apt source {source} ({}) left out: its key {key} is not in the image", file.display())
            }));
            kept
        };
        let list = etc_apt.join("sources.list");
        if let Some(text) = read_regular(&list)? {
            one_line_list.push_str(&keep(&text, &list, false));
            one_line_list.push('\n');
        }
        for file in source_files(&etc_apt.join("sources.list.d"))? {
            let Some(text) = read_regular(&file)? else { continue };
            let deb822 = file.extension().is_some_and(|e| e == "sources");
            let copy = sources_dir.join(file.file_name().expect("listed files have names"));
            let text = keep(&text, &file, deb822);
            fs::write(&copy, text).context(WriteSnafu { path: &copy })?;
        }
    }
    let list = dir.join("sources.list");
    fs::write(&list, one_line_list).context(WriteSnafu { path: &list })?;
    Ok(left_out)
}

/// The host's `Acquire::` settings, as `apt-config dump` prints them; empty where the host
/// has no apt.
pub fn host_acquire_settings() -> String {
    match Command::new("apt-config").arg("dump").output() {
        Ok(output) if output.status.success() => String::from_utf8_lossy(&output.stdout).into_owned(),
        _ => String::new(),
    }
}

/// apt's configuration for the commands: the bake's directory for sources, lists and
/// downloads, no binary caches (they would land in the image), and the host's way of reaching
/// the mirrors. apt reads this before the image's apt.conf.d, which can still override it.
fn apt_conf(host_acquire: &str) -> String {
    let mut conf = format!(
        "Dir::Etc::SourceList \"{MOUNT_POINT}/sources.list\";\n\
         Dir::Etc::SourceParts \"{MOUNT_POINT}/sources.list.d/\";\n\
         Dir::State::Lists \"{MOUNT_POINT}/lists/\";\n\
         Dir::Cache::Archives \"{MOUNT_POINT}/archives/\";\n\
         Dir::Cache::pkgcache \"\";\n\
         Dir::Cache::srcpkgcache \"\";\n\
         APT::Sandbox::User \"root\";\n"
    );
    for line in host_acquire.lines() {
        // IndexTargets are the host apt's built-in defaults, not settings; the image's apt
        // has its own.
        let key = line.split_whitespace().next().unwrap_or_default().to_ascii_lowercase();
        if key.starts_with("acquire::") && !key.starts_with("acquire::indextargets") {
            conf.push_str(line);
            conf.push('\n');
        }
    }
    conf
}

/// The files apt reads in a sources.list.d, sorted; none where the directory is missing.
fn source_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        other => other.context(ReadSourcesSnafu { path: dir })?,
    };
    let mut files = Vec::new();
    for entry in entries {
        let path = entry.context(ReadSourcesSnafu { path: dir })?.path();
        if path.extension().is_some_and(|e| e == "list" || e == "sources") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

/// A regular file's text; None for a missing file or anything else (a symlink in the image
/// is not followed onto the host).
fn read_regular(path: &Path) -> Result<Option<String>> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_file() => fs::read_to_string(path).map(Some).context(ReadSourcesSnafu { path }),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).context(ReadSourcesSnafu { path }),
    }
}

/// A source's keys that are files (not inline keys or fingerprints).
fn key_files(signed_by: &str) -> Vec<&str> {
    signed_by.split([',', ' ', '\t']).filter(|token| token.starts_with('/')).collect()
}

/// Whether a source whose `Signed-By` is `signed_by` can be verified inside the image: it
/// names no key file, or one the image has.
fn verifiable(signed_by: &str, has_key: &dyn Fn(&str) -> bool) -> std::result::Result<(), String> {
    let keys = key_files(signed_by);
    match keys.iter().any(|key| has_key(key)) || keys.is_empty() {
        true => Ok(()),
        false => Err(keys.join(", ")),
    }
}

/// A deb822 `.sources` file without the stanzas the image cannot verify; also what was left
/// out, as (URIs, key).
fn filter_deb822(text: &str, has_key: &dyn Fn(&str) -> bool) -> (String, Vec<(String, String)>) {
    let mut kept = Vec::new();
    let mut dropped = Vec::new();
    for stanza in text.split("\n\n") {
        let field = |name: &str| crate::deb822::field(stanza, name);
        match verifiable(&field("Signed-By").unwrap_or_default(), has_key) {
            Ok(()) => kept.push(stanza),
            Err(keys) => dropped.push((field("URIs").unwrap_or_default(), keys)),
        }
    }
    (kept.join("\n\n"), dropped)
}

/// A one-line sources.list without the entries the image cannot verify.
fn filter_one_line(text: &str, has_key: &dyn Fn(&str) -> bool) -> (String, Vec<(String, String)>) {
    let mut kept = Vec::new();
    let mut dropped = Vec::new();
    for line in text.lines() {
        let options = line.split_once('[').and_then(|(_, rest)| rest.split_once(']')).map(|(options, _)| options);
        let signed_by = options
            .into_iter()
            .flat_map(str::split_whitespace)
            .filter_map(|option| option.strip_prefix("signed-by="))
            .collect::<Vec<_>>()
            .join(",");
        match verifiable(&signed_by, has_key) {
            Ok(()) => kept.push(line),
            Err(keys) => {
                let uri = line.split_whitespace().find(|word| word.contains("://")).unwrap_or(line);
                dropped.push((uri.to_string(), keys));
            }
        }
    }
    (kept.join("\n"), dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEBIAN: &str = "Types: deb\nURIs: http://mirror.invalid/debian\nSuites: bookworm\nComponents: main\n\
                          Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg\n";
    const VENDOR: &str = "Types: deb\nURIs: https://vendor.invalid/apt\nSuites: stable\nComponents: main\n\
                          Signed-By: /etc/apt/keyrings/vendor.gpg\n";

    fn write(path: &Path, text: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    #[test]
    fn host_sources_join_the_image_s_without_what_the_image_cannot_verify() {
        let image = tempfile::tempdir().unwrap();
        let host = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        write(&image.path().join("usr/share/keyrings/debian-archive-keyring.gpg"), "key");
        write(&image.path().join("etc/apt/sources.list.d/debian.sources"), "Types: deb\nURIs: http://old.invalid/\n");
        write(&image.path().join("etc/apt/sources.list.d/team.sources"), VENDOR);
        write(&image.path().join("etc/apt/sources.list.d/notes.txt"), "not a source");
        write(&host.path().join("sources.list.d/debian.sources"), DEBIAN);
        write(&host.path().join("sources.list.d/mixed.sources"), &format!("{DEBIAN}\n{VENDOR}"));
        write(&host.path().join("sources.list.d/off.list.disabled"), "deb http://off.invalid/ x main");
        write(
            &host.path().join("sources.list"),
            "deb [arch=amd64 signed-by=/etc/apt/keyrings/gone.gpg] http://gone.invalid/ x main\n\
             deb http://plain.invalid/ x main\n",
        );
        let acquire = "Acquire::Check-Valid-Until \"false\";\nAcquire::IndexTargets::deb::Packages::MetaKey \"x\";\n\
                       APT::Architecture \"amd64\";\nDPkg::Post-Invoke:: \"host-hook\";\n";

        prepare(out.path(), acquire).unwrap();
        let left_out = sync_sources(out.path(), host.path(), image.path()).unwrap();

        let read = |name: &str| fs::read_to_string(out.path().join(name)).unwrap();
        assert_eq!(read("sources.list.d/debian.sources"), DEBIAN, "the host's file wins");
        assert_eq!(read("sources.list.d/team.sources"), VENDOR, "the image's own sources stay, unfiltered");
        assert_eq!(read("sources.list.d/mixed.sources"), DEBIAN.trim_end_matches('\n'));
        assert!(!out.path().join("sources.list.d/notes.txt").exists());
        assert!(!out.path().join("sources.list.d/off.list.disabled").exists());
        assert_eq!(read("sources.list"), "deb http://plain.invalid/ x main\n");
        assert_eq!(left_out.len(), 2, "{left_out:?}");
        assert!(left_out[0].contains("http://gone.invalid/") && left_out[0].contains("/etc/apt/keyrings/gone.gpg"));
        assert!(left_out[1].contains("https://vendor.invalid/apt") && left_out[1].contains("mixed.sources"));

        let conf = read("apt.conf");
        assert!(conf.contains("Acquire::Check-Valid-Until \"false\";"));
        assert!(conf.contains(&format!("Dir::State::Lists \"{MOUNT_POINT}/lists/\";")));
        assert!(!conf.contains("IndexTargets") && !conf.contains("host-hook") && !conf.contains("APT::Architecture"));
        let mode = fs::metadata(out.path().join("apt.conf")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(out.path().join("lists/partial").is_dir() && out.path().join("archives/partial").is_dir());

        // Sources the image drops are dropped here too, at the next sync.
        fs::remove_file(image.path().join("etc/apt/sources.list.d/team.sources")).unwrap();
        sync_sources(out.path(), host.path(), image.path()).unwrap();
        assert!(!out.path().join("sources.list.d/team.sources").exists());
    }

    #[test]
    fn inline_keys_and_unsigned_sources_are_kept() {
        let inline = "Types: deb\nURIs: http://a.invalid/\nSigned-By:\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n";
        let (kept, dropped) = filter_deb822(inline, &|_| false);
        assert_eq!((kept.as_str(), dropped.len()), (inline, 0));
        let (kept, dropped) = filter_one_line("deb http://a.invalid/ x main", &|_| false);
        assert_eq!((kept.as_str(), dropped.len()), ("deb http://a.invalid/ x main", 0));
    }
}

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

use crate::rootfs::RootDir;
use nix::errno::Errno;
use nix::fcntl::OFlag;
use snafu::{ResultExt, Snafu};
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, Snafu)]
pub enum Error {
    #[snafu(display("cannot prepare apt's directory {}: {source}", path.display()))]
    Write { path: PathBuf, source: io::Error },

    #[snafu(display("cannot read apt sources {path}: {source}"))]
    ReadSources { path: String, source: io::Error },
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
/// now: an earlier command or the recipe may have added one), read as the image sees them, and
/// the host's from `host_apt`, narrowed to the image's release (a trixie host baking a bookworm
/// image lends its mirror, never its suites). Returns one line for each host source left out
/// for another reason, for the log.
pub fn sync_sources(dir: &Path, host_apt: &Path, image: &RootDir) -> Result<Vec<String>> {
    let sources_dir = dir.join("sources.list.d");
    // What an earlier command's image had and this one's does not must go too.
    match fs::remove_dir_all(&sources_dir) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e).context(WriteSnafu { path: &sources_dir }),
        _ => {}
    }
    fs::create_dir_all(&sources_dir).context(WriteSnafu { path: &sources_dir })?;
    let mut left_out = Vec::new();
    let codename = image_codename(image);
    if codename.is_none() {
        left_out
            .push("the host's apt sources are left out: the image's /etc/os-release names no VERSION_CODENAME".into());
    }
    let has_key = |key: &str| image.open_in_root(key, OFlag::O_PATH).is_ok();
    let image_tree = Tree::Image(image);
    let host_tree = Tree::Host(host_apt);
    let trees: Vec<&Tree> = match &codename {
        Some(_) => vec![&image_tree, &host_tree],
        None => vec![&image_tree],
    };
    let mut one_line_list = String::new();
    for tree in trees {
        let from_host = matches!(tree, Tree::Host(_));
        let mut keep = |text: &str, file: &str, deb822: bool| -> String {
            if !from_host {
                return text.to_string();
            }
            let release = codename.as_deref().expect("host sources are read only when the release is known");
            let (kept, dropped) =
                if deb822 { filter_deb822(text, release, &has_key) } else { filter_one_line(text, release, &has_key) };
            left_out.extend(dropped.into_iter().map(|(source, key)| {
                format!("host apt source {source} ({file}) left out: its key {key} is not in the image")
            }));
            kept
        };
        if let Some(text) = tree.read("sources.list")? {
            one_line_list.push_str(&keep(&text, &tree.shown("sources.list"), false));
            one_line_list.push('\n');
        }
        for name in tree.source_files()? {
            let relative = format!("sources.list.d/{name}");
            let Some(text) = tree.read(&relative)? else { continue };
            let text = keep(&text, &tree.shown(&relative), name.ends_with(".sources"));
            let copy = sources_dir.join(&name);
            fs::write(&copy, text).context(WriteSnafu { path: &copy })?;
        }
    }
    let list = dir.join("sources.list");
    fs::write(&list, one_line_list).context(WriteSnafu { path: &list })?;
    Ok(left_out)
}

/// The image's release (`VERSION_CODENAME` in its /etc/os-release), read as the image sees it.
fn image_codename(image: &RootDir) -> Option<String> {
    let mut text = String::new();
    let fd = image.open_in_root("/etc/os-release", OFlag::O_RDONLY).ok()?;
    File::from(fd).take(64 * 1024).read_to_string(&mut text).ok()?;
    let value = text.lines().find_map(|line| line.strip_prefix("VERSION_CODENAME="))?;
    Some(value.trim().trim_matches('"').to_string()).filter(|codename| !codename.is_empty())
}

/// Where apt sources are read from: the host's /etc/apt, or the image's, resolved as the image
/// sees it (a symlink in the image never leads to a host file).
enum Tree<'a> {
    Host(&'a Path),
    Image(&'a RootDir),
}

impl Tree<'_> {
    /// A path under the tree's etc/apt, for messages.
    fn shown(&self, relative: &str) -> String {
        match self {
            Tree::Host(etc_apt) => etc_apt.join(relative).display().to_string(),
            Tree::Image(_) => format!("the image's /etc/apt/{relative}"),
        }
    }

    /// A file's text; None when it is missing or not a regular file.
    fn read(&self, relative: &str) -> Result<Option<String>> {
        let file = match self {
            Tree::Host(etc_apt) => File::open(etc_apt.join(relative)),
            Tree::Image(image) => image
                .open_in_root(&format!("/etc/apt/{relative}"), OFlag::O_RDONLY)
                .map(File::from)
                .map_err(io::Error::from),
        };
        let mut file = match file {
            Ok(file) if file.metadata().is_ok_and(|meta| meta.is_file()) => file,
            Ok(_) => return Ok(None),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).context(ReadSourcesSnafu { path: self.shown(relative) }),
        };
        let mut text = String::new();
        file.read_to_string(&mut text).context(ReadSourcesSnafu { path: self.shown(relative) })?;
        Ok(Some(text))
    }

    /// The names apt reads in sources.list.d, sorted; none where it is missing.
    fn source_files(&self) -> Result<Vec<String>> {
        let names: Vec<String> = match self {
            Tree::Host(etc_apt) => match fs::read_dir(etc_apt.join("sources.list.d")) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
                Err(e) => return Err(e).context(ReadSourcesSnafu { path: self.shown("sources.list.d") }),
                Ok(entries) => entries.flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect(),
            },
            Tree::Image(image) => {
                let flags = OFlag::O_RDONLY | OFlag::O_DIRECTORY;
                match image.open_in_root("/etc/apt/sources.list.d", flags) {
                    Err(Errno::ENOENT | Errno::ENOTDIR) => Vec::new(),
                    Err(e) => {
                        return Err(io::Error::from(e)).context(ReadSourcesSnafu { path: self.shown("sources.list.d") })
                    }
                    // The directory the image sees, listed through its open descriptor.
                    Ok(fd) => fs::read_dir(format!("/proc/self/fd/{}", fd.as_raw_fd()))
                        .context(ReadSourcesSnafu { path: self.shown("sources.list.d") })?
                        .flatten()
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect(),
                }
            }
        };
        let mut names: Vec<String> =
            names.into_iter().filter(|n| n.ends_with(".list") || n.ends_with(".sources")).collect();
        names.sort();
        Ok(names)
    }
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

/// The suites of the image's release a host source may lend: the release and its updates.
fn of_release(suite: &str, release: &str) -> bool {
    suite == release
        || suite.strip_prefix(release).is_some_and(|rest| ["-updates", "-security", "-backports"].contains(&rest))
}

/// A host's deb822 `.sources` file narrowed to the image's release: each stanza keeps only
/// the suites of that release, and goes when none is left or the image cannot verify it; also
/// what was left out for want of a key, as (URIs, key).
fn filter_deb822(text: &str, release: &str, has_key: &dyn Fn(&str) -> bool) -> (String, Vec<(String, String)>) {
    let mut kept = Vec::new();
    let mut dropped = Vec::new();
    for stanza in text.split("\n\n") {
        let field = |name: &str| crate::deb822::field(stanza, name);
        let suites: Vec<String> = field("Suites")
            .unwrap_or_default()
            .split_whitespace()
            .filter(|suite| of_release(suite, release))
            .map(str::to_string)
            .collect();
        if suites.is_empty() {
            continue;
        }
        if let Err(keys) = verifiable(&field("Signed-By").unwrap_or_default(), has_key) {
            dropped.push((field("URIs").unwrap_or_default(), keys));
            continue;
        }
        let narrowed: Vec<String> = stanza
            .lines()
            .map(|line| match line.split_once(':') {
                Some((key, _)) if key.trim().eq_ignore_ascii_case("Suites") => format!("Suites: {}", suites.join(" ")),
                _ => line.to_string(),
            })
            .collect();
        kept.push(narrowed.join("\n"));
    }
    (kept.join("\n\n"), dropped)
}

/// A host's one-line sources.list narrowed to the image's release and to what it can verify.
fn filter_one_line(text: &str, release: &str, has_key: &dyn Fn(&str) -> bool) -> (String, Vec<(String, String)>) {
    let mut kept = Vec::new();
    let mut dropped = Vec::new();
    for line in text.lines().filter(|line| line.trim_start().starts_with("deb")) {
        let (options, rest) = match line.split_once('[') {
            Some((_, rest)) => rest.split_once(']').unwrap_or(("", rest)),
            None => ("", line.trim_start().split_once(' ').map_or("", |(_, rest)| rest)),
        };
        let mut words = rest.split_whitespace();
        let (uri, suite) = (words.next().unwrap_or_default(), words.next().unwrap_or_default());
        if !of_release(suite, release) {
            continue;
        }
        let signed_by = options
            .split_whitespace()
            .filter_map(|option| option.strip_prefix("signed-by="))
            .collect::<Vec<_>>()
            .join(",");
        match verifiable(&signed_by, has_key) {
            Ok(()) => kept.push(line),
            Err(keys) => dropped.push((uri.to_string(), keys)),
        }
    }
    (kept.join("\n"), dropped)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEBIAN: &str = "Types: deb\nURIs: http://mirror.invalid/debian\nSuites: bookworm bookworm-updates trixie\n\
                          Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n";
    const VENDOR: &str = "Types: deb\nURIs: https://vendor.invalid/apt\nSuites: bookworm\nComponents: main\n\
                          Signed-By: /etc/apt/keyrings/vendor.gpg\n";
    const TRIXIE: &str = "Types: deb\nURIs: http://mirror.invalid/debian\nSuites: trixie\nComponents: main\n";

    fn write(path: &Path, text: &str) {
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, text).unwrap();
    }

    #[test]
    fn host_sources_lend_their_mirror_for_the_image_s_release_only_and_only_what_it_can_verify() {
        let image = tempfile::tempdir().unwrap();
        let host = tempfile::tempdir().unwrap();
        let out = tempfile::tempdir().unwrap();
        write(&image.path().join("etc/os-release"), "ID=debian\nVERSION_CODENAME=bookworm\n");
        write(&image.path().join("usr/share/keyrings/debian-archive-keyring.gpg"), "key");
        write(&image.path().join("etc/apt/sources.list.d/debian.sources"), "Types: deb\nURIs: http://old.invalid/\n");
        write(&image.path().join("etc/apt/sources.list.d/team.sources"), VENDOR);
        write(&image.path().join("etc/apt/sources.list.d/notes.txt"), "not a source");
        // An absolute symlink in the image leads inside the image, never to the host's file.
        let host_secret = host.path().join("secret.list");
        write(&host_secret, "deb http://secret.invalid/ bookworm main");
        std::os::unix::fs::symlink(&host_secret, image.path().join("etc/apt/sources.list.d/evil.list")).unwrap();
        write(&host.path().join("sources.list.d/debian.sources"), DEBIAN);
        write(&host.path().join("sources.list.d/mixed.sources"), &format!("{TRIXIE}\n{VENDOR}"));
        write(&host.path().join("sources.list.d/off.list.disabled"), "deb http://off.invalid/ bookworm main");
        write(
            &host.path().join("sources.list"),
            "# a comment\ndeb [arch=amd64 signed-by=/etc/apt/keyrings/gone.gpg] http://gone.invalid/ bookworm main\n\
             deb http://plain.invalid/ bookworm-security main\ndeb http://other.invalid/ trixie main\n",
        );
        let acquire = "Acquire::Check-Valid-Until \"false\";\nAcquire::IndexTargets::deb::Packages::MetaKey \"x\";\n\
                       APT::Architecture \"amd64\";\nDPkg::Post-Invoke:: \"host-hook\";\n";

        prepare(out.path(), acquire).unwrap();
        let root = RootDir::open(image.path()).unwrap();
        let left_out = sync_sources(out.path(), host.path(), &root).unwrap();

        let read = |name: &str| fs::read_to_string(out.path().join(name)).unwrap();
        assert_eq!(
            read("sources.list.d/debian.sources"),
            DEBIAN.replace("bookworm bookworm-updates trixie", "bookworm bookworm-updates").trim_end(),
            "the host's file wins, narrowed to the image's release"
        );
        assert_eq!(read("sources.list.d/team.sources"), VENDOR, "the image's own sources stay, unfiltered");
        assert_eq!(read("sources.list.d/mixed.sources"), "", "another release's stanza and an unverifiable one go");
        assert!(!out.path().join("sources.list.d/evil.list").exists(), "the host's file was not read");
        assert!(!out.path().join("sources.list.d/notes.txt").exists());
        assert!(!out.path().join("sources.list.d/off.list.disabled").exists());
        assert_eq!(read("sources.list"), "deb http://plain.invalid/ bookworm-security main\n");
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
        sync_sources(out.path(), host.path(), &root).unwrap();
        assert!(!out.path().join("sources.list.d/team.sources").exists());

        // An image whose release is unknown borrows nothing from the host.
        write(&image.path().join("etc/os-release"), "ID=debian\n");
        let left_out = sync_sources(out.path(), host.path(), &root).unwrap();
        assert!(left_out[0].contains("VERSION_CODENAME"), "{left_out:?}");
        assert_eq!(read("sources.list"), "");
        assert_eq!(read("sources.list.d/debian.sources"), "Types: deb\nURIs: http://old.invalid/\n");
    }

    #[test]
    fn inline_keys_and_unsigned_sources_are_kept() {
        let inline = "Types: deb\nURIs: http://a.invalid/\nSuites: bookworm\nSigned-By:\n -----BEGIN PGP PUBLIC KEY BLOCK-----\n .\n";
        let (kept, dropped) = filter_deb822(inline, "bookworm", &|_| false);
        assert_eq!((kept.as_str(), dropped.len()), (inline.trim_end(), 0));
        let (kept, dropped) = filter_one_line("deb http://a.invalid/ bookworm main", "bookworm", &|_| false);
        assert_eq!((kept.as_str(), dropped.len()), ("deb http://a.invalid/ bookworm main", 0));
    }
}

//! The Debian packages installed in an image, and the files of one, read from its dpkg
//! database without running anything in it: for the manifest and the SBOM.

use crate::package::{EntryKind, ManifestEntry};
use crate::rootfs::RootDir;
use nix::errno::Errno;
use nix::fcntl::OFlag;
use nix::sys::stat::{self, SFlag};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use snafu::{ResultExt, Snafu};
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

#[derive(Debug, Snafu)]
pub enum Error {
    #[snafu(display("cannot read the image's dpkg database {}: {source}", path.display()))]
    Read { path: PathBuf, source: std::io::Error },

    #[snafu(display("package {package} is not in the image's dpkg database (no {list})"))]
    NoFileList { package: String, list: String },

    #[snafu(display("cannot read {path} in the image, a file of package {package}: {source}"))]
    ReadFile { package: String, path: String, source: std::io::Error },
}

/// Where dpkg keeps what is installed, inside an image.
pub const STATUS: &str = "var/lib/dpkg/status";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Package {
    pub name: String,
    pub version: String,
    pub architecture: String,
    /// The source package, where it differs from the binary's name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
}

/// The packages installed in the image at `root`, sorted by name and architecture; empty
/// where the image has no dpkg database. Read as the image sees it: a symlink in the image
/// never leads to the host's database.
pub fn installed(root: &Path) -> Result<Vec<Package>, Error> {
    let path = root.join(STATUS);
    let unreadable = |source: std::io::Error| Error::Read { path: path.clone(), source };
    let image = RootDir::open(root).map_err(|e| unreadable(std::io::Error::other(e)))?;
    let mut file = match image.open_in_root(STATUS, OFlag::O_RDONLY) {
        Err(Errno::ENOENT) => return Ok(Vec::new()),
        opened => File::from(opened.map_err(|e| unreadable(e.into()))?),
    };
    let mut text = String::new();
    file.read_to_string(&mut text).map_err(unreadable)?;
    Ok(parse_status(&text))
}

/// The files and symlinks package `name` installed in the image, as dpkg lists them, each
/// with its SHA-256 (directories, which packages share, are left out). Paths resolve as the
/// image sees them, so a symlink in the image never leads onto the host.
pub fn files(root: &RootDir, name: &str, architecture: &str) -> Result<Vec<ManifestEntry>, Error> {
    // Multi-arch "same" packages keep their list under name:arch.
    let lists = [format!("/var/lib/dpkg/info/{name}.list"), format!("/var/lib/dpkg/info/{name}:{architecture}.list")];
    let list = lists.iter().find_map(|list| root.open_in_root(list, OFlag::O_RDONLY).ok().map(|fd| (list, fd)));
    let Some((list, fd)) = list else {
        return NoFileListSnafu { package: name, list: &lists[0] }.fail();
    };
    let mut text = String::new();
    File::from(fd).read_to_string(&mut text).context(ReadSnafu { path: list })?;
    let mut entries = Vec::new();
    for path in text.lines().filter(|line| line.starts_with('/') && *line != "/.") {
        let failed = |source: std::io::Error| Error::ReadFile { package: name.into(), path: path.into(), source };
        let node = match root.open_in_root(path, OFlag::O_PATH | OFlag::O_NOFOLLOW) {
            Ok(node) => node,
            // Diverted, or removed by a maintainer script: not in the image.
            Err(Errno::ENOENT) => continue,
            Err(e) => return Err(failed(e.into())),
        };
        let meta = stat::fstat(std::os::fd::AsRawFd::as_raw_fd(&node)).map_err(|e| failed(e.into()))?;
        let mode = meta.st_mode & 0o7777;
        let entry =
            ManifestEntry { path: path.to_string(), kind: EntryKind::File, size: 0, mode, sha256: None, target: None };
        match SFlag::from_bits_truncate(meta.st_mode & SFlag::S_IFMT.bits()) {
            SFlag::S_IFREG => {
                let mut file = File::from(
                    root.open_in_root(path, OFlag::O_RDONLY | OFlag::O_NOFOLLOW).map_err(|e| failed(e.into()))?,
                );
                let mut hasher = Sha256::new();
                let size = std::io::copy(&mut file, &mut hasher).map_err(failed)?;
                entries.push(ManifestEntry { size, sha256: Some(hex::encode(hasher.finalize())), ..entry });
            }
            SFlag::S_IFLNK => {
                let target = nix::fcntl::readlinkat(Some(std::os::fd::AsRawFd::as_raw_fd(&node)), "")
                    .map_err(|e| failed(e.into()))?;
                let target = Some(target.to_string_lossy().into_owned());
                entries.push(ManifestEntry { kind: EntryKind::Symlink, target, ..entry });
            }
            _ => {}
        }
    }
    entries.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(entries)
}

/// What a base image keeps next to it as its manifest.
#[derive(Serialize, Deserialize)]
struct ListDocument {
    packages: Vec<Package>,
}

/// The manifest a base image keeps next to it: `{"packages": [...]}`.
pub fn list_document(packages: &[Package]) -> Vec<u8> {
    let document = ListDocument { packages: packages.to_vec() };
    serde_json::to_vec_pretty(&document).expect("packages serialize")
}

/// The packages of a [`list_document`].
pub fn read_list_document(bytes: &[u8]) -> serde_json::Result<Vec<Package>> {
    Ok(serde_json::from_slice::<ListDocument>(bytes)?.packages)
}

/// The installed packages of a dpkg status file: stanzas whose status ends `installed`.
fn parse_status(text: &str) -> Vec<Package> {
    let mut packages: Vec<Package> = text
        .split("\n\n")
        .filter_map(|stanza| {
            let field = |name: &str| crate::deb822::field(stanza, name);
            if !field("Status")?.ends_with(" installed") {
                return None;
            }
            let name = field("Package")?;
            // "Source: name (version)" when the source version differs; the name is enough.
            let source = field("Source").map(|s| s.split_whitespace().next().unwrap_or_default().to_string());
            Some(Package {
                source: source.filter(|s| *s != name),
                version: field("Version")?,
                architecture: field("Architecture").unwrap_or_default(),
                name,
            })
        })
        .collect();
    packages.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.architecture.cmp(&b.architecture)));
    packages
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_installed_packages_are_listed_sorted_with_their_source() {
        let status = "Package: zlib1g\nStatus: install ok installed\nArchitecture: amd64\nSource: zlib\n\
                      Version: 1:1.2.13.dfsg-1\nDescription: compression\n library\n\n\
                      Package: cron\nStatus: install ok installed\nVersion: 3.0pl1-162\nArchitecture: amd64\n\n\
                      Package: gone\nStatus: deinstall ok config-files\nVersion: 1\nArchitecture: all\n\n\
                      Package: tzdata\nStatus: install ok installed\nSource: tzdata (2024a-0+deb12u1)\n\
                      Version: 2024a-0+deb12u1\nArchitecture: all\n";
        let packages = parse_status(status);
        let names: Vec<_> = packages.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["cron", "tzdata", "zlib1g"]);
        assert_eq!(packages[2].version, "1:1.2.13.dfsg-1");
        assert_eq!(packages[2].source.as_deref(), Some("zlib"));
        assert_eq!(packages[1].source, None, "a source named as the package is not repeated");
        assert_eq!(packages[0].architecture, "amd64");
    }

    #[test]
    fn a_package_list_reads_back_as_written() {
        let packages =
            parse_status("Package: tzdata\nStatus: install ok installed\nSource: tz\nVersion: 1\nArchitecture: all\n");
        assert_eq!(read_list_document(&list_document(&packages)).unwrap(), packages);
    }

    #[test]
    fn an_image_without_dpkg_has_no_packages() {
        assert_eq!(installed(tempfile::tempdir().unwrap().path()).unwrap(), []);
    }
}

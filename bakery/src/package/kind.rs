//! What a package is, told by its first bytes (a name can be wrong; magic numbers are not),
//! and checked against what its name says.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A tar archive, gzip-compressed: unpacked under the install root.
    TarGz,
    /// A tar archive, zstd-compressed: unpacked under the install root.
    TarZst,
    /// A Debian package: installed by apt in the image, dependencies and all.
    Deb,
    /// A Java web archive: placed as `install_root/APP.war` for Tomcat to deploy.
    War,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::TarGz => "a gzip-compressed tar archive (.tar.gz)",
            Kind::TarZst => "a zstd-compressed tar archive (.tar.zst)",
            Kind::Deb => "a Debian package (.deb)",
            Kind::War => "a web archive (.war, a zip)",
        })
    }
}

const GZIP: &[u8] = &[0x1f, 0x8b];
const ZSTD: &[u8] = &[0x28, 0xb5, 0x2f, 0xfd];
/// An `ar` archive whose first member is `debian-binary`.
const DEB: &[u8] = b"!<arch>\ndebian-binary";
const ZIP: &[u8] = b"PK\x03\x04";

impl Kind {
    /// The kind the package's first bytes say; None for anything else.
    pub fn sniff(head: &[u8]) -> Option<Kind> {
        [(GZIP, Kind::TarGz), (ZSTD, Kind::TarZst), (DEB, Kind::Deb), (ZIP, Kind::War)]
            .into_iter()
            .find_map(|(magic, kind)| head.starts_with(magic).then_some(kind))
    }

    /// The kind a package's name (path or URL) says; None when it says none of them.
    pub fn from_name(name: &str) -> Option<Kind> {
        let path = name.split(['?', '#']).next().unwrap_or(name).to_ascii_lowercase();
        [
            (".tar.gz", Kind::TarGz),
            (".tgz", Kind::TarGz),
            (".tar.zst", Kind::TarZst),
            (".tzst", Kind::TarZst),
            (".deb", Kind::Deb),
            (".war", Kind::War),
        ]
        .into_iter()
        .find_map(|(suffix, kind)| path.ends_with(suffix).then_some(kind))
    }

    /// What bytes that are none of the kinds look like, for the error.
    pub fn describe_unknown(head: &[u8]) -> String {
        let shown: String = head
            .iter()
            .take(8)
            .map(|b| if b.is_ascii_graphic() || *b == b' ' { *b as char } else { '.' })
            .collect::<String>();
        match head {
            [] => "is empty".to_string(),
            [b'B', b'Z', b'h', ..] => "is bzip2-compressed, which is not supported".to_string(),
            [0xfd, b'7', b'z', b'X', b'Z', 0, ..] => "is xz-compressed, which is not supported".to_string(),
            _ if head.len() > 262 && &head[257..262] == b"ustar" => "is an uncompressed tar archive".to_string(),
            _ => format!("starts with {shown:?}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_come_from_magic_numbers_and_names() {
        assert_eq!(Kind::sniff(&[0x1f, 0x8b, 8, 0]), Some(Kind::TarGz));
        assert_eq!(Kind::sniff(&[0x28, 0xb5, 0x2f, 0xfd, 0]), Some(Kind::TarZst));
        assert_eq!(
            Kind::sniff(b"!<arch>\ndebian-binary   1342943816  0     0     100644  4         `\n"),
            Some(Kind::Deb)
        );
        assert_eq!(Kind::sniff(b"!<arch>\nlibfoo.o"), None, "an ar archive that is not a .deb");
        assert_eq!(Kind::sniff(b"PK\x03\x04\x14\x00"), Some(Kind::War));
        assert_eq!(Kind::sniff(b"hello"), None);
        assert_eq!(Kind::from_name("build/hello-1.0.TGZ"), Some(Kind::TarGz));
        assert_eq!(Kind::from_name("https://ci.invalid/hello_1.0_all.deb?download=1"), Some(Kind::Deb));
        assert_eq!(Kind::from_name("hello.war"), Some(Kind::War));
        assert_eq!(Kind::from_name("hello.tar.zst"), Some(Kind::TarZst));
        assert_eq!(Kind::from_name("https://ci.invalid/artifact/42"), None);
        assert_eq!(Kind::describe_unknown(b"BZh91AY"), "is bzip2-compressed, which is not supported");
        assert_eq!(Kind::describe_unknown(b"hello\x00"), "starts with \"hello.\"");
    }
}

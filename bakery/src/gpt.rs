//! Reading a GUID partition table, to find the root filesystem of an image's disk without
//! relying on the kernel's partition parsers or udev.

use snafu::{ensure, ResultExt, Snafu};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const SECTOR: u64 = 512;
/// Linux root (x86-64) per the Discoverable Partitions Specification.
pub const LINUX_ROOT_X86_64: &str = "4f68bce3-e8cd-4db1-96e7-fbcaf984b709";
pub const BIOS_BOOT: &str = "21686148-6449-6e6f-744e-656564454649";

#[derive(Debug, Snafu)]
pub enum Error {
    #[snafu(display("reading the partition table of {}: {source}", path.display()))]
    Read { path: PathBuf, source: std::io::Error },

    #[snafu(display("{} has no GPT partition table", path.display()))]
    NoGpt { path: PathBuf },

    #[snafu(display("{} has no root partition (GPT type {LINUX_ROOT_X86_64} or name \"root\")", path.display()))]
    NoRoot { path: PathBuf },
}

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Debug, Clone, PartialEq)]
pub struct Partition {
    pub number: u32,
    pub type_guid: String,
    pub name: String,
    pub first_lba: u64,
    pub last_lba: u64,
}

impl Partition {
    pub fn offset(&self) -> u64 {
        self.first_lba * SECTOR
    }

    pub fn size(&self) -> u64 {
        (self.last_lba + 1 - self.first_lba) * SECTOR
    }
}

fn guid(bytes: &[u8]) -> String {
    // The first three fields are little-endian on disk.
    format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{}-{}",
        bytes[3],
        bytes[2],
        bytes[1],
        bytes[0],
        bytes[5],
        bytes[4],
        bytes[7],
        bytes[6],
        hex::encode(&bytes[8..10]),
        hex::encode(&bytes[10..16])
    )
}

/// The partitions of a disk image or block device.
pub fn read(path: &Path) -> Result<Vec<Partition>> {
    let file = File::open(path).context(ReadSnafu { path })?;
    let mut header = [0u8; 92];
    file.read_exact_at(&mut header, SECTOR).context(ReadSnafu { path })?;
    ensure!(&header[..8] == b"EFI PART", NoGptSnafu { path });
    let entries_lba = u64::from_le_bytes(header[72..80].try_into().expect("8 bytes"));
    let count = u32::from_le_bytes(header[80..84].try_into().expect("4 bytes"));
    let entry_size = u32::from_le_bytes(header[84..88].try_into().expect("4 bytes")) as usize;
    let mut table = vec![0u8; count as usize * entry_size];
    file.read_exact_at(&mut table, entries_lba * SECTOR).context(ReadSnafu { path })?;
    Ok(table
        .chunks(entry_size)
        .enumerate()
        .filter(|(_, entry)| entry[..16].iter().any(|&b| b != 0))
        .map(|(i, entry)| Partition {
            number: i as u32 + 1,
            type_guid: guid(&entry[..16]),
            first_lba: u64::from_le_bytes(entry[32..40].try_into().expect("8 bytes")),
            last_lba: u64::from_le_bytes(entry[40..48].try_into().expect("8 bytes")),
            name: String::from_utf16_lossy(
                &entry[56..128]
                    .chunks(2)
                    .map(|c| u16::from_le_bytes([c[0], c[1]]))
                    .take_while(|&c| c != 0)
                    .collect::<Vec<_>>(),
            ),
        })
        .collect())
}

/// The root partition: typed Linux root x86-64, else named "root".
pub fn root_partition(path: &Path) -> Result<Partition> {
    let partitions = read(path)?;
    let by_type = partitions.iter().find(|p| p.type_guid == LINUX_ROOT_X86_64);
    let by_name = partitions.iter().find(|p| p.name == "root");
    by_type.or(by_name).cloned().ok_or_else(|| NoRootSnafu { path }.build())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_table_written_by_sfdisk() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("disk.raw");
        File::create(&disk).unwrap().set_len(64 << 20).unwrap();
        let script = format!(
            "label: gpt\nstart=2048, size=2048, type={BIOS_BOOT}, name=bios\nstart=4096, type={LINUX_ROOT_X86_64}, name=root\n"
        );
        let mut child = std::process::Command::new("sfdisk")
            .arg("--quiet")
            .arg(&disk)
            .stdin(std::process::Stdio::piped())
            .spawn()
            .expect("sfdisk (util-linux) is installed");
        use std::io::Write;
        child.stdin.take().unwrap().write_all(script.as_bytes()).unwrap();
        assert!(child.wait().unwrap().success());

        let root = root_partition(&disk).unwrap();
        assert_eq!(root.number, 2);
        assert_eq!(root.name, "root");
        assert_eq!(root.offset(), 4096 * 512);
        assert_eq!(read(&disk).unwrap()[0].type_guid, BIOS_BOOT);
    }

    #[test]
    fn a_disk_without_gpt_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("blank.raw");
        File::create(&disk).unwrap().set_len(1 << 20).unwrap();
        assert!(matches!(read(&disk), Err(Error::NoGpt { .. })));
    }
}

//! Sparse files, copy-on-write clones and extent maps: the tricks that make a local volume
//! cheap to create and cheap to snapshot.
//!
//! Where the filesystem supports reflinks (XFS with reflink=1, btrfs), a volume is an O(1)
//! clone of its snapshot's materialised image, and FIEMAP then tells exactly which extents a
//! bake rewrote (they are no longer `shared`), so a snapshot reads only those. Elsewhere the
//! volume is a sparse copy and SEEK_DATA/SEEK_HOLE bound the read to the blocks holding data.

use rustix::fs::SeekFrom;
use snafu::{ResultExt, Snafu};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::fd::AsRawFd;

#[derive(Debug, Snafu)]
pub enum Error {
    #[snafu(display("seeking data/holes failed: {source}"))]
    Seek { source: std::io::Error },

    #[snafu(display("FIEMAP failed: {source}"))]
    Fiemap { source: std::io::Error },

    #[snafu(display("copying the volume data failed: {source}"))]
    Copy { source: std::io::Error },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Which blocks a snapshot must read, and which it can take from the parent unread.
pub struct BlockPlan {
    pub to_read: Vec<u64>,
    pub unchanged: BTreeMap<u64, String>,
}

/// Block indexes that hold data, from SEEK_DATA/SEEK_HOLE.
pub struct DataBlocks(Vec<u64>);

impl DataBlocks {
    pub fn without_parent(self) -> BlockPlan {
        BlockPlan { to_read: self.0, unchanged: BTreeMap::new() }
    }
}

/// Blocks classified by FIEMAP: wholly shared with the clone source, or needing a read.
pub struct SharedBlocks {
    shared: BTreeSet<u64>,
    touched: BTreeSet<u64>,
}

impl SharedBlocks {
    /// A wholly shared block is the parent's block; anything else is read and hashed.
    pub fn with_parent(self, parent: &BTreeMap<u64, String>) -> BlockPlan {
        let mut to_read: Vec<u64> = self.touched.into_iter().collect();
        let mut unchanged = BTreeMap::new();
        for index in self.shared {
            match parent.get(&index) {
                Some(hash) => {
                    unchanged.insert(index, hash.clone());
                }
                None => to_read.push(index),
            }
        }
        to_read.sort_unstable();
        BlockPlan { to_read, unchanged }
    }
}

/// Ranges `[start, end)` of the file that hold data.
pub fn data_ranges(file: &File) -> Result<Vec<(u64, u64)>> {
    let len = file.metadata().context(SeekSnafu)?.len();
    let mut ranges = Vec::new();
    let mut offset = 0;
    while offset < len {
        let start = match rustix::fs::seek(file, SeekFrom::Data(offset)) {
            Err(rustix::io::Errno::NXIO) => break, // no data after offset
            other => other.map_err(std::io::Error::from).context(SeekSnafu)?,
        };
        let end = rustix::fs::seek(file, SeekFrom::Hole(start)).map_err(std::io::Error::from).context(SeekSnafu)?;
        ranges.push((start, end));
        offset = end;
    }
    Ok(ranges)
}

pub fn data_blocks(file: &File, block_size: u64) -> Result<DataBlocks> {
    let mut blocks = BTreeSet::new();
    for (start, end) in data_ranges(file)? {
        blocks.extend(start / block_size..end.div_ceil(block_size));
    }
    Ok(DataBlocks(blocks.into_iter().collect()))
}

/// `_IOWR('f', 11, struct fiemap)` (linux/fs.h): the request is sized by the fixed header only.
const FS_IOC_FIEMAP: libc::c_ulong = nix::request_code_readwrite!(b'f', 11, 32) as libc::c_ulong;
const FIEMAP_FLAG_SYNC: u32 = 0x1;
const FIEMAP_EXTENT_LAST: u32 = 0x1;
const FIEMAP_EXTENT_SHARED: u32 = 0x2000;
const EXTENTS_PER_CALL: usize = 256;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct FiemapExtent {
    logical: u64,
    physical: u64,
    length: u64,
    reserved64: [u64; 2],
    flags: u32,
    reserved: [u32; 3],
}

#[repr(C)]
struct Fiemap {
    start: u64,
    length: u64,
    flags: u32,
    mapped_extents: u32,
    extent_count: u32,
    reserved: u32,
    extents: [FiemapExtent; EXTENTS_PER_CALL],
}

/// Classifies every block by its extents: wholly covered by extents still shared with the
/// clone source (unchanged), touched by any unshared extent or only partly covered (read it),
/// or covered by nothing (a hole: zeros).
pub fn unshared_blocks(file: &File, block_size: u64) -> Result<SharedBlocks> {
    let mut shared_bytes: BTreeMap<u64, u64> = BTreeMap::new();
    let mut touched = BTreeSet::new();
    let mut start = 0u64;
    loop {
        let mut map = Box::new(Fiemap {
            start,
            length: u64::MAX - start,
            flags: FIEMAP_FLAG_SYNC,
            mapped_extents: 0,
            extent_count: EXTENTS_PER_CALL as u32,
            reserved: 0,
            extents: [FiemapExtent::default(); EXTENTS_PER_CALL],
        });
        // SAFETY: `map` is a correctly laid out struct fiemap with room for extent_count extents.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP, &mut *map as *mut Fiemap) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error()).context(FiemapSnafu);
        }
        let extents = &map.extents[..map.mapped_extents as usize];
        for extent in extents {
            let end = extent.logical + extent.length;
            for index in extent.logical / block_size..end.div_ceil(block_size) {
                if extent.flags & FIEMAP_EXTENT_SHARED == 0 {
                    touched.insert(index);
                } else {
                    let block_start = index * block_size;
                    let overlap = end.min(block_start + block_size) - extent.logical.max(block_start);
                    *shared_bytes.entry(index).or_default() += overlap;
                }
            }
        }
        match extents.last() {
            Some(last) if last.flags & FIEMAP_EXTENT_LAST == 0 => start = last.logical + last.length,
            _ => break,
        }
    }
    let mut shared = BTreeSet::new();
    for (index, bytes) in shared_bytes {
        if touched.contains(&index) {
            continue;
        }
        if bytes >= block_size {
            shared.insert(index);
        } else {
            touched.insert(index);
        }
    }
    Ok(SharedBlocks { shared, touched })
}

/// Makes `dest` a copy of `source`: a reflink clone when the filesystem can (returns true),
/// otherwise an in-kernel copy of the data ranges only, keeping holes (returns false).
pub fn clone_or_copy(source: &File, dest: &File) -> Result<bool> {
    if rustix::fs::ioctl_ficlone(dest, source).is_ok() {
        return Ok(true);
    }
    let len = source.metadata().context(CopySnafu)?.len();
    dest.set_len(len).context(CopySnafu)?;
    for (start, end) in data_ranges(source).map_err(|e| match e {
        Error::Seek { source } => Error::Copy { source },
        other => other,
    })? {
        let mut offset = start;
        while offset < end {
            let mut dest_offset = offset;
            let remaining = (end - offset) as usize;
            let copied =
                rustix::fs::copy_file_range(source, Some(&mut offset), dest, Some(&mut dest_offset), remaining)
                    .map_err(std::io::Error::from)
                    .context(CopySnafu)?;
            if copied == 0 {
                break;
            }
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::blockstore::store::{ChangeHint, Store, BLOCK_SIZE};
    use std::os::unix::fs::FileExt;
    use std::path::Path;
    use std::process::Command;
    use std::sync::atomic::AtomicBool;

    const BS: u64 = BLOCK_SIZE as u64;

    /// A small XFS filesystem with reflink, loop-mounted (needs root, loop devices, mkfs.xfs).
    struct Xfs {
        mount: tempfile::TempDir,
        _image: tempfile::TempDir,
    }

    impl Xfs {
        fn new() -> Xfs {
            let image = tempfile::tempdir().unwrap();
            let file = image.path().join("xfs.img");
            File::create(&file).unwrap().set_len(512 << 20).unwrap();
            let mkfs = Command::new("mkfs.xfs").args(["-q", "-m", "reflink=1"]).arg(&file).status();
            assert!(mkfs.expect("mkfs.xfs (xfsprogs) is installed").success());
            let mount = tempfile::tempdir().unwrap();
            let status = Command::new("mount").arg("-o").arg("loop").arg(&file).arg(mount.path()).status().unwrap();
            assert!(status.success(), "loop-mounting XFS needs root");
            Xfs { mount, _image: image }
        }

        fn path(&self) -> &Path {
            self.mount.path()
        }
    }

    impl Drop for Xfs {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg("-d").arg(self.mount.path()).status();
        }
    }

    #[test]
    fn data_blocks_skip_holes() {
        let dir = tempfile::tempdir().unwrap();
        let file = File::create_new(dir.path().join("f")).unwrap();
        file.set_len(16 * BS).unwrap();
        file.write_all_at(b"x", 5 * BS + 17).unwrap();
        file.write_all_at(&vec![1; BLOCK_SIZE + 1], 9 * BS).unwrap();
        let DataBlocks(blocks) = data_blocks(&file, BS).unwrap();
        assert_eq!(blocks, vec![5, 9, 10]);
    }

    #[test]
    fn copies_keep_holes_and_content() {
        let dir = tempfile::tempdir().unwrap();
        let source = File::create_new(dir.path().join("s")).unwrap();
        source.set_len(64 * BS).unwrap();
        source.write_all_at(&vec![3; 1000], 40 * BS).unwrap();
        let dest = File::create_new(dir.path().join("d")).unwrap();
        clone_or_copy(&source, &dest).unwrap();
        assert_eq!(std::fs::read(dir.path().join("s")).unwrap(), std::fs::read(dir.path().join("d")).unwrap());
        assert!(dest.metadata().unwrap().len() == 64 * BS);
        assert!(data_blocks(&dest, BS).unwrap().0.len() <= 1, "holes stay holes");
    }

    #[test]
    fn a_reflinked_volume_snapshot_reads_only_what_was_rewritten() {
        let xfs = Xfs::new();
        let store = Store::open(&xfs.path().join("state")).unwrap();
        let parent_path = xfs.path().join("parent.raw");
        let parent = File::create_new(&parent_path).unwrap();
        parent.set_len(32 * BS).unwrap();
        for index in 0..20 {
            parent.write_all_at(&vec![index as u8 + 1; BLOCK_SIZE], index * BS).unwrap();
        }
        parent.sync_all().unwrap();
        let cancel = AtomicBool::new(false);
        let (parent_blocks, _, _) =
            store.snapshot_volume(&parent_path, None, ChangeHint::None, &cancel, &|_, _| {}).unwrap();

        let volume_path = xfs.path().join("volume.raw");
        let volume = File::create_new(&volume_path).unwrap();
        assert!(clone_or_copy(&parent, &volume).unwrap(), "XFS with reflink=1 clones");
        volume.write_all_at(b"changed", 2 * BS + 100).unwrap();
        volume.write_all_at(&vec![9; BLOCK_SIZE], 25 * BS).unwrap();
        volume.sync_all().unwrap();

        let plan = unshared_blocks(&volume, BS).unwrap().with_parent(&parent_blocks);
        assert!(plan.to_read.contains(&2) && plan.to_read.contains(&25), "{:?}", plan.to_read);
        assert!(plan.to_read.len() <= 4, "only the rewritten extents are read: {:?}", plan.to_read);
        assert_eq!(plan.unchanged.len() + plan.to_read.iter().filter(|i| **i < 20).count(), 20);

        let manifest = crate::blockstore::store::SnapshotManifest {
            id: "snap-p".into(),
            parent: None,
            volume_size: 32 * BS,
            block_size: BLOCK_SIZE,
            created: String::new(),
            description: String::new(),
            changed_blocks: 0,
            stored_bytes: 0,
            tags: Default::default(),
            blocks: parent_blocks,
        };
        let (blocks, changed, _) = store
            .snapshot_volume(&volume_path, Some(&manifest), ChangeHint::ReflinkedFromParent, &cancel, &|_, _| {})
            .unwrap();
        assert_eq!(changed, 2);
        let (full, _, _) = store.snapshot_volume(&volume_path, None, ChangeHint::None, &cancel, &|_, _| {}).unwrap();
        assert_eq!(blocks, full, "the FIEMAP shortcut agrees with hashing everything");
    }
}

//! The local provider's snapshot storage: a content-addressed store of 512 KiB blocks named by
//! their SHA-256, and snapshot manifests that map block indexes to those names.
//!
//! The block size is EBS's, so a local snapshot maps one to one onto an EBS direct upload.
//! Zero blocks are never stored (they read as zeros, as unwritten EBS blocks do), blocks are
//! shared between snapshots, and a snapshot records its parent so that only the blocks that
//! differ from it count as changed.

use super::sparse;
use rayon::prelude::*;
use rustix::fs::FallocateFlags;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use snafu::{ensure, ResultExt, Snafu};
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// EBS direct API block size.
pub const BLOCK_SIZE: usize = 512 * 1024;

#[derive(Debug, Snafu)]
pub enum Error {
    #[snafu(display("block store I/O on {}: {source}", path.display()))]
    Io { path: PathBuf, source: std::io::Error },

    #[snafu(display("block {hash} is missing from the store at {}", path.display()))]
    MissingBlock { hash: String, path: PathBuf },

    #[snafu(display("block {hash} in the store is corrupt (its content hashes to {actual})"))]
    CorruptBlock { hash: String, actual: String },

    #[snafu(display("snapshot {id} does not exist"))]
    NoSuchSnapshot { id: String },

    #[snafu(display("snapshot manifest {} is unreadable: {source}", path.display()))]
    BadManifest { path: PathBuf, source: serde_json::Error },

    #[snafu(display("volume size {size} is not a whole number of {BLOCK_SIZE}-byte blocks"))]
    UnalignedVolume { size: u64 },

    #[snafu(display("snapshotting was cancelled"))]
    Cancelled,

    #[snafu(display("reading the volume's extents failed: {source}"))]
    Extents { source: sparse::Error },
}

pub type Result<T> = std::result::Result<T, Error>;

/// A snapshot: an immutable list of the non-zero blocks of a volume.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SnapshotManifest {
    pub id: String,
    pub parent: Option<String>,
    pub volume_size: u64,
    pub block_size: usize,
    pub created: String,
    pub description: String,
    /// Blocks that differ from the parent (all non-zero blocks when there is no parent).
    pub changed_blocks: u64,
    /// Bytes of new blocks this snapshot added to the store.
    pub stored_bytes: u64,
    pub tags: BTreeMap<String, String>,
    /// Block index → SHA-256 hex of the block; zero blocks are absent.
    pub blocks: BTreeMap<u64, String>,
}

impl SnapshotManifest {
    pub fn block_count(&self) -> u64 {
        self.volume_size / BLOCK_SIZE as u64
    }
}

/// What the caller knows about which parts of a volume may have changed since its parent.
pub enum ChangeHint {
    /// Nothing: every block holding data is read and hashed.
    None,
    /// The volume was cloned (reflinked) from the parent's materialised image: extents still
    /// shared with it are unchanged, so only the others need reading.
    ReflinkedFromParent,
}

/// Everything under `<state>/blocks` and `<state>/snapshots`.
#[derive(Debug, Clone)]
pub struct Store {
    blocks: PathBuf,
    snapshots: PathBuf,
}

impl Store {
    pub fn open(state_dir: &Path) -> Result<Store> {
        let store = Store { blocks: state_dir.join("blocks"), snapshots: state_dir.join("snapshots") };
        for dir in [&store.blocks, &store.snapshots, &store.blocks.join("incoming")] {
            fs::create_dir_all(dir).context(IoSnafu { path: dir.clone() })?;
        }
        Ok(store)
    }

    fn block_path(&self, hash: &str) -> PathBuf {
        self.blocks.join(&hash[..2]).join(hash)
    }

    /// Stores a block under its hash; returns whether it was new. Concurrent writers of the same
    /// block are harmless: each renames identical bytes into place.
    pub fn put_block(&self, hash: &str, data: &[u8]) -> Result<bool> {
        let path = self.block_path(hash);
        if path.exists() {
            return Ok(false);
        }
        let dir = path.parent().expect("block paths have a parent");
        fs::create_dir_all(dir).context(IoSnafu { path: dir })?;
        let incoming = self.blocks.join("incoming").join(format!("{hash}.{}", crate::ids::new_id("tmp")));
        let mut file = File::create(&incoming).context(IoSnafu { path: &incoming })?;
        file.write_all(data).context(IoSnafu { path: &incoming })?;
        drop(file);
        // Exactly one of several writers of the same block wins, so stored bytes count once.
        let renamed = nix::fcntl::renameat2(None, &incoming, None, &path, nix::fcntl::RenameFlags::RENAME_NOREPLACE);
        match renamed {
            Ok(()) => Ok(true),
            Err(nix::errno::Errno::EEXIST) => {
                fs::remove_file(&incoming).context(IoSnafu { path: &incoming })?;
                Ok(false)
            }
            Err(errno) => Err(std::io::Error::from(errno)).context(IoSnafu { path: &path }),
        }
    }

    /// Reads a block into `buf`, verifying it still hashes to its name.
    pub fn read_block(&self, hash: &str, buf: &mut [u8]) -> Result<()> {
        let path = self.block_path(hash);
        let file = File::open(&path).map_err(|source| match source.kind() {
            std::io::ErrorKind::NotFound => Error::MissingBlock { hash: hash.to_string(), path: path.clone() },
            _ => Error::Io { path: path.clone(), source },
        })?;
        file.read_exact_at(buf, 0).context(IoSnafu { path: &path })?;
        let actual = hex::encode(Sha256::digest(&*buf));
        ensure!(actual == hash, CorruptBlockSnafu { hash, actual });
        Ok(())
    }

    /// Every block hash in the store.
    pub fn all_blocks(&self) -> Result<BTreeSet<String>> {
        let mut hashes = BTreeSet::new();
        for shard in fs::read_dir(&self.blocks).context(IoSnafu { path: &self.blocks })? {
            let shard = shard.context(IoSnafu { path: &self.blocks })?;
            if shard.file_name() == "incoming" {
                continue;
            }
            for block in fs::read_dir(shard.path()).context(IoSnafu { path: shard.path() })? {
                let block = block.context(IoSnafu { path: shard.path() })?;
                hashes.insert(block.file_name().to_string_lossy().into_owned());
            }
        }
        Ok(hashes)
    }

    pub fn remove_block(&self, hash: &str) -> Result<()> {
        let path = self.block_path(hash);
        remove_if_present(&path)
    }

    /// Partial block writes left by a process that died mid-write.
    pub fn incoming_files(&self) -> Result<Vec<PathBuf>> {
        let dir = self.blocks.join("incoming");
        let entries = fs::read_dir(&dir).context(IoSnafu { path: &dir })?;
        entries.map(|entry| entry.map(|e| e.path()).context(IoSnafu { path: &dir })).collect()
    }

    fn manifest_path(&self, id: &str) -> PathBuf {
        self.snapshots.join(format!("{id}.json"))
    }

    pub fn snapshot(&self, id: &str) -> Result<SnapshotManifest> {
        let path = self.manifest_path(id);
        let bytes = match fs::read(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return NoSuchSnapshotSnafu { id }.fail(),
            other => other.context(IoSnafu { path: &path })?,
        };
        serde_json::from_slice(&bytes).context(BadManifestSnafu { path })
    }

    pub fn snapshot_ids(&self) -> Result<Vec<String>> {
        let mut ids = Vec::new();
        for entry in fs::read_dir(&self.snapshots).context(IoSnafu { path: &self.snapshots })? {
            let name = entry.context(IoSnafu { path: &self.snapshots })?.file_name();
            if let Some(id) = name.to_string_lossy().strip_suffix(".json") {
                ids.push(id.to_string());
            }
        }
        Ok(ids)
    }

    /// Writes a manifest atomically, after making the blocks it names durable.
    pub fn save_snapshot(&self, manifest: &SnapshotManifest) -> Result<()> {
        sync_filesystem(&self.blocks)?;
        let path = self.manifest_path(&manifest.id);
        let json = serde_json::to_vec_pretty(manifest).expect("manifests serialise");
        crate::atomic::write(&path, &json).context(IoSnafu { path })
    }

    /// Removes a snapshot manifest; its blocks stay until `gc` finds them unreferenced.
    pub fn delete_snapshot(&self, id: &str) -> Result<()> {
        remove_if_present(&self.manifest_path(id))
    }

    /// Reads a volume file and builds the snapshot of it: hashes its blocks in parallel, stores
    /// the ones the store lacks, and counts those that differ from `parent`.
    pub fn snapshot_volume(
        &self,
        volume: &Path,
        parent: Option<&SnapshotManifest>,
        hint: ChangeHint,
        cancel: &AtomicBool,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<(BTreeMap<u64, String>, u64, u64)> {
        let file = File::open(volume).context(IoSnafu { path: volume })?;
        let size = file.metadata().context(IoSnafu { path: volume })?.len();
        ensure!(size % BLOCK_SIZE as u64 == 0, UnalignedVolumeSnafu { size });

        let plan = match (hint, parent) {
            (ChangeHint::ReflinkedFromParent, Some(parent)) => {
                sparse::unshared_blocks(&file, BLOCK_SIZE as u64).context(ExtentsSnafu)?.with_parent(&parent.blocks)
            }
            _ => sparse::data_blocks(&file, BLOCK_SIZE as u64).context(ExtentsSnafu)?.without_parent(),
        };

        let stored_bytes = AtomicU64::new(0);
        let done = AtomicU64::new(0);
        let total = plan.to_read.len() as u64;
        let hashed: Vec<(u64, Option<String>)> = plan
            .to_read
            .par_iter()
            .map_init(
                || vec![0u8; BLOCK_SIZE],
                |buf, &index| -> Result<(u64, Option<String>)> {
                    ensure!(!cancel.load(Ordering::Relaxed), CancelledSnafu);
                    file.read_exact_at(buf, index * BLOCK_SIZE as u64).context(IoSnafu { path: volume })?;
                    progress(done.fetch_add(1, Ordering::Relaxed) + 1, total);
                    if buf.iter().all(|&b| b == 0) {
                        return Ok((index, None));
                    }
                    let hash = hex::encode(Sha256::digest(&buf[..]));
                    if self.put_block(&hash, buf)? {
                        stored_bytes.fetch_add(BLOCK_SIZE as u64, Ordering::Relaxed);
                    }
                    Ok((index, Some(hash)))
                },
            )
            .collect::<Result<_>>()?;

        let mut blocks = plan.unchanged;
        for (index, hash) in hashed {
            if let Some(hash) = hash {
                blocks.insert(index, hash);
            }
        }
        let empty = BTreeMap::new();
        let parent_blocks = parent.map_or(&empty, |p| &p.blocks);
        let changed =
            (0..size / BLOCK_SIZE as u64).filter(|index| blocks.get(index) != parent_blocks.get(index)).count() as u64;
        Ok((blocks, changed, stored_bytes.into_inner()))
    }

    /// Writes a snapshot's blocks into a new sparse file of the volume's size.
    pub fn materialize(&self, manifest: &SnapshotManifest, out: &Path, cancel: &AtomicBool) -> Result<()> {
        let file = File::create(out).context(IoSnafu { path: out })?;
        file.set_len(manifest.volume_size).context(IoSnafu { path: out })?;
        self.write_blocks(&file, out, manifest.blocks.iter(), cancel)?;
        file.sync_all().context(IoSnafu { path: out })
    }

    /// Like [`Store::materialize`], starting from `base`, the materialised image of another
    /// snapshot (usually the parent): it is cloned (O(1) with reflink) and only the blocks that
    /// differ are written, or punched out where they became zero.
    pub fn materialize_over(
        &self,
        manifest: &SnapshotManifest,
        base: (&SnapshotManifest, &Path),
        out: &Path,
        cancel: &AtomicBool,
    ) -> Result<()> {
        let (base_manifest, base_path) = base;
        let source = File::open(base_path).context(IoSnafu { path: base_path })?;
        let file = File::create(out).context(IoSnafu { path: out })?;
        sparse::clone_or_copy(&source, &file).context(ExtentsSnafu)?;
        file.set_len(manifest.volume_size).context(IoSnafu { path: out })?;
        let differing = manifest.blocks.iter().filter(|(index, hash)| base_manifest.blocks.get(index) != Some(hash));
        self.write_blocks(&file, out, differing, cancel)?;
        let punch = FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE;
        for index in base_manifest.blocks.keys().filter(|index| !manifest.blocks.contains_key(index)) {
            rustix::fs::fallocate(&file, punch, index * BLOCK_SIZE as u64, BLOCK_SIZE as u64)
                .map_err(std::io::Error::from)
                .context(IoSnafu { path: out })?;
        }
        file.sync_all().context(IoSnafu { path: out })
    }

    fn write_blocks<'a>(
        &self,
        file: &File,
        path: &Path,
        blocks: impl Iterator<Item = (&'a u64, &'a String)> + Send,
        cancel: &AtomicBool,
    ) -> Result<()> {
        blocks.par_bridge().try_for_each_init(
            || vec![0u8; BLOCK_SIZE],
            |buf, (index, hash)| -> Result<()> {
                ensure!(!cancel.load(Ordering::Relaxed), CancelledSnafu);
                self.read_block(hash, buf)?;
                file.write_all_at(buf, index * BLOCK_SIZE as u64).context(IoSnafu { path })
            },
        )
    }
}

fn remove_if_present(path: &Path) -> Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other.context(IoSnafu { path }),
    }
}

fn sync_filesystem(path: &Path) -> Result<()> {
    let dir = File::open(path).context(IoSnafu { path })?;
    nix::unistd::syncfs(std::os::fd::AsRawFd::as_raw_fd(&dir)).map_err(std::io::Error::from).context(IoSnafu { path })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    const BS: u64 = BLOCK_SIZE as u64;

    fn volume(path: &Path, blocks: u64, writes: &[(u64, u8)]) {
        let file = File::create(path).unwrap();
        file.set_len(blocks * BS).unwrap();
        for &(index, byte) in writes {
            file.write_all_at(&vec![byte; BLOCK_SIZE], index * BS).unwrap();
        }
    }

    fn manifest(id: &str, parent: Option<&str>, size: u64, blocks: BTreeMap<u64, String>) -> SnapshotManifest {
        SnapshotManifest {
            id: id.into(),
            parent: parent.map(Into::into),
            volume_size: size,
            block_size: BLOCK_SIZE,
            created: String::new(),
            description: String::new(),
            changed_blocks: 0,
            stored_bytes: 0,
            tags: BTreeMap::new(),
            blocks,
        }
    }

    #[test]
    fn snapshots_store_only_new_nonzero_blocks_and_count_changes_against_the_parent() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let cancel = AtomicBool::new(false);
        let base_path = dir.path().join("base.raw");
        volume(&base_path, 8, &[(0, 1), (3, 2), (4, 2)]);
        let (base_blocks, changed, stored) =
            store.snapshot_volume(&base_path, None, ChangeHint::None, &cancel, &|_, _| {}).unwrap();
        assert_eq!(base_blocks.len(), 3, "zero blocks are not listed");
        assert_eq!(changed, 3);
        assert_eq!(stored, 2 * BS, "blocks 3 and 4 are identical and stored once");
        let base = manifest("snap-base", None, 8 * BS, base_blocks);

        // Rewrite block 0 with new bytes, zero block 3, write block 7; block 4 is untouched.
        let child_path = dir.path().join("child.raw");
        volume(&child_path, 8, &[(0, 9), (4, 2), (7, 1)]);
        let (blocks, changed, stored) =
            store.snapshot_volume(&child_path, Some(&base), ChangeHint::None, &cancel, &|_, _| {}).unwrap();
        assert_eq!(changed, 3, "blocks 0, 3 and 7 differ from the parent");
        assert_eq!(stored, BS, "only block 0's content is new (block 7 equals the parent's block 0)");
        assert_eq!(blocks.get(&4), base.blocks.get(&4));
        assert!(!blocks.contains_key(&3));

        let child = manifest("snap-child", Some("snap-base"), 8 * BS, blocks);
        let out = dir.path().join("out.raw");
        store.materialize(&child, &out, &cancel).unwrap();
        assert_eq!(fs::read(&out).unwrap(), fs::read(&child_path).unwrap());
        let over = dir.path().join("over.raw");
        store.materialize_over(&child, (&base, &base_path), &over, &cancel).unwrap();
        assert_eq!(fs::read(&over).unwrap(), fs::read(&child_path).unwrap(), "clone + differing blocks");
    }

    #[test]
    fn a_corrupt_block_is_detected_on_read() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let data = vec![7u8; BLOCK_SIZE];
        let hash = hex::encode(Sha256::digest(&data));
        store.put_block(&hash, &data).unwrap();
        let path = store.block_path(&hash);
        File::options().write(true).open(&path).unwrap().write_all_at(b"x", 10).unwrap();
        let mut buf = vec![0u8; BLOCK_SIZE];
        assert!(matches!(store.read_block(&hash, &mut buf), Err(Error::CorruptBlock { .. })));
    }

    #[test]
    fn cancelling_stops_a_snapshot() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let path = dir.path().join("v.raw");
        volume(&path, 4, &[(0, 1), (1, 2)]);
        let cancel = AtomicBool::new(true);
        let result = store.snapshot_volume(&path, None, ChangeHint::None, &cancel, &|_, _| {});
        assert!(matches!(result, Err(Error::Cancelled)));
    }
}

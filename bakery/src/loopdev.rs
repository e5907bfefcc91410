//! Loop devices and their partition nodes. This host's kernel has no partition-table parsers
//! (`losetup -P` creates no pN nodes), so partitions are added with `partx -a`; where the kernel
//! did create them, they are used as they are.

use crate::command;
use snafu::{ResultExt, Snafu};
use std::fs;
use std::path::{Path, PathBuf};

#[derive(Debug, Snafu)]
pub enum Error {
    #[snafu(display("attaching {} to a loop device failed: {source}", file.display()))]
    Attach { file: PathBuf, source: command::Error },

    #[snafu(display("detaching {} failed: {source}", device.display()))]
    Detach { device: PathBuf, source: command::Error },

    #[snafu(display("adding partition nodes for {} failed: {source}", device.display()))]
    Partitions { device: PathBuf, source: command::Error },

    #[snafu(display("partition {number} of {} did not appear at {}", device.display(), node.display()))]
    NoPartitionNode { device: PathBuf, number: u32, node: PathBuf },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Attaches `file` to a free loop device and returns the device.
pub fn attach(file: &Path, read_only: bool) -> Result<PathBuf> {
    let mut args = vec!["--find", "--show"];
    if read_only {
        args.push("--read-only");
    }
    let file_arg = file.to_string_lossy();
    args.push(&file_arg);
    let out = command::run("losetup", &args).context(AttachSnafu { file })?;
    Ok(PathBuf::from(out.trim()))
}

/// The file backing a loop device, if it is attached.
pub fn backing_file(device: &Path) -> Option<PathBuf> {
    let name = device.file_name()?.to_string_lossy().into_owned();
    let text = fs::read_to_string(format!("/sys/block/{name}/loop/backing_file")).ok()?;
    Some(PathBuf::from(text.trim_end().trim_end_matches(" (deleted)")))
}

/// Detaches `device` if, and only if, it is still backed by `file`: a device number can be
/// reused by another process as soon as it is free, and that one must not be touched.
pub fn detach_if_backed_by(device: &Path, file: &Path) -> Result<()> {
    if backing_file(device).as_deref() != Some(file) {
        return Ok(());
    }
    remove_partition_nodes(device)?;
    command::run("losetup", ["--detach".as_ref(), device.as_os_str()]).context(DetachSnafu { device })?;
    Ok(())
}

/// Every attached loop device with its backing file.
pub fn list() -> Vec<(PathBuf, PathBuf)> {
    let Ok(entries) = fs::read_dir("/sys/block") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|entry| {
            let name = entry.file_name().to_string_lossy().into_owned();
            let device = PathBuf::from("/dev").join(&name);
            name.starts_with("loop").then(|| backing_file(&device).map(|file| (device, file)))?
        })
        .collect()
}

/// The device node for partition `number` of `disk`: `/dev/loop0p2`, `/dev/nvme1n1p2`, `/dev/xvdf2`.
pub fn partition_node(disk: &Path, number: u32) -> PathBuf {
    let name = disk.to_string_lossy();
    if name.ends_with(|c: char| c.is_ascii_digit()) {
        PathBuf::from(format!("{name}p{number}"))
    } else {
        PathBuf::from(format!("{name}{number}"))
    }
}

/// Makes sure partition `number`'s node exists; returns it and whether this call added the
/// partitions (and so must remove them).
pub fn ensure_partition_node(disk: &Path, number: u32) -> Result<(PathBuf, bool)> {
    let node = partition_node(disk, number);
    if node.exists() {
        return Ok((node, false));
    }
    command::run("partx", ["--add".as_ref(), disk.as_os_str()]).context(PartitionsSnafu { device: disk })?;
    // devtmpfs creates the node as the kernel registers the partition; give it a moment.
    for _ in 0..50 {
        if node.exists() {
            return Ok((node, true));
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    NoPartitionNodeSnafu { device: disk, number, node }.fail()
}

/// Removes the partitions `partx --add` registered; nothing to do when there are none.
pub fn remove_partition_nodes(disk: &Path) -> Result<()> {
    let name = disk.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let has_partitions = fs::read_dir(format!("/sys/block/{name}"))
        .map(|entries| entries.flatten().any(|e| e.file_name().to_string_lossy().starts_with(&name)))
        .unwrap_or(false);
    if has_partitions {
        command::run("partx", ["--delete".as_ref(), disk.as_os_str()]).context(PartitionsSnafu { device: disk })?;
    }
    Ok(())
}

/// Attaches the byte range `[offset, offset + size)` of `file` read-only: one partition of a
/// disk image, with no need for partition nodes.
pub fn attach_partition_read_only(file: &Path, offset: u64, size: u64) -> Result<PathBuf> {
    let (offset, size) = (offset.to_string(), size.to_string());
    let mut args: Vec<&std::ffi::OsStr> =
        ["--find", "--show", "--read-only", "--offset", &offset, "--sizelimit", &size]
            .into_iter()
            .map(std::ffi::OsStr::new)
            .collect();
    args.push(file.as_os_str());
    let out = command::run("losetup", &args).context(AttachSnafu { file })?;
    Ok(PathBuf::from(out.trim()))
}

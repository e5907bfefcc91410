//! The bake journal: every resource a bake creates is recorded here before or right after it
//! is created, so that it can be undone in reverse order when the bake fails or is interrupted,
//! and by `bakery gc` when the process died without undoing (SIGKILL, power loss).
//!
//! A running bake holds an exclusive `flock` on its lock file for its whole life; the kernel
//! drops it when the process dies, so a lock that can be taken marks a dead bake, whatever
//! has happened to its pid since.
//!
//! Some resources must outlive the process that creates them (a launcher's instances and
//! balancers): their journal is *handed over* to the process it started, and is live for as long
//! as that process (pid and start time) runs. Whoever stops them early adopts the journal (takes
//! its lock) and unwinds it; `gc` reclaims the journal once the process is gone.

use crate::mounts;
use crate::process::Identity;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use snafu::{ResultExt, Snafu};
use std::fs::{self, File, OpenOptions};
use std::path::{Path, PathBuf};

#[derive(Debug, Snafu)]
pub enum Error {
    #[snafu(display("journal I/O on {}: {source}", path.display()))]
    Io { path: PathBuf, source: std::io::Error },

    #[snafu(display("could not lock journal {}: {source}", path.display()))]
    Lock { path: PathBuf, source: nix::Error },

    #[snafu(display("journal {} is unreadable: {source}", path.display()))]
    Parse { path: PathBuf, source: serde_json::Error },

    #[snafu(display("undoing {resource}: {source}"))]
    Release { resource: String, source: UndoError },
}

pub type Result<T> = std::result::Result<T, Error>;

pub type UndoError = Box<dyn std::error::Error + Send + Sync>;
pub type UndoResult = std::result::Result<(), UndoError>;

/// What the journal needs from a cloud to undo what a transaction created there. Host
/// resources (mounts, loop devices, files, processes) release themselves. Each call succeeds
/// when the resource is already gone.
pub trait Undo {
    fn delete_volume(&self, id: &str) -> UndoResult;
    fn detach_volume(&self, volume: &str, device: &Path) -> UndoResult;
    fn delete_snapshot(&self, id: &str) -> UndoResult;
    fn delete_image(&self, id: &str) -> UndoResult;
}

/// The undo of journals that hold host resources only (instances, balancers): no provider is
/// needed to stop them, and a cloud resource in such a journal is an error.
pub struct HostOnly;

impl HostOnly {
    fn refuse(what: &str, id: &str) -> UndoResult {
        Err(format!("{what} {id} is a cloud resource; run `bakery gc` with its provider").into())
    }
}

impl Undo for HostOnly {
    fn delete_volume(&self, id: &str) -> UndoResult {
        Self::refuse("volume", id)
    }
    fn detach_volume(&self, volume: &str, _device: &Path) -> UndoResult {
        Self::refuse("attachment of", volume)
    }
    fn delete_snapshot(&self, id: &str) -> UndoResult {
        Self::refuse("snapshot", id)
    }
    fn delete_image(&self, id: &str) -> UndoResult {
        Self::refuse("image", id)
    }
}

/// Something a bake created that must not outlive a failed bake.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Resource {
    Volume {
        id: String,
    },
    Attachment {
        volume: String,
        device: PathBuf,
    },
    PartitionNodes {
        device: PathBuf,
    },
    Mount {
        path: PathBuf,
    },
    File {
        path: PathBuf,
    },
    Dir {
        path: PathBuf,
    },
    Snapshot {
        id: String,
    },
    Image {
        id: String,
    },
    /// A loop device on a file that is not a volume (an instance's read-only root).
    LoopDevice {
        device: PathBuf,
        file: PathBuf,
    },
    /// A process, identified by pid and start time so that a reused pid is never signalled.
    Process {
        pid: i32,
        start_time: u64,
    },
}

impl std::fmt::Display for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Resource::Volume { id } => write!(f, "volume {id}"),
            Resource::Attachment { volume, device } => write!(f, "attachment of {volume} at {}", device.display()),
            Resource::PartitionNodes { device } => write!(f, "partition nodes of {}", device.display()),
            Resource::Mount { path } => write!(f, "mount {}", path.display()),
            Resource::File { path } => write!(f, "file {}", path.display()),
            Resource::Dir { path } => write!(f, "directory {}", path.display()),
            Resource::Snapshot { id } => write!(f, "snapshot {id}"),
            Resource::Image { id } => write!(f, "image {id}"),
            Resource::LoopDevice { device, file } => write!(f, "loop device {} ({})", device.display(), file.display()),
            Resource::Process { pid, .. } => write!(f, "process {pid}"),
        }
    }
}

impl Resource {
    /// Whether this resource is `path`, or holds it (a directory it lies in, a loop device's
    /// backing file): what a sweep must spare while the resource's journal is live.
    pub fn holds(&self, path: &Path) -> bool {
        match self {
            Resource::Mount { path: p } | Resource::File { path: p } => p == path,
            Resource::Dir { path: p } => path.starts_with(p),
            Resource::LoopDevice { device, file } => device == path || file == path,
            _ => false,
        }
    }

    /// Whether undoing it needs a cloud (a provider) rather than this host alone.
    pub fn is_cloud(&self) -> bool {
        matches!(
            self,
            Resource::Volume { .. } | Resource::Attachment { .. } | Resource::Snapshot { .. } | Resource::Image { .. }
        )
    }

    /// Undoes the resource; succeeds when it is already gone.
    pub fn release(&self, cloud: &(impl Undo + ?Sized)) -> UndoResult {
        match self {
            Resource::Volume { id } => cloud.delete_volume(id),
            Resource::Attachment { volume, device } => cloud.detach_volume(volume, device),
            Resource::PartitionNodes { device } => Ok(crate::loopdev::remove_partition_nodes(device)?),
            Resource::Mount { path } => {
                mounts::unmount_tree(path)?;
                remove(path, |p| fs::remove_dir(p))
            }
            Resource::File { path } => remove(path, |p| fs::remove_file(p)),
            Resource::Dir { path } => {
                // Never let a recursive delete walk into something still mounted below it
                // (a builder's bind mount of the host's /dev, say).
                mounts::unmount_tree(path)?;
                remove(path, |p| fs::remove_dir_all(p))
            }
            Resource::Snapshot { id } => cloud.delete_snapshot(id),
            Resource::Image { id } => cloud.delete_image(id),
            Resource::LoopDevice { device, file } => Ok(crate::loopdev::detach_if_backed_by(device, file)?),
            Resource::Process { pid, start_time } => {
                crate::process::stop(*pid, *start_time);
                Ok(())
            }
        }
    }
}

fn remove(path: &Path, op: fn(&Path) -> std::io::Result<()>) -> UndoResult {
    match op(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(Box::new(e)),
        _ => Ok(()),
    }
}

/// What is on disk for one bake (or base build).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    pub pid: u32,
    pub started: String,
    pub what: String,
    pub provider: String,
    pub resources: Vec<Resource>,
    /// Once handed over: the process whose life is the journal's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub held_by: Option<Identity>,
}

/// An open journal, owned by the running bake.
pub struct Journal {
    path: PathBuf,
    lock_path: PathBuf,
    _lock: Flock<File>,
    _sweep_guard: Flock<File>,
    record: Record,
}

pub(crate) fn journal_dir(state_dir: &Path) -> PathBuf {
    state_dir.join("journal")
}

impl Journal {
    /// Starts a journal for a new bake and locks it for the life of this process.
    pub fn begin(state_dir: &Path, id: &str, what: &str, provider: &str) -> Result<Journal> {
        let dir = journal_dir(state_dir);
        fs::create_dir_all(&dir).context(IoSnafu { path: &dir })?;
        let sweep_guard = lock_sweep(state_dir, FlockArg::LockShared)?;
        let lock_path = dir.join(format!("{id}.lock"));
        let lock_file = File::create(&lock_path).context(IoSnafu { path: &lock_path })?;
        let lock = Flock::lock(lock_file, FlockArg::LockExclusiveNonblock)
            .map_err(|(_, errno)| errno)
            .context(LockSnafu { path: &lock_path })?;
        let journal = Journal {
            path: dir.join(format!("{id}.json")),
            lock_path,
            _lock: lock,
            _sweep_guard: sweep_guard,
            record: Record {
                id: id.to_string(),
                pid: std::process::id(),
                started: crate::ids::now_rfc3339(),
                what: what.to_string(),
                provider: provider.to_string(),
                resources: Vec::new(),
                held_by: None,
            },
        };
        journal.save()?;
        Ok(journal)
    }

    /// Reopens a journal by id for whoever will unwind it, waiting for its current holder;
    /// None when it is gone (unwound or reclaimed meanwhile).
    pub fn adopt(state_dir: &Path, id: &str) -> Result<Option<Journal>> {
        let sweep_guard = lock_sweep(state_dir, FlockArg::LockShared)?;
        let dir = journal_dir(state_dir);
        let lock_path = dir.join(format!("{id}.lock"));
        let lock_file = match OpenOptions::new().write(true).open(&lock_path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            other => other.context(IoSnafu { path: &lock_path })?,
        };
        let lock = Flock::lock(lock_file, FlockArg::LockExclusive)
            .map_err(|(_, errno)| errno)
            .context(LockSnafu { path: &lock_path })?;
        let path = dir.join(format!("{id}.json"));
        let record = match fs::read(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            other => {
                serde_json::from_slice(&other.context(IoSnafu { path: &path })?).context(ParseSnafu { path: &path })?
            }
        };
        Ok(Some(Journal { path, lock_path, _lock: lock, _sweep_guard: sweep_guard, record }))
    }

    /// Gives the journal to `process`: it stays live, with every resource in it, for as long
    /// as that process runs, after this one has exited.
    pub fn hand_over(mut self, process: Identity) -> Result<()> {
        self.record.held_by = Some(process);
        self.save()
        // Dropping the journal releases its lock; the lock file stays for `adopt` and `census`.
    }

    pub fn id(&self) -> &str {
        &self.record.id
    }

    fn save(&self) -> Result<()> {
        let json = serde_json::to_vec_pretty(&self.record).expect("records serialise");
        crate::atomic::write(&self.path, &json).context(IoSnafu { path: &self.path })
    }

    /// Records a resource; from now on a failure undoes it.
    pub fn push(&mut self, resource: Resource) -> Result<()> {
        tracing::debug!(%resource, "journal: created");
        self.record.resources.push(resource);
        self.save()
    }

    /// Keeps a resource past the bake's end (the registered image and its snapshot).
    pub fn keep(&mut self, resource: &Resource) -> Result<()> {
        self.record.resources.retain(|r| r != resource);
        self.save()
    }

    /// Undoes resources newest first until `stop` matches one (which stays), stopping at the
    /// first failure so that nothing is released while something above it still holds it.
    pub fn unwind_until(&mut self, cloud: &(impl Undo + ?Sized), stop: impl Fn(&Resource) -> bool) -> Result<()> {
        while let Some(resource) = self.record.resources.last().cloned() {
            if stop(&resource) {
                break;
            }
            tracing::debug!(%resource, "journal: undoing");
            resource.release(cloud).context(ReleaseSnafu { resource: resource.to_string() })?;
            self.record.resources.pop();
            self.save()?;
        }
        Ok(())
    }

    /// Undoes everything and removes the journal. On a failure the journal stays for `gc`.
    pub fn unwind_all(mut self, cloud: &(impl Undo + ?Sized)) -> Result<()> {
        self.unwind_until(cloud, |_| false)?;
        self.finish()
    }

    /// Removes the journal of a bake whose remaining resources are all kept.
    pub fn finish(self) -> Result<()> {
        fs::remove_file(&self.path).context(IoSnafu { path: &self.path })?;
        // The lock file goes last: while it exists and is locked, gc treats the bake as live.
        fs::remove_file(&self.lock_path).context(IoSnafu { path: &self.lock_path })
    }
}

/// Every running journal holds this lock shared; `gc` sweeps orphans only while it holds it
/// exclusively, so no bake can start (and store blocks or create a volume) mid-sweep.
fn lock_sweep(state_dir: &Path, how: FlockArg) -> Result<Flock<File>> {
    let dir = journal_dir(state_dir);
    fs::create_dir_all(&dir).context(IoSnafu { path: &dir })?;
    let path = dir.join("gc.lock");
    let file = OpenOptions::new().create(true).truncate(false).write(true).open(&path);
    let file = file.context(IoSnafu { path: &path })?;
    Flock::lock(file, how).map_err(|(_, errno)| errno).context(LockSnafu { path })
}

/// The exclusive sweep lock, or None while any bake, build or verification runs.
pub fn try_lock_sweep(state_dir: &Path) -> Result<Option<Flock<File>>> {
    match lock_sweep(state_dir, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(Some(lock)),
        Err(Error::Lock { source: nix::errno::Errno::EWOULDBLOCK, .. }) => Ok(None),
        Err(other) => Err(other),
    }
}

/// Journals on disk, split into those of live processes and those of dead ones. A dead one
/// comes with its lock, so that nobody adopts it while it is being reclaimed.
pub struct Census {
    pub live: Vec<Record>,
    pub dead: Vec<(Record, PathBuf, Flock<File>)>,
}

/// Reads every journal and tells live ones from dead ones: a journal is live while its lock is
/// held or while the process it was handed over to runs.
pub fn census(state_dir: &Path) -> Result<Census> {
    let dir = journal_dir(state_dir);
    let mut census = Census { live: Vec::new(), dead: Vec::new() };
    let entries = match fs::read_dir(&dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(census),
        other => other.context(IoSnafu { path: &dir })?,
    };
    for entry in entries {
        let path = entry.context(IoSnafu { path: &dir })?.path();
        if path.extension().is_none_or(|ext| ext != "json")
            || path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.'))
        {
            continue;
        }
        let bytes = match fs::read(&path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // finished meanwhile
            other => other.context(IoSnafu { path: &path })?,
        };
        let record: Record = serde_json::from_slice(&bytes).context(ParseSnafu { path: &path })?;
        let lock_path = path.with_extension("lock");
        // Never create the lock: a missing one means the bake just finished.
        let lock_file = match OpenOptions::new().write(true).open(&lock_path) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            other => other.context(IoSnafu { path: &lock_path })?,
        };
        match Flock::lock(lock_file, FlockArg::LockExclusiveNonblock) {
            Ok(lock) => {
                // Re-read under the lock: the record may have grown, been handed over or gone since.
                let record: Record = match fs::read(&path) {
                    Ok(bytes) => serde_json::from_slice(&bytes).context(ParseSnafu { path: &path })?,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                    Err(source) => return Err(Error::Io { path, source }),
                };
                match record.held_by {
                    Some(process) if process.is_running() => census.live.push(record),
                    _ => census.dead.push((record, path, lock)),
                }
            }
            Err(_) => census.live.push(record),
        }
    }
    Ok(census)
}

/// Undoes a dead bake's resources in reverse order and removes its journal.
pub fn reclaim(cloud: &(impl Undo + ?Sized), record: &Record, path: &Path) -> Result<()> {
    for resource in record.resources.iter().rev() {
        resource.release(cloud).context(ReleaseSnafu { resource: resource.to_string() })?;
    }
    // A bake killed while saving its journal left a temporary copy beside it.
    crate::atomic::remove_leftovers(path).context(IoSnafu { path })?;
    match fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e).context(IoSnafu { path }),
        _ => {}
    }
    let lock_path = path.with_extension("lock");
    match fs::remove_file(&lock_path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e).context(IoSnafu { path: lock_path }),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn census_ids(state_dir: &Path) -> (Vec<String>, Vec<String>) {
        let census = census(state_dir).unwrap();
        let ids = |records: Vec<&Record>| records.into_iter().map(|r| r.id.clone()).collect();
        (ids(census.live.iter().collect()), ids(census.dead.iter().map(|(r, _, _)| r).collect()))
    }

    #[test]
    fn a_handed_over_journal_lives_as_long_as_its_process() {
        let state = tempfile::tempdir().unwrap();
        let file = state.path().join("held");
        fs::write(&file, b"").unwrap();
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let process = Identity::of(child.id() as i32).unwrap();
        let mut journal = Journal::begin(state.path(), "j", "test", "local").unwrap();
        journal.push(Resource::File { path: file.clone() }).unwrap();
        journal.hand_over(process).unwrap();
        assert_eq!(census_ids(state.path()), (vec!["j".to_string()], vec![]), "live while the process runs");

        let adopted = Journal::adopt(state.path(), "j").unwrap().expect("still there");
        assert_eq!(census_ids(state.path()).0, ["j"], "live while adopted");
        drop(adopted);

        crate::process::stop_within(process.pid, process.start_time, std::time::Duration::from_secs(5));
        let _ = child.wait();
        let census = census(state.path()).unwrap();
        let (record, path, _lock) = &census.dead[0];
        reclaim(&HostOnly, record, path).unwrap();
        assert!(!file.exists(), "reclaimed once its process is gone");
        assert!(Journal::adopt(state.path(), "j").unwrap().is_none());
    }

    #[test]
    fn reclaiming_a_journal_removes_what_its_killed_writer_left_mid_save() {
        let state = tempfile::tempdir().unwrap();
        drop(Journal::begin(state.path(), "k", "test", "local").unwrap());
        let dir = journal_dir(state.path());
        let torn = dir.join(".k.json.tmp-0123456789abcdef0");
        let other = dir.join(".kk.json.tmp-0123456789abcdef0");
        fs::write(&torn, b"{").unwrap();
        fs::write(&other, b"{").unwrap();
        assert!(crate::atomic::is_temporary(&torn) && !crate::atomic::is_temporary(&dir.join("k.json")));

        let census = census(state.path()).unwrap();
        let (record, path, _lock) = &census.dead[0];
        reclaim(&HostOnly, record, path).unwrap();
        assert!(!torn.exists(), "the dead writer's temporary copy is gone");
        assert!(other.exists(), "another journal's file stays");
        assert!(!path.exists());
    }
}

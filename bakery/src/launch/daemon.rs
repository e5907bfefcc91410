//! Helper processes that outlive the launcher (a cluster's HAProxy, the service registry).
//!
//! Each one's life is a handed-over journal (journal.rs): the files it makes are journaled before
//! it starts, then its process, then the journal is handed over to that process, so `bakery gc`
//! spares it while it runs and reclaims its files once it is gone. The journal's id is known
//! before the process starts, so a caller can record it first: a launcher that dies mid-start
//! leaves nothing the next start misses. Stopping one is adopting its journal and unwinding it.

use crate::journal::{self, HostOnly, Journal, Resource};
use crate::process::Identity;
use snafu::{ResultExt, Snafu};
use std::path::{Path, PathBuf};

#[derive(Debug, Snafu)]
pub enum Error {
    #[snafu(display("the journal of {what}: {source}"))]
    Journal { what: String, source: journal::Error },

    #[snafu(display("starting {what}: {source}"))]
    Spawn { what: String, source: Box<dyn std::error::Error + Send + Sync> },
}

pub type Result<T> = std::result::Result<T, Error>;

/// A helper about to start: its journal is open, and its id may be recorded.
pub struct Starting {
    journal: Journal,
    what: String,
}

/// Opens the journal of a new helper (`what` names it in messages and in `bakery gc`).
pub fn begin(state_dir: &Path, kind: &str, what: &str) -> Result<Starting> {
    let id = crate::ids::new_id(kind);
    let journal = Journal::begin(state_dir, &id, what, "local").context(JournalSnafu { what })?;
    Ok(Starting { journal, what: what.to_string() })
}

impl Starting {
    pub fn id(&self) -> &str {
        self.journal.id()
    }

    /// Journals `files`, runs `spawn`, journals the process it returns and hands the journal
    /// over to it. On failure everything journaled is undone.
    pub fn launch<E>(
        mut self,
        files: &[PathBuf],
        spawn: impl FnOnce() -> std::result::Result<Identity, E>,
    ) -> Result<Identity>
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        let what = self.what.clone();
        let started = (|| {
            for path in files {
                self.journal.push(Resource::File { path: path.clone() }).context(JournalSnafu { what: &what })?;
            }
            let process = spawn().map_err(|e| Error::Spawn { what: what.clone(), source: Box::new(e) })?;
            let resource = Resource::Process { pid: process.pid, start_time: process.start_time };
            if let Err(source) = self.journal.push(resource) {
                // Not journaled, so nothing else would ever stop it.
                crate::process::stop(process.pid, process.start_time);
                return Err(Error::Journal { what: what.clone(), source });
            }
            Ok(process)
        })();
        match started {
            Ok(process) => {
                self.journal.hand_over(process).context(JournalSnafu { what: &what })?;
                Ok(process)
            }
            Err(error) => {
                if let Err(undo) = self.journal.unwind_all(&HostOnly) {
                    tracing::error!(%undo, "could not undo a failed start of {what}; `bakery gc` will");
                }
                Err(error)
            }
        }
    }
}

/// Spawns `command` as a helper that outlives the caller: in its own process group (a Ctrl-C at
/// the caller's terminal does not reach it), reaped whenever it exits while the caller lives (a
/// command that exits first leaves it to init). For [`Starting::launch`]'s `spawn`.
pub fn spawn_detached(mut command: std::process::Command) -> std::io::Result<Identity> {
    std::os::unix::process::CommandExt::process_group(&mut command, 0);
    let mut child = command.spawn()?;
    let process = Identity::of(child.id() as i32);
    std::thread::spawn(move || child.wait());
    process.ok_or_else(|| std::io::Error::other(format!("{:?} exited at once", command.get_program())))
}

/// Stops the helper whose journal is `journal` and removes its files; nothing to do when it is
/// gone already.
pub fn stop(state_dir: &Path, journal: &str) -> std::result::Result<(), journal::Error> {
    match Journal::adopt(state_dir, journal)? {
        Some(journal) => journal.unwind_all(&HostOnly),
        None => Ok(()),
    }
}

//! The one transaction runner, for bake, base build and push alike (after Packer's step
//! runner): named steps run in order over a context; each records what it creates in the
//! journal before or right after creating it; cancellation is checked around every step; on a
//! failure or an interruption the journal is unwound newest first. A failed undo is reported
//! the same way everywhere: the original error, plus the cleanup error and that `bakery gc`
//! will finish it (the journal stays on disk for it).

use crate::events::{Event, Sink, Unit};
use crate::journal::{self, Journal, Resource};
use crate::provider::{Image, Provider, SnapshotResult};
use snafu::Snafu;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// Why a step failed, classified by the step (not by looking at the error's type).
#[derive(Debug)]
pub struct StepError {
    pub kind: Kind,
    pub source: crate::provider::Error,
}

/// What kind of failure: decides the exit status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Caused by what the user handed in (recipe, package, checksum, failing recipe command).
    Input,
    Other,
}

impl StepError {
    pub fn input(source: impl Into<crate::provider::Error>) -> StepError {
        StepError { kind: Kind::Input, source: source.into() }
    }
}

impl<E: Into<crate::provider::Error>> From<E> for StepError {
    fn from(source: E) -> StepError {
        StepError { kind: Kind::Other, source: source.into() }
    }
}

pub type StepResult = std::result::Result<(), StepError>;

#[derive(Debug, Snafu)]
pub enum Error {
    #[snafu(display("the journal: {source}"))]
    Journal { source: journal::Error },

    #[snafu(display("{step}: {source}"))]
    Step { step: &'static str, kind: Kind, source: crate::provider::Error },

    #[snafu(display("interrupted during {step}; everything it created was removed"))]
    Interrupted { step: &'static str },

    #[snafu(display("{source}\ncleanup also failed, `bakery gc` will finish it: {cleanup}"))]
    CleanupFailed { source: Box<Error>, cleanup: journal::Error },
}

impl Error {
    /// Exit status: 3 bad input, 130 interrupted, 1 anything else.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Step { kind: Kind::Input, .. } => 3,
            Error::Interrupted { .. } => 130,
            Error::CleanupFailed { source, .. } => source.exit_code(),
            _ => 1,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// A step: a name people read, and what it does to the context `C`.
pub struct Step<C> {
    pub name: &'static str,
    pub run: fn(&mut C, &mut Tx) -> StepResult,
}

/// What a running step may use besides its context: the journal, cancellation and events.
pub struct Tx<'a> {
    pub journal: Journal,
    /// The provider the transaction creates things in (and undoes them with).
    pub provider: &'a dyn Provider,
    pub cancel: &'a AtomicBool,
    events: &'a dyn Sink,
    step: &'static str,
}

impl<'a> Tx<'a> {
    /// Records a resource the step created: from now on a failure undoes it.
    pub fn created(&mut self, resource: Resource) -> StepResult {
        Ok(self.journal.push(resource)?)
    }

    /// A progress callback for the running step.
    pub fn progress(&self, unit: Unit) -> impl Fn(u64, u64) + Sync + 'a {
        let (events, step) = (self.events, self.step);
        move |done, total| events.emit(&Event::Progress { step: step.to_string(), unit, done, total })
    }

    pub fn journal_id(&self) -> &str {
        self.journal.id()
    }
}

/// What a transaction that registers an image keeps: the image and its snapshot (a volume,
/// scratch files and mounts do not outlive it).
pub fn image_and_snapshot(image: &Option<Image>, snapshot: &Option<SnapshotResult>) -> Vec<Resource> {
    let image = image.as_ref().map(|i| Resource::Image { id: i.id.clone() });
    let snapshot = snapshot.as_ref().map(|s| Resource::Snapshot { id: s.id.clone() });
    image.into_iter().chain(snapshot).collect()
}

/// Runs `steps` over `context` in a new journal; on success keeps what `kept` names (the
/// image and its snapshot) and undoes the rest (scratch, volumes), on failure undoes all.
#[allow(clippy::too_many_arguments)]
pub fn run<C>(
    state_dir: &std::path::Path,
    id: &str,
    what: &str,
    provider: &dyn Provider,
    cancel: &AtomicBool,
    events: &dyn Sink,
    context: &mut C,
    steps: &[Step<C>],
    kept: impl FnOnce(&C) -> Vec<Resource>,
) -> Result<()> {
    let journal = Journal::begin(state_dir, id, what, provider.kind()).map_err(|source| Error::Journal { source })?;
    let mut tx = Tx { journal, provider, cancel, events, step: "" };
    if let Err(error) = run_steps(&mut tx, context, steps) {
        return Err(match tx.journal.unwind_all(provider) {
            Ok(()) => error,
            Err(cleanup) => {
                tracing::error!(%cleanup, "undoing what the failed {what} created failed; run `bakery gc`");
                Error::CleanupFailed { source: Box::new(error), cleanup }
            }
        });
    }
    let mut journal = tx.journal;
    for resource in kept(context) {
        journal.keep(&resource).map_err(|source| Error::Journal { source })?;
    }
    // What is kept is done: a scratch resource that will not go is gc's, not a failure (a
    // retry would make the image again).
    if let Err(cleanup) = journal.unwind_all(provider) {
        tracing::warn!(%cleanup, "{what} succeeded but cleaning up after it failed; `bakery gc` will finish it");
    }
    Ok(())
}

fn run_steps<C>(tx: &mut Tx, context: &mut C, steps: &[Step<C>]) -> Result<()> {
    let total = steps.len();
    for (index, step) in steps.iter().enumerate() {
        let number = index + 1;
        if tx.cancel.load(Ordering::Relaxed) {
            return InterruptedSnafu { step: step.name }.fail();
        }
        tx.step = step.name;
        tx.events.emit(&Event::StepStarted { step: step.name.to_string(), number, total });
        let started = Instant::now();
        let result = (step.run)(context, tx);
        let duration_ms = started.elapsed().as_millis() as u64;
        let ok = result.is_ok() && !tx.cancel.load(Ordering::Relaxed);
        tx.events.emit(&Event::StepFinished { step: step.name.to_string(), number, total, duration_ms, ok });
        // Ctrl-C during a step surfaces as that step's error: report it as an interruption.
        if tx.cancel.load(Ordering::Relaxed) {
            return InterruptedSnafu { step: step.name }.fail();
        }
        result.map_err(|e| Error::Step { step: step.name, kind: e.kind, source: e.source })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Recorder;
    use crate::provider::{GcReport, ImageRegistry, ImageRequest, VolumeBackend};
    use std::collections::{BTreeMap, BTreeSet};
    use std::path::{Path, PathBuf};
    use std::sync::Mutex;

    /// A cloud that only logs what is undone, and fails the undo of one named resource.
    #[derive(Default)]
    struct Ledger {
        undone: Mutex<Vec<String>>,
        fail_undo_of: Option<String>,
    }

    impl Ledger {
        fn undo(&self, what: String) -> crate::provider::Result<()> {
            if self.fail_undo_of.as_deref() == Some(what.as_str()) {
                return Err(format!("{what} is stuck").into());
            }
            self.undone.lock().unwrap().push(what);
            Ok(())
        }
        fn undone(&self) -> Vec<String> {
            self.undone.lock().unwrap().clone()
        }
    }

    impl ImageRegistry for Ledger {
        fn find_image(&self, _: &str) -> crate::provider::Result<Option<Image>> {
            Ok(None)
        }
        fn images_tagged(&self, _: &str, _: &str) -> crate::provider::Result<Vec<Image>> {
            Ok(vec![])
        }
        fn list_images(&self) -> crate::provider::Result<Vec<Image>> {
            Ok(vec![])
        }
        fn register_image(&self, _: &ImageRequest) -> crate::provider::Result<Image> {
            unreachable!()
        }
        fn tag_image(&self, _: &str, _: &BTreeMap<String, String>) -> crate::provider::Result<()> {
            Ok(())
        }
        fn deregister_image(&self, id: &str) -> crate::provider::Result<Option<Image>> {
            self.undo(format!("image {id}")).map(|()| None)
        }
    }

    impl VolumeBackend for Ledger {
        fn create_volume(&self, _: &str, _: &str) -> crate::provider::Result<String> {
            unreachable!()
        }
        fn attach_volume(&self, _: &str) -> crate::provider::Result<PathBuf> {
            unreachable!()
        }
        fn detach_volume(&self, volume: &str, _: &Path) -> crate::provider::Result<()> {
            self.undo(format!("attachment {volume}"))
        }
        fn delete_volume(&self, id: &str) -> crate::provider::Result<()> {
            self.undo(format!("volume {id}"))
        }
        fn snapshot_volume(
            &self,
            _: &str,
            _: Option<&str>,
            _: &str,
            _: &AtomicBool,
            _: crate::provider::Progress,
        ) -> crate::provider::Result<crate::provider::SnapshotResult> {
            unreachable!()
        }
        fn import_disk(
            &self,
            _: &Path,
            _: &str,
            _: &AtomicBool,
            _: crate::provider::Progress,
        ) -> crate::provider::Result<crate::provider::SnapshotResult> {
            unreachable!()
        }
        fn delete_snapshot(&self, id: &str) -> crate::provider::Result<()> {
            self.undo(format!("snapshot {id}"))
        }
        fn export_snapshot(&self, _: &str, _: &Path, _: &AtomicBool) -> crate::provider::Result<()> {
            unreachable!()
        }
        fn collect_garbage(&self, _: bool, _: &[Resource], _: &BTreeSet<String>) -> crate::provider::Result<GcReport> {
            unreachable!()
        }
    }

    impl Provider for Ledger {
        fn kind(&self) -> &'static str {
            "ledger"
        }
        fn images(&self) -> &dyn ImageRegistry {
            self
        }
        fn volumes(&self) -> &dyn VolumeBackend {
            self
        }
    }

    /// Each step creates one resource; the step numbered `fail_at` fails after creating its own.
    struct Context {
        fail_at: Option<usize>,
        fail_as: Kind,
        ran: usize,
    }

    fn create(context: &mut Context, tx: &mut Tx, resource: Resource) -> StepResult {
        context.ran += 1;
        tx.created(resource)?;
        match context.fail_at == Some(context.ran) {
            true => Err(StepError { kind: context.fail_as, source: format!("step {} broke", context.ran).into() }),
            false => Ok(()),
        }
    }

    const STEPS: &[Step<Context>] = &[
        Step { name: "volume", run: |c, tx| create(c, tx, Resource::Volume { id: "vol-1".into() }) },
        Step {
            name: "attach",
            run: |c, tx| create(c, tx, Resource::Attachment { volume: "vol-1".into(), device: "/dev/x".into() }),
        },
        Step { name: "snapshot", run: |c, tx| create(c, tx, Resource::Snapshot { id: "snap-1".into() }) },
        Step { name: "register", run: |c, tx| create(c, tx, Resource::Image { id: "ami-1".into() }) },
    ];

    fn kept(_: &Context) -> Vec<Resource> {
        vec![Resource::Image { id: "ami-1".into() }, Resource::Snapshot { id: "snap-1".into() }]
    }

    fn run_with(
        ledger: &Ledger,
        fail_at: Option<usize>,
        fail_as: Kind,
        cancel: &AtomicBool,
    ) -> (Result<()>, Vec<Event>) {
        let state = tempfile::tempdir().unwrap();
        let events = Recorder::default();
        let mut context = Context { fail_at, fail_as, ran: 0 };
        let result = run(state.path(), "t1", "test", ledger, cancel, &events, &mut context, STEPS, kept);
        (result, events.events())
    }

    #[test]
    fn a_failure_at_each_step_unwinds_exactly_what_was_created_newest_first() {
        let created = ["volume vol-1", "attachment vol-1", "snapshot snap-1", "image ami-1"];
        for fail_at in 1..=STEPS.len() {
            let ledger = Ledger::default();
            let (result, events) = run_with(&ledger, Some(fail_at), Kind::Other, &AtomicBool::new(false));
            let error = result.unwrap_err();
            assert_eq!(error.to_string(), format!("{}: step {fail_at} broke", STEPS[fail_at - 1].name));
            assert_eq!(error.exit_code(), 1);
            let expected: Vec<String> = created[..fail_at].iter().rev().map(|s| s.to_string()).collect();
            assert_eq!(ledger.undone(), expected, "failing at step {fail_at}");
            let finished = events.iter().filter(|e| matches!(e, Event::StepFinished { .. })).count();
            assert_eq!(finished, fail_at, "no step runs after the failed one");
        }
    }

    #[test]
    fn success_keeps_the_image_and_snapshot_and_undoes_the_rest() {
        let ledger = Ledger::default();
        let (result, events) = run_with(&ledger, None, Kind::Other, &AtomicBool::new(false));
        result.unwrap();
        assert_eq!(ledger.undone(), ["attachment vol-1", "volume vol-1"]);
        assert_eq!(events[0], Event::StepStarted { step: "volume".into(), number: 1, total: 4 });
        assert!(matches!(&events[7], Event::StepFinished { step, ok: true, number: 4, .. } if step == "register"));
    }

    #[test]
    fn input_errors_exit_3_and_an_interruption_130() {
        let ledger = Ledger::default();
        let (result, _) = run_with(&ledger, Some(2), Kind::Input, &AtomicBool::new(false));
        assert_eq!(result.unwrap_err().exit_code(), 3);
        let ledger = Ledger::default();
        let (result, events) = run_with(&ledger, None, Kind::Other, &AtomicBool::new(true));
        let error = result.unwrap_err();
        assert_eq!(error.exit_code(), 130);
        assert!(events.is_empty(), "nothing starts once cancelled");
        assert!(error.to_string().contains("interrupted during volume"), "{error}");
    }

    #[test]
    fn a_failed_undo_is_reported_with_the_original_error_and_points_at_gc() {
        let ledger = Ledger { fail_undo_of: Some("attachment vol-1".into()), ..Ledger::default() };
        let (result, _) = run_with(&ledger, Some(3), Kind::Input, &AtomicBool::new(false));
        let error = result.unwrap_err();
        let message = error.to_string();
        assert!(
            message.starts_with("snapshot: step 3 broke\ncleanup also failed, `bakery gc` will finish it"),
            "{message}"
        );
        assert!(message.contains("attachment vol-1 is stuck"), "{message}");
        assert_eq!(error.exit_code(), 3, "the original error decides the exit status");
        assert_eq!(ledger.undone(), ["snapshot snap-1"], "unwinding stops at the failed undo");
    }
}

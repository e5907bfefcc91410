//! Deploys, rollbacks and finishes started from the console: each runs the launcher's engine in
//! a thread of its own (the same engine, plans and lock as the command line), its events kept
//! for the page to replay and pushed to whoever follows it. Each action is written to the audit
//! log (`STATE/console/audit.jsonl`) with who asked and from where, when it starts and when it
//! ends.

use super::auth::Viewer;
use crate::events::{Event, Sink};
use crate::ids::unix_now as now;
use crate::launch::cloud::{Cloud, DeployRecord};
use crate::launch::engine::{Engine, Identity, SystemClock};
use crate::launch::plan::DeployRequest;
use serde::Serialize;
use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Finished actions kept for their pages.
const KEPT: usize = 100;

#[derive(Clone, Debug)]
pub enum Request {
    Deploy(Box<DeployRequest>),
    Rollback { health_timeout_secs: u64 },
    Finish { soak_secs: u64 },
}

impl Request {
    pub fn name(&self) -> &'static str {
        match self {
            Request::Deploy(_) => "deploy",
            Request::Rollback { .. } => "rollback",
            Request::Finish { .. } => "finish",
        }
    }

    pub fn image_id(&self) -> Option<&str> {
        match self {
            Request::Deploy(request) => Some(&request.image_id),
            _ => None,
        }
    }
}

/// How an action ended.
#[derive(Clone, Debug, Serialize)]
pub struct Ending {
    pub ok: bool,
    /// The launcher's exit code for the same outcome.
    pub exit_code: u8,
    pub error: Option<String>,
    pub record: Option<DeployRecord>,
}

/// One event as the page shows it: the event, and its line as CI logs print it.
#[derive(Clone, Debug, Serialize)]
pub struct Line {
    #[serde(flatten)]
    pub event: Event,
    pub line: String,
    /// Unix milliseconds it happened at.
    pub at_ms: u64,
}

pub struct Run {
    pub id: String,
    pub cluster: String,
    pub request: Request,
    pub by: String,
    /// Unix seconds.
    pub started: u64,
    lines: Mutex<Vec<Line>>,
    ending: Mutex<Option<Ending>>,
    /// The count of lines, bumped on each (and once more at the end): followers wait on it.
    changed: tokio::sync::watch::Sender<usize>,
}

/// A run as the API shows it.
#[derive(Serialize)]
pub struct Summary<'a> {
    pub id: &'a str,
    pub action: &'static str,
    pub cluster: &'a str,
    pub image_id: Option<&'a str>,
    pub by: &'a str,
    pub started: u64,
    pub lines: Vec<Line>,
    pub ending: Option<Ending>,
}

impl Sink for Run {
    /// Keeps the event's line, unless it is a gate saying what the last one said.
    fn emit(&self, event: &Event) {
        let Some(line) = event.line() else { return };
        let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        let is_gate = |event: &Event| matches!(event, Event::Gate { .. });
        if is_gate(event) && lines.last().is_some_and(|last| is_gate(&last.event) && last.line == line) {
            return;
        }
        let at_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_millis();
        lines.push(Line { event: event.clone(), line, at_ms: u64::try_from(at_ms).unwrap_or(u64::MAX) });
        self.changed.send_replace(lines.len());
    }
}

impl Run {
    /// The lines from `from` on, and the ending once there is one.
    pub fn since(&self, from: usize) -> (Vec<Line>, Option<Ending>) {
        // The ending is read first: a run that ended has no lines to come after it.
        let ending = self.ending.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        (lines.get(from..).unwrap_or_default().to_vec(), ending)
    }

    pub fn follow(&self) -> tokio::sync::watch::Receiver<usize> {
        self.changed.subscribe()
    }

    pub fn summary(&self) -> Summary<'_> {
        let (lines, ending) = self.since(0);
        Summary {
            id: &self.id,
            action: self.request.name(),
            cluster: &self.cluster,
            image_id: self.request.image_id(),
            by: &self.by,
            started: self.started,
            lines,
            ending,
        }
    }
}

/// One line of the audit log.
#[derive(Serialize)]
struct AuditLine<'a> {
    time: u64,
    by: &'a str,
    action: &'a str,
    cluster: &'a str,
    id: &'a str,
    /// `started`, or how it ended.
    result: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    image_id: Option<&'a str>,
}

pub struct Actions {
    runs: Mutex<BTreeMap<String, Arc<Run>>>,
    audit: Arc<Audit>,
}

/// The audit log: one JSON line per write, lines never interleaved.
struct Audit {
    path: PathBuf,
    writing: Mutex<()>,
}

impl Actions {
    pub fn new(state_dir: &Path) -> std::io::Result<Actions> {
        let dir = state_dir.join("console");
        std::fs::create_dir_all(&dir)?;
        let audit = Audit { path: dir.join("audit.jsonl"), writing: Mutex::default() };
        Ok(Actions { runs: Mutex::default(), audit: Arc::new(audit) })
    }

    pub fn get(&self, id: &str) -> Option<Arc<Run>> {
        self.runs.lock().unwrap_or_else(|p| p.into_inner()).get(id).cloned()
    }

    /// Starts `request` on `cluster` in a thread of its own; the run is returned at once.
    pub fn start(
        &self,
        cloud: Arc<dyn Cloud>,
        cancel: Arc<AtomicBool>,
        cluster: &str,
        request: Request,
        viewer: &Viewer,
    ) -> std::io::Result<Arc<Run>> {
        let run = Arc::new(Run {
            id: crate::ids::new_id("act"),
            cluster: cluster.to_string(),
            request,
            by: viewer.actor(),
            started: now(),
            lines: Mutex::default(),
            ending: Mutex::default(),
            changed: tokio::sync::watch::Sender::new(0),
        });
        self.audit.append(&run, "started".into())?;
        let (thread_run, audit) = (run.clone(), self.audit.clone());
        let spawned = std::thread::Builder::new().name(format!("console-{}", run.request.name())).spawn(move || {
            let ending = execute(cloud.as_ref(), &cancel, &thread_run);
            let result = match &ending.error {
                None => "ok".to_string(),
                Some(error) => format!("failed (exit {}): {error}", ending.exit_code),
            };
            // On record before anyone is told it ended (and before the console may exit).
            if let Err(error) = audit.append(&thread_run, result) {
                tracing::warn!("console audit log: {error}");
            }
            *thread_run.ending.lock().unwrap_or_else(|p| p.into_inner()) = Some(ending);
            thread_run.changed.send_modify(|count| *count += 1);
        });
        if let Err(error) = spawned {
            let _ = self.audit.append(&run, format!("failed to start: {error}"));
            return Err(error);
        }
        let mut runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        runs.insert(run.id.clone(), run.clone());
        // The oldest ended runs make room; a running one keeps its page however long it runs.
        while runs.len() > KEPT {
            let ended = |r: &Arc<Run>| r.ending.lock().unwrap_or_else(|p| p.into_inner()).is_some();
            let Some(oldest) = runs.values().filter(|r| ended(r)).min_by_key(|r| r.started).map(|r| r.id.clone())
            else {
                break;
            };
            runs.remove(&oldest);
        }
        Ok(run)
    }

    /// Waits until no action runs, for at most `limit`.
    pub fn wait_idle(&self, limit: Duration) {
        let deadline = std::time::Instant::now() + limit;
        let running = || {
            let runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
            runs.values().any(|run| run.ending.lock().unwrap_or_else(|p| p.into_inner()).is_none())
        };
        while running() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Audit {
    fn append(&self, run: &Run, result: String) -> std::io::Result<()> {
        let line = AuditLine {
            time: now(),
            by: &run.by,
            action: run.request.name(),
            cluster: &run.cluster,
            id: &run.id,
            result,
            image_id: run.request.image_id(),
        };
        let mut text = serde_json::to_string(&line)?;
        text.push('\n');
        let _writing = self.writing.lock().unwrap_or_else(|p| p.into_inner());
        let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&self.path)?;
        file.write_all(text.as_bytes())
    }
}

/// Runs the engine as the command line would, with the console's viewer as the lock's owner.
fn execute(cloud: &dyn Cloud, cancel: &AtomicBool, run: &Run) -> Ending {
    let start_time = crate::process::start_time(std::process::id() as i32).unwrap_or_default();
    let mut identity = Identity::current(start_time);
    identity.owner.clone_from(&run.by);
    let mut engine = Engine::new(cloud, &SystemClock, cancel, identity);
    engine.events = run;
    let result = match &run.request {
        Request::Deploy(request) => engine.deploy(request),
        Request::Rollback { health_timeout_secs } => {
            engine.rollback(&run.cluster, Duration::from_secs(*health_timeout_secs))
        }
        Request::Finish { soak_secs } => engine.finish(&run.cluster, Duration::from_secs(*soak_secs)),
    };
    match result {
        Ok(record) => Ending { ok: true, exit_code: 0, error: None, record: Some(record) },
        Err(error) => Ending {
            ok: false,
            exit_code: error.exit_code(),
            error: Some(error.to_string()),
            record: error.record().cloned(),
        },
    }
}

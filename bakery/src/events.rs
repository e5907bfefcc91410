//! Progress as events. The library says what it is doing; whoever called it decides how to show
//! it: the command lines render events as indicatif bars on a terminal and as plain lines in CI
//! logs ([`crate::ui`]), and a web page can stream them as they are.

use serde::Serialize;

/// What a count of progress counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Unit {
    Bytes,
    Blocks,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// A step of a transaction (bake, base build, push) began.
    StepStarted {
        step: String,
        number: usize,
        total: usize,
    },
    /// Units of the running step done so far.
    Progress {
        step: String,
        unit: Unit,
        done: u64,
        total: u64,
    },
    StepFinished {
        step: String,
        number: usize,
        total: usize,
        duration_ms: u64,
        ok: bool,
    },

    /// The launcher began an operation of its plan on a cluster.
    OperationStarted {
        cluster: String,
        operation: String,
        number: usize,
        total: usize,
    },
    /// ... and ended it: `outcome` is `ok`, `skipped` or `failed`.
    OperationFinished {
        cluster: String,
        operation: String,
        number: usize,
        total: usize,
        outcome: String,
        message: Option<String>,
        duration_ms: u64,
    },
    /// What a health gate sees each time it looks at a group.
    Gate {
        cluster: String,
        group: String,
        desired: u32,
        healthy: u32,
        starting: u32,
        unhealthy: u32,
        /// Instances `UP` in the service registry, where the cloud has one.
        registered_up: Option<u32>,
        /// Instances not healthy yet.
        waiting_for: Vec<String>,
    },
    /// A launcher run on a cluster moved to another phase (`running`, `succeeded`, …).
    Phase {
        cluster: String,
        action: String,
        phase: String,
        message: Option<String>,
    },
}

impl Event {
    /// The event as one plain line, as CI logs and the console's pages show it; None for
    /// progress counts, which only a bar shows.
    pub fn line(&self) -> Option<String> {
        let seconds = |ms: &u64| format!("{:.1}s", *ms as f64 / 1000.0);
        Some(match self {
            Event::StepStarted { step, number, total } => format!("[{number}/{total}] {step}"),
            Event::Progress { .. } => return None,
            Event::StepFinished { step, duration_ms, ok, .. } => {
                let how = if *ok { "done" } else { "failed" };
                format!("  {step}: {how} in {}", seconds(duration_ms))
            }
            Event::OperationStarted { cluster, operation, number, total } => {
                format!("{cluster} [{number}/{total}] {operation}")
            }
            Event::OperationFinished { cluster, operation, outcome, message, duration_ms, .. } => {
                let why = message.as_ref().map(|m| format!(" ({m})")).unwrap_or_default();
                format!("{cluster}   {outcome} in {}: {operation}{why}", seconds(duration_ms))
            }
            Event::Gate { group, desired, healthy, starting, unhealthy, registered_up, waiting_for, .. } => {
                let waiting = match waiting_for.len() {
                    0 => String::new(),
                    n if n <= 3 => format!("; waiting for {}", waiting_for.join(", ")),
                    n => format!("; waiting for {}, … ({n} in all)", waiting_for[..3].join(", ")),
                };
                let registered = registered_up.map(|up| format!(", {up} UP in the registry")).unwrap_or_default();
                format!("{group}: {healthy} of {desired} healthy, {starting} starting, {unhealthy} unhealthy{registered}{waiting}")
            }
            Event::Phase { cluster, action, phase, message } => {
                let why = message.as_ref().map(|m| format!(": {m}")).unwrap_or_default();
                format!("{cluster}: {action} {phase}{why}")
            }
        })
    }
}

/// Where events go. Implementations must be cheap: progress arrives once per block.
pub trait Sink: Send + Sync {
    fn emit(&self, event: &Event);
}

/// For callers that show nothing.
pub struct Discard;

impl Sink for Discard {
    fn emit(&self, _event: &Event) {}
}

/// Keeps every event (tests, and pages that replay a run).
#[derive(Default)]
pub struct Recorder(pub std::sync::Mutex<Vec<Event>>);

impl Recorder {
    pub fn events(&self) -> Vec<Event> {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
    }
}

impl Sink for Recorder {
    fn emit(&self, event: &Event) {
        self.0.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).push(event.clone());
    }
}

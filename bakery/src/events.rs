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

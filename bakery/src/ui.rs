//! How a command talks to people and to CI: the library's [`events`](crate::events) rendered
//! on stderr (step lines and indicatif progress bars when it is a terminal, plain lines
//! otherwise), and exactly one JSON object on stdout with `--output json`.

use crate::events::{Event, Sink, Unit};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use std::io::IsTerminal;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

/// Logs on stderr: warnings by default, `-v` info, `-vv` debug; `BAKERY_LOG` (an `EnvFilter`)
/// overrides.
pub fn init_logging(verbose: u8) {
    let default = ["warn", "info", "debug"][usize::from(verbose.min(2))];
    let filter = tracing_subscriber::EnvFilter::try_from_env("BAKERY_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("bakery={default},launcher={default},warn")));
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).init();
}

/// The flag Ctrl-C, SIGTERM and SIGHUP set: long work stops at its next step and undoes what it
/// made. A second signal exits at once with 130.
pub fn cancellation() -> Arc<AtomicBool> {
    let cancel = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM, signal_hook::consts::SIGHUP] {
        signal_hook::flag::register_conditional_shutdown(signal, 130, Arc::clone(&cancel)).expect("signal handler");
        signal_hook::flag::register(signal, Arc::clone(&cancel)).expect("signal handler");
    }
    cancel
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OutputFormat {
    Text,
    Json,
}

pub struct Ui {
    pub format: OutputFormat,
    interactive: bool,
    state: Mutex<Render>,
}

/// What is on screen now.
#[derive(Default)]
struct Render {
    /// The running step's progress bar, or the gate's spinner.
    bar: Option<ProgressBar>,
    /// The gate's last line, so that an unchanged one is not repeated.
    gate: Option<String>,
}

impl Ui {
    pub fn new(format: OutputFormat) -> Ui {
        Ui { format, interactive: std::io::stderr().is_terminal(), state: Mutex::default() }
    }

    /// A command's result on stdout: one JSON object, or text for people.
    pub fn print<T: Serialize>(&self, value: &T, text: impl FnOnce(&T) -> String) {
        match self.format {
            OutputFormat::Json => println!("{}", serde_json::to_string(value).expect("serialisable")),
            OutputFormat::Text => println!("{}", text(value)),
        }
    }
}

/// Renders events on stderr: indicatif bars and live gate lines on a terminal; elsewhere (CI
/// logs) one plain line per step, phase change, operation and change of what a gate waits for.
impl Sink for Ui {
    fn emit(&self, event: &Event) {
        let mut state = self.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let line = event.line();
        match event {
            Event::StepStarted { step, number, total } => tracing::info!(step = %step, "[{number}/{total}]"),
            Event::Progress { unit, done, total, .. } if self.interactive => {
                let bar = state.bar.get_or_insert_with(|| new_bar(*unit));
                bar.set_length(*total);
                bar.set_position(*done);
            }
            Event::StepFinished { .. } | Event::OperationFinished { .. } => {
                if let Some(bar) = state.bar.take() {
                    bar.finish_and_clear();
                }
                state.gate = None;
                // A terminal saw the step through its bar.
                if self.interactive && matches!(event, Event::StepFinished { .. }) {
                    return;
                }
            }
            Event::Gate { .. } => {
                if state.gate == line {
                    return;
                }
                state.gate.clone_from(&line);
                if self.interactive {
                    let spinner = state.bar.get_or_insert_with(new_spinner);
                    spinner.set_message(line.unwrap_or_default());
                    return;
                }
                if let Some(text) = line {
                    self.line(&mut state, format!("  gate {text}"));
                }
                return;
            }
            _ => {}
        }
        if let Some(text) = line {
            self.line(&mut state, text);
        }
    }
}

impl Ui {
    /// A line on stderr, printed above a running bar on a terminal.
    fn line(&self, state: &mut Render, text: String) {
        match &state.bar {
            Some(bar) => bar.println(text),
            None => eprintln!("{text}"),
        }
    }
}

fn new_bar(unit: Unit) -> ProgressBar {
    let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
    let template = match unit {
        Unit::Bytes => "  [{bar:32}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        Unit::Blocks => "  [{bar:32}] {pos}/{len} blocks eta {eta}",
    };
    bar.set_style(ProgressStyle::with_template(template).expect("valid template").progress_chars("=> "));
    bar
}

fn new_spinner() -> ProgressBar {
    let spinner = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr());
    spinner.set_style(ProgressStyle::with_template("  {spinner} {msg} ({elapsed})").expect("valid template"));
    spinner.enable_steady_tick(std::time::Duration::from_millis(200));
    spinner
}

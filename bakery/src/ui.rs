//! How a command talks to people and to CI: step lines and indicatif progress bars on stderr
//! when it is a terminal, plain log lines otherwise, and exactly one JSON object on stdout with
//! `--output json`.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use std::io::IsTerminal;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

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
}

impl Ui {
    pub fn new(format: OutputFormat) -> Ui {
        Ui { format, interactive: std::io::stderr().is_terminal() }
    }

    /// A command's result on stdout: one JSON object, or text for people.
    pub fn print<T: Serialize>(&self, value: &T, text: impl FnOnce(&T) -> String) {
        match self.format {
            OutputFormat::Json => println!("{}", serde_json::to_string(value).expect("serialisable")),
            OutputFormat::Text => println!("{}", text(value)),
        }
    }

    /// Announces a pipeline step.
    pub fn step(&self, number: usize, total: usize, name: &str) {
        tracing::info!(step = name, "[{number}/{total}]");
        if self.interactive {
            eprintln!("[{number}/{total}] {name}");
        }
    }

    /// A progress bar counting `unit`s; hidden unless stderr is a terminal.
    pub fn bar(&self, total: u64, message: &str, bytes: bool) -> ProgressBar {
        if !self.interactive {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr());
        let template = if bytes {
            "  {msg:24} [{bar:32}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}"
        } else {
            "  {msg:24} [{bar:32}] {pos}/{len} eta {eta}"
        };
        bar.set_style(ProgressStyle::with_template(template).expect("valid template").progress_chars("=> "));
        bar.set_message(message.to_string());
        bar
    }
}

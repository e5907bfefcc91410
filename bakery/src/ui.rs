//! How a command talks to people and to CI: step lines and indicatif progress bars on stderr
//! when it is a terminal, plain log lines otherwise, and exactly one JSON object on stdout with
//! `--output json`.

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;

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

//! Running the host tools a bake needs (losetup, partx, mount helpers, unshare) with errors
//! that say what was run and what it printed.

use snafu::{ResultExt, Snafu};
use std::ffi::OsStr;
use std::process::{Command, Stdio};

#[derive(Debug, Snafu)]
pub enum Error {
    #[snafu(display("could not start `{command}`: {source}"))]
    Spawn { command: String, source: std::io::Error },

    #[snafu(display("`{command}` failed ({status}): {stderr}"))]
    Failed { command: String, status: std::process::ExitStatus, stderr: String },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Runs `program args…` to completion and returns its stdout; a non-zero exit is an error
/// carrying the command line and its stderr.
pub fn run<I, S>(program: &str, args: I) -> Result<String>
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut command = Command::new(program);
    command.args(args).stdin(Stdio::null());
    output_of(&mut command)
}

/// Like [`run`] for a prepared [`Command`].
pub fn output_of(command: &mut Command) -> Result<String> {
    let line = describe(command);
    tracing::debug!(command = %line, "running");
    let output = command.output().context(SpawnSnafu { command: line.clone() })?;
    if !output.status.success() {
        return FailedSnafu {
            command: line,
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_string(),
        }
        .fail();
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

/// The command line as a person would type it, for messages and logs.
pub fn describe(command: &Command) -> String {
    std::iter::once(command.get_program())
        .chain(command.get_args())
        .map(|part| part.to_string_lossy().into_owned())
        .collect::<Vec<_>>()
        .join(" ")
}

//! Processes that outlive a function call (booted instances): identified by pid *and* start
//! time, stopped by pid, never by name, and never a process that merely reused the pid.

use serde::{Deserialize, Serialize};
use std::time::Duration;

/// A process as recorded on disk: pid and start time together never name another process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub pid: i32,
    pub start_time: u64,
}

impl Identity {
    /// The running process `pid`, or None when there is none.
    pub fn of(pid: i32) -> Option<Identity> {
        start_time(pid).map(|start_time| Identity { pid, start_time })
    }

    pub fn is_running(&self) -> bool {
        is_running(self.pid, self.start_time)
    }
}

/// The process's start time in clock ticks since boot (/proc/PID/stat field 22), or None when
/// it no longer exists (or is a zombie).
pub fn start_time(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: parse after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// A start time in clock ticks since boot as Unix seconds.
pub fn unix_start_time(ticks: u64) -> Option<u64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let boot: u64 = stat.lines().find_map(|l| l.strip_prefix("btime "))?.trim().parse().ok()?;
    // SAFETY: sysconf only reads a configuration value.
    let hertz = u64::try_from(unsafe { libc::sysconf(libc::_SC_CLK_TCK) }).ok().filter(|&h| h > 0)?;
    Some(boot + ticks / hertz)
}

pub fn is_running(pid: i32, started: u64) -> bool {
    start_time(pid) == Some(started)
}

/// Asks the process to stop (SIGTERM), gives it `grace`, then kills it; reaps it if it is our
/// child. Does nothing when the process is gone or the pid now belongs to another process.
pub fn stop_within(pid: i32, started: u64, grace: Duration) {
    use nix::sys::signal::{kill, Signal};
    use nix::sys::wait::{waitpid, WaitPidFlag};
    use nix::unistd::Pid;
    let target = Pid::from_raw(pid);
    let reap = || {
        let _ = waitpid(target, Some(WaitPidFlag::WNOHANG));
    };
    if !is_running(pid, started) {
        reap();
        return;
    }
    let _ = kill(target, Signal::SIGTERM);
    let gone = || {
        reap();
        (!is_running(pid, started)).then_some(())
    };
    if crate::wait::until(grace, Duration::from_millis(50), gone).is_some() {
        return;
    }
    tracing::warn!(pid, "did not stop in time; killing it");
    let _ = kill(target, Signal::SIGKILL);
    if crate::wait::until(Duration::from_secs(60), Duration::from_millis(20), gone).is_none() {
        tracing::error!(pid, "still running a minute after SIGKILL (stuck in the kernel?)");
    }
    reap();
}

/// [`stop_within`] with the grace a booted system needs to shut down.
pub fn stop(pid: i32, started: u64) {
    stop_within(pid, started, Duration::from_secs(20));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stopped_process_is_gone_and_a_stale_start_time_is_not_signalled() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id() as i32;
        let started = start_time(pid).expect("running");
        stop_within(pid, started + 1, Duration::from_secs(1));
        assert!(is_running(pid, started), "a different start time means a different process");
        stop_within(pid, started, Duration::from_secs(5));
        assert!(!is_running(pid, started));
        let _ = child.wait();
    }
}

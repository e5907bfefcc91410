//! Running recipe commands inside the image.
//!
//! Each command runs in fresh PID and mount namespaces: /proc, /sys and /dev are mounted for it
//! inside the private mount namespace (so none of them can leak onto the host), and when the
//! command ends the kernel kills every process it left behind, so no daemon started by a
//! postinst can keep the image busy. Services are also kept from starting by policy-rc.d.
//!
//! A command finds a working network as a build would: a fresh tmpfs on the image's /run (as
//! at boot), the host's resolver wherever the image's /etc/resolv.conf leads, and apt set up
//! to reach the host's mirrors ([`apt`]). All of it lives in the private mount namespace, so
//! it is gone when the command ends and nothing of the host's is left in the image.

pub mod apt;

use snafu::{ResultExt, Snafu};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

#[derive(Debug, Snafu)]
pub enum Error {
    #[snafu(display("could not start the chroot for `{command}`: {source}"))]
    Spawn { command: String, source: std::io::Error },

    #[snafu(display("command `{command}` failed in the image ({status}); its last output:\n{tail}"))]
    Failed { command: String, status: std::process::ExitStatus, tail: String },

    #[snafu(display("command `{command}` was interrupted"))]
    Interrupted { command: String },

    #[snafu(display("command log {}: {source}", path.display()))]
    Log { path: PathBuf, source: std::io::Error },
}

pub type Result<T> = std::result::Result<T, Error>;

/// Mounts the pseudo filesystems, /run, name resolution and apt's directory (`$3`, on `$4`)
/// inside the new mount namespace, then enters the image. The resolver is a
/// copy on the private /run, so nothing in the image can write the host's; apt's directory is
/// read-only but for its lists and downloads, so nothing in the image can change what the host
/// writes there.
const ENTER: &str = r#"set -e
root="$1" apt="$3"
mount -t proc proc "$root/proc"
mount -t sysfs sysfs "$root/sys"
mount --rbind /dev "$root/dev"
mount -t tmpfs -o mode=0755,nosuid,nodev bakery-run "$root/run"
resolv=$(chroot "$root" readlink -m /etc/resolv.conf)
if [ -r /etc/resolv.conf ]; then
    case $resolv in
    /run/*) mkdir -p "$root${resolv%/*}" && cat /etc/resolv.conf >"$root$resolv" ;;
    *) if [ -f "$root$resolv" ]; then
        mkdir -p "$root/run/bakery" && cat /etc/resolv.conf >"$root/run/bakery/resolv.conf"
        mount --bind "$root/run/bakery/resolv.conf" "$root$resolv"
    fi ;;
    esac
fi
mkdir -p "$root$4"
mount --bind "$apt" "$root$4"
mount -o remount,bind,ro "$root$4"
mount --bind "$apt/lists" "$root$4/lists"
mount --bind "$apt/archives" "$root$4/archives"
export APT_CONFIG="$4/apt.conf"
exec chroot "$root" /bin/sh -ec "$2""#;

/// Runs `script` with /bin/sh inside the image mounted at `root`, apt in it using `apt_dir`
/// (made by [`apt::prepare`]); output goes to `log`.
pub fn run(
    root: &Path,
    script: &str,
    env: &[(&str, &str)],
    apt_dir: &Path,
    log: &Path,
    cancel: &AtomicBool,
) -> Result<()> {
    let out = File::create(log).context(LogSnafu { path: log })?;
    let err = out.try_clone().context(LogSnafu { path: log })?;
    let mut command = Command::new("unshare");
    command
        .args(["--fork", "--pid", "--mount", "--propagation", "private", "--kill-child", "--"])
        .args(["/bin/sh", "-c", ENTER, "bakery-chroot"])
        .arg(root)
        .arg(script)
        .arg(apt_dir)
        .arg(apt::MOUNT_POINT)
        .env_clear()
        .env("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
        .env("HOME", "/root")
        .env("LANG", "C.UTF-8")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    tracing::info!(command = script, "running in the image");
    let mut child = command.spawn().context(SpawnSnafu { command: script })?;
    let status = loop {
        if let Some(status) = child.try_wait().context(SpawnSnafu { command: script })? {
            break status;
        }
        if cancel.load(Ordering::Relaxed) {
            // unshare --kill-child takes the whole PID namespace down with it.
            let _ = child.kill();
            let _ = child.wait();
            return InterruptedSnafu { command: script }.fail();
        }
        std::thread::sleep(Duration::from_millis(25));
    };
    if !status.success() {
        return FailedSnafu { command: script, status, tail: tail(log, 20) }.fail();
    }
    Ok(())
}

/// The last `lines` lines of a text file, for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

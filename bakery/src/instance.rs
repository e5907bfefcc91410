//! Local instances: an image booted on this host, as EC2 would boot it, on its own loopback
//! address and port. Many instances of one image share its read-only disk; each gets a
//! copy-on-write layer of its own.
//!
//! - `container`: the image's root partition (read-only loop) under an overlay, booted by its
//!   own systemd in `systemd-nspawn`, sharing the host's network (loopback only).
//! - `vm`: QEMU boots the whole disk: firmware → GRUB → kernel on an NVMe disk (as on Nitro) →
//!   DHCP → Tomcat, with writes kept in a temporary overlay (`snapshot=on`) and the guest's
//!   port 8080 forwarded to the instance's loopback address.
//!
//! Everything an instance creates is recorded in the caller's journal, so stopping it is the
//! journal's unwind (process by pid and start time, mounts, loop device, files) and `bakery gc`
//! cleans up after a caller that died, or, once the journal is handed over to the instance's
//! process (a launcher's instances), after that process died.

use crate::journal::{Journal, Resource};
use crate::local::LocalProvider;
use crate::provider::Provider as _;
use crate::{gpt, loopdev, mounts, process, rootfs::RootDir};
use serde::Serialize;
use snafu::{OptionExt, ResultExt, Snafu};
use std::fs::File;
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

#[derive(Debug, Snafu)]
pub enum Error {
    #[snafu(display("image {id} not found"))]
    NoImage { id: String },

    #[snafu(display("{step}: {source}"))]
    Prepare { step: &'static str, source: crate::provider::Error },

    #[snafu(display("instance address {address} is not a loopback address"))]
    NotLoopback { address: Ipv4Addr },

    #[snafu(display("starting {program}: {source}"))]
    Spawn { program: &'static str, source: std::io::Error },

    #[snafu(display("{program} exited before starting the instance"))]
    NoChild { program: &'static str },

    #[snafu(display("{program} is not installed (scripts/install-deps installs it)"))]
    Missing { program: &'static str },
}

pub type Result<T> = std::result::Result<T, Error>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Method {
    Container,
    Vm,
}

/// Where an instance listens: a loopback address and port of this host.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Endpoint {
    pub address: Ipv4Addr,
    pub port: u16,
}

impl Endpoint {
    /// A free port on `address`, for an instance to take.
    pub fn free(address: Ipv4Addr) -> std::io::Result<Endpoint> {
        let port = std::net::TcpListener::bind((address, 0))?.local_addr()?.port();
        Ok(Endpoint { address, port })
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}:{}{path}", self.address, self.port)
    }
}

/// A booted instance. Stop it by unwinding the journal it was started with.
pub struct Instance {
    pub id: String,
    pub image_id: String,
    pub method: Method,
    pub endpoint: Endpoint,
    pub console: PathBuf,
    pub started_at: Instant,
    process: process::Identity,
}

impl Instance {
    pub fn is_running(&self) -> bool {
        self.process.is_running()
    }

    /// The process the instance lives in (systemd-nspawn or QEMU).
    pub fn process(&self) -> process::Identity {
        self.process
    }

    /// The last lines the guest printed on its console.
    pub fn console_tail(&self, lines: usize) -> String {
        crate::chroot::tail(&self.console, lines)
    }
}

/// The per-instance "user data": Tomcat's HTTP connector on the instance's own address and
/// port, and no shutdown port (instances sharing the host's network would collide on 8005).
fn configure_tomcat(root: &RootDir, endpoint: Endpoint) -> crate::provider::Result<()> {
    const SERVER_XML: &str = "/etc/tomcat10/server.xml";
    let host_copy = root.host_path().join(SERVER_XML.trim_start_matches('/'));
    let original = std::fs::read_to_string(&host_copy)?;
    let configured = original.replacen(r#"<Server port="8005""#, r#"<Server port="-1""#, 1).replacen(
        r#"<Connector port="8080""#,
        &format!(r#"<Connector port="{}" address="{}""#, endpoint.port, endpoint.address),
        1,
    );
    let user_data = serde_json::to_vec_pretty(&serde_json::json!({
        "http_address": endpoint.address.to_string(),
        "http_port": endpoint.port,
    }))?;
    root.write_file("/var/lib/bakery/user-data.json", &user_data, 0o644, 0, 0)?;
    root.write_file(SERVER_XML, configured.as_bytes(), 0o640, 0, tomcat_gid(root)?)?;
    // Services that would act on the host's network from inside the container.
    let units = root.open_dir("/etc/systemd/system", None)?;
    for unit in ["systemd-resolved.service", "systemd-networkd.service", "systemd-timesyncd.service"] {
        let _ = nix::unistd::unlinkat(
            Some(std::os::fd::AsRawFd::as_raw_fd(&units)),
            unit,
            nix::unistd::UnlinkatFlags::NoRemoveDir,
        );
        nix::unistd::symlinkat("/dev/null", Some(std::os::fd::AsRawFd::as_raw_fd(&units)), unit)?;
    }
    Ok(())
}

fn tomcat_gid(root: &RootDir) -> crate::provider::Result<u32> {
    Ok(root.lookup_ids("root", "tomcat")?.1)
}

fn require(program: &'static str) -> Result<()> {
    let found = std::env::var_os("PATH")
        .map(|paths| std::env::split_paths(&paths).any(|dir| dir.join(program).is_file()))
        .unwrap_or(false);
    snafu::ensure!(found, MissingSnafu { program });
    Ok(())
}

/// Where an instance registers itself and as what: the user data its registration agent
/// (`bakery-agent` in the base image) reads from `/etc/bakery/instance.env`; the instance adds
/// its own id, address and port.
#[derive(Clone, Debug)]
pub struct Registration {
    pub registry_url: String,
    pub app: String,
    pub cluster: String,
    pub group: String,
    pub zone: String,
    pub version: String,
    pub health_path: String,
}

/// `KEY='value'` lines a POSIX shell can source, whatever the values hold.
pub(crate) fn shell_env(pairs: &[(&str, &str)]) -> String {
    pairs.iter().map(|(key, value)| format!("{key}='{}'\n", value.replace('\'', r"'\''"))).collect()
}

fn write_registration(
    root: &RootDir,
    id: &str,
    endpoint: Endpoint,
    registration: &Registration,
) -> crate::provider::Result<()> {
    let (address, port) = (endpoint.address.to_string(), endpoint.port.to_string());
    let env = shell_env(&[
        ("REGISTRY_URL", &registration.registry_url),
        ("APP", &registration.app),
        ("CLUSTER", &registration.cluster),
        ("GROUP", &registration.group),
        ("INSTANCE_ID", id),
        ("ADDRESS", &address),
        ("PORT", &port),
        ("ZONE", &registration.zone),
        ("VERSION", &registration.version),
        ("HEALTH_PATH", &registration.health_path),
    ]);
    root.write_file("/etc/bakery/instance.env", env.as_bytes(), 0o644, 0, 0)?;
    Ok(())
}

/// Boots `image_id` and returns at once; the caller waits for health. With a `registration`,
/// the instance's agent registers it in that registry (container method only).
pub fn start(
    provider: &LocalProvider,
    state_dir: &Path,
    journal: &mut Journal,
    image_id: &str,
    method: Method,
    endpoint: Endpoint,
    registration: Option<&Registration>,
) -> Result<Instance> {
    snafu::ensure!(endpoint.address.is_loopback(), NotLoopbackSnafu { address: endpoint.address });
    let image = provider
        .images()
        .find_image(image_id)
        .context(PrepareSnafu { step: "looking up the image" })?
        .context(NoImageSnafu { id: image_id })?;
    let disk = provider.image_disk(&image).context(PrepareSnafu { step: "materialising the image" })?;

    let id = crate::ids::new_id("i");
    let dir = state_dir.join("instances").join(&id);
    let prepare = |step: &'static str| move |source: crate::provider::Error| Error::Prepare { step, source };
    journal.push(Resource::Dir { path: dir.clone() }).map_err(|e| prepare("journal")(e.into()))?;
    std::fs::create_dir_all(&dir).map_err(|e| prepare("creating the instance directory")(e.into()))?;
    let console = dir.join("console.log");
    let console_file = File::create(&console).map_err(|e| prepare("creating the console log")(e.into()))?;

    let mut command = match method {
        Method::Container => {
            require("systemd-nspawn")?;
            require("unshare")?;
            let root = mount_container_root(journal, &disk, &dir).map_err(prepare("mounting the instance's root"))?;
            let root_dir = RootDir::open(&root).map_err(|e| prepare("opening the instance's root")(e.into()))?;
            configure_tomcat(&root_dir, endpoint).map_err(prepare("writing the instance's user data"))?;
            if let Some(registration) = registration {
                write_registration(&root_dir, &id, endpoint, registration)
                    .map_err(prepare("writing the registration agent's user data"))?;
            }
            // nspawn runs as the init of a PID namespace of its own: when it dies, even by
            // SIGKILL, the kernel kills the container with it (which would otherwise live on,
            // reparented, serving on the instance's address).
            let mut command = Command::new("unshare");
            command.args(["--pid", "--fork", "--kill-child", "--", "systemd-nspawn"]);
            // PID 1 here is not systemd: no machine registration, stay in our own scope.
            command
                .args(["--quiet", "--register=no", "--keep-unit", "--boot", "--console=read-only"])
                .args(["--link-journal=no", "--resolv-conf=off", "--timezone=off"])
                .arg(format!("--machine={id}"))
                .arg("--directory")
                .arg(&root);
            command
        }
        Method::Vm => {
            require("qemu-system-x86_64")?;
            let mut command = Command::new("qemu-system-x86_64");
            let forward = format!("user,id=net0,hostfwd=tcp:{}:{}-:8080", endpoint.address, endpoint.port);
            command
                .args(["-machine", "q35", "-m", "1024", "-smp", "2", "-display", "none", "-no-reboot"])
                .args(["-accel", &accelerator()])
                .arg("-serial")
                .arg(format!("file:{}", console.display()))
                .arg("-drive")
                .arg(format!("file={},if=none,id=root,format=raw,snapshot=on", disk.display()))
                // The serial is what EC2 puts there: the volume id.
                .args(["-device", &format!("nvme,drive=root,serial={}", image.snapshot_id.replace('-', ""))])
                .args(["-netdev", &forward, "-device", "virtio-net-pci,netdev=net0"])
                // snapshot=on keeps the guest's writes in a temporary file: keep it in our directory.
                .env("TMPDIR", &dir);
            command
        }
    };
    let program = if method == Method::Vm { "qemu-system-x86_64" } else { "unshare" };
    let output = console_file.try_clone().map_err(|e| prepare("console log")(e.into()))?;
    // An instance may outlive its caller (a launcher's does): out of the caller's process group,
    // a Ctrl-C at the caller's terminal does not reach it; the caller stops it via the journal.
    command.process_group(0);
    let child =
        command.stdin(Stdio::null()).stdout(output).stderr(console_file).spawn().context(SpawnSnafu { program })?;
    let pid = child.id() as i32;
    let spawned = process::Identity { pid, start_time: process::start_time(pid).unwrap_or_default() };
    let record = |journal: &mut Journal, p: process::Identity| {
        journal
            .push(Resource::Process { pid: p.pid, start_time: p.start_time })
            .map_err(|e| prepare("journal")(e.into()))
    };
    record(journal, spawned)?;
    let process = match method {
        // The instance is nspawn, unshare's child; stopping it ends unshare too.
        Method::Container => {
            let nspawn = forked_child(spawned).context(NoChildSnafu { program })?;
            record(journal, nspawn)?;
            nspawn
        }
        Method::Vm => spawned,
    };
    tracing::info!(instance = %id, pid = process.pid, method = ?method, url = %endpoint.url("/"), "instance booting");
    Ok(Instance { id, image_id: image.id, method, endpoint, console, started_at: Instant::now(), process })
}

/// The child `parent` forks at once (unshare --fork), or None if `parent` exits without one.
fn forked_child(parent: process::Identity) -> Option<process::Identity> {
    let children = format!("/proc/{0}/task/{0}/children", parent.pid);
    let (timeout, interval) = (std::time::Duration::from_secs(5), std::time::Duration::from_millis(5));
    // Some(None): the parent is gone without a child.
    let forked = crate::wait::until(timeout, interval, || {
        let pids = std::fs::read_to_string(&children).unwrap_or_default();
        match pids.split_whitespace().next().and_then(|pid| pid.parse().ok()) {
            Some(pid) => Some(process::Identity::of(pid)),
            None => (!parent.is_running()).then_some(None),
        }
    });
    forked.flatten()
}

/// TCG unless BAKERY_QEMU_ACCEL says otherwise: KVM on hosts like this one cannot boot a stock
/// kernel, and a guest that hangs is worse than one that is slow.
fn accelerator() -> String {
    std::env::var("BAKERY_QEMU_ACCEL").unwrap_or_else(|_| "tcg".to_string())
}

/// Read-only loop on the root partition, mounted, with an overlay on top; returns the overlay.
fn mount_container_root(journal: &mut Journal, disk: &Path, dir: &Path) -> crate::provider::Result<PathBuf> {
    let partition = gpt::root_partition(disk)?;
    let size = partition.size();
    let device = loopdev::attach_partition_read_only(disk, partition.offset(), size)?;
    journal.push(Resource::LoopDevice { device: device.clone(), file: disk.to_path_buf() })?;
    let lower = dir.join("lower");
    journal.push(Resource::Mount { path: lower.clone() })?;
    mounts::mount_ext4(&device, &lower, true)?;
    let (upper, work, root) = (dir.join("upper"), dir.join("work"), dir.join("root"));
    for path in [&upper, &work, &root] {
        std::fs::create_dir_all(path)?;
    }
    journal.push(Resource::Mount { path: root.clone() })?;
    let options = format!("lowerdir={},upperdir={},workdir={}", lower.display(), upper.display(), work.display());
    nix::mount::mount(Some("overlay"), &root, Some("overlay"), nix::mount::MsFlags::empty(), Some(options.as_str()))?;
    Ok(root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_data_survives_any_value_in_a_shell() {
        let env = shell_env(&[("A", "plain"), ("B", "it's $(rm -rf /) `x`")]);
        let out = Command::new("sh").arg("-c").arg(format!("{env}printf '%s|%s' \"$A\" \"$B\"")).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "plain|it's $(rm -rf /) `x`");
    }
}

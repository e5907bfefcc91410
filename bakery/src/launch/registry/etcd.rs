//! The local service registry: etcd from Debian, one per state directory on a loopback port,
//! its data under `STATE/registry/`, started on first use like a balancer (a helper process that
//! outlives the launcher, [`crate::launch::daemon`]) and restarted on its data if it died.
//! Stopped by `launcher registry stop`.
//!
//! The image's agent keeps `bakery/instances/<cluster>/<group>/<id>` up to date under a 10 s
//! lease it renews every 2 s, so an instance that dies disappears by itself, and a clean stop
//! deregisters. The launcher's override is a key of its own, `bakery/overrides/<id>` =
//! `OUT_OF_SERVICE`, so the agent's writes never undo it.

use super::{Instance, Registration, OUT_OF_SERVICE};
use crate::instance::Endpoint;
use crate::launch::daemon;
use crate::process::Identity;
use base64::Engine;
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use snafu::{OptionExt, ResultExt, Snafu};
use std::fs::File;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

const INSTANCES: &str = "bakery/instances/";
const OVERRIDES: &str = "bakery/overrides/";
/// How long etcd may take to answer its health check after it starts.
const START_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, Snafu)]
pub enum Error {
    #[snafu(display("registry I/O on {}: {source}", path.display()))]
    Io { path: PathBuf, source: std::io::Error },

    #[snafu(display("no free port on 127.0.0.1: {source}"))]
    Port { source: std::io::Error },

    #[snafu(display("{source}"))]
    Daemon { source: daemon::Error },

    #[snafu(display("stopping the registry: {source}"))]
    Stop { source: crate::journal::Error },

    #[snafu(display("etcd did not answer its health check within {}s; see {}", START_TIMEOUT.as_secs(), log.display()))]
    NotHealthy { log: PathBuf },

    #[snafu(display("registry request {path}: {message}"))]
    Request { path: String, message: String },

    #[snafu(display("registry entry {key} is not what an agent writes: {source}"))]
    Entry { key: String, source: serde_json::Error },
}

pub type Result<T> = std::result::Result<T, Error>;

/// `STATE/registry/registry.json`.
#[derive(Debug, Serialize, Deserialize)]
struct State {
    client_port: u16,
    peer_port: u16,
    /// The handed-over journal that etcd's process keeps live.
    journal: String,
    process: Option<Identity>,
}

pub struct Registry {
    state_dir: PathBuf,
    dir: PathBuf,
}

fn b64(text: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(text)
}

fn unb64(text: &str) -> String {
    let bytes = base64::engine::general_purpose::STANDARD.decode(text).unwrap_or_default();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// The key just past every key starting with `prefix` (etcd's range end for a prefix).
fn prefix_end(prefix: &str) -> String {
    let mut end = prefix.as_bytes().to_vec();
    *end.last_mut().expect("a non-empty prefix") += 1;
    String::from_utf8(end).expect("ASCII prefixes")
}

impl Registry {
    pub fn new(state_dir: &Path) -> Registry {
        Registry { state_dir: state_dir.to_path_buf(), dir: state_dir.join("registry") }
    }

    fn state_path(&self) -> PathBuf {
        self.dir.join("registry.json")
    }

    fn load(&self) -> Result<Option<State>> {
        let path = self.state_path();
        crate::atomic::read_json(&path).context(IoSnafu { path })
    }

    fn save(&self, state: &State) -> Result<()> {
        let path = self.state_path();
        crate::atomic::write_json(&path, state).context(IoSnafu { path })
    }

    /// The URL of a registry that was started here before (restarted on its data if it died
    /// since, so that its overrides survive); None when none ever was.
    fn started_url(&self) -> Result<Option<String>> {
        match self.load()? {
            Some(_) => self.ensure().map(Some),
            None => Ok(None),
        }
    }

    /// The registry's URL, starting etcd first if it is not running (on its data, if any).
    pub fn ensure(&self) -> Result<String> {
        std::fs::create_dir_all(&self.dir).context(IoSnafu { path: &self.dir })?;
        let lock_path = self.dir.join("lock");
        let lock = File::create(&lock_path).context(IoSnafu { path: &lock_path })?;
        // Two launchers starting it at once: one starts it, the other finds it running.
        let _lock = Flock::lock(lock, FlockArg::LockExclusive)
            .map_err(|(_, errno)| std::io::Error::from(errno))
            .context(IoSnafu { path: &lock_path })?;
        let state = match self.load()? {
            Some(state) if state.process.is_some_and(|p| p.is_running()) => return Ok(client_url(state.client_port)),
            Some(state) => {
                tracing::warn!("the registry is gone; restarting it on its data");
                daemon::stop(&self.state_dir, &state.journal).context(StopSnafu)?;
                (state.client_port, state.peer_port)
            }
            None => {
                let free = || Endpoint::free(Ipv4Addr::LOCALHOST).map(|e| e.port).context(PortSnafu);
                (free()?, free()?)
            }
        };
        self.start(state.0, state.1)
    }

    fn start(&self, client_port: u16, peer_port: u16) -> Result<String> {
        let starting = daemon::begin(&self.state_dir, "registry", "service registry (etcd)").context(DaemonSnafu)?;
        let mut state = State { client_port, peer_port, journal: starting.id().to_string(), process: None };
        self.save(&state)?;
        let log = self.dir.join("etcd.log");
        let process = starting
            .launch(&[], || {
                let output = File::create(&log)?;
                let peer = format!("http://127.0.0.1:{peer_port}");
                let mut etcd = Command::new("etcd");
                etcd.arg("--name=bakery")
                    .arg(format!("--data-dir={}", self.dir.join("data").display()))
                    .arg(format!("--listen-client-urls={}", client_url(client_port)))
                    .arg(format!("--advertise-client-urls={}", client_url(client_port)))
                    .arg(format!("--listen-peer-urls={peer}"))
                    .arg(format!("--initial-advertise-peer-urls={peer}"))
                    .arg(format!("--initial-cluster=bakery={peer}"))
                    .stdin(Stdio::null())
                    .stdout(output.try_clone()?)
                    .stderr(output);
                daemon::spawn_detached(etcd)
            })
            .context(DaemonSnafu)?;
        state.process = Some(process);
        self.save(&state)?;
        let url = client_url(client_port);
        let agent = http_agent();
        let healthy = crate::wait::until(START_TIMEOUT, Duration::from_millis(100), || {
            let body = agent.get(&format!("{url}/health")).call().ok()?.into_string().ok()?;
            body.contains("\"true\"").then_some(())
        });
        if healthy.is_none() {
            // Leave no half-started registry that the next call would take for a running one.
            daemon::stop(&self.state_dir, &state.journal).context(StopSnafu)?;
            return NotHealthySnafu { log }.fail();
        }
        tracing::info!(%url, pid = process.pid, "registry started");
        Ok(url)
    }

    /// Stops etcd; its data stays for the next start.
    pub fn stop(&self) -> Result<()> {
        let Some(state) = self.load()? else { return Ok(()) };
        daemon::stop(&self.state_dir, &state.journal).context(StopSnafu)?;
        let path = self.state_path();
        match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e).context(IoSnafu { path }),
            _ => Ok(()),
        }
    }

    /// Every registered instance of `cluster` (all when None), with overrides applied. Empty
    /// when no registry was ever started here.
    pub fn instances(&self, cluster: Option<&str>) -> Result<Vec<Instance>> {
        let Some(url) = self.started_url()? else { return Ok(Vec::new()) };
        let prefix = match cluster {
            Some(cluster) => format!("{INSTANCES}{cluster}/"),
            None => INSTANCES.to_string(),
        };
        let overrides = range(&url, OVERRIDES)?;
        let mut instances = Vec::new();
        for (key, value) in range(&url, &prefix)? {
            let registration: Registration = serde_json::from_str(&value).context(EntrySnafu { key })?;
            let held = overrides
                .iter()
                .any(|(k, status)| k[OVERRIDES.len()..] == registration.instance_id && status == OUT_OF_SERVICE);
            instances.push(Instance::new(registration, held));
        }
        Ok(instances)
    }

    /// Holds instances out of traffic in the registry (`OUT_OF_SERVICE`), or lets them report
    /// for themselves again (None).
    pub fn set_override(&self, instance_ids: &[String], status: Option<&str>) -> Result<()> {
        if instance_ids.is_empty() {
            return Ok(());
        }
        let url = match status {
            Some(_) => self.ensure()?,
            None => match self.started_url()? {
                Some(url) => url,
                None => return Ok(()),
            },
        };
        for id in instance_ids {
            let key = format!("{OVERRIDES}{id}");
            match status {
                Some(status) => {
                    request(&url, "/v3/kv/put", serde_json::json!({"key": b64(&key), "value": b64(status)}))?
                }
                None => request(&url, "/v3/kv/deleterange", serde_json::json!({"key": b64(&key)}))?,
            };
        }
        Ok(())
    }
}

fn client_url(port: u16) -> String {
    format!("http://127.0.0.1:{port}")
}

fn http_agent() -> ureq::Agent {
    ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(1)).timeout(Duration::from_secs(5)).build()
}

fn request(url: &str, path: &str, body: serde_json::Value) -> Result<serde_json::Value> {
    let context = |message: String| RequestSnafu { path, message };
    let response = http_agent()
        .post(&format!("{url}{path}"))
        .set("Content-Type", "application/json")
        .send_string(&body.to_string())
        .map_err(|e| context(e.to_string()).build())?;
    let text = response.into_string().map_err(|e| context(e.to_string()).build())?;
    serde_json::from_str(&text).map_err(|e| context(e.to_string()).build())
}

/// Keys and values under `prefix`, decoded.
fn range(url: &str, prefix: &str) -> Result<Vec<(String, String)>> {
    let reply =
        request(url, "/v3/kv/range", serde_json::json!({"key": b64(prefix), "range_end": b64(&prefix_end(prefix))}))?;
    let kvs = reply.get("kvs").and_then(|k| k.as_array()).cloned().unwrap_or_default();
    let text = |kv: &serde_json::Value, field| kv.get(field).and_then(|v| v.as_str()).map(unb64);
    kvs.iter()
        .map(|kv| {
            let key =
                text(kv, "key").context(RequestSnafu { path: "/v3/kv/range", message: "an entry without a key" })?;
            Ok((key, text(kv, "value").unwrap_or_default()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_range_ends_just_past_the_prefix() {
        assert_eq!(prefix_end("bakery/instances/"), "bakery/instances0");
        assert_eq!(unb64(&b64("OUT_OF_SERVICE")), "OUT_OF_SERVICE");
    }
}

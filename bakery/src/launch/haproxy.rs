//! A cluster's balancer: one HAProxy on a port of 127.0.0.1, running detached from the launcher
//! and driven only through its admin runtime socket, never reloaded.
//!
//! The backend is a `server-template` of [`SLOTS`] servers that start in maintenance. Putting an
//! instance in service writes its address into a free slot and makes the slot ready; taking it
//! out drains the slot (no new requests, in-flight ones finish), then puts it in maintenance.
//! Which slot holds which instance is persisted (`balancer.json`) before HAProxy changes, so a
//! HAProxy that restarted (and lost its runtime state) gets the slots re-applied.
//!
//! HAProxy is a helper process that outlives the launcher ([`super::daemon`]): `bakery gc` sees it
//! live while it runs, and reclaims its socket and pid file once it is gone.

use super::daemon;
use crate::instance::Endpoint;
use crate::journal;
use crate::process::Identity;
use serde::{Deserialize, Serialize};
use snafu::{OptionExt, ResultExt, Snafu};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Servers a cluster's backend can hold at once (old and new groups together, during a flip).
pub const SLOTS: usize = 64;
const BACKEND: &str = "be";
/// How long a slot may take to pass its first health check once ready.
const UP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long in-flight requests get to finish on a draining slot (as `timeout server`).
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// The ring buffer of request log lines; about 100k requests at ~40 bytes each.
const RING: &str = "requests";
const RING_BYTES: usize = 4 << 20;
/// sun_path is 108 bytes with its terminating NUL.
const MAX_SOCKET_PATH: usize = 107;

#[derive(Debug, Snafu)]
pub enum Error {
    #[snafu(display("balancer I/O on {}: {source}", path.display()))]
    Io { path: PathBuf, source: std::io::Error },

    #[snafu(display("balancer journal: {source}"))]
    Journal { source: journal::Error },

    #[snafu(display("{source}"))]
    Daemon { source: daemon::Error },

    #[snafu(display("no free port on 127.0.0.1: {source}"))]
    Port { source: std::io::Error },

    #[snafu(display("starting HAProxy: {source}"))]
    Start { source: crate::command::Error },

    #[snafu(display("HAProxy started but {} names no running process", path.display()))]
    NoProcess { path: PathBuf },

    #[snafu(display("admin socket path {} is longer than {MAX_SOCKET_PATH} bytes", path.display()))]
    SocketPath { path: PathBuf },

    #[snafu(display("HAProxy runtime command `{command}`: {source}"))]
    Runtime { command: String, source: std::io::Error },

    #[snafu(display("HAProxy did not apply `{command}`: {reply}"))]
    NotApplied { command: String, reply: String },

    #[snafu(display("HAProxy's reply to `{command}` has no {column} column"))]
    Reply { command: String, column: &'static str },

    #[snafu(display("all {SLOTS} balancer slots are taken"))]
    Full,

    #[snafu(display("not up in the balancer after {}s: {}", UP_TIMEOUT.as_secs(), servers.join(", ")))]
    NotUp { servers: Vec<String> },
}

pub type Result<T> = std::result::Result<T, Error>;

/// An instance as the balancer sees it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Server {
    pub id: String,
    pub address: Ipv4Addr,
    pub port: u16,
}

/// `balancer.json`.
#[derive(Debug, Serialize, Deserialize)]
struct State {
    port: u16,
    /// The handed-over journal that HAProxy's process keeps live; recorded before HAProxy
    /// starts, so that a launcher dying mid-start leaves nothing that the next start misses.
    journal: String,
    /// None until HAProxy runs.
    process: Option<Identity>,
    /// Slot number (HAProxy's `slotN`) → the server in it; every one of them is in service.
    slots: BTreeMap<usize, Server>,
    /// Server id → the address its traffic goes to instead (Latency Monkey's relay).
    #[serde(default)]
    detours: BTreeMap<String, (Ipv4Addr, u16)>,
}

/// Where a server's traffic goes: its detour if it has one, else the server.
fn target(state: &State, server: &Server) -> (Ipv4Addr, u16) {
    state.detours.get(&server.id).copied().unwrap_or((server.address, server.port))
}

/// A slot as HAProxy reports it (`show servers state` and `show stat`).
struct SlotStatus {
    address: String,
    port: u16,
    up: bool,
    in_maintenance: bool,
    sessions: u64,
}

/// The balancer of the cluster whose state lives in `dir` (`clusters/<cluster>/`).
pub struct Balancer {
    state_dir: PathBuf,
    dir: PathBuf,
}

impl Balancer {
    pub fn new(state_dir: &Path, dir: &Path) -> Balancer {
        Balancer { state_dir: state_dir.to_path_buf(), dir: dir.to_path_buf() }
    }

    fn state_path(&self) -> PathBuf {
        self.dir.join("balancer.json")
    }

    fn socket(&self) -> PathBuf {
        self.dir.join("admin.sock")
    }

    fn load(&self) -> Result<Option<State>> {
        let path = self.state_path();
        crate::atomic::read_json(&path).context(IoSnafu { path })
    }

    fn save(&self, state: &State) -> Result<()> {
        let path = self.state_path();
        crate::atomic::write_json(&path, state).context(IoSnafu { path })
    }

    /// `http://127.0.0.1:PORT` once the balancer was started (until [`Balancer::stop`]).
    pub fn url(&self) -> Result<Option<String>> {
        Ok(self.load()?.map(|state| format!("http://127.0.0.1:{}", state.port)))
    }

    /// Restarts HAProxy if it is gone and re-applies its slots. Does not start a balancer that
    /// was never started.
    pub fn refresh(&self) -> Result<()> {
        if let Some(state) = self.load()? {
            self.running(Some(state))?;
        }
        Ok(())
    }

    /// The state of a running HAProxy: the recorded one, or one (re)started now.
    fn running(&self, state: Option<State>) -> Result<State> {
        match state {
            Some(state) if state.process.is_some_and(|p| p.is_running()) => Ok(state),
            Some(state) => {
                tracing::warn!(dir = %self.dir.display(), "HAProxy is gone; restarting it and re-applying its slots");
                // The dead one's journal names the same socket and pid file: undo it first.
                self.unwind(&state.journal)?;
                let state = self.start(state.port, state.slots, state.detours)?;
                for (slot, server) in &state.slots {
                    self.apply(*slot, target(&state, server))?;
                }
                Ok(state)
            }
            None => {
                let port = Endpoint::free(Ipv4Addr::LOCALHOST).context(PortSnafu)?.port;
                self.start(port, BTreeMap::new(), BTreeMap::new())
            }
        }
    }

    fn start(
        &self,
        port: u16,
        slots: BTreeMap<usize, Server>,
        detours: BTreeMap<String, (Ipv4Addr, u16)>,
    ) -> Result<State> {
        let socket = self.socket();
        snafu::ensure!(socket.as_os_str().len() <= MAX_SOCKET_PATH, SocketPathSnafu { path: socket });
        let (config, pid_file) = (self.dir.join("haproxy.cfg"), self.dir.join("haproxy.pid"));
        crate::atomic::write(&config, render_config(port, &socket).as_bytes()).context(IoSnafu { path: &config })?;
        let starting = daemon::begin(&self.state_dir, "balancer", &format!("balancer {}", self.dir.display()))
            .context(DaemonSnafu)?;
        let mut state = State { port, journal: starting.id().to_string(), process: None, slots, detours };
        self.save(&state)?;
        let process = starting
            .launch(&[socket.clone(), pid_file.clone()], || {
                // -D: HAProxy binds, detaches into its own session and exits 0, or reports the error.
                let args = ["-D".as_ref(), "-p".as_ref(), pid_file.as_os_str(), "-f".as_ref(), config.as_os_str()];
                crate::command::run("haproxy", args).context(StartSnafu)?;
                let pid = std::fs::read_to_string(&pid_file).context(IoSnafu { path: &pid_file })?;
                pid.trim().parse().ok().and_then(Identity::of).context(NoProcessSnafu { path: &pid_file })
            })
            .context(DaemonSnafu)?;
        state.process = Some(process);
        self.save(&state)?;
        tracing::info!(port, pid = process.pid, "balancer started");
        Ok(state)
    }

    fn unwind(&self, journal: &str) -> Result<()> {
        daemon::stop(&self.state_dir, journal).context(JournalSnafu)
    }

    /// Puts `servers` in service: each gets a slot (if it has none) and is made ready; returns
    /// once HAProxy sees every one of them up, so that the caller may then drain others.
    pub fn enable(&self, servers: &[Server]) -> Result<()> {
        let mut state = self.running(self.load()?)?;
        for server in servers {
            if !state.slots.values().any(|s| s == server) {
                let free = (1..=SLOTS).find(|n| !state.slots.contains_key(n)).context(FullSnafu)?;
                state.slots.insert(free, server.clone());
            }
        }
        self.save(&state)?;
        let slots: Vec<(usize, &Server)> =
            state.slots.iter().filter(|(_, s)| servers.contains(s)).map(|(n, s)| (*n, s)).collect();
        for (slot, server) in &slots {
            self.apply(*slot, target(&state, server))?;
        }
        let mut down = Vec::new();
        let up = crate::wait::try_until(UP_TIMEOUT, Duration::from_millis(100), || {
            let status = self.status()?;
            down =
                slots.iter().filter(|(n, _)| !status.get(n).is_some_and(|s| s.up)).map(|(_, s)| s.id.clone()).collect();
            Ok::<_, Error>(down.is_empty().then_some(()))
        })?;
        up.context(NotUpSnafu { servers: down })
    }

    /// Takes the servers named `ids` out of service without failing a request: their slots
    /// drain until no session is left on them (bounded by [`DRAIN_TIMEOUT`]), then go to
    /// maintenance and are freed. Nothing to do without a balancer.
    pub fn disable(&self, ids: &[String]) -> Result<()> {
        let Some(state) = self.load()? else { return Ok(()) };
        let mut state = self.running(Some(state))?;
        let slots: Vec<usize> = state.slots.iter().filter(|(_, s)| ids.contains(&s.id)).map(|(n, _)| *n).collect();
        if slots.is_empty() {
            return Ok(());
        }
        for slot in &slots {
            self.set_state(*slot, "drain")?;
        }
        let drained = crate::wait::try_until(DRAIN_TIMEOUT, Duration::from_millis(100), || {
            let status = self.status()?;
            let busy = slots.iter().any(|n| status.get(n).is_some_and(|s| s.sessions > 0));
            Ok::<_, Error>((!busy).then_some(()))
        })?;
        if drained.is_none() {
            tracing::warn!("requests still running on draining servers; taking them out anyway");
        }
        for slot in &slots {
            self.set_state(*slot, "maint")?;
            state.slots.remove(slot);
        }
        state.detours.retain(|id, _| !ids.contains(id));
        self.save(&state)
    }

    /// Sends the traffic of server `id` to `via` instead of the server (None: to the server
    /// again). Kept in the balancer's state, so that putting the server in service again keeps
    /// the detour; nothing to do for a server with no slot, beyond remembering.
    pub fn detour(&self, id: &str, via: Option<(Ipv4Addr, u16)>) -> Result<()> {
        let Some(state) = self.load()? else { return Ok(()) };
        let mut state = self.running(Some(state))?;
        match via {
            Some(via) => state.detours.insert(id.to_string(), via),
            None => state.detours.remove(id),
        };
        self.save(&state)?;
        let slot = state.slots.iter().find(|(_, s)| s.id == id).map(|(n, s)| (*n, s.clone()));
        match slot {
            Some((slot, server)) => self.apply(slot, target(&state, &server)),
            None => Ok(()),
        }
    }

    /// Stops HAProxy and removes the balancer's state; the URL is gone after this.
    pub fn stop(&self) -> Result<()> {
        let Some(state) = self.load()? else { return Ok(()) };
        self.unwind(&state.journal)?;
        for path in [self.dir.join("haproxy.cfg"), self.state_path()] {
            match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e).context(IoSnafu { path }),
                _ => {}
            }
        }
        Ok(())
    }

    /// Requests answered since `since` (Unix seconds), as (server `address:port`, status,
    /// total milliseconds), from HAProxy's request ring; empty without a balancer.
    pub fn requests(&self, since: u64) -> Result<Vec<(String, u16, u64)>> {
        if self.load()?.is_none() {
            return Ok(Vec::new());
        }
        let events = self.runtime(&format!("show events {RING}"))?;
        Ok(events
            .lines()
            .filter_map(|line| {
                let mut fields = line.split_whitespace();
                let at: u64 = fields.next()?.parse().ok()?;
                let server = fields.next()?.to_string();
                let status = fields.next()?.parse().ok()?;
                let ms = fields.next()?.parse().ok()?;
                (at >= since).then_some((server, status, ms))
            })
            .collect())
    }

    /// Points `slot` at `(address, port)` and makes it ready, then checks HAProxy took both.
    fn apply(&self, slot: usize, (address, port): (Ipv4Addr, u16)) -> Result<()> {
        let command = format!("set server {BACKEND}/slot{slot} addr {address} port {port}");
        self.runtime(&command)?;
        self.set_state(slot, "ready")?;
        let status = self.status()?;
        let applied =
            status.get(&slot).is_some_and(|s| s.address == address.to_string() && s.port == port && !s.in_maintenance);
        snafu::ensure!(applied, NotAppliedSnafu { command, reply: "the slot did not change" });
        Ok(())
    }

    fn set_state(&self, slot: usize, state: &str) -> Result<()> {
        let command = format!("set server {BACKEND}/slot{slot} state {state}");
        // Success is an empty reply; anything else is HAProxy saying why not.
        let reply = self.runtime(&command)?;
        snafu::ensure!(reply.trim().is_empty(), NotAppliedSnafu { command, reply: reply.trim() });
        Ok(())
    }

    fn runtime(&self, command: &str) -> Result<String> {
        let context = || RuntimeSnafu { command };
        let mut stream = UnixStream::connect(self.socket()).with_context(|_| context())?;
        stream.set_read_timeout(Some(Duration::from_secs(5))).with_context(|_| context())?;
        stream.write_all(format!("{command}\n").as_bytes()).with_context(|_| context())?;
        let mut reply = String::new();
        stream.read_to_string(&mut reply).with_context(|_| context())?;
        Ok(reply)
    }

    /// Every slot's address, health, admin state and sessions, by slot number.
    fn status(&self) -> Result<BTreeMap<usize, SlotStatus>> {
        const STATE: &str = "show servers state be";
        const STAT: &str = "show stat";
        let servers = table(STATE, &self.runtime(STATE)?, ' ')?;
        let stats = table(STAT, &self.runtime(STAT)?, ',')?;
        let sessions: BTreeMap<String, u64> = stats
            .iter()
            .filter(|row| row.get("pxname").is_some_and(|p| p == BACKEND))
            .filter_map(|row| {
                let count = |column| row.get(column).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
                Some((row.get("svname")?.clone(), count("scur") + count("qcur")))
            })
            .collect();
        let mut status = BTreeMap::new();
        for row in servers {
            let column = |column: &'static str| row.get(column).context(ReplySnafu { command: STATE, column });
            let name = column("srv_name")?;
            let Some(slot) = name.strip_prefix("slot").and_then(|n| n.parse().ok()) else { continue };
            // srv_op_state 2 is SRV_ST_RUNNING. srv_admin_state's maintenance bits are 0x01
            // forced, 0x02 inherited, 0x20 resolution and 0x40 hostname; 0x04 ("configured
            // disabled") stays set after `state ready` and 0x08|0x10 are drain.
            let admin: u32 = column("srv_admin_state")?.parse().unwrap_or(u32::MAX);
            status.insert(
                slot,
                SlotStatus {
                    address: column("srv_addr")?.clone(),
                    port: column("srv_port")?.parse().unwrap_or(0),
                    up: column("srv_op_state")? == "2",
                    in_maintenance: admin & 0x63 != 0,
                    sessions: sessions.get(name).copied().unwrap_or(0),
                },
            );
        }
        Ok(status)
    }
}

/// A runtime API table: a `# name name …` header, then rows split on `separator`.
fn table(command: &str, reply: &str, separator: char) -> Result<Vec<BTreeMap<String, String>>> {
    let mut lines = reply.lines().filter(|line| !line.trim().is_empty());
    let header: Vec<String> = lines
        .by_ref()
        .find_map(|line| line.strip_prefix("# "))
        .context(NotAppliedSnafu { command, reply })?
        .split(separator)
        .map(str::to_string)
        .collect();
    Ok(lines
        .filter(|line| !line.starts_with('#'))
        .map(|line| header.iter().cloned().zip(line.split(separator).map(str::to_string)).collect())
        .collect())
}

/// HAProxy's configuration: it never changes while HAProxy runs (no reloads).
fn render_config(port: u16, socket: &Path) -> String {
    format!(
        "\
# Written by bakery; the backend's slots are set through the runtime API, never by reloading.
global
    stats socket {socket} mode 600 level admin
    stats timeout 10s

# The last requests (time, server, status, total ms), read through the runtime API
# (`show events {RING}`) to judge a group's traffic during a soak.
ring {RING}
    format raw
    maxlen 128
    size {RING_BYTES}

defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server {drain}s
    timeout queue 10s
    timeout http-request 10s
    # One request per server connection: a draining server is left with no idle connection
    # to reuse, and Tomcat never closes a kept-alive one under a request we send.
    option http-server-close
    # A request whose server refuses, resets or goes away before answering is retried once
    # per server, on another server: no client sees an instance stop or a slot change.
    retries 3
    option redispatch 1
    retry-on conn-failure empty-response junk-response 503
    log ring@{RING} local0
    log-format \"%Ts %si:%sp %ST %Ta\"

frontend fe
    bind 127.0.0.1:{port}
    default_backend {BACKEND}

backend {BACKEND}
    balance roundrobin
    # Only requests safe to repeat are replayed after a server may have seen them.
    http-request disable-l7-retry if !METH_GET !METH_HEAD
    # An HTTP check with a deadline: a server that accepts connections but answers late (or not
    # at all) is taken out within about 2 s. Any answer below 500 will do: the launcher checks
    # each instance's own health URL before it ever puts it in a slot.
    option httpchk GET /
    http-check expect status 200-499
    timeout check 1s
    server-template slot 1-{SLOTS} 127.0.0.1:1 disabled check inter 1s fall 2 rise 1
",
        socket = socket.display(),
        drain = DRAIN_TIMEOUT.as_secs(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_tables_parse_by_header() {
        let reply = "1\n# be_id be_name srv_id srv_name srv_addr\n3 be 1 slot1 127.0.0.2\n3 be 2 slot2 127.0.0.3\n\n";
        let rows = table("show servers state", reply, ' ').unwrap();
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[1]["srv_name"], "slot2");
        assert_eq!(rows[1]["srv_addr"], "127.0.0.3");
        assert!(table("show stat", "Unknown command\n", ',').is_err());
    }
}

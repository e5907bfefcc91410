//! `bakery verify`: boot an image on this host and check that it serves the app. A chroot bake
//! never boots what it makes; this proves the result does.

use crate::instance::{self, Endpoint, Method};
use crate::journal::{HostOnly, Journal};
use crate::local::LocalProvider;
use crate::provider::Provider as _;
use crate::tags;
use serde::Serialize;
use snafu::{ResultExt, Snafu};
use std::io::Read;
use std::net::Ipv4Addr;
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

#[derive(Debug, Snafu)]
pub enum Error {
    #[snafu(display("{source}"))]
    Journal { source: crate::journal::Error },

    #[snafu(display("booting the instance: {source}"))]
    Boot { source: instance::Error },

    #[snafu(display("no free port on {address}: {source}"))]
    Port { address: Ipv4Addr, source: std::io::Error },

    #[snafu(display("interrupted; the instance was stopped and removed"))]
    Interrupted,
}

impl Error {
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Interrupted => 130,
            Error::Boot { source: instance::Error::NoImage { .. } } => 4,
            _ => 1,
        }
    }
}

pub type Result<T> = std::result::Result<T, Error>;

/// `--expect PATH=TEXT`: GET PATH answers 200 with TEXT in its body.
#[derive(Debug, Clone, PartialEq)]
pub struct Expect {
    pub path: String,
    pub text: String,
}

impl FromStr for Expect {
    type Err = String;

    fn from_str(spec: &str) -> std::result::Result<Expect, String> {
        let (path, text) = spec.split_once('=').unwrap_or((spec, ""));
        if !path.starts_with('/') {
            return Err(format!("{spec:?}: expected PATH=TEXT with PATH starting with '/'"));
        }
        Ok(Expect { path: path.to_string(), text: text.to_string() })
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Check {
    pub url: String,
    pub status: Option<u16>,
    pub matched: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VerifyOutcome {
    pub image_id: String,
    pub method: Method,
    /// From starting the instance to the first time every check passed.
    pub boot_ms: Option<u64>,
    pub checks: Vec<Check>,
    pub passed: bool,
    /// The guest's last console lines, when a check failed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub console_tail: Option<String>,
}

/// One GET, reading at most 64 KiB of the body.
pub fn probe(agent: &ureq::Agent, url: &str, text: &str) -> Check {
    let (status, body, error) = match agent.get(url).call() {
        Ok(response) => {
            let status = response.status();
            let mut body = String::new();
            let _ = response.into_reader().take(64 * 1024).read_to_string(&mut body);
            (Some(status), body, None)
        }
        Err(ureq::Error::Status(status, _)) => (Some(status), String::new(), None),
        Err(error) => (None, String::new(), Some(error.to_string())),
    };
    let matched = status == Some(200) && body.contains(text);
    Check { url: url.to_string(), status, matched, error }
}

pub fn http_agent() -> ureq::Agent {
    ureq::AgentBuilder::new().timeout_connect(Duration::from_secs(1)).timeout(Duration::from_secs(3)).build()
}

/// Boots the image, polls the checks until all pass, the guest dies or `timeout` passes, then
/// stops the instance and removes everything it made.
pub fn verify(
    provider: &LocalProvider,
    state_dir: &Path,
    image_id: &str,
    method: Method,
    expects: &[Expect],
    timeout: Duration,
    cancel: &AtomicBool,
) -> Result<VerifyOutcome> {
    let default = [Expect { path: "/".into(), text: String::new() }];
    let expects = if expects.is_empty() { &default[..] } else { expects };
    let address = Ipv4Addr::LOCALHOST;
    let endpoint = Endpoint::free(address).context(PortSnafu { address })?;
    let id = crate::ids::new_id("verify");
    let mut journal = Journal::begin(state_dir, &id, &format!("verify {image_id}"), "local").context(JournalSnafu)?;
    let result =
        instance::start(provider, state_dir, &mut journal, image_id, method, endpoint, None).context(BootSnafu);
    let outcome = result.map(|instance| {
        let agent = http_agent();
        let deadline = Instant::now() + timeout;
        let mut checks;
        loop {
            checks = expects.iter().map(|e| probe(&agent, &endpoint.url(&e.path), &e.text)).collect::<Vec<_>>();
            let passed = checks.iter().all(|c| c.matched);
            if passed || Instant::now() > deadline || !instance.is_running() || cancel.load(Ordering::Relaxed) {
                let boot_ms = passed.then(|| instance.started_at.elapsed().as_millis() as u64);
                let console_tail = (!passed).then(|| instance.console_tail(40));
                break VerifyOutcome {
                    image_id: instance.image_id.clone(),
                    method,
                    boot_ms,
                    checks,
                    passed,
                    console_tail,
                };
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });
    // Stop the guest and remove its layers whatever happened.
    journal.unwind_all(&HostOnly).context(JournalSnafu)?;
    if cancel.load(Ordering::Relaxed) {
        return InterruptedSnafu.fail();
    }
    outcome
}

/// Tags the image with the verdict: [`tags::VERIFIED`], and the boot time when it passed.
pub fn record_verdict(provider: &LocalProvider, outcome: &VerifyOutcome) -> crate::provider::Result<()> {
    let mut verdict = std::collections::BTreeMap::new();
    verdict.insert(tags::VERIFIED.to_string(), outcome.passed.to_string());
    if let Some(boot_ms) = outcome.boot_ms {
        verdict.insert(tags::VERIFIED_BOOT_MS.to_string(), boot_ms.to_string());
    }
    provider.images().tag_image(&outcome.image_id, &verdict)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expectations_parse() {
        let expect: Expect = "/hello/version.txt=1.4.2".parse().unwrap();
        assert_eq!(expect, Expect { path: "/hello/version.txt".into(), text: "1.4.2".into() });
        assert_eq!("/health".parse::<Expect>().unwrap().text, "");
        assert!("hello=1".parse::<Expect>().is_err());
    }
}

//! The service registry, in Eureka's role. Instances register themselves: the image's agent
//! (`bakery-agent`, a systemd unit in every base image) reads the instance's user data and
//! reports `STARTING` until the app's health URL answers, then `UP`, and `DOWN` when it stops
//! answering; a clean stop deregisters. The launcher never writes an instance's own status: it
//! holds a group's instances `OUT_OF_SERVICE` while the group is out of traffic and lets them go
//! when it puts the group back, as Asgard did through Eureka.
//!
//! Where it lives is the provider's: etcd on this host ([`etcd`]), AWS Cloud Map on aws
//! (`launch::aws::cloudmap`). Both present instances as [`Instance`].

mod etcd;

pub use etcd::{Error, Registry};
use serde::{Deserialize, Serialize};

/// Eureka's words for an instance's state.
pub const STARTING: &str = "STARTING";
pub const UP: &str = "UP";
pub const DOWN: &str = "DOWN";
pub const OUT_OF_SERVICE: &str = "OUT_OF_SERVICE";

/// What an instance's agent registers.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Registration {
    pub app: String,
    pub cluster: String,
    pub group: String,
    pub instance_id: String,
    pub address: String,
    pub port: u16,
    pub zone: String,
    pub version: String,
    /// As the agent reports it: `STARTING`, `UP` or `DOWN`.
    pub status: String,
    /// Unix seconds the instance last turned `UP` (0: never).
    pub up_since: u64,
    /// Unix seconds of the agent's last report.
    pub last_heartbeat: u64,
}

/// One instance as the registry presents it: what it reports, and the status clients see
/// (`OUT_OF_SERVICE` while the launcher holds its group out of traffic).
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Instance {
    #[serde(flatten)]
    pub registration: Registration,
    pub reported_status: String,
}

impl Instance {
    /// `registration` as clients see it, given whether the launcher holds it out of service.
    pub fn new(mut registration: Registration, out_of_service: bool) -> Instance {
        let reported_status = registration.status.clone();
        if out_of_service {
            registration.status = OUT_OF_SERVICE.to_string();
        }
        Instance { registration, reported_status }
    }
}

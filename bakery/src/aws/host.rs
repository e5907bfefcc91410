//! The EC2 host a bake runs on (attach mode): who we are, from IMDSv2, and where an attached
//! volume shows up, including Nitro's NVMe names whose serial carries the volume id.

use nix::fcntl::{Flock, FlockArg};
use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The instance and zone this process runs in.
#[derive(Debug, Clone)]
pub struct Identity {
    pub instance_id: String,
    pub zone: String,
}

/// The metadata service the SDK would use: `AWS_EC2_METADATA_SERVICE_ENDPOINT` or the link-local
/// address; `None` when `AWS_EC2_METADATA_DISABLED=true`.
pub fn metadata_endpoint() -> Option<String> {
    if std::env::var("AWS_EC2_METADATA_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true")) {
        return None;
    }
    Some(std::env::var("AWS_EC2_METADATA_SERVICE_ENDPOINT").unwrap_or_else(|_| "http://169.254.169.254".to_string()))
}

/// Asks IMDSv2 at `base` through the SDK's own metadata client (a session token first, as
/// IMDSv2-only hosts require). `None` off EC2, or when the service does not answer within
/// `timeout`.
pub async fn identify(base: &str, timeout: Duration) -> Option<Identity> {
    let client = aws_config::imds::Client::builder()
        .endpoint(base)
        .ok()?
        .max_attempts(1)
        .connect_timeout(timeout)
        .read_timeout(timeout)
        .build();
    let get = |path: &'static str| {
        let client = client.clone();
        async move { client.get(format!("/latest/meta-data/{path}")).await.ok().map(|v| v.as_ref().to_string()) }
    };
    Some(Identity { instance_id: get("instance-id").await?, zone: get("placement/availability-zone").await? })
}

/// The device names EC2 accepts for data volumes, in the order we try them.
const LETTERS: &str = "fghijklmnop";

/// Held while a device name is chosen and until the attachment is visible, so two bakes on
/// one host never pick the same name.
pub fn lock_devices() -> std::io::Result<Flock<File>> {
    std::fs::create_dir_all("/run/lock")?;
    let file = File::create("/run/lock/bakery-attach.lock")?;
    Flock::lock(file, FlockArg::LockExclusive).map_err(|(_, e)| e.into())
}

/// The first `/dev/sd[f-p]` that neither EC2 (`in_use`) nor this kernel knows about.
pub fn free_device(in_use: &BTreeSet<String>) -> Option<String> {
    LETTERS.chars().map(|l| format!("/dev/sd{l}")).find(|name| {
        let xen = name.replace("/dev/sd", "/dev/xvd");
        !in_use.contains(name) && !in_use.contains(&xen) && !Path::new(name).exists() && !Path::new(&xen).exists()
    })
}

/// Where the kernel put the volume attached as `requested`: the name itself, its Xen `xvd`
/// form, or the NVMe disk whose serial is the volume id without its dash.
pub fn find_device(volume_id: &str, requested: &str) -> Option<PathBuf> {
    let xen = requested.replace("/dev/sd", "/dev/xvd");
    if let Some(found) = [requested, xen.as_str()].into_iter().map(PathBuf::from).find(|p| p.exists()) {
        return Some(found);
    }
    let serial = volume_id.replace('-', "");
    std::fs::read_dir("/sys/block").ok()?.flatten().find_map(|entry| {
        let name = entry.file_name().to_string_lossy().into_owned();
        let found = std::fs::read_to_string(entry.path().join("device/serial")).ok()?;
        (name.starts_with("nvme") && found.trim() == serial).then(|| PathBuf::from("/dev").join(name))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_free_device_skips_names_ec2_reports_in_use_in_either_form() {
        let in_use = BTreeSet::from(["/dev/sdf".to_string(), "/dev/xvdg".to_string()]);
        assert_eq!(free_device(&in_use).as_deref(), Some("/dev/sdh"));
        let all: BTreeSet<String> = LETTERS.chars().map(|l| format!("/dev/sd{l}")).collect();
        assert_eq!(free_device(&all), None);
    }

    #[test]
    fn identify_gives_up_quickly_when_there_is_no_metadata_service() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        assert!(runtime.block_on(identify(&format!("http://127.0.0.1:{port}"), Duration::from_millis(500))).is_none());
    }
}

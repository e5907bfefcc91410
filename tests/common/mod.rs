//! Shared harness for the end-to-end tests: they run the real `bakery` binary as root on real
//! loop devices, with the real Debian base image, in one state directory per test run.

#![allow(dead_code)] // each test binary uses its own part of the harness

pub mod aws;
pub mod browser;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard, OnceLock};

pub const BASE: &str = "debian12-jre17-tomcat10";

pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

/// The state directory shared by the tests (the base image is built into it once).
pub fn state_dir() -> PathBuf {
    std::env::var_os("BAKERY_TEST_STATE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/bakery-test"))
}

/// Tests that check for leaks must not overlap: one bake at a time unless a test says otherwise.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn bakery() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_bakery"));
    command.env("BAKERY_STATE_DIR", state_dir()).env_remove("BAKERY_PROVIDER").current_dir(workspace());
    command
}

pub fn run(args: &[&str]) -> Output {
    bakery().args(args).output().expect("bakery runs")
}

/// Runs bakery with `--output json` and parses the one object it prints.
pub fn run_json(args: &[&str]) -> (i32, Value, String) {
    let output = bakery().args(args).arg("--output").arg("json").output().expect("bakery runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let value: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("stdout is one JSON object ({e}): {stdout:?}\nstderr: {stderr}"));
    (output.status.code().unwrap_or(-1), value, stderr)
}

/// Builds the base image once per state directory (cached by recipe hash afterwards).
pub fn base_image() -> String {
    static BASE_ID: OnceLock<String> = OnceLock::new();
    BASE_ID
        .get_or_init(|| {
            let recipe = format!("base-images/{BASE}.toml");
            let (code, value, stderr) = run_json(&["base", "build", &recipe]);
            assert_eq!(code, 0, "base build failed: {stderr}");
            value["image_id"].as_str().unwrap().to_string()
        })
        .clone()
}

/// The sample app package for `version`, built by the project's script into `dir`.
pub fn sample_package(dir: &Path, version: &str, payload_mib: u32) -> PathBuf {
    sample_package_with(dir, version, &["--payload-mib", &payload_mib.to_string()])
}

/// The sample app package with more of the script's options (`--start-delay-ms`, faults,
/// `--format deb`…): the path the script prints.
pub fn sample_package_with(dir: &Path, version: &str, options: &[&str]) -> PathBuf {
    let output = Command::new(workspace().join("scripts/build-sample-app"))
        .args(["--version", version])
        .args(options)
        .arg("--out")
        .arg(dir)
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap();
    assert!(output.status.success());
    PathBuf::from(String::from_utf8(output.stdout).unwrap().trim())
}

pub fn sha256_file(path: &Path) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    std::io::copy(&mut std::fs::File::open(path).unwrap(), &mut hasher).unwrap();
    hex::encode(hasher.finalize())
}

pub fn image_ids() -> Vec<String> {
    let (code, value, stderr) = run_json(&["images", "list"]);
    assert_eq!(code, 0, "{stderr}");
    value.as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap().to_string()).collect()
}

/// Everything a bake may create and must not leave: loop devices and mounts on the state
/// directory, volumes, scratch files, journals.
pub fn leftovers() -> Vec<String> {
    let state = state_dir();
    let mut found = Vec::new();
    let losetup =
        Command::new("losetup").args(["--list", "--noheadings", "--output", "NAME,BACK-FILE"]).output().unwrap();
    // The copy-on-write pool bakery makes on a state directory without reflink stays mounted.
    let pool = format!("{}/cow.xfs", state.display());
    for line in String::from_utf8_lossy(&losetup.stdout).lines() {
        if line.contains(&format!("{}/", state.display())) && !line.trim_end().ends_with(&pool) {
            found.push(format!("loop device: {line}"));
        }
    }
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    for line in mounts.lines() {
        let point = line.split(' ').nth(4).unwrap_or_default();
        if point.starts_with(&*state.join("mnt").to_string_lossy())
            || point.starts_with(&*state.join("tmp").to_string_lossy())
        {
            found.push(format!("mount: {point}"));
        }
    }
    // Volumes live on the state directory, or on its copy-on-write pool (cow/) when it has no
    // reflink; the aws provider's mirrors keep theirs under aws/<region>/.
    let mut dirs: Vec<PathBuf> = ["mnt", "tmp", "journal", "instances"].map(PathBuf::from).into();
    for cow in [PathBuf::new(), PathBuf::from("cow")] {
        dirs.push(cow.join("volumes"));
        let mirrors = std::fs::read_dir(state.join(&cow).join("aws")).into_iter().flatten().flatten();
        dirs.extend(mirrors.map(|region| cow.join("aws").join(region.file_name()).join("volumes")));
    }
    for dir in dirs {
        let dir = dir.display().to_string();
        if let Ok(entries) = std::fs::read_dir(state.join(&dir)) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !name.ends_with(".lock") && !is_registry_journal(&entry.path()) {
                    found.push(format!("{dir}/{name}"));
                }
            }
        }
    }
    found
}

/// The service registry (etcd) runs for the whole state directory, like the copy-on-write pool:
/// its journal is not a leftover of any one test.
fn is_registry_journal(path: &Path) -> bool {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    name.starts_with("registry-") && path.parent().is_some_and(|p| p.ends_with("journal"))
}

pub fn assert_no_leftovers(context: &str) {
    let found = leftovers();
    assert!(found.is_empty(), "{context}: left behind {found:#?}");
}

/// Mounts the root partition of an exported raw disk read-only; unmounts on drop.
pub struct MountedDisk {
    pub root: tempfile::TempDir,
    device: String,
}

impl MountedDisk {
    pub fn new(disk: &Path) -> MountedDisk {
        let root_partition = bakery::gpt::root_partition(disk).unwrap();
        let out = Command::new("losetup")
            .args(["--find", "--show", "--read-only", "--offset", &root_partition.offset().to_string()])
            .arg(disk)
            .output()
            .unwrap();
        assert!(out.status.success());
        let device = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let root = tempfile::tempdir().unwrap();
        let status = Command::new("mount").args(["-o", "ro,noload", &device]).arg(root.path()).status().unwrap();
        assert!(status.success(), "mounting the exported root");
        MountedDisk { root, device }
    }

    pub fn path(&self, inside: &str) -> PathBuf {
        self.root.path().join(inside.trim_start_matches('/'))
    }
}

impl Drop for MountedDisk {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.root.path()).status();
        let _ = Command::new("losetup").args(["--detach", &self.device]).status();
    }
}

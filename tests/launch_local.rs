//! The launcher's local provider on this host, with real instances and a real HAProxy: a
//! red/black flip and its rollback under load without one failed request, a balancer that
//! restarts and gets its servers back, and `bakery gc` sparing live instances but reclaiming
//! those whose process was killed.

mod common;

use bakery::launch::cloud::{Capacity, Cloud, GroupSpec, Health};
use bakery::launch::local::LocalCloud;
use common::*;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Bakes the sample app built with `options` as `version`; returns the image id.
fn bake_sample(version: &str, options: &[&str]) -> String {
    base_image();
    let dir = tempfile::tempdir().unwrap();
    let package = sample_package_with(dir.path(), version, options).to_string_lossy().into_owned();
    let (code, baked, stderr) = run_json(&[
        "bake",
        "--base",
        BASE,
        "--recipe",
        "recipes/tomcat-webapp.toml",
        "--package",
        &package,
        "--app",
        "hello",
        "--version",
        version,
    ]);
    assert_eq!(code, 0, "{stderr}");
    baked["image_id"].as_str().unwrap().to_string()
}

/// Two versions of the sample app, baked once per run.
fn images() -> &'static (String, String) {
    static IMAGES: OnceLock<(String, String)> = OnceLock::new();
    IMAGES.get_or_init(|| (bake_sample("9.1.0", &[]), bake_sample("9.2.0", &[])))
}

fn spec(cluster: &str, version: u32, image: &str, desired: u32) -> GroupSpec {
    GroupSpec {
        name: format!("{cluster}-v{version:03}"),
        cluster: cluster.to_string(),
        image_id: image.to_string(),
        launch: Default::default(),
        ancestor: None,
        capacity: Capacity { min: desired, max: desired, desired },
        subnets: Vec::new(),
        target_groups: Vec::new(),
        health_url: "/hello/health".into(),
        registry_namespace: None,
        deploy_id: bakery::ids::new_id("deploy"),
    }
}

/// A cluster name of its own per test, so that runs never see each other's state.
fn new_cluster() -> String {
    bakery::ids::new_id("hello").replace('-', "")
}

/// Destroys a test's cluster however the test ends, so that a failure leaves no instances running
/// into the next test.
struct Cleanup<'a>(&'a str);

impl Drop for Cleanup<'_> {
    fn drop(&mut self) {
        let _ = std::process::Command::new(env!("CARGO_BIN_EXE_launcher"))
            .env("BAKERY_STATE_DIR", state_dir())
            .args(["destroy", "--provider", "local", "--cluster", self.0])
            .output();
    }
}

fn wait_healthy(cloud: &LocalCloud, cluster: &str, group: &str, count: usize) {
    let deadline = Instant::now() + Duration::from_secs(240);
    loop {
        let groups = cloud.groups(cluster).unwrap();
        let members = &groups.iter().find(|g| g.name == group).expect("group exists").members;
        if members.len() == count && members.iter().all(|m| m.health == Health::Healthy) {
            return;
        }
        assert!(!members.iter().any(|m| m.health == Health::Unhealthy), "an instance died: {members:?}");
        assert!(Instant::now() < deadline, "not healthy in time: {members:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn get(agent: &ureq::Agent, url: &str) -> Result<String, String> {
    match agent.get(url).call() {
        Ok(response) => response.into_string().map(|body| body.trim().to_string()).map_err(|e| e.to_string()),
        Err(error) => Err(error.to_string()),
    }
}

fn versions_seen(balancer: &str, requests: usize) -> BTreeSet<String> {
    let agent = bakery::verify::http_agent();
    let url = format!("{balancer}/hello/version.txt");
    (0..requests).map(|_| get(&agent, &url).unwrap_or_else(|e| panic!("GET {url}: {e}"))).collect()
}

/// What clients saw: responses by version, and the requests that failed.
#[derive(Default)]
struct Tally {
    seen: BTreeMap<String, u64>,
    failures: Vec<String>,
}

/// Clients requesting the version through the balancer until stopped, on kept-alive connections.
struct Hammer {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<Tally>>,
}

impl Hammer {
    fn start(balancer: &str) -> Hammer {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..4)
            .map(|_| {
                let (stop, url) = (stop.clone(), format!("{balancer}/hello/version.txt"));
                std::thread::spawn(move || {
                    let agent = bakery::verify::http_agent();
                    let mut tally = Tally::default();
                    while !stop.load(Ordering::Relaxed) {
                        match get(&agent, &url) {
                            Ok(version) => *tally.seen.entry(version).or_insert(0) += 1,
                            Err(error) => tally.failures.push(error),
                        }
                    }
                    tally
                })
            })
            .collect();
        Hammer { stop, threads }
    }

    fn finish(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        let mut total = Tally::default();
        for thread in self.threads {
            let tally = thread.join().unwrap();
            for (version, count) in tally.seen {
                *total.seen.entry(version).or_insert(0) += count;
            }
            total.failures.extend(tally.failures);
        }
        total
    }
}

/// Puts `new` in service and takes `old` out while clients hammer the balancer.
fn flip(cloud: &LocalCloud, balancer: &str, new: &str, old: &str) {
    let hammer = Hammer::start(balancer);
    std::thread::sleep(Duration::from_millis(500));
    cloud.add_to_service(new).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    cloud.remove_from_service(old, 1_700_000_000).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let Tally { seen, failures } = hammer.finish();
    eprintln!("flipping to {new}: responses by version {seen:?}, {} failed", failures.len());
    assert!(failures.is_empty(), "{} failed requests while flipping to {new}: {failures:?}", failures.len());
    assert!(seen.values().sum::<u64>() > 100, "the clients kept requesting: {seen:?}");
}

fn group_file(cluster: &str, group: &str) -> Value {
    let path = state_dir().join(format!("clusters/{cluster}/groups/{group}.json"));
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

/// Processes whose command line names the state directory (instances, balancers), but for
/// the state directory's service registry, which outlives clusters.
fn processes_on_state_dir() -> Vec<String> {
    let needle = state_dir().to_string_lossy().into_owned();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(cmdline) = std::fs::read(entry.path().join("cmdline")) {
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            if cmdline.contains(&needle) && !cmdline.starts_with("etcd ") {
                found.push(format!("{}: {cmdline}", entry.file_name().to_string_lossy()));
            }
        }
    }
    found
}

fn kill(pid: i64) {
    let pid = nix::unistd::Pid::from_raw(pid as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL).unwrap();
    while std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| !stat.contains(") Z ")) {
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn red_black_flip_and_rollback_under_load_fail_no_request() {
    let _serial = serial();
    let (v1, v2) = images();
    let cloud = LocalCloud::open(&state_dir()).unwrap();
    let cluster = new_cluster();
    let _cleanup = Cleanup(&cluster);
    let (old, new) = (spec(&cluster, 0, v1, 3), spec(&cluster, 1, v2, 3));

    cloud.create_group(&old).unwrap();
    cloud.create_group(&old).expect("creating an existing group again is a success");
    wait_healthy(&cloud, &cluster, &old.name, 3);
    let groups = cloud.groups(&cluster).unwrap();
    let zones: BTreeSet<_> = groups[0].members.iter().map(|m| m.zone.as_str()).collect();
    assert_eq!(zones, BTreeSet::from(["local-a", "local-b", "local-c"]));
    let addresses: BTreeSet<_> = groups[0].members.iter().map(|m| m.address.clone().unwrap()).collect();
    assert_eq!(addresses.len(), 3, "each instance on its own address: {addresses:?}");
    assert!(!groups[0].in_service);
    assert_eq!(cloud.balancer_url(&cluster), None, "no balancer before the first group goes in service");

    cloud.add_to_service(&old.name).unwrap();
    let balancer = cloud.balancer_url(&cluster).expect("a balancer");
    assert_eq!(versions_seen(&balancer, 30), BTreeSet::from(["9.1.0".to_string()]));

    cloud.create_group(&new).unwrap();
    wait_healthy(&cloud, &cluster, &new.name, 3);
    assert_eq!(versions_seen(&balancer, 30), BTreeSet::from(["9.1.0".to_string()]), "not in service yet");
    flip(&cloud, &balancer, &new.name, &old.name);
    assert_eq!(versions_seen(&balancer, 30), BTreeSet::from(["9.2.0".to_string()]));
    let groups = cloud.groups(&cluster).unwrap();
    let disabled = groups.iter().find(|g| g.name == old.name).unwrap();
    assert!(!disabled.in_service && disabled.suspended && disabled.disabled_at == Some(1_700_000_000));
    assert!(disabled.members.iter().all(|m| m.health == Health::Healthy), "its instances keep running");

    // Rollback: the old group back in, the new one out.
    flip(&cloud, &balancer, &old.name, &new.name);
    assert_eq!(versions_seen(&balancer, 30), BTreeSet::from(["9.1.0".to_string()]));

    // A balancer that dies (reboot, gc) comes back on the same URL with its servers.
    let state: Value =
        serde_json::from_slice(&std::fs::read(state_dir().join(format!("clusters/{cluster}/balancer.json"))).unwrap())
            .unwrap();
    kill(state["process"]["pid"].as_i64().unwrap());
    cloud.groups(&cluster).unwrap();
    assert_eq!(cloud.balancer_url(&cluster).as_deref(), Some(balancer.as_str()));
    assert_eq!(versions_seen(&balancer, 30), BTreeSet::from(["9.1.0".to_string()]));

    // Resizing an in-service group: the removed instance leaves the balancer first.
    let hammer = Hammer::start(&balancer);
    cloud.resize_group(&old.name, Capacity { min: 2, max: 2, desired: 2 }).unwrap();
    let failures = hammer.finish().failures;
    assert!(failures.is_empty(), "{failures:?}");
    let groups = cloud.groups(&cluster).unwrap();
    let resized = groups.iter().find(|g| g.name == old.name).unwrap();
    assert_eq!(resized.members.len(), 2);
    let zones: BTreeSet<_> = resized.members.iter().map(|m| m.zone.as_str()).collect();
    assert_eq!(zones.len(), 2, "zones stay balanced: {zones:?}");

    cloud.destroy_group(&new.name).unwrap();
    cloud.destroy_group(&old.name).unwrap();
    cloud.destroy_group(&old.name).expect("destroying a missing group is a success");
    cloud.remove_from_service(&old.name, 0).expect("disabling a missing group is a success");
    assert!(cloud.groups(&cluster).unwrap().is_empty());
    // Only the balancer is left, until the cluster is stopped.
    let left = leftovers();
    assert!(left.len() == 1 && left[0].starts_with("journal/balancer-"), "{left:#?}");
    assert_eq!(processes_on_state_dir().len(), 1, "{:#?}", processes_on_state_dir());
    assert_eq!(cloud.balancer_url(&cluster).as_deref(), Some(balancer.as_str()));
    cloud.stop_cluster(&cluster).unwrap();
    assert_eq!(cloud.balancer_url(&cluster), None);
    assert_no_leftovers("after destroying both groups and stopping the cluster");
    assert!(processes_on_state_dir().is_empty(), "{:#?}", processes_on_state_dir());
}

#[test]
fn gc_spares_live_instances_and_reclaims_killed_ones() {
    let _serial = serial();
    let (v1, _) = images();
    let cloud = LocalCloud::open(&state_dir()).unwrap();
    let cluster = new_cluster();
    let _cleanup = Cleanup(&cluster);
    let group = spec(&cluster, 0, v1, 2);
    cloud.create_group(&group).unwrap();
    wait_healthy(&cloud, &cluster, &group.name, 2);

    let (code, report, stderr) = run_json(&["gc"]);
    assert_eq!(code, 0, "{stderr}");
    let live = report["kept_live"].as_array().unwrap();
    assert_eq!(live.iter().filter(|l| l.as_str().unwrap().contains("live instance of")).count(), 2, "{report}");
    assert!(live.iter().any(|l| l.as_str().unwrap().contains("service registry")), "the registry runs: {report}");
    assert!(report["removed"].as_array().unwrap().is_empty(), "{report}");
    wait_healthy(&cloud, &cluster, &group.name, 2);

    let members = group_file(&cluster, &group.name)["members"].clone();
    kill(members[0]["process"]["pid"].as_i64().unwrap());
    let health: Vec<Health> = cloud.groups(&cluster).unwrap()[0].members.iter().map(|m| m.health).collect();
    assert_eq!(health, [Health::Unhealthy, Health::Healthy]);

    let (code, report, stderr) = run_json(&["gc"]);
    assert_eq!(code, 0, "{stderr}");
    let removed = report["removed"].to_string();
    assert!(removed.contains(members[0]["id"].as_str().unwrap()), "the dead instance is reclaimed: {report}");
    assert!(!removed.contains(members[1]["id"].as_str().unwrap()), "the live one is not: {report}");
    let dead_dir = state_dir().join("instances").join(members[0]["id"].as_str().unwrap());
    assert!(!dead_dir.exists());
    let members = &cloud.groups(&cluster).unwrap()[0].members;
    assert_eq!(members.iter().filter(|m| m.health == Health::Healthy).count(), 1, "the live one serves on");

    cloud.destroy_group(&group.name).unwrap();
    cloud.stop_cluster(&cluster).unwrap();
    assert_no_leftovers("after gc and destroying the group");
    assert!(processes_on_state_dir().is_empty(), "{:#?}", processes_on_state_dir());
}

/// `launcher` itself, on the local provider, with a quick health poll.
fn launcher_json(args: &[&str]) -> (i32, Value, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_launcher"))
        .env("BAKERY_STATE_DIR", state_dir())
        .env("LAUNCHER_POLL_INTERVAL", "500ms")
        .env_remove("BAKERY_PROVIDER")
        .args(args)
        .args(["--output", "json"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let value = serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout:?}\n{stderr}"));
    (output.status.code().unwrap_or(-1), value, stderr)
}

/// The demo (scripts/demo-launch) as a test: deploy v1, deploy v2, roll back, finish, through
/// the `launcher` command with clients on the balancer the whole time.
#[test]
fn the_launcher_deploys_flips_rolls_back_and_finishes_without_a_failed_request() {
    let _serial = serial();
    let (v1, v2) = images();
    let cluster = new_cluster();
    let _cleanup = Cleanup(&cluster);
    let deploy = |image: &str| {
        launcher_json(&["deploy", "--cluster", &cluster, "--image", image, "--health-url", "/hello/health"])
    };

    let (code, first, stderr) = deploy(v1);
    assert_eq!(code, 0, "{first}\n{stderr}");
    assert_eq!(first["new_group"], format!("{cluster}-v000"));
    let balancer = first["balancer_url"].as_str().unwrap().to_string();
    assert!(balancer.starts_with("http://127.0.0.1:"), "{balancer}");
    assert_eq!(versions_seen(&balancer, 30), BTreeSet::from(["9.1.0".to_string()]));

    let hammer = Hammer::start(&balancer);
    let (code, second, stderr) = deploy(v2);
    let Tally { seen, failures } = hammer.finish();
    assert_eq!(code, 0, "{second}\n{stderr}");
    assert!(failures.is_empty(), "{} requests failed during the deploy: {failures:?}", failures.len());
    eprintln!("deploy of v2: responses by version {seen:?}");
    assert_eq!(second["new_group"], format!("{cluster}-v001"));
    assert_eq!(second["previous_group"], format!("{cluster}-v000"));
    assert!(second["steps"].as_array().unwrap().iter().all(|s| s["outcome"] == "ok"), "{second}");
    assert_eq!(versions_seen(&balancer, 30), BTreeSet::from(["9.2.0".to_string()]));

    let (code, status, _) = launcher_json(&["status", "--cluster", &cluster]);
    assert_eq!(code, 0);
    let serving: Vec<bool> = status["groups"].as_array().unwrap().iter().map(|g| g["in_service"] == true).collect();
    assert_eq!(serving.iter().filter(|s| **s).count(), 1, "{status}");

    let hammer = Hammer::start(&balancer);
    let started = Instant::now();
    let (code, rollback, stderr) = launcher_json(&["rollback", "--cluster", &cluster]);
    let took = started.elapsed();
    let Tally { failures, .. } = hammer.finish();
    assert_eq!(code, 0, "{rollback}\n{stderr}");
    assert!(failures.is_empty(), "{} requests failed during the rollback: {failures:?}", failures.len());
    eprintln!("rollback took {took:?}");
    assert_eq!(versions_seen(&balancer, 30), BTreeSet::from(["9.1.0".to_string()]));

    let (code, finished, stderr) = launcher_json(&["finish", "--cluster", &cluster, "--soak", "0s"]);
    assert_eq!(code, 0, "{finished}\n{stderr}");
    let (_, status, _) = launcher_json(&["status", "--cluster", &cluster]);
    let groups: Vec<&str> = status["groups"].as_array().unwrap().iter().map(|g| g["name"].as_str().unwrap()).collect();
    assert_eq!(groups, [format!("{cluster}-v000")], "finish destroyed the disabled group");

    let (code, destroyed, stderr) = launcher_json(&["destroy", "--cluster", &cluster]);
    assert_eq!(code, 0, "{destroyed}\n{stderr}");
    assert_eq!(LocalCloud::open(&state_dir()).unwrap().balancer_url(&cluster), None, "the balancer is stopped");
    assert_no_leftovers("after the demo");
    assert!(processes_on_state_dir().is_empty(), "{:#?}", processes_on_state_dir());
}

/// A deploy killed with SIGKILL during its health gate leaves its lock, its record and its new
/// group behind; the rerun takes the dead holder's lock over, adopts the group and finishes.
#[test]
fn a_deploy_killed_in_its_gate_converges_when_run_again() {
    let _serial = serial();
    let (v1, v2) = images();
    let cluster = new_cluster();
    let _cleanup = Cleanup(&cluster);
    let deploy_args = |image: &str| {
        ["deploy", "--cluster", &cluster, "--image", image, "--health-url", "/hello/health"].map(str::to_string)
    };
    let (code, first, stderr) = launcher_json(&deploy_args(v1).each_ref().map(String::as_str));
    assert_eq!(code, 0, "{first}\n{stderr}");

    let mut killed = std::process::Command::new(env!("CARGO_BIN_EXE_launcher"))
        .env("BAKERY_STATE_DIR", state_dir())
        .env("LAUNCHER_POLL_INTERVAL", "500ms")
        .args(deploy_args(v2))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let record = state_dir().join(format!("clusters/{cluster}/deploy.json"));
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let saved: Value = serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
        let gate_started = saved["image_id"] == v2.as_str() && saved["steps"][0]["outcome"] == "ok";
        if gate_started {
            break;
        }
        assert!(killed.try_wait().unwrap().is_none(), "the deploy ended before its gate: {saved}");
        assert!(Instant::now() < deadline, "the deploy never created its group: {saved}");
        std::thread::sleep(Duration::from_millis(100));
    }
    killed.kill().unwrap();
    killed.wait().unwrap();

    let (code, rerun, stderr) = launcher_json(&deploy_args(v2).each_ref().map(String::as_str));
    assert_eq!(code, 0, "{rerun}\n{stderr}");
    assert_eq!(rerun["new_group"], format!("{cluster}-v001"), "the killed deploy's group is adopted: {rerun}");
    assert_eq!(rerun["steps"][0]["outcome"], "skipped", "{rerun}");
    let (_, status, _) = launcher_json(&["status", "--cluster", &cluster]);
    let groups: Vec<(String, bool)> = status["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| (g["name"].as_str().unwrap().to_string(), g["in_service"] == true))
        .collect();
    assert_eq!(groups, [(format!("{cluster}-v000"), false), (format!("{cluster}-v001"), true)], "{status}");
    let balancer = rerun["balancer_url"].as_str().unwrap();
    assert_eq!(versions_seen(balancer, 30), BTreeSet::from(["9.2.0".to_string()]));
}

/// The registry's view of a cluster (`launcher registry list`), by instance id.
fn registered(cluster: &str) -> BTreeMap<String, Value> {
    let (code, listed, stderr) = launcher_json(&["registry", "list", "--cluster", cluster]);
    assert_eq!(code, 0, "{listed}\n{stderr}");
    listed.as_array().unwrap().iter().map(|i| (i["instance_id"].as_str().unwrap().to_string(), i.clone())).collect()
}

/// Polls the registry until `done` holds, for at most `limit`; the last view otherwise.
fn registry_until(
    cluster: &str,
    limit: Duration,
    done: impl Fn(&BTreeMap<String, Value>) -> bool,
) -> BTreeMap<String, Value> {
    let deadline = Instant::now() + limit;
    loop {
        let seen = registered(cluster);
        if done(&seen) || Instant::now() > deadline {
            return seen;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn statuses(seen: &BTreeMap<String, Value>, group: &str) -> Vec<String> {
    seen.values().filter(|i| i["group"] == group).map(|i| i["status"].as_str().unwrap().to_string()).collect()
}

/// The pid of the registration agent running in `instance` (the user data it reads, seen
/// through its own root, names the instance).
fn agent_of(instance: &str) -> nix::unistd::Pid {
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let user_data = std::fs::read_to_string(entry.path().join("root/etc/bakery/instance.env")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains("bakery-agent") && user_data.contains(instance) {
            return nix::unistd::Pid::from_raw(entry.file_name().to_string_lossy().parse().unwrap());
        }
    }
    panic!("no bakery-agent runs in {instance}");
}

/// Instances register themselves (etcd, through the image's agent); a deploy flips only once
/// every new instance is UP there; the group taken out of traffic is OUT_OF_SERVICE in the
/// registry and comes back UP on rollback; an agent that stops beating drops out within its
/// lease, and a destroyed group deregisters.
#[test]
fn instances_register_and_the_flip_waits_for_the_registry() {
    let _serial = serial();
    let (v1, _) = images();
    // Healthy (and so UP) only 8 s after Tomcat starts it: registers late.
    let late = bake_sample("9.3.0", &["--start-delay-ms", "8000"]);
    let cluster = new_cluster();
    let _cleanup = Cleanup(&cluster);
    let deploy = |image: &str| {
        launcher_json(&["deploy", "--cluster", &cluster, "--image", image, "--health-url", "/hello/health"])
    };

    let (code, first, stderr) = deploy(v1);
    assert_eq!(code, 0, "{first}\n{stderr}");
    let (old, balancer) = (format!("{cluster}-v000"), first["balancer_url"].as_str().unwrap().to_string());
    let seen = registered(&cluster);
    assert_eq!(statuses(&seen, &old), ["UP", "UP", "UP"], "{seen:#?}");
    let instance = seen.values().next().unwrap();
    // A cluster with neither stack nor detail is its app's name (Frigga).
    assert_eq!(
        (instance["app"].as_str(), instance["cluster"].as_str()),
        (Some(cluster.as_str()), Some(cluster.as_str()))
    );
    assert_eq!(instance["version"], "9.1.0");
    let zones: BTreeSet<&str> = seen.values().map(|i| i["zone"].as_str().unwrap()).collect();
    assert_eq!(zones, BTreeSet::from(["local-a", "local-b", "local-c"]));
    let (_, status, _) = launcher_json(&["status", "--cluster", &cluster]);
    let members = status["groups"][0]["members"].as_array().unwrap();
    assert!(members.iter().all(|m| m["registry_status"] == "UP"), "{status}");

    // Watch the balancer for the first answer from the late version while it deploys.
    let watcher = {
        let url = format!("{balancer}/hello/version.txt");
        std::thread::spawn(move || {
            let agent = bakery::verify::http_agent();
            let deadline = Instant::now() + Duration::from_secs(600);
            while Instant::now() < deadline {
                if get(&agent, &url).is_ok_and(|v| v == "9.3.0") {
                    return std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            panic!("the balancer never answered 9.3.0");
        })
    };
    let (code, second, stderr) = deploy(&late);
    assert_eq!(code, 0, "{second}\n{stderr}");
    let first_served = watcher.join().unwrap();
    let new = format!("{cluster}-v001");
    let seen = registered(&cluster);
    assert_eq!(statuses(&seen, &new), ["UP", "UP", "UP"], "{seen:#?}");
    assert_eq!(statuses(&seen, &old), ["OUT_OF_SERVICE"; 3], "the old group is held out of traffic: {seen:#?}");
    let last_up = seen.values().filter(|i| i["group"] == new).map(|i| i["up_since"].as_u64().unwrap()).max().unwrap();
    assert!(last_up > 0 && last_up <= first_served, "UP at {last_up}, yet served at {first_served}");
    assert!(stderr.contains("UP in the registry"), "the gate shows what it waits for: {stderr}");

    // An agent that stops beating: its registration expires with its 10 s lease.
    let (frozen, _) = seen.iter().find(|(_, i)| i["group"] == new).unwrap();
    let agent = agent_of(frozen);
    nix::sys::signal::kill(agent, nix::sys::signal::Signal::SIGSTOP).unwrap();
    let gone = registry_until(&cluster, Duration::from_secs(40), |seen| !seen.contains_key(frozen));
    nix::sys::signal::kill(agent, nix::sys::signal::Signal::SIGCONT).unwrap();
    assert!(!gone.contains_key(frozen), "still registered after its agent stopped: {gone:#?}");
    let back =
        registry_until(&cluster, Duration::from_secs(40), |seen| seen.get(frozen).is_some_and(|i| i["status"] == "UP"));
    assert_eq!(back[frozen]["status"], "UP", "it registers again once its agent beats: {back:#?}");

    let (code, rollback, stderr) = launcher_json(&["rollback", "--cluster", &cluster]);
    assert_eq!(code, 0, "{rollback}\n{stderr}");
    let seen = registered(&cluster);
    assert_eq!(statuses(&seen, &old), ["UP", "UP", "UP"], "{seen:#?}");
    assert_eq!(statuses(&seen, &new), ["OUT_OF_SERVICE"; 3], "{seen:#?}");

    let (code, destroyed, stderr) = launcher_json(&["destroy", "--cluster", &cluster]);
    assert_eq!(code, 0, "{destroyed}\n{stderr}");
    assert!(registered(&cluster).is_empty(), "instances deregister as they stop");
    assert_no_leftovers("after destroying a registered cluster");
}

/// The deploy record as `launcher status` shows it.
fn deploy_record(cluster: &str) -> Value {
    let (code, status, stderr) = launcher_json(&["status", "--cluster", cluster]);
    assert_eq!(code, 0, "{status}\n{stderr}");
    status["deploy"].clone()
}

fn watcher() -> std::process::Child {
    std::process::Command::new(env!("CARGO_BIN_EXE_launcher"))
        .env("BAKERY_STATE_DIR", state_dir())
        .args(["watch", "--interval", "1s"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap()
}

/// The watched soak, under clients: a bad version (30 % of requests fail, its health check
/// passes) is switched back by the soak, with the reason on record and no failed request once
/// back; a watcher killed mid-soak and started again still switches back; a good version's soak
/// runs its course and destroys the old groups.
#[test]
fn the_soak_switches_a_bad_version_back_by_itself_and_a_clean_one_finishes() {
    let _serial = serial();
    let (v1, good) = images();
    let bad = bake_sample("9.4.0", &["--error-ratio", "0.3"]);
    let cluster = new_cluster();
    let _cleanup = Cleanup(&cluster);
    let deploy = |image: &str, soak: &[&str]| {
        let mut args = vec!["deploy", "--cluster", &cluster, "--image", image, "--health-url", "/hello/health"];
        args.extend(soak);
        launcher_json(&args)
    };
    let judged_fast = ["--window", "5s", "--min-requests", "20"];

    let (code, first, stderr) = deploy(v1, &[]);
    assert_eq!(code, 0, "{first}\n{stderr}");
    let balancer = first["balancer_url"].as_str().unwrap().to_string();

    let hammer = Hammer::start(&balancer);
    let (code, switched, stderr) = deploy(&bad, &[&["--soak", "3m", "--watch"][..], &judged_fast].concat());
    let during = hammer.finish();
    assert_eq!(code, 6, "a breached soak exits 6: {switched}\n{stderr}");
    assert_eq!(switched["action"], "rollback", "{switched}");
    assert!(switched["message"].as_str().unwrap().starts_with("automatic rollback: breach in"), "{switched}");
    assert!(switched["soak"]["verdict"].as_str().unwrap().contains("requests failed"), "{switched}");
    eprintln!("bad version soak: {} failed of {:?}", during.failures.len(), during.seen);
    let after = Hammer::start(&balancer);
    std::thread::sleep(Duration::from_secs(3));
    let Tally { seen, failures } = after.finish();
    assert!(failures.is_empty(), "{} requests failed after the switch-back: {failures:?}", failures.len());
    assert_eq!(seen.keys().collect::<Vec<_>>(), ["9.1.0"], "{seen:?}");
    assert_eq!(deploy_record(&cluster)["soak"], switched["soak"], "status shows the soak and its verdict");

    // Soaking with no watcher; a watcher that dies mid-soak and starts again still acts.
    let (code, soaking, stderr) = deploy(&bad, &[&["--soak", "3m"][..], &judged_fast].concat());
    assert_eq!((code, soaking["phase"].as_str()), (0, Some("soaking")), "{soaking}\n{stderr}");
    let mut killed = watcher();
    std::thread::sleep(Duration::from_millis(1500));
    killed.kill().unwrap();
    killed.wait().unwrap();
    let hammer = Hammer::start(&balancer);
    let mut restarted = watcher();
    let deadline = Instant::now() + Duration::from_secs(120);
    let record = loop {
        let record = deploy_record(&cluster);
        if record["action"] == "rollback" && record["phase"] == "succeeded" || Instant::now() > deadline {
            break record;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    restarted.kill().unwrap();
    restarted.wait().unwrap();
    hammer.finish();
    assert_eq!(record["action"], "rollback", "the restarted watcher switched back: {record}");
    assert_eq!(versions_seen(&balancer, 30), BTreeSet::from(["9.1.0".to_string()]));

    // A good version: the soak runs its course, then the old groups go.
    let hammer = Hammer::start(&balancer);
    let (code, passed, stderr) = deploy(good, &[&["--soak", "8s", "--watch"][..], &judged_fast].concat());
    let Tally { failures, .. } = hammer.finish();
    assert_eq!(code, 0, "{passed}\n{stderr}");
    assert!(failures.is_empty(), "{failures:?}");
    assert_eq!((passed["action"].as_str(), passed["phase"].as_str()), (Some("finish"), Some("succeeded")), "{passed}");
    let (_, status, _) = launcher_json(&["status", "--cluster", &cluster]);
    let groups: Vec<&str> = status["groups"].as_array().unwrap().iter().map(|g| g["name"].as_str().unwrap()).collect();
    assert_eq!(groups, [format!("{cluster}-v003")], "only the soaked group is left");
    assert_eq!(versions_seen(&balancer, 30), BTreeSet::from(["9.2.0".to_string()]));

    let (code, destroyed, stderr) = launcher_json(&["destroy", "--cluster", &cluster]);
    assert_eq!(code, 0, "{destroyed}\n{stderr}");
    assert_no_leftovers("after the soaks");
}

/// `launcher` on the local provider when it may fail: exit code, stdout, stderr.
fn launcher_raw(args: &[&str]) -> (i32, String, String) {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_launcher"))
        .env("BAKERY_STATE_DIR", state_dir())
        .env_remove("BAKERY_PROVIDER")
        .args(args)
        .output()
        .unwrap();
    let text = |bytes: &[u8]| String::from_utf8_lossy(bytes).into_owned();
    (output.status.code().unwrap_or(-1), text(&output.stdout), text(&output.stderr))
}

/// v1 deployed as `cluster` through `launcher`; its balancer's URL.
fn deploy_v1(cluster: &str) -> String {
    let (v1, _) = images();
    let (code, first, stderr) =
        launcher_json(&["deploy", "--cluster", cluster, "--image", v1, "--health-url", "/hello/health"]);
    assert_eq!(code, 0, "{first}\n{stderr}");
    first["balancer_url"].as_str().unwrap().to_string()
}

/// Chaos Monkey on a local cluster under clients, with the watcher healing: a cluster that did
/// not opt in is refused, a dry run kills nothing, and a kill every 15 s for 90 s takes an
/// instance down abruptly without a failed client request; each time the group is back to 3
/// healthy instances `UP` in the registry, with the replacement on record and the kill in the
/// audit log.
#[test]
fn chaos_monkey_kills_and_the_group_heals_without_a_failed_request() {
    let _serial = serial();
    let cluster = new_cluster();
    let _cleanup = Cleanup(&cluster);
    let balancer = deploy_v1(&cluster);
    let group = format!("{cluster}-v000");

    let (code, _, stderr) = launcher_raw(&["chaos", "kill", "--cluster", &cluster]);
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("has not opted in"), "{stderr}");
    let (code, _, stderr) = launcher_raw(&["chaos", "enable", "--cluster", &cluster, "--window", "9-15"]);
    assert_eq!(code, 3, "{stderr}");
    let (code, enabled, stderr) = launcher_json(&["chaos", "enable", "--cluster", &cluster]);
    assert_eq!((code, &enabled["window"]), (0, &json!("09:00-15:00")), "{stderr}");
    let (code, dry, stderr) = launcher_json(&["chaos", "kill", "--cluster", &cluster, "--dry-run"]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(dry[0]["result"], "dry run", "{dry}");
    let healthy = |status: &Value| {
        let members = status["groups"][0]["members"].as_array().unwrap().clone();
        members.iter().filter(|m| m["health"] == "healthy" && m["registry_status"] == "UP").count()
    };
    assert_eq!(healthy(&launcher_json(&["status", "--cluster", &cluster]).1), 3);

    // One kill every 15 s for 90 s, under clients, with the healer running.
    let mut healer = watcher();
    let hammer = Hammer::start(&balancer);
    std::thread::sleep(Duration::from_millis(500));
    let mut victims = Vec::new();
    for round in 1..=6 {
        let killed_at = Instant::now();
        let (code, killed, stderr) = launcher_json(&["chaos", "kill", "--cluster", &cluster, "--count", "1"]);
        assert_eq!(code, 0, "{stderr}");
        assert_eq!((&killed[0]["group"], &killed[0]["result"]), (&json!(group), &json!("done")), "{killed}");
        let victim = killed[0]["instance"].as_str().unwrap().to_string();
        let status = loop {
            let (_, status, _) = launcher_json(&["status", "--cluster", &cluster]);
            let replaced = status["groups"][0]["replacements"].as_array().is_some_and(|r| r.len() == round);
            if replaced && healthy(&status) == 3 || killed_at.elapsed() > Duration::from_secs(120) {
                break status;
            }
            std::thread::sleep(Duration::from_millis(250));
        };
        eprintln!("chaos round {round}: {victim} replaced, 3 healthy and UP after {:?}", killed_at.elapsed());
        assert_eq!(healthy(&status), 3, "healed after round {round}: {status:#}");
        let replacement = &status["groups"][0]["replacements"][round - 1];
        assert_eq!((&replacement["instance"], &replacement["reason"]), (&json!(victim), &json!("its process exited")));
        let members: Vec<&str> =
            status["groups"][0]["members"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
        assert!(!members.contains(&victim.as_str()) && members.contains(&replacement["replaced_by"].as_str().unwrap()));
        victims.push(victim);
        std::thread::sleep(Duration::from_secs(15).saturating_sub(killed_at.elapsed()));
    }
    let Tally { seen, failures } = hammer.finish();
    healer.kill().unwrap();
    healer.wait().unwrap();
    assert!(failures.is_empty(), "{} of {seen:?} requests failed: {failures:?}", failures.len());
    // The new instances serve: every member answers through the balancer.
    assert_eq!(versions_seen(&balancer, 30), BTreeSet::from(["9.1.0".to_string()]));

    let (code, log, _) = launcher_json(&["chaos", "log", "--cluster", &cluster]);
    assert_eq!(code, 0);
    let log = log.as_array().unwrap();
    assert_eq!(log.len(), 6, "the dry run is not an action: {log:?}");
    let logged: Vec<&str> = log.iter().map(|e| e["instance"].as_str().unwrap()).collect();
    assert_eq!(logged, victims);
    assert!(log.iter().all(|e| e["monkey"] == "chaos" && e["action"] == "terminate"), "{log:?}");
    let (code, _, _) = launcher_json(&["chaos", "disable", "--cluster", &cluster]);
    assert_eq!(code, 0);
    let (code, destroyed, stderr) = launcher_json(&["destroy", "--cluster", &cluster]);
    assert_eq!(code, 0, "{destroyed}\n{stderr}");
    assert_no_leftovers("after the chaos");
}

/// Latency Monkey on a local cluster under clients: one instance's traffic is delayed by 2 s
/// for 60 s through a relay; the balancer's health check (1 s) takes it out, so clients stay
/// fast, and once the latency is removed the instance serves again.
#[test]
fn latency_monkey_slows_one_instance_and_the_balancer_routes_around_it() {
    let _serial = serial();
    let cluster = new_cluster();
    let _cleanup = Cleanup(&cluster);
    let balancer = deploy_v1(&cluster);
    let (code, _, stderr) =
        launcher_raw(&["chaos", "latency", "--cluster", &cluster, "--delay", "2s", "--duration", "5s"]);
    assert_eq!(code, 3, "not opted in: {stderr}");
    assert_eq!(launcher_json(&["chaos", "enable", "--cluster", &cluster]).0, 0);

    let stop = Arc::new(AtomicBool::new(false));
    let clients: Vec<JoinHandle<(Vec<Duration>, Vec<String>)>> = (0..2)
        .map(|_| {
            let (stop, url) = (stop.clone(), format!("{balancer}/hello/version.txt"));
            std::thread::spawn(move || {
                let agent = bakery::verify::http_agent();
                let (mut times, mut failures) = (Vec::new(), Vec::new());
                while !stop.load(Ordering::Relaxed) {
                    let started = Instant::now();
                    match get(&agent, &url) {
                        Ok(_) => times.push(started.elapsed()),
                        Err(error) => failures.push(error),
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                (times, failures)
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(1));
    let (code, injected, stderr) =
        launcher_json(&["chaos", "latency", "--cluster", &cluster, "--delay", "2s", "--duration", "60s"]);
    let restored_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    std::thread::sleep(Duration::from_secs(2));
    stop.store(true, Ordering::Relaxed);
    let (mut times, mut failures) = (Vec::new(), Vec::new());
    for client in clients {
        let (t, f) = client.join().unwrap();
        times.extend(t);
        failures.extend(f);
    }
    assert_eq!(code, 0, "{injected}\n{stderr}");
    assert_eq!((&injected["monkey"], &injected["result"]), (&json!("latency"), &json!("done")), "{injected}");
    assert!(failures.is_empty(), "{failures:?}");
    times.sort();
    let p99 = times[times.len() * 99 / 100];
    eprintln!("latency monkey: {} requests, p99 {p99:?}, slowest {:?}", times.len(), times.last().unwrap());
    assert!(p99 < Duration::from_secs(1), "client p99 {p99:?} over {} requests", times.len());

    // Restored: the delayed instance answers through the balancer at its own address again.
    let (_, status, _) = launcher_json(&["status", "--cluster", &cluster]);
    let delayed = status["groups"][0]["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == injected["instance"])
        .unwrap_or_else(|| panic!("{status:#}"))["address"]
        .as_str()
        .unwrap()
        .to_string();
    versions_seen(&balancer, 60);
    let ring = bakery::launch::haproxy::Balancer::new(&state_dir(), &state_dir().join("clusters").join(&cluster));
    let answered: BTreeSet<String> =
        ring.requests(restored_at).unwrap().into_iter().map(|(server, _, _)| server).collect();
    assert!(answered.contains(&delayed), "{delayed} serves again: {answered:?}");
    let relays: Vec<String> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|entry| std::fs::read(entry.path().join("cmdline")).ok())
        .map(|cmdline| String::from_utf8_lossy(&cmdline).replace('\0', " "))
        .filter(|cmdline| cmdline.contains("chaos relay") && cmdline.contains(&delayed))
        .collect();
    assert!(relays.is_empty(), "the relay is gone: {relays:?}");
    let (code, destroyed, stderr) = launcher_json(&["destroy", "--cluster", &cluster]);
    assert_eq!(code, 0, "{destroyed}\n{stderr}");
    assert_no_leftovers("after the latency");
}

/// `launcher console` on a free loopback port, stopped (SIGTERM) when dropped.
struct ConsoleProcess {
    child: std::process::Child,
    url: String,
}

impl ConsoleProcess {
    fn start() -> ConsoleProcess {
        use std::io::BufRead as _;
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_launcher"))
            .env("BAKERY_STATE_DIR", state_dir())
            .env_remove("BAKERY_PROVIDER")
            .args(["console", "--listen", "127.0.0.1:0"])
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdout = std::io::BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let url = line.trim().strip_prefix("console: ").unwrap_or_else(|| panic!("{line:?}")).to_string();
        // Whatever it prints later must not meet a closed pipe.
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        ConsoleProcess { child, url }
    }
}

impl Drop for ConsoleProcess {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}

/// Waits on an action's page until it ends; its line count when the page first loaded, and at
/// the end.
fn follow_action(browser: &common::browser::Browser) -> (usize, usize) {
    browser.wait_for("the action's page", Duration::from_secs(10), |b| b.url().contains("/actions/"));
    let at_load = browser.count("#events li");
    let running =
        |b: &common::browser::Browser| b.find("#outcome").attribute("data-state").as_deref() == Some("running");
    browser.wait_for("the action to end", Duration::from_secs(300), |b| !running(b));
    let outcome = browser.find("#outcome");
    assert_eq!(outcome.attribute("data-state").as_deref(), Some("ok"), "{}", browser.text());
    (at_load, browser.count("#events li"))
}

/// The console in a real browser (Debian's Chromium through ChromeDriver) on a local cluster
/// running v1: v2 deployed from the page with its steps arriving live until the new group
/// serves and the balancer answers v2, then rolled back from the page to v1; a hostile tag
/// shows as text; each action is in the audit log with who and from where. Screenshots of each
/// page are saved in target/console-screenshots.
#[test]
fn the_console_deploys_and_rolls_back_from_a_real_browser() {
    let _serial = serial();
    let (v1, v2) = images();
    // Of the images' app, `hello`, so that the deploy form offers them.
    let cluster = new_cluster().replacen("hello", "hello-", 1);
    let _cleanup = Cleanup(&cluster);
    let balancer = deploy_v1(&cluster);
    let hostile = "<script>document.title='owned'</script>";
    let provider = bakery::local::LocalProvider::open(&state_dir()).unwrap();
    bakery::provider::Provider::images(&provider)
        .tag_image(v1, &BTreeMap::from([("note".to_string(), hostile.to_string())]))
        .unwrap();
    let console = ConsoleProcess::start();
    let shots = workspace().join("target/console-screenshots");
    let browser = common::browser::Browser::start();

    browser.goto(&console.url);
    assert!(browser.text().contains(&cluster), "{}", browser.text());
    browser.screenshot(&shots, "applications");
    browser.goto(&format!("{}images?app=hello", console.url));
    assert!(browser.text().contains("9.2.0"));
    browser.screenshot(&shots, "images");
    browser.goto(&format!("{}images/{v1}", console.url));
    assert!(browser.text().contains(hostile), "the tag is shown as text");
    assert!(!browser.title().contains("owned"), "the tag ran as script");
    browser.screenshot(&shots, "image");
    // The bake wrote an SBOM: the page links it, and the link serves it.
    browser.find(&format!("a[href='/images/{v1}/sbom']")).click();
    assert!(browser.text().contains("\"bomFormat\": \"CycloneDX\""), "{}", browser.text());

    browser.goto(&console.url);
    browser.find(&format!("a[href='/clusters/{cluster}']")).click();
    let v000 = format!("{cluster}-v000");
    assert!(browser.find("#groups").text().contains(&format!("{v000} 9.1.0")), "{}", browser.text());
    browser.find("#deploy").click();
    browser.find(&format!("#image option[value='{v2}']")).click();
    browser.find("input[name='health_url']").fill("/hello/health");
    browser.find("#review").click();
    let review = browser.find("#changes").text();
    assert!(review.contains(&format!("take {v000} out of service, instances kept running")), "{review}");
    browser.screenshot(&shots, "deploy-review");
    browser.find("#confirm").click();
    let (at_load, at_end) = follow_action(&browser);
    assert!(at_end > at_load, "no line arrived after the page loaded ({at_load} then {at_end})");
    let lines = browser.find("#events").text();
    let v001 = format!("{cluster}-v001");
    for expected in [format!("put {v001} in service"), format!("{v001}: 3 of 3 healthy")] {
        assert!(lines.contains(&expected), "{expected:?} not in {lines}");
    }
    browser.screenshot(&shots, "deploy-live");
    assert_eq!(versions_seen(&balancer, 10), BTreeSet::from(["9.2.0".to_string()]));

    browser.goto(&format!("{}clusters/{cluster}", console.url));
    browser.screenshot(&shots, "cluster");
    browser.find("#rollback").click();
    let review = browser.find("#changes").text();
    assert!(review.contains(&format!("put {v000} in service")), "{review}");
    browser.screenshot(&shots, "rollback-review");
    browser.find("#confirm").click();
    follow_action(&browser);
    assert_eq!(versions_seen(&balancer, 10), BTreeSet::from(["9.1.0".to_string()]));

    browser.goto(&format!("{}clusters/{cluster}/groups/{v000}", console.url));
    assert_eq!(browser.count("#instances tbody tr"), 3, "{}", browser.text());
    browser.screenshot(&shots, "group");
    browser.goto(&format!("{}clusters/{cluster}", console.url));
    let history = browser.find("#history").text();
    assert!(history.contains("Rollback") && history.contains("(console, from 127.0.0.1)"), "{history}");

    let audit = std::fs::read_to_string(state_dir().join("console/audit.jsonl")).unwrap();
    let ours: Vec<Value> =
        audit.lines().map(|l| serde_json::from_str(l).unwrap()).filter(|e: &Value| e["cluster"] == cluster).collect();
    let said: Vec<(String, String)> = ours
        .iter()
        .map(|e| (e["action"].as_str().unwrap().to_string(), e["result"].as_str().unwrap().to_string()))
        .collect();
    let expected = [("deploy", "started"), ("deploy", "ok"), ("rollback", "started"), ("rollback", "ok")];
    assert_eq!(said, expected.map(|(a, r)| (a.to_string(), r.to_string())), "{audit}");
    assert!(ours.iter().all(|e| e["by"].as_str().unwrap().ends_with("(console, from 127.0.0.1)")), "{audit}");
}

/// `bakery images prune` on this host: of three images of an app, the one a cluster's group
/// runs and the newest stay (each saying why), the other goes with its snapshot; a dry run
/// lists the same and changes nothing.
#[test]
fn images_prune_keeps_what_a_group_runs_and_the_newest() {
    let _serial = serial();
    base_image();
    let dir = tempfile::tempdir().unwrap();
    // An app of this run's own, so that no other test's (or run's) images are in play: the
    // webapp recipe's base, without its chown of a directory named after the app.
    let app = bakery::ids::new_id("pruned").replace('-', "");
    let recipe = dir.path().join("pruned.toml");
    let base = workspace().join("recipes/tomcat-base.toml");
    std::fs::write(&recipe, format!("extends = {:?}\n", base.to_str().unwrap())).unwrap();
    let bake = |version: &str| {
        let package = sample_package_with(dir.path(), version, &[]).to_string_lossy().into_owned();
        let args = ["bake", "--base", BASE, "--recipe", recipe.to_str().unwrap(), "--package", &package];
        let (code, baked, stderr) = run_json(&[&args[..], &["--app", &app, "--version", version]].concat());
        assert_eq!(code, 0, "{stderr}");
        // Creation times count seconds: one image per second keeps their order plain.
        std::thread::sleep(Duration::from_millis(1100));
        (baked["image_id"].as_str().unwrap().to_string(), baked["snapshot_id"].as_str().unwrap().to_string())
    };
    let (old, old_snapshot) = bake("1.0.0");
    let (unused, unused_snapshot) = bake("1.1.0");
    let (newest, _) = bake("1.2.0");
    let cluster = new_cluster();
    let _cleanup = Cleanup(&cluster);
    let (code, deployed, stderr) =
        launcher_json(&["deploy", "--cluster", &cluster, "--image", &old, "--health-url", "/hello/health"]);
    assert_eq!(code, 0, "{deployed}\n{stderr}");

    let prune = |extra: &[&str]| run_json(&[&["images", "prune", "--app", &app, "--keep", "1"][..], extra].concat());
    let (code, dry, stderr) = prune(&["--dry-run"]);
    assert_eq!(code, 0, "{dry}\n{stderr}");
    assert_eq!(dry["deleted"].as_array().unwrap().iter().map(|i| &i["id"]).collect::<Vec<_>>(), [&json!(unused)]);
    let kept: BTreeMap<&str, String> =
        dry["kept"].as_array().unwrap().iter().map(|k| (k["id"].as_str().unwrap(), k["reasons"].to_string())).collect();
    assert!(kept[newest.as_str()].contains("one of the newest 1"), "{kept:?}");
    assert!(kept[old.as_str()].contains(&format!("group {cluster}-v000 (serving)")), "{kept:?}");
    assert_eq!(run_json(&["images", "show", &unused]).0, 0, "a dry run deletes nothing");

    let (code, done, stderr) = prune(&[]);
    assert_eq!(code, 0, "{done}\n{stderr}");
    assert_eq!(done["deleted"][0]["id"], json!(unused));
    assert_eq!(run_json(&["images", "show", &unused]).0, 4, "gone");
    assert_eq!(run_json(&["images", "show", &old]).0, 0, "what the group runs stays");
    let snapshot = |id: &str| state_dir().join("snapshots").join(format!("{id}.json"));
    assert!(!snapshot(&unused_snapshot).exists(), "its snapshot went with it");
    assert!(snapshot(&old_snapshot).exists());
    let (code, _, stderr) = prune(&["--keep", "0"]);
    assert_eq!(code, 3, "{stderr}");
    // The deleted image's blocks that nothing else holds are gc's to reclaim, as after `rm`.
    let (code, report, stderr) = run_json(&["gc"]);
    assert_eq!(code, 0, "{report}\n{stderr}");
}

/// What only a cloud's launch templates carry is refused on this host, naming each flag, before
/// anything is made, rather than ignored.
#[test]
fn cloud_only_settings_are_refused_on_this_host() {
    let _serial = serial();
    let cluster = new_cluster();
    let args = ["deploy", "--cluster", &cluster, "--image", "ami-00000000000000000", "--security-group", "sg-1"];
    let (code, value, stderr) = launcher_json(&[&args[..], &["--subnets", "subnet-a,subnet-b,subnet-c"]].concat());
    assert_eq!(code, 3, "{value}\n{stderr}");
    assert!(stderr.contains("--security-group, --subnets set(s) what only a cloud's"), "{stderr}");
    assert!(!state_dir().join("clusters").join(&cluster).exists(), "nothing made");
}

//! Baked images boot and serve the app: `bakery verify` with both methods, a recipe that breaks
//! Tomcat, several instances of one image at once, and the sample service's fault switch.

mod common;

use bakery::instance::{self, Endpoint, Method};
use bakery::journal::Journal;
use common::*;
use serde_json::Value;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

fn bake_sample(version: &str, recipe: &str, extra: &[&str]) -> (i32, Value, String) {
    bake_built(version, recipe, extra, &[])
}

/// Bakes the sample app built with the script's `options`; `extra` goes to `bakery bake`.
fn bake_built(version: &str, recipe: &str, extra: &[&str], options: &[&str]) -> (i32, Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let package = sample_package_with(dir.path(), version, options);
    let package = package.to_string_lossy().into_owned();
    let mut args = vec!["bake", "--base", BASE, "--recipe", recipe, "--package", &package];
    args.extend(["--app", "hello", "--version", version, "--rebake"]);
    args.extend(extra);
    run_json(&args)
}

#[test]
fn a_baked_image_serves_its_version_as_a_container_and_as_a_vm() {
    let _serial = serial();
    base_image();
    let expect = "/hello/version.txt=8.1.0";
    let (code, baked, stderr) = bake_sample("8.1.0", "recipes/tomcat-webapp.toml", &["--verify", "--expect", expect]);
    assert_eq!(code, 0, "{stderr}");
    let verification = &baked["verification"];
    assert_eq!(verification["passed"], true, "{baked}");
    assert_eq!(verification["method"], "container");
    assert!(verification["boot_ms"].as_u64().unwrap() > 0);
    assert_eq!(verification["checks"][0]["status"], 200);
    let image = baked["image_id"].as_str().unwrap();
    let (_, shown, _) = run_json(&["images", "show", image]);
    assert_eq!(shown["tags"]["bakery:verified"], "true");

    let (code, vm, stderr) = run_json(&["verify", image, "--method", "vm", "--expect", expect, "--timeout", "400s"]);
    assert_eq!(code, 0, "the VM boots through GRUB and the kernel to Tomcat: {vm}\n{stderr}");
    assert_eq!(vm["method"], "vm");
    assert_eq!(vm["passed"], true);
    assert_no_leftovers("after verifying");
}

#[test]
fn a_recipe_that_breaks_tomcat_fails_verification_and_shows_the_console() {
    let _serial = serial();
    base_image();
    let dir = tempfile::tempdir().unwrap();
    let recipe = dir.path().join("broken-tomcat.toml");
    let webapp = workspace().join("recipes/tomcat-webapp.toml");
    let broken = format!(
        "extends = \"{}\"\n[[files]]\npath = \"/etc/tomcat10/server.xml\"\nmode = \"0640\"\ngroup = \"tomcat\"\ncontent = \"<Server port=\\\"-1\\\"><this is not xml\"\n",
        webapp.display()
    );
    std::fs::write(&recipe, broken).unwrap();
    let (code, baked, stderr) = bake_sample(
        "8.2.0",
        &recipe.to_string_lossy(),
        &["--verify", "--expect", "/hello/health=ok", "--verify-timeout", "90s"],
    );
    assert_eq!(code, 6, "{baked}\n{stderr}");
    let verification = &baked["verification"];
    assert_eq!(verification["passed"], false);
    assert!(verification["boot_ms"].is_null());
    let console = verification["console_tail"].as_str().unwrap();
    assert!(!console.trim().is_empty(), "the console tail explains the failure");
    let (_, shown, _) = run_json(&["images", "show", baked["image_id"].as_str().unwrap()]);
    assert_eq!(shown["tags"]["bakery:verified"], "false", "the image is marked unverified");
    assert_no_leftovers("after a failed verification");
}

#[test]
fn three_instances_of_one_image_run_at_once_on_their_own_addresses() {
    let _serial = serial();
    base_image();
    let (code, baked, stderr) = bake_sample("8.3.0", "recipes/tomcat-webapp.toml", &[]);
    assert_eq!(code, 0, "{stderr}");
    let image = baked["image_id"].as_str().unwrap();
    let provider = bakery::local::LocalProvider::open(&state_dir()).unwrap();
    let mut journal = Journal::begin(&state_dir(), &bakery::ids::new_id("test"), "three instances", "local").unwrap();
    let instances: Vec<_> = (2..5)
        .map(|host| {
            let endpoint = Endpoint::free(Ipv4Addr::new(127, 0, 0, host)).unwrap();
            instance::start(&provider, &state_dir(), &mut journal, image, Method::Container, endpoint, None).unwrap()
        })
        .collect();
    let agent = bakery::verify::http_agent();
    let deadline = Instant::now() + Duration::from_secs(180);
    for instance in &instances {
        loop {
            let check = bakery::verify::probe(&agent, &instance.endpoint.url("/hello/version.txt"), "8.3.0");
            if check.matched {
                break;
            }
            assert!(instance.is_running(), "instance died: {}", instance.console_tail(30));
            assert!(Instant::now() < deadline, "{check:?}\n{}", instance.console_tail(30));
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let addresses: std::collections::BTreeSet<_> = instances.iter().map(|i| i.endpoint.address).collect();
    assert_eq!(addresses.len(), 3, "each instance on its own loopback address");
    assert!(!leftovers().is_empty());
    journal.unwind_all(&provider).unwrap();
    for instance in &instances {
        assert!(!instance.is_running());
    }
    assert_no_leftovers("after stopping three instances");
}

/// Polls `path` on the instance until it answers `status`, for at most three minutes.
fn answers(instance: &instance::Instance, path: &str, status: u16) -> bakery::verify::Check {
    let agent = bakery::verify::http_agent();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let check = bakery::verify::probe(&agent, &instance.endpoint.url(path), "");
        if check.status == Some(status) || Instant::now() > deadline {
            return check;
        }
        assert!(instance.is_running(), "instance died: {}", instance.console_tail(30));
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The sample app is a servlet service: a "bad version" built to fail every request still
/// passes its health check, and a file in the instance switches the fault off at run time.
#[test]
fn the_sample_service_fails_as_built_and_its_fault_switches_at_run_time() {
    let _serial = serial();
    base_image();
    let (code, baked, stderr) = bake_built("8.4.0", "recipes/tomcat-webapp.toml", &[], &["--error-ratio", "1"]);
    assert_eq!(code, 0, "{stderr}");
    let image = baked["image_id"].as_str().unwrap();
    let provider = bakery::local::LocalProvider::open(&state_dir()).unwrap();
    let mut journal = Journal::begin(&state_dir(), &bakery::ids::new_id("test"), "a bad version", "local").unwrap();
    let endpoint = Endpoint::free(Ipv4Addr::new(127, 0, 0, 6)).unwrap();
    let instance =
        instance::start(&provider, &state_dir(), &mut journal, image, Method::Container, endpoint, None).unwrap();

    let health = answers(&instance, "/hello/health", 200);
    assert_eq!(health.status, Some(200), "the bad version passes its health check: {health:?}");
    for path in ["/hello/version", "/hello/"] {
        let failing = answers(&instance, path, 500);
        assert_eq!(failing.status, Some(500), "{path} fails as built: {failing:?}");
    }
    // Switched off on this instance alone, without a restart.
    let switch = state_dir().join("instances").join(&instance.id).join("root/var/lib/hello");
    std::fs::create_dir_all(&switch).unwrap();
    std::fs::write(switch.join("fault.properties"), "error_ratio=0\n").unwrap();
    let healed = answers(&instance, "/hello/version", 200);
    assert_eq!(healed.status, Some(200), "{healed:?}");
    let version =
        bakery::verify::probe(&bakery::verify::http_agent(), &instance.endpoint.url("/hello/version"), "8.4.0");
    assert!(version.matched, "{version:?}");

    journal.unwind_all(&provider).unwrap();
    assert_no_leftovers("after the fault-switch instance");
}

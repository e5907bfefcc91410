//! End to end on the local provider: real loop devices, real ext4, the real Debian base image.
//! Every bad input must fail with a clear error and a meaningful exit status, register nothing
//! and leave nothing behind.

mod common;

use bakery::provider::Document;
use common::*;
use flate2::{write::GzEncoder, Compression};
use serde_json::Value;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const RECIPE: &str = "recipes/tomcat-webapp.toml";

fn bake_args<'a>(package: &'a str, version: &'a str) -> Vec<&'a str> {
    vec!["bake", "--base", BASE, "--recipe", RECIPE, "--package", package, "--app", "hello", "--version", version]
}

#[test]
fn a_bake_installs_every_package_file_and_says_what_is_inside() {
    let _serial = serial();
    let base = base_image();
    let dir = tempfile::tempdir().unwrap();
    let package = sample_package(dir.path(), "1.4.2", 0);
    let package_arg = package.to_string_lossy();
    let mut args = bake_args(&package_arg, "1.4.2");
    args.extend([
        "--build-job",
        "hello-main",
        "--build-number",
        "42",
        "--commit",
        "abc123",
        "--tag",
        "owner=team-hello",
        "--rebake",
    ]);
    let (code, out, stderr) = run_json(&args);
    assert_eq!(code, 0, "{stderr}");
    for field in [
        "image_id",
        "name",
        "snapshot_id",
        "base_image_id",
        "package_sha256",
        "bake_key",
        "changed_blocks",
        "stored_bytes",
        "duration_ms",
        "reused",
    ] {
        assert!(out.get(field).is_some(), "missing {field} in {out}");
    }
    assert_eq!(out["base_image_id"], base.as_str());
    assert_eq!(out["package_sha256"], sha256_file(&package).as_str(), "the sidecar supplied the checksum");
    assert_eq!(out["reused"], false);
    let changed = out["changed_blocks"].as_u64().unwrap();
    assert!(changed > 0 && changed < 200, "a small app changes a few blocks, not the disk: {changed}");
    assert!(out["stored_bytes"].as_u64().unwrap() <= changed * 512 * 1024);

    let image_id = out["image_id"].as_str().unwrap();
    let (code, image, _) = run_json(&["images", "show", image_id]);
    assert_eq!(code, 0);
    let tags = &image["tags"];
    for (key, value) in [
        ("app", "hello"),
        ("version", "1.4.2"),
        ("build_job", "hello-main"),
        ("build_number", "42"),
        ("commit", "abc123"),
        ("owner", "team-hello"),
        ("team", "hello"),
    ] {
        assert_eq!(tags[key], value, "tag {key} in {tags}");
    }
    assert_eq!(tags["base_image_id"], base.as_str());
    assert_eq!(tags["package_sha256"], out["package_sha256"]);
    assert_eq!(tags["bakery:bake-key"], out["bake_key"]);
    assert!(image["name"].as_str().unwrap().starts_with("hello-1.4.2-h42-"));

    let disk = dir.path().join("disk.raw");
    let (code, _, stderr) = run_json(&["images", "export", image_id, "--output-file", &disk.to_string_lossy()]);
    assert_eq!(code, 0, "{stderr}");
    let mounted = MountedDisk::new(&disk);
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(mounted.path("/var/lib/bakery/manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["package"]["sha256"], out["package_sha256"]);
    assert_eq!(manifest["base_image_id"], base.as_str());
    let files: Vec<&Value> = manifest["files"].as_array().unwrap().iter().filter(|f| f["kind"] == "file").collect();
    assert_eq!(files.len(), 6, "version.txt, three servlet classes, build and fault properties: {manifest}");
    // The registry keeps the same manifest next to the image (the console links it).
    let registry = bakery::local::registry::Registry::open(&state_dir()).unwrap();
    let kept = registry.get_document(image_id, Document::Manifest).unwrap().expect("the manifest next to the image");
    assert_eq!(serde_json::from_slice::<Value>(&kept).unwrap(), manifest);
    let tomcat_uid = passwd_uid(&mounted.path("/etc/passwd"), "tomcat");
    for file in files {
        let path = mounted.path(file["path"].as_str().unwrap());
        assert_eq!(sha256_file(&path), file["sha256"].as_str().unwrap(), "{}", path.display());
        assert_eq!(std::fs::metadata(&path).unwrap().uid(), tomcat_uid, "owned by tomcat: {}", path.display());
    }
    let version = std::fs::read_to_string(mounted.path("/var/lib/tomcat10/webapps/hello/version.txt")).unwrap();
    assert_eq!(version.trim(), "1.4.2");
    let defaults = std::fs::read_to_string(mounted.path("/etc/default/tomcat10")).unwrap();
    assert!(defaults.contains("-Dapp.version=1.4.2") && defaults.contains("-Xmx384m"), "{defaults}");
    assert!(!mounted.path("/usr/sbin/policy-rc.d").exists(), "the service block is removed before the snapshot");
    let wants = mounted.path("/etc/systemd/system/multi-user.target.wants/tomcat10.service");
    assert!(wants.symlink_metadata().is_ok(), "tomcat10 is enabled");
    drop(mounted);
    assert_no_leftovers("after a good bake");
}

fn passwd_uid(passwd: &Path, user: &str) -> u32 {
    let text = std::fs::read_to_string(passwd).unwrap();
    let line = text.lines().find(|l| l.starts_with(&format!("{user}:"))).expect("user exists in the image");
    line.split(':').nth(2).unwrap().parse().unwrap()
}

#[test]
fn the_same_bake_key_returns_the_existing_image_unless_rebaked() {
    let _serial = serial();
    base_image();
    let dir = tempfile::tempdir().unwrap();
    let package = sample_package(dir.path(), "2.0.0", 0);
    let package_arg = package.to_string_lossy();
    let args = bake_args(&package_arg, "2.0.0");
    let (code, first, stderr) = run_json(&args);
    assert_eq!(code, 0, "{stderr}");
    let (code, second, _) = run_json(&args);
    assert_eq!(code, 0);
    assert_eq!(second["reused"], true);
    assert_eq!(second["image_id"], first["image_id"]);
    assert_eq!(second["bake_key"], first["bake_key"]);

    let mut rebake = args.clone();
    rebake.push("--rebake");
    let (code, third, _) = run_json(&rebake);
    assert_eq!(code, 0);
    assert_eq!(third["reused"], false);
    assert_ne!(third["image_id"], first["image_id"]);
    assert_eq!(third["bake_key"], first["bake_key"]);
    assert_no_leftovers("after rebakes");
}

/// A tar entry as a hostile package would write it, bypassing the tar crate's own checks.
enum Entry<'a> {
    File(&'a str, &'a [u8]),
    Symlink(&'a str, &'a str),
    HardLink(&'a str, &'a str),
    CharDevice(&'a str),
}

fn tarball(dir: &Path, name: &str, entries: &[Entry]) -> PathBuf {
    let path = dir.join(name);
    let mut gz = GzEncoder::new(std::fs::File::create(&path).unwrap(), Compression::fast());
    for entry in entries {
        let mut header = tar::Header::new_old();
        let (path, kind, data, link): (&str, tar::EntryType, &[u8], Option<&str>) = match entry {
            Entry::File(p, data) => (p, tar::EntryType::Regular, data, None),
            Entry::Symlink(p, target) => (p, tar::EntryType::Symlink, b"", Some(target)),
            Entry::HardLink(p, target) => (p, tar::EntryType::Link, b"", Some(target)),
            Entry::CharDevice(p) => (p, tar::EntryType::Char, b"", None),
        };
        let old = header.as_old_mut();
        old.name[..path.len()].copy_from_slice(path.as_bytes());
        if let Some(link) = link {
            old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        }
        header.set_entry_type(kind);
        header.set_mode(0o644);
        header.set_size(data.len() as u64);
        header.set_mtime(1_700_000_000);
        header.set_cksum();
        gz.write_all(header.as_bytes()).unwrap();
        gz.write_all(data).unwrap();
        gz.write_all(&vec![0u8; (512 - data.len() % 512) % 512]).unwrap();
    }
    gz.write_all(&[0u8; 1024]).unwrap();
    gz.finish().unwrap();
    path
}

struct BadCase {
    name: &'static str,
    package: PathBuf,
    extra: Vec<String>,
    exit: i32,
    message: &'static str,
}

#[test]
fn bad_inputs_fail_clearly_register_nothing_and_leave_nothing() {
    let _serial = serial();
    base_image();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let good = sample_package(d, "3.0.0", 0);
    let escape = format!("bakery-escape-{}", std::process::id());
    let outside = Path::new("/tmp").join(&escape);
    let dotdot = format!("hello/../../../../../../../tmp/{escape}");
    let absolute = format!("/tmp/{escape}");

    let truncated = d.join("truncated.tar.gz");
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let not_tar = d.join("not-a-tar.tar.gz");
    let mut gz = GzEncoder::new(std::fs::File::create(&not_tar).unwrap(), Compression::fast());
    gz.write_all(&b"this is a text file, not a tar archive\n".repeat(40)).unwrap();
    gz.finish().unwrap();
    let big = d.join("big.tar.gz");
    let zeros = vec![0u8; 8 << 20];
    tarball(d, "big.tar.gz", &[Entry::File("hello/zeros.bin", &zeros)]);
    let small_limit = d.join("small-limit.toml");
    std::fs::write(
        &small_limit,
        format!("extends = \"{}\"\n[package]\nmax_expanded_size = \"1MiB\"\n", workspace().join(RECIPE).display()),
    )
    .unwrap();

    let cases = vec![
        BadCase {
            name: "wrong sha256",
            package: good.clone(),
            extra: vec!["--sha256".into(), "0".repeat(64)],
            exit: 3,
            message: "sha-256",
        },
        BadCase { name: "truncated gzip", package: truncated, extra: vec![], exit: 3, message: "" },
        BadCase { name: "not a tar", package: not_tar, extra: vec![], exit: 3, message: "" },
        BadCase {
            name: "../ entry",
            package: tarball(d, "dotdot.tar.gz", &[Entry::File(&dotdot, b"pwned")]),
            extra: vec![],
            exit: 3,
            message: "..",
        },
        BadCase {
            name: "absolute path",
            package: tarball(d, "abs.tar.gz", &[Entry::File(&absolute, b"pwned")]),
            extra: vec![],
            exit: 3,
            message: "absolute",
        },
        BadCase {
            name: "symlink out, then a file through it",
            package: tarball(
                d,
                "symlink.tar.gz",
                &[Entry::Symlink("hello/out", "/tmp"), Entry::File(&format!("hello/out/{escape}"), b"pwned")],
            ),
            extra: vec![],
            exit: 3,
            message: "symlink",
        },
        BadCase {
            name: "hard link out",
            package: tarball(d, "hardlink.tar.gz", &[Entry::HardLink("hello/passwd", "/etc/passwd")]),
            extra: vec![],
            exit: 3,
            message: "link",
        },
        BadCase {
            name: "device node",
            package: tarball(d, "device.tar.gz", &[Entry::CharDevice("hello/null")]),
            extra: vec![],
            exit: 3,
            message: "device",
        },
        BadCase {
            name: "oversized expansion",
            package: big,
            extra: vec!["--recipe".into(), small_limit.to_string_lossy().into()],
            exit: 3,
            message: "",
        },
        BadCase {
            name: "unknown base",
            package: good.clone(),
            extra: vec!["--base".into(), "no-such-base".into()],
            exit: 4,
            message: "no-such-base",
        },
        BadCase {
            name: "broken recipe",
            package: good.clone(),
            extra: vec!["--recipe".into(), "recipes/examples/broken.toml".into()],
            exit: 3,
            message: "broken.toml",
        },
    ];

    let before = image_ids();
    for case in cases {
        let package = case.package.to_string_lossy().into_owned();
        let mut args: Vec<String> = bake_args(&package, "3.0.0").into_iter().map(String::from).collect();
        args.extend(["--sha256".to_string(), sha256_file(&case.package)]);
        // Later flags override the defaults above (clap keeps the last --recipe/--base).
        args.extend(case.extra.iter().cloned());
        args.push("--rebake".into());
        let output = bakery().args(&args).args(["--output", "json"]).stdin(Stdio::null()).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(case.exit), "{}: exit status; stderr: {stderr}", case.name);
        assert!(stderr.contains("error: "), "{}: {stderr}", case.name);
        assert!(
            stderr.to_lowercase().contains(&case.message.to_lowercase()),
            "{}: expected {:?} in: {stderr}",
            case.name,
            case.message
        );
        let out: Value =
            serde_json::from_slice(&output.stdout).unwrap_or_else(|_| panic!("{}: one JSON error object", case.name));
        assert_eq!(out["exit_code"], case.exit);
        assert_eq!(image_ids(), before, "{}: nothing registered", case.name);
        assert!(!outside.exists(), "{}: wrote outside the image root", case.name);
        assert_no_leftovers(case.name);
    }
}

#[test]
fn a_broken_recipe_reports_every_problem_at_once() {
    let output = run(&["recipe", "check", "recipes/examples/broken.toml"]);
    assert_eq!(output.status.code(), Some(3));
    let stderr = String::from_utf8_lossy(&output.stderr);
    let problems = stderr.lines().filter(|l| l.contains("broken.toml:")).count();
    assert!(problems >= 4, "every problem is listed, each naming file and key: {stderr}");
    assert!(run(&["recipe", "check", RECIPE]).status.success());

    // For CI: each problem as a record, most with the line that holds the key.
    let (code, out, _) = run_json(&["recipe", "check", "recipes/examples/broken.toml", RECIPE]);
    assert_eq!(code, 3);
    let records = out["problems"].as_array().unwrap();
    assert!(records.len() >= 4, "{out}");
    for record in records {
        assert!(record["file"].as_str().unwrap().ends_with("broken.toml"), "{record}");
        assert!(record["key"].is_string() && record["message"].is_string(), "{record}");
    }
    let with_lines = records.iter().filter(|r| r["line"].as_u64().is_some_and(|line| line > 0)).count();
    assert!(with_lines * 2 > records.len(), "most problems name their line: {out}");
    let unparsable = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(unparsable.path(), "[package]\ninstall_root = \"/srv\n").unwrap();
    let (code, out, _) = run_json(&["recipe", "check", &unparsable.path().to_string_lossy()]);
    assert_eq!(code, 3);
    assert_eq!(out["problems"][0]["line"], 2, "a syntax error names its line: {out}");
}

/// A recipe on top of the Tomcat webapp one, in `dir`.
fn recipe_with(dir: &Path, name: &str, body: &str) -> String {
    let path = dir.join(name);
    let extends = workspace().join(RECIPE);
    std::fs::write(&path, format!("extends = \"{}\"\n{body}", extends.display())).unwrap();
    path.to_string_lossy().into_owned()
}

#[test]
fn recipe_commands_install_debian_packages_and_the_image_carries_its_sbom_and_provenance() {
    let _serial = serial();
    base_image();
    let dir = tempfile::tempdir().unwrap();
    let package = sample_package(dir.path(), "5.0.0", 0);
    let package_arg = package.to_string_lossy();
    // cron has a service its postinst would start: policy-rc.d must keep it down (checked in
    // the same command: what a command starts dies with it), and the recipe disables it.
    // Update and install in separate commands: the lists carry over.
    let recipe = recipe_with(
        dir.path(),
        "with-cron.toml",
        r#"commands = [
    "apt-get update -q",
    "apt-get install -y -q --no-install-recommends cron && command -v pgrep && if pgrep -x cron; then echo 'cron was started in the chroot' >&2; exit 1; fi",
]
[services]
disable = ["cron"]
"#,
    );
    let mut args = bake_args(&package_arg, "5.0.0");
    args[4] = &recipe;
    args.extend(["--commit", "5eed", "--rebake"]);
    let (code, out, stderr) = run_json(&args);
    assert_eq!(code, 0, "{stderr}");
    let image_id = out["image_id"].as_str().unwrap();

    let disk = dir.path().join("disk.raw");
    let (code, _, stderr) = run_json(&["images", "export", image_id, "--output-file", &disk.to_string_lossy()]);
    assert_eq!(code, 0, "{stderr}");
    let mounted = MountedDisk::new(&disk);
    let status = std::fs::read_to_string(mounted.path("/var/lib/dpkg/status")).unwrap();
    assert!(status.contains("Package: cron\nStatus: install ok installed"), "cron is in the image's dpkg database");
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(mounted.path("/var/lib/bakery/manifest.json")).unwrap()).unwrap();
    let cron = manifest["packages"].as_array().unwrap().iter().find(|p| p["name"] == "cron");
    assert!(cron.is_some_and(|p| p["version"].as_str().is_some_and(|v| !v.is_empty())), "cron in the manifest");
    let wants = mounted.path("/etc/systemd/system/multi-user.target.wants/cron.service");
    assert!(wants.symlink_metadata().is_err(), "the recipe disabled cron");
    assert!(mounted.path("/lib/systemd/system/cron.service").exists());
    // Nothing of the host's, and none of apt's lists or downloads, stayed in the image.
    let sources: Vec<_> = std::fs::read_dir(mounted.path("/etc/apt/sources.list.d"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(sources, ["debian.sources"], "the image's own sources only");
    let lists = std::fs::read_dir(mounted.path("/var/lib/apt/lists")).unwrap().count();
    assert!(lists <= 2, "no package lists in the image (lock and partial/ at most): {lists} entries");
    let debs = std::fs::read_dir(mounted.path("/var/cache/apt/archives")).unwrap();
    assert!(debs.flatten().all(|e| !e.file_name().to_string_lossy().ends_with(".deb")), "no downloads");
    assert!(!mounted.path("/var/cache/apt/pkgcache.bin").exists());
    for path in ["/run/bakery", "/run/systemd/resolve/stub-resolv.conf"] {
        assert!(!mounted.path(path).exists(), "{path} was on the commands' own /run, not in the image");
    }
    let resolv = std::fs::read_link(mounted.path("/etc/resolv.conf")).unwrap();
    assert_eq!(resolv, Path::new("../run/systemd/resolve/stub-resolv.conf"), "the image's resolver untouched");

    // The SBOM: in the image, next to it, named by the image's tag, valid by the format's schema.
    let in_image = std::fs::read(mounted.path("/var/lib/bakery/sbom.cdx.json")).unwrap();
    let printed = run(&["images", "sbom", image_id]);
    assert!(printed.status.success(), "{}", String::from_utf8_lossy(&printed.stderr));
    assert_eq!(printed.stdout.trim_ascii_end(), in_image.as_slice());
    let sbom_sha256 = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(&in_image))
    };
    let (_, image, _) = run_json(&["images", "show", image_id]);
    assert_eq!(image["tags"]["bakery:sbom-sha256"], sbom_sha256.as_str());
    let sbom: Value = serde_json::from_slice(&in_image).unwrap();
    let components = sbom["components"].as_array().unwrap();
    let names: Vec<&str> = components.iter().filter_map(|c| c["name"].as_str()).collect();
    for name in ["hello", "cron", "openjdk-17-jre-headless", "tomcat10"] {
        assert!(names.contains(&name), "{name} in the SBOM");
    }
    assert_eq!(components[0]["hashes"][0]["content"], out["package_sha256"]);
    assert_eq!(components[0]["components"].as_array().unwrap().len(), 6, "the app's six files");
    let validator = workspace().join("tests/tools/validate_sbom.py");
    let sbom_file = dir.path().join("sbom.json");
    std::fs::write(&sbom_file, &in_image).unwrap();
    let venv = std::env::var("BAKERY_VENV").unwrap_or_else(|_| "/opt/bakery/venv".into());
    let checked = Command::new(format!("{venv}/bin/python")).arg(&validator).arg(&sbom_file).output().unwrap();
    assert!(checked.status.success(), "the SBOM is valid CycloneDX 1.5: {}", String::from_utf8_lossy(&checked.stdout));

    let (code, provenance, stderr) = run_json(&["images", "provenance", image_id]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(provenance["subject"][0]["digest"]["sha256"], sbom_sha256.as_str());
    let definition = &provenance["predicate"]["buildDefinition"];
    assert_eq!(definition["resolvedDependencies"][0]["digest"]["sha256"], out["package_sha256"]);
    assert_eq!(
        definition["resolvedDependencies"][1]["uri"],
        format!("bakery-image:{}", out["base_image_id"].as_str().unwrap())
    );
    assert_eq!(definition["externalParameters"]["build"]["commit"], "5eed");
    drop(mounted);
    assert_no_leftovers("after a bake that ran apt");

    // A command that fails: exit 3, apt's own words shown, nothing registered, nothing left.
    let images_before = image_ids();
    let failing =
        recipe_with(dir.path(), "missing.toml", "commands = [\"apt-get install -y bakery-no-such-package\"]\n");
    let mut args = bake_args(&package_arg, "5.0.1");
    args[4] = &failing;
    let (code, out, stderr) = run_json(&args);
    assert_eq!(code, 3, "{out} {stderr}");
    assert!(stderr.contains("Unable to locate package bakery-no-such-package"), "apt's output is shown: {stderr}");
    assert_eq!(image_ids(), images_before, "nothing registered");
    assert_no_leftovers("after a failed apt command");
}

#[test]
fn packages_come_as_teams_build_them_deb_war_and_tar_zst() {
    let _serial = serial();
    base_image();
    let dir = tempfile::tempdir().unwrap();
    let export = |image_id: &str, name: &str| {
        let disk = dir.path().join(name);
        let (code, _, stderr) = run_json(&["images", "export", image_id, "--output-file", &disk.to_string_lossy()]);
        assert_eq!(code, 0, "{stderr}");
        MountedDisk::new(&disk)
    };
    let manifest_of = |mounted: &MountedDisk| -> Value {
        serde_json::from_slice(&std::fs::read(mounted.path("/var/lib/bakery/manifest.json")).unwrap()).unwrap()
    };

    // A .deb: apt installs it with the dependency the base lacks; its postinst runs, and the
    // Tomcat restart it asks for is refused; the manifest lists its files from dpkg.
    let deb = sample_package_with(dir.path(), "5.1.0", &["--format", "deb"]);
    let deb_arg = deb.to_string_lossy();
    let mut args = bake_args(&deb_arg, "5.1.0");
    args.push("--rebake");
    let (code, out, stderr) = run_json(&args);
    assert_eq!(code, 0, "{stderr}");
    let mounted = export(out["image_id"].as_str().unwrap(), "deb.raw");
    let status = std::fs::read_to_string(mounted.path("/var/lib/dpkg/status")).unwrap();
    for package in ["hello", "jq"] {
        assert!(status.contains(&format!("Package: {package}\nStatus: install ok installed")), "{package} installed");
    }
    assert!(mounted.path("/var/lib/hello/postinst-ran").exists(), "the maintainer script ran");
    let manifest = manifest_of(&mounted);
    let files = manifest["files"].as_array().unwrap();
    let version = files.iter().find(|f| f["path"] == "/var/lib/tomcat10/webapps/hello/version.txt").unwrap();
    assert_eq!(version["sha256"], sha256_file(&mounted.path("/var/lib/tomcat10/webapps/hello/version.txt")).as_str());
    assert!(files.iter().all(|f| f["kind"] != "dir"), "files from dpkg, not the directories packages share");
    assert_eq!(manifest["package"]["sha256"], sha256_file(&deb).as_str());
    assert!(manifest["packages"].as_array().unwrap().iter().any(|p| p["name"] == "hello" && p["version"] == "5.1.0"));
    // Names only: a DirEntry would keep the directory open, and the image busy.
    let cached: Vec<String> = std::fs::read_dir(mounted.path("/var/cache/apt/archives"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(cached.iter().all(|name| !name.ends_with(".deb")), "no .deb left in the image: {cached:?}");
    drop(mounted);

    // A .war, placed as APP.war for Tomcat (on the Tomcat base recipe: no exploded dir to chown).
    let war = sample_package_with(dir.path(), "5.1.0", &["--format", "war"]);
    let base_recipe = workspace().join("recipes/tomcat-base.toml");
    let war_arg = war.to_string_lossy();
    let mut args = bake_args(&war_arg, "5.1.0");
    args[4] = base_recipe.to_str().unwrap();
    let (code, out, stderr) = run_json(&args);
    assert_eq!(code, 0, "{stderr}");
    let mounted = export(out["image_id"].as_str().unwrap(), "war.raw");
    let placed = mounted.path("/var/lib/tomcat10/webapps/hello.war");
    assert_eq!(sha256_file(&placed), sha256_file(&war));
    let manifest = manifest_of(&mounted);
    assert_eq!(manifest["files"][0]["path"], "/var/lib/tomcat10/webapps/hello.war");
    drop(mounted);

    // A .tar.zst, unpacked as a .tar.gz is.
    let zst = sample_package_with(dir.path(), "5.1.0", &["--format", "tar.zst"]);
    let zst_arg = zst.to_string_lossy();
    let mut args = bake_args(&zst_arg, "5.1.0");
    args.push("--rebake");
    let (code, out, stderr) = run_json(&args);
    assert_eq!(code, 0, "{stderr}");
    let mounted = export(out["image_id"].as_str().unwrap(), "zst.raw");
    let version = std::fs::read_to_string(mounted.path("/var/lib/tomcat10/webapps/hello/version.txt")).unwrap();
    assert_eq!(version.trim(), "5.1.0");
    drop(mounted);

    // A name that lies about the content: a clear error, nothing registered, nothing left.
    let images_before = image_ids();
    let liar = dir.path().join("hello-5.1.0.tar.gz");
    std::fs::copy(&zst, &liar).unwrap();
    std::fs::remove_file(dir.path().join("hello-5.1.0.tar.gz.sha256")).ok();
    let liar_arg = liar.to_string_lossy();
    let mut args = bake_args(&liar_arg, "5.1.1");
    let sha = sha256_file(&liar);
    args.extend(["--sha256", &sha]);
    let (code, _, stderr) = run_json(&args);
    assert_eq!(code, 3, "{stderr}");
    assert!(
        stderr.contains("is named as a gzip-compressed tar archive (.tar.gz) but holds a zstd-compressed"),
        "{stderr}"
    );
    assert_eq!(image_ids(), images_before);

    // A .deb in name and magic number only: dpkg cannot read it, and the bake says so.
    let broken = dir.path().join("broken_1.0_all.deb");
    std::fs::write(&broken, b"!<arch>\ndebian-binary   this is not a Debian package\n").unwrap();
    let broken_arg = broken.to_string_lossy();
    let sha = sha256_file(&broken);
    let mut args = bake_args(&broken_arg, "5.1.2");
    args.extend(["--sha256", &sha]);
    let (code, _, stderr) = run_json(&args);
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("the Debian package has no readable control file"), "{stderr}");
    assert_eq!(image_ids(), images_before);
    assert_no_leftovers("after baking .deb, .war and .tar.zst packages");
}

#[test]
fn a_team_base_is_a_layer_on_the_standard_base_and_apps_bake_on_it() {
    let _serial = serial();
    let standard = base_image();
    let team_recipe = "base-images/hello-team.toml";
    let (code, out, stderr) = run_json(&["base", "build", team_recipe, "--rebuild"]);
    assert_eq!(code, 0, "{stderr}");
    let team = out["image_id"].as_str().unwrap().to_string();
    let stored = out["stored_bytes"].as_u64().unwrap();
    assert!(stored > 0 && stored < 200 << 20, "only the layer's blocks are stored: {stored}");
    let (_, image, _) = run_json(&["images", "show", &team]);
    assert_eq!(image["tags"]["bakery:base-name"], "hello-team");
    assert_eq!(image["tags"]["bakery:base-parent"], standard.as_str());
    // Cached: the same recipe over the same base is the same image.
    let (code, again, stderr) = run_json(&["base", "build", team_recipe]);
    assert_eq!(
        (code, again["reused"].as_bool(), again["image_id"].as_str()),
        (0, Some(true), Some(team.as_str())),
        "{stderr}"
    );
    // Offline, the standard base is the cached one whatever the mirror publishes.
    let (code, offline, stderr) = run_json(&["base", "build", "base-images/debian12-jre17-tomcat10.toml", "--offline"]);
    assert_eq!((code, offline["image_id"].as_str()), (0, Some(standard.as_str())), "{stderr}");
    let (code, listed, _) = run_json(&["base", "list"]);
    assert_eq!(code, 0);
    let ids: Vec<&str> = listed.as_array().unwrap().iter().filter_map(|i| i["id"].as_str()).collect();
    assert!(ids.contains(&team.as_str()) && ids.contains(&standard.as_str()), "{listed}");
    let (code, shown, _) = run_json(&["base", "show", "hello-team"]);
    assert_eq!(code, 0);
    let versions: std::collections::BTreeMap<&str, &str> = shown["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["name"].as_str().unwrap(), p["version"].as_str().unwrap()))
        .collect();
    assert!(
        versions.contains_key("jq") && versions.contains_key("tomcat10") && !versions.contains_key("less"),
        "{shown}"
    );
    let (_, standard_shown, _) = run_json(&["base", "show", &standard]);
    assert!(
        standard_shown["packages"].as_array().unwrap().iter().any(|p| p["name"] == "less"),
        "the standard base lists its own"
    );

    let dir = tempfile::tempdir().unwrap();
    let disk = dir.path().join("team.raw");
    let (code, _, stderr) = run_json(&["images", "export", &team, "--output-file", &disk.to_string_lossy()]);
    assert_eq!(code, 0, "{stderr}");
    let mounted = MountedDisk::new(&disk);
    let status = std::fs::read_to_string(mounted.path("/var/lib/dpkg/status")).unwrap();
    assert!(status.contains("Package: jq\nStatus: install ok installed"), "the team's package is in");
    assert!(!status.contains("Package: less\nStatus: install ok installed"), "the removed package is out");
    assert_eq!(std::fs::read_to_string(mounted.path("/etc/hello/team")).unwrap(), "hello\n");
    let profile = std::fs::read_to_string(mounted.path("/etc/profile.d/hello-team.sh")).unwrap();
    assert!(profile.contains("export HELLO_TEAM=hello"), "{profile}");
    drop(mounted);

    // An app bakes on the team's base by its name.
    let package = sample_package(dir.path(), "5.2.0", 0);
    let package_arg = package.to_string_lossy();
    let mut args = bake_args(&package_arg, "5.2.0");
    args[2] = "hello-team";
    args.push("--rebake");
    let (code, baked, stderr) = run_json(&args);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(baked["base_image_id"], team.as_str());

    // Both kinds of recipe check; a team base that fails in apt fails clearly and leaves nothing.
    assert!(run(&["recipe", "check", team_recipe, "base-images/debian12-jre17-tomcat10.toml", RECIPE])
        .status
        .success());
    let images_before = image_ids();
    let broken = dir.path().join("broken-team.toml");
    let standard_recipe = workspace().join("base-images/debian12-jre17-tomcat10.toml");
    std::fs::write(
        &broken,
        format!(
            "name = \"broken-team\"\ndescription = \"d\"\nextends = \"{}\"\npackages = [\"bakery-no-such-package\"]\n",
            standard_recipe.display()
        ),
    )
    .unwrap();
    let (code, _, stderr) = run_json(&["base", "build", &broken.to_string_lossy()]);
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("Unable to locate package bakery-no-such-package"), "{stderr}");
    assert_eq!(image_ids(), images_before, "nothing registered");
    assert_no_leftovers("after a team base build that failed");

    // Bases that extend each other: named, refused before anything is built.
    for (name, other) in [("a", "b"), ("b", "a")] {
        let text = format!("name = \"{name}\"\ndescription = \"d\"\nextends = \"{other}.toml\"\n");
        std::fs::write(dir.path().join(format!("{name}.toml")), text).unwrap();
    }
    let (code, _, stderr) = run_json(&["base", "build", &dir.path().join("a.toml").to_string_lossy()]);
    assert_eq!(code, 3, "{stderr}");
    assert!(stderr.contains("in a cycle") && stderr.contains("b.toml"), "{stderr}");
}

/// Serves one file over HTTP/1.0 on loopback, for as many requests as come.
fn serve(file: PathBuf) -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let file = file.clone();
            std::thread::spawn(move || {
                let mut stream = stream;
                let mut request = [0u8; 4096];
                let n = std::io::Read::read(&mut stream, &mut request).unwrap_or(0);
                let line = String::from_utf8_lossy(&request[..n]);
                let found = line.starts_with("GET /hello.tar.gz ");
                if !found {
                    let _ = stream.write_all(b"HTTP/1.0 404 Not Found\r\nContent-Length: 0\r\n\r\n");
                    return;
                }
                let len = std::fs::metadata(&file).unwrap().len();
                let _ = write!(stream, "HTTP/1.0 200 OK\r\nContent-Length: {len}\r\n\r\n");
                let _ = std::io::copy(&mut std::fs::File::open(&file).unwrap(), &mut stream);
            });
        }
    });
    format!("http://{address}/hello.tar.gz")
}

#[test]
fn a_package_streams_from_an_http_url() {
    let _serial = serial();
    base_image();
    let dir = tempfile::tempdir().unwrap();
    let package = sample_package(dir.path(), "4.0.0", 4);
    let url = serve(package.clone());
    let sha = sha256_file(&package);
    let mut args = bake_args(&url, "4.0.0");
    args.extend(["--sha256", &sha, "--rebake"]);
    let (code, out, stderr) = run_json(&args);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(out["package_sha256"], sha.as_str());
    assert_no_leftovers("after an http bake");
}

#[test]
fn two_bakes_at_once_both_succeed() {
    let _serial = serial();
    base_image();
    let dir = tempfile::tempdir().unwrap();
    let children: Vec<_> = ["5.0.0", "5.0.1"]
        .iter()
        .map(|version| {
            let package = sample_package(dir.path(), version, 8);
            let package = package.to_string_lossy().into_owned();
            bakery()
                .args(bake_args(&package, version))
                .args(["--rebake", "--output", "json"])
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let mut ids = Vec::new();
    for child in children {
        let output = child.wait_with_output().unwrap();
        assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
        let out: Value = serde_json::from_slice(&output.stdout).unwrap();
        ids.push(out["image_id"].as_str().unwrap().to_string());
    }
    assert_ne!(ids[0], ids[1]);
    assert_no_leftovers("after concurrent bakes");
}

/// Starts a slow bake and waits until its journal shows the image mounted.
#[allow(clippy::zombie_processes)] // the child is returned; the caller waits for it
fn bake_until_mounted(package: &Path, version: &str) -> std::process::Child {
    let package = package.to_string_lossy().into_owned();
    let mut child = bakery()
        .args(bake_args(&package, version))
        .arg("--rebake")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the bake never mounted its volume");
        }
        let journals = std::fs::read_dir(state_dir().join("journal")).into_iter().flatten().flatten();
        let mounted = journals
            .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
            .any(|e| std::fs::read_to_string(e.path()).unwrap_or_default().contains("\"mount\""));
        if mounted {
            return child;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn gc_spares_a_live_bake_and_cleans_up_after_one_killed_with_sigkill() {
    let _serial = serial();
    base_image();
    let dir = tempfile::tempdir().unwrap();
    let package = sample_package(dir.path(), "6.0.0", 400);
    let before = image_ids();
    let mut child = bake_until_mounted(&package, "6.0.0");

    let (code, report, stderr) = run_json(&["gc"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(!report["kept_live"].as_array().unwrap().is_empty(), "gc saw the live bake: {report}");
    assert!(!leftovers().is_empty(), "gc left the live bake's resources alone");

    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::SIGKILL).unwrap();
    child.wait().unwrap();
    assert!(!leftovers().is_empty(), "a killed bake leaves its mount, loop device and volume");
    let (code, report, stderr) = run_json(&["gc"]);
    assert_eq!(code, 0, "{stderr}");
    assert!(!report["removed"].as_array().unwrap().is_empty());
    assert_no_leftovers("after gc");
    assert_eq!(image_ids(), before);
    let (code, report, _) = run_json(&["gc"]);
    assert_eq!(code, 0);
    assert!(report["removed"].as_array().unwrap().is_empty(), "a second gc finds nothing: {report}");
}

#[test]
fn ctrl_c_undoes_everything_and_exits_130() {
    let _serial = serial();
    base_image();
    let dir = tempfile::tempdir().unwrap();
    let package = sample_package(dir.path(), "7.0.0", 400);
    let before = image_ids();
    let child = bake_until_mounted(&package, "7.0.0");
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.id() as i32), nix::sys::signal::SIGINT).unwrap();
    let status = child.wait_with_output().unwrap().status;
    assert_eq!(status.code(), Some(130));
    assert_eq!(image_ids(), before);
    assert_no_leftovers("after Ctrl-C");
}

#[test]
fn help_teaches() {
    let output = Command::new(env!("CARGO_BIN_EXE_bakery")).args(["bake", "--help"]).output().unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    for needle in ["--base", "--recipe", "--package", "--sha256", "--rebake", "Example", "BAKERY_HTTP_TOKEN", "netrc"] {
        assert!(help.contains(needle), "bake --help mentions {needle}");
    }
    // An aws-only option on the local provider is a usage error that says why, before anything runs.
    let output = run(&["images", "list", "--artifact-bucket", "b"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("--artifact-bucket is for --provider aws"));
}

#[test]
fn verifying_an_unknown_image_and_building_a_malformed_base_fail_clearly() {
    let _serial = serial();
    let (code, out, stderr) = run_json(&["verify", "ami-00000000000000000"]);
    assert_eq!(code, 4, "{stderr}");
    assert!(out["error"].as_str().unwrap().contains("ami-00000000000000000"), "{out}");
    assert_no_leftovers("after verifying an unknown image");

    let dir = tempfile::tempdir().unwrap();
    let recipe = dir.path().join("bad-base.toml");
    std::fs::write(&recipe, "name = \"x\"\nsuite = \"bookworm\"\nunknown_key = 1\n").unwrap();
    std::fs::copy(workspace().join("base-images/build-disk.sh"), dir.path().join("build-disk.sh")).unwrap();
    let (code, out, stderr) = run_json(&["base", "build", &recipe.to_string_lossy()]);
    assert_eq!(code, 3, "{stderr}");
    assert!(out["error"].as_str().unwrap().contains("bad-base.toml"), "{out}");
    assert_no_leftovers("after a malformed base recipe");
}

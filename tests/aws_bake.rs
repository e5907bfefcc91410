//! The aws provider against moto, through the project's proxy that checks what moto does not
//! (block size, per-block checksums, changed-block count, LINEAR aggregate) and injects faults.
//! The base image is built locally once, then pushed; bakes run in direct mode (any host) and
//! in attach mode on a pretend EC2 host (a metadata service in this process, and the test
//! playing the kernel: an attached volume appears as a device node over a loop device).

mod common;

use common::aws::*;
use common::*;
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::MutexGuard;

/// A fresh moto with the local base image pushed into it; returns the AMI and its snapshot.
fn fresh_cloud_with_base() -> (MutexGuard<'static, ()>, String, String) {
    let guard = serial();
    base_image();
    reset();
    // The mirrors of the last test's snapshots (gone with the reset) must not pile up.
    let (code, collected, stderr) = run_aws_json(&["gc", "--older-than", "0s"], &[]);
    assert_eq!(code, 0, "gc on an empty cloud: {collected}\n{stderr}");
    let (code, pushed, stderr) = run_aws_json(&["push", BASE], &[]);
    assert_eq!(code, 0, "push: {stderr}");
    assert_eq!(pushed["reused"], false);
    let stats = proxy_get("/_proxy/stats");
    assert_eq!(stats["violations"], json!([]), "{stats}");
    assert_eq!(stats["put_blocks"], pushed["uploaded_blocks"], "every uploaded block reached EBS once: {stats}");
    let ami = pushed["image_id"].as_str().unwrap().to_string();
    let snapshot = pushed["snapshot_id"].as_str().unwrap().to_string();
    (guard, ami, snapshot)
}

fn bake_args<'a>(base: &'a str, package: &'a str, version: &'a str) -> Vec<&'a str> {
    vec![
        "bake",
        "--base",
        base,
        "--recipe",
        "recipes/tomcat-webapp.toml",
        "--package",
        package,
        "--app",
        "hello",
        "--version",
        version,
        "--rebake",
    ]
}

fn register_params() -> Value {
    let requests = recorded("RegisterImage");
    requests.last().cloned().unwrap_or_else(|| panic!("no RegisterImage recorded: {requests:?}"))["params"].clone()
}

#[test]
fn push_and_direct_bake_upload_only_changed_blocks_and_the_result_holds_the_package() {
    let (_serial, ami, base_snapshot) = fresh_cloud_with_base();
    let params = register_params();
    assert_eq!(params["Architecture"], "x86_64", "{params}");
    assert_eq!(params["BootMode"], "legacy-bios");
    assert_eq!(params["ImdsSupport"], "v2.0");
    assert_eq!(params["EnaSupport"], "true");
    assert_eq!(params["BlockDeviceMapping.1.Ebs.SnapshotId"], base_snapshot.as_str());

    let dir = tempfile::tempdir().unwrap();
    let package = sample_package(dir.path(), "3.0.0", 0);
    let package = package.to_str().unwrap();
    let (code, baked, stderr) = run_aws_json(&bake_args(&ami, package, "3.0.0"), &[]);
    assert_eq!(code, 0, "direct bake: {stderr}");
    let snapshot = baked["snapshot_id"].as_str().unwrap();
    let stats = proxy_get("/_proxy/stats");
    assert_eq!(stats["violations"], json!([]), "{stats}");
    let uploaded = &stats["snapshots"][snapshot];
    assert_eq!(uploaded["parent"], base_snapshot.as_str(), "the child names the base as parent: {uploaded}");
    assert_eq!(uploaded["completed"], true);
    let blocks = uploaded["blocks"].as_object().unwrap().len() as u64;
    assert_eq!(blocks, baked["changed_blocks"].as_u64().unwrap(), "exactly the changed blocks were sent");
    assert!(blocks > 0 && blocks < 64, "a small package changes a few blocks, not the disk: {blocks}");
    assert_eq!(register_params()["BlockDeviceMapping.1.Ebs.SnapshotId"], snapshot);

    // Tags are readable with DescribeImages.
    let image = baked["image_id"].as_str().unwrap();
    let (code, shown, _) = run_aws_json(&["images", "show", image], &[]);
    assert_eq!(code, 0);
    assert_eq!(shown["tags"]["version"], "3.0.0");
    assert_eq!(shown["tags"]["bakery:bake-key"], baked["bake_key"]);

    // Rebuild the image from base + changed blocks in a cold cache, and check every file.
    let cold = tempfile::tempdir().unwrap();
    let disk = cold.path().join("disk.raw");
    let state = cold.path().join("state");
    let (code, _, stderr) = {
        let disk = disk.to_str().unwrap();
        run_aws_json(&["--state-dir", state.to_str().unwrap(), "images", "export", image, "-o", disk], &[])
    };
    assert_eq!(code, 0, "export: {stderr}");
    let mounted = MountedDisk::new(&disk);
    let manifest: Value =
        serde_json::from_slice(&std::fs::read(mounted.path("/var/lib/bakery/manifest.json")).unwrap()).unwrap();
    assert_eq!(manifest["version"], "3.0.0");
    let files = manifest["files"].as_array().unwrap();
    assert!(!files.is_empty());
    for file in files.iter().filter(|f| f["sha256"].is_string()) {
        let path = mounted.path(file["path"].as_str().unwrap());
        assert_eq!(sha256_file(&path), file["sha256"].as_str().unwrap(), "{}", path.display());
    }
    drop(mounted);
    // The cold state directory made its own copy-on-write pool: it goes with the directory.
    let pool = state.join("cow");
    if pool.exists() {
        assert!(std::process::Command::new("umount").arg(&pool).status().unwrap().success(), "unmount {pool:?}");
    }

    // Same inputs: the image is found by its bake-key tag, nothing is uploaded.
    let mut again = bake_args(&ami, package, "3.0.0");
    again.pop();
    let (code, reused, stderr) = run_aws_json(&again, &[]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(reused["reused"], true);
    assert_eq!(reused["image_id"], image);
    assert_eq!(cloud_leftovers(), json!([]));
    assert_no_leftovers("after direct bakes");
}

#[test]
fn direct_bakes_ride_out_throttling_server_errors_and_dropped_connections() {
    let (_serial, ami, _) = fresh_cloud_with_base();
    let dir = tempfile::tempdir().unwrap();
    let package = sample_package(dir.path(), "3.1.0", 4);
    proxy_post("/_proxy/faults", &json!({ "throttle": 0.1, "server_error": 0.1, "drop": 0.03, "seed": 11 }));
    let (code, baked, stderr) = run_aws_json(&bake_args(&ami, package.to_str().unwrap(), "3.1.0"), &[]);
    let stats = proxy_get("/_proxy/stats");
    proxy_post("/_proxy/faults", &json!({}));
    assert_eq!(code, 0, "bake under faults: {stderr}\n{stats}");
    let faults: u64 = stats["faults"].as_object().unwrap().values().map(|v| v.as_u64().unwrap()).sum();
    assert!(faults >= 3, "faults were injected: {stats}");
    assert_eq!(stats["violations"], json!([]));
    let snapshot = &stats["snapshots"][baked["snapshot_id"].as_str().unwrap()];
    assert_eq!(snapshot["completed"], true);
    assert_eq!(cloud_leftovers(), json!([]));
    assert_no_leftovers("after a bake under faults");
}

/// StartSnapshot and RegisterImage are carried out but their replies are lost: the retries adopt
/// what the first attempts made (the snapshot by its client token, the image by its name and
/// snapshot), so one snapshot and one image exist and nothing leaks.
#[test]
fn a_direct_bake_whose_replies_are_lost_adopts_what_the_first_attempts_made() {
    let (_serial, ami, _) = fresh_cloud_with_base();
    let dir = tempfile::tempdir().unwrap();
    let package = sample_package(dir.path(), "3.4.0", 0);
    let snapshots_before = proxy_get("/_proxy/stats")["snapshots"].as_object().unwrap().len();
    let faults = json!({ "lost": 1.0, "actions": ["StartSnapshot", "RegisterImage"], "max": 2 });
    proxy_post("/_proxy/faults", &faults);
    let (code, baked, stderr) = run_aws_json(&bake_args(&ami, package.to_str().unwrap(), "3.4.0"), &[]);
    let stats = proxy_get("/_proxy/stats");
    proxy_post("/_proxy/faults", &json!({}));
    assert_eq!(
        code, 0,
        "{stderr}
{stats}"
    );
    assert_eq!(stats["faults"], json!({ "lost": 2 }), "{stats}");
    assert_eq!(stats["violations"], json!([]));
    assert_eq!(stats["snapshots"].as_object().unwrap().len(), snapshots_before + 1, "one snapshot started: {stats}");
    assert_eq!(recorded("RegisterImage").len(), 2, "the lost reply's attempt and the retry");
    let named = boto(&format!(
        "print(json.dumps([i['ImageId'] for i in ec2.describe_images(Owners=['self'])['Images'] if i['Name'] == '{}']))",
        baked["name"].as_str().unwrap()
    ));
    assert_eq!(named, json!([baked["image_id"]]));
    assert_eq!(cloud_leftovers(), json!([]));
    assert_no_leftovers("after lost replies");
}

/// The base snapshot's blocks are mirrored from EBS for the bake, and two of them arrive
/// corrupted: the mirror checks each block's checksum, fetches those again, and the
/// bake succeeds on the right blocks.
#[test]
fn the_mirror_fetches_corrupted_blocks_again() {
    let (_serial, ami, base_snapshot) = fresh_cloud_with_base();
    let mirrored = state_dir().join(format!("aws/us-east-1/snapshots/{base_snapshot}.json"));
    assert!(!mirrored.exists(), "a fresh cloud's base is not mirrored yet");
    proxy_post("/_proxy/corrupt", &json!({ "get_blocks": 2 }));
    let dir = tempfile::tempdir().unwrap();
    let package = sample_package(dir.path(), "3.5.0", 0);
    let (code, baked, stderr) = run_aws_json(&bake_args(&ami, package.to_str().unwrap(), "3.5.0"), &[]);
    let stats = proxy_get("/_proxy/stats");
    assert_eq!(code, 0, "{baked}\n{stderr}");
    assert_eq!(stats["faults"]["corrupt_get"], 2, "{stats}");
    assert!(mirrored.exists(), "the base was mirrored");
    assert_eq!(stats["violations"], json!([]));
    assert_eq!(cloud_leftovers(), json!([]));
    assert_no_leftovers("after a mirror with corrupted blocks");
}

#[test]
fn a_block_corrupted_in_transit_fails_the_bake_and_leaves_nothing() {
    let (_serial, ami, _) = fresh_cloud_with_base();
    let images_before = boto("print(json.dumps(len(ec2.describe_images(Owners=['self'])['Images'])))");
    let dir = tempfile::tempdir().unwrap();
    let package = sample_package(dir.path(), "3.2.0", 0);
    proxy_post("/_proxy/corrupt", &json!({ "put_blocks": 1 }));
    let (code, failed, stderr) = run_aws_json(&bake_args(&ami, package.to_str().unwrap(), "3.2.0"), &[]);
    assert_eq!(code, 1, "{failed}\n{stderr}");
    let error = failed["error"].as_str().unwrap();
    assert!(error.contains("PutSnapshotBlock") && error.to_lowercase().contains("checksum"), "{error}");
    let images_after = boto("print(json.dumps(len(ec2.describe_images(Owners=['self'])['Images'])))");
    assert_eq!(images_before, images_after, "no image registered");
    let started = boto(
        "snaps = ec2.describe_snapshots(OwnerIds=['self'])['Snapshots']\n\
         print(json.dumps([s['SnapshotId'] for s in snaps if s.get('Description', '').startswith('hello-3.2.0')]))",
    );
    assert_eq!(started, json!([]), "the started snapshot was deleted");
    assert_eq!(cloud_leftovers(), json!([]));
    assert_no_leftovers("after a corrupted block");
}

/// A pretend instance metadata service (IMDSv2: token, then metadata with the token).
fn metadata_service(instance: &str, zone: &str) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let address = format!("http://{}", listener.local_addr().unwrap());
    let (instance, zone) = (instance.to_string(), zone.to_string());
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request = String::new();
            reader.read_line(&mut request).unwrap_or_default();
            let mut token = false;
            loop {
                let mut header = String::new();
                if reader.read_line(&mut header).unwrap_or(0) == 0 || header == "\r\n" {
                    break;
                }
                token |= header.to_ascii_lowercase().starts_with("x-aws-ec2-metadata-token:");
            }
            let path = request.split(' ').nth(1).unwrap_or_default();
            let (status, body) = match path {
                "/latest/api/token" if request.starts_with("PUT") => {
                    ("200 OK\r\nx-aws-ec2-metadata-token-ttl-seconds: 300", "token-1".to_string())
                }
                _ if !token => ("401 Unauthorized", String::new()),
                "/latest/meta-data/instance-id" => ("200 OK", instance.clone()),
                "/latest/meta-data/placement/availability-zone" => ("200 OK", zone.clone()),
                _ => ("404 Not Found", String::new()),
            };
            let mut stream = stream;
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    address
}

/// An instance in moto for a bake to run on, and its metadata service here: (id, endpoint).
fn pretend_ec2_host(ami: &str) -> (String, String) {
    let instance = boto(&format!(
        "r = ec2.run_instances(ImageId='{ami}', MinCount=1, MaxCount=1, InstanceType='t3.micro', \
         Placement={{'AvailabilityZone': 'us-east-1b'}})\nprint(json.dumps(r['Instances'][0]['InstanceId']))"
    ));
    let instance = instance.as_str().unwrap().to_string();
    let imds = metadata_service(&instance, "us-east-1b");
    (instance, imds)
}

/// The environment that makes bakery find itself on the pretend host.
fn imds_env(imds: &str) -> [(&'static str, &str); 2] {
    [("AWS_EC2_METADATA_DISABLED", "false"), ("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds)]
}

/// Plays the kernel of the pretend EC2 host: once the proxy has seen AttachVolume, the volume
/// appears at the device name it asked for, as on a Xen instance: a device node over a loop
/// device on a copy of the base disk, its root partition beside it (`/dev/sdf2`). Dropping it
/// removes the nodes and the loop devices.
struct PretendKernel {
    watcher: Option<std::thread::JoinHandle<Vec<(String, String)>>>,
    _disk: tempfile::TempDir,
}

impl PretendKernel {
    fn start() -> PretendKernel {
        let dir = tempfile::tempdir().unwrap();
        let disk = dir.path().join("volume.raw");
        let exported = run(&["images", "export", BASE, "--output-file", disk.to_str().unwrap()]);
        assert!(exported.status.success(), "export: {}", String::from_utf8_lossy(&exported.stderr));
        let watcher = std::thread::spawn(move || {
            let attached = (0..1200).find_map(|_| {
                std::thread::sleep(std::time::Duration::from_millis(100));
                recorded("AttachVolume").first().map(|call| call["params"]["Device"].as_str().unwrap().to_string())
            });
            let device = attached.expect("AttachVolume within two minutes");
            let root = bakery::gpt::root_partition(&disk).unwrap();
            let losetup = |extra: &[String]| {
                let out = std::process::Command::new("losetup")
                    .args(["--find", "--show"])
                    .args(extra)
                    .arg(&disk)
                    .output()
                    .unwrap();
                assert!(out.status.success(), "losetup: {}", String::from_utf8_lossy(&out.stderr));
                String::from_utf8_lossy(&out.stdout).trim().to_string()
            };
            let whole = losetup(&[]);
            let partition =
                losetup(&["--offset".into(), root.offset().to_string(), "--sizelimit".into(), root.size().to_string()]);
            let mut made = Vec::new();
            for (node, loop_device) in [(device.clone(), whole), (format!("{device}{}", root.number), partition)] {
                let rdev = std::os::unix::fs::MetadataExt::rdev(&std::fs::metadata(&loop_device).unwrap());
                let (major, minor) = (nix::sys::stat::major(rdev).to_string(), nix::sys::stat::minor(rdev).to_string());
                let mknod = std::process::Command::new("mknod").args([&node, "b", &major, &minor]).status().unwrap();
                assert!(mknod.success(), "mknod {node}");
                made.push((node, loop_device));
            }
            made
        });
        PretendKernel { watcher: Some(watcher), _disk: dir }
    }
}

impl Drop for PretendKernel {
    fn drop(&mut self) {
        let Some(Ok(made)) = self.watcher.take().map(|watcher| watcher.join()) else { return };
        for (node, loop_device) in made {
            let _ = std::fs::remove_file(&node);
            let _ = std::process::Command::new("losetup").args(["--detach", &loop_device]).status();
        }
    }
}

/// Attach mode end to end, with CreateSnapshot's first reply lost (the snapshot was made):
/// exactly one snapshot of the volume is left, the one registered.
#[test]
fn attach_mode_creates_attaches_detaches_snapshots_registers_and_deletes_the_volume() {
    let (_serial, ami, base_snapshot) = fresh_cloud_with_base();
    let (instance, imds) = pretend_ec2_host(&ami);
    let instance = instance.as_str();
    let dir = tempfile::tempdir().unwrap();
    let package = sample_package(dir.path(), "3.3.0", 0);
    let mut args = bake_args(&ami, package.to_str().unwrap(), "3.3.0");
    let key = "arn:aws:kms:us-east-1:123456789012:key/0b1c2d3e-bake-ry00-test-000000000000";
    args.extend(["--mode", "attach", "--kms-key", key]);
    let env = imds_env(&imds);
    let kernel = PretendKernel::start();
    proxy_post("/_proxy/faults", &json!({ "lost": 1.0, "actions": ["CreateSnapshot"], "max": 1 }));
    let (code, baked, stderr) = run_aws_json(&args, &env);
    let stats = proxy_get("/_proxy/stats");
    proxy_post("/_proxy/faults", &json!({}));
    drop(kernel);
    assert_eq!(code, 0, "attach bake: {stderr}");
    assert_eq!(stats["faults"], json!({ "lost": 1 }), "{stats}");

    let created = recorded("CreateVolume");
    assert_eq!(created.len(), 1, "{created:?}");
    assert_eq!(created[0]["params"]["SnapshotId"], base_snapshot.as_str());
    assert_eq!(created[0]["params"]["AvailabilityZone"], "us-east-1b");
    assert_eq!(created[0]["params"]["Encrypted"], "true");
    assert_eq!(created[0]["params"]["KmsKeyId"], key);
    let attached = recorded("AttachVolume");
    assert_eq!(attached[0]["params"]["InstanceId"], instance);
    assert_eq!(attached[0]["params"]["Device"], "/dev/sdf");
    let volume = attached[0]["params"]["VolumeId"].as_str().unwrap();
    let detached = recorded("DetachVolume");
    assert_eq!(detached[0]["params"]["InstanceId"], instance, "DetachVolume names the instance");
    let snapshotted = recorded("CreateSnapshot");
    assert_eq!(snapshotted.len(), 2, "the lost reply's attempt and the retry");
    assert_eq!(snapshotted[0]["params"]["VolumeId"], volume);
    let of_volume = boto(&format!(
        "print(json.dumps([s['SnapshotId'] for s in ec2.describe_snapshots(Filters=[{{'Name': 'volume-id', 'Values': ['{volume}']}}])['Snapshots']]))"
    ));
    assert_eq!(of_volume, json!([baked["snapshot_id"]]), "one snapshot of the volume is left");
    assert_eq!(register_params()["BlockDeviceMapping.1.Ebs.SnapshotId"], baked["snapshot_id"]);
    assert_eq!(recorded("DeleteVolume")[0]["params"]["VolumeId"], volume);
    assert_eq!(cloud_leftovers(), json!([]));
    assert_no_leftovers("after an attach-mode bake");
}

/// The volumes EC2 says are attached to `instance`.
fn attached_to(instance: &str) -> Value {
    boto(&format!(
        "print(json.dumps(sorted(v['VolumeId'] for v in ec2.describe_volumes(Filters=[{{'Name': 'attachment.instance-id', 'Values': ['{instance}']}}])['Volumes'])))"
    ))
}

/// An attach-mode bake killed with its volume attached and mounted: gc on the same host (in
/// attach mode, as it finds itself on EC2) unmounts it, detaches it naming the instance, and
/// deletes it, from the dead bake's journal (no `--older-than`: not the sweep). Nothing is left
/// in the cloud, and the instance has no volume (so no device name) left attached.
#[test]
fn gc_reclaims_a_killed_attach_mode_bake_s_attached_volume() {
    let (_serial, ami, _) = fresh_cloud_with_base();
    let (instance, imds) = pretend_ec2_host(&ami);
    let instance = instance.as_str();
    let env = imds_env(&imds);
    let own = attached_to(instance);
    let dir = tempfile::tempdir().unwrap();
    let package = sample_package(dir.path(), "3.6.0", 0);
    let mut args = bake_args(&ami, package.to_str().unwrap(), "3.6.0");
    args.extend(["--mode", "attach"]);
    let kernel = PretendKernel::start();
    let mut bake = aws_bakery(&args, &env)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while !std::fs::read_to_string("/proc/mounts").unwrap().lines().any(|l| l.starts_with("/dev/sdf")) {
        assert!(bake.try_wait().unwrap().is_none(), "the bake ended before it mounted its volume");
        assert!(std::time::Instant::now() < deadline, "the volume was never mounted");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    bake.kill().unwrap();
    bake.wait().unwrap();
    // A kill can also land mid-save of the journal: leave such a torn copy beside it.
    let journals = state_dir().join("journal");
    for entry in std::fs::read_dir(&journals).unwrap().flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with("bake-") && name.ends_with(".json") {
            std::fs::write(journals.join(format!(".{name}.tmp-00000000000000000")), b"{").unwrap();
        }
    }
    let volume = recorded("AttachVolume")[0]["params"]["VolumeId"].as_str().unwrap().to_string();
    assert!(attached_to(instance).as_array().unwrap().contains(&json!(volume)), "attached when the bake died");

    let (code, report, stderr) = run_aws_json(&["gc"], &env);
    drop(kernel);
    assert_eq!(code, 0, "{report}\n{stderr}");
    assert!(report["removed"].to_string().contains(&format!("attachment of {volume}")), "{report}");
    let detached = recorded("DetachVolume");
    assert_eq!(detached.last().unwrap()["params"]["InstanceId"], instance, "{detached:?}");
    assert_eq!(recorded("DeleteVolume").last().unwrap()["params"]["VolumeId"], volume.as_str());
    assert_eq!(attached_to(instance), own, "the instance is left with its own volumes, so no device name taken");
    assert_eq!(cloud_leftovers(), json!([]));
    assert_no_leftovers("after gc of a killed attach-mode bake");
}

#[test]
fn gc_removes_what_a_dead_bake_left_in_the_cloud_once_it_is_old_enough() {
    let _serial = serial();
    reset();
    let left = boto(
        "tags = [{'Key': 'bakery:bake-id', 'Value': 'bake-0123456789abcdef0'}, {'Key': 'bakery:status', 'Value': 'in-progress'}]\n\
         v = ec2.create_volume(Size=4, AvailabilityZone='us-east-1a', TagSpecifications=[{'ResourceType': 'volume', 'Tags': tags}])\n\
         s = ec2.create_snapshot(VolumeId=v['VolumeId'], TagSpecifications=[{'ResourceType': 'snapshot', 'Tags': tags}])\n\
         print(json.dumps([v['VolumeId'], s['SnapshotId']]))",
    );
    let ids: Vec<&str> = left.as_array().unwrap().iter().map(|id| id.as_str().unwrap()).collect();
    let (code, report, stderr) = run_aws_json(&["gc"], &[]);
    assert_eq!(code, 0, "{stderr}");
    for id in &ids {
        assert!(!report["removed"].to_string().contains(id), "{id} is young: it may be a running bake's: {report}");
        assert!(report["kept_live"].to_string().contains(id), "{report}");
    }
    let (code, report, stderr) = run_aws_json(&["gc", "--older-than", "0s"], &[]);
    assert_eq!(code, 0, "{stderr}");
    let removed = report["removed"].to_string();
    for id in &ids {
        assert!(removed.contains(id), "{id} removed: {report}");
    }
    assert_eq!(cloud_leftovers(), json!([]));
}

#[test]
fn copies_and_shares_are_made_tagged_granted_and_deleted_with_the_image() {
    let (_serial, ami, _) = fresh_cloud_with_base();
    let dir = tempfile::tempdir().unwrap();
    let package = sample_package(dir.path(), "3.4.0", 0);
    let mut args = bake_args(&ami, package.to_str().unwrap(), "3.4.0");
    args.extend(["--copy-to-region", "us-west-2", "--copy-to-region", "eu-west-1", "--share-with", "123456789012"]);
    let (code, baked, stderr) = run_aws_json(&args, &[]);
    assert_eq!(code, 0, "{stderr}");
    let (image, snapshot) = (baked["image_id"].as_str().unwrap(), baked["snapshot_id"].as_str().unwrap());

    let (_, shown, _) = run_aws_json(&["images", "show", image], &[]);
    let copies: Vec<(String, String)> = shown["tags"]["bakery:copies"]
        .as_str()
        .unwrap_or_else(|| panic!("copies are listed: {shown}"))
        .split(',')
        .map(|c| c.split_once('=').map(|(r, i)| (r.to_string(), i.to_string())).unwrap())
        .collect();
    let regions: Vec<&str> = copies.iter().map(|(r, _)| r.as_str()).collect();
    assert_eq!(regions, ["us-west-2", "eu-west-1"]);
    for (region, copy) in &copies {
        let version = boto(&format!(
            "i = ec2_in('{region}').describe_images(ImageIds=['{copy}'])['Images'][0]\n\
             print(json.dumps({{t['Key']: t['Value'] for t in i.get('Tags', [])}}.get('version')))"
        ));
        assert_eq!(version, "3.4.0", "the copy in {region} carries the tags");
    }
    let granted = boto(&format!(
        "a = ec2.describe_image_attribute(ImageId='{image}', Attribute='launchPermission')['LaunchPermissions']\n\
         s = ec2.describe_snapshot_attribute(SnapshotId='{snapshot}', Attribute='createVolumePermission')['CreateVolumePermissions']\n\
         print(json.dumps([[p.get('UserId') for p in a], [p.get('UserId') for p in s]]))"
    ));
    assert_eq!(granted, json!([["123456789012"], ["123456789012"]]));

    let (code, _, stderr) = run_aws_json(&["images", "rm", image], &[]);
    assert_eq!(code, 0, "{stderr}");
    for (region, copy) in &copies {
        let left = boto(&format!(
            "print(json.dumps(len(ec2_in('{region}').describe_images(Owners=['self'], Filters=[{{'Name': 'image-id', 'Values': ['{copy}']}}])['Images'])))"
        ));
        assert_eq!(left, 0, "the copy in {region} went with the image");
    }
}

#[test]
fn a_direct_bake_killed_while_uploading_is_cleaned_up_by_gc() {
    let (_serial, ami, _) = fresh_cloud_with_base();
    let images_before = boto("print(json.dumps(len(ec2.describe_images(Owners=['self'])['Images'])))");
    let dir = tempfile::tempdir().unwrap();
    let package = sample_package(dir.path(), "3.5.0", 16);
    let uploaded_before = proxy_get("/_proxy/stats")["put_blocks"].as_u64().unwrap();
    // Throttling slows the upload down enough to be caught in the middle of it.
    proxy_post("/_proxy/faults", &json!({ "throttle": 0.6, "seed": 5, "actions": ["PutSnapshotBlock"] }));
    let mut bake = aws_bakery(&bake_args(&ami, package.to_str().unwrap(), "3.5.0"), &[])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while proxy_get("/_proxy/stats")["put_blocks"].as_u64().unwrap() == uploaded_before {
        assert!(bake.try_wait().unwrap().is_none(), "the bake ended before it uploaded a block");
        assert!(std::time::Instant::now() < deadline, "no block was uploaded");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert!(bake.try_wait().unwrap().is_none(), "the bake is still uploading when it is killed");
    bake.kill().unwrap();
    bake.wait().unwrap();
    proxy_post("/_proxy/faults", &json!({}));
    assert_ne!(cloud_leftovers(), json!([]), "the unfinished snapshot is there until gc runs");

    // gc on an EC2 host runs in attach mode, and still undoes a direct-mode bake: its volume
    // is a loop device on this host's store.
    let (_, imds) = pretend_ec2_host(&ami);
    let (code, report, stderr) = run_aws_json(&["gc", "--older-than", "0s"], &imds_env(&imds));
    assert_eq!(code, 0, "{report}\n{stderr}");
    assert_eq!(cloud_leftovers(), json!([]), "{report}");
    let images_after = boto("print(json.dumps(len(ec2.describe_images(Owners=['self'])['Images'])))");
    assert_eq!(images_before, images_after);
    assert_no_leftovers("after gc of a killed bake");
}

#[test]
fn an_image_s_documents_go_to_the_artifact_bucket_and_go_with_the_image() {
    let (_serial, ami, _) = fresh_cloud_with_base();
    boto("boto3.client('s3').create_bucket(Bucket='bakery-artifacts')");
    let dir = tempfile::tempdir().unwrap();
    let package = sample_package(dir.path(), "3.6.0", 0);
    let package = package.to_str().unwrap();
    let mut args = bake_args(&ami, package, "3.6.0");
    args.extend(["--artifact-bucket", "bakery-artifacts"]);
    let (code, baked, stderr) = run_aws_json(&args, &[]);
    assert_eq!(code, 0, "{stderr}");
    let image = baked["image_id"].as_str().unwrap();
    let (_, shown, _) = run_aws_json(&["images", "show", image], &[]);
    let prefix = format!("s3://bakery-artifacts/bakery/images/{image}/");
    for (tag, file) in [
        ("bakery:manifest-url", "manifest.json"),
        ("bakery:sbom-url", "sbom.cdx.json"),
        ("bakery:provenance-url", "provenance.intoto.json"),
    ] {
        assert_eq!(shown["tags"][tag], format!("{prefix}{file}"), "{shown}");
    }
    let stored = |key: &str| {
        boto(&format!(
            "body = boto3.client('s3').get_object(Bucket='bakery-artifacts', Key='bakery/images/{image}/{key}')['Body'].read()\n\
             print(json.dumps(body.decode()))"
        ))
    };
    // `images sbom` fetches what the tag links; the SBOM's digest is the image's tag.
    let (code, sbom, stderr) = run_aws_json(&["images", "sbom", image], &[]);
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(sbom, serde_json::from_str::<Value>(stored("sbom.cdx.json").as_str().unwrap()).unwrap());
    let digest = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(stored("sbom.cdx.json").as_str().unwrap().as_bytes()))
    };
    assert_eq!(shown["tags"]["bakery:sbom-sha256"], digest.as_str());
    let (code, provenance, _) = run_aws_json(&["images", "provenance", image], &[]);
    assert_eq!(code, 0);
    assert_eq!(provenance["subject"][0]["digest"]["sha256"], digest.as_str());

    // The image goes, its documents go.
    let (code, _, stderr) = run_aws_json(&["images", "rm", image], &[]);
    assert_eq!(code, 0, "{stderr}");
    let left =
        boto("print(json.dumps(boto3.client('s3').list_objects_v2(Bucket='bakery-artifacts').get('KeyCount', 0)))");
    assert_eq!(left, json!(0));

    // A bucket that is not there: the bake fails clearly, and leaves no image behind.
    let mut args = bake_args(&ami, package, "3.6.1");
    args.extend(["--artifact-bucket", "bakery-no-such-bucket"]);
    let (code, _, stderr) = run_aws_json(&args, &[]);
    assert_ne!(code, 0);
    assert!(stderr.contains("bakery-no-such-bucket"), "{stderr}");
    let images = boto("print(json.dumps(len(ec2.describe_images(Owners=['self'])['Images'])))");
    assert_eq!(images, json!(1), "only the pushed base: {images}");
    assert_eq!(cloud_leftovers(), json!([]));
    assert_no_leftovers("after a bake whose artifact bucket is missing");
}

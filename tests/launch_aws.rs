//! The launcher's `aws` provider through the real `launcher` binary, against moto behind the
//! project's proxy (which injects what moto cannot do: unhealthy targets and throttling).
//! Everything the launcher does is checked from the outside with boto3: ASGs, their target
//! groups and suspended processes, launch templates, target registrations, listener rules,
//! Cloud Map registrations. The instances' part in Cloud Map is played by the image's real agent
//! (`base-images/bakery-agent`), run on this host with each group's user data; the load
//! balancer's CloudWatch figures are put by the test.

mod common;

use common::aws::{boto, moto, proxy_get, proxy_post, recorded, reset};
use common::serial;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const CLUSTER: &str = "hello-prod";

/// A balancer in front of the cluster, and images to deploy.
struct Stand {
    target_group: String,
    listener: String,
    images: Vec<String>,
}

/// Default VPC subnets, an ALB with a target group and a listener, three images.
fn stand() -> Stand {
    reset();
    let value = boto(
        "elb = boto3.client('elbv2')\n\
         subnets = ec2.describe_subnets(Filters=[{'Name': 'default-for-az', 'Values': ['true']}])['Subnets']\n\
         lb = elb.create_load_balancer(Name='hello', Subnets=[s['SubnetId'] for s in subnets[:3]], Type='application')['LoadBalancers'][0]\n\
         tg = elb.create_target_group(Name='hello-prod', Protocol='HTTP', Port=8080, VpcId=subnets[0]['VpcId'], HealthCheckPath='/', TargetType='instance')['TargetGroups'][0]\n\
         listener = elb.create_listener(LoadBalancerArn=lb['LoadBalancerArn'], Protocol='HTTP', Port=80, DefaultActions=[{'Type': 'forward', 'TargetGroupArn': tg['TargetGroupArn']}])['Listeners'][0]\n\
         volume = ec2.create_volume(AvailabilityZone=subnets[0]['AvailabilityZone'], Size=1)['VolumeId']\n\
         snapshot = ec2.create_snapshot(VolumeId=volume)['SnapshotId']\n\
         mapping = [{'DeviceName': '/dev/xvda', 'Ebs': {'SnapshotId': snapshot}}]\n\
         images = [ec2.register_image(Name=f'hello-{v}', Architecture='x86_64', RootDeviceName='/dev/xvda', BlockDeviceMappings=mapping, EnaSupport=True)['ImageId'] for v in (1, 2, 3)]\n\
         print(json.dumps({'tg': tg['TargetGroupArn'], 'listener': listener['ListenerArn'], 'images': images}))",
    );
    Stand {
        target_group: value["tg"].as_str().unwrap().to_string(),
        listener: value["listener"].as_str().unwrap().to_string(),
        images: value["images"].as_array().unwrap().iter().map(|i| i.as_str().unwrap().to_string()).collect(),
    }
}

/// `launcher --provider aws --output json` against moto, polling fast.
fn launcher(args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_launcher"));
    common::aws::aws_env(&mut command);
    command.env("LAUNCHER_POLL_INTERVAL", "200ms").args(args).args(["--provider", "aws", "--output", "json"]);
    command
}

fn run(args: &[&str]) -> (i32, Value, String) {
    let output = launcher(args).output().expect("launcher runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let value: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("stdout is one JSON object ({e}): {stdout:?}\nstderr: {stderr}"));
    (output.status.code().unwrap_or(-1), value, stderr)
}

fn deploy_args<'a>(stand: &'a Stand, image: usize, timeout: &'a str) -> Vec<&'a str> {
    let mut args = copying_deploy_args(&stand.images[image], timeout);
    args.extend(["--target-group", &stand.target_group]);
    args
}

/// A deploy that names no target group: it copies the group it replaces.
fn copying_deploy_args<'a>(image: &'a str, timeout: &'a str) -> Vec<&'a str> {
    vec!["deploy", "--cluster", CLUSTER, "--image", image, "--health-url", "/hello/health", "--health-timeout", timeout]
}

fn deploy(stand: &Stand, image: usize, extra: &[&str]) -> Value {
    let mut args = deploy_args(stand, image, "60s");
    args.extend_from_slice(extra);
    let (code, value, stderr) = run(&args);
    assert_eq!(code, 0, "deploy of image {image}: {value}\n{stderr}");
    assert_eq!(value["phase"], "succeeded", "{value}");
    value
}

fn start_deploy(stand: &Stand, image: usize) -> Child {
    start_deploy_with(stand, image, &[])
}

fn start_deploy_with(stand: &Stand, image: usize, extra: &[&str]) -> Child {
    let mut args = deploy_args(stand, image, "10m");
    args.extend_from_slice(extra);
    launcher(&args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap()
}

/// What a finished background launcher printed, and its exit code.
fn finished(child: Child) -> (i32, Value) {
    let output = child.wait_with_output().unwrap();
    let value = serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&output.stderr)));
    (output.status.code().unwrap_or(-1), value)
}

/// What exists in the account, as AWS reports it.
fn world(stand: &Stand) -> Value {
    boto(&format!(
        "asg = boto3.client('autoscaling'); elb = boto3.client('elbv2')\n\
         groups = {{g['AutoScalingGroupName']: {{\n\
             'target_groups': g['TargetGroupARNs'],\n\
             'suspended': sorted(p['ProcessName'] for p in g['SuspendedProcesses']),\n\
             'instances': sorted(i['InstanceId'] for i in g['Instances']),\n\
             'tags': {{t['Key']: t['Value'] for t in g['Tags']}},\n\
             'capacity': [g['MinSize'], g['DesiredCapacity'], g['MaxSize']],\n\
             'health_check': g['HealthCheckType'],\n\
         }} for g in asg.describe_auto_scaling_groups()['AutoScalingGroups']}}\n\
         running = sorted(i['InstanceId'] for r in ec2.describe_instances(Filters=[{{'Name': 'instance-state-name', 'Values': ['running']}}])['Reservations'] for i in r['Instances'])\n\
         ddb = boto3.client('dynamodb')\n\
         try: locks = sorted(i['cluster']['S'] for i in ddb.scan(TableName='bakery-launcher')['Items'] if i['key']['S'] == 'lock')\n\
         except ddb.exceptions.ResourceNotFoundException: locks = []\n\
         print(json.dumps({{\n\
             'groups': groups,\n\
             'templates': sorted(t['LaunchTemplateName'] for t in ec2.describe_launch_templates()['LaunchTemplates']),\n\
             'target_groups': sorted(t['TargetGroupName'] for t in elb.describe_target_groups()['TargetGroups']),\n\
             'rules': sorted(r['Priority'] for r in elb.describe_rules(ListenerArn='{listener}')['Rules']),\n\
             'registered': sorted(d['Target']['Id'] for d in elb.describe_target_health(TargetGroupArn='{tg}')['TargetHealthDescriptions']),\n\
             'running': running,\n\
             'locks': locks,\n\
         }}))",
        listener = stand.listener,
        tg = stand.target_group,
    ))
}

fn group<'a>(world: &'a Value, name: &str) -> &'a Value {
    let group = &world["groups"][name];
    assert!(group.is_object(), "no group {name} in {world:#}");
    group
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .unwrap_or_else(|| panic!("not an array: {value}"))
        .iter()
        .map(|v| v.as_str().unwrap().into())
        .collect()
}

/// Serving: in the cluster's target group with all its instances registered, nothing suspended.
fn assert_serving(world: &Value, name: &str, target_group: &str) {
    let g = group(world, name);
    assert!(strings(&g["target_groups"]).contains(&target_group.to_string()), "{name} not attached: {g}");
    assert!(strings(&g["suspended"]).is_empty(), "{name}: {g}");
    let registered = strings(&world["registered"]);
    assert!(strings(&g["instances"]).iter().all(|i| registered.contains(i)), "{name}: {world:#}");
    assert!(g["tags"].get("bakery:disabled-at").is_none(), "{g}");
}

/// Disabled: detached, Launch/Terminate/AddToLoadBalancer suspended, instances still running.
fn assert_disabled(world: &Value, name: &str, target_group: &str) {
    let g = group(world, name);
    assert!(!strings(&g["target_groups"]).contains(&target_group.to_string()), "{name} still attached: {g}");
    let suspended = ["AddToLoadBalancer", "AlarmNotification", "Launch", "ScheduledActions", "Terminate"];
    assert_eq!(strings(&g["suspended"]), suspended, "{name}");
    let (instances, running, registered) =
        (strings(&g["instances"]), strings(&world["running"]), strings(&world["registered"]));
    assert!(!instances.is_empty() && instances.iter().all(|i| running.contains(i)), "{name}: {world:#}");
    assert!(instances.iter().all(|i| !registered.contains(i)), "{name} still registered: {world:#}");
    assert!(g["tags"]["bakery:disabled-at"].as_str().is_some_and(|t| t.parse::<u64>().is_ok()), "{g}");
}

/// The groups `launcher status` reports in service.
fn serving() -> Vec<String> {
    let (code, status, stderr) = run(&["status", "--cluster", CLUSTER]);
    assert_eq!(code, 0, "{stderr}");
    status["groups"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|g| g["in_service"] == true)
        .map(|g| g["name"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn deploy_flip_rollback_and_finish() {
    let _serial = serial();
    let stand = stand();
    let first = deploy(&stand, 0, &["--desired", "4", "--max", "6"]);
    assert_eq!(first["new_group"], "hello-prod-v000");
    assert_eq!(first["balancer_url"].as_str().map(|u| u.starts_with("http://hello-")), Some(true), "{first}");
    let w = world(&stand);
    assert_serving(&w, "hello-prod-v000", &stand.target_group);
    let v0 = group(&w, "hello-prod-v000");
    assert_eq!(v0["capacity"], json!([3, 4, 6]), "min restored after the flip");
    assert_eq!(v0["health_check"], "ELB");
    assert_eq!(v0["tags"]["bakery:cluster"], CLUSTER);
    assert_eq!(v0["tags"]["bakery:image"], stand.images[0].as_str());
    // What moto does not keep, the proxy recorded: IMDSv2 only, subnets in at least 3 zones,
    // and the group created outside the cluster's target group.
    let template = &recorded("CreateLaunchTemplate")
        .into_iter()
        .find(|r| r["params"]["LaunchTemplateName"] == "hello-prod-v000")
        .expect("the group's launch template")["params"];
    assert_eq!(template["LaunchTemplateData.MetadataOptions.HttpTokens"], "required", "{template}");
    assert_eq!(template["LaunchTemplateData.ImageId"], stand.images[0].as_str());
    let created = &recorded("CreateAutoScalingGroup")[0]["params"];
    assert!(created["VPCZoneIdentifier"].as_str().unwrap().split(',').count() >= 3, "{created}");
    assert_ne!(created["TargetGroupARNs.member.1"], stand.target_group.as_str(), "attached before the gate: {created}");

    let second = deploy(&stand, 1, &[]);
    assert_eq!(
        (&second["new_group"], &second["previous_group"]),
        (&json!("hello-prod-v001"), &json!("hello-prod-v000"))
    );
    let w = world(&stand);
    assert_serving(&w, "hello-prod-v001", &stand.target_group);
    assert_disabled(&w, "hello-prod-v000", &stand.target_group);
    assert_eq!(group(&w, "hello-prod-v001")["capacity"], json!([3, 4, 6]), "capacity captured from v000");
    assert_eq!(strings(&group(&w, "hello-prod-v001")["instances"]).len(), 4);
    assert_eq!(serving(), ["hello-prod-v001"]);

    let (code, back, stderr) = run(&["rollback", "--cluster", CLUSTER, "--health-timeout", "60s"]);
    assert_eq!(code, 0, "{back}\n{stderr}");
    assert_eq!(back["new_group"], "hello-prod-v000");
    let w = world(&stand);
    assert_serving(&w, "hello-prod-v000", &stand.target_group);
    assert_disabled(&w, "hello-prod-v001", &stand.target_group);
    let v0 = group(&w, "hello-prod-v000");
    assert!(v0["capacity"][1].as_u64().unwrap() >= 4 && strings(&v0["instances"]).len() >= 4, "{v0}");
    assert_eq!(serving(), ["hello-prod-v000"]);

    let (code, done, stderr) = run(&["finish", "--cluster", CLUSTER, "--soak", "0s"]);
    assert_eq!(code, 0, "{done}\n{stderr}");
    let w = world(&stand);
    assert_eq!(w["groups"].as_object().unwrap().keys().collect::<Vec<_>>(), ["hello-prod-v000"]);
    // The disabled group's template, check target group and rule go, and the lock was released.
    assert_eq!(strings(&w["templates"]), ["hello-prod-v000"]);
    assert_eq!(w["locks"], json!([]));
    assert_eq!(w["target_groups"].as_array().unwrap().len(), 2, "the cluster's and v000's check group: {w}");
    assert_eq!(w["rules"].as_array().unwrap().len(), 2, "default and v000's check rule: {w}");
    let (code, clusters, _) = run(&["clusters"]);
    assert_eq!((code, clusters), (0, json!([CLUSTER])));
    let (_, status, _) = run(&["status", "--cluster", CLUSTER]);
    assert_eq!(status["deploy"]["action"], "finish", "the record survives the process: {status}");
}

#[test]
fn a_failed_gate_leaves_the_old_group_serving_and_nothing_new() {
    let _serial = serial();
    let stand = stand();
    deploy(&stand, 0, &[]);
    let before = world(&stand);
    proxy_post("/_proxy/target-health", &json!({"state": "unhealthy"}));
    let (code, failed, stderr) = run(&deploy_args(&stand, 1, "3s"));
    ureq::delete(&format!("{}/_proxy/target-health", moto().endpoint)).call().unwrap();
    assert_eq!(code, 6, "{failed}\n{stderr}");
    assert_eq!(failed["phase"], "failed");
    assert!(stderr.contains("0 of 3 instances healthy, 0 starting, 3 unhealthy"), "{stderr}");
    let after = world(&stand);
    assert_serving(&after, "hello-prod-v000", &stand.target_group);
    assert_eq!(after["groups"].as_object().unwrap().len(), 1, "{after:#}");
    // No template, check target group or rule of v001 left, and the lock released.
    for key in ["templates", "target_groups", "rules", "registered"] {
        assert_eq!(after[key], before[key], "{key}");
    }
    assert!(recorded("DeleteAutoScalingGroup")
        .iter()
        .any(|r| r["params"]["AutoScalingGroupName"] == "hello-prod-v001"));
}

#[test]
fn a_second_deploy_is_refused_while_the_first_holds_the_lock() {
    let _serial = serial();
    let stand = stand();
    deploy(&stand, 0, &[]);
    proxy_post("/_proxy/target-health", &json!({"state": "initial", "seconds": 8}));
    let first = start_deploy(&stand, 1);
    wait_until("the first deploy creates its group", || recorded("CreateAutoScalingGroup").len() == 2);
    let (code, refused, stderr) = run(&deploy_args(&stand, 2, "60s"));
    assert_eq!(code, 5, "{refused}\n{stderr}");
    let message = refused["error"].as_str().unwrap();
    assert!(message.contains(&format!("(pid {})", first.id())) && message.contains("locked by deploy"), "{message}");
    let output = first.wait_with_output().unwrap();
    let record: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(output.status.success(), "{record}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(record["steps"][1]["duration_ms"].as_u64().unwrap() >= 3000, "the gate waited: {record}");
    assert_eq!(serving(), ["hello-prod-v001"]);
    assert!(world(&stand)["groups"].get("hello-prod-v002").is_none());
}

/// An older launcher locks a cluster with a launch template `bakery-lock-<cluster>` and cannot
/// see the table's lock: a deploy here respects its live holder (exit 5, naming it, nothing
/// made), and deletes a dead one's template before it deploys.
#[test]
fn an_older_launchers_lock_is_respected_while_its_holder_lives() {
    let _serial = serial();
    let stand = stand();
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let older_launchers_lock = |expires: u64| {
        boto(&format!(
            "import base64\n\
             holder = json.dumps({{'deploy_id': 'older-1', 'owner': 'ci', 'host': 'another-host', 'pid': 1, 'start_time': 0, 'expires': {expires}}})\n\
             tags = [{{'Key': 'bakery:lock', 'Value': '1'}}, {{'Key': 'bakery:lock-00', 'Value': base64.b64encode(holder.encode()).decode()}}]\n\
             for t in ec2.describe_launch_templates()['LaunchTemplates']:\n\
             \x20   if t['LaunchTemplateName'] == 'bakery-lock-{CLUSTER}': ec2.delete_launch_template(LaunchTemplateId=t['LaunchTemplateId'])\n\
             ec2.create_launch_template(LaunchTemplateName='bakery-lock-{CLUSTER}', LaunchTemplateData={{'InstanceType': 't3.micro'}}, TagSpecifications=[{{'ResourceType': 'launch-template', 'Tags': tags}}])\n\
             print('{{}}')"
        ))
    };
    older_launchers_lock(now + 600);
    let (code, refused, stderr) = run(&deploy_args(&stand, 0, "60s"));
    assert_eq!(code, 5, "{refused}\n{stderr}");
    let message = refused["error"].as_str().unwrap();
    assert!(message.contains("locked by deploy older-1 of ci on another-host"), "{message}");
    assert_eq!(world(&stand)["groups"], json!({}), "nothing made");

    older_launchers_lock(now - 1);
    deploy(&stand, 0, &[]);
    assert_eq!(strings(&world(&stand)["templates"]), ["hello-prod-v000"], "the dead holder's template is gone");
}

#[test]
fn a_deploy_killed_in_the_gate_converges_when_rerun() {
    let _serial = serial();
    let stand = stand();
    deploy(&stand, 0, &[]);
    proxy_post("/_proxy/target-health", &json!({"state": "initial"}));
    let mut killed = start_deploy(&stand, 1);
    wait_until("the deploy polls its new group", || {
        recorded("CreateAutoScalingGroup").len() == 2 && recorded("DescribeTargetHealth").len() > 6
    });
    killed.kill().unwrap(); // SIGKILL: no cleanup, the lock and the record stay behind
    killed.wait().unwrap();
    ureq::delete(&format!("{}/_proxy/target-health", moto().endpoint)).call().unwrap();
    let (_, status, _) = run(&["status", "--cluster", CLUSTER]);
    assert_eq!(status["deploy"]["phase"], "running", "{status}");

    // Its process is gone from this host, so its lock is stale and the rerun takes it over.
    let rerun = deploy(&stand, 1, &[]);
    assert_eq!(rerun["new_group"], "hello-prod-v001");
    assert_eq!(rerun["steps"][0]["outcome"], "skipped", "the group was adopted: {rerun}");
    let w = world(&stand);
    assert_eq!(w["groups"].as_object().unwrap().len(), 2, "{w:#}");
    assert_serving(&w, "hello-prod-v001", &stand.target_group);
    assert_disabled(&w, "hello-prod-v000", &stand.target_group);
    assert_eq!(recorded("CreateAutoScalingGroup").len(), 2, "one group per deploy");
    assert_eq!(w["locks"], json!([]), "lock left: {w}");
}

#[test]
fn throttled_autoscaling_and_elbv2_calls_still_complete() {
    let _serial = serial();
    let stand = stand();
    let actions = [
        "CreateAutoScalingGroup",
        "DescribeAutoScalingGroups",
        "UpdateAutoScalingGroup",
        "SuspendProcesses",
        "ResumeProcesses",
        "AttachLoadBalancerTargetGroups",
        "DetachLoadBalancerTargetGroups",
        "CreateOrUpdateTags",
        "DeleteAutoScalingGroup",
        "DescribeTargetHealth",
        "DescribeTargetGroups",
        "CreateTargetGroup",
        "DeleteTargetGroup",
        "DescribeListeners",
        "DescribeRules",
        "CreateRule",
        "DeleteRule",
        "DescribeLoadBalancers",
    ];
    proxy_post("/_proxy/faults", &json!({"throttle": 0.1, "seed": 11, "actions": actions}));
    deploy(&stand, 0, &[]);
    deploy(&stand, 1, &[]);
    let (code, value, stderr) = run(&["rollback", "--cluster", CLUSTER]);
    assert_eq!(code, 0, "{value}\n{stderr}");
    let (code, value, stderr) = run(&["finish", "--cluster", CLUSTER, "--soak", "0s"]);
    assert_eq!(code, 0, "{value}\n{stderr}");
    let throttled = proxy_get("/_proxy/stats")["faults"]["throttle"].as_u64().unwrap_or(0);
    proxy_post("/_proxy/faults", &json!({}));
    assert!(throttled >= 5, "only {throttled} calls throttled");
    let w = world(&stand);
    assert_eq!(w["groups"].as_object().unwrap().keys().collect::<Vec<_>>(), ["hello-prod-v000"]);
    assert_serving(&w, "hello-prod-v000", &stand.target_group);
}

/// The app's health URL as the agents see it: 200 while `up`, 503 otherwise.
struct App {
    port: u16,
    up: Arc<AtomicBool>,
}

fn app() -> App {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let up = Arc::new(AtomicBool::new(true));
    let serving = up.clone();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut request = [0u8; 1024];
            let _ = stream.read(&mut request);
            let status = if serving.load(Ordering::Relaxed) { "200 OK" } else { "503 Service Unavailable" };
            let _ = write!(stream, "HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        }
    });
    App { port, up }
}

/// The image's agent, one per instance of a group, run here with the group's user data.
struct Agents {
    children: Vec<Child>,
    _dir: tempfile::TempDir,
}

impl Agents {
    /// A clean stop, as systemd gives it when the instance shuts down: the agent deregisters.
    fn stop(&mut self) {
        for child in &mut self.children {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            let _ = child.wait();
        }
        self.children.clear();
    }
}

impl Drop for Agents {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Starts the agents of `group` once its instances exist: the user data comes from the group's
/// launch template; what an instance would take from its metadata comes from the ASG.
fn start_agents(group: &str, app: &App) -> Agents {
    let mut found = Value::Null;
    wait_until(&format!("the instances of {group}"), || {
        found = boto(&format!(
            "asg = boto3.client('autoscaling')\n\
             groups = asg.describe_auto_scaling_groups(AutoScalingGroupNames=['{group}'])['AutoScalingGroups']\n\
             data = [v['LaunchTemplateData'].get('UserData') for v in ec2.describe_launch_template_versions(LaunchTemplateName='{group}')['LaunchTemplateVersions']] if groups else []\n\
             print(json.dumps({{'instances': [[i['InstanceId'], i['AvailabilityZone']] for g in groups for i in g['Instances']], 'user_data': data[0] if data else None}}))"
        ));
        found["instances"].as_array().is_some_and(|i| i.len() >= 3) && found["user_data"].is_string()
    });
    let user_data =
        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, found["user_data"].as_str().unwrap())
            .unwrap();
    // The lines the agent takes from it, by the agent's own reading.
    let mut reader = Command::new(common::workspace().join("base-images/bakery-agent"))
        .arg("--env-from-user-data")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    reader.stdin.take().unwrap().write_all(&user_data).unwrap();
    let read = reader.wait_with_output().unwrap();
    assert!(read.status.success(), "no launcher lines in {}", String::from_utf8_lossy(&user_data));
    let user_data = String::from_utf8(read.stdout).unwrap();
    assert!(user_data.starts_with("REGISTRY_URL='cloudmap:srv-"), "{user_data}");
    assert!(user_data.contains(&format!("GROUP='{group}'")), "{user_data}");
    let dir = tempfile::tempdir().unwrap();
    let mut children = Vec::new();
    for instance in found["instances"].as_array().unwrap() {
        let (id, zone) = (instance[0].as_str().unwrap(), instance[1].as_str().unwrap());
        let env = dir.path().join(format!("{id}.env"));
        let instance_data =
            format!("{user_data}INSTANCE_ID='{id}'\nADDRESS='127.0.0.1'\nZONE='{zone}'\nPORT='{}'\n", app.port);
        std::fs::write(&env, instance_data).unwrap();
        let mut agent = Command::new(common::workspace().join("base-images/bakery-agent"));
        common::aws::aws_env(&mut agent);
        let child = agent
            .env("BAKERY_INSTANCE_ENV", &env)
            .env("CLOUDMAP_ENDPOINT", &moto().endpoint)
            .stdout(Stdio::null())
            .spawn()
            .expect("the agent runs");
        children.push(child);
    }
    Agents { children, _dir: dir }
}

/// `launcher registry list`: (group, status) of every registered instance, sorted.
fn registered() -> Vec<(String, String)> {
    let (code, list, stderr) = run(&["registry", "list", "--cluster", CLUSTER]);
    assert_eq!(code, 0, "{list}\n{stderr}");
    let mut seen: Vec<(String, String)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["group"].as_str().unwrap().to_string(), i["status"].as_str().unwrap().to_string()))
        .collect();
    seen.sort();
    seen
}

fn statuses(entries: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut expected = Vec::new();
    for (group, status) in entries {
        expected.extend(std::iter::repeat_n((group.to_string(), status.to_string()), 3));
    }
    expected
}

/// What clients that discover healthy instances find in the app's service.
fn discovered() -> usize {
    boto(
        "from botocore.config import Config\n\
         # DiscoverInstances goes to data-<endpoint>; the proxy's address takes no prefix.\n\
         sd = boto3.client('servicediscovery', config=Config(inject_host_prefix=False))\n\
         print(len(sd.discover_instances(NamespaceName='bakery', ServiceName='hello', HealthStatus='HEALTHY')['Instances']))",
    )
    .as_u64()
    .unwrap() as usize
}

#[test]
fn instances_register_in_cloud_map_and_the_flip_waits_for_them() {
    let _serial = serial();
    let stand = stand();
    let app = app();
    let registry = ["--registry-namespace", "bakery"];
    // The team's user data sits beside the launcher's: the agent still finds its lines.
    let team = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(team.path(), "#cloud-config\nruncmd: [echo team]\n").unwrap();
    let first =
        start_deploy_with(&stand, 0, &[&registry[..], &["--user-data-file", team.path().to_str().unwrap()]].concat());
    // Healthy at the balancer from the start, but not registered: the gate holds.
    std::thread::sleep(Duration::from_secs(3));
    assert!(world(&stand)["groups"]["hello-prod-v000"]["target_groups"]
        .as_array()
        .is_some_and(|t| !t.iter().any(|a| a == stand.target_group.as_str())));
    let mut v000 = start_agents("hello-prod-v000", &app);
    let (code, deployed) = finished(first);
    assert_eq!((code, &deployed["phase"]), (0, &json!("succeeded")), "{deployed}");
    assert_eq!(registered(), statuses(&[("hello-prod-v000", "UP")]));
    let (_, status, _) = run(&["status", "--cluster", CLUSTER]);
    assert_eq!(status["groups"][0]["members"][0]["registry_status"], "UP", "{status}");

    // No --registry-namespace: the new group registers in its ancestor's service all the same.
    let second = start_deploy(&stand, 1);
    let _v001 = start_agents("hello-prod-v001", &app);
    let (code, flipped) = finished(second);
    assert_eq!(code, 0, "{flipped}");
    let user_data = decoded_user_data(&launch_settings("hello-prod-v001"));
    assert!(
        user_data.contains("Content-Type: text/cloud-config") && user_data.contains("runcmd: [echo team]"),
        "{user_data}"
    );
    assert!(user_data.contains("GROUP='hello-prod-v001'") && !user_data.contains("v000"), "{user_data}");
    // The old group is held out of service in the registry: discovering clients see the new one.
    assert_eq!(registered(), statuses(&[("hello-prod-v000", "OUT_OF_SERVICE"), ("hello-prod-v001", "UP")]));
    assert_eq!(discovered(), 3);

    let (code, back, stderr) = run(&["rollback", "--cluster", CLUSTER, "--health-timeout", "60s"]);
    assert_eq!(code, 0, "{back}\n{stderr}");
    assert_eq!(registered(), statuses(&[("hello-prod-v000", "UP"), ("hello-prod-v001", "OUT_OF_SERVICE")]));

    // An app that stops answering is reported DOWN; a clean stop deregisters.
    app.up.store(false, Ordering::Relaxed);
    wait_until("the agents report DOWN", || registered().iter().filter(|(_, s)| s == "DOWN").count() == 3);
    v000.stop();
    assert_eq!(registered(), statuses(&[("hello-prod-v001", "OUT_OF_SERVICE")]));
    // Destroying a group deregisters what its instances left behind.
    let (code, destroyed, stderr) = run(&["destroy", "--cluster", CLUSTER]);
    assert_eq!(code, 0, "{destroyed}\n{stderr}");
    assert_eq!(registered(), []);
}

#[test]
fn a_group_that_never_registers_fails_its_gate() {
    let _serial = serial();
    let stand = stand();
    let app = app();
    let first = start_deploy_with(&stand, 0, &["--registry-namespace", "bakery"]);
    let _v000 = start_agents("hello-prod-v000", &app);
    assert_eq!(finished(first).0, 0);
    let mut args = deploy_args(&stand, 1, "5s");
    args.extend_from_slice(&["--registry-namespace", "bakery"]);
    let (code, failed, stderr) = run(&args);
    assert_eq!(code, 6, "{failed}\n{stderr}");
    assert!(stderr.contains("0 of 3 instances healthy, 3 starting, 0 unhealthy, 0 UP in the registry"), "{stderr}");
    let w = world(&stand);
    assert_serving(&w, "hello-prod-v000", &stand.target_group);
    assert_eq!(w["groups"].as_object().unwrap().len(), 1, "{w:#}");
    assert_eq!(registered(), statuses(&[("hello-prod-v000", "UP")]));
}

/// Puts one minute of the balancer's figures for the cluster's target group, as ALB would.
fn put_traffic(stand: &Stand, requests: u32, errors: u32, slow_ms: u32) {
    boto(&format!(
        "elb = boto3.client('elbv2'); cw = boto3.client('cloudwatch')\n\
         tg = elb.describe_target_groups(TargetGroupArns=['{tg}'])['TargetGroups'][0]\n\
         dims = [{{'Name': 'TargetGroup', 'Value': tg['TargetGroupArn'].split(':', 5)[5]}},\n\
                 {{'Name': 'LoadBalancer', 'Value': tg['LoadBalancerArns'][0].split(':', 5)[5][len('loadbalancer/'):]}}]\n\
         cw.put_metric_data(Namespace='AWS/ApplicationELB', MetricData=[\n\
             {{'MetricName': 'RequestCount', 'Dimensions': dims, 'Value': {requests}, 'Unit': 'Count'}},\n\
             {{'MetricName': 'HTTPCode_Target_5XX_Count', 'Dimensions': dims, 'Value': {errors}, 'Unit': 'Count'}},\n\
             {{'MetricName': 'TargetResponseTime', 'Dimensions': dims, 'Values': [0.02, {slow}], 'Counts': [{fast_count}, 20], 'Unit': 'Seconds'}}])\n\
         print('null')",
        tg = stand.target_group,
        slow = f64::from(slow_ms) / 1000.0,
        fast_count = requests.saturating_sub(20),
    ));
}

/// `launcher watch --once` until the cluster's record is no longer soaking.
fn watch_until_settled() -> Value {
    let mut record = Value::Null;
    wait_until("the watcher ends the soak", || {
        let (code, _, stderr) = run(&["watch", "--once"]);
        assert!(code == 0 && !stderr.contains("watch "), "{stderr}");
        record = run(&["status", "--cluster", CLUSTER]).1["deploy"].clone();
        record["phase"] != "soaking"
    });
    record
}

#[test]
fn a_watched_soak_switches_back_on_cloudwatch_figures_even_when_throttled() {
    let _serial = serial();
    let stand = stand();
    let actions = ["GetMetricData", "ListInstances", "GetInstancesHealthStatus", "UpdateInstanceCustomHealthStatus"];
    proxy_post("/_proxy/faults", &json!({"throttle": 0.2, "seed": 5, "actions": actions}));
    let app = app();
    let registry = ["--registry-namespace", "bakery"];
    let first = start_deploy_with(&stand, 0, &registry);
    let _v000 = start_agents("hello-prod-v000", &app);
    assert_eq!(finished(first).0, 0);
    put_traffic(&stand, 1000, 0, 100);

    let soak = ["--registry-namespace", "bakery", "--soak", "10m", "--window", "60s", "--max-error-rate", "1"];
    let bad = start_deploy_with(&stand, 1, &soak);
    let _v001 = start_agents("hello-prod-v001", &app);
    let (code, soaking) = finished(bad);
    assert_eq!((code, &soaking["phase"]), (0, &json!("soaking")), "{soaking}");
    let baseline = &soaking["soak"]["baseline"];
    assert_eq!((&baseline["requests"], &baseline["p99_ms"]), (&json!(1000), &json!(100)), "{soaking}");
    // The new group's first figures: 30 % of requests fail.
    std::thread::sleep(Duration::from_secs(1));
    put_traffic(&stand, 1000, 300, 100);
    let record = watch_until_settled();
    assert_eq!(record["action"], "rollback", "{record}");
    let verdict = record["soak"]["verdict"].as_str().unwrap();
    assert!(verdict.contains("30.0% of 1000 requests failed"), "{verdict}");
    assert_eq!(serving(), ["hello-prod-v000"]);
    assert_eq!(registered(), statuses(&[("hello-prod-v000", "UP"), ("hello-prod-v001", "OUT_OF_SERVICE")]));

    // A good version soaks quietly and the old groups go at the end.
    let good = start_deploy_with(&stand, 2, &["--registry-namespace", "bakery", "--soak", "3s", "--keep", "1"]);
    let _v002 = start_agents("hello-prod-v002", &app);
    let (code, soaking) = finished(good);
    assert_eq!((code, &soaking["phase"]), (0, &json!("soaking")), "{soaking}");
    std::thread::sleep(Duration::from_secs(1));
    put_traffic(&stand, 1000, 0, 120);
    let record = watch_until_settled();
    let throttled = proxy_get("/_proxy/stats")["faults"]["throttle"].as_u64().unwrap_or(0);
    proxy_post("/_proxy/faults", &json!({}));
    assert_eq!((&record["action"], &record["phase"]), (&json!("finish"), &json!("succeeded")), "{record}");
    let w = world(&stand);
    assert_eq!(w["groups"].as_object().unwrap().keys().collect::<Vec<_>>(), ["hello-prod-v002"]);
    assert!(throttled >= 3, "only {throttled} calls throttled");
}

#[test]
fn chaos_kill_terminates_through_the_group_which_keeps_its_capacity() {
    let _serial = serial();
    let stand = stand();
    deploy(&stand, 0, &[]);
    // The consent and the audit log live in the launcher's table: each run here has a state
    // directory of its own, as monkeys on different hosts would, and they all see one of each.
    let chaos = |args: &[&str]| {
        let state = tempfile::tempdir().unwrap();
        let output = launcher(&[&["chaos"][..], args, &["--state-dir", state.path().to_str().unwrap()]].concat())
            .output()
            .unwrap();
        let value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
        (output.status.code().unwrap_or(-1), value, String::from_utf8_lossy(&output.stderr).into_owned())
    };
    let (code, _, stderr) = chaos(&["kill", "--cluster", CLUSTER]);
    assert_eq!(code, 3, "a cluster that did not opt in: {stderr}");
    let (code, ran, stderr) = chaos(&["run", "--once"]);
    assert_eq!((code, ran), (0, json!([])), "the scheduler leaves it alone too: {stderr}");
    assert!(recorded("TerminateInstanceInAutoScalingGroup").is_empty());
    assert_eq!(chaos(&["enable", "--cluster", CLUSTER]).0, 0);
    let before = strings(&group(&world(&stand), "hello-prod-v000")["instances"]);
    proxy_post(
        "/_proxy/faults",
        &json!({"throttle": 0.5, "seed": 3, "actions": ["TerminateInstanceInAutoScalingGroup", "DescribeAutoScalingGroups"]}),
    );
    let (code, killed, stderr) = chaos(&["kill", "--cluster", CLUSTER, "--count", "1"]);
    proxy_post("/_proxy/faults", &json!({}));
    assert_eq!(code, 0, "{killed}\n{stderr}");
    assert_eq!(killed[0]["result"], "done", "{killed}");
    let victim = killed[0]["instance"].as_str().unwrap().to_string();
    assert!(before.contains(&victim));
    let calls = recorded("TerminateInstanceInAutoScalingGroup");
    let call = &calls.iter().rfind(|c| c["fault"].is_null()).expect("a call that went through")["params"];
    assert_eq!((&call["InstanceId"], &call["ShouldDecrementDesiredCapacity"]), (&json!(victim), &json!("false")));
    let g = group(&world(&stand), "hello-prod-v000").clone();
    assert_eq!(g["capacity"], json!([3, 3, 3]), "the desired capacity stays: {g}");
    let after = strings(&g["instances"]);
    assert!(!after.contains(&victim) && after.len() == 3, "replaced by the group: {after:?}");
    let (code, log, _) = chaos(&["log"]);
    assert_eq!(code, 0);
    assert_eq!(log.as_array().map(Vec::len), Some(1), "{log}");
    assert_eq!((&log[0]["cluster"], &log[0]["instance"]), (&json!(CLUSTER), &json!(victim)));
    let items = boto(
        "ddb = boto3.client('dynamodb')\n\
         print(json.dumps(sorted(i['key']['S'].split('/')[0] for i in ddb.scan(TableName='bakery-launcher')['Items'])))",
    );
    assert_eq!(items, json!(["audit", "chaos", "deploy"]), "consent, audit entry and deploy record in the table");

    // The scheduler: nothing outside the window; inside it, no more than the daily limit, which
    // counts the kill above.
    let window = |from: i64, to: i64| {
        boto(&format!(
            "import time\nt = time.localtime(); m = t.tm_hour * 60 + t.tm_min\n\
             f = lambda x: '%02d:%02d' % divmod(x % 1440, 60)\n\
             print(json.dumps(f(m + {from}) + '-' + f(m + {to})))"
        ))
        .as_str()
        .unwrap()
        .to_string()
    };
    let enable = |window: &str| {
        let args = ["enable", "--cluster", CLUSTER, "--window", window, "--mean-interval", "1s", "--max-per-day", "2"];
        assert_eq!(chaos(&args).0, 0);
    };
    enable(&window(60, 120));
    let (code, ran, stderr) = chaos(&["run", "--once"]);
    assert_eq!((code, ran.as_array().map(Vec::len)), (0, Some(0)), "outside the window: {ran}\n{stderr}");
    enable(&window(-60, 60));
    let (code, ran, stderr) = chaos(&["run", "--once"]);
    assert_eq!((code, ran.as_array().map(Vec::len)), (0, Some(1)), "{ran}\n{stderr}");
    assert_eq!(ran[0]["result"], "done", "{ran}");
    let (code, ran, _) = chaos(&["run", "--once"]);
    assert_eq!((code, ran.as_array().map(Vec::len)), (0, Some(0)), "two a day at most: {ran}");
    // The day's scheduler kills are counted in the table, by every host: with another host's
    // kills there, this one keeps to the limit though its own log would allow one more.
    let kills = || {
        boto(
            "ddb = boto3.client('dynamodb')\n\
             items = [i for i in ddb.scan(TableName='bakery-launcher')['Items'] if i['key']['S'].startswith('kills/')]\n\
             [ddb.update_item(TableName='bakery-launcher', Key={'cluster': i['cluster'], 'key': i['key']}, UpdateExpression='ADD #c :n', ExpressionAttributeNames={'#c': 'count'}, ExpressionAttributeValues={':n': {'N': '2'}}) for i in items]\n\
             print(json.dumps([int(i['count']['N']) for i in items]))"
        )
    };
    assert_eq!(kills(), json!([1]), "the scheduler's one kill today (then two more by another host)");
    let args =
        ["enable", "--cluster", CLUSTER, "--window", &window(-60, 60), "--mean-interval", "1s", "--max-per-day", "3"];
    assert_eq!(chaos(&args).0, 0);
    let (code, ran, _) = chaos(&["run", "--once"]);
    assert_eq!((code, ran.as_array().map(Vec::len)), (0, Some(0)), "three a day among all hosts: {ran}");

    // Latency Monkey: netem on one instance through SSM Run Command, ended by the instance.
    let (code, slowed, stderr) =
        chaos(&["latency", "--cluster", CLUSTER, "--delay", "2s", "--jitter", "500ms", "--duration", "1s"]);
    assert_eq!(code, 0, "{slowed}\n{stderr}");
    let sent = recorded("SendCommand");
    assert_eq!(sent.len(), 1, "{sent:?}");
    let params = &sent[0]["params"];
    assert_eq!(
        (&params["InstanceIds"], &params["DocumentName"]),
        (&json!([slowed["instance"]]), &json!("AWS-RunShellScript"))
    );
    let script = params["Parameters"]["commands"][0].as_str().unwrap();
    assert!(script.contains("netem delay 2000ms 500ms") && script.contains("--on-active=1"), "{script}");
    assert_eq!(chaos(&["disable", "--cluster", CLUSTER]).0, 0);
    let log = chaos(&["log"]).1;
    assert_eq!(log.as_array().map(Vec::len), Some(3), "{log}");
    assert_eq!(log[2]["monkey"], "latency");
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The console on the aws provider: its images, cluster and group pages and their API show what
/// Auto Scaling, EC2 and the deploy record say, as boto3 reads them.
#[test]
fn the_console_shows_what_the_aws_provider_reads() {
    let _serial = serial();
    let stand = stand();
    boto(&format!(
        "ec2.create_tags(Resources=['{}'], Tags=[{{'Key': 'app', 'Value': 'hello'}}, {{'Key': 'version', 'Value': '2.0.<b>'}}])",
        stand.images[1]
    ));
    deploy(&stand, 0, &[]);
    deploy(&stand, 1, &[]);
    let w = world(&stand);
    let mut console = launcher(&["console", "--listen", "127.0.0.1:0"]).stdout(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(console.stdout.take().unwrap()), &mut line).unwrap();
    let url = serde_json::from_str::<Value>(&line).unwrap()["url"].as_str().unwrap().to_string();
    let get = |path: &str| {
        let response = ureq::get(&format!("{url}{path}")).call().unwrap_or_else(|e| panic!("GET {path}: {e}"));
        response.into_string().unwrap()
    };

    let cluster: Value = serde_json::from_str(&get("api/clusters/hello-prod")).unwrap();
    assert_eq!(cluster["cloud"], "aws");
    let groups: Vec<(String, bool)> = cluster["groups"]
        .as_array()
        .unwrap()
        .iter()
        .map(|g| (g["name"].as_str().unwrap().to_string(), g["in_service"].as_bool().unwrap()))
        .collect();
    assert_eq!(groups, [("hello-prod-v000".to_string(), false), ("hello-prod-v001".to_string(), true)]);
    assert_eq!(cluster["history"][0]["new_group"], "hello-prod-v001", "{cluster}");
    assert_eq!(cluster["versions"][&stand.images[1]], "2.0.<b>");
    let page = get("clusters/hello-prod");
    assert!(
        page.contains("hello-prod-v001") && page.contains("in service") && page.contains("2.0.&lt;b&gt;"),
        "{page}"
    );
    let group_page = get("clusters/hello-prod/groups/hello-prod-v001");
    for instance in strings(&group(&w, "hello-prod-v001")["instances"]) {
        assert!(group_page.contains(&instance), "{instance} not on the group's page: {group_page}");
    }
    let images = get("images");
    assert!(stand.images.iter().all(|i| images.contains(i.as_str())), "{images}");
    let listed: Value = serde_json::from_str(&get("api/images?app=hello")).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    let _ = console.kill();
    let _ = console.wait();
}

/// A deploy that nothing would gate (no target group, no registry), whose subnets span fewer
/// than three zones, or whose security group or key pair does not exist is refused as bad
/// input, naming the problem, before anything is made.
#[test]
fn a_deploy_nothing_would_check_or_over_two_zones_is_refused_before_anything_is_made() {
    let _serial = serial();
    let stand = stand();
    let image = stand.images[0].as_str();
    let (code, value, stderr) =
        run(&["deploy", "--cluster", CLUSTER, "--image", image, "--health-url", "/hello/health"]);
    assert_eq!(code, 3, "{value}\n{stderr}");
    assert!(stderr.contains("nothing would check --health-url"), "{stderr}");
    let two = boto(
        "subnets = ec2.describe_subnets(Filters=[{'Name': 'default-for-az', 'Values': ['true']}])['Subnets'][:2]\n\
         print(json.dumps({'ids': ','.join(s['SubnetId'] for s in subnets), 'zones': [s['AvailabilityZone'] for s in subnets]}))",
    );
    let mut args = deploy_args(&stand, 0, "60s");
    args.extend_from_slice(&["--subnets", two["ids"].as_str().unwrap()]);
    let (code, value, stderr) = run(&args);
    assert_eq!(code, 3, "{value}\n{stderr}");
    for zone in strings(&two["zones"]) {
        assert!(stderr.contains(&zone), "{zone} not named: {stderr}");
    }
    assert!(stderr.contains("in 2 zone(s)") && stderr.contains("at least 3"), "{stderr}");
    // Launch settings given as flags are checked as a cluster config's are, all at once.
    let mut args = deploy_args(&stand, 0, "60s");
    args.extend_from_slice(&["--security-group", "default", "--instance-type", "big"]);
    let (code, value, stderr) = run(&args);
    assert_eq!(code, 3, "{value}\n{stderr}");
    assert!(stderr.contains("--security-group \"default\": is not an id starting sg-"), "{stderr}");
    assert!(stderr.contains("--instance-type \"big\""), "{stderr}");
    // Well-formed, but not there: looked up before anything is made, and all reported at once.
    let mut args = deploy_args(&stand, 0, "60s");
    let nowhere = "arn:aws:elasticloadbalancing:us-east-1:123456789012:targetgroup/nowhere/0123456789abcdef";
    let absent = ["--security-group", "sg-0123456789abcdef0", "--key-name", "nobody", "--target-group", nowhere];
    args.extend_from_slice(&[&absent[..], &["--subnets", "subnet-0123456789abcdef0"]].concat());
    let (code, value, stderr) = run(&args);
    assert_eq!(code, 3, "{value}\n{stderr}");
    for missing in [
        "security group sg-0123456789abcdef0 does not exist",
        "key pair nobody does not exist",
        "--subnets subnet-0123456789abcdef0 are not all there",
        format!("target group {nowhere} does not exist").as_str(),
    ] {
        assert!(stderr.contains(missing), "{missing} not reported: {stderr}");
    }
    // A team's own MIME user data could not run beside the launcher's registry part.
    let mime = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(mime.path(), "Content-Type: multipart/mixed; boundary=\"x\"\n\n--x\n\n#!/bin/sh\n--x--\n").unwrap();
    let mut args = deploy_args(&stand, 0, "60s");
    args.extend_from_slice(&["--registry-namespace", "bakery", "--user-data-file", mime.path().to_str().unwrap()]);
    let (code, value, stderr) = run(&args);
    assert_eq!(code, 3, "{value}\n{stderr}");
    assert!(stderr.contains("a MIME message of its own"), "{stderr}");
    let w = world(&stand);
    assert_eq!((w["groups"].as_object().unwrap().len(), strings(&w["templates"]).len()), (0, 0), "{w}");
    // Refused before locking: not even the state table was made.
    let tables = boto("print(json.dumps(boto3.client('dynamodb').list_tables()['TableNames']))");
    assert_eq!(tables, json!([]), "a refused deploy took no lock");
}

/// A target group the serving group joined but that was deleted since is not copied into a
/// new group blindly: the deploy is refused, naming it and the flag to give instead, while the
/// cluster can still be read.
#[test]
fn a_copied_target_group_deleted_since_is_refused_before_anything_is_made() {
    let _serial = serial();
    let stand = stand();
    let extra = boto(
        "elb = boto3.client('elbv2')\n\
         vpc = ec2.describe_vpcs()['Vpcs'][0]['VpcId']\n\
         print(json.dumps(elb.create_target_group(Name='hello-extra', Protocol='HTTP', Port=8080, VpcId=vpc, TargetType='instance')['TargetGroups'][0]['TargetGroupArn']))",
    );
    let extra = extra.as_str().unwrap();
    deploy(&stand, 0, &["--target-group", extra]);
    boto(&format!("boto3.client('elbv2').delete_target_group(TargetGroupArn='{extra}')\nprint('{{}}')"));
    let (code, value, stderr) = run(&copying_deploy_args(&stand.images[1], "60s"));
    assert_eq!(code, 3, "{value}\n{stderr}");
    let expected = format!("target group {extra} of hello-prod-v000, which a new group copies, no longer exists");
    assert!(stderr.contains(&expected) && stderr.contains("give --target-group"), "{stderr}");
    assert!(!stderr.contains(&stand.target_group), "the one still there is no problem: {stderr}");
    assert_eq!(world(&stand)["groups"].as_object().unwrap().len(), 1, "nothing made");
    assert_eq!(serving(), ["hello-prod-v000"]);
}

/// Frigga allows `~` and `^` in a cluster's detail; EC2 does not in launch template names (the
/// proxy checks them as EC2 does): such a cluster deploys, flips and keeps its record all the same.
#[test]
fn a_cluster_whose_detail_holds_tilde_and_caret_deploys_and_keeps_its_record() {
    let _serial = serial();
    let stand = stand();
    let cluster = "hello-prod-canary~1^a";
    let deploy_to = |image: &str| {
        let args = ["deploy", "--cluster", cluster, "--image", image, "--target-group", &stand.target_group];
        run(&[&args[..], &["--health-url", "/hello/health", "--health-timeout", "60s"]].concat())
    };
    let (code, first, stderr) = deploy_to(&stand.images[0]);
    assert_eq!((code, &first["new_group"]), (0, &json!(format!("{cluster}-v000"))), "{first}\n{stderr}");
    let (code, second, stderr) = deploy_to(&stand.images[1]);
    assert_eq!((code, &second["previous_group"]), (0, &json!(format!("{cluster}-v000"))), "{second}\n{stderr}");
    let w = world(&stand);
    assert_serving(&w, &format!("{cluster}-v001"), &stand.target_group);
    let templates = strings(&w["templates"]);
    let expected = ["hello-prod-canary(7e)1(5e)a-v000", "hello-prod-canary(7e)1(5e)a-v001"];
    assert_eq!(templates, expected, "every name is valid");
    assert_eq!(w["locks"], json!([]), "the lock was released");
    let (code, status, _) = run(&["status", "--cluster", cluster]);
    assert_eq!((code, &status["deploy"]["new_group"]), (0, &json!(format!("{cluster}-v001"))), "{status}");
}

/// The lock's write to the state table, CreateLaunchTemplate and CreateAutoScalingGroup are carried out
/// but their replies are lost: the retries adopt them, and the deploy ends with one of each.
#[test]
fn a_deploy_whose_replies_are_lost_adopts_what_the_first_attempts_made() {
    let _serial = serial();
    let stand = stand();
    let actions = ["PutItem", "CreateLaunchTemplate", "CreateAutoScalingGroup"];
    let faults = json!({ "lost": 1.0, "actions": actions, "per_action": 1 });
    proxy_post("/_proxy/faults", &faults);
    let (code, value, stderr) = run(&deploy_args(&stand, 0, "60s"));
    let stats = proxy_get("/_proxy/stats");
    proxy_post("/_proxy/faults", &json!({}));
    assert_eq!(code, 0, "{value}\n{stderr}");
    assert_eq!(stats["faults"], json!({ "lost": 3 }), "{stats}");
    let w = world(&stand);
    assert_eq!(w["groups"].as_object().unwrap().keys().collect::<Vec<_>>(), ["hello-prod-v000"]);
    assert_eq!(strings(&w["templates"]), ["hello-prod-v000"]);
    assert_eq!(w["locks"], json!([]), "the lock was released");
    assert_serving(&w, "hello-prod-v000", &stand.target_group);
}

/// The launch template data and Auto Scaling settings of `group`, as AWS reports them.
fn launch_settings(group: &str) -> Value {
    boto(&format!(
        "asg = boto3.client('autoscaling'); cw = boto3.client('cloudwatch')\n\
         g = '{group}'\n\
         data = ec2.describe_launch_template_versions(LaunchTemplateName=g, Versions=['$Latest'])['LaunchTemplateVersions'][0]['LaunchTemplateData']\n\
         a = asg.describe_auto_scaling_groups(AutoScalingGroupNames=[g])['AutoScalingGroups'][0]\n\
         policies = {{p['PolicyName']: p['PolicyARN'] for p in asg.describe_policies(AutoScalingGroupName=g)['ScalingPolicies']}}\n\
         alarms = [{{'name': x['AlarmName'], 'actions': x['AlarmActions'], 'ok': x['OKActions'], 'dimensions': x['Dimensions']}} for x in cw.describe_alarms()['MetricAlarms'] if any(p in x['AlarmActions'] for p in policies.values())]\n\
         scheduled = sorted([s['ScheduledActionName'], s.get('Recurrence')] for s in asg.describe_scheduled_actions(AutoScalingGroupName=g)['ScheduledUpdateGroupActions'])\n\
         print(json.dumps({{'data': data, 'health_check': [a['HealthCheckType'], a['HealthCheckGracePeriod']],\n\
             'termination': a['TerminationPolicies'], 'subnets': sorted(a['VPCZoneIdentifier'].split(',')), 'tags': {{t['Key']: [t['Value'], t['PropagateAtLaunch']] for t in a['Tags']}},\n\
             'policies': policies, 'alarms': alarms, 'scheduled': scheduled}}, default=str))"
    ))
}

fn decoded_user_data(settings: &Value) -> String {
    let encoded = settings["data"]["UserData"].as_str().unwrap_or_else(|| panic!("no user data: {settings}"));
    String::from_utf8(base64::Engine::decode(&base64::engine::general_purpose::STANDARD, encoded).unwrap()).unwrap()
}

/// A cluster config with mistakes is refused with all of them; a good one sets up the first
/// group; the second copies it and everything the operator then added to the first (a launch
/// template version with block devices, placement, CPU and credit options, a tag, scaling
/// policies with an alarm, a scheduled action), the flags given win, the third copies the
/// target group it is not given, and destroying the first takes its alarms along.
#[test]
fn a_new_group_copies_its_ancestor_and_what_is_given_wins() {
    let _serial = serial();
    let stand = stand();
    let setup = boto(
        "iam = boto3.client('iam')\n\
         iam.create_instance_profile(InstanceProfileName='hello-prod')\n\
         vpc = ec2.describe_vpcs()['Vpcs'][0]['VpcId']\n\
         sgs = [ec2.create_security_group(GroupName=n, Description=n, VpcId=vpc)['GroupId'] for n in ('hello-a', 'hello-b')]\n\
         for k in ('ops', 'ops2'): ec2.create_key_pair(KeyName=k)\n\
         subnets = sorted(s['SubnetId'] for s in ec2.describe_subnets(Filters=[{'Name': 'default-for-az', 'Values': ['true']}])['Subnets'])[-3:]\n\
         print(json.dumps({'sgs': sgs, 'subnets': subnets}))",
    );
    let (sg_a, sg_b) = (setup["sgs"][0].as_str().unwrap(), setup["sgs"][1].as_str().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let team = "#!/bin/sh\necho team-user-data\n";
    std::fs::write(dir.path().join("user-data.sh"), team).unwrap();
    let config = dir.path().join("cluster.toml");
    std::fs::write(
        &config,
        "instance_type = \"t3\"\nsecurity_groups = [\"default\"]\nhealth_check_type = \"TCP\"\nmin = 2\n",
    )
    .unwrap();
    let image = stand.images[0].as_str();
    let with_config = ["deploy", "--cluster", CLUSTER, "--image", image, "--health-timeout", "60s", "--cluster-config"];
    let (code, value, stderr) = run(&[&with_config[..], &[config.to_str().unwrap()]].concat());
    assert_eq!(code, 3, "{value}\n{stderr}");
    for line in [
        "cluster.toml:1: instance_type",
        "cluster.toml:2: security_groups[0]",
        "cluster.toml:3:",
        "cluster.toml:4: min",
    ] {
        assert!(stderr.contains(line), "{line} not reported: {stderr}");
    }
    assert_eq!(world(&stand)["groups"], json!({}), "nothing made");

    std::fs::write(
        &config,
        format!(
            "instance_type = \"m5.large\"\nsecurity_groups = [\"{sg_a}\"]\ninstance_profile = \"hello-prod\"\n\
             key_name = \"ops\"\nuser_data_file = \"user-data.sh\"\nhealth_check_grace = \"2m\"\n\
             target_groups = [\"{}\"]\nhealth_url = \"/hello/health\"\ntermination_policies = [\"OldestInstance\"]\n\
             subnets = {}\n",
            stand.target_group, setup["subnets"]
        ),
    )
    .unwrap();
    let (code, first, stderr) = run(&[&with_config[..], &[config.to_str().unwrap()]].concat());
    assert_eq!((code, &first["new_group"]), (0, &json!("hello-prod-v000")), "{first}\n{stderr}");
    let v000 = launch_settings("hello-prod-v000");
    assert_eq!(decoded_user_data(&v000), team, "the team's user data alone, as given");
    assert_eq!(v000["data"]["SecurityGroupIds"], json!([sg_a]));
    assert_eq!(v000["health_check"], json!(["ELB", 120]));

    // What an operator adds to the serving group by hand.
    boto(&format!(
        "asg = boto3.client('autoscaling'); cw = boto3.client('cloudwatch')\n\
         g = 'hello-prod-v000'\n\
         snapshot = ec2.describe_images(ImageIds=['{image}'])['Images'][0]['BlockDeviceMappings'][0]['Ebs']['SnapshotId']\n\
         data = ec2.describe_launch_template_versions(LaunchTemplateName=g, Versions=['$Latest'])['LaunchTemplateVersions'][0]['LaunchTemplateData']\n\
         data['BlockDeviceMappings'] = [{{'DeviceName': '/dev/xvda', 'Ebs': {{'SnapshotId': snapshot, 'VolumeSize': 20, 'VolumeType': 'gp3'}}}},\n\
             {{'DeviceName': '/dev/xvdb', 'Ebs': {{'VolumeSize': 50, 'VolumeType': 'gp3', 'DeleteOnTermination': True}}}}]\n\
         data['Placement'] = {{'Tenancy': 'default', 'AvailabilityZone': 'us-east-1a'}}\n\
         data['CpuOptions'] = {{'CoreCount': 1, 'ThreadsPerCore': 2}}\n\
         data['CreditSpecification'] = {{'CpuCredits': 'unlimited'}}\n\
         ec2.create_launch_template_version(LaunchTemplateName=g, LaunchTemplateData=data)\n\
         asg.create_or_update_tags(Tags=[{{'ResourceId': g, 'ResourceType': 'auto-scaling-group', 'Key': 'team', 'Value': 'web', 'PropagateAtLaunch': True}}])\n\
         asg.put_scaling_policy(AutoScalingGroupName=g, PolicyName='cpu', PolicyType='TargetTrackingScaling', TargetTrackingConfiguration={{'PredefinedMetricSpecification': {{'PredefinedMetricType': 'ASGAverageCPUUtilization'}}, 'TargetValue': 50.0}})\n\
         up = asg.put_scaling_policy(AutoScalingGroupName=g, PolicyName='scale-up', PolicyType='SimpleScaling', AdjustmentType='ChangeInCapacity', ScalingAdjustment=1, Cooldown=120)['PolicyARN']\n\
         down = asg.put_scaling_policy(AutoScalingGroupName=g, PolicyName='scale-down', PolicyType='SimpleScaling', AdjustmentType='ChangeInCapacity', ScalingAdjustment=-1, Cooldown=300)['PolicyARN']\n\
         cw.put_metric_alarm(AlarmName='hello-prod-v000-busy', MetricName='CPUUtilization', Namespace='AWS/EC2', Statistic='Average', Period=60, EvaluationPeriods=3, Threshold=80.0, ComparisonOperator='GreaterThanThreshold', Dimensions=[{{'Name': 'AutoScalingGroupName', 'Value': g}}], AlarmActions=[up], OKActions=[down])\n\
         asg.put_scheduled_update_group_action(AutoScalingGroupName=g, ScheduledActionName='nightly', Recurrence='0 2 * * *', MinSize=3, MaxSize=6, DesiredCapacity=3)\n\
         print('{{}}')"
    ));

    // The calls the copy adds are throttled (six in a row), and go through all the same.
    let copying = [
        "DescribeLaunchTemplateVersions",
        "DescribeImages",
        "DescribePolicies",
        "DescribeScheduledActions",
        "DescribeAlarms",
        "PutScalingPolicy",
        "PutMetricAlarm",
        "PutScheduledUpdateGroupAction",
    ];
    proxy_post("/_proxy/faults", &json!({"throttle": 1.0, "max": 6, "actions": copying}));
    let second = deploy(&stand, 1, &["--key-name", "ops2", "--health-check-type", "EC2"]);
    let throttled = proxy_get("/_proxy/stats")["faults"]["throttle"].as_u64().unwrap_or(0);
    proxy_post("/_proxy/faults", &json!({}));
    assert_eq!(throttled, 6, "calls throttled");
    assert_eq!(second["previous_group"], "hello-prod-v000");
    let v001 = launch_settings("hello-prod-v001");
    let data = &v001["data"];
    assert_eq!(data["ImageId"], stand.images[1].as_str());
    assert_eq!(data["InstanceType"], "m5.large");
    assert_eq!(data["SecurityGroupIds"], json!([sg_a]));
    assert_eq!(data["IamInstanceProfile"]["Name"], "hello-prod");
    assert_eq!(data["KeyName"], "ops2", "the flag wins");
    assert_eq!(data["MetadataOptions"]["HttpTokens"], "required");
    assert_eq!(decoded_user_data(&v001), team, "the team's user data is copied");
    let mappings = data["BlockDeviceMappings"].as_array().unwrap();
    assert_eq!(mappings.len(), 2, "{data}");
    assert_eq!(mappings[0]["Ebs"].get("SnapshotId"), None, "not the old image's root: {data}");
    assert_eq!(mappings[0]["Ebs"]["VolumeSize"], 20);
    assert_eq!(mappings[1]["Ebs"]["VolumeSize"], 50);
    assert_eq!(data["Placement"], json!({"Tenancy": "default"}), "not the zone: the group spreads over three");
    assert_eq!(data["CpuOptions"], json!({"CoreCount": 1, "ThreadsPerCore": 2}));
    assert_eq!(data.get("CreditSpecification"), None, "an m5.large earns no CPU credits: {data}");
    assert_eq!(v001["health_check"], json!(["EC2", 120]), "the flag wins, the grace is copied");
    assert_eq!(v001["termination"], json!(["OldestInstance"]));
    assert_eq!(v001["subnets"], setup["subnets"], "the subnets too, with no --subnets given");
    assert_eq!(v001["tags"]["team"], json!(["web", true]));
    let policies = v001["policies"].as_object().unwrap();
    let names = ["hello-prod-v001-cpu", "hello-prod-v001-scale-down", "hello-prod-v001-scale-up"];
    assert_eq!(policies.keys().collect::<Vec<_>>(), names);
    let alarms = v001["alarms"].as_array().unwrap();
    assert_eq!(alarms.len(), 1, "{v001}");
    assert_eq!(alarms[0]["name"], "hello-prod-v001-busy");
    assert_eq!(alarms[0]["actions"], json!([policies["hello-prod-v001-scale-up"]]));
    assert_eq!(alarms[0]["ok"], json!([policies["hello-prod-v001-scale-down"]]), "every action list follows");
    assert_eq!(alarms[0]["dimensions"][0]["Value"], "hello-prod-v001");
    assert_eq!(v001["scheduled"], json!([["hello-prod-v001-nightly", "0 2 * * *"]]));
    // As the proxy saw the request: the new template carries the ancestor's security groups and
    // instance profile.
    let template = &recorded("CreateLaunchTemplate")
        .into_iter()
        .find(|r| r["params"]["LaunchTemplateName"] == "hello-prod-v001")
        .expect("v001's launch template")["params"];
    assert_eq!(template["LaunchTemplateData.SecurityGroupId.1"], sg_a, "{template}");
    assert_eq!(template["LaunchTemplateData.IamInstanceProfile.Name"], "hello-prod", "{template}");
    // The disabled ancestor's policies and schedule cannot resize it.
    assert_disabled(&world(&stand), "hello-prod-v000", &stand.target_group);

    // No --target-group: the ancestor's is copied, and gates and serves the new group.
    let (code, third, stderr) =
        run(&[&copying_deploy_args(&stand.images[2], "60s")[..], &["--security-group", sg_b]].concat());
    assert_eq!((code, &third["phase"]), (0, &json!("succeeded")), "{third}\n{stderr}");
    assert_serving(&world(&stand), "hello-prod-v002", &stand.target_group);
    let v002 = launch_settings("hello-prod-v002");
    assert_eq!(v002["data"]["SecurityGroupIds"], json!([sg_b]));
    assert_eq!(v002["data"]["KeyName"], "ops2", "copied from v001");
    assert_eq!(third["previous_group"], "hello-prod-v001");
    let names: Vec<&str> = v002["alarms"].as_array().unwrap().iter().map(|a| a["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["hello-prod-v002-busy"], "one prefix, however many deploys");

    let (code, done, stderr) = run(&["finish", "--cluster", CLUSTER, "--soak", "0s"]);
    assert_eq!(code, 0, "{done}\n{stderr}");
    let left = boto(
        "cw = boto3.client('cloudwatch'); asg = boto3.client('autoscaling')\n\
         print(json.dumps({'alarms': sorted(a['AlarmName'] for a in cw.describe_alarms()['MetricAlarms'] if 'TargetTracking' not in a['AlarmName']),\n\
             'policies': sorted(p['PolicyName'] for p in asg.describe_policies()['ScalingPolicies']),\n\
             'scheduled': sorted(s['ScheduledActionName'] for s in asg.describe_scheduled_actions()['ScheduledUpdateGroupActions'])}))",
    );
    assert_eq!(
        left,
        json!({ "alarms": ["hello-prod-v002-busy"],
                "policies": ["hello-prod-v002-cpu", "hello-prod-v002-scale-down", "hello-prod-v002-scale-up"],
                "scheduled": ["hello-prod-v002-nightly"] }),
        "the destroyed groups' alarms, policies and schedules went with them"
    );
}

/// `bakery --provider aws images prune` against what a real account holds: it deletes exactly
/// the app's images nothing uses (with their snapshots), lists the same set on a dry run and
/// then changes nothing, protects the serving group's image from deregistration, and marks
/// deprecated the ones kept only because something uses them.
#[test]
fn images_prune_removes_exactly_the_unused_old_images() {
    let _serial = serial();
    let stand = stand();
    // Seven images of the app, a second apart (EC2's creation dates count seconds), each with
    // its own snapshot, and one of another app.
    let mut images = Vec::new();
    for i in 0..8 {
        let app = if i == 7 { "other" } else { "hello" };
        let made = boto(&format!(
            "subnet = ec2.describe_subnets()['Subnets'][0]\n\
             v = ec2.create_volume(AvailabilityZone=subnet['AvailabilityZone'], Size=1)['VolumeId']\n\
             s = ec2.create_snapshot(VolumeId=v)['SnapshotId']\n\
             ec2.delete_volume(VolumeId=v)\n\
             i = ec2.register_image(Name='{app}-build-{i}', Architecture='x86_64', RootDeviceName='/dev/xvda', EnaSupport=True, \
                 BlockDeviceMappings=[{{'DeviceName': '/dev/xvda', 'Ebs': {{'SnapshotId': s}}}}])['ImageId']\n\
             ec2.create_tags(Resources=[i], Tags=[{{'Key': 'app', 'Value': '{app}'}}])\n\
             print(json.dumps([i, s]))"
        ));
        images.push((made[0].as_str().unwrap().to_string(), made[1].as_str().unwrap().to_string()));
        std::thread::sleep(Duration::from_millis(1100));
    }
    let ids: Vec<String> = images.iter().map(|(i, _)| i.clone()).collect();
    let stand = Stand { images: ids.clone(), ..stand };
    // 0 serves in a disabled group, 1 in the serving one, 2 in a launch template of its own, 3
    // in a stopped instance; 4 nothing uses; 5 is shared with another account (which may run
    // it); 6 is the newest.
    deploy(&stand, 0, &[]);
    deploy(&stand, 1, &[]);
    boto(&format!(
        "ec2.create_launch_template(LaunchTemplateName='batch-job', LaunchTemplateData={{'ImageId': '{}'}})\n\
         r = ec2.run_instances(ImageId='{}', MinCount=1, MaxCount=1)['Instances'][0]['InstanceId']\n\
         ec2.stop_instances(InstanceIds=[r])\n\
         ec2.modify_image_attribute(ImageId='{}', LaunchPermission={{'Add': [{{'UserId': '111122223333'}}]}})\n\
         print('{{}}')",
        ids[2], ids[3], ids[5]
    ));
    let prune = |extra: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_bakery"));
        common::aws::aws_env(&mut command);
        let args = [&["images", "prune", "--app", "hello", "--keep", "1"][..], extra].concat();
        let output = command.args(args).args(["--provider", "aws", "--output", "json"]).output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        let value: Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("{e}: {stderr}"));
        (output.status.code().unwrap_or(-1), value, stderr)
    };
    let existing =
        || boto("print(json.dumps(sorted(i['ImageId'] for i in ec2.describe_images(Owners=['self'])['Images'])))");
    let before = existing();

    let (code, dry, stderr) = prune(&["--dry-run"]);
    assert_eq!(code, 0, "{dry}\n{stderr}");
    let deleted = |report: &Value| -> Vec<String> {
        let mut ids: Vec<String> =
            report["deleted"].as_array().unwrap().iter().map(|i| i["id"].as_str().unwrap().into()).collect();
        ids.sort();
        ids
    };
    let unused = vec![ids[4].clone()];
    assert_eq!(deleted(&dry), unused, "{dry:#}");
    let reasons: BTreeMap<String, String> = dry["kept"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| (k["id"].as_str().unwrap().to_string(), k["reasons"].to_string()))
        .collect();
    assert!(reasons[&ids[0]].contains("group hello-prod-v000 (disabled)"), "{reasons:?}");
    assert!(reasons[&ids[1]].contains("group hello-prod-v001 (serving)"), "{reasons:?}");
    assert!(reasons[&ids[2]].contains("launch template batch-job version 1"), "{reasons:?}");
    assert!(reasons[&ids[3]].contains("(stopped)"), "{reasons:?}");
    assert!(reasons[&ids[5]].contains("shared with 111122223333"), "{reasons:?}");
    assert!(reasons[&ids[6]].contains("one of the newest 1"), "{reasons:?}");
    assert!(!reasons.contains_key(&ids[7]), "another app's image is not considered");
    assert_eq!(existing(), before, "a dry run changes nothing");
    assert!(recorded("EnableImageDeregistrationProtection").is_empty());

    // Each call prune makes is throttled once, and it goes through all the same.
    let calls = [
        "DescribeLaunchTemplates",
        "DescribeLaunchTemplateVersions",
        "DescribeLaunchConfigurations",
        "DescribeInstances",
        "EnableImageDeregistrationProtection",
        "DisableImageDeregistrationProtection",
        "EnableImageDeprecation",
        "DisableImageDeprecation",
        "DeregisterImage",
        "DescribeImageAttribute",
    ];
    proxy_post("/_proxy/faults", &json!({"throttle": 1.0, "per_action": 1, "actions": calls}));
    let (code, done, stderr) = prune(&[]);
    let throttled = proxy_get("/_proxy/stats")["faults"]["throttle"].as_u64().unwrap_or(0);
    proxy_post("/_proxy/faults", &json!({}));
    assert_eq!(throttled, calls.len() as u64, "every kind of call throttled once");
    assert_eq!(code, 0, "{done}\n{stderr}");
    assert_eq!(deleted(&done), unused, "{done:#}");
    let gone = |id: &Value| unused.iter().any(|u| id == u);
    let left: Vec<Value> = before.as_array().unwrap().iter().filter(|id| !gone(id)).cloned().collect();
    assert_eq!(existing(), json!(left), "exactly the unused image went");
    let left: Vec<&String> = ids.iter().filter(|id| !unused.contains(id)).collect();
    let snapshots = boto(
        "print(json.dumps(sorted(s['SnapshotId'] for s in ec2.describe_snapshots(OwnerIds=['self'])['Snapshots'])))",
    );
    for (i, (_, snapshot)) in images.iter().enumerate() {
        let kept = snapshots.as_array().unwrap().contains(&json!(snapshot));
        assert_eq!(kept, i != 4, "snapshot of image {i}: {snapshots}");
    }
    let flags = boto(&format!(
        "print(json.dumps({{i['ImageId']: [i.get('DeregistrationProtection'), 'DeprecationTime' in i] for i in ec2.describe_images(ImageIds={left:?})['Images']}}))"
    ));
    assert_eq!(flags[&ids[1]], json!(["enabled-without-cooldown", false]), "the serving image is protected");
    for used in [0, 2, 3] {
        assert_eq!(flags[&ids[used]], json!(["disabled", true]), "image {used}, kept only because it is used");
    }
    assert_eq!(flags[&ids[6]], json!(["disabled", false]), "the newest is neither");
    assert_eq!(flags[&ids[5]], json!(["disabled", false]), "a shared one is kept as it is");
    let (code, _, stderr) = prune(&["--keep", "0"]);
    assert_eq!(code, 3, "{stderr}");
}

/// Deploy state lives in a DynamoDB table made on first use: every run's record, newest first
/// (what the console's history shows), through throttling of every call on the table; the
/// record an older launcher kept in launch template tags is read once and moved there.
#[test]
fn deploy_records_live_in_dynamodb_and_an_old_record_moves_there() {
    let _serial = serial();
    let stand = stand();
    let old = serde_json::to_string(&json!({
        "deploy_id": "old-1", "action": "deploy", "cluster": CLUSTER, "image_id": stand.images[0],
        "strategy": "red-black", "new_group": "hello-prod-v000", "previous_group": null, "phase": "succeeded",
        "message": null, "steps": [], "started": 1_700_000_000u64, "updated": 1_700_000_100u64,
    }))
    .unwrap();
    // As the older launcher wrote it: base64 JSON in 256-character tag chunks and a count.
    boto(&format!(
        "import base64\n\
         encoded = base64.b64encode({old:?}.encode()).decode()\n\
         chunks = [encoded[i:i + 256] for i in range(0, len(encoded), 256)]\n\
         tags = [{{'Key': 'bakery:deploy-record', 'Value': str(len(chunks))}}] + [{{'Key': f'bakery:deploy-record-{{i:02}}', 'Value': c}} for i, c in enumerate(chunks)]\n\
         ec2.create_launch_template(LaunchTemplateName='bakery-deploys-{CLUSTER}', LaunchTemplateData={{}}, TagSpecifications=[{{'ResourceType': 'launch-template', 'Tags': tags}}])\n\
         print('{{}}')"
    ));
    // Reading needs no table: a caller that may not create one can still look.
    run(&["status", "--cluster", "other-prod"]);
    let tables = || boto("print(json.dumps(boto3.client('dynamodb').list_tables()['TableNames']))");
    assert_eq!(tables(), json!([]), "a read made no table");
    let (code, status, stderr) = run(&["status", "--cluster", CLUSTER]);
    assert_eq!((code, &status["deploy"]["deploy_id"]), (0, &json!("old-1")), "{status}\n{stderr}");
    assert_eq!(tables(), json!(["bakery-launcher"]), "moving the old record made it");
    assert_eq!(world(&stand)["templates"], json!([]), "the old record's template is gone once moved");

    let table_calls = ["DescribeTable", "CreateTable", "PutItem", "GetItem", "DeleteItem", "Query"];
    proxy_post("/_proxy/faults", &json!({"throttle": 0.3, "seed": 3, "actions": table_calls}));
    let first = deploy(&stand, 1, &[]);
    let second = deploy(&stand, 2, &[]);
    let throttled = proxy_get("/_proxy/stats")["faults"]["throttle"].as_u64().unwrap_or(0);
    proxy_post("/_proxy/faults", &json!({}));
    assert!(throttled >= 3, "only {throttled} table calls throttled");
    let stored = boto(&format!(
        "ddb = boto3.client('dynamodb')\n\
         items = ddb.query(TableName='bakery-launcher', KeyConditionExpression='#c = :c', ExpressionAttributeNames={{'#c': 'cluster'}}, ExpressionAttributeValues={{':c': {{'S': '{CLUSTER}'}}}}, ScanIndexForward=False)['Items']\n\
         print(json.dumps([[i['key']['S'].split('/')[0], json.loads(i['record']['S'])['deploy_id'] if 'record' in i else None, json.loads(i['record']['S'])['phase'] if 'record' in i else None] for i in items]))"
    ));
    assert_eq!(
        stored,
        json!([
            ["deploy", second["deploy_id"], "succeeded"],
            ["deploy", first["deploy_id"], "succeeded"],
            ["deploy", "old-1", "succeeded"],
        ]),
        "every run's record, and no lock left"
    );
}

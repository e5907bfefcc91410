//! The AWS side of the harness: moto server behind the project's validating proxy
//! (`scripts/moto-server run`), started once per test binary on loopback and reset between
//! tests, plus boto3 (from moto's venv) for setting up and inspecting what bakery does not own.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;

pub const REGION: &str = "us-east-1";

pub struct Moto {
    pub endpoint: String,
    // Held so its stdin stays open: the script stops moto and the proxy when it closes.
    _server: Child,
    _logs: tempfile::TempDir,
}

pub fn venv() -> String {
    std::env::var("BAKERY_VENV").unwrap_or_else(|_| "/opt/bakery/venv".to_string())
}

/// The proxy's endpoint; moto and the proxy start on first use.
pub fn moto() -> &'static Moto {
    static MOTO: OnceLock<Moto> = OnceLock::new();
    MOTO.get_or_init(|| {
        // moto logs every request: keep that out of the test output.
        let logs = tempfile::tempdir().unwrap();
        let mut server = Command::new(super::workspace().join("scripts/moto-server"))
            .arg("run")
            .arg("--log-dir")
            .arg(logs.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("scripts/moto-server starts (scripts/install-deps installs moto)");
        let mut line = String::new();
        BufReader::new(server.stdout.take().unwrap()).read_line(&mut line).unwrap();
        let started: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("scripts/moto-server printed {line:?} instead of its endpoints: {e}"));
        Moto { endpoint: started["endpoint"].as_str().unwrap().to_string(), _server: server, _logs: logs }
    })
}

/// Forgets everything: moto's resources and the proxy's records, faults and overrides.
pub fn reset() {
    proxy_post("/_proxy/reset", &serde_json::json!({}));
}

pub fn proxy_post(path: &str, body: &Value) -> Value {
    let response = ureq::post(&format!("{}{path}", moto().endpoint))
        .set("Content-Type", "application/json")
        .send_string(&body.to_string())
        .unwrap();
    serde_json::from_str(&response.into_string().unwrap()).unwrap_or(Value::Null)
}

pub fn proxy_get(path: &str) -> Value {
    let response = ureq::get(&format!("{}{path}", moto().endpoint)).call().unwrap();
    serde_json::from_str(&response.into_string().unwrap()).unwrap()
}

/// The query-API requests the proxy recorded for `action`.
pub fn recorded(action: &str) -> Vec<Value> {
    proxy_get(&format!("/_proxy/requests?action={action}")).as_array().cloned().unwrap_or_default()
}

/// The environment that points AWS clients at moto.
pub fn aws_env(command: &mut Command) {
    command
        .env("AWS_ENDPOINT_URL", &moto().endpoint)
        .env("AWS_REGION", REGION)
        .env("AWS_DEFAULT_REGION", REGION)
        .env("AWS_ACCESS_KEY_ID", "testing")
        .env("AWS_SECRET_ACCESS_KEY", "testing")
        .env_remove("AWS_PROFILE")
        .env("AWS_EC2_METADATA_DISABLED", "true");
}

/// `bakery --provider aws … --output json` against moto, with the given extra environment.
pub fn aws_bakery(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut command = super::bakery();
    aws_env(&mut command);
    command.envs(env.iter().copied()).args(args).args(["--provider", "aws", "--output", "json"]);
    command
}

/// Runs [`aws_bakery`] and parses the one object it prints.
pub fn run_aws_json(args: &[&str], env: &[(&str, &str)]) -> (i32, Value, String) {
    let output = aws_bakery(args, env).output().expect("bakery runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let value: Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("stdout is one JSON object ({e}): {stdout:?}\nstderr: {stderr}"));
    (output.status.code().unwrap_or(-1), value, stderr)
}

/// Runs a Python snippet with boto3 against moto; it must print one JSON value.
/// `ec2` is a ready EC2 client, `ec2_in(region)` makes one for another region.
pub fn boto(code: &str) -> Value {
    let script = format!(
        "import boto3, json\nec2 = boto3.client('ec2')\nec2_in = lambda region: boto3.client('ec2', region_name=region)\n{code}\n"
    );
    let mut command = Command::new(format!("{}/bin/python", venv()));
    aws_env(&mut command);
    let output = command.arg("-c").arg(&script).output().expect("the venv's python runs");
    assert!(output.status.success(), "boto3 snippet failed: {}", String::from_utf8_lossy(&output.stderr));
    serde_json::from_slice(&output.stdout).unwrap_or(Value::Null)
}

/// Volumes a bake tagged, and snapshots still marked unfinished: what a failed bake must not leave.
pub fn cloud_leftovers() -> Value {
    boto(
        "vols = ec2.describe_volumes(Filters=[{'Name': 'tag-key', 'Values': ['bakery:bake-id']}])['Volumes']\n\
         snaps = ec2.describe_snapshots(OwnerIds=['self'], Filters=[{'Name': 'tag:bakery:status', 'Values': ['in-progress']}])['Snapshots']\n\
         print(json.dumps([v['VolumeId'] for v in vols] + [s['SnapshotId'] for s in snaps]))",
    )
}

//! The `launcher` command line: red/black deploys of baked images, a thin layer over
//! `bakery::launch`.

use bakery::launch::chaos::{self, AuditEntry};
use bakery::launch::cloud::{Action, Cloud, DeployRecord, HealthCheckType, LaunchSettings, Outcome, Phase};
use bakery::launch::cluster_config::{self, ClusterConfig};
use bakery::launch::engine::{self, Engine, Identity, Status, SystemClock};
use bakery::launch::plan::{DeployRequest, StrategyKind};
use bakery::launch::registry::Registry;
use bakery::launch::soak::{Soak, Thresholds, Traffic};
use bakery::ui::OutputFormat;
use clap::{Parser, Subcommand, ValueEnum};
use serde::Serialize;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

/// Deploy baked images as red/black clusters, roll back in seconds, clean up after a soak.
///
/// A cluster is `app[-stack[-detail]]`; each deploy makes a new server group
/// `cluster-vNNN` of at least 3 instances across zones, waits until every instance is healthy,
/// puts it in service, then disables the previous group but keeps its instances running, so a
/// rollback is a switch. Strategies only plan; one engine runs the plan, saving a record after
/// every step, so a rerun after a crash converges.
///
/// Exit status: 0 success, 2 usage, 3 bad input (names, capacity), 4 nothing to roll back to,
/// 5 cluster locked by another deploy, 6 health gate failed (the old group still serves),
/// 130 interrupted (rerun to continue), 1 anything else.
#[derive(Parser)]
#[command(version, max_term_width = 100, args_override_self = true)]
struct Cli {
    /// Where groups run: `local` boots images on this host behind HAProxy; `aws` uses Auto
    /// Scaling groups, launch templates and ELBv2 target groups.
    #[arg(long, global = true, env = "BAKERY_PROVIDER", value_enum, default_value_t = CloudKind::Local)]
    provider: CloudKind,

    /// State of the local provider (the same as bakery's: images are booted from it).
    #[arg(long, global = true, env = "BAKERY_STATE_DIR", default_value = "/var/lib/bakery")]
    state_dir: PathBuf,

    /// aws: the region (default: AWS_REGION or the profile's).
    #[arg(long, global = true)]
    region: Option<String>,

    /// aws: the DynamoDB table of deploy locks and records, created on first use (default:
    /// bakery-launcher).
    #[arg(long, global = true, env = "BAKERY_STATE_TABLE")]
    state_table: Option<String>,

    /// `json` prints exactly one JSON object on stdout.
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Text)]
    output: OutputFormat,

    /// More log output on stderr (-v info, -vv debug); BAKERY_LOG overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,

    #[command(subcommand)]
    command: Commands,
}

#[derive(Clone, Copy, ValueEnum, PartialEq)]
enum CloudKind {
    Local,
    Aws,
}

#[derive(Subcommand)]
enum Commands {
    /// Deploy an image as a new group of the cluster and flip traffic to it once it is healthy.
    ///
    /// On aws the new group copies the serving group's launch template (security groups,
    /// instance profile, key pair, user data, block devices, metadata options, tags, instance
    /// type) and Auto Scaling settings (health check, termination policies, scaling policies with
    /// their alarms, scheduled actions). What is given wins, in this order: flags, then
    /// --cluster-config, then the serving group, then the defaults.
    ///
    /// Examples:
    ///   launcher deploy --cluster hello-prod --image ami-0123456789abcdef0 --health-url /hello/health
    ///   launcher deploy --cluster hello-prod --image ami-0123456789abcdef0 --cluster-config cluster.toml
    #[command(verbatim_doc_comment)]
    Deploy(Box<DeployArgs>),
    /// Show the cluster's groups (version, image, in service or disabled, capacity, health) and
    /// its last deploy.
    Status {
        #[arg(long)]
        cluster: String,
    },
    /// Put the previous group back in service at no less than the current capacity, then
    /// disable the newest.
    Rollback {
        #[arg(long)]
        cluster: String,
        /// How long the previous group may take to be healthy again.
        #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
        health_timeout: Duration,
    },
    /// Destroy disabled groups (and their launch templates) disabled longer than --soak ago.
    Finish {
        #[arg(long)]
        cluster: String,
        /// How long a group must have been disabled; the default keeps a recent one for rollback.
        #[arg(long, default_value = "12h", value_parser = humantime::parse_duration)]
        soak: Duration,
    },
    /// Destroy every group of the cluster (and, locally, stop its balancer).
    Destroy {
        #[arg(long)]
        cluster: String,
    },
    /// List the clusters that have groups.
    Clusters,
    /// Heal and watch every cluster until stopped: replace a local group's instances that died
    /// or stay unhealthy (Auto Scaling does it on aws), and for a soaking cluster sample the new
    /// group's traffic, switch back on a breach, destroy the old group when a soak passes. Safe
    /// to run as a service and to restart (its state is on disk); two watchers never act on one
    /// cluster at once.
    Watch {
        /// Between two looks at each cluster.
        #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
        interval: Duration,
        /// Look once at every soaking cluster and exit, printing what each look found (with
        /// --output json, an array of the clusters' records).
        #[arg(long)]
        once: bool,
    },
    /// Chaos Monkey: terminate instances of clusters that opted in, to prove they heal.
    #[command(subcommand)]
    Chaos(ChaosCommand),
    /// The web console, in Asgard's place: applications, images, clusters, groups and instances;
    /// deploy, roll back and finish from the browser and follow each step live. Its pages use a
    /// JSON API under /api/ that CI can use too (`GET /api/session` gives the CSRF token every
    /// POST needs, in the X-CSRF-Token header).
    ///
    /// It listens on loopback unless told otherwise; anywhere else it needs --auth-token-file,
    /// and pages and API then need a login (a browser signs in with a token; scripts send
    /// `Authorization: Bearer TOKEN`). Every action is in STATE/console/audit.jsonl with who
    /// did it and from where.
    ///
    /// Example:
    ///   launcher console
    ///   launcher console --listen 0.0.0.0:8443 --auth-token-file /etc/bakery/console-tokens
    #[command(verbatim_doc_comment)]
    Console {
        /// Address and port to listen on (port 0: any free one; the address is printed).
        #[arg(long, default_value = "127.0.0.1:8080")]
        listen: std::net::SocketAddr,
        /// Lines of `name:token` (tokens of 16 characters or more; the file readable by its
        /// owner only). Required to listen beyond loopback.
        #[arg(long, value_name = "FILE")]
        auth_token_file: Option<PathBuf>,
    },
    /// The service registry instances register themselves in (local: etcd on this host, started
    /// by the first deploy; aws: Cloud Map, with `deploy --registry-namespace`).
    #[command(subcommand)]
    Registry(RegistryCommand),
}

#[derive(Subcommand)]
enum ChaosCommand {
    /// Let the monkeys at a cluster (a cluster that did not opt in is never touched).
    Enable {
        #[arg(long)]
        cluster: String,
        /// Mean time between two kills by the scheduler.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        mean_interval: Duration,
        /// Local time of day the scheduler may act in.
        #[arg(long, default_value = "09:00-15:00")]
        window: String,
        #[arg(long, default_value_t = 3)]
        max_per_day: u32,
    },
    /// Opt a cluster out again.
    Disable {
        #[arg(long)]
        cluster: String,
    },
    /// Terminate random healthy in-service instances now, never a group's last healthy one and
    /// never while a deploy holds the cluster (local: the instance's processes are killed, no
    /// clean shutdown; aws: TerminateInstanceInAutoScalingGroup, the group keeps its capacity).
    ///
    /// Example:
    ///   launcher chaos kill --cluster hello-prod --count 1 --output json
    #[command(verbatim_doc_comment)]
    Kill {
        #[arg(long)]
        cluster: String,
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// Say which instances would go, and terminate none.
        #[arg(long)]
        dry_run: bool,
    },
    /// The scheduler: on every cluster that opted in, inside its window, kills one instance at
    /// random times averaging its mean interval, never more than its daily limit (counted from
    /// the audit log, so a restart forgets nothing) and never while a deploy holds the cluster.
    Run {
        /// Between two looks.
        #[arg(long, default_value = "1m", value_parser = humantime::parse_duration)]
        interval: Duration,
        /// Look once, print what was done, and exit.
        #[arg(long)]
        once: bool,
    },
    /// Latency Monkey: delay the traffic of one instance (random healthy in-service one, or
    /// --instance) for a while, then restore it. Stays until then; if it dies first, the relay
    /// stops by itself and `launcher watch` points the balancer back (local; aws: not yet).
    ///
    /// Example:
    ///   launcher chaos latency --cluster hello-prod --delay 2s --jitter 500ms --duration 60s
    #[command(verbatim_doc_comment)]
    Latency {
        #[arg(long)]
        cluster: String,
        #[arg(long)]
        instance: Option<String>,
        #[arg(long, value_parser = humantime::parse_duration)]
        delay: Duration,
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        jitter: Duration,
        #[arg(long, value_parser = humantime::parse_duration)]
        duration: Duration,
    },
    /// Latency Monkey's relay process (started by `chaos latency`).
    #[command(hide = true)]
    Relay {
        #[arg(long)]
        listen: std::net::SocketAddr,
        #[arg(long)]
        target: std::net::SocketAddr,
        #[arg(long, value_parser = humantime::parse_duration)]
        delay: Duration,
        #[arg(long, value_parser = humantime::parse_duration)]
        jitter: Duration,
        /// Unix seconds.
        #[arg(long)]
        until: u64,
    },
    /// Every monkey action: time, cluster, group, instance, monkey, action, result.
    Log {
        #[arg(long)]
        cluster: Option<String>,
    },
}

#[derive(Subcommand)]
enum RegistryCommand {
    /// Every registered instance: app, cluster, group, id, address, zone, status (`UP`,
    /// `STARTING`, `DOWN`, or `OUT_OF_SERVICE` while its group is out of traffic), version and
    /// last heartbeat (Unix seconds). Locally an instance whose agent stopped beating is gone
    /// within 10 s; Cloud Map keeps it until it deregisters or its group is destroyed.
    ///
    /// Example:
    ///   launcher registry list --cluster hello-prod --output json
    #[command(verbatim_doc_comment)]
    List {
        #[arg(long)]
        app: Option<String>,
        #[arg(long)]
        cluster: Option<String>,
    },
    /// Stop the local registry (its data stays; the next deploy starts it again).
    Stop,
}

#[derive(clap::Args)]
struct DeployArgs {
    /// app[-stack[-detail]], e.g. hello-prod.
    #[arg(long)]
    cluster: String,
    /// The image to deploy.
    #[arg(long)]
    image: String,
    /// red-black keeps the old group warm for rollback; highlander destroys every other group.
    #[arg(long, default_value = "red-black")]
    strategy: StrategyKind,
    /// Capacity; values not given come from the group in service (at least 3).
    #[arg(long)]
    min: Option<u32>,
    #[arg(long)]
    max: Option<u32>,
    #[arg(long)]
    desired: Option<u32>,
    /// The cluster's settings file (see `cluster.toml` in the README): keys named like these
    /// flags, checked all at once. Flags given here win over it.
    #[arg(long, value_name = "FILE")]
    cluster_config: Option<PathBuf>,
    /// aws: the instance type (default: the serving group's, else t3.small).
    #[arg(long)]
    instance_type: Option<String>,
    /// aws: security group ids, replacing the serving group's (repeatable or comma-separated).
    #[arg(long = "security-group", value_delimiter = ',', value_name = "SG")]
    security_groups: Vec<String>,
    /// aws: the instance profile's name or ARN.
    #[arg(long, value_name = "NAME|ARN")]
    instance_profile: Option<String>,
    /// aws: the EC2 key pair.
    #[arg(long)]
    key_name: Option<String>,
    /// aws: the team's user data (a script or cloud-config, at most 15 KiB); the launcher's own
    /// part is added beside it, never over it.
    #[arg(long, value_name = "FILE")]
    user_data_file: Option<PathBuf>,
    /// aws: how the group judges its instances (default: the serving group's, else ELB with
    /// a target group and EC2 without).
    #[arg(long, value_name = "ELB|EC2")]
    health_check_type: Option<HealthCheckType>,
    /// aws: how long a new instance may take before its health counts (default: the serving
    /// group's, else 5m).
    #[arg(long, value_parser = humantime::parse_duration)]
    health_check_grace: Option<Duration>,
    /// aws: which instances a scale-in ends first, in order (repeatable; default: the serving
    /// group's, else Default).
    #[arg(long = "termination-policy", value_delimiter = ',', value_name = "POLICY", value_parser = termination_policy)]
    termination_policies: Vec<String>,
    /// aws: subnets in at least 3 zones, comma-separated (default: the default VPC's).
    #[arg(long, value_delimiter = ',')]
    subnets: Vec<String>,
    /// aws: target group ARN the new group joins (repeatable; default: those of the group it
    /// replaces, which is also gated through the first).
    #[arg(long = "target-group")]
    target_groups: Vec<String>,
    /// Path every instance must answer 200 on before the group takes traffic (default: /).
    #[arg(long)]
    health_url: Option<String>,
    /// aws: the Cloud Map HTTP namespace the instances register in (created if missing; one
    /// service per app). The gate then also waits for every instance to report UP there, and a
    /// disabled group's instances are held OUT_OF_SERVICE. Default: the service of the group
    /// it replaces, if that registered. Local instances always register in this host's registry.
    #[arg(long, value_name = "NAMESPACE")]
    registry_namespace: Option<String>,
    /// How long the new group may take to be healthy before the deploy is undone.
    #[arg(long, default_value = "10m", value_parser = humantime::parse_duration)]
    health_timeout: Duration,
    /// Disabled groups kept for rollback after the flip.
    #[arg(long, default_value_t = 2)]
    keep: usize,
    /// Watch the new group's traffic for this long after the flip (phase `soaking`): a breach
    /// switches back to the old group by itself; a clean soak destroys it. Watching is
    /// `launcher watch` (or --watch). Local clusters only report traffic for now.
    #[arg(long, value_parser = humantime::parse_duration)]
    soak: Option<Duration>,
    /// Stay and watch until the soak ends; exit 6 if it switched back.
    #[arg(long, requires = "soak")]
    watch: bool,
    /// Largest share of 5xx answers in a window before switching back, in percent.
    #[arg(long, default_value_t = 1.0, value_name = "PERCENT")]
    max_error_rate: f64,
    /// Largest p99 latency in a window (default: twice the old group's, at least 500ms).
    #[arg(long, value_parser = humantime::parse_duration)]
    max_p99: Option<Duration>,
    /// The window figures are judged over.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    window: Duration,
    /// Fewer requests than this in a window say nothing either way.
    #[arg(long, default_value_t = 20)]
    min_requests: u64,
}

struct Failure {
    code: u8,
    message: String,
}

fn termination_policy(policy: &str) -> Result<String, String> {
    match bakery::launch::cloud::termination_policy_problem(policy) {
        Some(problem) => Err(format!("{policy:?} {problem}")),
        None => Ok(policy.to_string()),
    }
}

/// The deploy asked for: flags over the cluster config; a config or user data file that is
/// wrong is bad input (exit 3).
fn deploy_request(args: &DeployArgs) -> Result<DeployRequest, Failure> {
    let bad_input = |message: String| Failure { code: 3, message };
    let config = match &args.cluster_config {
        Some(path) => cluster_config::load(path).map_err(|e| bad_input(e.to_string()))?,
        None => ClusterConfig::default(),
    };
    let user_data = match &args.user_data_file {
        Some(path) => {
            Some(cluster_config::read_user_data(path).map_err(|e| bad_input(format!("--user-data-file: {e}")))?)
        }
        None => None,
    };
    let given = LaunchSettings {
        instance_type: args.instance_type.clone(),
        security_groups: (!args.security_groups.is_empty()).then(|| args.security_groups.clone()),
        instance_profile: args.instance_profile.clone(),
        key_name: args.key_name.clone(),
        user_data,
        health_check_type: args.health_check_type,
        health_check_grace: args.health_check_grace.map(|g| g.as_secs()),
        termination_policies: (!args.termination_policies.is_empty()).then(|| args.termination_policies.clone()),
    };
    let problems = cluster_config::flag_problems(
        &given,
        &args.subnets,
        &args.target_groups,
        args.health_url.as_deref(),
        args.registry_namespace.as_deref(),
    );
    if !problems.is_empty() {
        return Err(bad_input(problems.join("\n")));
    }
    let or_config = |given: &[String], configured: Vec<String>| match given.is_empty() {
        true => configured,
        false => given.to_vec(),
    };
    Ok(DeployRequest {
        cluster: args.cluster.clone(),
        image_id: args.image.clone(),
        strategy: args.strategy,
        min: args.min.or(config.min),
        max: args.max.or(config.max),
        desired: args.desired.or(config.desired),
        launch: given.over(config.launch),
        subnets: or_config(&args.subnets, config.subnets),
        target_groups: or_config(&args.target_groups, config.target_groups),
        health_url: args.health_url.clone().or(config.health_url).unwrap_or_else(|| "/".into()),
        registry_namespace: args.registry_namespace.clone().or(config.registry_namespace),
        health_timeout: args.health_timeout,
        keep: args.keep,
        soak: args.soak.map(|soak| {
            let thresholds = Thresholds {
                max_error_rate: args.max_error_rate / 100.0,
                max_p99_ms: args.max_p99.map(|p| p.as_millis() as u64),
                window_secs: args.window.as_secs().max(1),
                min_requests: args.min_requests,
            };
            (soak, thresholds)
        }),
    })
}

/// How often `deploy --watch` looks at its soaking cluster.
const WATCH_INTERVAL: Duration = Duration::from_secs(2);

fn open_cloud(cli: &Cli) -> Result<Box<dyn Cloud>, Failure> {
    let kind = match cli.provider {
        CloudKind::Local => bakery::launch::CloudKind::Local,
        CloudKind::Aws => bakery::launch::CloudKind::Aws,
    };
    bakery::launch::open_cloud(kind, &cli.state_dir, cli.region.clone(), cli.state_table.clone())
        .map_err(|e| Failure { code: 2, message: format!("opening the {} provider: {e}", cloud_name(cli)) })
}

fn cloud_name(cli: &Cli) -> &'static str {
    match cli.provider {
        CloudKind::Local => "local",
        CloudKind::Aws => "aws",
    }
}

/// One command's result: the record of what ran, and where the cluster's traffic arrives.
#[derive(Serialize)]
struct RunResult<'a> {
    #[serde(flatten)]
    record: &'a DeployRecord,
    #[serde(skip_serializing_if = "Option::is_none")]
    balancer_url: Option<String>,
}

fn describe_record(record: &DeployRecord, balancer: Option<&str>) -> String {
    let mut lines = vec![format!(
        "{:?} {} on {}: {:?}{}",
        record.action,
        record.deploy_id,
        record.cluster,
        record.phase,
        record.message.as_ref().map(|m| format!(" ({m})")).unwrap_or_default()
    )];
    if let Some(group) = &record.new_group {
        lines.push(format!("  serving: {group}"));
    }
    if let Some(group) = &record.previous_group {
        lines.push(format!("  previous: {group}"));
    }
    for step in &record.steps {
        let mark = match step.outcome {
            Outcome::Ok => "ok  ",
            Outcome::Skipped => "skip",
            Outcome::Failed => "FAIL",
            Outcome::Pending => "....",
        };
        let note = step.message.as_ref().map(|m| format!(" — {m}")).unwrap_or_default();
        lines.push(format!("  {mark} {} ({} ms){note}", step.step, step.duration_ms));
    }
    if let Some(url) = balancer {
        lines.push(format!("  balancer: {url}"));
    }
    lines.join("\n")
}

fn describe_status(status: &Status) -> String {
    let mut lines = vec![format!("cluster {} ({})", status.cluster, status.cloud)];
    if let Some(url) = &status.balancer_url {
        lines.push(format!("  balancer: {url}"));
    }
    lines.push(format!("  {:<28} {:<22} {:<9} {:<9} {}", "GROUP", "IMAGE", "STATE", "CAPACITY", "HEALTHY"));
    for group in &status.groups {
        let state = if group.in_service { "serving" } else { "disabled" };
        let healthy = group.members.iter().filter(|m| m.health == bakery::launch::cloud::Health::Healthy).count();
        let c = group.capacity;
        lines.push(format!(
            "  {:<28} {:<22} {:<9} {:<9} {}/{}",
            group.name,
            group.image_id,
            state,
            format!("{}/{}/{}", c.min, c.desired, c.max),
            healthy,
            group.members.len()
        ));
        for r in &group.replacements {
            let at = humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + Duration::from_secs(r.at));
            lines.push(format!("    replaced {} by {} at {at} ({})", r.instance, r.replaced_by, r.reason));
        }
    }
    if let Some(record) = &status.deploy {
        lines.push(describe_record(record, None).lines().map(|l| format!("  {l}")).collect::<Vec<_>>().join("\n"));
        if let Some(soak) = &record.soak {
            lines.push(describe_soak(soak));
        }
    }
    lines.join("\n")
}

/// The soak: time left, the figures against the thresholds, and the verdict.
fn describe_soak(soak: &Soak) -> String {
    let now = bakery::ids::unix_now();
    let left = humantime::format_duration(Duration::from_secs(soak.until.saturating_sub(now)));
    let figures = |t: &Option<Traffic>| match t {
        Some(t) => format!("{} requests, {:.2}% 5xx, p99 {} ms", t.requests, t.error_rate() * 100.0, t.p99_ms),
        None => "none".into(),
    };
    let limits = &soak.thresholds;
    [
        format!("  soak: {} ({left} left)", soak.verdict),
        format!("    new group, last {}s: {}", limits.window_secs, figures(&soak.latest)),
        format!("    old group before the flip: {}", figures(&soak.baseline)),
        format!(
            "    limits: {:.2}% 5xx, p99 {} ms, at least {} requests a window",
            limits.max_error_rate * 100.0,
            limits.p99_limit(soak.baseline.as_ref()),
            limits.min_requests
        ),
    ]
    .join("\n")
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    if std::fs::create_dir_all(&cli.state_dir).is_ok() {
        if let Ok(canonical) = cli.state_dir.canonicalize() {
            cli.state_dir = canonical;
        }
    }
    bakery::ui::init_logging(cli.verbose);
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("error: {}", failure.message);
            ExitCode::from(failure.code)
        }
    }
}

/// One look at a cluster's soak: the record when it is news (a soak going on only for --once).
fn watch_once(engine: &Engine, ui: &bakery::ui::Ui, cluster: &str, once: bool) -> Option<DeployRecord> {
    match engine.watch(cluster) {
        // A soak that ended is news on every look; one going on, only for --once.
        Ok(Some(record)) if record.phase != Phase::Soaking && !once => {
            ui.print(&record, |r| describe_record(r, None));
            None
        }
        Ok(record) => record,
        // One cluster's trouble must not stop the others being watched.
        Err(error) => {
            eprintln!("watch {cluster}: {error}");
            None
        }
    }
}

/// `launcher chaos`: the consent and the audit log live where the cloud keeps its state.
fn chaos_command(cli: &Cli, engine: &Engine, command: &ChaosCommand, ui: &bakery::ui::Ui) -> Result<(), Failure> {
    let chaos = engine.cloud.chaos_store(&cli.state_dir);
    let failed = |e: chaos::Error| Failure { code: 1, message: e.to_string() };
    let now = || bakery::ids::unix_now();
    match command {
        ChaosCommand::Enable { cluster, mean_interval, window, max_per_day } => {
            bakery::launch::names::Cluster::parse(cluster)
                .map_err(|e| Failure { code: 3, message: format!("cluster {cluster}: {e}") })?;
            if !chaos::valid_window(window) {
                let message = format!("--window {window:?} is not HH:MM-HH:MM");
                return Err(Failure { code: 3, message });
            }
            let config = chaos::Config {
                cluster: cluster.clone(),
                mean_interval_secs: mean_interval.as_secs().max(1),
                window: window.clone(),
                max_per_day: *max_per_day,
                enabled_at: now(),
            };
            chaos.enable(&config).map_err(failed)?;
            ui.print(&config, |c| {
                format!("chaos enabled on {} ({} a day at most, {})", c.cluster, c.max_per_day, c.window)
            });
        }
        ChaosCommand::Disable { cluster } => {
            chaos.disable(cluster).map_err(failed)?;
            let result = serde_json::json!({ "cluster": cluster, "enabled": false });
            ui.print(&result, |_| format!("chaos disabled on {cluster}"));
        }
        ChaosCommand::Kill { cluster, count, dry_run } => {
            if chaos.config(cluster).map_err(failed)?.is_none() {
                let message =
                    format!("cluster {cluster} has not opted in: `launcher chaos enable --cluster {cluster}`");
                return Err(Failure { code: 3, message });
            }
            let outcomes = engine
                .chaos_kill(cluster, *count, *dry_run, &mut rand::thread_rng())
                .map_err(|e| Failure { code: e.exit_code(), message: e.to_string() })?;
            let entries = audit_entries(cluster, outcomes);
            if !dry_run {
                chaos.record(&entries).map_err(failed)?;
            }
            ui.print(&entries, |e| describe_audit(e));
            if entries.iter().any(|e| e.result.starts_with("failed")) {
                return Err(Failure { code: 1, message: "an instance could not be terminated".into() });
            }
        }
        ChaosCommand::Run { interval, once } => {
            let mut rng = rand::thread_rng();
            loop {
                let mut done = Vec::new();
                for config in chaos.enabled().map_err(failed)? {
                    let log = chaos.log(Some(&config.cluster)).map_err(failed)?;
                    if !chaos::is_due(&config, now(), &log, interval.as_secs(), rand::Rng::gen(&mut rng))
                        || !chaos.claim_kill(&config, now()).map_err(failed)?
                    {
                        continue;
                    }
                    match engine.chaos_kill(&config.cluster, 1, false, &mut rng) {
                        Ok(outcomes) => {
                            let entries = audit_entries(&config.cluster, outcomes);
                            chaos.record(&entries).map_err(failed)?;
                            done.extend(entries);
                        }
                        // A deploy holds it: next time.
                        Err(engine::Error::Locked { .. }) => {}
                        Err(error) => eprintln!("chaos {}: {error}", config.cluster),
                    }
                }
                if *once {
                    ui.print(&done, |e| describe_audit(e));
                    return Ok(());
                }
                for entry in &done {
                    eprintln!("{}", describe_audit(std::slice::from_ref(entry)));
                }
                if engine.cancel.load(std::sync::atomic::Ordering::Relaxed) {
                    return Ok(());
                }
                std::thread::sleep(*interval);
            }
        }
        ChaosCommand::Latency { cluster, instance, delay, jitter, duration } => {
            if chaos.config(cluster).map_err(failed)?.is_none() {
                let message =
                    format!("cluster {cluster} has not opted in: `launcher chaos enable --cluster {cluster}`");
                return Err(Failure { code: 3, message });
            }
            let until = now() + duration.as_secs().max(1);
            let engine_failed = |e: engine::Error| Failure { code: e.exit_code(), message: e.to_string() };
            let (group, instance) = engine
                .chaos_latency(cluster, instance.as_deref(), *delay, *jitter, until, &mut rand::thread_rng())
                .map_err(engine_failed)?;
            let span = |d: &Duration| humantime::format_duration(*d).to_string();
            let entry = AuditEntry {
                time: now(),
                cluster: cluster.clone(),
                group,
                instance,
                monkey: "latency".into(),
                action: format!("delay {} ± {} for {}", span(delay), span(jitter), span(duration)),
                result: "done".into(),
            };
            chaos.record(std::slice::from_ref(&entry)).map_err(failed)?;
            // Stay until it ends, then restore it (the relay has stopped by itself by then).
            while now() < until && !engine.cancel.load(std::sync::atomic::Ordering::Relaxed) {
                std::thread::sleep(Duration::from_millis(200));
            }
            let restored = engine.cloud.heal(cluster).map_err(|e| Failure { code: 1, message: e.to_string() });
            ui.print(&entry, |e| describe_audit(std::slice::from_ref(e)));
            restored?;
        }
        ChaosCommand::Relay { .. } => unreachable!("run before the cloud is opened"),
        ChaosCommand::Log { cluster } => {
            let entries = chaos.log(cluster.as_deref()).map_err(failed)?;
            ui.print(&entries, |e| describe_audit(e));
        }
    }
    Ok(())
}

/// Chaos Monkey's terminations as the audit log keeps them.
fn audit_entries(cluster: &str, outcomes: Vec<(String, String, String)>) -> Vec<AuditEntry> {
    let time = bakery::ids::unix_now();
    let entry = |(group, instance, result)| AuditEntry {
        time,
        cluster: cluster.to_string(),
        group,
        instance,
        monkey: "chaos".into(),
        action: "terminate".into(),
        result,
    };
    outcomes.into_iter().map(entry).collect()
}

fn describe_audit(entries: &[AuditEntry]) -> String {
    if entries.is_empty() {
        return "no monkey action (a group's last healthy instance is never taken)".into();
    }
    let lines = entries.iter().map(|e| {
        format!("{} {} {} {} {}/{}: {}", e.time, e.monkey, e.action, e.cluster, e.group, e.instance, e.result)
    });
    lines.collect::<Vec<_>>().join("\n")
}

/// `launcher registry`.
fn registry(cli: &Cli, command: &RegistryCommand, ui: &bakery::ui::Ui) -> Result<(), Failure> {
    match command {
        RegistryCommand::List { app, cluster } => {
            let cloud = open_cloud(cli)?;
            let mut instances = cloud
                .registrations(cluster.as_deref())
                .map_err(|e| Failure { code: 1, message: format!("service registry: {e}") })?;
            instances.retain(|i| app.as_ref().is_none_or(|app| &i.registration.app == app));
            ui.print(&instances, |instances| {
                let rows = instances.iter().map(|i| {
                    let r = &i.registration;
                    format!(
                        "{:<16} {:<24} {:<19} {:>15}:{:<5} {:<10} {:<15} {}",
                        r.status, r.group, r.instance_id, r.address, r.port, r.zone, r.version, r.last_heartbeat
                    )
                });
                let rows: Vec<String> = rows.collect();
                if rows.is_empty() {
                    "no registered instances".into()
                } else {
                    rows.join("\n")
                }
            });
        }
        RegistryCommand::Stop => {
            if cli.provider != CloudKind::Local {
                let message = "Cloud Map is a managed service: there is nothing to stop on aws";
                return Err(Failure { code: 2, message: message.into() });
            }
            Registry::new(&cli.state_dir).stop().map_err(|e| Failure { code: 1, message: e.to_string() })?;
            ui.print(&serde_json::json!({ "stopped": true }), |_| "registry stopped".into());
        }
    }
    Ok(())
}

/// `launcher console`: serves until Ctrl-C.
fn console(cli: &Cli, listen: std::net::SocketAddr, token_file: Option<&std::path::Path>) -> Result<(), Failure> {
    use bakery::console::{self, auth::Logins};
    let logins = match token_file {
        Some(path) => Some(Logins::load(path).map_err(|e| Failure { code: 3, message: e.to_string() })?),
        None => None,
    };
    let cloud: std::sync::Arc<dyn Cloud> = open_cloud(cli)?.into();
    let images = open_images(cli)?;
    // A loopback console's visitors act as this process's user.
    let config =
        console::Config { listen, logins, state_dir: cli.state_dir.clone(), local_user: Identity::current(0).owner };
    let ui = bakery::ui::Ui::new(cli.output);
    let ready = |bound: std::net::SocketAddr| {
        let url = format!("http://{bound}/");
        ui.print(&serde_json::json!({ "url": url }), |_| format!("console: {url}"));
        let _ = std::io::Write::flush(&mut std::io::stdout());
    };
    let served = console::serve(config, cloud, images, bakery::ui::cancellation(), ready);
    served.map_err(|e| match e {
        console::Error::NeedsToken { .. } => Failure { code: 2, message: e.to_string() },
        _ => Failure { code: 1, message: e.to_string() },
    })
}

/// The images the console lists: the local registry, or EC2's.
fn open_images(cli: &Cli) -> Result<std::sync::Arc<dyn bakery::provider::ImageRegistry>, Failure> {
    let failed = |e: bakery::provider::Error| Failure { code: 2, message: format!("opening the images: {e}") };
    match cli.provider {
        CloudKind::Local => Ok(std::sync::Arc::new(
            bakery::local::registry::Registry::open(&cli.state_dir).map_err(|e| failed(e.into()))?,
        )),
        #[cfg(feature = "aws")]
        CloudKind::Aws => Ok(std::sync::Arc::new(bakery::aws::image_registry(cli.region.clone()).map_err(failed)?)),
        #[cfg(not(feature = "aws"))]
        CloudKind::Aws => Err(Failure { code: 2, message: bakery::AWS_NOT_BUILT.into() }),
    }
}

fn run(cli: &Cli) -> Result<(), Failure> {
    if let Commands::Console { listen, auth_token_file } = &cli.command {
        return console(cli, *listen, auth_token_file.as_deref());
    }
    if let Commands::Registry(command) = &cli.command {
        return registry(cli, command, &bakery::ui::Ui::new(cli.output));
    }
    if let Commands::Chaos(ChaosCommand::Relay { listen, target, delay, jitter, until }) = &cli.command {
        let failed = |e: std::io::Error| Failure { code: 1, message: format!("relay on {listen}: {e}") };
        let listener = std::net::TcpListener::bind(listen).map_err(failed)?;
        let delay = bakery::launch::latency::Delay { delay: *delay, jitter: *jitter };
        let until = std::time::UNIX_EPOCH + Duration::from_secs(*until);
        return bakery::launch::latency::relay(listener, *target, delay, until).map_err(failed);
    }
    let cloud = open_cloud(cli)?;
    let cancel = bakery::ui::cancellation();
    let start_time = bakery::process::start_time(std::process::id() as i32).unwrap_or_default();
    let mut engine = Engine::new(cloud.as_ref(), &SystemClock, &cancel, Identity::current(start_time));
    if let Some(interval) =
        std::env::var("LAUNCHER_POLL_INTERVAL").ok().and_then(|v| humantime::parse_duration(&v).ok())
    {
        engine.poll_interval = interval;
    }
    let ui = bakery::ui::Ui::new(cli.output);
    engine.events = &ui;
    let finished = |result: engine::Result<DeployRecord>, cluster: &str| -> Result<(), Failure> {
        let balancer_url = cloud.balancer_url(cluster);
        let record = match &result {
            Ok(record) => Some(record),
            Err(error) => error.record(),
        };
        if let Some(record) = record {
            let shown = RunResult { record, balancer_url: balancer_url.clone() };
            ui.print(&shown, |r| describe_record(r.record, r.balancer_url.as_deref()));
        }
        let printed = record.is_some();
        match result {
            Ok(_) => Ok(()),
            Err(error) => {
                let code = error.exit_code();
                if ui.format == OutputFormat::Json && !printed {
                    println!("{}", serde_json::json!({ "error": error.to_string(), "exit_code": code }));
                }
                Err(Failure { code, message: error.to_string() })
            }
        }
    };
    match &cli.command {
        Commands::Deploy(args) => {
            let request = deploy_request(args).inspect_err(|failure| {
                if ui.format == OutputFormat::Json {
                    println!("{}", serde_json::json!({ "error": failure.message, "exit_code": failure.code }));
                }
            })?;
            let deployed = engine.deploy(&request);
            if !args.watch || deployed.as_ref().map_or(true, |r| r.phase != Phase::Soaking) {
                return finished(deployed, &args.cluster);
            }
            // Stay until the soak ends: the last record is the finish or the switch-back.
            let mut last = deployed;
            while let Ok(record) = &last {
                if record.phase != Phase::Soaking || cancel.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                std::thread::sleep(WATCH_INTERVAL);
                match engine.watch(&args.cluster) {
                    Ok(Some(record)) => last = Ok(record),
                    Ok(None) => {}
                    Err(error) => last = Err(error),
                }
            }
            let rolled_back = last.as_ref().is_ok_and(|r| r.action == Action::Rollback);
            let interrupted = last.as_ref().is_ok_and(|r| r.phase == Phase::Soaking);
            finished(last, &args.cluster)?;
            if interrupted {
                let message = "stopped watching; the cluster soaks on (`launcher watch` takes over)";
                return Err(Failure { code: 130, message: message.into() });
            }
            match rolled_back {
                true => {
                    Err(Failure { code: 6, message: "the soak breached; switched back to the previous group".into() })
                }
                false => Ok(()),
            }
        }
        Commands::Watch { interval, once } => std::thread::scope(|scope| {
            // Each cluster is looked at in a thread of its own, one look at a time: a cluster
            // switching back (which waits for its old group's gate) holds up no other.
            let mut looking = std::collections::BTreeMap::new();
            loop {
                looking.retain(|_, look: &mut std::thread::ScopedJoinHandle<_>| !look.is_finished());
                // A passing failure to list clusters must not end a long-running watcher.
                let clusters = engine.clusters().unwrap_or_else(|error| {
                    eprintln!("watch: listing clusters: {error}");
                    Vec::new()
                });
                for cluster in clusters {
                    if looking.contains_key(&cluster) {
                        continue;
                    }
                    let (engine, ui, once, name) = (&engine, &ui, *once, cluster.clone());
                    let look = scope.spawn(move || {
                        match engine.cloud.heal(&cluster) {
                            Ok(replaced) => {
                                for r in replaced {
                                    eprintln!(
                                        "heal {cluster}: {} replaced by {} ({})",
                                        r.instance, r.replaced_by, r.reason
                                    );
                                }
                            }
                            Err(error) => eprintln!("heal {cluster}: {error}"),
                        }
                        watch_once(engine, ui, &cluster, once)
                    });
                    looking.insert(name, look);
                }
                if *once {
                    let looked_at: Vec<DeployRecord> =
                        std::mem::take(&mut looking).into_values().filter_map(|l| l.join().ok().flatten()).collect();
                    ui.print(&looked_at, |records| {
                        let lines: Vec<String> = records.iter().map(|r| describe_record(r, None)).collect();
                        if lines.is_empty() {
                            "no cluster is soaking".into()
                        } else {
                            lines.join("\n")
                        }
                    });
                    return Ok(());
                }
                if cancel.load(std::sync::atomic::Ordering::Relaxed) {
                    return Ok(());
                }
                std::thread::sleep(*interval);
            }
        }),
        Commands::Rollback { cluster, health_timeout } => finished(engine.rollback(cluster, *health_timeout), cluster),
        Commands::Finish { cluster, soak } => finished(engine.finish(cluster, *soak), cluster),
        Commands::Destroy { cluster } => finished(engine.destroy(cluster), cluster),
        Commands::Status { cluster } => {
            let status = engine.status(cluster).map_err(|e| Failure { code: e.exit_code(), message: e.to_string() })?;
            ui.print(&status, describe_status);
            Ok(())
        }
        Commands::Registry(_) | Commands::Console { .. } => unreachable!("handled before the engine is made"),
        Commands::Chaos(command) => chaos_command(cli, &engine, command, &ui),
        Commands::Clusters => {
            let clusters = engine.clusters().map_err(|e| Failure { code: e.exit_code(), message: e.to_string() })?;
            ui.print(&clusters, |c| if c.is_empty() { "no clusters".into() } else { c.join("\n") });
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn the_console_listens_on_loopback_unless_told_otherwise() {
        let cli = Cli::try_parse_from(["launcher", "console"]).unwrap();
        let Commands::Console { listen, auth_token_file } = cli.command else { panic!("not the console") };
        assert!(listen.ip().is_loopback(), "{listen}");
        assert!(auth_token_file.is_none());
    }
}

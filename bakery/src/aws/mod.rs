//! The `aws` provider: the official AWS SDK for Rust (EC2, EBS direct), the standard credential
//! chain, `AWS_REGION` and `AWS_ENDPOINT_URL` honoured.
//!
//! The provider is a composition ([`crate::provider`]): the [`registry::Ec2Registry`] and one of
//! two volume backends:
//! - **attach** ([`attach`], on an EC2 host, as Aminator does): a real EBS volume from the base
//!   snapshot, attached to this instance; the snapshot is taken by EC2.
//! - **direct** ([`direct`], any Linux host): the base snapshot's blocks are mirrored into the
//!   block store ([`mirror`], once per snapshot), the bake runs on a loop device, and only the
//!   blocks that differ from the base are uploaded into a child snapshot with the EBS direct APIs.

pub mod artifacts;
pub mod attach;
pub mod direct;
pub mod ebs;
pub mod ec2;
pub mod host;
pub mod mirror;
pub mod registry;
pub mod retry;
pub mod sweep;

use crate::provider::{ImageRegistry, Provider, VolumeBackend};
use aws_config::BehaviorVersion;
use aws_smithy_types::retry::RetryConfig;
use aws_smithy_types::timeout::TimeoutConfig;
use ebs::Ebs;
use ec2::Ec2;
use snafu::{OptionExt, ResultExt, Snafu};
use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

#[derive(Debug, Snafu)]
pub enum Error {
    #[snafu(display("no AWS region: pass --region or set AWS_REGION"))]
    NoRegion,

    #[snafu(display("attach mode bakes on an EC2 instance, and the instance metadata service (IMDSv2) did not answer; use --mode direct to bake from any host"))]
    NotOnEc2,

    #[snafu(display("starting the AWS runtime: {source}"))]
    Runtime { source: std::io::Error },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Attach,
    Direct,
}

/// Everything the `aws` provider is told on the command line.
#[derive(Default)]
pub struct Options {
    pub region: Option<String>,
    pub mode: Option<Mode>,
    pub kms_key: Option<String>,
    pub copy_to_regions: Vec<String>,
    pub share_with: Vec<String>,
    /// Where images' documents (manifest, SBOM, provenance) are stored, linked from their tags.
    pub artifact_bucket: Option<String>,
    /// gc leaves bake-tagged volumes and unfinished snapshots younger than this alone: they may
    /// belong to a bake running on another host.
    pub gc_older_than: Duration,
    /// Set on Ctrl-C: mirrors and waits stop at their next block or poll.
    pub cancel: Arc<AtomicBool>,
}

/// A runtime for the SDK's futures and the configuration every bakery client uses: the standard
/// chain for credentials and region (`--region` first), the SDK's own retries off (`retry::retry`
/// is the one layer), and timeouts on connecting, on each attempt and on each call.
pub fn sdk(region: Option<String>) -> std::result::Result<(tokio::runtime::Runtime, aws_config::SdkConfig), Error> {
    let runtime =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().context(RuntimeSnafu)?;
    let timeouts = TimeoutConfig::builder()
        .connect_timeout(Duration::from_secs(5))
        .operation_attempt_timeout(Duration::from_secs(60))
        .operation_timeout(Duration::from_secs(120))
        .build();
    let mut loader =
        aws_config::defaults(BehaviorVersion::latest()).retry_config(RetryConfig::disabled()).timeout_config(timeouts);
    if let Some(region) = region {
        loader = loader.region(aws_config::Region::new(region));
    }
    let config = runtime.block_on(loader.load());
    snafu::ensure!(config.region().is_some(), NoRegionSnafu);
    Ok((runtime, config))
}

/// `aws`: the EC2 registry and the volume backend of the mode in use.
pub struct AwsProvider {
    registry: registry::Ec2Registry,
    volumes: Box<dyn VolumeBackend>,
    mode: Mode,
}

/// EC2 as every bakery caller uses it: bakery's retry policy, waits of up to 30 minutes.
fn ec2(config: &aws_config::SdkConfig, cancel: Arc<AtomicBool>) -> Ec2 {
    let policy = retry::Policy::from_env();
    Ec2 { client: aws_sdk_ec2::Client::new(config), policy, timeout: Duration::from_secs(1800), cancel }
}

fn artifacts(config: &aws_config::SdkConfig, bucket: Option<String>) -> artifacts::Artifacts {
    use aws_sdk_s3::config::{RequestChecksumCalculation, ResponseChecksumValidation};
    // Path-style addressing and plain (not aws-chunked) uploads work with every endpoint,
    // S3-compatible stores and local stand-ins too; the documents are small and their digests
    // are in the image's tags anyway.
    let s3 = aws_sdk_s3::config::Builder::from(config)
        .force_path_style(true)
        .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
        .response_checksum_validation(ResponseChecksumValidation::WhenRequired)
        .build();
    artifacts::Artifacts { client: aws_sdk_s3::Client::from_conf(s3), policy: retry::Policy::from_env(), bucket }
}

/// The images alone (the console's view), with no volumes and nothing on this host.
pub fn image_registry(region: Option<String>) -> std::result::Result<registry::Ec2Registry, crate::provider::Error> {
    let (runtime, config) = sdk(region)?;
    let region = config.region().map(|r| r.to_string()).context(NoRegionSnafu)?;
    Ok(registry::Ec2Registry {
        ec2: ec2(&config, Arc::default()),
        runtime: Arc::new(runtime),
        artifacts: artifacts(&config, None),
        config,
        region,
        kms_key: None,
        copy_to_regions: Vec::new(),
        share_with: Vec::new(),
    })
}

impl AwsProvider {
    pub fn open(state_dir: &Path, options: Options) -> std::result::Result<AwsProvider, crate::provider::Error> {
        let (runtime, config) = sdk(options.region.clone())?;
        let runtime = Arc::new(runtime);
        let region = config.region().map(|r| r.to_string()).context(NoRegionSnafu)?;
        let ec2 = ec2(&config, options.cancel.clone());
        let policy = ec2.policy;
        let ebs = Ebs { client: aws_sdk_ebs::Client::new(&config), policy, concurrency: 32 };
        let host = match options.mode {
            Some(Mode::Direct) => None,
            _ => match host::metadata_endpoint() {
                Some(endpoint) => runtime.block_on(host::identify(&endpoint, Duration::from_secs(1))),
                None => None,
            },
        };
        let mode = options.mode.unwrap_or(if host.is_some() { Mode::Attach } else { Mode::Direct });
        let mirror = mirror::Mirror::open(state_dir, &region, ebs.clone(), runtime.clone(), options.cancel.clone())?;
        let uploader =
            mirror::Uploader { ebs, ec2: ec2.clone(), runtime: runtime.clone(), kms_key: options.kms_key.clone() };
        let sweep = sweep::Sweep {
            ec2: ec2.clone(),
            runtime: runtime.clone(),
            older_than: options.gc_older_than,
            host: host.clone(),
        };
        let volumes: Box<dyn VolumeBackend> = match mode {
            Mode::Direct => Box::new(direct::DirectVolumes { mirror, uploader, sweep }),
            Mode::Attach => {
                Box::new(attach::AttachedVolumes { host: host.context(NotOnEc2Snafu)?, mirror, uploader, sweep })
            }
        };
        tracing::debug!(%region, ?mode, "aws provider");
        let registry = registry::Ec2Registry {
            ec2,
            runtime,
            artifacts: artifacts(&config, options.artifact_bucket),
            config,
            region,
            kms_key: options.kms_key,
            copy_to_regions: options.copy_to_regions,
            share_with: options.share_with,
        };
        Ok(AwsProvider { registry, volumes, mode })
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    pub fn region(&self) -> &str {
        &self.registry.region
    }
}

impl Provider for AwsProvider {
    fn kind(&self) -> &'static str {
        "aws"
    }

    fn images(&self) -> &dyn ImageRegistry {
        &self.registry
    }

    fn volumes(&self) -> &dyn VolumeBackend {
        self.volumes.as_ref()
    }
}

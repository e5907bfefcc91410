//! The launcher: red/black deploys of baked images into Frigga-named clusters. Strategies only
//! plan; one engine executes plans against any [`cloud::Cloud`], so plans are tested with no cloud.

#[cfg(feature = "aws")]
pub mod aws;
pub mod chaos;
pub mod cloud;
pub mod cluster_config;
mod daemon;
pub mod engine;
pub mod haproxy;
pub mod latency;
pub mod local;
pub mod names;
pub mod plan;
pub mod registry;
#[cfg(test)]
pub(crate) mod sim;
pub mod soak;

/// Where the launcher's groups run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CloudKind {
    /// This host: nspawn instances behind HAProxy, state in `state_dir`.
    Local,
    /// Auto Scaling groups in `region`, deploy state in the DynamoDB table `state_table` (or
    /// the default one).
    Aws,
}

/// The launcher's view of a provider, as both CLIs (and the console) open it.
pub fn open_cloud(
    kind: CloudKind,
    state_dir: &std::path::Path,
    region: Option<String>,
    state_table: Option<String>,
) -> cloud::Result<Box<dyn cloud::Cloud>> {
    match kind {
        CloudKind::Local => Ok(Box::new(local::LocalCloud::open(state_dir)?)),
        #[cfg(feature = "aws")]
        CloudKind::Aws => {
            let aws = aws::AwsCloud::open(region)?;
            Ok(Box::new(match state_table {
                Some(table) => aws.with_state_table(table),
                None => aws,
            }))
        }
        #[cfg(not(feature = "aws"))]
        CloudKind::Aws => {
            let _ = (region, state_table);
            Err(crate::AWS_NOT_BUILT.into())
        }
    }
}

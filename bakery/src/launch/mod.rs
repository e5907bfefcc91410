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

//! The launcher: red/black deploys of baked images to clusters of instances behind a balancer.

pub mod cloud;
pub mod haproxy;
pub mod local;

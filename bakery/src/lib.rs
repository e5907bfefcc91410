//! Bakery: turn an application build into a machine image without booting an instance, and
//! (in `launcher`) deploy it as a red/black cluster.
//!
//! The library holds everything; the `bakery` and `launcher` binaries are thin command lines
//! over it. Where things go:
//! - a bake step: a file in [`bake`], run by the transaction runner ([`txn`]);
//! - a provider: an [`provider::ImageRegistry`] and a [`provider::VolumeBackend`] composed into
//!   a [`provider::Provider`] ([`local`], [`aws`]); volumes on this host come from [`blockstore`];
//! - a deploy strategy: a planner in [`launch::plan`], executed by [`launch::engine`] against a
//!   [`launch::cloud::Cloud`];
//! - progress: [`events`], rendered by [`ui`] for the command lines and streamed by the web
//!   [`console`], whose pages and API sit on the same calls as the command lines.
//!
//! Host plumbing (mounts, loop devices, chroots, confined file operations, waits) is private to
//! the library.

mod atomic;
#[cfg(feature = "aws")]
pub mod aws;
pub mod bake;
pub mod base;
pub mod blockstore;
mod chroot;
mod command;
pub mod console;
pub mod deb822;
pub mod dpkg;
pub mod events;
pub mod gc;
pub mod gpt;
pub mod ids;
pub mod instance;
pub mod journal;
pub mod launch;
pub mod local;
mod loopdev;
mod mounts;
pub mod package;
pub mod process;
pub mod provenance;
pub mod provider;
pub mod prune;
pub mod push;
pub mod recipe;
mod rootfs;
pub mod sbom;
pub mod tags;
pub mod txn;
pub mod ui;
pub mod verify;
mod wait;

/// What `--provider aws` says in a build without the `aws` feature (the quick start's).
#[cfg(not(feature = "aws"))]
pub const AWS_NOT_BUILT: &str =
    "this build has no aws provider: build with `cargo build --release --features aws` (scripts/test does)";

//! Bakery: turn an application build into a machine image without booting an instance, and
//! (in `launcher`) deploy it as a red/black cluster.
//!
//! The library holds everything; the `bakery` binary is a thin command line over it.

pub mod atomic;
pub mod bake;
pub mod base;
pub mod chroot;
pub mod command;
pub mod gc;
pub mod gpt;
pub mod ids;
pub mod instance;
pub mod journal;
pub mod launch;
pub mod local;
pub mod loopdev;
pub mod mounts;
pub mod package;
pub mod process;
pub mod provider;
pub mod recipe;
pub mod rootfs;
pub mod ui;
pub mod verify;

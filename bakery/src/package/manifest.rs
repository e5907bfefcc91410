//! What the manifest says of each installed entry.

use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum EntryKind {
    File,
    Dir,
    Symlink,
    Hardlink,
    /// Character or block device, or FIFO.
    Device,
}

/// One installed entry, as it ends up in the image.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
pub struct ManifestEntry {
    /// Absolute path in the image.
    pub path: String,
    pub kind: EntryKind,
    pub size: u64,
    /// Permission bits as installed (setuid, setgid and sticky are always cleared).
    pub mode: u32,
    /// Content digest, for regular files.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    /// Link target as stored in the package: a symlink's text, or a hard link's image path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

//! Crash-safe file replacement: readers see the old content or the new, never a torn write.

use serde::de::DeserializeOwned;
use serde::Serialize;
use std::fs::{self, File};
use std::io::Write;
use std::path::Path;

/// Writes `bytes` to a temporary file beside `path`, syncs it, and renames it over `path`.
pub fn write(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let tmp = dir.join(format!(".{name}.{}", crate::ids::new_id("tmp")));
    let result = (|| {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Removes the temporary files a writer of `path` that was killed mid-[`write`] left beside it.
/// Only for a path nobody writes any more (a dead bake's journal, under its lock).
pub fn remove_leftovers(path: &Path) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let prefix = format!(".{}.", path.file_name().unwrap_or_default().to_string_lossy());
    let entries = match fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        other => other?,
    };
    for entry in entries {
        let entry = entry?;
        if is_temporary(&entry.path()) && entry.file_name().to_string_lossy().starts_with(&prefix) {
            match fs::remove_file(entry.path()) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
    }
    Ok(())
}

/// Whether `path` is one of the temporary files [`write`] makes.
pub fn is_temporary(path: &Path) -> bool {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    name.starts_with('.') && name.rsplit_once('.').is_some_and(|(_, last)| crate::ids::is_id("tmp", last))
}

/// [`write`]s `value` as pretty JSON.
pub fn write_json<T: Serialize>(path: &Path, value: &T) -> std::io::Result<()> {
    write(path, &serde_json::to_vec_pretty(value).expect("state serialises"))
}

/// Reads a JSON file (written by [`write_json`]); None when there is none. A file that does not
/// parse is an `InvalidData` error.
pub fn read_json<T: DeserializeOwned>(path: &Path) -> std::io::Result<Option<T>> {
    match fs::read(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        other => Ok(Some(serde_json::from_slice(&other?)?)),
    }
}

//! Where a package comes from (a file, or an HTTP(S) URL such as a Jenkins artifact) and the
//! reader thread that pulls it in whole chunks, hashing and counting as it goes, into a bounded
//! channel the extractor reads from.

use super::{http, BadSidecarSnafu, HttpSnafu, OpenFileSnafu, ReadSidecarSnafu, Result};
use sha2::{Digest, Sha256};
use snafu::{OptionExt, ResultExt};
use std::fs::File;
use std::io::{self, BufRead, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender};

/// Unit of reading, hashing and writing: large enough for throughput, small enough that the
/// few chunks in flight stay well under the memory budget.
pub(super) const CHUNK_SIZE: usize = 256 * 1024;
/// Chunks queued between the reader thread and the extractor.
pub(super) const CHANNEL_DEPTH: usize = 4;
/// A checksum file holds one digest and a name; anything bigger is not one.
const SIDECAR_LIMIT: u64 = 64 * 1024;

/// An opened package, not yet read.
pub struct PackageSource {
    pub reader: Box<dyn Read + Send>,
    /// Size in bytes, when known up front (for progress bars).
    pub len: Option<u64>,
    /// The package's path or URL, for messages.
    pub display: String,
}

/// Opens a package given as a local path or an `http(s)://` URL (with the environment's or
/// netrc's credentials, see [`http`]).
pub fn open_source(spec: &str) -> Result<PackageSource> {
    if is_url(spec) {
        let (reader, len) = http::open(spec, http::Credentials::from_environment()).context(HttpSnafu)?;
        return Ok(PackageSource { reader, len, display: http::redacted(spec) });
    }
    let file = File::open(spec).context(OpenFileSnafu { path: spec })?;
    let metadata = file.metadata().context(OpenFileSnafu { path: spec })?;
    Ok(PackageSource {
        reader: Box::new(file),
        len: metadata.is_file().then_some(metadata.len()),
        display: spec.to_string(),
    })
}

/// The digest published beside a package as `<spec>.sha256` (as `sha256sum` writes it), in
/// lowercase; `None` when there is no such file.
pub fn sidecar_sha256(spec: &str) -> Result<Option<String>> {
    let path = format!("{spec}.sha256");
    let text = if is_url(spec) {
        match http::get_text(&path, &http::Credentials::from_environment(), SIDECAR_LIMIT).context(HttpSnafu)? {
            Some(text) => text,
            None => return Ok(None),
        }
    } else {
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).context(ReadSidecarSnafu { path }),
        };
        let mut text = String::new();
        file.take(SIDECAR_LIMIT).read_to_string(&mut text).context(ReadSidecarSnafu { path: &path })?;
        text
    };
    let shown = http::redacted(&path);
    let digest = text
        .split_whitespace()
        .next()
        .filter(|token| super::is_sha256(token))
        .context(BadSidecarSnafu { path: shown })?;
    Ok(Some(digest.to_ascii_lowercase()))
}

/// Whether a package is given as an `http(s)://` URL rather than a path.
pub fn is_url(spec: &str) -> bool {
    spec.starts_with("http://") || spec.starts_with("https://")
}

/// The reader thread: reads the raw package in chunks, hashing and counting it, until the end
/// of input, cancellation, or the extractor hanging up. Returns the digest and byte count.
pub(super) fn pump(
    mut reader: Box<dyn Read + Send>,
    sender: SyncSender<Vec<u8>>,
    cancel: &AtomicBool,
    progress: &(dyn Fn(u64) + Sync),
) -> io::Result<(String, u64)> {
    let mut hasher = Sha256::new();
    let mut total = 0;
    while !cancel.load(Ordering::Relaxed) {
        // Whole chunks even from a network stream that returns a few KiB per read.
        let mut chunk = Vec::with_capacity(CHUNK_SIZE);
        (&mut reader).take(CHUNK_SIZE as u64).read_to_end(&mut chunk)?;
        if chunk.is_empty() {
            break;
        }
        hasher.update(&chunk);
        total += chunk.len() as u64;
        progress(total);
        if sender.send(chunk).is_err() {
            // The extractor stopped; its error is the one to report.
            break;
        }
    }
    Ok((hex::encode(hasher.finalize()), total))
}

/// The extractor's view of the reader thread's chunks: a buffered reader that ends when the
/// reader thread does, and fails once `cancel` is set.
pub(super) struct Chunks<'a> {
    pub(super) receiver: Receiver<Vec<u8>>,
    pub(super) chunk: Vec<u8>,
    pub(super) pos: usize,
    pub(super) cancel: &'a AtomicBool,
}

impl BufRead for Chunks<'_> {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.pos == self.chunk.len() {
            if self.cancel.load(Ordering::Relaxed) {
                return Err(io::Error::other("cancelled"));
            }
            match self.receiver.recv() {
                Ok(chunk) => {
                    self.chunk = chunk;
                    self.pos = 0;
                }
                // The reader thread is done: end of input.
                Err(_) => break,
            }
        }
        Ok(&self.chunk[self.pos..])
    }

    fn consume(&mut self, amount: usize) {
        self.pos += amount;
    }
}

impl Read for Chunks<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let available = self.fill_buf()?;
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

//! Snapshot blocks over the EBS direct APIs: mirroring a snapshot into the local block store
//! (so a bake can run on a loop device on any Linux host) and uploading blocks into a new
//! snapshot, with a per-block SHA-256 and the LINEAR aggregate checksum EBS verifies.
//! Facts: docs.aws.amazon.com/ebs/latest/userguide/ebsapis-using-checksums.html.

use super::retry::{retry, retry_also, CallError, Policy};
use crate::blockstore::store::{SnapshotManifest, Store, BLOCK_SIZE};
use aws_sdk_ebs::types::{ChecksumAggregationMethod, ChecksumAlgorithm, Tag};
use aws_smithy_types::byte_stream::ByteStream;
use base64::Engine;
use sha2::{Digest, Sha256};
use snafu::{ensure, ResultExt, Snafu};
use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

#[derive(Debug, Snafu)]
pub enum Error {
    #[snafu(display("{source}"))]
    Call { source: CallError },

    #[snafu(display("snapshot {snapshot} reports {block_size}-byte blocks; EBS direct uses {BLOCK_SIZE}"))]
    BlockSize { snapshot: String, block_size: i64 },

    #[snafu(display("block {index} of {snapshot} failed its check after {attempts} attempts: {problem}"))]
    BadBlock { snapshot: String, index: u64, attempts: u32, problem: String },

    #[snafu(display("reading block {index} of {}: {source}", path.display()))]
    Read { index: u64, path: PathBuf, source: std::io::Error },

    #[snafu(display("storing block {index} of {snapshot}: {source}"))]
    Store { snapshot: String, index: u64, source: crate::blockstore::store::Error },

    #[snafu(display("saving the mirror of {snapshot}: {source}"))]
    SaveManifest { snapshot: String, source: crate::blockstore::store::Error },

    #[snafu(display("snapshot {snapshot} ended as {status}"))]
    Incomplete { snapshot: String, status: String },

    #[snafu(display("cancelled"))]
    Cancelled,

    #[snafu(display("a block transfer task failed: {source}"))]
    Task { source: tokio::task::JoinError },
}

pub type Result<T> = std::result::Result<T, Error>;

/// How long one block's body may take to arrive.
const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

fn checksum(data: &[u8]) -> ([u8; 32], String) {
    let digest: [u8; 32] = Sha256::digest(data).into();
    (digest, base64::engine::general_purpose::STANDARD.encode(digest))
}

/// base64(SHA-256(the raw digests of every uploaded block, in ascending block index)).
pub fn linear_aggregate(digests: &BTreeMap<u64, [u8; 32]>) -> String {
    let mut hasher = Sha256::new();
    for digest in digests.values() {
        hasher.update(digest);
    }
    base64::engine::general_purpose::STANDARD.encode(hasher.finalize())
}

/// Runs `work` on every item with at most `limit` in flight, handing each result to `done` as it
/// arrives; stops at the first error or when `cancel` is set (dropping the set aborts the rest).
async fn bounded<I, T, F, Fut>(
    items: impl IntoIterator<Item = I>,
    limit: usize,
    cancel: &AtomicBool,
    work: F,
    mut done: impl FnMut(T),
) -> Result<()>
where
    F: Fn(I) -> Fut,
    Fut: std::future::Future<Output = Result<T>> + Send + 'static,
    T: Send + 'static,
{
    let permits = Arc::new(Semaphore::new(limit));
    let mut tasks = JoinSet::new();
    for item in items {
        ensure!(!cancel.load(Ordering::Relaxed), CancelledSnafu);
        let permit = permits.clone().acquire_owned().await.expect("the semaphore is never closed");
        while let Some(result) = tasks.try_join_next() {
            done(result.context(TaskSnafu)??);
        }
        let future = work(item);
        tasks.spawn(async move {
            let _permit = permit;
            future.await
        });
    }
    while let Some(result) = tasks.join_next().await {
        done(result.context(TaskSnafu)??);
    }
    Ok(())
}

/// What a new snapshot is and where its blocks come from.
pub struct Upload {
    pub parent: Option<String>,
    pub volume_size: u64,
    pub description: String,
    /// Makes StartSnapshot idempotent when a retry repeats it.
    pub client_token: String,
    pub tags: BTreeMap<String, String>,
    pub kms_key: Option<String>,
    /// Blocks to send, read from `source`.
    pub blocks: Vec<u64>,
    /// Leave out blocks that read as zeros (a snapshot without a parent reads them as zeros anyway).
    pub skip_zero: bool,
}

#[derive(Debug, Clone)]
pub struct Uploaded {
    pub snapshot_id: String,
    pub blocks: u64,
    pub bytes: u64,
}

#[derive(Clone)]
pub struct Ebs {
    pub client: aws_sdk_ebs::Client,
    pub policy: Policy,
    /// Blocks in flight at once; each holds one 512 KiB buffer, so this bounds memory too.
    pub concurrency: usize,
}

impl Ebs {
    /// Starts a snapshot, uploads `upload.blocks` from `source` and completes it. On failure the
    /// started snapshot's id is returned with the error so the caller can delete it.
    pub async fn upload(
        &self,
        source: Arc<File>,
        path: PathBuf,
        upload: Upload,
        cancel: &AtomicBool,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> std::result::Result<Uploaded, (Option<String>, Error)> {
        let gib = upload.volume_size.div_ceil(1 << 30) as i64;
        let tags: Vec<Tag> = upload.tags.iter().map(|(k, v)| Tag::builder().key(k).value(v).build()).collect();
        let started = retry(self.policy, "StartSnapshot", || {
            self.client
                .start_snapshot()
                .volume_size(gib)
                .set_parent_snapshot_id(upload.parent.clone())
                .description(&upload.description)
                .client_token(&upload.client_token)
                .set_tags(Some(tags.clone()))
                .set_encrypted(upload.kms_key.as_ref().map(|_| true))
                .set_kms_key_arn(upload.kms_key.clone())
                .timeout(60)
                .send()
        })
        .await
        .context(CallSnafu)
        .map_err(|e| (None, e))?;
        let snapshot = started.snapshot_id().unwrap_or_default().to_string();
        let fail = |e: Error| (Some(snapshot.clone()), e);
        if let Some(size) = started.block_size().filter(|&s| s as usize != BLOCK_SIZE) {
            return Err(fail(Error::BlockSize { snapshot: snapshot.clone(), block_size: size.into() }));
        }

        let digests = self.put_blocks(&snapshot, source, path, &upload, cancel, progress).await.map_err(fail)?;
        let changed = digests.len() as i32;
        let completed = retry(self.policy, "CompleteSnapshot", || {
            self.client
                .complete_snapshot()
                .snapshot_id(&snapshot)
                .changed_blocks_count(changed)
                .checksum(linear_aggregate(&digests))
                .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
                .checksum_aggregation_method(ChecksumAggregationMethod::ChecksumAggregationLinear)
                .send()
        })
        .await
        .context(CallSnafu)
        .map_err(fail)?;
        let status = completed.status().map(|s| s.as_str().to_string()).unwrap_or_default();
        if status == "error" {
            return Err(fail(Error::Incomplete { snapshot: snapshot.clone(), status }));
        }
        Ok(Uploaded {
            snapshot_id: snapshot,
            blocks: digests.len() as u64,
            bytes: digests.len() as u64 * BLOCK_SIZE as u64,
        })
    }

    async fn put_blocks(
        &self,
        snapshot: &str,
        source: Arc<File>,
        path: PathBuf,
        upload: &Upload,
        cancel: &AtomicBool,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<BTreeMap<u64, [u8; 32]>> {
        let mut digests = BTreeMap::new();
        let total = upload.blocks.len() as u64;
        let mut finished = 0;
        let work = |index: u64| {
            let (this, snapshot, source, path, skip_zero) =
                (self.clone(), snapshot.to_string(), source.clone(), path.clone(), upload.skip_zero);
            async move {
                let (data, skip) = tokio::task::spawn_blocking(move || {
                    let mut data = vec![0u8; BLOCK_SIZE];
                    source.read_exact_at(&mut data, index * BLOCK_SIZE as u64).context(ReadSnafu { index, path })?;
                    let skip = skip_zero && data.iter().all(|&b| b == 0);
                    Ok::<_, Error>((data, skip))
                })
                .await
                .context(TaskSnafu)??;
                if skip {
                    return Ok(None);
                }
                this.put_block(&snapshot, index, data).await.map(Some)
            }
        };
        bounded(upload.blocks.iter().copied(), self.concurrency, cancel, work, |uploaded| {
            digests.extend(uploaded);
            finished += 1;
            progress(finished, total);
        })
        .await?;
        Ok(digests)
    }

    async fn put_block(&self, snapshot: &str, index: u64, data: Vec<u8>) -> Result<(u64, [u8; 32])> {
        let (digest, encoded) = checksum(&data);
        let data = bytes::Bytes::from(data);
        // Right after StartSnapshot, EBS may not know the snapshot yet.
        retry_also(self.policy, "PutSnapshotBlock", &["ResourceNotFoundException"], || {
            self.client
                .put_snapshot_block()
                .snapshot_id(snapshot)
                .block_index(index as i32)
                .block_data(ByteStream::from(data.clone()))
                .data_length(BLOCK_SIZE as i32)
                .checksum(&encoded)
                .checksum_algorithm(ChecksumAlgorithm::ChecksumAlgorithmSha256)
                .send()
        })
        .await
        .map_err(|source| Error::BadBlock {
            snapshot: snapshot.to_string(),
            index,
            attempts: source.attempts,
            problem: source.to_string(),
        })?;
        Ok((index, digest))
    }

    /// Copies every block of `snapshot` into `store` and returns its manifest (saved under the
    /// snapshot's own id, so the next bake from it downloads nothing). Each block's length and
    /// checksum are verified; a block that fails is fetched again.
    pub async fn mirror(
        &self,
        store: &Store,
        snapshot: &str,
        cancel: &AtomicBool,
        progress: &(dyn Fn(u64, u64) + Sync),
    ) -> Result<SnapshotManifest> {
        let mut listed = Vec::new();
        let mut next_token = None;
        let mut volume_size = 0;
        loop {
            let page = retry(self.policy, "ListSnapshotBlocks", || {
                self.client
                    .list_snapshot_blocks()
                    .snapshot_id(snapshot)
                    .max_results(10_000)
                    .set_next_token(next_token.clone())
                    .send()
            })
            .await
            .context(CallSnafu)?;
            if let Some(size) = page.block_size().filter(|&s| s as usize != BLOCK_SIZE) {
                return BlockSizeSnafu { snapshot, block_size: i64::from(size) }.fail();
            }
            volume_size = page.volume_size().unwrap_or(volume_size);
            for block in page.blocks() {
                if let (Some(index), Some(token)) = (block.block_index(), block.block_token()) {
                    listed.push((index as u64, token.to_string()));
                }
            }
            next_token = page.next_token().map(str::to_string);
            if next_token.is_none() {
                break;
            }
        }

        let mut blocks = BTreeMap::new();
        let total = listed.len() as u64;
        let mut finished = 0;
        let work = |(index, token): (u64, String)| {
            let (this, store, snapshot) = (self.clone(), store.clone(), snapshot.to_string());
            async move {
                let data = this.get_block(&snapshot, index, &token).await?;
                tokio::task::spawn_blocking(move || {
                    // A manifest leaves zero blocks out, as a volume's snapshot would.
                    if data.iter().all(|&b| b == 0) {
                        return Ok(None);
                    }
                    let hash = hex::encode(Sha256::digest(&data));
                    store.put_block(&hash, &data).context(StoreSnafu { snapshot, index })?;
                    Ok(Some((index, hash)))
                })
                .await
                .context(TaskSnafu)?
            }
        };
        bounded(listed, self.concurrency, cancel, work, |stored| {
            blocks.extend(stored);
            finished += 1;
            progress(finished, total);
        })
        .await?;
        let manifest = SnapshotManifest {
            id: snapshot.to_string(),
            parent: None,
            volume_size: volume_size as u64 * (1 << 30),
            block_size: BLOCK_SIZE,
            created: crate::ids::now_rfc3339(),
            description: format!("mirror of EBS snapshot {snapshot}"),
            changed_blocks: blocks.len() as u64,
            stored_bytes: 0,
            tags: BTreeMap::new(),
            blocks,
        };
        store.save_snapshot(&manifest).context(SaveManifestSnafu { snapshot })?;
        Ok(manifest)
    }

    /// One block, checked against its length and checksum; transfer errors and corrupt blocks
    /// are retried under the same policy as every call.
    async fn get_block(&self, snapshot: &str, index: u64, token: &str) -> Result<Vec<u8>> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let problem = match self.fetch_block(snapshot, index, token).await {
                Ok(data) => return Ok(data),
                Err(problem) => problem,
            };
            if attempt >= self.policy.attempts {
                return BadBlockSnafu { snapshot, index, attempts: attempt, problem }.fail();
            }
            tracing::debug!(snapshot, index, attempt, %problem, "fetching the block again");
            tokio::time::sleep(self.policy.delay(attempt)).await;
        }
    }

    async fn fetch_block(&self, snapshot: &str, index: u64, token: &str) -> std::result::Result<Vec<u8>, String> {
        let once = Policy { attempts: 1, ..self.policy };
        let output = retry(once, "GetSnapshotBlock", || {
            self.client.get_snapshot_block().snapshot_id(snapshot).block_index(index as i32).block_token(token).send()
        })
        .await
        .map_err(|e| e.to_string())?;
        let expected = output.checksum().map(str::to_string);
        let length = output.data_length();
        // The SDK's timeouts end with the response headers; a body that stalls needs its own.
        let body = tokio::time::timeout(BODY_TIMEOUT, output.block_data.collect())
            .await
            .map_err(|_| format!("the block's body did not arrive within {BODY_TIMEOUT:?}"))?;
        let data = body.map_err(|e| format!("reading the block: {e}"))?.to_vec();
        if data.len() != BLOCK_SIZE || length.is_some_and(|l| l as usize != data.len()) {
            return Err(format!("{} bytes received, {length:?} announced, {BLOCK_SIZE} expected", data.len()));
        }
        let (_, actual) = checksum(&data);
        match expected {
            Some(expected) if expected == actual => Ok(data),
            Some(expected) => Err(format!("checksum {actual} does not match the announced {expected}")),
            None => Err("no checksum in the response".to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_linear_aggregate_hashes_raw_digests_in_block_order() {
        let first: [u8; 32] = Sha256::digest(b"first").into();
        let second: [u8; 32] = Sha256::digest(b"second").into();
        let digests = BTreeMap::from([(7, second), (2, first)]);
        let mut concatenated = first.to_vec();
        concatenated.extend_from_slice(&second);
        let expected = base64::engine::general_purpose::STANDARD.encode(Sha256::digest(&concatenated));
        assert_eq!(linear_aggregate(&digests), expected);
    }
}

//! The deploy lock and the deploy record, kept in launch template tags.
//!
//! **Lock.** A launch template `bakery-lock-<cluster>`: CreateLaunchTemplate fails atomically
//! when the name exists. The holder is written with it (tags in the same request), renewed by
//! re-tagging it *by id*, and a stale one is deleted *by id* before creating anew, so two
//! runs taking over the same stale lock cannot delete each other's fresh one.
//!
//! **Deploy record.** JSON, base64, in 256-character chunks as tags of a launch template
//! `bakery-deploys-<cluster>` that is never launched: written in one CreateTags call (with the
//! chunk count), read with DescribeTags. Launch-template versions were the other candidate, but
//! versions pile up with every step and moto cannot delete them.

use super::*;

impl AwsCloud {
    pub(super) async fn acquire(&self, cluster: &str, holder: &LockHolder) -> Result<Option<LockHolder>> {
        let name = format!("bakery-lock-{cluster}");
        let tags = to_tags(LOCK_TAG, holder, "the lock holder")?;
        for _ in 0..5 {
            if self.create_template(&name, RequestLaunchTemplateData::builder().build(), &tags).await? {
                return Ok(None);
            }
            // Taken: by us (renew), by a live run (refuse) or by a dead one (take over).
            let Some((id, _)) = self.template_id(&name).await? else { continue };
            let current: Option<LockHolder> = from_tags(LOCK_TAG, &self.template_tags(&id).await?, &name)?;
            match current {
                Some(current) if current.deploy_id == holder.deploy_id => match self.tag_template(&id, &tags).await {
                    // Taken over since: the next round sees the new holder.
                    Err(e) if e.is_not_found() => continue,
                    other => return other.map(|_| None).context(CallSnafu),
                },
                Some(current) if !current.is_stale_here(now()) => return Ok(Some(current)),
                Some(_) => self.delete_template(Some(&id), None).await?,
                // Tags may lag a moment behind a template just created by another run.
                None => tokio::time::sleep(Duration::from_secs(1)).await,
            }
        }
        UnsettledSnafu { name }.fail()
    }

    pub(super) async fn release(&self, cluster: &str, deploy_id: &str) -> Result<()> {
        let Some((id, current)) = self.lock_template(cluster).await? else { return Ok(()) };
        if current.is_some_and(|h| h.deploy_id == deploy_id) {
            self.delete_template(Some(&id), None).await?;
        }
        Ok(())
    }

    /// Who the lock template names, live or not.
    pub(super) async fn holder(&self, cluster: &str) -> Result<Option<LockHolder>> {
        Ok(self.lock_template(cluster).await?.and_then(|(_, holder)| holder))
    }

    /// The lock template's id and the holder its tags name.
    async fn lock_template(&self, cluster: &str) -> Result<Option<(String, Option<LockHolder>)>> {
        let name = format!("bakery-lock-{cluster}");
        let Some((id, _)) = self.template_id(&name).await? else { return Ok(None) };
        let holder = from_tags(LOCK_TAG, &self.template_tags(&id).await?, &name)?;
        Ok(Some((id, holder)))
    }

    pub(super) async fn save(&self, record: &DeployRecord) -> Result<()> {
        let name = format!("bakery-deploys-{}", record.cluster);
        let tags = to_tags(RECORD_TAG, record, "the deploy record")?;
        for _ in 0..3 {
            match self.template_id(&name).await? {
                Some((id, _)) => match self.tag_template(&id, &tags).await {
                    Err(e) if e.is_not_found() => continue,
                    other => return other.context(CallSnafu),
                },
                None if self.create_template(&name, RequestLaunchTemplateData::builder().build(), &tags).await? => {
                    return Ok(())
                }
                None => continue,
            }
        }
        UnsettledSnafu { name }.fail()
    }

    pub(super) async fn load(&self, cluster: &str) -> Result<Option<DeployRecord>> {
        let name = format!("bakery-deploys-{cluster}");
        let Some((id, _)) = self.template_id(&name).await? else { return Ok(None) };
        from_tags(RECORD_TAG, &self.template_tags(&id).await?, &name)
    }
}

pub(super) fn to_tags<T: Serialize>(prefix: &str, value: &T, what: &str) -> Result<Vec<(String, String)>> {
    let json = serde_json::to_vec(value).expect("serialisable");
    let encoded = base64::engine::general_purpose::STANDARD.encode(json);
    let chunks: Vec<&str> =
        encoded.as_bytes().chunks(TAG_VALUE_MAX).map(|c| std::str::from_utf8(c).expect("base64")).collect();
    snafu::ensure!(chunks.len() <= MAX_CHUNKS, TooLargeSnafu { what, chars: encoded.len() });
    let mut tags = vec![(prefix.to_string(), chunks.len().to_string())];
    tags.extend(chunks.iter().enumerate().map(|(i, chunk)| (format!("{prefix}-{i:02}"), chunk.to_string())));
    Ok(tags)
}

pub(super) fn from_tags<T: DeserializeOwned>(
    prefix: &str,
    tags: &BTreeMap<String, String>,
    resource: &str,
) -> Result<Option<T>> {
    let Some(count) = tags.get(prefix) else { return Ok(None) };
    let corrupt = |reason: String| Error::Corrupt { what: prefix.to_string(), resource: resource.to_string(), reason };
    let count: usize = count.parse().map_err(|_| corrupt(format!("chunk count {count:?}")))?;
    let mut encoded = String::new();
    for i in 0..count {
        encoded += tags.get(&format!("{prefix}-{i:02}")).ok_or_else(|| corrupt(format!("chunk {i} is missing")))?;
    }
    let json = base64::engine::general_purpose::STANDARD.decode(encoded).map_err(|e| corrupt(e.to_string()))?;
    serde_json::from_slice(&json).map(Some).map_err(|e| corrupt(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_through_tag_chunks() {
        let holder = LockHolder {
            deploy_id: "1700000000000-42-0".into(),
            owner: "ann".into(),
            host: "h".repeat(300),
            pid: 42,
            start_time: 7,
            expires: 1_700_000_900,
        };
        let tags: BTreeMap<String, String> = to_tags(LOCK_TAG, &holder, "holder").unwrap().into_iter().collect();
        assert!(tags.len() > 2 && tags.values().all(|v| v.len() <= TAG_VALUE_MAX), "{tags:?}");
        assert_eq!(from_tags::<LockHolder>(LOCK_TAG, &tags, "t").unwrap(), Some(holder));
        assert_eq!(from_tags::<LockHolder>(LOCK_TAG, &BTreeMap::new(), "t").unwrap(), None);
        let mut torn = tags.clone();
        torn.remove(&format!("{LOCK_TAG}-01"));
        assert!(from_tags::<LockHolder>(LOCK_TAG, &torn, "t").unwrap_err().to_string().contains("chunk 1 is missing"));
        let huge = "x".repeat(MAX_CHUNKS * TAG_VALUE_MAX);
        assert!(matches!(to_tags(RECORD_TAG, &huge, "record"), Err(Error::TooLarge { .. })));
    }
}

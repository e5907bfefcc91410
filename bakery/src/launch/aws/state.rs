//! The deploy lock and every deploy record (and Chaos Monkey's items, [`super::chaos_state`]), in
//! a DynamoDB table (`bakery-launcher` unless
//! `--state-table` names another), created on the first write (on-demand capacity); reads of a
//! missing table find nothing.
//!
//! Items are keyed by `cluster` and `key`:
//! - `lock`: the holder (JSON) with its `deploy_id` and `expires`. Taken with a conditional put
//!   that succeeds when there is none or it is already ours, so a retry whose first reply was
//!   lost finds it ours; a stale holder is replaced by a put conditioned on *its* deploy id and
//!   expiry, so two runs taking over the same stale lock cannot both win, nor one take a lock
//!   its holder has just renewed; released by a delete
//!   conditioned on our deploy id.
//! - `deploy/<started>/<deploy id>`: one record per launcher run, rewritten after every step
//!   with a put conditioned on not going back in time (`updated`), read newest first.
//!
//! Clusters deployed before the table existed kept their last record base64-chunked in the tags
//! of a launch template `bakery-deploys-<cluster>`: read once, written to the table, deleted.
//! An older launcher locks a cluster with a launch template `bakery-lock-<cluster>` (its holder
//! in the same kind of tags): while that holder lives, the lock is not taken here either.

use super::*;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType, TableStatus,
};
use std::collections::HashMap;

/// The table's name when none is given.
pub const DEFAULT_TABLE: &str = "bakery-launcher";
const LOCK_KEY: &str = "lock";
const RECORD_PREFIX: &str = "deploy/";
/// The most records `history` returns.
const HISTORY: usize = 200;
/// The old home of a cluster's record.
const RECORD_TAG: &str = "bakery:deploy-record";
/// The old home of a cluster's lock holder (on a launch template `bakery-lock-<cluster>`).
const OLD_LOCK_TAG: &str = "bakery:lock";

pub(super) type Item = HashMap<String, AttributeValue>;

pub(super) fn s(value: impl Into<String>) -> AttributeValue {
    AttributeValue::S(value.into())
}

fn n(value: u64) -> AttributeValue {
    AttributeValue::N(value.to_string())
}

/// The item at `cluster` and `key`, with these attributes.
pub(super) fn item(cluster: &str, key: impl Into<String>, attributes: Vec<(&str, AttributeValue)>) -> Item {
    let mut item = Item::from([("cluster".to_string(), s(cluster)), ("key".to_string(), s(key))]);
    item.extend(attributes.into_iter().map(|(name, value)| (name.to_string(), value)));
    item
}

pub(super) fn text<'a>(item: &'a Item, name: &str) -> Option<&'a str> {
    item.get(name).and_then(|v| v.as_s().ok()).map(String::as_str)
}

fn conditional_failed(error: &CallError) -> bool {
    error.code.as_deref() == Some("ConditionalCheckFailedException")
}

impl AwsCloud {
    /// Whether the table is there and active, after creating it when it is missing and a write
    /// needs it (reads of a missing table find nothing: a read-only caller need not be allowed
    /// to create it). Known once per process.
    async fn table(&self, create: bool) -> Result<bool> {
        if self.table_ready.initialized() {
            return Ok(true);
        }
        let described =
            retry(self.policy, "DescribeTable", || self.dynamodb.describe_table().table_name(&self.state_table).send())
                .await;
        match described {
            Err(e) if e.is_not_found() && !create => return Ok(false),
            Err(e) if e.is_not_found() => self.create_table().await?,
            other => {
                other.context(CallSnafu)?;
            }
        }
        wait_for(&format!("DynamoDB table {} active", self.state_table), WAIT, || async {
            let call = |source| ec2_calls::Error::Call { source };
            let output = retry(self.policy, "DescribeTable", || {
                self.dynamodb.describe_table().table_name(&self.state_table).send()
            })
            .await
            .map_err(call)?;
            let status = output.table().and_then(|t| t.table_status());
            Ok((status == Some(&TableStatus::Active)).then_some(()))
        })
        .await
        .context(WaitSnafu)?;
        let _ = self.table_ready.set(());
        Ok(true)
    }

    async fn create_table(&self) -> Result<()> {
        let attribute = |name: &str| {
            AttributeDefinition::builder().attribute_name(name).attribute_type(ScalarAttributeType::S).build()
        };
        let key = |name: &str, kind: KeyType| KeySchemaElement::builder().attribute_name(name).key_type(kind).build();
        let created = retry(self.policy, "CreateTable", || {
            self.dynamodb
                .create_table()
                .table_name(&self.state_table)
                .attribute_definitions(attribute("cluster").expect("complete"))
                .attribute_definitions(attribute("key").expect("complete"))
                .key_schema(key("cluster", KeyType::Hash).expect("complete"))
                .key_schema(key("key", KeyType::Range).expect("complete"))
                .billing_mode(BillingMode::PayPerRequest)
                .send()
        })
        .await;
        match created {
            // Another launcher made it first (or a lost reply's first attempt did).
            Err(e) if e.code.as_deref() == Some("ResourceInUseException") => Ok(()),
            other => other.map(|_| ()).context(CallSnafu),
        }
    }

    pub(super) async fn get(&self, cluster: &str, key: &str) -> Result<Option<Item>> {
        if !self.table(false).await? {
            return Ok(None);
        }
        let table = &self.state_table;
        let output = retry(self.policy, "GetItem", || {
            self.dynamodb
                .get_item()
                .table_name(table)
                .key("cluster", s(cluster))
                .key("key", s(key))
                .consistent_read(true)
                .send()
        })
        .await
        .context(CallSnafu)?;
        Ok(output.item().cloned())
    }

    /// Puts `item`, if `condition` (an expression and its values) holds when there is one;
    /// Ok(false) when it does not.
    pub(super) async fn put(&self, item: Item, condition: Option<(&str, Item)>) -> Result<bool> {
        self.table(true).await?;
        let table = &self.state_table;
        let (expression, values) = condition.unzip();
        let names =
            expression.filter(|e| e.contains("#key")).map(|_| HashMap::from([("#key".to_string(), "key".to_string())]));
        let put = retry(self.policy, "PutItem", || {
            self.dynamodb
                .put_item()
                .table_name(table)
                .set_item(Some(item.clone()))
                .set_condition_expression(expression.map(str::to_string))
                .set_expression_attribute_names(names.clone())
                .set_expression_attribute_values(values.clone())
                .send()
        })
        .await;
        match put {
            Err(e) if conditional_failed(&e) => Ok(false),
            other => other.map(|_| true).context(CallSnafu),
        }
    }

    pub(super) async fn acquire(&self, cluster: &str, holder: &LockHolder) -> Result<Option<LockHolder>> {
        if let Some(older) = self.older_launchers_lock(cluster).await? {
            return Ok(Some(older));
        }
        let item = item(
            cluster,
            LOCK_KEY,
            vec![
                ("deploy_id", s(&holder.deploy_id)),
                ("holder", s(serde_json::to_string(holder).expect("serialisable"))),
                ("expires", n(holder.expires)),
            ],
        );
        let mine = Item::from([(":me".to_string(), s(&holder.deploy_id))]);
        for _ in 0..5 {
            if self.put(item.clone(), Some(("attribute_not_exists(#key) OR deploy_id = :me", mine.clone()))).await? {
                return Ok(None);
            }
            // Held by another run: live (refuse) or dead (take it over from exactly that one).
            let Some(current) = self.holder(cluster).await? else { continue };
            if !current.is_stale_here(now()) {
                return Ok(Some(current));
            }
            // Exactly the stale holding read: not one its holder renewed since.
            let theirs = Item::from([
                (":theirs".to_string(), s(&current.deploy_id)),
                (":expires".to_string(), n(current.expires)),
            ]);
            if self.put(item.clone(), Some(("deploy_id = :theirs AND expires = :expires", theirs))).await? {
                return Ok(None);
            }
        }
        UnsettledSnafu { name: format!("{} lock of {cluster}", self.state_table) }.fail()
    }

    pub(super) async fn release(&self, cluster: &str, deploy_id: &str) -> Result<()> {
        // Not ours (taken over), or already gone: nothing to do.
        let mine = Item::from([(":me".to_string(), s(deploy_id))]);
        self.delete(cluster, LOCK_KEY, Some(("deploy_id = :me", mine))).await?;
        Ok(())
    }

    /// Adds one to the `count` of an item while it is below `limit`; Ok(false) at the limit.
    pub(super) async fn count_up(&self, cluster: &str, key: &str, limit: u32) -> Result<bool> {
        self.table(true).await?;
        let table = &self.state_table;
        let added = retry(self.policy, "UpdateItem", || {
            self.dynamodb
                .update_item()
                .table_name(table)
                .key("cluster", s(cluster))
                .key("key", s(key))
                .update_expression("ADD #count :one")
                .condition_expression("attribute_not_exists(#count) OR #count < :limit")
                .expression_attribute_names("#count", "count")
                .expression_attribute_values(":one", n(1))
                .expression_attribute_values(":limit", n(limit.into()))
                .send()
        })
        .await;
        match added {
            Err(e) if conditional_failed(&e) => Ok(false),
            other => other.map(|_| true).context(CallSnafu),
        }
    }

    /// Deletes an item, if `condition` holds when there is one; Ok(false) when it does not.
    pub(super) async fn delete(&self, cluster: &str, key: &str, condition: Option<(&str, Item)>) -> Result<bool> {
        if !self.table(false).await? {
            return Ok(false);
        }
        let table = &self.state_table;
        let (expression, values) = condition.unzip();
        let deleted = retry(self.policy, "DeleteItem", || {
            self.dynamodb
                .delete_item()
                .table_name(table)
                .key("cluster", s(cluster))
                .key("key", s(key))
                .set_condition_expression(expression.map(str::to_string))
                .set_expression_attribute_values(values.clone())
                .send()
        })
        .await;
        match deleted {
            Err(e) if conditional_failed(&e) => Ok(false),
            other => other.map(|_| true).context(CallSnafu),
        }
    }

    /// Who the lock item names, live or not.
    pub(super) async fn holder(&self, cluster: &str) -> Result<Option<LockHolder>> {
        let Some(item) = self.get(cluster, LOCK_KEY).await? else { return Ok(None) };
        Ok(Some(self.parse(&item, "holder", "the lock holder")?))
    }

    pub(super) async fn save(&self, record: &DeployRecord) -> Result<()> {
        let key = format!("{RECORD_PREFIX}{:012}/{}", record.started, record.deploy_id);
        let item = item(
            &record.cluster,
            key,
            vec![
                ("deploy_id", s(&record.deploy_id)),
                ("record", s(serde_json::to_string(record).expect("serialisable"))),
                ("updated", n(record.updated)),
            ],
        );
        let updated = Item::from([(":updated".to_string(), n(record.updated))]);
        // A save that lost the race with a later step's changes nothing.
        self.put(item, Some(("attribute_not_exists(#key) OR updated <= :updated", updated))).await?;
        Ok(())
    }

    pub(super) async fn load(&self, cluster: &str) -> Result<Option<DeployRecord>> {
        Ok(self.records(cluster, 1).await?.into_iter().next())
    }

    pub(super) async fn history_of(&self, cluster: &str) -> Result<Vec<DeployRecord>> {
        self.records(cluster, HISTORY).await
    }

    /// The newest `limit` records of the cluster, newest first; an old cluster's record in
    /// launch template tags is moved into the table the first time it is looked for.
    async fn records(&self, cluster: &str, limit: usize) -> Result<Vec<DeployRecord>> {
        let items = self.query(cluster, RECORD_PREFIX, true, Some(limit)).await?;
        let mut records =
            items.iter().map(|item| self.parse(item, "record", "a deploy record")).collect::<Result<Vec<_>>>()?;
        if records.is_empty() {
            records.extend(self.migrate(cluster).await?);
        }
        Ok(records)
    }

    /// The JSON in `item`'s attribute `name`.
    pub(super) fn parse<T: DeserializeOwned>(&self, item: &Item, name: &str, what: &str) -> Result<T> {
        serde_json::from_str(text(item, name).unwrap_or_default()).map_err(|e| Error::Corrupt {
            what: what.into(),
            resource: format!(
                "{} item {}/{}",
                self.state_table,
                text(item, "cluster").unwrap_or_default(),
                text(item, "key").unwrap_or_default()
            ),
            reason: e.to_string(),
        })
    }

    /// The cluster's items whose key starts with `prefix`, in key order (or the reverse), at
    /// most `limit`.
    pub(super) async fn query(
        &self,
        cluster: &str,
        prefix: &str,
        newest_first: bool,
        limit: Option<usize>,
    ) -> Result<Vec<Item>> {
        if !self.table(false).await? {
            return Ok(Vec::new());
        }
        let table = &self.state_table;
        let mut items = paged(limit, |start| async move {
            let page = retry(self.policy, "Query", || {
                self.dynamodb
                    .query()
                    .table_name(table)
                    .key_condition_expression("#cluster = :cluster AND begins_with(#key, :prefix)")
                    .expression_attribute_names("#cluster", "cluster")
                    .expression_attribute_names("#key", "key")
                    .expression_attribute_values(":cluster", s(cluster))
                    .expression_attribute_values(":prefix", s(prefix))
                    .scan_index_forward(!newest_first)
                    .consistent_read(true)
                    .set_limit(limit.map(|l| l.min(100) as i32))
                    .set_exclusive_start_key(start.clone())
                    .send()
            })
            .await
            .context(CallSnafu)?;
            Ok((page.items().to_vec(), page.last_evaluated_key().cloned()))
        })
        .await?;
        items.truncate(limit.unwrap_or(usize::MAX));
        Ok(items)
    }

    /// Every cluster's items whose key starts with `prefix`.
    pub(super) async fn scan(&self, prefix: &str) -> Result<Vec<Item>> {
        if !self.table(false).await? {
            return Ok(Vec::new());
        }
        let table = &self.state_table;
        paged(None, |start| async move {
            let page = retry(self.policy, "Scan", || {
                self.dynamodb
                    .scan()
                    .table_name(table)
                    .filter_expression("begins_with(#key, :prefix)")
                    .expression_attribute_names("#key", "key")
                    .expression_attribute_values(":prefix", s(prefix))
                    .consistent_read(true)
                    .set_exclusive_start_key(start.clone())
                    .send()
            })
            .await
            .context(CallSnafu)?;
            Ok((page.items().to_vec(), page.last_evaluated_key().cloned()))
        })
        .await
    }

    /// The live holder of the lock an older launcher takes in a launch template (it cannot see
    /// the table's, but this one sees its): a run of it is waited for like any other, and a
    /// dead one's template is deleted. A template with no holder (yet) is left alone.
    async fn older_launchers_lock(&self, cluster: &str) -> Result<Option<LockHolder>> {
        let name = format!("bakery-lock-{cluster}");
        let Some((id, _)) = self.template_id(&name).await? else { return Ok(None) };
        let holder: Option<LockHolder> = from_tags(OLD_LOCK_TAG, &self.template_tags(&id).await?, &name)?;
        match holder {
            Some(stale) if stale.is_stale_here(now()) => {
                self.delete_template(Some(&id), None).await?;
                Ok(None)
            }
            live => Ok(live),
        }
    }

    /// The record a cluster kept in launch template tags before the table, moved into it.
    async fn migrate(&self, cluster: &str) -> Result<Option<DeployRecord>> {
        let name = format!("bakery-deploys-{cluster}");
        let Some((id, _)) = self.template_id(&name).await? else { return Ok(None) };
        let record: Option<DeployRecord> = from_tags(RECORD_TAG, &self.template_tags(&id).await?, &name)?;
        if let Some(record) = &record {
            self.save(record).await?;
        }
        self.delete_template(Some(&id), None).await?;
        Ok(record)
    }
}

/// `prefix`'s value from base64 JSON cut into tag-sized chunks under `prefix-NN`, with the
/// count under `prefix` (how records were kept in tags).
fn from_tags<T: DeserializeOwned>(prefix: &str, tags: &BTreeMap<String, String>, resource: &str) -> Result<Option<T>> {
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
    fn an_old_record_is_read_from_its_tag_chunks() {
        let encoded = base64::engine::general_purpose::STANDARD.encode(br#"{"a":1}"#);
        let (first, second) = encoded.split_at(4);
        let mut tags = BTreeMap::from([
            (RECORD_TAG.to_string(), "2".to_string()),
            (format!("{RECORD_TAG}-00"), first.to_string()),
            (format!("{RECORD_TAG}-01"), second.to_string()),
        ]);
        let value: Option<serde_json::Value> = from_tags(RECORD_TAG, &tags, "t").unwrap();
        assert_eq!(value, Some(serde_json::json!({"a": 1})));
        assert_eq!(from_tags::<serde_json::Value>(RECORD_TAG, &BTreeMap::new(), "t").unwrap(), None);
        tags.remove(&format!("{RECORD_TAG}-01"));
        let torn = from_tags::<serde_json::Value>(RECORD_TAG, &tags, "t").unwrap_err();
        assert!(torn.to_string().contains("chunk 1 is missing"), "{torn}");
    }
}

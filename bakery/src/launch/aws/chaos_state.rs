//! Chaos Monkey's consent and audit log on aws: items of the launcher's DynamoDB table, beside
//! the deploy lock and records, so that monkeys on any host share one consent and one log (and
//! the daily limit counts every host's kills). A cluster's consent is its `chaos` item; each
//! action is an `audit/<time>/<instance>/<monkey>` item, so a log entry written twice (a retry
//! after a lost reply) is still one entry; the scheduler takes each kill from a day's
//! `kills/<midnight>` counter with a conditional add, so hosts together keep to `max_per_day`.

use super::state::{item, s, text};
use super::*;
use crate::launch::chaos::{self, AuditEntry, ChaosStore, Config};

const CONSENT_KEY: &str = "chaos";
const AUDIT_PREFIX: &str = "audit/";
/// `kills/<local midnight>`: the scheduler's kills of a cluster that day, by every host.
const KILLS_PREFIX: &str = "kills/";

/// The aws cloud's table as a [`ChaosStore`].
pub struct TableChaos<'a> {
    pub(super) cloud: &'a AwsCloud,
}

impl TableChaos<'_> {
    fn run<T>(&self, future: impl std::future::Future<Output = Result<T>>) -> chaos::Result<T> {
        let store = format!("DynamoDB table {}", self.cloud.state_table);
        self.cloud.runtime.block_on(future).map_err(|e| chaos::Error::Store { store, source: Box::new(e) })
    }
}

impl ChaosStore for TableChaos<'_> {
    fn config(&self, cluster: &str) -> chaos::Result<Option<Config>> {
        self.run(async {
            let Some(item) = self.cloud.get(cluster, CONSENT_KEY).await? else { return Ok(None) };
            Ok(Some(self.cloud.parse(&item, "config", "a chaos consent")?))
        })
    }

    fn enable(&self, config: &Config) -> chaos::Result<()> {
        let config_json = s(serde_json::to_string(config).expect("serialisable"));
        let item = item(&config.cluster, CONSENT_KEY, vec![("config", config_json)]);
        self.run(async { self.cloud.put(item, None).await.map(|_| ()) })
    }

    fn enabled(&self) -> chaos::Result<Vec<Config>> {
        self.run(async {
            let items = self.cloud.scan(CONSENT_KEY).await?;
            let consents = items.iter().filter(|i| text(i, "key") == Some(CONSENT_KEY));
            let mut configs: Vec<Config> =
                consents.map(|i| self.cloud.parse(i, "config", "a chaos consent")).collect::<Result<_>>()?;
            configs.sort_by(|a, b| a.cluster.cmp(&b.cluster));
            Ok(configs)
        })
    }

    fn disable(&self, cluster: &str) -> chaos::Result<()> {
        self.run(async { self.cloud.delete(cluster, CONSENT_KEY, None).await.map(|_| ()) })
    }

    fn record(&self, entries: &[AuditEntry]) -> chaos::Result<()> {
        self.run(async {
            for entry in entries {
                let key = format!("{AUDIT_PREFIX}{:012}/{}/{}", entry.time, entry.instance, entry.monkey);
                let entry_json = s(serde_json::to_string(entry).expect("serialisable"));
                let item = item(&entry.cluster, key, vec![("entry", entry_json)]);
                self.cloud.put(item, None).await?;
            }
            Ok(())
        })
    }

    fn claim_kill(&self, config: &Config, now: u64) -> chaos::Result<bool> {
        let (_, midnight) = chaos::local_day(now);
        let key = format!("{KILLS_PREFIX}{midnight}");
        self.run(self.cloud.count_up(&config.cluster, &key, config.max_per_day))
    }

    fn log(&self, cluster: Option<&str>) -> chaos::Result<Vec<AuditEntry>> {
        self.run(async {
            let items = match cluster {
                Some(cluster) => self.cloud.query(cluster, AUDIT_PREFIX, false, None).await?,
                None => self.cloud.scan(AUDIT_PREFIX).await?,
            };
            let mut entries: Vec<AuditEntry> =
                items.iter().map(|i| self.cloud.parse(i, "entry", "a chaos audit entry")).collect::<Result<_>>()?;
            entries.sort_by(|a, b| (a.time, &a.cluster).cmp(&(b.time, &b.cluster)));
            Ok(entries)
        })
    }
}

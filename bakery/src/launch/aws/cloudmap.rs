//! The service registry on AWS: Cloud Map. A deploy given `--registry-namespace NS` registers
//! its instances in the HTTP namespace NS (created on first use), one service per app. The
//! group's user data tells each instance's agent the service, and the agent registers the
//! instance under its EC2 id with its address, zone and status as attributes (re-registering
//! when its status changes, deregistering on a clean stop).
//!
//! Cloud Map's custom health status is the launcher's alone: `UNHEALTHY` is how it holds a
//! disabled group's instances `OUT_OF_SERVICE`, so clients that discover with
//! `HealthStatus=HEALTHY` stop calling them; it is set back to `HEALTHY` when the group returns.
//! The agent never writes it. Cloud Map has no lease: an instance that dies without a clean
//! stop stays listed until its group is destroyed (which deregisters every member) — its
//! status, not its presence, is what the gate reads.

use super::*;
use crate::launch::registry::{Instance, Registration};
use aws_sdk_servicediscovery::types::{CustomHealthStatus, HealthCheckCustomConfig, HealthStatus};
use std::collections::HashMap;

/// The ASG tag naming the Cloud Map service its instances register in.
pub(super) const SERVICE_TAG: &str = "bakery:registry-service";
/// How long a new namespace may take to appear (creation is an asynchronous operation).
const NAMESPACE_WAIT: Duration = Duration::from_secs(120);

impl AwsCloud {
    async fn namespace_id(&self, name: &str) -> std::result::Result<Option<String>, CallError> {
        let mut token = None;
        loop {
            let page = retry(self.policy, "ListNamespaces", || {
                self.discovery.list_namespaces().set_next_token(token.clone()).send()
            })
            .await?;
            if let Some(found) = page.namespaces().iter().find(|n| n.name() == Some(name)) {
                return Ok(found.id().map(str::to_string));
            }
            token = page.next_token().map(str::to_string);
            if token.is_none() {
                return Ok(None);
            }
        }
    }

    /// The service of `app` in namespace `namespace`, both created when missing.
    pub(super) async fn ensure_service(&self, namespace: &str, app: &str) -> Result<String> {
        let namespace_id = match self.namespace_id(namespace).await.context(CallSnafu)? {
            Some(id) => id,
            None => {
                // The same request id: two launchers creating it at once make one namespace.
                retry(self.policy, "CreateHttpNamespace", || {
                    self.discovery
                        .create_http_namespace()
                        .name(namespace)
                        .creator_request_id(format!("bakery-{namespace}"))
                        .description("service registry of bakery's launcher")
                        .send()
                })
                .await
                .context(CallSnafu)?;
                wait_for(&format!("Cloud Map namespace {namespace}"), NAMESPACE_WAIT, || async {
                    self.namespace_id(namespace).await.map_err(|source| ec2_calls::Error::Call { source })
                })
                .await
                .context(WaitSnafu)?
            }
        };
        let mut token = None;
        loop {
            let page = retry(self.policy, "ListServices", || {
                self.discovery
                    .list_services()
                    .filters(
                        aws_sdk_servicediscovery::types::ServiceFilter::builder()
                            .name(aws_sdk_servicediscovery::types::ServiceFilterName::NamespaceId)
                            .values(&namespace_id)
                            .build()
                            .expect("name and values are set"),
                    )
                    .set_next_token(token.clone())
                    .send()
            })
            .await
            .context(CallSnafu)?;
            if let Some(found) = page.services().iter().find(|s| s.name() == Some(app)) {
                return Ok(found.id().unwrap_or_default().to_string());
            }
            token = page.next_token().map(str::to_string);
            if token.is_none() {
                break;
            }
        }
        let created = retry(self.policy, "CreateService", || {
            self.discovery
                .create_service()
                .name(app)
                .namespace_id(&namespace_id)
                .creator_request_id(format!("bakery-{namespace_id}-{app}"))
                .health_check_custom_config(HealthCheckCustomConfig::builder().build())
                .send()
        })
        .await
        .context(CallSnafu)?;
        Ok(created.service().and_then(|s| s.id()).unwrap_or_default().to_string())
    }

    /// Whether the service with this id is there (a copied one may have been deleted by hand).
    pub(super) async fn service_exists(&self, id: &str) -> Result<bool> {
        let found = retry(self.policy, "GetService", || self.discovery.get_service().id(id).send()).await;
        match found {
            Err(e) if e.is_not_found() => Ok(false),
            other => other.map(|_| true).context(CallSnafu),
        }
    }

    /// Every instance registered in `service`, as clients see it.
    pub(super) async fn registered(&self, service: &str) -> Result<Vec<Instance>> {
        let mut summaries = Vec::new();
        let mut token = None;
        loop {
            let page = retry(self.policy, "ListInstances", || {
                self.discovery.list_instances().service_id(service).set_next_token(token.clone()).send()
            })
            .await;
            // A service deleted by hand lists nothing.
            let page = match page {
                Err(e) if e.is_not_found() => return Ok(Vec::new()),
                other => other.context(CallSnafu)?,
            };
            summaries.extend(page.instances().iter().cloned());
            token = page.next_token().map(str::to_string);
            if token.is_none() {
                break;
            }
        }
        let mut health: HashMap<String, HealthStatus> = HashMap::new();
        let mut token = None;
        while !summaries.is_empty() {
            let page = retry(self.policy, "GetInstancesHealthStatus", || {
                self.discovery.get_instances_health_status().service_id(service).set_next_token(token.clone()).send()
            })
            .await
            .context(CallSnafu)?;
            health.extend(page.status().cloned().unwrap_or_default());
            token = page.next_token().map(str::to_string);
            if token.is_none() {
                break;
            }
        }
        Ok(summaries
            .iter()
            .filter_map(|summary| {
                let id = summary.id()?;
                let registration = registration(id, summary.attributes().cloned().unwrap_or_default());
                Some(Instance::new(registration, health.get(id) == Some(&HealthStatus::Unhealthy)))
            })
            .collect())
    }

    /// Holds `ids` out of service (custom health `UNHEALTHY`) or lets them serve again. An
    /// instance that has not registered yet is skipped: it registers `HEALTHY`, and a group
    /// disabled before its instances registered is never one that serves.
    pub(super) async fn hold_out_of_service(&self, service: &str, ids: &[String], held: bool) -> Result<()> {
        let status = if held { CustomHealthStatus::Unhealthy } else { CustomHealthStatus::Healthy };
        for id in ids {
            let updated = retry(self.policy, "UpdateInstanceCustomHealthStatus", || {
                self.discovery
                    .update_instance_custom_health_status()
                    .service_id(service)
                    .instance_id(id)
                    .status(status.clone())
                    .send()
            })
            .await;
            ignore_missing(updated)?;
        }
        Ok(())
    }

    /// Removes `ids` from `service`; gone ones are no error.
    pub(super) async fn deregister(&self, service: &str, ids: &[String]) -> Result<()> {
        for id in ids {
            let removed = retry(self.policy, "DeregisterInstance", || {
                self.discovery.deregister_instance().service_id(service).instance_id(id).send()
            })
            .await;
            ignore_missing(removed)?;
        }
        Ok(())
    }
}

/// The agent's attributes as a [`Registration`]; what is missing reads as empty or zero.
fn registration(id: &str, attributes: HashMap<String, String>) -> Registration {
    let text = |key: &str| attributes.get(key).cloned().unwrap_or_default();
    let number = |key: &str| attributes.get(key).and_then(|v| v.parse().ok()).unwrap_or_default();
    Registration {
        app: text("app"),
        cluster: text("cluster"),
        group: text("group"),
        instance_id: id.to_string(),
        address: text("AWS_INSTANCE_IPV4"),
        port: number("AWS_INSTANCE_PORT") as u16,
        zone: text("AVAILABILITY_ZONE"),
        version: text("version"),
        status: text("status"),
        up_since: number("up_since"),
        last_heartbeat: number("last_heartbeat"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_agents_attributes_read_as_a_registration() {
        let attributes = [
            ("AWS_INSTANCE_IPV4", "10.0.1.5"),
            ("AWS_INSTANCE_PORT", "8080"),
            ("AVAILABILITY_ZONE", "us-east-1b"),
            ("app", "hello"),
            ("cluster", "hello-prod"),
            ("group", "hello-prod-v001"),
            ("status", "UP"),
            ("up_since", "1700000000"),
        ];
        let attributes = attributes.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let read = registration("i-1", attributes);
        assert_eq!((read.address.as_str(), read.port, read.zone.as_str()), ("10.0.1.5", 8080, "us-east-1b"));
        assert_eq!((read.status.as_str(), read.up_since, read.last_heartbeat), ("UP", 1_700_000_000, 0));
        assert!(Instance::new(read, true).registration.status == "OUT_OF_SERVICE");
    }
}

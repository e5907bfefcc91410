//! The health gate without traffic: each group's *check target group*, reachable only through a
//! listener rule for a host name that never resolves (see the module above for why).

use super::*;

impl AwsCloud {
    /// Instance id → target state in the target group.
    pub(super) async fn target_health(&self, arn: &str) -> std::result::Result<BTreeMap<String, String>, CallError> {
        let output = retry(self.policy, "DescribeTargetHealth", || {
            self.elb.describe_target_health().target_group_arn(arn).send()
        })
        .await?;
        Ok(output
            .target_health_descriptions()
            .iter()
            .filter_map(|d| {
                let id = d.target()?.id()?.to_string();
                Some((id, d.target_health()?.state()?.as_str().to_string()))
            })
            .collect())
    }

    pub(super) async fn target_group(&self, arn: Option<&str>, name: Option<&str>) -> Result<Option<TargetGroup>> {
        let found = retry(self.policy, "DescribeTargetGroups", || {
            self.elb
                .describe_target_groups()
                .set_target_group_arns(arn.map(|a| vec![a.to_string()]))
                .set_names(name.map(|n| vec![n.to_string()]))
                .send()
        })
        .await;
        match found {
            Err(e) if e.is_not_found() => Ok(None),
            other => Ok(other.context(CallSnafu)?.target_groups().first().cloned()),
        }
    }

    pub(super) async fn listeners(&self, balancer: &str) -> Result<Vec<Listener>> {
        let output = retry(self.policy, "DescribeListeners", || {
            self.elb.describe_listeners().load_balancer_arn(balancer).send()
        })
        .await
        .context(CallSnafu)?;
        let mut listeners = output.listeners().to_vec();
        listeners.sort_by_key(|l| l.port());
        Ok(listeners)
    }

    /// The non-default rules of the listener that forward to `target_group`, and the priorities in use.
    pub(super) async fn rules_to(&self, listener: &str, target_group: &str) -> Result<(Vec<String>, BTreeSet<i32>)> {
        let output = retry(self.policy, "DescribeRules", || self.elb.describe_rules().listener_arn(listener).send())
            .await
            .context(CallSnafu)?;
        let mut ours = Vec::new();
        let mut used = BTreeSet::new();
        for rule in output.rules().iter().filter(|r| r.is_default() != Some(true)) {
            used.extend(rule.priority().and_then(|p| p.parse::<i32>().ok()));
            if rule.actions().iter().any(|a| a.target_group_arn() == Some(target_group)) {
                ours.extend(rule.rule_arn().map(str::to_string));
            }
        }
        Ok((ours, used))
    }

    /// The group's check target group and the listener rule that makes ELB check it (see the
    /// module's doc); both found again when they exist.
    pub(super) async fn ensure_check_group(
        &self,
        group: &str,
        cluster_group: &str,
        health_url: &str,
    ) -> Result<String> {
        let model =
            self.target_group(Some(cluster_group), None).await?.context(NoTargetGroupSnafu { arn: cluster_group })?;
        let protocol = model.protocol().cloned().unwrap_or(ProtocolEnum::Http);
        if !matches!(protocol, ProtocolEnum::Http | ProtocolEnum::Https) {
            return NotHttpSnafu { arn: cluster_group, protocol: protocol.as_str() }.fail();
        }
        let balancer = model.load_balancer_arns().first().context(NoBalancerSnafu { arn: cluster_group })?;
        let name = check_name(group);
        let arn = match self.target_group(None, Some(&name)).await? {
            Some(existing) => existing.target_group_arn().unwrap_or_default().to_string(),
            None => {
                let created = retry(self.policy, "CreateTargetGroup", || {
                    self.elb
                        .create_target_group()
                        .name(&name)
                        .protocol(protocol.clone())
                        .set_protocol_version(model.protocol_version().map(str::to_string))
                        .set_port(model.port())
                        .set_vpc_id(model.vpc_id().map(str::to_string))
                        .target_type(TargetTypeEnum::Instance)
                        .set_health_check_protocol(model.health_check_protocol().cloned())
                        .set_health_check_port(model.health_check_port().map(str::to_string))
                        .health_check_path(health_url)
                        .set_health_check_interval_seconds(model.health_check_interval_seconds())
                        .set_health_check_timeout_seconds(model.health_check_timeout_seconds())
                        .set_healthy_threshold_count(model.healthy_threshold_count())
                        .set_unhealthy_threshold_count(model.unhealthy_threshold_count())
                        .set_matcher(model.matcher().cloned())
                        .tags(ElbTag::builder().key("bakery:check-for").value(group).build())
                        .send()
                })
                .await
                .context(CallSnafu)?;
                created.target_groups().first().and_then(|t| t.target_group_arn()).unwrap_or_default().to_string()
            }
        };
        let listener = self.listeners(balancer).await?.into_iter().next().context(NoListenerSnafu { arn: balancer })?;
        let listener = listener.listener_arn().unwrap_or_default();
        // Another deploy on the same balancer may take the priority first: choose again.
        let mut attempts = 0;
        loop {
            let (ours, used) = self.rules_to(listener, &arn).await?;
            if !ours.is_empty() {
                return Ok(arn);
            }
            // Last in evaluation order, out of the way of the rules people write.
            let priority = (1..=50_000).rev().find(|p| !used.contains(p)).unwrap_or(50_000);
            let host = format!("{name}.{CHECK_DOMAIN}");
            let created = retry(self.policy, "CreateRule", || {
                self.elb
                    .create_rule()
                    .listener_arn(listener)
                    .priority(priority)
                    .conditions(
                        RuleCondition::builder()
                            .field("host-header")
                            .host_header_config(HostHeaderConditionConfig::builder().values(&host).build())
                            .build(),
                    )
                    .actions(Action::builder().r#type(ActionTypeEnum::Forward).target_group_arn(&arn).build())
                    .send()
            })
            .await;
            attempts += 1;
            match created {
                Err(e) if e.code.as_deref() == Some("PriorityInUse") && attempts < 5 => continue,
                other => other.context(CallSnafu)?,
            };
            return Ok(arn);
        }
    }

    pub(super) async fn delete_check_group(&self, group: &str) -> Result<()> {
        let Some(check) = self.target_group(None, Some(&check_name(group))).await? else { return Ok(()) };
        let arn = check.target_group_arn().unwrap_or_default();
        for balancer in check.load_balancer_arns() {
            for listener in self.listeners(balancer).await? {
                let (rules, _) = self.rules_to(listener.listener_arn().unwrap_or_default(), arn).await?;
                for rule in rules {
                    ignore_missing(
                        retry(self.policy, "DeleteRule", || self.elb.delete_rule().rule_arn(&rule).send()).await,
                    )?;
                }
            }
        }
        ignore_missing(
            retry(self.policy, "DeleteTargetGroup", || self.elb.delete_target_group().target_group_arn(arn).send())
                .await,
        )
    }

    // EC2: launch templates, their tags, subnets, addresses.
}

pub(super) fn check_name(group: &str) -> String {
    format!("bakery-{}", &hex::encode(Sha256::digest(group.as_bytes()))[..24])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_group_names_fit_elbv2_limits() {
        let name = check_name("hello-prod-some-very-long-detail-v001");
        assert!(name.len() <= 32 && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'), "{name}");
        assert_ne!(name, check_name("hello-prod-v001"));
    }
}

//! A new group starts as a copy of its ancestor (the group it replaces), as Spinnaker's "copy
//! from the previous server group" does: the launch template version it runs (made into the new
//! group's by `template_data`), its Auto Scaling settings (health check type and grace,
//! termination policies, cooldown, user tags, scaling policies with their alarms, scheduled
//! actions), and what checks and finds its instances (target groups, the registry's service).
//! The deploy's own settings win over each.
//!
//! Scaling policies, their alarms and scheduled actions are named `<group>-<name>`: a copy
//! takes the ancestor's name without the ancestor's prefix, so names stay short however many
//! deploys they pass through, and never meet another group's (moto keys policies by name alone).
//! Target-tracking policies make their own alarms; a simple or step policy's alarms (those whose
//! actions name it) are copied to name the new policy and group.

use super::template_data::RootDevice;
use super::*;
use aws_sdk_autoscaling::types::{ScalingPolicy, ScheduledUpdateGroupAction, TargetTrackingConfiguration};
use aws_sdk_cloudwatch::types::{Dimension, MetricAlarm};
use aws_sdk_ec2::types::ResponseLaunchTemplateData;

/// What a new group copies, read before it is made.
#[derive(Default)]
pub(super) struct Ancestor {
    pub name: Option<String>,
    pub group: Option<AutoScalingGroup>,
    pub template: Option<ResponseLaunchTemplateData>,
    pub policies: Vec<ScalingPolicy>,
    pub scheduled: Vec<ScheduledUpdateGroupAction>,
    /// The alarms acting on `policies` (simple and step ones), each once.
    pub alarms: Vec<MetricAlarm>,
}

/// `<group>-<name>` for a copy of `name`, which `ancestor` may have prefixed already.
pub(super) fn copied_name(name: &str, ancestor: Option<&str>, group: &str) -> String {
    let base = ancestor.and_then(|a| name.strip_prefix(a)).and_then(|n| n.strip_prefix('-')).unwrap_or(name);
    format!("{group}-{base}")
}

impl AwsCloud {
    /// The ancestor's settings; nothing when there is none or it is gone.
    pub(super) async fn ancestor(&self, name: Option<&str>) -> Result<Ancestor> {
        let Some(name) = name else { return Ok(Ancestor::default()) };
        let Some(group) = self.describe_group(name).await.context(CallSnafu)? else {
            return Ok(Ancestor::default());
        };
        let template = match group.launch_template() {
            Some(spec) => self.template_version(spec).await?,
            None => None,
        };
        let policies = self.policies(name).await?;
        let scheduled = self.scheduled_actions(name).await?;
        let alarms = self.alarms_of(&policies).await?;
        Ok(Ancestor { name: Some(name.to_string()), group: Some(group), template, policies, scheduled, alarms })
    }

    /// The launch template version a group launches from.
    pub(super) async fn template_version(
        &self,
        spec: &LaunchTemplateSpecification,
    ) -> Result<Option<ResponseLaunchTemplateData>> {
        let version = spec.version().unwrap_or("$Default").to_string();
        let found = retry(self.policy, "DescribeLaunchTemplateVersions", || {
            self.ec2
                .describe_launch_template_versions()
                .set_launch_template_id(spec.launch_template_id().map(str::to_string))
                // One or the other: EC2 refuses both.
                .set_launch_template_name(
                    spec.launch_template_name().filter(|_| spec.launch_template_id().is_none()).map(str::to_string),
                )
                .versions(version.clone())
                .send()
        })
        .await;
        let output = match found {
            Err(e) if e.is_not_found() => return Ok(None),
            other => other.context(CallSnafu)?,
        };
        Ok(output.launch_template_versions().first().and_then(|v| v.launch_template_data().cloned()))
    }

    pub(super) async fn policies(&self, group: &str) -> Result<Vec<ScalingPolicy>> {
        paged(None, |token| async move {
            let page = retry(self.policy, "DescribePolicies", || {
                self.asg.describe_policies().auto_scaling_group_name(group).set_next_token(token.clone()).send()
            })
            .await
            .context(CallSnafu)?;
            Ok((page.scaling_policies().to_vec(), page.next_token().map(str::to_string)))
        })
        .await
    }

    async fn scheduled_actions(&self, group: &str) -> Result<Vec<ScheduledUpdateGroupAction>> {
        paged(None, |token| async move {
            let page = retry(self.policy, "DescribeScheduledActions", || {
                self.asg
                    .describe_scheduled_actions()
                    .auto_scaling_group_name(group)
                    .set_next_token(token.clone())
                    .send()
            })
            .await
            .context(CallSnafu)?;
            Ok((page.scheduled_update_group_actions().to_vec(), page.next_token().map(str::to_string)))
        })
        .await
    }

    /// The alarms acting on any of these (simple or step) policies, each once: one alarm may
    /// scale up on ALARM and down on OK.
    async fn alarms_of(&self, policies: &[ScalingPolicy]) -> Result<Vec<MetricAlarm>> {
        let mut alarms: BTreeMap<String, MetricAlarm> = BTreeMap::new();
        for arn in policies.iter().filter(|p| !is_target_tracking(p)).filter_map(|p| p.policy_arn()) {
            for alarm in self.alarms_acting_on(arn).await? {
                alarms.entry(alarm.alarm_name().unwrap_or_default().to_string()).or_insert(alarm);
            }
        }
        Ok(alarms.into_values().collect())
    }

    /// The alarms whose actions include the policy `arn`.
    async fn alarms_acting_on(&self, arn: &str) -> Result<Vec<MetricAlarm>> {
        paged(None, |token| async move {
            let page = retry(self.policy, "DescribeAlarms", || {
                self.metrics.describe_alarms().action_prefix(arn).set_next_token(token.clone()).send()
            })
            .await
            .context(CallSnafu)?;
            Ok((page.metric_alarms().to_vec(), page.next_token().map(str::to_string)))
        })
        .await
    }

    /// The root device of `image`, whose snapshot a copied mapping must not carry over nor
    /// ask for a smaller volume than.
    pub(super) async fn root_device(&self, image: &str) -> Result<Option<RootDevice>> {
        let output = retry(self.policy, "DescribeImages", || self.ec2.describe_images().image_ids(image).send()).await;
        let output = match output {
            Err(e) if e.is_not_found() => return Ok(None),
            other => other.context(CallSnafu)?,
        };
        let Some(image) = output.images().first() else { return Ok(None) };
        let Some(name) = image.root_device_name() else { return Ok(None) };
        let mapping = image.block_device_mappings().iter().find(|m| m.device_name() == Some(name));
        let size_gib = mapping.and_then(|m| m.ebs()).and_then(|e| e.volume_size());
        Ok(Some(RootDevice { name: name.to_string(), size_gib }))
    }

    /// Recreates the ancestor's scaling policies (with their alarms) and scheduled actions on
    /// `group`. Every call is a put by name: a rerun after a crash converges.
    pub(super) async fn copy_scaling(&self, group: &str, ancestor: &Ancestor) -> Result<()> {
        let from = ancestor.name.as_deref();
        // The new policy of each old one, for the copied alarms to act on.
        let mut arns: BTreeMap<String, String> = BTreeMap::new();
        for policy in &ancestor.policies {
            let name = copied_name(policy.policy_name().unwrap_or_default(), from, group);
            let tracking = policy.target_tracking_configuration().map(|t| tracking_for(t, from, group));
            let output = retry(self.policy, "PutScalingPolicy", || {
                self.asg
                    .put_scaling_policy()
                    .auto_scaling_group_name(group)
                    .policy_name(&name)
                    .set_policy_type(policy.policy_type().map(str::to_string))
                    .set_adjustment_type(policy.adjustment_type().map(str::to_string))
                    .set_min_adjustment_magnitude(policy.min_adjustment_magnitude())
                    .set_scaling_adjustment(policy.scaling_adjustment())
                    .set_cooldown(policy.cooldown())
                    .set_metric_aggregation_type(policy.metric_aggregation_type().map(str::to_string))
                    .set_step_adjustments(nonempty(policy.step_adjustments()))
                    .set_estimated_instance_warmup(policy.estimated_instance_warmup())
                    .set_target_tracking_configuration(tracking.clone())
                    .set_predictive_scaling_configuration(policy.predictive_scaling_configuration().cloned())
                    .set_enabled(policy.enabled())
                    .send()
            })
            .await
            .context(CallSnafu)?;
            if let (Some(old), Some(new)) = (policy.policy_arn(), output.policy_arn()) {
                arns.insert(old.to_string(), new.to_string());
            }
        }
        for alarm in &ancestor.alarms {
            self.copy_alarm(alarm, from, group, &arns).await?;
        }
        // Auto Scaling refuses a start in the past: one due within the minute has, in effect, run.
        let soon = now() as i64 + 60;
        for action in &ancestor.scheduled {
            let start = action.start_time().or(action.time()).filter(|t| t.secs() > soon);
            // A one-time action that has run is history; a recurring one starts from now.
            if action.recurrence().is_none() && start.is_none() {
                continue;
            }
            let name = copied_name(action.scheduled_action_name().unwrap_or_default(), from, group);
            retry(self.policy, "PutScheduledUpdateGroupAction", || {
                self.asg
                    .put_scheduled_update_group_action()
                    .auto_scaling_group_name(group)
                    .scheduled_action_name(&name)
                    .set_start_time(start.cloned())
                    .set_end_time(action.end_time().cloned())
                    .set_recurrence(action.recurrence().map(str::to_string))
                    .set_min_size(action.min_size())
                    .set_max_size(action.max_size())
                    .set_desired_capacity(action.desired_capacity())
                    .set_time_zone(action.time_zone().map(str::to_string))
                    .send()
            })
            .await
            .context(CallSnafu)?;
        }
        Ok(())
    }

    /// Copies `alarm` for `group`: every action on an old policy acts on its new one instead,
    /// and a dimension naming the ancestor names the group.
    async fn copy_alarm(
        &self,
        alarm: &MetricAlarm,
        from: Option<&str>,
        group: &str,
        arns: &BTreeMap<String, String>,
    ) -> Result<()> {
        let name = copied_name(alarm.alarm_name().unwrap_or_default(), from, group);
        let swap = |actions: &[String]| {
            nonempty(&actions.iter().map(|a| arns.get(a).unwrap_or(a).clone()).collect::<Vec<_>>())
        };
        let dimensions: Vec<Dimension> = alarm
            .dimensions()
            .iter()
            .map(|d| match (d.name(), from) {
                (Some(GROUP_DIMENSION), Some(from)) if d.value() == Some(from) => {
                    Dimension::builder().name(GROUP_DIMENSION).value(group).build()
                }
                _ => d.clone(),
            })
            .collect();
        retry(self.policy, "PutMetricAlarm", || {
            self.metrics
                .put_metric_alarm()
                .alarm_name(&name)
                .set_alarm_description(alarm.alarm_description().map(str::to_string))
                .set_actions_enabled(alarm.actions_enabled())
                .set_alarm_actions(swap(alarm.alarm_actions()))
                .set_ok_actions(swap(alarm.ok_actions()))
                .set_insufficient_data_actions(swap(alarm.insufficient_data_actions()))
                .set_metric_name(alarm.metric_name().map(str::to_string))
                .set_namespace(alarm.namespace().map(str::to_string))
                .set_statistic(alarm.statistic().cloned())
                .set_extended_statistic(alarm.extended_statistic().map(str::to_string))
                .set_dimensions(nonempty(&dimensions))
                .set_period(alarm.period())
                .set_unit(alarm.unit().cloned())
                .set_evaluation_periods(alarm.evaluation_periods())
                .set_datapoints_to_alarm(alarm.datapoints_to_alarm())
                .set_threshold(alarm.threshold())
                .set_comparison_operator(alarm.comparison_operator().cloned())
                .set_treat_missing_data(alarm.treat_missing_data().map(str::to_string))
                .set_evaluate_low_sample_count_percentile(
                    alarm.evaluate_low_sample_count_percentile().map(str::to_string),
                )
                .set_metrics(nonempty(alarm.metrics()))
                .set_threshold_metric_id(alarm.threshold_metric_id().map(str::to_string))
                .send()
        })
        .await
        .context(CallSnafu)?;
        Ok(())
    }

    /// Deletes the alarms acting on `group`'s policies (copied ones, or a user's, which nothing
    /// could trigger once it is gone), before the group: AWS deletes a group's policies and
    /// scheduled actions with it, but not the alarms that act on them.
    pub(super) async fn delete_alarms(&self, group: &str) -> Result<()> {
        let alarms = self.alarms_of(&self.policies(group).await?).await?;
        let names: Vec<String> = alarms.iter().filter_map(|a| a.alarm_name().map(str::to_string)).collect();
        // DeleteAlarms takes at most 100 names.
        for batch in names.chunks(100) {
            retry(self.policy, "DeleteAlarms", || {
                self.metrics.delete_alarms().set_alarm_names(Some(batch.to_vec())).send()
            })
            .await
            .context(CallSnafu)?;
        }
        Ok(())
    }
}

/// The dimension CloudWatch's Auto Scaling metrics name a group by.
const GROUP_DIMENSION: &str = "AutoScalingGroupName";

/// A target-tracking configuration for `group`: a customized metric whose dimension named the
/// ancestor names the group.
fn tracking_for(
    tracking: &TargetTrackingConfiguration,
    from: Option<&str>,
    group: &str,
) -> TargetTrackingConfiguration {
    let mut tracking = tracking.clone();
    let custom = tracking.customized_metric_specification.as_mut();
    for dimension in custom.and_then(|c| c.dimensions.as_mut()).into_iter().flatten() {
        if dimension.name.as_deref() == Some(GROUP_DIMENSION) && from.is_some() && dimension.value.as_deref() == from {
            dimension.value = Some(group.to_string());
        }
    }
    tracking
}

fn is_target_tracking(policy: &ScalingPolicy) -> bool {
    policy.policy_type() == Some("TargetTrackingScaling")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_customized_metric_of_the_ancestor_tracks_the_new_group() {
        use aws_sdk_autoscaling::types::{CustomizedMetricSpecification, MetricDimension};
        let dimension = |value: &str| MetricDimension::builder().name(GROUP_DIMENSION).value(value).build();
        let tracking = TargetTrackingConfiguration::builder()
            .customized_metric_specification(
                CustomizedMetricSpecification::builder()
                    .metric_name("RequestCount")
                    .dimensions(dimension("hello-v001"))
                    .dimensions(MetricDimension::builder().name("Stage").value("hello-v001").build())
                    .build(),
            )
            .target_value(100.0)
            .build();
        let copied = tracking_for(&tracking, Some("hello-v001"), "hello-v002");
        let dimensions = copied.customized_metric_specification().unwrap().dimensions();
        assert_eq!(dimensions[0].value(), Some("hello-v002"));
        assert_eq!(dimensions[1].value(), Some("hello-v001"), "only the group's dimension");
    }

    #[test]
    fn copied_names_carry_one_group_prefix() {
        assert_eq!(copied_name("scale-out", None, "hello-v001"), "hello-v001-scale-out");
        assert_eq!(copied_name("hello-v001-scale-out", Some("hello-v001"), "hello-v002"), "hello-v002-scale-out");
        assert_eq!(copied_name("scale-out", Some("hello-v001"), "hello-v002"), "hello-v002-scale-out");
    }
}

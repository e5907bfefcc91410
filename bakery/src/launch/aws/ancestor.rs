//! A new group starts as a copy of its ancestor (the group it replaces), as Spinnaker's "copy
//! from the previous server group" does: the launch template version it runs (security groups,
//! instance profile, key pair, the team's user data, block devices, metadata options, tags,
//! instance type, monitoring, EBS optimisation) and its Auto Scaling settings (health check type
//! and grace, termination policies, cooldown, user tags, scaling policies with their alarms,
//! scheduled actions). The deploy's own settings win over each.
//!
//! Scaling policies, their alarms and scheduled actions are named `<group>-<name>`: a copy
//! takes the ancestor's name without the ancestor's prefix, so names stay short however many
//! deploys they pass through, and never meet another group's (moto keys policies by name alone).
//! Target-tracking policies make their own alarms; a simple or step policy's alarms (those whose
//! actions name it) are copied to name the new policy and group.

use super::user_data;
use super::*;
use crate::launch::cloud::LaunchSettings;
use aws_sdk_autoscaling::types::{ScalingPolicy, ScheduledUpdateGroupAction};
use aws_sdk_cloudwatch::types::{Dimension, MetricAlarm};
use aws_sdk_ec2::types::{
    LaunchTemplateBlockDeviceMappingRequest, LaunchTemplateEbsBlockDeviceRequest,
    LaunchTemplateIamInstanceProfileSpecificationRequest, LaunchTemplateTagSpecificationRequest,
    LaunchTemplatesMonitoringRequest, ResponseLaunchTemplateData,
};

/// What a new group copies, read before it is made.
#[derive(Default)]
pub(super) struct Ancestor {
    pub name: Option<String>,
    pub group: Option<AutoScalingGroup>,
    pub template: Option<ResponseLaunchTemplateData>,
    pub policies: Vec<ScalingPolicy>,
    pub scheduled: Vec<ScheduledUpdateGroupAction>,
    /// The alarms of `policies`, by the ARN of the policy they act on.
    pub alarms: Vec<(String, MetricAlarm)>,
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
        let output = retry(self.policy, "DescribeScheduledActions", || {
            self.asg.describe_scheduled_actions().auto_scaling_group_name(name).send()
        })
        .await
        .context(CallSnafu)?;
        let scheduled = output.scheduled_update_group_actions().to_vec();
        let mut alarms = Vec::new();
        for arn in policies.iter().filter(|p| !is_target_tracking(p)).filter_map(|p| p.policy_arn()) {
            alarms.extend(self.alarms_acting_on(arn).await?.into_iter().map(|a| (arn.to_string(), a)));
        }
        Ok(Ancestor { name: Some(name.to_string()), group: Some(group), template, policies, scheduled, alarms })
    }

    /// The launch template version a group launches from.
    async fn template_version(&self, spec: &LaunchTemplateSpecification) -> Result<Option<ResponseLaunchTemplateData>> {
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
        let mut policies = Vec::new();
        let mut token = None;
        loop {
            let page = retry(self.policy, "DescribePolicies", || {
                self.asg.describe_policies().auto_scaling_group_name(group).set_next_token(token.clone()).send()
            })
            .await
            .context(CallSnafu)?;
            policies.extend(page.scaling_policies().iter().cloned());
            token = page.next_token().map(str::to_string);
            if token.is_none() {
                return Ok(policies);
            }
        }
    }

    /// The alarms whose actions include the policy `arn`.
    pub(super) async fn alarms_acting_on(&self, arn: &str) -> Result<Vec<MetricAlarm>> {
        let mut alarms = Vec::new();
        let mut token = None;
        loop {
            let page = retry(self.policy, "DescribeAlarms", || {
                self.metrics.describe_alarms().action_prefix(arn).set_next_token(token.clone()).send()
            })
            .await
            .context(CallSnafu)?;
            alarms.extend(page.metric_alarms().iter().cloned());
            token = page.next_token().map(str::to_string);
            if token.is_none() {
                return Ok(alarms);
            }
        }
    }

    /// The root device name of `image`, whose snapshot a copied mapping must not carry over.
    pub(super) async fn root_device(&self, image: &str) -> Result<Option<String>> {
        let output = retry(self.policy, "DescribeImages", || self.ec2.describe_images().image_ids(image).send()).await;
        let output = match output {
            Err(e) if e.is_not_found() => return Ok(None),
            other => other.context(CallSnafu)?,
        };
        Ok(output.images().first().and_then(|i| i.root_device_name()).map(str::to_string))
    }

    /// Recreates the ancestor's scaling policies (with their alarms) and scheduled actions on
    /// `group`. Every call is a put by name: a rerun after a crash converges.
    pub(super) async fn copy_scaling(&self, group: &str, ancestor: &Ancestor) -> Result<()> {
        let from = ancestor.name.as_deref();
        for policy in &ancestor.policies {
            let name = copied_name(policy.policy_name().unwrap_or_default(), from, group);
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
                    .set_step_adjustments(
                        (!policy.step_adjustments().is_empty()).then(|| policy.step_adjustments().to_vec()),
                    )
                    .set_estimated_instance_warmup(policy.estimated_instance_warmup())
                    .set_target_tracking_configuration(policy.target_tracking_configuration().cloned())
                    .set_enabled(policy.enabled())
                    .send()
            })
            .await
            .context(CallSnafu)?;
            let (Some(old), Some(new)) = (policy.policy_arn(), output.policy_arn()) else { continue };
            for (_, alarm) in ancestor.alarms.iter().filter(|(arn, _)| arn == old) {
                self.copy_alarm(alarm, from, group, old, new).await?;
            }
        }
        let now = aws_smithy_types::DateTime::from_secs(now() as i64);
        for action in &ancestor.scheduled {
            let start = action.start_time().or(action.time()).filter(|t| t.secs() > now.secs());
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

    async fn copy_alarm(
        &self,
        alarm: &MetricAlarm,
        from: Option<&str>,
        group: &str,
        old: &str,
        new: &str,
    ) -> Result<()> {
        let name = copied_name(alarm.alarm_name().unwrap_or_default(), from, group);
        let swap = |actions: &[String]| -> Option<Vec<String>> {
            (!actions.is_empty())
                .then(|| actions.iter().map(|a| if a == old { new.to_string() } else { a.clone() }).collect())
        };
        let dimensions: Vec<Dimension> = alarm
            .dimensions()
            .iter()
            .map(|d| match (d.name(), from) {
                (Some("AutoScalingGroupName"), Some(from)) if d.value() == Some(from) => {
                    Dimension::builder().name("AutoScalingGroupName").value(group).build()
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
                .set_dimensions((!dimensions.is_empty()).then(|| dimensions.clone()))
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
                .set_metrics((!alarm.metrics().is_empty()).then(|| alarm.metrics().to_vec()))
                .set_threshold_metric_id(alarm.threshold_metric_id().map(str::to_string))
                .send()
        })
        .await
        .context(CallSnafu)?;
        Ok(())
    }

    /// Removes what `copy_scaling` made for `group` (and a user's alarms on its policies, which
    /// nothing could trigger once it is gone). Before the group: AWS deletes its policies and
    /// scheduled actions with it, but not the alarms that act on them.
    pub(super) async fn delete_scaling(&self, group: &str) -> Result<()> {
        for policy in self.policies(group).await? {
            let Some(arn) = policy.policy_arn() else { continue };
            let names: Vec<String> =
                self.alarms_acting_on(arn).await?.iter().filter_map(|a| a.alarm_name().map(str::to_string)).collect();
            if !names.is_empty() {
                retry(self.policy, "DeleteAlarms", || {
                    self.metrics.delete_alarms().set_alarm_names(Some(names.clone())).send()
                })
                .await
                .context(CallSnafu)?;
            }
            let name = policy.policy_name().unwrap_or_default();
            ignore_missing(
                retry(self.policy, "DeletePolicy", || {
                    self.asg.delete_policy().auto_scaling_group_name(group).policy_name(name).send()
                })
                .await,
            )?;
        }
        let output = retry(self.policy, "DescribeScheduledActions", || {
            self.asg.describe_scheduled_actions().auto_scaling_group_name(group).send()
        })
        .await
        .context(CallSnafu)?;
        for action in output.scheduled_update_group_actions() {
            let name = action.scheduled_action_name().unwrap_or_default();
            ignore_missing(
                retry(self.policy, "DeleteScheduledAction", || {
                    self.asg.delete_scheduled_action().auto_scaling_group_name(group).scheduled_action_name(name).send()
                })
                .await,
            )?;
        }
        Ok(())
    }
}

fn is_target_tracking(policy: &ScalingPolicy) -> bool {
    policy.policy_type() == Some("TargetTrackingScaling")
}

/// The launch template data of a new group: the ancestor's, with `given` over it, the image,
/// and the user data (the ancestor's team part unless given, beside the launcher's `ours`).
/// A copied block device mapping of the root device drops its snapshot: that is the old image's.
pub(super) fn template_data(
    ancestor: Option<&ResponseLaunchTemplateData>,
    given: &LaunchSettings,
    image_id: &str,
    root_device: Option<&str>,
    ours: Option<&str>,
) -> RequestLaunchTemplateData {
    let from = ancestor.cloned().unwrap_or_else(|| ResponseLaunchTemplateData::builder().build());
    let team = given.user_data.clone().or_else(|| {
        let decoded = base64::engine::general_purpose::STANDARD.decode(from.user_data()?).ok()?;
        user_data::team_part(&decoded)
    });
    let user_data =
        user_data::merge(team.as_deref(), ours).map(|d| base64::engine::general_purpose::STANDARD.encode(d));
    let instance_type = given
        .instance_type
        .as_deref()
        .map(InstanceType::from)
        .or(from.instance_type().cloned())
        .unwrap_or(InstanceType::T3Small);
    let (security_group_ids, security_groups) = match &given.security_groups {
        Some(ids) => (Some(ids.clone()), None),
        None => (nonempty(from.security_group_ids()), nonempty(from.security_groups())),
    };
    let profile = match &given.instance_profile {
        Some(p) if p.starts_with("arn:") => {
            Some(LaunchTemplateIamInstanceProfileSpecificationRequest::builder().arn(p).build())
        }
        Some(p) => Some(LaunchTemplateIamInstanceProfileSpecificationRequest::builder().name(p).build()),
        None => from.iam_instance_profile().map(|p| {
            LaunchTemplateIamInstanceProfileSpecificationRequest::builder()
                .set_arn(p.arn().map(str::to_string))
                .set_name(p.name().map(str::to_string))
                .build()
        }),
    };
    let metadata = from.metadata_options().map_or_else(
        || {
            LaunchTemplateInstanceMetadataOptionsRequest::builder()
                .http_tokens(LaunchTemplateHttpTokensState::Required)
                .http_endpoint(LaunchTemplateInstanceMetadataEndpointState::Enabled)
                .build()
        },
        |m| {
            LaunchTemplateInstanceMetadataOptionsRequest::builder()
                .set_http_tokens(m.http_tokens().cloned())
                .set_http_put_response_hop_limit(m.http_put_response_hop_limit())
                .set_http_endpoint(m.http_endpoint().cloned())
                .set_instance_metadata_tags(m.instance_metadata_tags().cloned())
                .build()
        },
    );
    let mappings: Vec<LaunchTemplateBlockDeviceMappingRequest> = from
        .block_device_mappings()
        .iter()
        .map(|m| {
            let root = m.device_name().is_some() && m.device_name() == root_device;
            let ebs = m.ebs().map(|e| {
                LaunchTemplateEbsBlockDeviceRequest::builder()
                    .set_encrypted(e.encrypted())
                    .set_delete_on_termination(e.delete_on_termination())
                    .set_iops(e.iops())
                    .set_kms_key_id(e.kms_key_id().map(str::to_string))
                    .set_snapshot_id(e.snapshot_id().filter(|_| !root).map(str::to_string))
                    .set_volume_size(e.volume_size())
                    .set_volume_type(e.volume_type().cloned())
                    .set_throughput(e.throughput())
                    .build()
            });
            LaunchTemplateBlockDeviceMappingRequest::builder()
                .set_device_name(m.device_name().map(str::to_string))
                .set_virtual_name(m.virtual_name().map(str::to_string))
                .set_no_device(m.no_device().map(str::to_string))
                .set_ebs(ebs)
                .build()
        })
        .collect();
    let tag_specifications: Vec<LaunchTemplateTagSpecificationRequest> = from
        .tag_specifications()
        .iter()
        .map(|t| {
            LaunchTemplateTagSpecificationRequest::builder()
                .set_resource_type(t.resource_type().cloned())
                .set_tags(nonempty(t.tags()))
                .build()
        })
        .collect();
    RequestLaunchTemplateData::builder()
        .image_id(image_id)
        .instance_type(instance_type)
        .set_user_data(user_data)
        .set_security_group_ids(security_group_ids)
        .set_security_groups(security_groups)
        .set_iam_instance_profile(profile)
        .set_key_name(given.key_name.clone().or(from.key_name().map(str::to_string)))
        .metadata_options(metadata)
        .set_block_device_mappings(nonempty(&mappings))
        .set_tag_specifications(nonempty(&tag_specifications))
        .set_monitoring(
            from.monitoring().map(|m| LaunchTemplatesMonitoringRequest::builder().set_enabled(m.enabled()).build()),
        )
        .set_ebs_optimized(from.ebs_optimized())
        .build()
}

fn nonempty<T: Clone>(items: &[T]) -> Option<Vec<T>> {
    (!items.is_empty()).then(|| items.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_ec2::types::{
        LaunchTemplateBlockDeviceMapping, LaunchTemplateEbsBlockDevice, LaunchTemplateIamInstanceProfileSpecification,
    };

    #[test]
    fn copied_names_carry_one_group_prefix() {
        assert_eq!(copied_name("scale-out", None, "hello-v001"), "hello-v001-scale-out");
        assert_eq!(copied_name("hello-v001-scale-out", Some("hello-v001"), "hello-v002"), "hello-v002-scale-out");
        assert_eq!(copied_name("scale-out", Some("hello-v001"), "hello-v002"), "hello-v002-scale-out");
    }

    #[test]
    fn a_copy_keeps_the_ancestors_settings_under_what_is_given() {
        let team = user_data::merge(Some(b"#!/bin/sh\necho team\n"), Some("REGISTRY_URL='cloudmap:old'\n")).unwrap();
        let ancestor = ResponseLaunchTemplateData::builder()
            .image_id("ami-old")
            .instance_type(InstanceType::M5Large)
            .security_group_ids("sg-1")
            .key_name("ops")
            .user_data(base64::engine::general_purpose::STANDARD.encode(team))
            .iam_instance_profile(LaunchTemplateIamInstanceProfileSpecification::builder().name("hello").build())
            .block_device_mappings(
                LaunchTemplateBlockDeviceMapping::builder()
                    .device_name("/dev/xvda")
                    .ebs(LaunchTemplateEbsBlockDevice::builder().snapshot_id("snap-old").volume_size(20).build())
                    .build(),
            )
            .block_device_mappings(
                LaunchTemplateBlockDeviceMapping::builder()
                    .device_name("/dev/xvdb")
                    .ebs(LaunchTemplateEbsBlockDevice::builder().snapshot_id("snap-data").build())
                    .build(),
            )
            .build();
        let given = LaunchSettings { key_name: Some("new".into()), ..LaunchSettings::default() };
        let data = template_data(Some(&ancestor), &given, "ami-new", Some("/dev/xvda"), Some("REGISTRY_URL='x'\n"));
        assert_eq!(data.image_id(), Some("ami-new"));
        assert_eq!(data.instance_type(), Some(&InstanceType::M5Large));
        assert_eq!(data.security_group_ids(), ["sg-1"]);
        assert_eq!(data.key_name(), Some("new"));
        assert_eq!(data.iam_instance_profile().and_then(|p| p.name()), Some("hello"));
        let mappings = data.block_device_mappings();
        assert_eq!(mappings[0].ebs().unwrap().snapshot_id(), None, "the old root snapshot is not carried over");
        assert_eq!(mappings[0].ebs().unwrap().volume_size(), Some(20));
        assert_eq!(mappings[1].ebs().unwrap().snapshot_id(), Some("snap-data"));
        let decoded = base64::engine::general_purpose::STANDARD.decode(data.user_data().unwrap()).unwrap();
        assert_eq!(user_data::team_part(&decoded).as_deref(), Some(&b"#!/bin/sh\necho team\n"[..]));
        let text = String::from_utf8(decoded).unwrap();
        assert!(text.contains("REGISTRY_URL='x'") && !text.contains("cloudmap:old"), "{text}");

        let first = template_data(None, &LaunchSettings::default(), "ami-1", None, None);
        assert_eq!(first.instance_type(), Some(&InstanceType::T3Small));
        assert_eq!(first.user_data(), None);
        let imds = first.metadata_options().unwrap();
        assert_eq!(imds.http_tokens(), Some(&LaunchTemplateHttpTokensState::Required));
    }
}

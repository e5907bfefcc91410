//! The launcher's `aws` provider: a server group is an Auto Scaling group named by its Frigga
//! name with a launch template of the same name; a cluster is the ASGs tagged `bakery:cluster`.
//!
//! **Health gate without traffic.** The cluster's target groups are attached only by
//! `add_to_service` (the flip). To check a new group's instances with the load balancer's own
//! health check before that, each group gets a *check target group* (`bakery-<hash>`): the
//! port, protocol and check settings of the cluster's first target group, but the check path is
//! the deploy's `--health-url`. The ASG is created attached to it alone, and a listener rule on
//! the same load balancer forwards only `Host: <check-name>.bakery.invalid` to it — a name that
//! never resolves (RFC 2606), because ELB runs health checks only for target groups a listener
//! uses. A member is Healthy when it is InService, its ASG health is Healthy, and it is healthy
//! in every target group the ASG is attached to (the check group always; the cluster's once in
//! service); unhealthy in any → Unhealthy; anything else → Starting. `add_to_service` then
//! waits until the members are healthy in the cluster's target groups too, so that the old
//! group is never disabled while the new one's targets are still `initial`. The check group
//! stays attached while a group is disabled, so a rollback is gated the same way. Without
//! target groups the gate is the ASG's own (EC2 status) health.
//!
//! **Registry.** With `--registry-namespace`, the group's instances register in Cloud Map
//! ([`cloudmap`]) and a member is Healthy only once its agent reports it `UP` there as well.
//!
//! **Ancestor.** A new group copies the launch template version and Auto Scaling settings of
//! the group it replaces, under the deploy's own ([`ancestor`]); the team's user data and the
//! launcher's sit side by side ([`user_data`]).
//!
//! The health gate lives in [`gate`], launch templates in [`templates`], the deploy lock and
//! record in [`state`] (Chaos Monkey's consent and log beside them, [`chaos_state`]), the
//! registry in [`cloudmap`], the soak's figures in [`metrics`] and what else uses images in
//! [`references`].
//!
//! Every call goes through [`crate::aws::retry`]; the SDK's own retries are off.

mod ancestor;
mod chaos_state;
mod cloudmap;
mod gate;
mod metrics;
mod references;
mod state;
mod template_data;
mod templates;
mod user_data;

use super::cloud::{self, Capacity, Cloud, DeployRecord, Group, GroupSpec, Health, LaunchSettings, LockHolder, Member};
use super::registry::{self, Instance};
use super::soak::Traffic;
use crate::aws::ec2::{self as ec2_calls, wait_for};
use crate::aws::retry::{retry, CallError, Policy};
use crate::ids::unix_now as now;
use aws_sdk_autoscaling::types::{
    AutoScalingGroup, Filter as AsgFilter, LaunchTemplateSpecification, Tag as AsgTag, TagDescription,
};
use aws_sdk_ec2::types::{
    Filter as Ec2Filter, InstanceType, LaunchTemplateHttpTokensState, LaunchTemplateInstanceMetadataEndpointState,
    LaunchTemplateInstanceMetadataOptionsRequest, RequestLaunchTemplateData, ResourceType, Tag as Ec2Tag,
    TagSpecification,
};
use aws_sdk_elasticloadbalancingv2::types::{
    Action, ActionTypeEnum, HostHeaderConditionConfig, Listener, ProtocolEnum, RuleCondition, Tag as ElbTag,
    TargetGroup, TargetTypeEnum,
};
use base64::Engine;
use cloudmap::SERVICE_TAG;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use snafu::{OptionExt, ResultExt, Snafu};
use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

const CLUSTER_TAG: &str = "bakery:cluster";
const IMAGE_TAG: &str = "bakery:image";
const DEPLOY_ID_TAG: &str = "bakery:deploy-id";
const DISABLED_AT_TAG: &str = "bakery:disabled-at";
/// Set by `add_to_service` to the Unix seconds it went into service: with no target groups,
/// attachment cannot say whether it serves, and the soak's figures count from then.
const IN_SERVICE_TAG: &str = "bakery:in-service";
/// `bakery:target-group-1`, `-2`…: the cluster's target groups, remembered while detached.
const TARGET_GROUP_TAG: &str = "bakery:target-group-";
/// What a disabled group must not do (Asgard's and Spinnaker's list), and its copied scaling
/// policies' alarms and scheduled actions must not resize it either.
const DISABLED_PROCESSES: [&str; 5] =
    ["Launch", "Terminate", "AddToLoadBalancer", "AlarmNotification", "ScheduledActions"];
/// Bound on the provider's own waits (targets healthy after attaching, an ASG deleted).
const WAIT: Duration = Duration::from_secs(600);
/// The host names of check rules: `.invalid` never resolves, so no client reaches a group early.
const CHECK_DOMAIN: &str = "bakery.invalid";

#[derive(Debug, Snafu)]
pub enum Error {
    #[snafu(display("{source}"))]
    Call { source: CallError },

    #[snafu(display("{source}"))]
    Wait { source: ec2_calls::Error },

    #[snafu(display("{what} in {} zone(s) ({}): a cluster needs at least 3 (--subnets)", zones.len(), zones.join(", ")))]
    TooFewZones { what: String, zones: Vec<String> },

    #[snafu(display("{what} not all there: {source}"))]
    NoSuchSubnet { what: String, source: CallError },

    #[snafu(display(
        "nothing would check --health-url: give --target-group ARN (its health checks gate the group), or --registry-namespace NS (the gate then waits for every instance UP in Cloud Map); later deploys copy them from the group they replace"
    ))]
    NoHealthCheck,

    #[snafu(display("cluster {cluster}: {source}"))]
    ClusterName { cluster: String, source: crate::launch::names::Error },

    #[snafu(display("group {group} already exists with image {image}"))]
    Exists { group: String, image: String },

    #[snafu(display("group {group} does not exist"))]
    NoGroup { group: String },

    #[snafu(display("target group {arn} does not exist"))]
    NoTargetGroup { arn: String },

    #[snafu(display(
        "target group {arn} is not used by a load balancer: the health gate needs one to check instances"
    ))]
    NoBalancer { arn: String },

    #[snafu(display("load balancer {arn} has no listener to hang the health-check rule on"))]
    NoListener { arn: String },

    #[snafu(display("target group {arn} uses {protocol}: the health gate needs an HTTP or HTTPS target group (an Application Load Balancer)"))]
    NotHttp { arn: String, protocol: String },

    #[snafu(display("{message}"))]
    UserData { message: &'static str },

    #[snafu(display("{what} in {resource} is unreadable: {reason}"))]
    Corrupt { what: String, resource: String, reason: String },

    #[snafu(display("the {name} keeps changing hands; try again"))]
    Unsettled { name: String },
}

pub type Result<T> = std::result::Result<T, Error>;

pub struct AwsCloud {
    runtime: tokio::runtime::Runtime,
    asg: aws_sdk_autoscaling::Client,
    elb: aws_sdk_elasticloadbalancingv2::Client,
    ec2: aws_sdk_ec2::Client,
    discovery: aws_sdk_servicediscovery::Client,
    ssm: aws_sdk_ssm::Client,
    metrics: aws_sdk_cloudwatch::Client,
    dynamodb: aws_sdk_dynamodb::Client,
    /// The DynamoDB table of deploy locks and records, and whether it is known to be there.
    state_table: String,
    table_ready: tokio::sync::OnceCell<()>,
    region: String,
    policy: Policy,
}

impl AwsCloud {
    pub fn open(region: Option<String>) -> cloud::Result<AwsCloud> {
        let (runtime, config) = crate::aws::sdk(region)?;
        Ok(AwsCloud {
            asg: aws_sdk_autoscaling::Client::new(&config),
            elb: aws_sdk_elasticloadbalancingv2::Client::new(&config),
            ec2: aws_sdk_ec2::Client::new(&config),
            discovery: aws_sdk_servicediscovery::Client::new(&config),
            ssm: aws_sdk_ssm::Client::new(&config),
            metrics: aws_sdk_cloudwatch::Client::new(&config),
            dynamodb: aws_sdk_dynamodb::Client::new(&config),
            state_table: state::DEFAULT_TABLE.to_string(),
            table_ready: tokio::sync::OnceCell::new(),
            region: config.region().map(|r| r.to_string()).unwrap_or_default(),
            policy: Policy::from_env(),
            runtime,
        })
    }

    /// Keeps deploy locks and records in this DynamoDB table instead of the default one.
    pub fn with_state_table(mut self, table: String) -> AwsCloud {
        self.state_table = table;
        self
    }

    // Auto Scaling.

    /// The ASGs with these names, or those of this cluster.
    async fn describe_groups(
        &self,
        names: &[&str],
        cluster: Option<&str>,
    ) -> std::result::Result<Vec<AutoScalingGroup>, CallError> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let filter = cluster.map(|c| AsgFilter::builder().name(format!("tag:{CLUSTER_TAG}")).values(c).build());
        let mut groups = Vec::new();
        let mut token = None;
        loop {
            let page = retry(self.policy, "DescribeAutoScalingGroups", || {
                self.asg
                    .describe_auto_scaling_groups()
                    .set_auto_scaling_group_names((!names.is_empty()).then(|| names.clone()))
                    .set_filters(filter.clone().map(|f| vec![f]))
                    .set_next_token(token.clone())
                    .send()
            })
            .await?;
            groups.extend(page.auto_scaling_groups().iter().cloned());
            token = page.next_token().map(str::to_string);
            if token.is_none() {
                return Ok(groups);
            }
        }
    }

    async fn describe_group(&self, name: &str) -> std::result::Result<Option<AutoScalingGroup>, CallError> {
        Ok(self.describe_groups(&[name], None).await?.into_iter().next())
    }

    async fn group_or_fail(&self, name: &str) -> Result<AutoScalingGroup> {
        self.describe_group(name).await.context(CallSnafu)?.context(NoGroupSnafu { group: name })
    }

    async fn set_group_tags(&self, group: &str, tags: &[(&str, &str)]) -> Result<()> {
        let tags: Vec<AsgTag> = tags.iter().map(|(k, v)| asg_tag(group, k, v, false)).collect();
        retry(self.policy, "CreateOrUpdateTags", || {
            self.asg.create_or_update_tags().set_tags(Some(tags.clone())).send()
        })
        .await
        .context(CallSnafu)?;
        Ok(())
    }

    async fn delete_group_tag(&self, group: &str, key: &str) -> Result<()> {
        let tag = asg_tag(group, key, "", false);
        retry(self.policy, "DeleteTags", || self.asg.delete_tags().tags(tag.clone()).send())
            .await
            .context(CallSnafu)?;
        Ok(())
    }

    async fn resume(&self, group: &str) -> Result<()> {
        retry(self.policy, "ResumeProcesses", || self.asg.resume_processes().auto_scaling_group_name(group).send())
            .await
            .context(CallSnafu)?;
        Ok(())
    }
}

impl AwsCloud {
    /// Where a new group's instances go: the subnets given, else its ancestor's (its security
    /// groups belong to their VPC), else one default subnet per zone of the default VPC; over
    /// at least three zones either way.
    async fn subnets(&self, given: &[String], ancestor: Option<&AutoScalingGroup>) -> Result<Vec<String>> {
        let copied: Vec<String> = ancestor
            .and_then(|g| g.vpc_zone_identifier())
            .map(|z| z.split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect())
            .unwrap_or_default();
        let (given, what) = match (given.is_empty(), copied.is_empty()) {
            (false, _) => (given.to_vec(), format!("--subnets {} are", given.join(","))),
            (true, false) => {
                let name = ancestor.and_then(|g| g.auto_scaling_group_name()).unwrap_or_default();
                let what = format!("the subnets of {name} ({}), which a new group copies, are", copied.join(","));
                (copied, what)
            }
            (true, true) => (Vec::new(), "the default VPC has default subnets".to_string()),
        };
        let request = || {
            let describe = self.ec2.describe_subnets();
            match given.is_empty() {
                true => describe.filters(Ec2Filter::builder().name("default-for-az").values("true").build()),
                false => describe.set_subnet_ids(Some(given.clone())),
            }
        };
        let output = match retry(self.policy, "DescribeSubnets", || request().send()).await {
            Err(source) if source.is_not_found() => return Err(Error::NoSuchSubnet { what, source }),
            other => other.context(CallSnafu)?,
        };
        let mut by_zone: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for subnet in output.subnets() {
            if let (Some(zone), Some(id)) = (subnet.availability_zone(), subnet.subnet_id()) {
                by_zone.entry(zone.to_string()).or_default().push(id.to_string());
            }
        }
        if by_zone.len() < 3 {
            return TooFewZonesSnafu { what, zones: by_zone.into_keys().collect::<Vec<_>>() }.fail();
        }
        Ok(match given.is_empty() {
            true => by_zone.into_values().filter_map(|ids| ids.into_iter().next()).collect(),
            false => given,
        })
    }

    /// What `create` would fail on, found before anything is made: subnets missing or over
    /// fewer than three zones, a security group or key pair that is not there, nothing to check
    /// the group, a copied target group or registry service since deleted, and team user data
    /// (given, or the ancestor's) that cannot sit beside the registry part. A group that exists
    /// already (a rerun finishing what a killed run began) is taken as it is: nothing to check.
    async fn check(&self, spec: &GroupSpec) -> Result<Vec<String>> {
        if self.describe_group(&spec.name).await.context(CallSnafu)?.is_some() {
            return Ok(Vec::new());
        }
        let mut problems = Vec::new();
        let ancestor = match &spec.ancestor {
            Some(name) => self.describe_group(name).await.context(CallSnafu)?,
            None => None,
        };
        match self.subnets(&spec.subnets, ancestor.as_ref()).await {
            Err(problem @ (Error::TooFewZones { .. } | Error::NoSuchSubnet { .. })) => {
                problems.push(problem.to_string())
            }
            other => {
                other?;
            }
        }
        problems.extend(self.missing(&spec.launch).await?);
        let serving = Serving::of(spec, ancestor.as_ref());
        if serving.target_groups.is_empty() && serving.registry.is_none() {
            problems.push(Error::NoHealthCheck.to_string());
        }
        problems.extend(self.gone(spec, &serving).await?);
        let team = match (&spec.launch.user_data, ancestor.as_ref().and_then(|g| g.launch_template())) {
            _ if serving.registry.is_none() => None,
            (Some(given), _) => Some(given.clone()),
            (None, Some(template)) => {
                self.template_version(template).await?.and_then(|data| template_data::team_user_data(&data))
            }
            (None, None) => None,
        };
        if let Some(message) = team.as_deref().and_then(user_data::unmergeable) {
            problems.push(message.to_string());
        }
        Ok(problems)
    }

    /// The target groups a new group would join and the registry service it would copy that
    /// are not there (mistyped, or deleted by hand since the ancestor joined them).
    async fn gone(&self, spec: &GroupSpec, serving: &Serving) -> Result<Vec<String>> {
        let ancestor = spec.ancestor.as_deref().unwrap_or_default();
        let mut gone = Vec::new();
        for arn in &serving.target_groups {
            if self.target_group(Some(arn), None).await?.is_some() {
                continue;
            }
            gone.push(match spec.target_groups.is_empty() {
                true => format!(
                    "target group {arn} of {ancestor}, which a new group copies, no longer exists: give --target-group"
                ),
                false => format!("target group {arn} does not exist in {}", self.region),
            });
        }
        if let Some(Registry::Service(id)) = &serving.registry {
            if !self.service_exists(id).await? {
                gone.push(format!(
                    "Cloud Map service {id} of {ancestor}, which a new group copies, no longer exists: give --registry-namespace"
                ));
            }
        }
        Ok(gone)
    }

    /// The security groups and key pair a deploy names that are not there, so that a typo is
    /// refused before anything is made rather than when the group fails to launch.
    async fn missing(&self, given: &LaunchSettings) -> Result<Vec<String>> {
        let mut missing = Vec::new();
        if let Some(ids) = &given.security_groups {
            let filter = Ec2Filter::builder().name("group-id").set_values(Some(ids.clone())).build();
            let found = retry(self.policy, "DescribeSecurityGroups", || {
                self.ec2.describe_security_groups().filters(filter.clone()).send()
            })
            .await
            .context(CallSnafu)?;
            let found: BTreeSet<&str> = found.security_groups().iter().filter_map(|g| g.group_id()).collect();
            let absent = ids.iter().filter(|id| !found.contains(id.as_str()));
            missing.extend(absent.map(|id| format!("security group {id} does not exist in {}", self.region)));
        }
        if let Some(name) = &given.key_name {
            let found =
                retry(self.policy, "DescribeKeyPairs", || self.ec2.describe_key_pairs().key_names(name).send()).await;
            match found {
                Err(e) if e.is_not_found() => {
                    missing.push(format!("key pair {name} does not exist in {}", self.region))
                }
                other => {
                    other.context(CallSnafu)?;
                }
            }
        }
        Ok(missing)
    }

    /// Private addresses and launch times of these instances (a filter, not ids: a terminated
    /// one is no error).
    async fn addresses(&self, ids: &[String]) -> Result<BTreeMap<String, (String, Option<u64>)>> {
        if ids.is_empty() {
            return Ok(BTreeMap::new());
        }
        let filter = Ec2Filter::builder().name("instance-id").set_values(Some(ids.to_vec())).build();
        let output =
            retry(self.policy, "DescribeInstances", || self.ec2.describe_instances().filters(filter.clone()).send())
                .await
                .context(CallSnafu)?;
        Ok(output
            .reservations()
            .iter()
            .flat_map(|r| r.instances())
            .filter_map(|i| {
                let launched = i.launch_time().and_then(|t| u64::try_from(t.secs()).ok());
                Some((i.instance_id()?.to_string(), (i.private_ip_address()?.to_string(), launched)))
            })
            .collect())
    }

    // The trait's operations.

    async fn groups_of(&self, cluster: &str) -> Result<Vec<Group>> {
        let asgs = self.describe_groups(&[], Some(cluster)).await.context(CallSnafu)?;
        let mut health: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        for arn in asgs.iter().flat_map(|g| g.target_group_arns()) {
            if !health.contains_key(arn) {
                match self.target_health(arn).await {
                    // Deleted by hand while the group still names it: it checks nothing.
                    Err(e) if e.is_not_found() => {}
                    other => {
                        health.insert(arn.clone(), other.context(CallSnafu)?);
                    }
                }
            }
        }
        let ids: Vec<String> =
            asgs.iter().flat_map(|g| g.instances()).filter_map(|i| i.instance_id().map(str::to_string)).collect();
        let addresses = self.addresses(&ids).await?;
        let registered = self.registered_in(&asgs).await?;
        let mut groups: Vec<Group> = asgs.iter().map(|g| to_group(g, &health, &addresses, &registered)).collect();
        groups.sort_by(|a, b| (a.created, &a.name).cmp(&(b.created, &b.name)));
        Ok(groups)
    }

    /// The instances registered in the services these groups name, by instance id. A disabled
    /// group's instance found not held out of service (registering again may reset Cloud Map's
    /// custom health) is held again here: every read keeps the hold.
    async fn registered_in(&self, asgs: &[AutoScalingGroup]) -> Result<BTreeMap<String, Instance>> {
        let services: BTreeSet<&str> = asgs.iter().filter_map(|g| tag(g, SERVICE_TAG)).collect();
        let mut registered = BTreeMap::new();
        for service in services {
            for instance in self.registered(service).await? {
                registered.insert(instance.registration.instance_id.clone(), instance);
            }
        }
        for asg in asgs.iter().filter(|g| tag(g, DISABLED_AT_TAG).is_some()) {
            let Some(service) = tag(asg, SERVICE_TAG) else { continue };
            let loose: Vec<String> = member_ids(asg)
                .into_iter()
                .filter(|id| registered.get(id).is_some_and(|i| i.registration.status != registry::OUT_OF_SERVICE))
                .collect();
            self.hold_out_of_service(service, &loose, true).await?;
            for id in loose {
                if let Some(instance) = registered.remove(&id) {
                    registered.insert(id, Instance::new(instance.registration, true));
                }
            }
        }
        Ok(registered)
    }

    /// The group's user data when its instances register: what their agent reads (the
    /// instance's own id, address and zone it takes from the instance metadata).
    fn registration_user_data(&self, spec: &GroupSpec, app: &str, service: &str, port: Option<i32>) -> String {
        crate::instance::shell_env(&[
            ("REGISTRY_URL", &format!("cloudmap:{service}")),
            ("REGION", &self.region),
            ("APP", app),
            ("CLUSTER", &spec.cluster),
            ("GROUP", &spec.name),
            ("PORT", &port.unwrap_or(8080).to_string()),
            ("VERSION", &spec.image_id),
            ("HEALTH_PATH", &spec.health_url),
        ])
    }

    async fn create(&self, spec: &GroupSpec) -> Result<()> {
        let ancestor = self.ancestor(spec.ancestor.as_deref()).await?;
        if let Some(existing) = self.describe_group(&spec.name).await.context(CallSnafu)? {
            same_image(&spec.name, &existing, &spec.image_id)?;
            return self.copy_scaling(&spec.name, &ancestor).await;
        }
        let subnets = self.subnets(&spec.subnets, ancestor.group.as_ref()).await?;
        let serving = Serving::of(spec, ancestor.group.as_ref());
        let (mut service, mut user_data) = (None, None);
        if let Some(registry) = &serving.registry {
            let app = crate::launch::names::Cluster::parse(&spec.cluster)
                .context(ClusterNameSnafu { cluster: &spec.cluster })?
                .app;
            let id = match registry {
                Registry::Namespace(namespace) => self.ensure_service(namespace, &app).await?,
                Registry::Service(id) => id.clone(),
            };
            let port = match serving.target_groups.first() {
                Some(arn) => self.target_group(Some(arn), None).await?.and_then(|t| t.port()),
                None => None,
            };
            user_data = Some(self.registration_user_data(spec, &app, &id, port));
            service = Some(id);
        }
        let root_device = self.root_device(&spec.image_id).await?;
        let data = template_data::template_data(
            ancestor.template.as_ref(),
            &spec.launch,
            &spec.image_id,
            root_device.as_ref(),
            user_data.as_deref(),
        )?;
        let template_tags =
            vec![(CLUSTER_TAG.to_string(), spec.cluster.clone()), (IMAGE_TAG.to_string(), spec.image_id.clone())];
        if !self.create_template(&spec.name, data.clone(), &template_tags).await? {
            // No ASG uses it: left by a create that crashed. Another image's is replaced.
            if let Some((id, tags)) = self.template_id(&spec.name).await? {
                if tags.get(IMAGE_TAG) != Some(&spec.image_id) {
                    self.delete_template(Some(&id), None).await?;
                    self.create_template(&spec.name, data, &template_tags).await?;
                }
            }
        }
        let mut check = None;
        if let Some(first) = serving.target_groups.first() {
            check = Some(self.ensure_check_group(&spec.name, first, &spec.health_url).await?);
        }
        let mut tags = vec![
            asg_tag(&spec.name, "Name", &spec.name, true),
            asg_tag(&spec.name, CLUSTER_TAG, &spec.cluster, true),
            asg_tag(&spec.name, IMAGE_TAG, &spec.image_id, false),
            asg_tag(&spec.name, DEPLOY_ID_TAG, &spec.deploy_id, false),
        ];
        for (i, arn) in serving.target_groups.iter().enumerate() {
            tags.push(asg_tag(&spec.name, &format!("{TARGET_GROUP_TAG}{}", i + 1), arn, false));
        }
        if let Some(service) = &service {
            tags.push(asg_tag(&spec.name, SERVICE_TAG, service, false));
        }
        let copied = ancestor.group.as_ref();
        for t in copied.map_or(&[][..], |g| g.tags()) {
            let key = t.key().unwrap_or_default();
            if !(key.is_empty() || key == "Name" || key.starts_with("bakery:") || key.starts_with("aws:")) {
                tags.push(asg_tag(
                    &spec.name,
                    key,
                    t.value().unwrap_or_default(),
                    t.propagate_at_launch() == Some(true),
                ));
            }
        }
        // ELB where a check group checks the instances: one failing its check is replaced.
        let health_check_type = spec.launch.health_check_type.map(|t| t.as_str().to_string()).unwrap_or_else(|| {
            let default = if check.is_some() { "ELB" } else { "EC2" };
            copied.and_then(|g| g.health_check_type()).unwrap_or(default).to_string()
        });
        let grace = spec.launch.health_check_grace.map(|g| g.min(i32::MAX as u64) as i32);
        let grace = grace.or(copied.and_then(|g| g.health_check_grace_period())).unwrap_or(300);
        let copied_policies = copied.map(|g| g.termination_policies().to_vec()).filter(|p| !p.is_empty());
        let termination_policies = spec.launch.termination_policies.clone().or(copied_policies);
        let Capacity { min, max, desired } = spec.capacity;
        let created = retry(self.policy, "CreateAutoScalingGroup", || {
            self.asg
                .create_auto_scaling_group()
                .auto_scaling_group_name(&spec.name)
                .launch_template(
                    LaunchTemplateSpecification::builder()
                        .launch_template_name(templates::template_name(&spec.name))
                        .version("$Latest")
                        .build(),
                )
                .min_size(min as i32)
                .max_size(max as i32)
                .desired_capacity(desired as i32)
                .vpc_zone_identifier(subnets.join(","))
                .set_target_group_arns(check.clone().map(|c| vec![c]))
                .health_check_type(&health_check_type)
                .health_check_grace_period(grace)
                .set_termination_policies(termination_policies.clone())
                .set_default_cooldown(copied.and_then(|g| g.default_cooldown()))
                .set_tags(Some(tags.clone()))
                .send()
        })
        .await;
        match created {
            Err(e) if e.code.as_deref() == Some("AlreadyExists") => {
                same_image(&spec.name, &self.group_or_fail(&spec.name).await?, &spec.image_id)?
            }
            other => {
                other.context(CallSnafu)?;
            }
        }
        self.copy_scaling(&spec.name, &ancestor).await
    }

    async fn add(&self, group: &str) -> Result<()> {
        let asg = self.group_or_fail(group).await?;
        self.resume(group).await?;
        let wanted = cluster_target_groups(&asg);
        let missing: Vec<String> = wanted.iter().filter(|a| !asg.target_group_arns().contains(a)).cloned().collect();
        if !missing.is_empty() {
            retry(self.policy, "AttachLoadBalancerTargetGroups", || {
                self.asg
                    .attach_load_balancer_target_groups()
                    .auto_scaling_group_name(group)
                    .set_target_group_arns(Some(missing.clone()))
                    .send()
            })
            .await
            .context(CallSnafu)?;
        }
        // Targets start `initial`: the group serves only once they pass the balancer's checks.
        let what = format!("the instances of {group} healthy in its target groups");
        wait_for(&what, WAIT, || async {
            let call = |source| ec2_calls::Error::Call { source };
            let Some(asg) = self.describe_group(group).await.map_err(call)? else { return Ok(Some(())) };
            let in_service: Vec<&str> = asg
                .instances()
                .iter()
                .filter(|i| i.lifecycle_state().is_some_and(|s| s.as_str() == "InService"))
                .filter_map(|i| i.instance_id())
                .collect();
            for arn in &wanted {
                let health = self.target_health(arn).await.map_err(call)?;
                if in_service.iter().any(|id| health.get(*id).map(String::as_str) != Some("healthy")) {
                    return Ok(None);
                }
            }
            Ok(Some(()))
        })
        .await
        .context(WaitSnafu)?;
        if tag(&asg, IN_SERVICE_TAG).is_none() {
            self.set_group_tags(group, &[(IN_SERVICE_TAG, &now().to_string())]).await?;
        }
        if tag(&asg, DISABLED_AT_TAG).is_some() {
            self.delete_group_tag(group, DISABLED_AT_TAG).await?;
        }
        // Released once no longer tagged disabled, or a read in between would hold it again.
        if let Some(service) = tag(&asg, SERVICE_TAG) {
            self.hold_out_of_service(service, &member_ids(&asg), false).await?;
        }
        Ok(())
    }

    async fn remove(&self, group: &str, at: u64) -> Result<()> {
        // moto answers 500 to these calls on a missing group, AWS a ValidationError: look first.
        let Some(asg) = self.describe_group(group).await.context(CallSnafu)? else { return Ok(()) };
        let processes: Vec<String> = DISABLED_PROCESSES.iter().map(|p| p.to_string()).collect();
        retry(self.policy, "SuspendProcesses", || {
            self.asg
                .suspend_processes()
                .auto_scaling_group_name(group)
                .set_scaling_processes(Some(processes.clone()))
                .send()
        })
        .await
        .context(CallSnafu)?;
        // The check group stays: a rollback gates this group on it again.
        let attached: Vec<String> =
            cluster_target_groups(&asg).into_iter().filter(|a| asg.target_group_arns().contains(a)).collect();
        if !attached.is_empty() {
            retry(self.policy, "DetachLoadBalancerTargetGroups", || {
                self.asg
                    .detach_load_balancer_target_groups()
                    .auto_scaling_group_name(group)
                    .set_target_group_arns(Some(attached.clone()))
                    .send()
            })
            .await
            .context(CallSnafu)?;
        }
        if let Some(service) = tag(&asg, SERVICE_TAG) {
            self.hold_out_of_service(service, &member_ids(&asg), true).await?;
        }
        if tag(&asg, IN_SERVICE_TAG).is_some() {
            self.delete_group_tag(group, IN_SERVICE_TAG).await?;
        }
        // The soak counts from the first time it was disabled.
        if tag(&asg, DISABLED_AT_TAG).is_none() {
            self.set_group_tags(group, &[(DISABLED_AT_TAG, &at.to_string())]).await?;
        }
        Ok(())
    }

    async fn destroy(&self, group: &str) -> Result<()> {
        if let Some(asg) = self.describe_group(group).await.context(CallSnafu)? {
            // Instances that die without a clean stop would stay listed: the group takes them along.
            if let Some(service) = tag(&asg, SERVICE_TAG) {
                self.deregister(service, &member_ids(&asg)).await?;
            }
            self.delete_alarms(group).await?;
            let deleted = retry(self.policy, "DeleteAutoScalingGroup", || {
                self.asg.delete_auto_scaling_group().auto_scaling_group_name(group).force_delete(true).send()
            })
            .await;
            match deleted {
                Err(e) if group_missing(&e) => {}
                other => {
                    other.context(CallSnafu)?;
                }
            }
            // Its template and check group go only once nothing can launch from them.
            wait_for(&format!("{group} deleted"), WAIT, || async {
                let found = self.describe_group(group).await.map_err(|source| ec2_calls::Error::Call { source })?;
                Ok(found.is_none().then_some(()))
            })
            .await
            .context(WaitSnafu)?;
        }
        self.delete_check_group(group).await?;
        self.delete_template(None, Some(group)).await
    }

    async fn clusters_async(&self) -> Result<Vec<String>> {
        let filter = AsgFilter::builder().name("key").values(CLUSTER_TAG).build();
        let mut clusters = BTreeSet::new();
        let mut token = None;
        loop {
            let page = retry(self.policy, "DescribeTags", || {
                self.asg.describe_tags().filters(filter.clone()).set_next_token(token.clone()).send()
            })
            .await
            .context(CallSnafu)?;
            clusters.extend(page.tags().iter().filter_map(|t| t.value().map(str::to_string)));
            token = page.next_token().map(str::to_string);
            if token.is_none() {
                return Ok(clusters.into_iter().collect());
            }
        }
    }

    /// The listener of the newest group's first target group's load balancer.
    async fn balancer(&self, cluster: &str) -> Result<Option<String>> {
        let asgs = self.describe_groups(&[], Some(cluster)).await.context(CallSnafu)?;
        let newest = asgs.iter().max_by_key(|g| g.created_time().map(|t| t.secs()));
        let Some(arn) = newest.and_then(|g| cluster_target_groups(g).into_iter().next()) else { return Ok(None) };
        let Some(group) = self.target_group(Some(&arn), None).await? else { return Ok(None) };
        let Some(balancer) = group.load_balancer_arns().first() else { return Ok(None) };
        let output = retry(self.policy, "DescribeLoadBalancers", || {
            self.elb.describe_load_balancers().load_balancer_arns(balancer).send()
        })
        .await
        .context(CallSnafu)?;
        let Some(dns) = output.load_balancers().first().and_then(|b| b.dns_name()) else { return Ok(None) };
        let listeners = self.listeners(balancer).await?;
        let forwards = |l: &&Listener| l.default_actions().iter().any(|a| a.target_group_arn() == Some(arn.as_str()));
        let Some(listener) = listeners.iter().find(forwards).or(listeners.first()) else { return Ok(None) };
        let scheme = if listener.protocol() == Some(&ProtocolEnum::Https) { "https" } else { "http" };
        Ok(Some(match listener.port() {
            Some(80) if scheme == "http" => format!("http://{dns}"),
            Some(443) if scheme == "https" => format!("https://{dns}"),
            Some(port) => format!("{scheme}://{dns}:{port}"),
            None => format!("{scheme}://{dns}"),
        }))
    }
}

impl Cloud for AwsCloud {
    fn kind(&self) -> &'static str {
        "aws"
    }

    fn clusters(&self) -> cloud::Result<Vec<String>> {
        Ok(self.runtime.block_on(self.clusters_async())?)
    }

    fn groups(&self, cluster: &str) -> cloud::Result<Vec<Group>> {
        Ok(self.runtime.block_on(self.groups_of(cluster))?)
    }

    fn create_group(&self, spec: &GroupSpec) -> cloud::Result<()> {
        Ok(self.runtime.block_on(self.create(spec))?)
    }

    fn resize_group(&self, group: &str, capacity: Capacity) -> cloud::Result<()> {
        self.runtime.block_on(async {
            self.group_or_fail(group).await?;
            retry(self.policy, "UpdateAutoScalingGroup", || {
                self.asg
                    .update_auto_scaling_group()
                    .auto_scaling_group_name(group)
                    .min_size(capacity.min as i32)
                    .max_size(capacity.max as i32)
                    .desired_capacity(capacity.desired as i32)
                    .send()
            })
            .await
            .context(CallSnafu)?;
            Ok::<_, Error>(())
        })?;
        Ok(())
    }

    fn resume_group(&self, group: &str) -> cloud::Result<()> {
        self.runtime.block_on(async {
            self.group_or_fail(group).await?;
            self.resume(group).await
        })?;
        Ok(())
    }

    fn add_to_service(&self, group: &str) -> cloud::Result<()> {
        Ok(self.runtime.block_on(self.add(group))?)
    }

    fn remove_from_service(&self, group: &str, at: u64) -> cloud::Result<()> {
        Ok(self.runtime.block_on(self.remove(group, at))?)
    }

    fn destroy_group(&self, group: &str) -> cloud::Result<()> {
        Ok(self.runtime.block_on(self.destroy(group))?)
    }

    /// Over at least three zones, gated by something that checks it, and the team's user data
    /// able to sit beside the launcher's.
    fn check_group(&self, spec: &GroupSpec) -> cloud::Result<Vec<String>> {
        Ok(self.runtime.block_on(self.check(spec))?)
    }

    /// The group keeps its desired capacity and launches a replacement.
    fn terminate_instance(&self, _group: &str, instance: &str) -> cloud::Result<()> {
        self.runtime.block_on(async {
            retry(self.policy, "TerminateInstanceInAutoScalingGroup", || {
                self.asg
                    .terminate_instance_in_auto_scaling_group()
                    .instance_id(instance)
                    .should_decrement_desired_capacity(false)
                    .send()
            })
            .await
            .context(CallSnafu)
        })?;
        Ok(())
    }

    /// SSM Run Command on the instance: `tc netem` on its default interface, and a systemd
    /// timer on the instance that removes it at the end, whatever happens to the launcher. The
    /// image needs the SSM agent and iproute2, and the instance a role that lets SSM in.
    fn inject_latency(
        &self,
        _group: &str,
        instance: &str,
        delay: Duration,
        jitter: Duration,
        until: u64,
    ) -> cloud::Result<()> {
        let seconds = until.saturating_sub(now()).max(1);
        let script = latency_script(delay, jitter, seconds);
        self.runtime.block_on(async {
            retry(self.policy, "SendCommand", || {
                self.ssm
                    .send_command()
                    .instance_ids(instance)
                    .document_name("AWS-RunShellScript")
                    .parameters("commands", vec![script.clone()])
                    .comment("bakery Latency Monkey")
                    .timeout_seconds(60)
                    .send()
            })
            .await
            .context(CallSnafu)
        })?;
        Ok(())
    }

    fn acquire_lock(&self, cluster: &str, holder: &LockHolder) -> cloud::Result<Option<LockHolder>> {
        Ok(self.runtime.block_on(self.acquire(cluster, holder))?)
    }

    fn release_lock(&self, cluster: &str, deploy_id: &str) -> cloud::Result<()> {
        Ok(self.runtime.block_on(self.release(cluster, deploy_id))?)
    }

    fn save_deploy(&self, record: &DeployRecord) -> cloud::Result<()> {
        Ok(self.runtime.block_on(self.save(record))?)
    }

    fn load_deploy(&self, cluster: &str) -> cloud::Result<Option<DeployRecord>> {
        Ok(self.runtime.block_on(self.load(cluster))?)
    }

    fn history(&self, cluster: &str) -> cloud::Result<Vec<DeployRecord>> {
        Ok(self.runtime.block_on(self.history_of(cluster))?)
    }

    fn lock_holder(&self, cluster: &str) -> cloud::Result<Option<LockHolder>> {
        let holder = self.runtime.block_on(self.holder(cluster))?;
        Ok(holder.filter(|h| !h.is_stale_here(now())))
    }

    fn retire_cluster(&self, _cluster: &str) -> cloud::Result<()> {
        // The load balancer and target groups belong to the user; the groups are gone.
        Ok(())
    }

    fn balancer_url(&self, cluster: &str) -> Option<String> {
        self.runtime.block_on(self.balancer(cluster)).ok().flatten()
    }

    fn traffic(&self, _cluster: &str, group: &str, window: Duration) -> cloud::Result<Option<Traffic>> {
        Ok(self.runtime.block_on(self.traffic_of(group, window))?)
    }

    /// In the launcher's table, shared by every host.
    fn chaos_store(&self, _state_dir: &std::path::Path) -> Box<dyn crate::launch::chaos::ChaosStore + '_> {
        Box::new(chaos_state::TableChaos { cloud: self })
    }

    fn image_references(&self) -> cloud::Result<Vec<cloud::ImageReference>> {
        let mut references = cloud::cluster_references(self)?;
        references.extend(self.runtime.block_on(self.account_references())?);
        Ok(references)
    }

    fn registrations(&self, cluster: Option<&str>) -> cloud::Result<Vec<Instance>> {
        let found = self.runtime.block_on(async {
            let asgs = match cluster {
                Some(cluster) => self.describe_groups(&[], Some(cluster)).await.context(CallSnafu)?,
                None => {
                    let mut asgs = Vec::new();
                    for cluster in self.clusters_async().await? {
                        asgs.extend(self.describe_groups(&[], Some(&cluster)).await.context(CallSnafu)?);
                    }
                    asgs
                }
            };
            self.registered_in(&asgs).await
        })?;
        Ok(found.into_values().filter(|i| cluster.is_none_or(|c| i.registration.cluster == c)).collect())
    }
}

/// The shell an instance runs for Latency Monkey: netem on the default route's interface, and
/// its removal scheduled on the instance itself.
fn latency_script(delay: Duration, jitter: Duration, seconds: u64) -> String {
    format!(
        "set -e\n\
         dev=$(ip route show default | awk '{{print $5; exit}}')\n\
         tc qdisc replace dev \"$dev\" root netem delay {}ms {}ms\n\
         systemd-run --on-active={seconds} --unit=bakery-latency-end-$(date +%s) tc qdisc del dev \"$dev\" root\n",
        delay.as_millis(),
        jitter.as_millis()
    )
}

fn member_ids(asg: &AutoScalingGroup) -> Vec<String> {
    asg.instances().iter().filter_map(|i| i.instance_id().map(str::to_string)).collect()
}

fn asg_tag(group: &str, key: &str, value: &str, propagate: bool) -> AsgTag {
    AsgTag::builder()
        .resource_id(group)
        .resource_type("auto-scaling-group")
        .key(key)
        .value(value)
        .propagate_at_launch(propagate)
        .build()
}

fn tag<'a>(group: &'a AutoScalingGroup, key: &str) -> Option<&'a str> {
    group.tags().iter().find(|t| t.key() == Some(key)).and_then(TagDescription::value)
}

/// What checks a new group's instances and finds them: the target groups and registry the
/// deploy names, else each of its ancestor's (as Spinnaker copies load balancers).
struct Serving {
    target_groups: Vec<String>,
    registry: Option<Registry>,
}

enum Registry {
    /// A Cloud Map namespace, where the app's service is made if it is not there.
    Namespace(String),
    /// The ancestor's service, by id.
    Service(String),
}

impl Serving {
    fn of(spec: &GroupSpec, ancestor: Option<&AutoScalingGroup>) -> Serving {
        let target_groups = match ancestor {
            Some(ancestor) if spec.target_groups.is_empty() => cluster_target_groups(ancestor),
            _ => spec.target_groups.clone(),
        };
        let registry = match (&spec.registry_namespace, ancestor.and_then(|a| tag(a, SERVICE_TAG))) {
            (Some(namespace), _) => Some(Registry::Namespace(namespace.clone())),
            (None, Some(service)) => Some(Registry::Service(service.to_string())),
            (None, None) => None,
        };
        Serving { target_groups, registry }
    }
}

/// The cluster's target groups the group joins when in service, in the order given.
fn cluster_target_groups(group: &AutoScalingGroup) -> Vec<String> {
    let mut numbered: Vec<(u32, String)> = group
        .tags()
        .iter()
        .filter_map(|t| Some((t.key()?.strip_prefix(TARGET_GROUP_TAG)?.parse().ok()?, t.value()?.to_string())))
        .collect();
    numbered.sort();
    numbered.into_iter().map(|(_, arn)| arn).collect()
}

/// `items` as a request field: None rather than an empty list.
fn nonempty<T: Clone>(items: &[T]) -> Option<Vec<T>> {
    (!items.is_empty()).then(|| items.to_vec())
}

fn same_image(name: &str, group: &AutoScalingGroup, image_id: &str) -> Result<()> {
    let image = tag(group, IMAGE_TAG).unwrap_or_default();
    snafu::ensure!(image == image_id, ExistsSnafu { group: name, image });
    Ok(())
}

/// ELBv2 target group names: at most 32 characters of `[A-Za-z0-9-]`, so a digest of the group.
fn to_group(
    asg: &AutoScalingGroup,
    health: &BTreeMap<String, BTreeMap<String, String>>,
    addresses: &BTreeMap<String, (String, Option<u64>)>,
    registered: &BTreeMap<String, Instance>,
) -> Group {
    let registers = tag(asg, SERVICE_TAG).is_some();
    let attached: Vec<&BTreeMap<String, String>> =
        asg.target_group_arns().iter().filter_map(|arn| health.get(arn)).collect();
    let members = asg
        .instances()
        .iter()
        .filter_map(|i| {
            let id = i.instance_id()?.to_string();
            let lifecycle = i.lifecycle_state().map(|s| s.as_str()).unwrap_or_default();
            let states: Vec<Option<&str>> = attached.iter().map(|h| h.get(&id).map(String::as_str)).collect();
            let entry = registered.get(&id);
            // What the agent reports, not the launcher's hold: a disabled group passes its
            // rollback gate while still held out of service.
            let reported_up = !registers || entry.is_some_and(|e| e.reported_status == registry::UP);
            let health = if i.health_status() == Some("Unhealthy")
                || lifecycle.starts_with("Terminat")
                || states.contains(&Some("unhealthy"))
            {
                Health::Unhealthy
            } else if lifecycle == "InService" && states.iter().all(|s| *s == Some("healthy")) && reported_up {
                Health::Healthy
            } else {
                Health::Starting
            };
            let (address, launched) = addresses.get(&id).cloned().unzip();
            let zone = i.availability_zone().unwrap_or_default().to_string();
            let registry_status = entry.map(|e| e.registration.status.clone());
            Some(Member { id, zone, health, address, registry_status, launched: launched.flatten() })
        })
        .collect();
    let wanted = cluster_target_groups(asg);
    let suspended = asg.suspended_processes().iter().filter_map(|p| p.process_name()).collect::<Vec<_>>();
    Group {
        name: asg.auto_scaling_group_name().unwrap_or_default().to_string(),
        image_id: tag(asg, IMAGE_TAG).unwrap_or_default().to_string(),
        created: asg.created_time().map_or(0, |t| t.secs().max(0) as u64),
        capacity: Capacity {
            min: asg.min_size().unwrap_or_default().max(0) as u32,
            max: asg.max_size().unwrap_or_default().max(0) as u32,
            desired: asg.desired_capacity().unwrap_or_default().max(0) as u32,
        },
        in_service: tag(asg, IN_SERVICE_TAG).is_some()
            && wanted.iter().all(|arn| asg.target_group_arns().contains(arn)),
        suspended: DISABLED_PROCESSES.iter().any(|p| suspended.contains(p)),
        disabled_at: tag(asg, DISABLED_AT_TAG).and_then(|t| t.parse().ok()),
        deploy_id: tag(asg, DEPLOY_ID_TAG).map(str::to_string),
        registers,
        // The group's activity history says what it replaced; not read here.
        replacements: Vec::new(),
        members,
    }
}

/// The items of every page `page` reads (given the cursor where the last one stopped: a next
/// token, a last key), until one is the last or `limit` items are there.
async fn paged<T, C, F, Fut>(limit: Option<usize>, mut page: F) -> Result<Vec<T>>
where
    F: FnMut(Option<C>) -> Fut,
    Fut: std::future::Future<Output = Result<(Vec<T>, Option<C>)>>,
{
    let mut items = Vec::new();
    let mut cursor = None;
    loop {
        let (found, next) = page(cursor).await?;
        items.extend(found);
        cursor = next;
        if cursor.is_none() || limit.is_some_and(|l| items.len() >= l) {
            return Ok(items);
        }
    }
}

fn group_missing(error: &CallError) -> bool {
    error.code.as_deref() == Some("ValidationError") && error.message.contains("not found")
}

fn ignore_missing<T>(result: std::result::Result<T, CallError>) -> Result<()> {
    match result {
        Err(e) if e.is_not_found() => Ok(()),
        other => other.map(|_| ()).context(CallSnafu),
    }
}

//! The launch template data of a new group: its ancestor's (see `ancestor`), turned from what
//! EC2 reports into what it accepts, with the deploy's settings, the new image and the
//! launcher's user data over it.
//!
//! What belongs to the old group or to one place is not carried over: the old image's root
//! snapshot, a placement's zone or host (the group spreads over its subnets' zones), a network
//! interface's subnet, id and explicit addresses and prefixes (each instance gets its own; the
//! counts are copied), CPU options for another instance type, and credit options for one that
//! is not burstable. Nor are an interface's ENA Express and connection tracking settings.

use super::*;
use crate::launch::cloud::LaunchSettings;
use aws_sdk_ec2::types::{
    CreditSpecificationRequest, LaunchTemplateBlockDeviceMapping, LaunchTemplateBlockDeviceMappingRequest,
    LaunchTemplateCpuOptions, LaunchTemplateCpuOptionsRequest, LaunchTemplateEbsBlockDeviceRequest,
    LaunchTemplateIamInstanceProfileSpecificationRequest, LaunchTemplateInstanceMetadataOptions,
    LaunchTemplateInstanceNetworkInterfaceSpecification, LaunchTemplateInstanceNetworkInterfaceSpecificationRequest,
    LaunchTemplatePlacement, LaunchTemplatePlacementRequest, LaunchTemplateTagSpecificationRequest,
    LaunchTemplatesMonitoringRequest, ResponseLaunchTemplateData,
};

/// A new group's image's root device.
pub(super) struct RootDevice {
    pub name: String,
    pub size_gib: Option<i32>,
}

/// The launch template data of a new group: the ancestor's, with `given` over it, the image,
/// and the user data (the ancestor's team part unless given, beside the launcher's `ours`).
pub(super) fn template_data(
    ancestor: Option<&ResponseLaunchTemplateData>,
    given: &LaunchSettings,
    image_id: &str,
    root_device: Option<&RootDevice>,
    ours: Option<&str>,
) -> Result<RequestLaunchTemplateData> {
    let from = ancestor.cloned().unwrap_or_else(|| ResponseLaunchTemplateData::builder().build());
    let team = given.user_data.clone().or_else(|| team_user_data(&from));
    let merged = user_data::merge(team.as_deref(), ours).map_err(|message| Error::UserData { message })?;
    let user_data = merged.map(|d| base64::engine::general_purpose::STANDARD.encode(d));
    let instance_type = given
        .instance_type
        .as_deref()
        .map(InstanceType::from)
        .or(from.instance_type().cloned())
        .unwrap_or(InstanceType::T3Small);
    let interfaces = network_interfaces(from.network_interfaces(), given.security_groups.as_deref());
    // With network interfaces, EC2 takes security groups only on them.
    let (security_group_ids, security_groups) = match &given.security_groups {
        _ if !interfaces.is_empty() => (None, None),
        Some(ids) => (Some(ids.clone()), None),
        None => (nonempty(from.security_group_ids()), nonempty(from.security_groups())),
    };
    let mappings: Vec<_> = from.block_device_mappings().iter().map(|m| block_device(m, root_device)).collect();
    let tag_specifications: Vec<_> = from
        .tag_specifications()
        .iter()
        .map(|t| {
            LaunchTemplateTagSpecificationRequest::builder()
                .set_resource_type(t.resource_type().cloned())
                .set_tags(nonempty(t.tags()))
                .build()
        })
        .collect();
    Ok(RequestLaunchTemplateData::builder()
        .image_id(image_id)
        .instance_type(instance_type.clone())
        .set_user_data(user_data)
        .set_security_group_ids(security_group_ids)
        .set_security_groups(security_groups)
        .set_network_interfaces(nonempty(&interfaces))
        .set_iam_instance_profile(instance_profile(given.instance_profile.as_deref(), &from))
        .set_key_name(given.key_name.clone().or(from.key_name().map(str::to_string)))
        .metadata_options(metadata_options(from.metadata_options()))
        .set_block_device_mappings(nonempty(&mappings))
        .set_tag_specifications(nonempty(&tag_specifications))
        .set_monitoring(
            from.monitoring().map(|m| LaunchTemplatesMonitoringRequest::builder().set_enabled(m.enabled()).build()),
        )
        .set_ebs_optimized(from.ebs_optimized())
        .set_placement(from.placement().map(placement))
        // Core and thread counts are valid for the type they were chosen for.
        .set_cpu_options(from.cpu_options().filter(|_| from.instance_type() == Some(&instance_type)).map(cpu_options))
        .set_credit_specification(from.credit_specification().filter(|_| is_burstable(&instance_type)).map(|c| {
            CreditSpecificationRequest::builder().set_cpu_credits(c.cpu_credits().map(str::to_string)).build()
        }))
        .build())
}

/// T2, T3, T3a, T4g: the types that earn CPU credits.
fn is_burstable(instance_type: &InstanceType) -> bool {
    instance_type.as_str().starts_with('t')
}

/// The team's part of a launch template's user data.
pub(super) fn team_user_data(data: &ResponseLaunchTemplateData) -> Option<Vec<u8>> {
    let decoded = base64::engine::general_purpose::STANDARD.decode(data.user_data()?).ok()?;
    user_data::team_part(&decoded)
}

/// The given profile (an ARN or a name), else the ancestor's.
fn instance_profile(
    given: Option<&str>,
    from: &ResponseLaunchTemplateData,
) -> Option<LaunchTemplateIamInstanceProfileSpecificationRequest> {
    let builder = LaunchTemplateIamInstanceProfileSpecificationRequest::builder();
    match given {
        Some(arn) if arn.starts_with("arn:") => Some(builder.arn(arn).build()),
        Some(name) => Some(builder.name(name).build()),
        None => from
            .iam_instance_profile()
            .map(|p| builder.set_arn(p.arn().map(str::to_string)).set_name(p.name().map(str::to_string)).build()),
    }
}

/// The ancestor's metadata options; IMDSv2 only when there is no ancestor.
fn metadata_options(
    from: Option<&LaunchTemplateInstanceMetadataOptions>,
) -> LaunchTemplateInstanceMetadataOptionsRequest {
    match from {
        None => LaunchTemplateInstanceMetadataOptionsRequest::builder()
            .http_tokens(LaunchTemplateHttpTokensState::Required)
            .http_endpoint(LaunchTemplateInstanceMetadataEndpointState::Enabled)
            .build(),
        Some(m) => LaunchTemplateInstanceMetadataOptionsRequest::builder()
            .set_http_tokens(m.http_tokens().cloned())
            .set_http_put_response_hop_limit(m.http_put_response_hop_limit())
            .set_http_endpoint(m.http_endpoint().cloned())
            .set_instance_metadata_tags(m.instance_metadata_tags().cloned())
            .build(),
    }
}

/// A copied mapping of the root device drops its snapshot (the old image's) and asks for no
/// less than the new image's root volume.
fn block_device(
    mapping: &LaunchTemplateBlockDeviceMapping,
    root_device: Option<&RootDevice>,
) -> LaunchTemplateBlockDeviceMappingRequest {
    let root = root_device.filter(|r| mapping.device_name() == Some(r.name.as_str()));
    let ebs = mapping.ebs().map(|e| {
        LaunchTemplateEbsBlockDeviceRequest::builder()
            .set_encrypted(e.encrypted())
            .set_delete_on_termination(e.delete_on_termination())
            .set_iops(e.iops())
            .set_kms_key_id(e.kms_key_id().map(str::to_string))
            .set_snapshot_id(e.snapshot_id().filter(|_| root.is_none()).map(str::to_string))
            .set_volume_size(match root.and_then(|r| r.size_gib) {
                Some(least) => e.volume_size().map(|size| size.max(least)),
                None => e.volume_size(),
            })
            .set_volume_type(e.volume_type().cloned())
            .set_throughput(e.throughput())
            .build()
    });
    LaunchTemplateBlockDeviceMappingRequest::builder()
        .set_device_name(mapping.device_name().map(str::to_string))
        .set_virtual_name(mapping.virtual_name().map(str::to_string))
        .set_no_device(mapping.no_device().map(str::to_string))
        .set_ebs(ebs)
        .build()
}

/// The ancestor's interfaces without what is one instance's own (subnet, addresses, id);
/// security groups given replace those of the primary interface (the lowest card and index).
fn network_interfaces(
    from: &[LaunchTemplateInstanceNetworkInterfaceSpecification],
    given_security_groups: Option<&[String]>,
) -> Vec<LaunchTemplateInstanceNetworkInterfaceSpecificationRequest> {
    let position = |n: &LaunchTemplateInstanceNetworkInterfaceSpecification| {
        (n.network_card_index().unwrap_or(0), n.device_index().unwrap_or(0))
    };
    let primary = from.iter().map(position).min();
    from.iter()
        .map(|n| {
            let groups = match given_security_groups {
                Some(given) if Some(position(n)) == primary => Some(given.to_vec()),
                _ => nonempty(n.groups()),
            };
            LaunchTemplateInstanceNetworkInterfaceSpecificationRequest::builder()
                .set_device_index(n.device_index())
                .set_network_card_index(n.network_card_index())
                .set_associate_public_ip_address(n.associate_public_ip_address())
                .set_delete_on_termination(n.delete_on_termination())
                .set_description(n.description().map(str::to_string))
                .set_groups(groups)
                .set_interface_type(n.interface_type().map(str::to_string))
                .set_ipv6_address_count(n.ipv6_address_count())
                .set_secondary_private_ip_address_count(n.secondary_private_ip_address_count())
                .set_ipv4_prefix_count(n.ipv4_prefix_count())
                .set_ipv6_prefix_count(n.ipv6_prefix_count())
                .set_primary_ipv6(n.primary_ipv6())
                .set_ena_queue_count(n.ena_queue_count())
                .build()
        })
        .collect()
}

/// The ancestor's placement group, tenancy and affinity; not its zone or host.
fn placement(from: &LaunchTemplatePlacement) -> LaunchTemplatePlacementRequest {
    LaunchTemplatePlacementRequest::builder()
        .set_group_name(from.group_name().map(str::to_string))
        .set_group_id(from.group_id().map(str::to_string))
        .set_partition_number(from.partition_number())
        .set_spread_domain(from.spread_domain().map(str::to_string))
        .set_tenancy(from.tenancy().cloned())
        .set_affinity(from.affinity().map(str::to_string))
        .set_host_resource_group_arn(from.host_resource_group_arn().map(str::to_string))
        .build()
}

fn cpu_options(from: &LaunchTemplateCpuOptions) -> LaunchTemplateCpuOptionsRequest {
    LaunchTemplateCpuOptionsRequest::builder()
        .set_core_count(from.core_count())
        .set_threads_per_core(from.threads_per_core())
        .set_amd_sev_snp(from.amd_sev_snp().cloned())
        .set_nested_virtualization(from.nested_virtualization().cloned())
        .build()
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_sdk_ec2::types::{LaunchTemplateEbsBlockDevice, LaunchTemplateIamInstanceProfileSpecification, Tenancy};

    #[test]
    fn a_copy_keeps_the_ancestors_settings_under_what_is_given() {
        let team =
            user_data::merge(Some(b"#!/bin/sh\necho team\n"), Some("REGISTRY_URL='cloudmap:old'\n")).unwrap().unwrap();
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
        let root = RootDevice { name: "/dev/xvda".into(), size_gib: Some(30) };
        let data = template_data(Some(&ancestor), &given, "ami-new", Some(&root), Some("REGISTRY_URL='x'\n")).unwrap();
        assert_eq!(data.image_id(), Some("ami-new"));
        assert_eq!(data.instance_type(), Some(&InstanceType::M5Large));
        assert_eq!(data.security_group_ids(), ["sg-1"]);
        assert_eq!(data.key_name(), Some("new"));
        assert_eq!(data.iam_instance_profile().and_then(|p| p.name()), Some("hello"));
        let mappings = data.block_device_mappings();
        assert_eq!(mappings[0].ebs().unwrap().snapshot_id(), None, "the old root snapshot is not carried over");
        assert_eq!(mappings[0].ebs().unwrap().volume_size(), Some(30), "no smaller than the new image's root");
        assert_eq!(mappings[1].ebs().unwrap().snapshot_id(), Some("snap-data"));
        let decoded = base64::engine::general_purpose::STANDARD.decode(data.user_data().unwrap()).unwrap();
        assert_eq!(user_data::team_part(&decoded).as_deref(), Some(&b"#!/bin/sh\necho team\n"[..]));
        let text = String::from_utf8(decoded).unwrap();
        assert!(text.contains("REGISTRY_URL='x'") && !text.contains("cloudmap:old"), "{text}");

        let first = template_data(None, &LaunchSettings::default(), "ami-1", None, None).unwrap();
        assert_eq!(first.instance_type(), Some(&InstanceType::T3Small));
        assert_eq!(first.user_data(), None);
        let imds = first.metadata_options().unwrap();
        assert_eq!(imds.http_tokens(), Some(&LaunchTemplateHttpTokensState::Required));
    }

    #[test]
    fn placement_cpu_credits_and_interfaces_are_copied_without_what_is_one_instance_s() {
        let ancestor = ResponseLaunchTemplateData::builder()
            .instance_type(InstanceType::T3Micro)
            .security_group_ids("sg-top")
            .placement(
                LaunchTemplatePlacement::builder()
                    .availability_zone("us-east-1a")
                    .host_id("h-1")
                    .group_name("spread")
                    .tenancy(Tenancy::Dedicated)
                    .build(),
            )
            .cpu_options(LaunchTemplateCpuOptions::builder().core_count(2).threads_per_core(1).build())
            .credit_specification(aws_sdk_ec2::types::CreditSpecification::builder().cpu_credits("unlimited").build())
            .network_interfaces(
                LaunchTemplateInstanceNetworkInterfaceSpecification::builder()
                    .device_index(0)
                    .subnet_id("subnet-old")
                    .private_ip_address("10.0.0.5")
                    .network_interface_id("eni-old")
                    .groups("sg-old")
                    .associate_public_ip_address(true)
                    .build(),
            )
            .network_interfaces(
                LaunchTemplateInstanceNetworkInterfaceSpecification::builder()
                    .device_index(1)
                    .groups("sg-data")
                    .build(),
            )
            .build();
        let copied = template_data(Some(&ancestor), &LaunchSettings::default(), "ami-new", None, None).unwrap();
        let placement = copied.placement().unwrap();
        assert_eq!((placement.group_name(), placement.tenancy()), (Some("spread"), Some(&Tenancy::Dedicated)));
        assert_eq!((placement.availability_zone(), placement.host_id()), (None, None), "not one zone or host");
        let cpu = copied.cpu_options().unwrap();
        assert_eq!((cpu.core_count(), cpu.threads_per_core()), (Some(2), Some(1)));
        assert_eq!(copied.credit_specification().and_then(|c| c.cpu_credits()), Some("unlimited"));
        let primary = &copied.network_interfaces()[0];
        assert_eq!(
            (primary.subnet_id(), primary.private_ip_address(), primary.network_interface_id()),
            (None, None, None)
        );
        assert_eq!(
            (primary.groups(), primary.associate_public_ip_address()),
            (&["sg-old".to_string()][..], Some(true))
        );
        assert!(copied.security_group_ids().is_empty(), "security groups sit on the interfaces");

        let given = LaunchSettings { security_groups: Some(vec!["sg-new".into()]), ..LaunchSettings::default() };
        let overridden = template_data(Some(&ancestor), &given, "ami-new", None, None).unwrap();
        assert_eq!(overridden.network_interfaces()[0].groups(), ["sg-new"], "the primary interface takes the flag");
        assert_eq!(overridden.network_interfaces()[1].groups(), ["sg-data"], "another keeps its own");
        assert!(overridden.security_group_ids().is_empty());

        let bigger = LaunchSettings { instance_type: Some("m5.large".into()), ..LaunchSettings::default() };
        let resized = template_data(Some(&ancestor), &bigger, "ami-new", None, None).unwrap();
        assert!(resized.cpu_options().is_none(), "core counts were for the old type");
        assert!(resized.credit_specification().is_none(), "an m5 earns no CPU credits");
    }

    #[test]
    fn given_security_groups_go_on_the_lowest_interface_when_none_is_index_0() {
        let interface = |index: i32, group: &str| {
            LaunchTemplateInstanceNetworkInterfaceSpecification::builder().device_index(index).groups(group).build()
        };
        let copied = network_interfaces(&[interface(2, "sg-2"), interface(1, "sg-1")], Some(&["sg-new".to_string()]));
        let groups: Vec<&[String]> = copied.iter().map(|n| n.groups()).collect();
        assert_eq!(groups, [&["sg-2".to_string()][..], &["sg-new".to_string()][..]]);
    }
}

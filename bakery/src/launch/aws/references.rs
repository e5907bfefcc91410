//! What can launch an image in the account besides the clusters' groups: every version of every
//! launch template, every launch configuration, and every instance not terminated. `bakery
//! images prune` never deletes an image one of these names.

use super::*;
use crate::launch::cloud::ImageReference;

/// Instances in these states can run again from their image (a stopped one starts again).
const LIVE_STATES: [&str; 4] = ["pending", "running", "stopping", "stopped"];

impl AwsCloud {
    pub(super) async fn account_references(&self) -> Result<Vec<ImageReference>> {
        let mut references = self.template_references().await?;
        references.extend(self.configuration_references().await?);
        references.extend(self.instance_references().await?);
        Ok(references)
    }

    async fn template_references(&self) -> Result<Vec<ImageReference>> {
        let templates = paged(None, |token| async move {
            let page = retry(self.policy, "DescribeLaunchTemplates", || {
                self.ec2.describe_launch_templates().set_next_token(token.clone()).send()
            })
            .await
            .context(CallSnafu)?;
            Ok((page.launch_templates().to_vec(), page.next_token().map(str::to_string)))
        })
        .await?;
        let mut references = Vec::new();
        for template in &templates {
            let Some(id) = template.launch_template_id() else { continue };
            let name = template.launch_template_name().unwrap_or(id);
            // Every version: any of them can be launched by name and number.
            let versions = paged(None, |token| async move {
                let page = retry(self.policy, "DescribeLaunchTemplateVersions", || {
                    self.ec2
                        .describe_launch_template_versions()
                        .launch_template_id(id)
                        .set_next_token(token.clone())
                        .send()
                })
                .await
                .context(CallSnafu)?;
                Ok((page.launch_template_versions().to_vec(), page.next_token().map(str::to_string)))
            })
            .await?;
            references.extend(versions.iter().filter_map(|version| {
                let image = version.launch_template_data()?.image_id()?;
                let number = version.version_number().unwrap_or_default();
                Some(ImageReference::new(image, format!("launch template {name} version {number}")))
            }));
        }
        Ok(references)
    }

    async fn configuration_references(&self) -> Result<Vec<ImageReference>> {
        let configurations = paged(None, |token| async move {
            let page = retry(self.policy, "DescribeLaunchConfigurations", || {
                self.asg.describe_launch_configurations().set_next_token(token.clone()).send()
            })
            .await
            .context(CallSnafu)?;
            Ok((page.launch_configurations().to_vec(), page.next_token().map(str::to_string)))
        })
        .await?;
        Ok(configurations
            .iter()
            .filter_map(|c| {
                let name = c.launch_configuration_name().unwrap_or_default();
                Some(ImageReference::new(c.image_id()?, format!("launch configuration {name}")))
            })
            .collect())
    }

    async fn instance_references(&self) -> Result<Vec<ImageReference>> {
        let states = Ec2Filter::builder()
            .name("instance-state-name")
            .set_values(Some(LIVE_STATES.map(String::from).to_vec()))
            .build();
        let states = &states;
        let reservations = paged(None, |token| async move {
            let page = retry(self.policy, "DescribeInstances", || {
                self.ec2.describe_instances().filters(states.clone()).set_next_token(token.clone()).send()
            })
            .await
            .context(CallSnafu)?;
            Ok((page.reservations().to_vec(), page.next_token().map(str::to_string)))
        })
        .await?;
        Ok(reservations
            .iter()
            .flat_map(|r| r.instances())
            .filter_map(|instance| {
                let (image, id) = (instance.image_id()?, instance.instance_id()?);
                let state = instance.state().and_then(|s| s.name()).map_or("", |s| s.as_str());
                Some(ImageReference::new(image, format!("instance {id} ({state})")))
            })
            .collect())
    }
}

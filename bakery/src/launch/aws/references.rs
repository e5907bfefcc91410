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
        let mut references = Vec::new();
        let mut token = None;
        loop {
            let page = retry(self.policy, "DescribeLaunchTemplates", || {
                self.ec2.describe_launch_templates().set_next_token(token.clone()).send()
            })
            .await
            .context(CallSnafu)?;
            for template in page.launch_templates() {
                let Some(id) = template.launch_template_id() else { continue };
                let name = template.launch_template_name().unwrap_or(id);
                let mut versions_token = None;
                loop {
                    let versions = retry(self.policy, "DescribeLaunchTemplateVersions", || {
                        self.ec2
                            .describe_launch_template_versions()
                            .launch_template_id(id)
                            .set_next_token(versions_token.clone())
                            .send()
                    })
                    .await
                    .context(CallSnafu)?;
                    for version in versions.launch_template_versions() {
                        let Some(image) = version.launch_template_data().and_then(|d| d.image_id()) else { continue };
                        let number = version.version_number().unwrap_or_default();
                        references.push(ImageReference {
                            image_id: image.to_string(),
                            by: format!("launch template {name} version {number}"),
                            serving: false,
                        });
                    }
                    versions_token = versions.next_token().map(str::to_string);
                    if versions_token.is_none() {
                        break;
                    }
                }
            }
            token = page.next_token().map(str::to_string);
            if token.is_none() {
                return Ok(references);
            }
        }
    }

    async fn configuration_references(&self) -> Result<Vec<ImageReference>> {
        let mut references = Vec::new();
        let mut token = None;
        loop {
            let page = retry(self.policy, "DescribeLaunchConfigurations", || {
                self.asg.describe_launch_configurations().set_next_token(token.clone()).send()
            })
            .await
            .context(CallSnafu)?;
            references.extend(page.launch_configurations().iter().filter_map(|c| {
                Some(ImageReference {
                    image_id: c.image_id()?.to_string(),
                    by: format!("launch configuration {}", c.launch_configuration_name().unwrap_or_default()),
                    serving: false,
                })
            }));
            token = page.next_token().map(str::to_string);
            if token.is_none() {
                return Ok(references);
            }
        }
    }

    async fn instance_references(&self) -> Result<Vec<ImageReference>> {
        let states = Ec2Filter::builder()
            .name("instance-state-name")
            .set_values(Some(LIVE_STATES.map(String::from).to_vec()))
            .build();
        let mut references = Vec::new();
        let mut token = None;
        loop {
            let page = retry(self.policy, "DescribeInstances", || {
                self.ec2.describe_instances().filters(states.clone()).set_next_token(token.clone()).send()
            })
            .await
            .context(CallSnafu)?;
            for instance in page.reservations().iter().flat_map(|r| r.instances()) {
                let (Some(image), Some(id)) = (instance.image_id(), instance.instance_id()) else { continue };
                let state = instance.state().and_then(|s| s.name()).map_or("", |s| s.as_str());
                references.push(ImageReference {
                    image_id: image.to_string(),
                    by: format!("instance {id} ({state})"),
                    serving: false,
                });
            }
            token = page.next_token().map(str::to_string);
            if token.is_none() {
                return Ok(references);
            }
        }
    }
}

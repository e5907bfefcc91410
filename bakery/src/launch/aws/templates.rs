//! Launch templates: one per group (its Frigga name); before the state table, also one that held
//! a cluster's deploy record in its tags (read once and migrated).

use super::*;

/// Longest launch template name EC2 accepts.
const MAX_TEMPLATE_NAME: usize = 128;

/// The launch template name for `name` (a group's Frigga name, or an old record's template).
/// Template names allow letters, digits and `().-/_` only; Frigga names may also hold `~` and
/// `^`, which become `(7e)` and `(5e)` (no Frigga name holds a parenthesis, so no two names
/// meet), and a name still too long keeps its start and ends in a hash of the whole.
pub(super) fn template_name(name: &str) -> String {
    let mut encoded = String::with_capacity(name.len());
    for c in name.chars() {
        match c {
            'A'..='Z' | 'a'..='z' | '0'..='9' | '.' | '-' | '/' | '_' => encoded.push(c),
            other => encoded.push_str(&format!("({:x})", u32::from(other))),
        }
    }
    if encoded.len() > MAX_TEMPLATE_NAME {
        let hash = hex::encode(Sha256::digest(name.as_bytes()));
        encoded = format!("{}-{}", &encoded[..MAX_TEMPLATE_NAME - 33], &hash[..32]);
    }
    encoded
}

impl AwsCloud {
    pub(super) async fn template_id(&self, name: &str) -> Result<Option<(String, BTreeMap<String, String>)>> {
        let found = retry(self.policy, "DescribeLaunchTemplates", || {
            self.ec2.describe_launch_templates().launch_template_names(template_name(name)).send()
        })
        .await;
        let output = match found {
            Err(e) if e.is_not_found() => return Ok(None),
            other => other.context(CallSnafu)?,
        };
        Ok(output.launch_templates().first().map(|t| {
            let tags = t.tags().iter().filter_map(|t| Some((t.key()?.to_string(), t.value()?.to_string())));
            (t.launch_template_id().unwrap_or_default().to_string(), tags.collect())
        }))
    }

    /// The template's current tags. DescribeTags, because moto's DescribeLaunchTemplates shows
    /// only the tags given at creation. A resource has at most 50 tags: one page.
    pub(super) async fn template_tags(&self, id: &str) -> Result<BTreeMap<String, String>> {
        let output = retry(self.policy, "DescribeTags", || {
            self.ec2.describe_tags().filters(Ec2Filter::builder().name("resource-id").values(id).build()).send()
        })
        .await
        .context(CallSnafu)?;
        Ok(output.tags().iter().filter_map(|t| Some((t.key()?.to_string(), t.value()?.to_string()))).collect())
    }

    /// Creates the template with `tags` in the same request; Ok(false) when the name is taken.
    pub(super) async fn create_template(
        &self,
        name: &str,
        data: RequestLaunchTemplateData,
        tags: &[(String, String)],
    ) -> Result<bool> {
        let spec = TagSpecification::builder()
            .resource_type(ResourceType::LaunchTemplate)
            .set_tags(Some(tags.iter().map(|(k, v)| Ec2Tag::builder().key(k).value(v).build()).collect()))
            .build();
        let created = retry(self.policy, "CreateLaunchTemplate", || {
            self.ec2
                .create_launch_template()
                .launch_template_name(template_name(name))
                .launch_template_data(data.clone())
                .tag_specifications(spec.clone())
                .send()
        })
        .await;
        match created {
            Err(e) if e.code.as_deref().is_some_and(|c| c.contains("AlreadyExists")) => Ok(false),
            other => other.map(|_| true).context(CallSnafu),
        }
    }

    pub(super) async fn delete_template(&self, id: Option<&str>, name: Option<&str>) -> Result<()> {
        ignore_missing(
            retry(self.policy, "DeleteLaunchTemplate", || {
                self.ec2
                    .delete_launch_template()
                    .set_launch_template_id(id.map(str::to_string))
                    .set_launch_template_name(name.map(template_name))
                    .send()
            })
            .await,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_names_are_valid_for_every_frigga_name_and_never_meet() {
        let valid = |n: &str| {
            (3..=MAX_TEMPLATE_NAME).contains(&n.len())
                && n.chars().all(|c| c.is_ascii_alphanumeric() || "().-/_".contains(c))
        };
        assert_eq!(template_name("hello-prod-v001"), "hello-prod-v001");
        assert_eq!(template_name("bakery-lock-hello-prod"), "bakery-lock-hello-prod");
        let odd = template_name("hello-prod-canary~1^a-v000");
        assert_eq!(odd, "hello-prod-canary(7e)1(5e)a-v000");
        assert_ne!(template_name("a-b~c-v000"), template_name("a-b^c-v000"));
        let long = format!("hello-prod-{}-v000", "~".repeat(80));
        for name in [odd.as_str(), &template_name(&long), &template_name(&format!("bakery-deploys-{long}"))] {
            assert!(valid(name), "{name}");
        }
        assert_ne!(template_name(&long), template_name(&long.replace("v000", "v001")));
    }
}

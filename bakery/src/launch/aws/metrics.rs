//! A group's traffic for the watched soak, from the CloudWatch metrics the Application Load
//! Balancer publishes for the cluster's first target group: `RequestCount` and
//! `HTTPCode_Target_5XX_Count` (sums) and `TargetResponseTime` (p99, in seconds).
//!
//! Target groups are the cluster's, not a group's: only the group in service sends them traffic
//! (red/black), so the figures are the serving group's, counted from when it went into service
//! (the `bakery:in-service` tag) so that the old group's last requests are not blamed on the new
//! one. ALB metrics come in whole minutes, so the first minute after a flip still mixes both.

use super::*;
use crate::launch::soak::Traffic;
use aws_sdk_cloudwatch::primitives::DateTime;
use aws_sdk_cloudwatch::types::{Dimension, Metric, MetricDataQuery, MetricStat};

const NAMESPACE: &str = "AWS/ApplicationELB";
/// The finest period ALB metrics have.
const PERIOD_SECS: u64 = 60;

impl AwsCloud {
    /// The serving group's figures over `window` (None when `group` is not in service or the
    /// cluster has no target group).
    pub(super) async fn traffic_of(&self, group: &str, window: Duration) -> Result<Option<Traffic>> {
        let Some(asg) = self.describe_group(group).await.context(CallSnafu)? else { return Ok(None) };
        let Some(since) = tag(&asg, IN_SERVICE_TAG).and_then(|t| t.parse::<u64>().ok()) else { return Ok(None) };
        let Some(target_group) = cluster_target_groups(&asg).into_iter().next() else { return Ok(None) };
        let Some(model) = self.target_group(Some(&target_group), None).await? else { return Ok(None) };
        // CloudWatch names them by the ARNs' resource parts, the balancer's without `loadbalancer/`.
        let mut dimensions = vec![dimension("TargetGroup", resource(&target_group))];
        if let Some(balancer) = model.load_balancer_arns().first() {
            let balancer = resource(balancer);
            dimensions.push(dimension("LoadBalancer", balancer.strip_prefix("loadbalancer/").unwrap_or(balancer)));
        }
        // Through the current second: a datapoint stamped a moment ago counts.
        let end = now() + 1;
        let start = end.saturating_sub(window.as_secs()).max(since).min(end - 1);
        // One period covering the window: sums add up, and the p99 is the window's.
        let period = (end - start).div_ceil(PERIOD_SECS).max(1) * PERIOD_SECS;
        let query = |id: &str, name: &str, stat: &str| {
            let metric =
                Metric::builder().namespace(NAMESPACE).metric_name(name).set_dimensions(Some(dimensions.clone()));
            let stat = MetricStat::builder().metric(metric.build()).period(period as i32).stat(stat).build();
            MetricDataQuery::builder().id(id).metric_stat(stat).return_data(true).build()
        };
        let queries = vec![
            query("requests", "RequestCount", "Sum"),
            query("errors", "HTTPCode_Target_5XX_Count", "Sum"),
            query("p99", "TargetResponseTime", "p99"),
        ];
        let mut values: BTreeMap<String, Vec<f64>> = BTreeMap::new();
        let mut token = None;
        loop {
            let page = retry(self.policy, "GetMetricData", || {
                self.metrics
                    .get_metric_data()
                    .set_metric_data_queries(Some(queries.clone()))
                    .start_time(DateTime::from_secs(start as i64))
                    .end_time(DateTime::from_secs(end as i64))
                    .set_next_token(token.clone())
                    .send()
            })
            .await
            .context(CallSnafu)?;
            for result in page.metric_data_results() {
                let id = result.id().unwrap_or_default().to_string();
                values.entry(id).or_default().extend(result.values().iter().copied());
            }
            token = page.next_token().map(str::to_string);
            if token.is_none() {
                break;
            }
        }
        let sum = |id: &str| values.get(id).map_or(0.0, |v| v.iter().sum::<f64>()).max(0.0).round() as u64;
        let p99_secs = values.get("p99").map_or(0.0, |v| v.iter().copied().fold(0.0, f64::max));
        Ok(Some(Traffic {
            requests: sum("requests"),
            errors: sum("errors"),
            p99_ms: (p99_secs * 1000.0).round() as u64,
            window_secs: end - start,
        }))
    }
}

/// An ARN's resource part (`targetgroup/NAME/ID`, `loadbalancer/app/NAME/ID`).
fn resource(arn: &str) -> &str {
    arn.splitn(6, ':').nth(5).unwrap_or(arn)
}

fn dimension(name: &str, value: &str) -> Dimension {
    Dimension::builder().name(name).value(value).build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dimensions_are_the_arns_resource_parts() {
        assert_eq!(resource("arn:aws:elasticloadbalancing:us-east-1:1:targetgroup/hello/abc"), "targetgroup/hello/abc");
        assert_eq!(
            resource("arn:aws:elasticloadbalancing:us-east-1:1:loadbalancer/app/hello/def"),
            "loadbalancer/app/hello/def"
        );
    }
}

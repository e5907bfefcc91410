//! PLACEHOLDER: a copy of the launcher's provider interface sketch, so that the local provider
//! compiles on this branch. The real file comes from the launcher core and replaces this one.

use serde::{Deserialize, Serialize};

pub type Error = Box<dyn std::error::Error + Send + Sync>;
pub type Result<T> = std::result::Result<T, Error>;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    pub min: u32,
    pub max: u32,
    pub desired: u32,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    Starting,
    Healthy,
    Unhealthy,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Member {
    pub id: String,
    pub zone: String,
    pub health: Health,
    pub address: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Group {
    pub name: String,
    pub image_id: String,
    pub created: u64,
    pub capacity: Capacity,
    pub in_service: bool,
    pub suspended: bool,
    pub disabled_at: Option<u64>,
    pub deploy_id: Option<String>,
    pub members: Vec<Member>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GroupSpec {
    pub name: String,
    pub cluster: String,
    pub image_id: String,
    pub instance_type: String,
    pub capacity: Capacity,
    pub subnets: Vec<String>,
    pub target_groups: Vec<String>,
    pub health_url: String,
    pub deploy_id: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LockHolder {
    pub deploy_id: String,
    pub owner: String,
    pub host: String,
    pub pid: u32,
    pub start_time: u64,
    pub expires: u64,
}

/// Placeholder for the engine's record: only `cluster` is read here.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeployRecord {
    pub cluster: String,
    #[serde(flatten)]
    pub rest: serde_json::Map<String, serde_json::Value>,
}

pub trait Cloud: Send + Sync {
    fn kind(&self) -> &'static str;
    fn clusters(&self) -> Result<Vec<String>>;
    fn groups(&self, cluster: &str) -> Result<Vec<Group>>;
    fn create_group(&self, spec: &GroupSpec) -> Result<()>;
    fn resize_group(&self, group: &str, capacity: Capacity) -> Result<()>;
    fn add_to_service(&self, group: &str) -> Result<()>;
    fn remove_from_service(&self, group: &str, at: u64) -> Result<()>;
    fn destroy_group(&self, group: &str) -> Result<()>;
    fn acquire_lock(&self, cluster: &str, holder: &LockHolder) -> Result<Option<LockHolder>>;
    fn release_lock(&self, cluster: &str, deploy_id: &str) -> Result<()>;
    fn save_deploy(&self, record: &DeployRecord) -> Result<()>;
    fn load_deploy(&self, cluster: &str) -> Result<Option<DeployRecord>>;
    fn balancer_url(&self, cluster: &str) -> Option<String>;
}

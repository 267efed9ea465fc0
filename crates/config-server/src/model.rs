//! The control-plane model: replication policies (POL), replication groups (RG), recovery plans,
//! with their validation rules. Stored as JSON documents (`ferry-store`).

use crate::errors::ApiError;

pub const POLICY: &str = "policy";
pub const GROUP: &str = "replication-group";
pub const PLAN: &str = "recovery-plan";

/// Names travel in URLs and become file names elsewhere: the data path's rule applies.
pub fn check_name(what: &str, name: &str) -> Result<(), ApiError> {
    ferry_types::validate_name(what, name).map_err(ApiError::bad)
}

pub use ferry_api::config_server::{
    Action, PlanGroup, Policy, RecoveryPlan, ReplicationGroup, MAX_PLAN_GROUPS, MAX_PLAN_MACHINES,
};

//! The control-plane model: replication policies (POL), replication groups (RG), recovery plans,
//! with their validation rules. Stored as JSON documents (`ferry-store`).

use std::collections::HashSet;

use serde::{Deserialize, Serialize};

use crate::errors::{self, ApiError};

pub const POLICY: &str = "policy";
pub const GROUP: &str = "replication-group";
pub const PLAN: &str = "recovery-plan";

/// Names travel in URLs and become file names elsewhere: the data path's rule applies.
pub fn check_name(what: &str, name: &str) -> Result<(), ApiError> {
    ferry_types::validate_name(what, name).map_err(ApiError::bad)
}

/// A replication policy (POL-1).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub name: String,
    /// RPO threshold: exceeding it raises an event only; it never changes replication.
    #[serde(default = "default_rpo")]
    pub rpo_threshold_secs: u64,
    #[serde(default = "default_retention")]
    pub retention_secs: u64,
    #[serde(default = "default_app")]
    pub app_consistent_secs: u64,
    #[serde(default = "default_crash")]
    pub crash_consistent_secs: u64,
    /// Set on the failback policy made with a forward policy (POL-2); read-only.
    #[serde(default)]
    pub failback_of: Option<String>,
    #[serde(default)]
    pub read_only: bool,
    /// Associated with the configuration server (failback policies always are).
    #[serde(default = "yes")]
    pub associated: bool,
}

fn default_rpo() -> u64 {
    3600
}
fn default_retention() -> u64 {
    86_400
}
fn default_app() -> u64 {
    3600
}
fn default_crash() -> u64 {
    300
}
fn yes() -> bool {
    true
}

impl Policy {
    pub fn validate(&self) -> Result<(), ApiError> {
        check_name("policy", &self.name)?;
        if self.name.ends_with("-failback") && self.failback_of.is_none() {
            return Err(ApiError::bad(format!(
                "policy names ending in -failback are reserved for the failback policies Ferry creates (POL-2): rename {:?}",
                self.name
            )));
        }
        for (field, v, min) in [
            ("rpo_threshold_secs", self.rpo_threshold_secs, 1),
            ("retention_secs", self.retention_secs, 60),
            ("crash_consistent_secs", self.crash_consistent_secs, 1),
        ] {
            if v < min {
                return Err(ApiError::bad(format!("{field} = {v} is below the minimum of {min} s")));
            }
        }
        Ok(())
    }

    /// The failback policy of a forward policy (POL-2): 15 min / 24 h / 60 min, read-only.
    pub fn failback_for(forward: &Policy) -> Policy {
        Policy {
            name: format!("{}-failback", forward.name),
            rpo_threshold_secs: 15 * 60,
            retention_secs: 24 * 3600,
            app_consistent_secs: 60 * 60,
            crash_consistent_secs: 300,
            failback_of: Some(forward.name.clone()),
            read_only: true,
            associated: true,
        }
    }
}

/// A replication group: machines that share multi-machine recovery points (RG-1, RG-2).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ReplicationGroup {
    pub name: String,
    pub machines: Vec<String>,
    #[serde(default)]
    pub policy: Option<String>,
}

impl ReplicationGroup {
    pub fn validate(&self) -> Result<(), ApiError> {
        check_name("replication group", &self.name)?;
        if self.machines.is_empty() {
            return Err(ApiError::bad(format!("replication group {} names no machines", self.name)));
        }
        let mut seen = HashSet::new();
        for m in &self.machines {
            check_name("machine", m)?;
            if !seen.insert(m) {
                return Err(ApiError::bad(format!("machine {m} is listed twice in replication group {}", self.name)));
            }
        }
        Ok(())
    }
}

/// A pre- or post-action of a recovery-plan group.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Action {
    /// A command run by the configuration server (`sh -c`); a non-zero exit fails the job.
    Script {
        name: String,
        command: String,
        #[serde(default = "default_script_timeout")]
        timeout_secs: u64,
    },
    /// An instruction for a person: the job waits in "waiting for input" until confirmed.
    Manual { name: String, instruction: String },
}

fn default_script_timeout() -> u64 {
    600
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PlanGroup {
    #[serde(default)]
    pub machines: Vec<String>,
    #[serde(default)]
    pub replication_groups: Vec<String>,
    #[serde(default)]
    pub pre_actions: Vec<Action>,
    #[serde(default)]
    pub post_actions: Vec<Action>,
}

/// A recovery plan: up to 7 ordered groups, up to 100 machines.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RecoveryPlan {
    pub name: String,
    pub groups: Vec<PlanGroup>,
}

pub const MAX_PLAN_GROUPS: usize = 7;
pub const MAX_PLAN_MACHINES: usize = 100;

impl RecoveryPlan {
    /// `group_machines` resolves a replication group's machines.
    pub fn validate(&self, group_machines: impl Fn(&str) -> Option<Vec<String>>) -> Result<(), ApiError> {
        check_name("recovery plan", &self.name)?;
        let limit = |m: String| ApiError::new(axum::http::StatusCode::BAD_REQUEST, errors::LIMIT_EXCEEDED, m);
        if self.groups.is_empty() {
            return Err(ApiError::bad(format!("recovery plan {} has no groups", self.name)));
        }
        if self.groups.len() > MAX_PLAN_GROUPS {
            return Err(limit(format!(
                "recovery plan {} has {} groups; at most {MAX_PLAN_GROUPS}",
                self.name,
                self.groups.len()
            )));
        }
        let mut machines = HashSet::new();
        let mut rgs = HashSet::new();
        for (i, g) in self.groups.iter().enumerate() {
            for a in g.pre_actions.iter().chain(&g.post_actions) {
                let (Action::Script { name, .. } | Action::Manual { name, .. }) = a;
                if name.trim().is_empty() {
                    return Err(ApiError::bad(format!("an action of group {} has no name", i + 1)));
                }
            }
            for rg in &g.replication_groups {
                check_name("replication group", rg)?;
                if !rgs.insert(rg.clone()) {
                    return Err(limit(format!(
                        "replication group {rg} appears in more than one group of plan {}",
                        self.name
                    )));
                }
                let members = group_machines(rg).ok_or_else(|| {
                    ApiError::bad(format!(
                        "replication group {rg} (group {} of plan {}) does not exist",
                        i + 1,
                        self.name
                    ))
                })?;
                for m in members {
                    if !machines.insert(m.clone()) {
                        return Err(limit(format!("machine {m} appears more than once in plan {}", self.name)));
                    }
                }
            }
            for m in &g.machines {
                check_name("machine", m)?;
                if !machines.insert(m.clone()) {
                    return Err(limit(format!("machine {m} appears more than once in plan {}", self.name)));
                }
            }
        }
        if machines.len() > MAX_PLAN_MACHINES {
            return Err(limit(format!(
                "recovery plan {} has {} machines; at most {MAX_PLAN_MACHINES}",
                self.name,
                machines.len()
            )));
        }
        Ok(())
    }
}

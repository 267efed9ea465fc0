//! The process server's status.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::route::{get, Role, Route};

/// `GET /status` of a process server (inside [`crate::control::ComponentStatus`]).
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
pub struct ProcessServerStatus {
    pub listen: String,
    /// Its configuration server link: settings age, unreachable since, revocations held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_server_link: Option<crate::control::ServerLinkStatus>,
    /// The address agents should use.
    pub advertise: String,
    pub settings: ProcessServerSettings,
    pub cache_capacity_bytes: u64,
    pub spool_bytes: u64,
    pub free_percent: u8,
    /// Agents are asked to slow down (the cache is below its free-space threshold).
    pub throttling: bool,
    pub filesystem_available_bytes: u64,
    pub machines: Vec<SpoolStatus>,
    /// Spools deleted for a disabled protection, per machine (for the orders it was given).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub removed_machines: BTreeMap<String, crate::control::RemovedMachine>,
}

/// What the configuration server set while running.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ProcessServerSettings {
    /// Where each machine's changes go.
    #[serde(default)]
    pub machine_master_targets: BTreeMap<String, MasterTargetRoute>,
}

/// Where one machine's changes go.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MasterTargetRoute {
    pub address: String,
    /// Name in that master target's certificate.
    pub name: String,
    /// The identity (`agent/M@site`) of the only certificate whose holder may stream this
    /// machine to the process server: the one the configuration server issued to its agent.
    /// None (a hand-written route): any agent certificate naming the machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent: Option<String>,
}

/// One machine's spool.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct SpoolStatus {
    pub machine: String,
    pub agent_connected: bool,
    pub master_target_connected: bool,
    pub master_target_error: Option<String>,
    /// Highest seq durable in this spool (acknowledged to the agent).
    pub spooled_seq: u64,
    /// Highest seq sent to the master target.
    pub forwarded_seq: u64,
    /// Highest seq durable at the master target.
    pub target_durable_seq: u64,
    pub applied_seq: u64,
    pub spool_bytes: u64,
    pub throttled: bool,
    pub receive_bytes_per_sec: f64,
    pub forward_bytes_per_sec: f64,
    pub lag_seconds: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessServerEndpoint {
    Status,
}

/// Every route of the process server's status listener.
pub const ROUTES: &[Route<ProcessServerEndpoint>] = &[get::<_, crate::control::ComponentStatus>(
    ProcessServerEndpoint::Status,
    "/status",
    Role::Local,
    "The process server's status: cache, spools, routes",
)];

//! A site's inventory as the local provider describes it (`site.toml`) and discovery fills it in
//! (sizes, free space, accessibility), as `GET /api/v1/inventory` shows it.

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SiteFile {
    #[serde(default)]
    pub hosts: Vec<Host>,
    #[serde(default)]
    pub datastores: Vec<Datastore>,
    #[serde(default)]
    pub networks: Vec<Network>,
    #[serde(default)]
    pub machines: Vec<Machine>,
    #[serde(default)]
    pub master_targets: Vec<MasterTargetMachine>,
    #[serde(default)]
    pub process_servers: Vec<ProcessServerMachine>,
    #[serde(default)]
    pub credentials: Vec<Credential>,
    /// How this site starts its machines; a site without it only records power states.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub power: Option<PowerCommand>,
}

/// The program a site runs to start a machine (its "hypervisor"), in its own process group, with
/// `{dir}` replaced by the machine's run folder (`<site>/guests/<machine>/`, which holds the
/// `machine.toml` the provider writes) and `{machine}` by its name. Power-off sends it SIGTERM
/// (it must shut the machine down cleanly), crash sends its process group SIGKILL.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PowerCommand {
    pub on: Vec<String>,
    /// Opaque settings copied into every machine's `machine.toml` (`[extra]`), merged with the
    /// machine's own `extra`.
    #[serde(default, skip_serializing_if = "toml::Table::is_empty")]
    #[schemars(with = "serde_json::Map<String, serde_json::Value>")]
    pub extra: toml::Table,
}

/// What power-on writes to `<run folder>/machine.toml` for the started program.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MachineFile {
    pub machine: String,
    pub os_family: String,
    /// Disk files (absolute), in the machine's order (the top of any snapshot chain).
    pub disks: Vec<(String, PathBuf)>,
    /// The site's `[power.extra]` merged with the machine's `extra` (the machine's keys win).
    #[serde(default)]
    #[schemars(with = "serde_json::Map<String, serde_json::Value>")]
    pub extra: toml::Table,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Host {
    pub name: String,
    #[serde(default)]
    pub edition: String,
    #[serde(default)]
    pub licence: String,
    #[serde(default)]
    pub tools: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Datastore {
    pub name: String,
    /// `vmfs`, `vsan` or `nfs`.
    pub kind: String,
    /// Folder (relative to the site folder).
    pub path: PathBuf,
    #[serde(default)]
    pub hosts: Vec<String>,
    /// `read-write` or `read-only`.
    #[serde(default = "rw")]
    pub access: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accessible: Option<bool>,
}

fn rw() -> String {
    "read-write".into()
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Network {
    pub name: String,
    #[serde(default)]
    pub subnet: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Nic {
    pub network: String,
    /// `static` or `dhcp`.
    #[serde(default = "dhcp")]
    pub addressing: String,
    #[serde(default)]
    pub ip: Option<String>,
}

fn dhcp() -> String {
    "dhcp".into()
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    pub name: String,
    /// Sparse image file (relative to the site folder).
    pub path: PathBuf,
    #[serde(default)]
    pub uuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allocated: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Machine {
    pub name: String,
    /// `linux` or `windows`.
    pub os_family: String,
    #[serde(default)]
    pub os: String,
    pub host: String,
    #[serde(default)]
    pub nics: Vec<Nic>,
    #[serde(default)]
    pub disks: Vec<Disk>,
    #[serde(default = "pvscsi")]
    pub controller: String,
    #[serde(default)]
    pub snapshots: Vec<String>,
    /// `on` or `off`.
    #[serde(default = "off")]
    pub power: String,
    /// Opaque settings for the program that runs the machine (see [`PowerCommand`]).
    #[serde(default, skip_serializing_if = "toml::Table::is_empty")]
    #[schemars(with = "serde_json::Map<String, serde_json::Value>")]
    pub extra: toml::Table,
}

fn pvscsi() -> String {
    "pvscsi".into()
}
fn lsilogic() -> String {
    "lsilogic-sas".into()
}
fn off() -> String {
    "off".into()
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MasterTargetMachine {
    pub name: String,
    pub os_family: String,
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub attached_disks: u32,
    /// LSI Logic unless said otherwise (a failback master target is built with it, MT-9).
    #[serde(default = "lsilogic")]
    pub controller: String,
    /// `disk.EnableUUID` (needed so disks can be matched by UUID, MT-3).
    #[serde(default)]
    pub enable_uuid: bool,
    /// Candidate retention volume folders (relative to the site folder).
    #[serde(default)]
    pub retention_volumes: Vec<PathBuf>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub retention_free_bytes: Vec<Option<u64>>,
    /// Disk files attached to it (failback writes to them), relative to the site folder.
    #[serde(default)]
    pub attached: Vec<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProcessServerMachine {
    pub name: String,
    /// Cache folder (relative to the site folder).
    pub cache: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_free_percent: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    pub name: String,
    pub user: String,
    /// Read-only credentials can protect and fail over but not reprotect (RP-5).
    #[serde(default)]
    pub read_only: bool,
}

/// A discovered site.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Inventory {
    pub site: String,
    pub folder: PathBuf,
    pub discovered_ms: u64,
    pub content: SiteFile,
    /// Problems found (a missing disk file, an inaccessible datastore).
    pub warnings: Vec<String>,
}

//! Inventory through a site-provider interface. The first provider is the **local** one: a site is
//! a folder described by `site.toml` (hosts, datastores, networks, machines, master-target and
//! process-server machines, credentials); discovery reads it and looks at the real files (disk
//! images, datastore folders, retention volumes, process-server caches) the way a hypervisor
//! inventory would be queried.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// What every site provider answers.
pub trait SiteProvider {
    fn discover(&self) -> Result<Inventory, String>;
}

#[derive(Debug, Clone, Serialize, Deserialize)]
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
}

#[derive(Debug, Clone, Serialize, Deserialize)]
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

#[derive(Debug, Clone, Serialize, Deserialize)]
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
    #[serde(default)]
    pub free_bytes: Option<u64>,
    #[serde(default)]
    pub accessible: Option<bool>,
}

fn rw() -> String {
    "read-write".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Network {
    pub name: String,
    #[serde(default)]
    pub subnet: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
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

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Disk {
    pub name: String,
    /// Sparse image file (relative to the site folder).
    pub path: PathBuf,
    #[serde(default)]
    pub uuid: Option<String>,
    #[serde(default)]
    pub size: Option<u64>,
    #[serde(default)]
    pub allocated: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
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
}

fn pvscsi() -> String {
    "pvscsi".into()
}
fn off() -> String {
    "off".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MasterTargetMachine {
    pub name: String,
    pub os_family: String,
    #[serde(default)]
    pub host: String,
    #[serde(default)]
    pub attached_disks: u32,
    #[serde(default = "pvscsi")]
    pub controller: String,
    /// `disk.EnableUUID` (needed so disks can be matched by UUID, MT-3).
    #[serde(default)]
    pub enable_uuid: bool,
    /// Candidate retention volume folders (relative to the site folder).
    #[serde(default)]
    pub retention_volumes: Vec<PathBuf>,
    #[serde(default)]
    pub retention_free_bytes: Vec<Option<u64>>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessServerMachine {
    pub name: String,
    /// Cache folder (relative to the site folder).
    pub cache: PathBuf,
    #[serde(default)]
    pub cache_free_percent: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credential {
    pub name: String,
    pub user: String,
    /// Read-only credentials can protect and fail over but not reprotect (RP-5).
    #[serde(default)]
    pub read_only: bool,
}

/// A discovered site.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Inventory {
    pub site: String,
    pub folder: PathBuf,
    pub discovered_ms: u64,
    pub content: SiteFile,
    /// Problems found (a missing disk file, an inaccessible datastore).
    pub warnings: Vec<String>,
}

pub struct LocalSite {
    pub name: String,
    pub folder: PathBuf,
}

fn statvfs(path: &Path) -> Option<(u64, u64)> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs writes into a zeroed struct we own; the path is a valid C string.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        return None;
    }
    Some((s.f_bavail as u64 * s.f_frsize as u64, s.f_blocks as u64 * s.f_frsize as u64))
}

impl SiteProvider for LocalSite {
    fn discover(&self) -> Result<Inventory, String> {
        let file = self.folder.join("site.toml");
        let meta = std::fs::metadata(&file)
            .map_err(|e| format!("cannot read {}: {e} (a local site is a folder with a site.toml)", file.display()))?;
        if !meta.is_file() || meta.len() > 4 << 20 {
            return Err(format!("{} must be a regular file of at most 4 MiB", file.display()));
        }
        let text = std::fs::read_to_string(&file)
            .map_err(|e| format!("cannot read {}: {e} (a local site is a folder with a site.toml)", file.display()))?;
        let mut site: SiteFile = toml::from_str(&text).map_err(|e| format!("{} is invalid: {e}", file.display()))?;
        let mut warnings = Vec::new();
        // Every path stays inside the site folder.
        let paths = site
            .datastores
            .iter()
            .map(|d| &d.path)
            .chain(site.machines.iter().flat_map(|m| m.disks.iter().map(|d| &d.path)))
            .chain(site.master_targets.iter().flat_map(|m| m.retention_volumes.iter()))
            .chain(site.process_servers.iter().map(|p| &p.cache));
        for p in paths {
            if p.is_absolute() || p.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
                return Err(format!(
                    "{}: path {} must be relative to the site folder, without ..",
                    file.display(),
                    p.display()
                ));
            }
        }
        let hosts: Vec<String> = site.hosts.iter().map(|h| h.name.clone()).collect();
        for n in
            hosts.iter().chain(site.datastores.iter().map(|d| &d.name)).chain(site.machines.iter().map(|m| &m.name))
        {
            ferry_protocol::validate_name("inventory object", n).map_err(|e| format!("{}: {e}", file.display()))?;
        }
        for d in &mut site.datastores {
            if !["vmfs", "vsan", "nfs"].contains(&d.kind.as_str()) {
                return Err(format!("datastore {}: kind {:?} is not vmfs, vsan or nfs", d.name, d.kind));
            }
            if !["read-write", "read-only"].contains(&d.access.as_str()) {
                return Err(format!("datastore {}: access {:?} is not read-write or read-only", d.name, d.access));
            }
            for h in &d.hosts {
                if !hosts.contains(h) {
                    warnings.push(format!("datastore {} is mounted by unknown host {h}", d.name));
                }
            }
            let p = self.folder.join(&d.path);
            d.accessible = Some(p.is_dir());
            d.free_bytes = statvfs(&p).map(|s| s.0);
            if !p.is_dir() {
                warnings.push(format!("datastore {}: folder {} is not accessible (8061)", d.name, p.display()));
            }
        }
        for m in &mut site.machines {
            if !["linux", "windows"].contains(&m.os_family.as_str()) {
                return Err(format!("machine {}: os_family {:?} is not linux or windows", m.name, m.os_family));
            }
            if !hosts.contains(&m.host) {
                warnings.push(format!("machine {} runs on unknown host {}", m.name, m.host));
            }
            for nic in &m.nics {
                if !site.networks.iter().any(|n| n.name == nic.network) {
                    warnings.push(format!("machine {} has a NIC on unknown network {}", m.name, nic.network));
                }
            }
            for d in &mut m.disks {
                let p = self.folder.join(&d.path);
                match std::fs::metadata(&p) {
                    Ok(md) => {
                        use std::os::unix::fs::MetadataExt;
                        d.size = Some(md.len());
                        d.allocated = Some(md.blocks() * 512);
                    }
                    Err(e) => warnings.push(format!("machine {} disk {}: {}: {e}", m.name, d.name, p.display())),
                }
            }
        }
        for mt in &mut site.master_targets {
            mt.retention_free_bytes =
                mt.retention_volumes.iter().map(|v| statvfs(&self.folder.join(v)).map(|s| s.0)).collect();
            if !mt.enable_uuid {
                warnings.push(format!(
                    "master target {}: disk.EnableUUID is off: disks cannot be matched by UUID (MT-3)",
                    mt.name
                ));
            }
        }
        for ps in &mut site.process_servers {
            ps.cache_free_percent = statvfs(&self.folder.join(&ps.cache))
                .filter(|s| s.1 > 0)
                .map(|(free, total)| free as f64 * 100.0 / total as f64);
        }
        Ok(Inventory {
            site: self.name.clone(),
            folder: self.folder.clone(),
            discovered_ms: crate::jobs::now_ms(),
            content: site,
            warnings,
        })
    }
}

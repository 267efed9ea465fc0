//! The **local** site provider (see `provider` for the interface): a site is a folder described
//! by `site.toml` (hosts, datastores, networks, machines, master-target and process-server
//! machines, credentials); discovery reads it and looks at the real files (disk images, datastore
//! folders, retention volumes, process-server caches) the way a hypervisor inventory would be
//! queried. Powering a machine on runs the command `site.toml` names in `[power]`, as a hypervisor
//! would start a VM; what that command is, the provider neither knows nor cares.
//!
//! Size: the local provider's model (site.toml) and its operations share the file format; to be split into model and operations when a second provider lands.

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use ferry_api::inventory::{
    Credential, Datastore, Disk, Host, Inventory, Machine, MachineFile, MasterTargetMachine, Network, Nic,
    PowerCommand, ProcessServerMachine, SiteFile,
};

#[derive(Debug, Clone)]
pub struct LocalSite {
    pub name: String,
    pub folder: PathBuf,
    /// The commands power-on may run (the configuration server's `power_programs`): each an
    /// argument-list prefix that the site's `on` must start with.
    pub power_programs: Vec<Vec<String>>,
}

fn statvfs(path: &Path) -> Option<(u64, u64)> {
    ferry_sys::fs::space(path).ok().map(|s| (s.available, s.total))
}

impl LocalSite {
    /// Read `site.toml` and the real files behind it.
    pub fn discover(&self) -> Result<Inventory, String> {
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
            ferry_types::validate_name("inventory object", n).map_err(|e| format!("{}: {e}", file.display()))?;
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
            discovered_ms: ferry_sys::time::now_ms(),
            content: site,
            warnings,
        })
    }
}

pub use ferry_api::config_server::{NewDisk, SiteOperation};

/// SCSI targets a master target can attach (4 controllers x 15).
pub const MAX_ATTACHED: usize = 60;

impl LocalSite {
    fn load(&self) -> Result<SiteFile, String> {
        let file = self.folder.join("site.toml");
        let text = std::fs::read_to_string(&file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        toml::from_str(&text).map_err(|e| format!("{} is invalid: {e}", file.display()))
    }

    fn save(&self, site: &SiteFile) -> Result<(), String> {
        let file = self.folder.join("site.toml");
        let text = toml::to_string(site).map_err(|e| e.to_string())?;
        ferry_sys::fs::atomic_replace(&file, text.as_bytes(), 0o644).map_err(|e| e.to_string())
    }

    /// `p` (relative to the site folder) as a path below it. No part of it below the site folder
    /// may be a symbolic link: an operation that creates, deletes or rewrites a file there must
    /// never reach a file outside the site through a link planted in it.
    fn inside(&self, p: &Path) -> Result<PathBuf, String> {
        if p.is_absolute() || p.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
            return Err(format!("path {} must be relative to the site folder, without ..", p.display()));
        }
        let mut at = self.folder.clone();
        for c in p.components() {
            at.push(c);
            match std::fs::symlink_metadata(&at) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(format!(
                        "{} is a symbolic link: site paths may not go through links (replace it with the folder or file itself)",
                        at.display()
                    ))
                }
                Ok(_) => {}
                // What does not exist yet (a disk about to be created) cannot be a link.
                Err(_) => break,
            }
        }
        Ok(self.folder.join(p))
    }

    /// Run one operation; returns what it did. Operations on one site run one at a time (a lock
    /// file in the site folder), each reading, changing and rewriting the site file.
    pub fn operate(&self, op: &SiteOperation) -> Result<String, String> {
        use std::os::unix::io::AsRawFd;
        let lock_path = self.folder.join(".ferry-site.lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| format!("cannot open {}: {e}", lock_path.display()))?;
        // SAFETY: flock on a descriptor we own; released when `lock` is dropped.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(format!("cannot lock {}", lock_path.display()));
        }
        let mut site = self.load()?;
        let machine_idx = |site: &SiteFile, m: &str| {
            site.machines
                .iter()
                .position(|x| x.name == m)
                .ok_or_else(|| format!("site {} has no machine {m}", self.name))
        };
        let msg = match op {
            SiteOperation::PowerOn { machine, .. } => {
                let i = machine_idx(&site, machine)?;
                if let Some(power) = &site.power {
                    if running_pid(&self.run_dir(machine)).is_some() {
                        return Err(format!("{machine} is already running"));
                    }
                    self.start_machine(&site.machines[i], power)?;
                }
                site.machines[i].power = "on".into();
                format!("{machine} powered on")
            }
            SiteOperation::PowerOff { machine } => {
                let i = machine_idx(&site, machine)?;
                let dir = self.run_dir(machine);
                let stopped = stop_machine(&dir, libc::SIGTERM, Duration::from_secs(90));
                site.machines[i].power = "off".into();
                if stopped {
                    format!("{machine} shut down and powered off")
                } else {
                    format!("{machine} powered off")
                }
            }
            SiteOperation::Crash { machine } => {
                let i = machine_idx(&site, machine)?;
                let dir = self.run_dir(machine);
                if !stop_machine(&dir, libc::SIGKILL, Duration::from_secs(10)) {
                    return Err(format!("{machine} is not running: nothing to crash"));
                }
                site.machines[i].power = "off".into();
                format!("{machine} crashed (its process group was killed)")
            }
            SiteOperation::CreateMachine { machine, host, datastore, os_family, disks } => {
                ferry_types::validate_name("machine", machine)?;
                if site.machines.iter().any(|m| &m.name == machine) {
                    return Err(format!("machine {machine} already exists on site {}", self.name));
                }
                if !["linux", "windows"].contains(&os_family.as_str()) {
                    return Err(format!("os_family {os_family:?} is not linux or windows"));
                }
                if !site.hosts.iter().any(|h| &h.name == host) {
                    return Err(format!("site {} has no host {host}", self.name));
                }
                let ds = site
                    .datastores
                    .iter()
                    .find(|d| &d.name == datastore)
                    .ok_or_else(|| format!("site {} has no datastore {datastore}", self.name))?;
                if !ds.hosts.contains(host) {
                    return Err(format!(
                        "8061: datastore {datastore} is not accessible from host {host} (it is mounted by {:?})",
                        ds.hosts
                    ));
                }
                if ds.access != "read-write" {
                    return Err(format!("datastore {datastore} is read-only"));
                }
                if !self.inside(&ds.path)?.is_dir() {
                    return Err(format!(
                        "8061: datastore {datastore} (folder {}) is not accessible",
                        ds.path.display()
                    ));
                }
                let mut names = std::collections::HashSet::new();
                for d in disks {
                    ferry_types::validate_name("disk", &d.name)?;
                    if !names.insert(&d.name) {
                        return Err(format!("disk {} is named twice", d.name));
                    }
                }
                let dir = self.inside(&ds.path.join(machine))?;
                std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
                let mut new_disks = Vec::new();
                let mut created: Vec<PathBuf> = Vec::new();
                for d in disks {
                    let rel = ds.path.join(machine).join(format!("{}.img", d.name));
                    let made = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(self.folder.join(&rel))
                        .and_then(|f| f.set_len(d.size));
                    if let Err(e) = made {
                        // Nothing half-made stays behind: a retry starts clean.
                        for c in &created {
                            let _ = std::fs::remove_file(c);
                        }
                        return Err(format!("cannot create {}: {e}", rel.display()));
                    }
                    created.push(self.folder.join(&rel));
                    let u: [u8; 16] = rand::random();
                    let uuid = u.iter().map(|b| format!("{b:02x}")).collect::<String>();
                    new_disks.push(Disk {
                        name: d.name.clone(),
                        path: rel,
                        uuid: Some(uuid),
                        size: None,
                        allocated: None,
                    });
                }
                site.machines.push(Machine {
                    name: machine.clone(),
                    os_family: os_family.clone(),
                    os: String::new(),
                    host: host.clone(),
                    nics: Vec::new(),
                    disks: new_disks,
                    controller: "pvscsi".into(),
                    snapshots: Vec::new(),
                    power: "off".into(),
                    extra: toml::Table::new(),
                });
                format!("machine {machine} created on {host} in {datastore}")
            }
            SiteOperation::AdoptMachine { machine, host, os_family, disks, extra } => {
                ferry_types::validate_name("machine", machine)?;
                if !site.hosts.iter().any(|h| &h.name == host) {
                    return Err(format!("site {} has no host {host}", self.name));
                }
                if !["linux", "windows"].contains(&os_family.as_str()) {
                    return Err(format!("os_family {os_family:?} is not linux or windows"));
                }
                if disks.is_empty() {
                    return Err(format!("machine {machine} needs at least one disk"));
                }
                let mut adopted = Vec::new();
                for d in disks {
                    ferry_types::validate_name("disk", &d.name)?;
                    let path = self.inside(&d.path)?;
                    if !path.is_file() {
                        return Err(format!(
                            "disk {} of {machine}: {} is not a file of site {}",
                            d.name,
                            d.path.display(),
                            self.name
                        ));
                    }
                    adopted.push(Disk {
                        name: d.name.clone(),
                        path: d.path.clone(),
                        uuid: d.uuid.clone(),
                        size: None,
                        allocated: None,
                    });
                }
                if let Some(m) = site.machines.iter().find(|m| &m.name == machine) {
                    let same = m.disks.len() == adopted.len()
                        && m.disks.iter().zip(&adopted).all(|(a, b)| a.name == b.name && a.path == b.path);
                    if !same {
                        return Err(format!("machine {machine} already exists on site {} with other disks", self.name));
                    }
                    format!("{machine} is already on site {} with these disks", self.name)
                } else {
                    site.machines.push(Machine {
                        name: machine.clone(),
                        os_family: os_family.clone(),
                        os: String::new(),
                        host: host.clone(),
                        nics: Vec::new(),
                        disks: adopted,
                        controller: "pvscsi".into(),
                        snapshots: Vec::new(),
                        power: "off".into(),
                        extra: extra.clone(),
                    });
                    format!("{machine} added to site {} on {} existing disk(s)", self.name, disks.len())
                }
            }
            SiteOperation::CreateTestMachine { machine, host, os_family, network, nbd_disks, extra } => {
                ferry_types::validate_name("machine", machine)?;
                ferry_types::validate_name("network", network)?;
                if !site.hosts.iter().any(|h| &h.name == host) {
                    return Err(format!("site {} has no host {host}", self.name));
                }
                if nbd_disks.is_empty() {
                    return Err(format!("test machine {machine} needs at least one disk"));
                }
                let mut extra = extra.clone();
                let mut area = toml::Table::new();
                area.insert("network".into(), toml::Value::String(network.clone()));
                let disks = nbd_disks
                    .iter()
                    .map(|(name, nbd)| {
                        ferry_types::validate_name("disk", name)?;
                        let mut d = toml::Table::new();
                        d.insert("name".into(), toml::Value::String(name.clone()));
                        d.insert("nbd".into(), toml::Value::String(nbd.clone()));
                        Ok(toml::Value::Table(d))
                    })
                    .collect::<Result<Vec<_>, String>>()?;
                area.insert("disks".into(), toml::Value::Array(disks));
                extra.insert("test_failover".into(), toml::Value::Table(area));
                let nics = vec![Nic { network: network.clone(), addressing: "dhcp".into(), ip: None }];
                match site.machines.iter_mut().find(|m| &m.name == machine) {
                    Some(m) if m.disks.is_empty() && m.nics.iter().map(|n| &n.network).eq([network]) => {
                        // Made again by a resumed job: the export's addresses may be new.
                        m.extra = extra;
                        format!("{machine} is already in test network {network} of site {}", self.name)
                    }
                    Some(_) => return Err(format!("machine {machine} already exists on site {}", self.name)),
                    None => {
                        site.machines.push(Machine {
                            name: machine.clone(),
                            os_family: os_family.clone(),
                            os: String::new(),
                            host: host.clone(),
                            nics,
                            disks: Vec::new(),
                            controller: "pvscsi".into(),
                            snapshots: Vec::new(),
                            power: "off".into(),
                            extra,
                        });
                        format!("test machine {machine} added to site {} in test network {network}", self.name)
                    }
                }
            }
            SiteOperation::DeleteMachine { machine } => {
                let i = machine_idx(&site, machine)?;
                if site.machines[i].power == "on" {
                    return Err(format!("{machine} is powered on: power it off first"));
                }
                let attached: Vec<String> = site.machines[i]
                    .disks
                    .iter()
                    .filter(|d| site.master_targets.iter().any(|m| m.attached.contains(&d.path)))
                    .map(|d| d.name.clone())
                    .collect();
                if !attached.is_empty() {
                    return Err(format!(
                        "{machine}'s disk(s) {attached:?} are attached to a master target: detach them first"
                    ));
                }
                let m = site.machines.remove(i);
                for d in &m.disks {
                    let base = self.inside(&d.path)?;
                    for k in 1..=m.snapshots.len() {
                        let _ = std::fs::remove_file(top_of(&base, k));
                    }
                    let _ = std::fs::remove_file(base);
                }
                format!("machine {machine} deleted with {} disk(s)", m.disks.len())
            }
            SiteOperation::ReleaseMachine { machine } => {
                let Some(i) = site.machines.iter().position(|m| &m.name == machine) else {
                    return Ok(format!("{machine} is not on site {}", self.name));
                };
                if site.machines[i].power == "on" {
                    return Err(format!("{machine} is powered on: power it off first"));
                }
                let m = site.machines.remove(i);
                format!("{machine} removed from site {}; its {} disk file(s) are kept", self.name, m.disks.len())
            }
            SiteOperation::AttachDisk { master_target, disk } | SiteOperation::DetachDisk { master_target, disk } => {
                let path = self.inside(disk)?;
                let attach = matches!(op, SiteOperation::AttachDisk { .. });
                if attach && site.master_targets.iter().any(|m| m.attached.contains(disk)) {
                    return Err(format!("{} is already attached to a master target", disk.display()));
                }
                let mt = site
                    .master_targets
                    .iter_mut()
                    .find(|m| &m.name == master_target)
                    .ok_or_else(|| format!("site {} has no master target {master_target}", self.name))?;
                if attach {
                    if !path.is_file() {
                        return Err(format!("{} does not exist", path.display()));
                    }
                    if (mt.attached_disks as usize).max(mt.attached.len()) >= MAX_ATTACHED {
                        return Err(format!("master target {master_target} already has {MAX_ATTACHED} disks attached (4 SCSI controllers x 15)"));
                    }
                    mt.attached.push(disk.clone());
                    mt.attached_disks += 1;
                    format!("{} attached to {master_target}", disk.display())
                } else {
                    let before = mt.attached.len();
                    mt.attached.retain(|d| d != disk);
                    if mt.attached.len() == before {
                        return Err(format!("{} is not attached to {master_target}", disk.display()));
                    }
                    mt.attached_disks = mt.attached_disks.saturating_sub(1);
                    format!("{} detached from {master_target}", disk.display())
                }
            }
            SiteOperation::CreateSnapshot { machine } => {
                let i = machine_idx(&site, machine)?;
                let n = site.machines[i].snapshots.len() + 1;
                let name = format!("snap{n}");
                for d in &site.machines[i].disks {
                    let base = self.inside(&d.path)?;
                    let top = top_of(&base, n - 1);
                    let overlay = top_of(&base, n);
                    run_qemu_img(
                        &["create", "-q", "-f", "qcow2", "-F", if n == 1 { "raw" } else { "qcow2" }, "-b"],
                        &[&top, &overlay],
                    )?;
                }
                site.machines[i].snapshots.push(name.clone());
                format!("snapshot {name} of {machine} created")
            }
            SiteOperation::MergeSnapshots { machine } => {
                let i = machine_idx(&site, machine)?;
                let n = site.machines[i].snapshots.len();
                if n == 0 {
                    return Err(format!("{machine} has no snapshots"));
                }
                for d in &site.machines[i].disks {
                    let base = self.inside(&d.path)?;
                    for k in (1..=n).rev() {
                        let overlay = top_of(&base, k);
                        if !overlay.exists() {
                            continue; // merged by an earlier, interrupted attempt
                        }
                        run_qemu_img(&["commit", "-q"], &[&overlay])?;
                        std::fs::remove_file(&overlay)
                            .map_err(|e| format!("cannot remove {}: {e}", overlay.display()))?;
                    }
                }
                site.machines[i].snapshots.clear();
                format!("{n} snapshot(s) of {machine} merged into its disks")
            }
        };
        self.save(&site)?;
        Ok(msg)
    }
}

impl LocalSite {
    /// A machine's run folder: `machine.toml`, `power.pid`, `power.log`, and whatever the program
    /// that runs it keeps there.
    pub fn run_dir(&self, machine: &str) -> PathBuf {
        self.folder.join("guests").join(machine)
    }

    /// Run the site's power-on command for a machine, detached in its own process group; its pid
    /// and start time go to `power.pid`. A thread reaps it when it exits (the server is its parent).
    fn start_machine(&self, m: &Machine, power: &PowerCommand) -> Result<(), String> {
        // A site file is data; what may run is the admin's choice, not the file's: the whole
        // command must start with an allowed prefix (program and its leading arguments), checked
        // before anything is written.
        let dir_probe = self.inside(&Path::new("guests").join(&m.name))?;
        let dir_s = dir_probe.to_string_lossy();
        let argv: Vec<String> =
            power.on.iter().map(|a| a.replace("{dir}", &dir_s).replace("{machine}", &m.name)).collect();
        if !self.power_programs.iter().any(|prefix| !prefix.is_empty() && argv.starts_with(prefix)) {
            return Err(format!(
                "site {}: [power] on runs {:?}, which the configuration server does not allow: an admin adds the command (program and leading arguments) to power_programs in the server's configuration",
                self.name,
                argv.first().map(String::as_str).unwrap_or("")
            ));
        }
        let dir = dir_probe;
        std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let mut extra = power.extra.clone();
        for (k, v) in &m.extra {
            extra.insert(k.clone(), v.clone());
        }
        let file = MachineFile {
            machine: m.name.clone(),
            os_family: m.os_family.clone(),
            disks: m
                .disks
                .iter()
                .map(|d| Ok((d.name.clone(), self.inside(&top_of(&d.path, m.snapshots.len()))?)))
                .collect::<Result<_, String>>()?,
            extra,
        };
        let text = toml::to_string(&file).map_err(|e| e.to_string())?;
        ferry_sys::fs::write_atomic(&dir.join("machine.toml"), text.as_bytes()).map_err(|e| e.to_string())?;
        let Some((program, args)) = argv.split_first() else {
            return Err(format!("site {}: [power] on is empty: name the program that starts a machine", self.name));
        };
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("power.log"))
            .map_err(|e| format!("cannot open {}/power.log: {e}", dir.display()))?;
        let err = log.try_clone().map_err(|e| e.to_string())?;
        use std::os::unix::process::CommandExt;
        let mut child = std::process::Command::new(program)
            .args(args)
            .stdin(std::process::Stdio::null())
            .stdout(log)
            .stderr(err)
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start {} ({program}): {e}", m.name))?;
        let pid = child.id() as i32;
        let record = format!("{pid} {}\n", start_ticks(pid).unwrap_or(0));
        if let Err(e) = ferry_sys::fs::write_atomic(&dir.join("power.pid"), record.as_bytes()) {
            // Untracked, it could never be stopped: do not leave it running.
            // SAFETY: SIGKILL to the group of the child we just started.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            let _ = child.wait();
            return Err(format!("cannot record the pid of {}: {e}; it was not started", m.name));
        }
        std::thread::spawn(move || {
            let _ = child.wait();
        });
        Ok(())
    }
}

use ferry_sys::proc::{same_process, start_ticks};

/// The pid running the machine whose run folder is `dir`, if `power.pid` names a live process
/// with the recorded start time (a reused pid never matches).
pub fn running_pid(dir: &Path) -> Option<i32> {
    let text = std::fs::read_to_string(dir.join("power.pid")).ok()?;
    let mut it = text.split_whitespace();
    let pid: i32 = it.next()?.parse().ok()?;
    let ticks: u64 = it.next()?.parse().ok()?;
    same_process(pid, ticks).then_some(pid)
}

/// Stop the machine whose run folder is `dir` and wait for it to exit. SIGTERM goes to its
/// program alone (a clean shutdown); SIGKILL goes to its whole process group (a crash), and to
/// whatever is left of it after `limit`. Returns whether it was running.
pub fn stop_machine(dir: &Path, signal: i32, limit: Duration) -> bool {
    let Some(pid) = running_pid(dir) else { return false };
    // SAFETY: plain signal sends to a process we started (checked by start time) and its group.
    unsafe { libc::kill(if signal == libc::SIGKILL { -pid } else { pid }, signal) };
    let deadline = std::time::Instant::now() + limit;
    while running_pid(dir).is_some() {
        if std::time::Instant::now() >= deadline {
            // Out of patience: the program and whatever it still runs.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
            std::thread::sleep(Duration::from_millis(200));
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // Forget it only once it is gone: a survivor keeps blocking a second power-on on its disks.
    if running_pid(dir).is_none() {
        let _ = std::fs::remove_file(dir.join("power.pid"));
    }
    true
}

/// The file a disk's writes go to with `n` snapshots: the disk itself, or its n-th overlay.
pub fn top_of(base: &Path, n: usize) -> PathBuf {
    if n == 0 {
        base.to_owned()
    } else {
        base.with_extension(format!("snap{n}.qcow2"))
    }
}

fn run_qemu_img(args: &[&str], paths: &[&Path]) -> Result<(), String> {
    let out = std::process::Command::new("qemu-img")
        .args(args)
        .args(paths)
        .output()
        .map_err(|e| format!("cannot run qemu-img: {e} (install qemu-utils)"))?;
    if !out.status.success() {
        return Err(format!("qemu-img {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim()));
    }
    Ok(())
}

//! The site-provider interface: how the configuration server reaches a site's inventory and
//! operates on its machines and disks. The local provider (`discovery::LocalSite`, a folder with
//! `site.toml` and real files) is the first implementation; a hypervisor provider (QEMU/KVM,
//! libvirt, Proxmox) implements the same trait. Operations are asynchronous (a hypervisor call may
//! take minutes), errors are typed and carry a code from the registry, and each provider says
//! which operations it supports, so a job can refuse an unsupported one before it changes anything.

use futures::future::BoxFuture;
use serde::Serialize;

use crate::discovery::{Inventory, LocalSite, SiteOperation};
use crate::errors::{self, ErrorCode};

/// What a provider can do. A job checks these before it starts an operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Capabilities {
    /// Power on / off.
    pub power: bool,
    /// Kill a running machine at once.
    pub crash: bool,
    /// Create and delete machines (alternate-location recovery creates one).
    pub create_machine: bool,
    /// Attach and detach disks to master targets.
    pub attach_disks: bool,
    /// Create and merge snapshots.
    pub snapshots: bool,
}

/// A provider operation that failed: what the operator reads, with its registry code.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    /// The site or its description cannot be read.
    #[error("{0}")]
    Discovery(String),
    /// The operation was refused because of the site's state (the message names what and why).
    #[error("{message}")]
    Refused { code: ErrorCode, message: String },
    /// This provider cannot do that at all.
    #[error("the {provider} provider cannot {operation}")]
    Unsupported { provider: &'static str, operation: &'static str },
    /// The provider's own machinery failed (a worker thread, the hypervisor's API).
    #[error("{0}")]
    Failed(String),
}

impl ferry_types::HasErrorCode for ProviderError {
    fn error_code(&self) -> ErrorCode {
        match self {
            ProviderError::Discovery(_) => errors::DISCOVERY_FAILED,
            ProviderError::Refused { code, .. } => *code,
            ProviderError::Unsupported { .. } => errors::CONFLICT,
            ProviderError::Failed(_) => errors::JOB_STATE,
        }
    }
}

/// A site's inventory and operations.
pub trait SiteProvider: Send + Sync {
    /// The provider's kind, as the site records it (`local`).
    fn kind(&self) -> &'static str;
    fn capabilities(&self) -> Capabilities;
    /// The site's inventory as it is now.
    fn discover(&self) -> BoxFuture<'_, Result<Inventory, ProviderError>>;
    /// Carry out one operation; the answer says what was done.
    fn operate(&self, op: SiteOperation) -> BoxFuture<'_, Result<String, ProviderError>>;
    /// What a powered-off machine's agent says may not be at the recovery site (its activity
    /// log and change bitmap, read offline): the writes it never shipped.
    /// `whole_disks`: also the block hashes of the whole disks (a hash fallback).
    fn agent_changes(
        &self,
        machine: &str,
        whole_disks: bool,
    ) -> BoxFuture<'_, Result<ferry_api::agent::UnconfirmedChanges, ProviderError>>;
}

/// The operation's name and whether `caps` allow it.
pub fn supported(caps: &Capabilities, op: &SiteOperation) -> (&'static str, bool) {
    match op {
        SiteOperation::PowerOn { .. } => ("power a machine on", caps.power),
        SiteOperation::PowerOff { .. } => ("power a machine off", caps.power),
        SiteOperation::Crash { .. } => ("crash a machine", caps.crash),
        SiteOperation::CreateMachine { .. } => ("create a machine", caps.create_machine),
        SiteOperation::DeleteMachine { .. } => ("delete a machine", caps.create_machine),
        SiteOperation::AttachDisk { .. } => ("attach a disk", caps.attach_disks),
        SiteOperation::DetachDisk { .. } => ("detach a disk", caps.attach_disks),
        SiteOperation::CreateSnapshot { .. } => ("create a snapshot", caps.snapshots),
        SiteOperation::MergeSnapshots { .. } => ("merge snapshots", caps.snapshots),
        SiteOperation::AdoptMachine { .. } => ("add a machine on existing disks", caps.create_machine),
        SiteOperation::CreateTestMachine { .. } => ("create a test machine", caps.create_machine),
        SiteOperation::ReleaseMachine { .. } => ("remove a machine, keeping its disks", caps.create_machine),
    }
}

/// The provider of a site (local folders today).
pub fn for_site(name: &str, folder: &std::path::Path, power_programs: &[Vec<String>]) -> Box<dyn SiteProvider> {
    Box::new(LocalSite { name: name.to_owned(), folder: folder.to_owned(), power_programs: power_programs.to_vec() })
}

impl SiteProvider for LocalSite {
    fn kind(&self) -> &'static str {
        "local"
    }

    fn agent_changes(
        &self,
        machine: &str,
        whole_disks: bool,
    ) -> BoxFuture<'_, Result<ferry_api::agent::UnconfirmedChanges, ProviderError>> {
        let machine = machine.to_owned();
        Box::pin(async move { self.read_agent_changes(&machine, whole_disks).await })
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities { power: true, crash: true, create_machine: true, attach_disks: true, snapshots: true }
    }

    fn discover(&self) -> BoxFuture<'_, Result<Inventory, ProviderError>> {
        let site = self.clone();
        Box::pin(async move {
            match tokio::task::spawn_blocking(move || site.discover()).await {
                Ok(r) => r.map_err(ProviderError::Discovery),
                Err(e) => Err(ProviderError::Failed(format!("discovery worker failed: {e}"))),
            }
        })
    }

    fn operate(&self, op: SiteOperation) -> BoxFuture<'_, Result<String, ProviderError>> {
        let site = self.clone();
        Box::pin(async move {
            let (what, ok) = supported(&site.capabilities(), &op);
            if !ok {
                return Err(ProviderError::Unsupported { provider: "local", operation: what });
            }
            match tokio::task::spawn_blocking(move || site.operate(&op)).await {
                Ok(Ok(msg)) => Ok(msg),
                // The local provider names the reference code first where one applies (8061).
                Ok(Err(message)) => {
                    let code =
                        if message.starts_with("8061") { errors::DATASTORE_INACCESSIBLE } else { errors::CONFLICT };
                    Err(ProviderError::Refused { code, message })
                }
                Err(e) => Err(ProviderError::Failed(format!("operation worker failed: {e}"))),
            }
        })
    }
}

impl LocalSite {
    /// The local provider keeps a machine's agent state in its run folder (a hypervisor provider
    /// reads it from the powered-off machine's metadata disk): `ferry agent changes` on the
    /// agent's configuration there, which refuses while the agent runs.
    async fn read_agent_changes(
        &self,
        machine: &str,
        whole_disks: bool,
    ) -> Result<ferry_api::agent::UnconfirmedChanges, ProviderError> {
        ferry_types::validate_name("machine", machine).map_err(|e| ProviderError::Failed(e.to_string()))?;
        let config = self.run_dir(machine).join("agent.toml");
        if !config.is_file() {
            return Err(ProviderError::Refused {
                code: errors::NOT_FOUND,
                message: format!(
                    "{machine} has no agent configuration at {}: its agent never ran on site {}",
                    config.display(),
                    self.name
                ),
            });
        }
        let exe = std::env::current_exe()
            .map_err(|e| ProviderError::Failed(format!("cannot find the ferry executable: {e}")))?;
        let mut cmd = tokio::process::Command::new(exe);
        cmd.args(["--output", "json", "--log", "warn", "agent", "changes", "--hashes"]);
        if whole_disks {
            cmd.arg("--whole-disks");
        }
        let out = cmd.arg("--config").arg(&config).stdin(std::process::Stdio::null()).kill_on_drop(true).output();
        let out = tokio::time::timeout(std::time::Duration::from_secs(120), out)
            .await
            .map_err(|_| ProviderError::Failed(format!("reading the agent state of {machine} took over 120 s")))?
            .map_err(|e| ProviderError::Failed(format!("cannot run `ferry agent changes`: {e}")))?;
        if !out.status.success() {
            return Err(ProviderError::Refused {
                code: errors::CONFLICT,
                message: format!(
                    "cannot read the agent state of {machine}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            });
        }
        serde_json::from_slice(&out.stdout).map_err(|e| {
            ProviderError::Failed(format!("`ferry agent changes` for {machine} answered unreadable JSON: {e}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::running_pid;

    fn site(power: &str) -> (tempfile::TempDir, Box<dyn SiteProvider>) {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("datastores/ds/m1")).unwrap();
        std::fs::File::create(d.path().join("datastores/ds/m1/disk0.img")).unwrap().set_len(1 << 20).unwrap();
        std::fs::write(
            d.path().join("site.toml"),
            format!(
                r#"{power}
[[hosts]]
name = "h"
[[datastores]]
name = "ds"
kind = "vmfs"
path = "datastores/ds"
hosts = ["h"]
[[machines]]
name = "m1"
os_family = "linux"
host = "h"
disks = [{{ name = "disk0", path = "datastores/ds/m1/disk0.img" }}]
extra = {{ colour = "blue" }}
"#
            ),
        )
        .unwrap();
        let p = for_site("s", d.path(), &[vec!["sh".to_owned(), "-c".to_owned()]]);
        (d, p)
    }

    #[tokio::test]
    async fn power_on_runs_the_named_program_with_the_machine_file_and_power_off_stops_it() {
        let (d, p) = site(
            "[power]\non = [\"sh\", \"-c\", \"cp {dir}/machine.toml {dir}/seen.toml; exec sleep 60\"]\nextra = { owner = \"lab\" }",
        );
        assert_eq!(p.kind(), "local");
        let on = p.operate(SiteOperation::PowerOn { machine: "m1".into(), allow_failed_over: false }).await.unwrap();
        assert!(on.contains("powered on"), "{on}");
        let run = d.path().join("guests/m1");
        let pid = running_pid(&run).expect("the program runs, recorded with its start time");
        let again =
            p.operate(SiteOperation::PowerOn { machine: "m1".into(), allow_failed_over: false }).await.unwrap_err();
        assert!(again.to_string().contains("already running"), "{again}");
        assert_eq!(ferry_types::HasErrorCode::error_code(&again), errors::CONFLICT);
        // The program got the machine file: its disks (absolute) and the merged extra settings.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while !run.join("seen.toml").exists() && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let seen: crate::discovery::MachineFile =
            toml::from_str(&std::fs::read_to_string(run.join("seen.toml")).unwrap()).unwrap();
        assert_eq!(seen.machine, "m1");
        assert!(seen.disks[0].1.is_absolute() && seen.disks[0].1.ends_with("datastores/ds/m1/disk0.img"));
        assert_eq!(seen.extra["owner"].as_str(), Some("lab"));
        assert_eq!(seen.extra["colour"].as_str(), Some("blue"));
        let off = p.operate(SiteOperation::PowerOff { machine: "m1".into() }).await.unwrap();
        assert!(off.contains("shut down"), "{off}");
        assert!(running_pid(&run).is_none() && !ferry_sys::proc::alive(pid));
        let crash = p.operate(SiteOperation::Crash { machine: "m1".into() }).await.unwrap_err();
        assert!(crash.to_string().contains("not running"), "{crash}");
    }

    #[tokio::test]
    async fn a_site_without_a_power_program_records_power_states_only() {
        let (d, p) = site("");
        p.operate(SiteOperation::PowerOn { machine: "m1".into(), allow_failed_over: false }).await.unwrap();
        assert!(!d.path().join("guests/m1/power.pid").exists());
        let inv = p.discover().await.unwrap();
        assert_eq!(inv.content.machines[0].power, "on");
        let unknown =
            p.operate(SiteOperation::PowerOn { machine: "nope".into(), allow_failed_over: false }).await.unwrap_err();
        assert!(unknown.to_string().contains("no machine nope"), "{unknown}");
    }

    #[test]
    fn capabilities_decide_what_a_provider_may_be_asked() {
        let none =
            Capabilities { power: false, crash: false, create_machine: false, attach_disks: false, snapshots: false };
        let (what, ok) = supported(&none, &SiteOperation::Crash { machine: "m".into() });
        assert_eq!((what, ok), ("crash a machine", false));
        let e = ProviderError::Unsupported { provider: "local", operation: what };
        assert_eq!(e.to_string(), "the local provider cannot crash a machine");
    }
}

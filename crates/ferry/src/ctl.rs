//! Operator commands over the configuration server's API (`--server`, `--token`, `--ca`, or
//! FERRY_SERVER / FERRY_TOKEN / FERRY_CA): tables for people, `--output json` for scripts.
//!
//! Size: the configuration server's operator commands, one short handler per API object; they share the client and the table printer.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use ferry_api::config_server::{
    Cancelling, Confirm, Confirmed, Deleted, EventInfo, Job, JobState, MachineRecoveryPoints, MachineView, NewToken,
    Policy, PolicyCreated, ProtectRequest, RecoveryPlan, ReplicationGroup, RevokeCertificate, RevokedCertificate, Site,
    SiteAdded, TokenCreated, TokenInfo,
};
use ferry_api::control::{ComponentHealth, ComponentKind};
use ferry_api::inventory::Inventory;
use ferry_api::Method;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::output::{print_json, OutputFormat};

#[derive(Args, Clone)]
pub struct ServerArgs {
    /// Configuration server address (HOST:PORT).
    #[arg(long, env = "FERRY_SERVER", default_value = "127.0.0.1:7443", global = true)]
    pub server: String,
    /// API token.
    #[arg(long, env = "FERRY_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// The configuration server's CA certificate (PEM), e.g. `<state_dir>/tls/ca.pem`.
    #[arg(long, env = "FERRY_CA", global = true)]
    pub ca: Option<PathBuf>,
}

impl ServerArgs {
    /// The configuration-server client these flags describe.
    pub fn client(&self) -> ferry_status::server_client::ServerClient {
        ferry_status::server_client::ServerClient {
            server: self.server.clone(),
            token: self.token.clone(),
            ca: self.ca.clone(),
        }
    }

    /// A typed call to the configuration server.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<T> {
        Ok(self.client().call(method, path, body).await?)
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.call(Method::Get, path, None::<&()>).await
    }
}

#[derive(Subcommand)]
pub enum PolicyAction {
    List,
    Show {
        name: String,
    },
    /// Create a policy; its read-only `<name>-failback` policy is created with it (POL-2).
    Create {
        name: String,
        #[arg(long, default_value_t = 3600)]
        rpo_threshold_secs: u64,
        #[arg(long, default_value_t = 86400)]
        retention_secs: u64,
        #[arg(long, default_value_t = 3600)]
        app_consistent_secs: u64,
        #[arg(long, default_value_t = 300)]
        crash_consistent_secs: u64,
    },
    Delete {
        name: String,
    },
}

#[derive(Subcommand)]
pub enum GroupAction {
    List,
    Show {
        name: String,
    },
    Create {
        name: String,
        #[arg(long = "machine", required = true)]
        machines: Vec<String>,
        #[arg(long)]
        policy: Option<String>,
    },
    Delete {
        name: String,
    },
}

#[derive(Subcommand)]
pub enum PlanAction {
    List,
    Show {
        name: String,
    },
    /// Create a plan from a JSON file ({"name", "groups": [{"machines", "replication_groups", "pre_actions", "post_actions"}]}).
    Create {
        file: PathBuf,
    },
    Delete {
        name: String,
    },
    /// Run the plan's pre/post actions in order as a job (manual actions wait for `ferry jobs confirm`).
    Drill {
        name: String,
    },
    /// Fail the plan over, group by group: --planned (nothing lost) or --unplanned (to --point,
    /// a selector; a replication group goes to one multi-machine point).
    Failover {
        name: String,
        #[arg(long, conflicts_with = "unplanned", required_unless_present = "unplanned")]
        planned: bool,
        #[arg(long)]
        unplanned: bool,
        /// Unplanned: latest, latest-processed, latest-app, latest-multi or latest-multi-app.
        #[arg(long, conflicts_with = "planned")]
        point: Option<String>,
        #[arg(long)]
        reason: Option<String>,
        #[arg(long, default_value_t = 300)]
        drain_secs: u64,
        /// Leave the machines at the recovery site powered off.
        #[arg(long)]
        no_start: bool,
        /// Return once the job is started instead of following it.
        #[arg(long)]
        no_wait: bool,
    },
    /// Test failover of the plan: a drill of every machine, group by group with the plan's
    /// actions, in one test network (`plan-test-PLAN`); replication goes on.
    TestFailover {
        name: String,
        /// latest, latest-processed (default), latest-app, latest-multi or latest-multi-app.
        #[arg(long)]
        point: Option<String>,
        /// Export the points but start no test machine.
        #[arg(long)]
        no_start: bool,
        #[arg(long)]
        no_wait: bool,
    },
    /// Reprotect every machine of the plan in one job (a replication group only this way,
    /// RG-3): each needs a master target, process server and datastore of its primary site
    /// (`--machine M=MT,PS,DS`, else the defaults given by the three flags).
    Reprotect {
        name: String,
        /// Default master target for machines not named by --machine.
        #[arg(long)]
        master_target: Option<String>,
        #[arg(long)]
        process_server: Option<String>,
        #[arg(long)]
        datastore: Option<String>,
        /// One machine's values: `MACHINE=MASTER_TARGET,PROCESS_SERVER,DATASTORE` (repeatable).
        #[arg(long = "machine", value_name = "M=MT,PS,DS")]
        machines: Vec<String>,
        /// List the plan's checks and every machine's with pass/fail, code and remedy; change nothing.
        #[arg(long)]
        dry_run: bool,
        #[arg(long, default_value_t = 600)]
        stall_secs: u64,
        #[arg(long)]
        discard_primary_changes: bool,
        #[arg(long, default_value_t = 5)]
        clock_skew_secs: u64,
        #[arg(long)]
        no_wait: bool,
    },
    /// Fail the reprotected plan back (FB-1), group by group: --planned (nothing lost) or
    /// --unplanned to --point latest | latest-app; the original machines boot on their own disks.
    Failback {
        name: String,
        #[arg(long, conflicts_with_all = ["unplanned", "point"], required_unless_present = "unplanned")]
        planned: bool,
        #[arg(long)]
        unplanned: bool,
        /// Unplanned: latest (default) or latest-app.
        #[arg(long)]
        point: Option<String>,
        #[arg(long)]
        reason: Option<String>,
        #[arg(long, default_value_t = 300)]
        drain_secs: u64,
        #[arg(long)]
        no_start: bool,
        #[arg(long)]
        no_wait: bool,
    },
    /// End every drill of the plan's test failover, recording the result on each.
    TestFailoverCleanup {
        name: String,
        #[arg(long, value_parser = ["passed", "failed"])]
        result: Option<String>,
        #[arg(long)]
        notes: Option<String>,
        #[arg(long)]
        no_wait: bool,
    },
}

#[derive(Subcommand)]
pub enum SiteAction {
    List,
    /// Add a local site (a folder with site.toml) and discover it.
    Add {
        name: String,
        #[arg(long)]
        path: PathBuf,
    },
    Discover {
        name: String,
    },
    Remove {
        name: String,
    },
}

#[derive(Subcommand)]
pub enum JobAction {
    List,
    Show {
        id: String,
    },
    /// Follow a job with a progress bar until it ends.
    Watch {
        id: String,
    },
    /// Confirm the manual action the job waits for (the step shown with its prompt).
    Confirm {
        id: String,
        /// Step index (default: the one waiting now, as `jobs show` prints it).
        #[arg(long)]
        step: Option<usize>,
    },
    Cancel {
        id: String,
    },
}

#[derive(Subcommand)]
pub enum TokenAction {
    List,
    Create {
        #[arg(long)]
        name: String,
        /// reader, operator or admin.
        #[arg(long)]
        role: String,
    },
    Revoke {
        id: String,
    },
}

#[derive(Subcommand)]
pub enum CertificateAction {
    /// Revoked data-path certificates, oldest first.
    Revoked,
    /// Revoke a data-path certificate by serial (admin): every component refuses it and cuts
    /// its connections once it fetches its settings; the component must register again.
    Revoke {
        /// The serial (`ferry components --output json` shows each component's; colons and
        /// uppercase as `openssl x509 -noout -serial` prints are accepted).
        serial: String,
        /// Why (kept with the revocation and in the event log).
        #[arg(long)]
        reason: Option<String>,
    },
}

/// Rows of a table: its column headers and each item's cells.
pub trait Rows {
    const HEADERS: &'static [&'static str];
    fn cells(&self) -> Vec<String>;
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map(|x| x.to_string()).unwrap_or_else(|| "-".into())
}

/// A table: columns as wide as their widest cell (at most 60).
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    let widths: Vec<usize> = (0..headers.len())
        .map(|i| {
            rows.iter().filter_map(|r| r.get(i)).map(|c| c.len()).chain([headers[i].len()]).max().unwrap_or(4).min(60)
        })
        .collect();
    let line = |cells: Vec<String>| {
        cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}", w = *w)).collect::<Vec<_>>().join("  ")
    };
    println!("{}", line(headers.iter().map(|h| h.to_uppercase()).collect()));
    for r in rows {
        println!("{}", line(r.clone()));
    }
}

/// Items as a table, or as JSON.
pub fn show<T: Rows + Serialize>(items: &[T], out: OutputFormat) {
    match out {
        OutputFormat::Json => print_json(&items),
        OutputFormat::Table => table(T::HEADERS, &items.iter().map(Rows::cells).collect::<Vec<_>>()),
    }
}

/// One item as a table row, or as JSON (the object itself, not a list).
pub fn show_one<T: Rows + Serialize>(item: &T, out: OutputFormat) {
    match out {
        OutputFormat::Json => print_json(item),
        OutputFormat::Table => table(T::HEADERS, &[item.cells()]),
    }
}

impl Rows for Policy {
    const HEADERS: &'static [&'static str] = &[
        "name",
        "rpo_threshold_secs",
        "retention_secs",
        "app_consistent_secs",
        "crash_consistent_secs",
        "read_only",
        "failback_of",
    ];
    fn cells(&self) -> Vec<String> {
        vec![
            self.name.clone(),
            self.rpo_threshold_secs.to_string(),
            self.retention_secs.to_string(),
            self.app_consistent_secs.to_string(),
            self.crash_consistent_secs.to_string(),
            self.read_only.to_string(),
            opt(&self.failback_of),
        ]
    }
}

impl Rows for ReplicationGroup {
    const HEADERS: &'static [&'static str] = &["name", "machines", "policy"];
    fn cells(&self) -> Vec<String> {
        vec![self.name.clone(), self.machines.join("; "), opt(&self.policy)]
    }
}

impl Rows for RecoveryPlan {
    const HEADERS: &'static [&'static str] = &["name", "groups"];
    fn cells(&self) -> Vec<String> {
        vec![self.name.clone(), self.groups.len().to_string()]
    }
}

impl Rows for Site {
    const HEADERS: &'static [&'static str] = &["name", "provider", "path"];
    fn cells(&self) -> Vec<String> {
        vec![self.name.clone(), self.provider.clone(), self.path.display().to_string()]
    }
}

impl Rows for Job {
    const HEADERS: &'static [&'static str] =
        &["id", "kind", "target", "state", "progress_percent", "input_prompt", "error"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.id.clone(),
            self.kind.clone(),
            self.target.clone(),
            self.state.as_str().to_owned(),
            format!("{:.0}", self.progress_percent),
            opt(&self.input_prompt),
            self.error.as_ref().map(|e| e.message.clone()).unwrap_or_else(|| "-".into()),
        ]
    }
}

impl Rows for Deleted {
    const HEADERS: &'static [&'static str] = &["deleted"];
    fn cells(&self) -> Vec<String> {
        vec![self.deleted.join("; ")]
    }
}

impl Rows for TokenInfo {
    const HEADERS: &'static [&'static str] = &["id", "name", "role", "created_ms"];
    fn cells(&self) -> Vec<String> {
        vec![self.id.clone(), self.name.clone(), self.role.clone(), self.created_ms.to_string()]
    }
}

impl Rows for RevokedCertificate {
    const HEADERS: &'static [&'static str] = &["serial", "revoked_ms", "reason"];
    fn cells(&self) -> Vec<String> {
        vec![self.serial.clone(), self.revoked_ms.to_string(), self.reason.clone()]
    }
}

impl Rows for TokenCreated {
    const HEADERS: &'static [&'static str] = &["id", "name", "role", "token"];
    fn cells(&self) -> Vec<String> {
        vec![self.id.clone(), self.name.clone(), self.role.clone(), self.token.clone()]
    }
}

impl Rows for Confirmed {
    const HEADERS: &'static [&'static str] = &["confirmed", "step"];
    fn cells(&self) -> Vec<String> {
        vec![self.confirmed.clone(), self.step.to_string()]
    }
}

impl Rows for Cancelling {
    const HEADERS: &'static [&'static str] = &["cancelling"];
    fn cells(&self) -> Vec<String> {
        vec![self.cancelling.clone()]
    }
}

impl Rows for EventInfo {
    const HEADERS: &'static [&'static str] = &["seq", "time_ms", "severity", "code", "object", "message"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.seq.to_string(),
            self.time_ms.to_string(),
            self.severity.clone(),
            self.code.to_string(),
            self.object.clone(),
            self.message.clone(),
        ]
    }
}

impl Rows for ComponentHealth {
    const HEADERS: &'static [&'static str] = &["kind", "name", "health", "last_seen_ms", "reasons"];
    fn cells(&self) -> Vec<String> {
        vec![
            self.component.kind.to_string(),
            self.component.name.clone(),
            self.health.as_str().to_owned(),
            opt(&self.component.last_seen_ms),
            self.reasons.iter().map(|r| r.message.clone()).collect::<Vec<_>>().join("; "),
        ]
    }
}

fn enc(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub async fn policies(a: PolicyAction, s: &ServerArgs, out: OutputFormat) -> Result<()> {
    match a {
        PolicyAction::List => show(&s.get::<Vec<Policy>>("/api/v1/policies").await?, out),
        PolicyAction::Show { name } => {
            show_one(&s.get::<Policy>(&format!("/api/v1/policies/{}", enc(&name))).await?, out)
        }
        PolicyAction::Create {
            name,
            rpo_threshold_secs,
            retention_secs,
            app_consistent_secs,
            crash_consistent_secs,
        } => {
            let p = Policy {
                name,
                rpo_threshold_secs,
                retention_secs,
                app_consistent_secs,
                crash_consistent_secs,
                failback_of: None,
                read_only: false,
                associated: true,
            };
            let v: PolicyCreated = s.call(Method::Post, "/api/v1/policies", Some(&p)).await?;
            match out {
                OutputFormat::Json => print_json(&v),
                OutputFormat::Table => show(&[v.policy, v.failback_policy], out),
            }
        }
        PolicyAction::Delete { name } => {
            let v: Deleted = s.call(Method::Delete, &format!("/api/v1/policies/{}", enc(&name)), None::<&()>).await?;
            show_one(&v, out)
        }
    }
    Ok(())
}

pub async fn groups(a: GroupAction, s: &ServerArgs, out: OutputFormat) -> Result<()> {
    match a {
        GroupAction::List => show(&s.get::<Vec<ReplicationGroup>>("/api/v1/replication-groups").await?, out),
        GroupAction::Show { name } => {
            show_one(&s.get::<ReplicationGroup>(&format!("/api/v1/replication-groups/{}", enc(&name))).await?, out)
        }
        GroupAction::Create { name, machines, policy } => {
            let g = ReplicationGroup { name, machines, policy };
            let v: ReplicationGroup = s.call(Method::Post, "/api/v1/replication-groups", Some(&g)).await?;
            show_one(&v, out)
        }
        GroupAction::Delete { name } => {
            let path = format!("/api/v1/replication-groups/{}", enc(&name));
            show_one(&s.call::<Deleted>(Method::Delete, &path, None::<&()>).await?, out)
        }
    }
    Ok(())
}

pub async fn plans(a: PlanAction, s: &ServerArgs, out: OutputFormat) -> Result<()> {
    match a {
        PlanAction::List => show(&s.get::<Vec<RecoveryPlan>>("/api/v1/recovery-plans").await?, out),
        PlanAction::Show { name } => {
            let v: RecoveryPlan = s.get(&format!("/api/v1/recovery-plans/{}", enc(&name))).await?;
            print_json(&v);
        }
        PlanAction::Create { file } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let plan: RecoveryPlan =
                serde_json::from_str(&text).with_context(|| format!("{} is not a recovery plan", file.display()))?;
            let v: RecoveryPlan = s.call(Method::Post, "/api/v1/recovery-plans", Some(&plan)).await?;
            show_one(&v, out);
        }
        PlanAction::Delete { name } => {
            let path = format!("/api/v1/recovery-plans/{}", enc(&name));
            show_one(&s.call::<Deleted>(Method::Delete, &path, None::<&()>).await?, out)
        }
        PlanAction::Drill { name } => {
            let path = format!("/api/v1/recovery-plans/{}/drill", enc(&name));
            show_one(&s.call::<Job>(Method::Post, &path, None::<&()>).await?, out)
        }
        PlanAction::Failover { name, planned, unplanned: _, point, reason, drain_secs, no_start, no_wait } => {
            use ferry_api::config_server::{FailoverKind, PlanFailoverRequest};
            let kind = if planned { FailoverKind::Planned } else { FailoverKind::Unplanned };
            let req = PlanFailoverRequest { kind, point, reason, drain_secs, no_start };
            let path = format!("/api/v1/recovery-plans/{}/failover", enc(&name));
            let job: Job = s.call(Method::Post, &path, Some(&req)).await?;
            if no_wait {
                show_one(&job, out);
            } else {
                watch(&job.id, s, out).await?;
            }
        }
        PlanAction::Reprotect {
            name,
            master_target,
            process_server,
            datastore,
            machines,
            dry_run,
            stall_secs,
            discard_primary_changes,
            clock_skew_secs,
            no_wait,
        } => {
            use ferry_api::config_server::{PlanReprotectPlan, PlanReprotectRequest, ReprotectTargets};
            let defaults = match (master_target, process_server, datastore) {
                (Some(master_target), Some(process_server), Some(datastore)) => {
                    Some(ReprotectTargets { master_target, process_server, datastore })
                }
                (None, None, None) => None,
                _ => bail!("defaults need all three of --master-target, --process-server and --datastore"),
            };
            let per = machine_values(&machines)?;
            let req =
                PlanReprotectRequest { defaults, machines: per, stall_secs, discard_primary_changes, clock_skew_secs };
            if dry_run {
                let path = format!("/api/v1/recovery-plans/{}/reprotect/dry-run", enc(&name));
                let plan: PlanReprotectPlan = s.call(Method::Post, &path, Some(&req)).await?;
                match out {
                    OutputFormat::Json => print_json(&plan),
                    OutputFormat::Table => {
                        println!(
                            "reprotect of recovery plan {}: {}",
                            plan.plan,
                            if plan.ready { "every check passed" } else { "refused" }
                        );
                        check_table(&plan.checks);
                        for m in &plan.machines {
                            println!();
                            print_reprotect_plan(m);
                        }
                    }
                }
                if !plan.ready {
                    bail!("reprotect of recovery plan {name} would be refused: see the failed checks");
                }
                return Ok(());
            }
            let path = format!("/api/v1/recovery-plans/{}/reprotect", enc(&name));
            let job: Job = s.call(Method::Post, &path, Some(&req)).await?;
            if no_wait {
                show_one(&job, out);
            } else {
                watch(&job.id, s, out).await?;
            }
        }
        PlanAction::Failback { name, planned, unplanned: _, point, reason, drain_secs, no_start, no_wait } => {
            let req = ferry_api::config_server::PlanFailbackRequest { planned, point, reason, drain_secs, no_start };
            let path = format!("/api/v1/recovery-plans/{}/failback", enc(&name));
            let job: Job = s.call(Method::Post, &path, Some(&req)).await?;
            if no_wait {
                show_one(&job, out);
            } else {
                watch(&job.id, s, out).await?;
            }
        }
        PlanAction::TestFailover { name, point, no_start, no_wait } => {
            let req = ferry_api::config_server::PlanTestFailoverRequest { point, no_start };
            let path = format!("/api/v1/recovery-plans/{}/test-failover", enc(&name));
            let job: Job = s.call(Method::Post, &path, Some(&req)).await?;
            if no_wait {
                show_one(&job, out);
            } else {
                watch(&job.id, s, out).await?;
            }
        }
        PlanAction::TestFailoverCleanup { name, result, notes, no_wait } => {
            use ferry_api::config_server::{CleanupTestFailoverRequest, DrillResult};
            let result = match result.as_deref() {
                Some("passed") => Some(DrillResult::Passed),
                Some(_) => Some(DrillResult::Failed),
                None => None,
            };
            let path = format!("/api/v1/recovery-plans/{}/test-failover/cleanup", enc(&name));
            let job: Job = s.call(Method::Post, &path, Some(&CleanupTestFailoverRequest { result, notes })).await?;
            if no_wait {
                show_one(&job, out);
            } else {
                watch(&job.id, s, out).await?;
            }
        }
    }
    Ok(())
}

pub async fn sites(a: SiteAction, s: &ServerArgs, out: OutputFormat) -> Result<()> {
    match a {
        SiteAction::List => show(&s.get::<Vec<Site>>("/api/v1/sites").await?, out),
        SiteAction::Add { name, path } => {
            let path = std::path::absolute(&path).with_context(|| format!("bad path {}", path.display()))?;
            let site = Site { name, provider: "local".into(), path };
            let v: SiteAdded = s.call(Method::Post, "/api/v1/sites", Some(&site)).await?;
            show_one(&v.job, out);
        }
        SiteAction::Discover { name } => {
            let path = format!("/api/v1/sites/{}/discover", enc(&name));
            show_one(&s.call::<Job>(Method::Post, &path, None::<&()>).await?, out)
        }
        SiteAction::Remove { name } => {
            let path = format!("/api/v1/sites/{}", enc(&name));
            show_one(&s.call::<Deleted>(Method::Delete, &path, None::<&()>).await?, out)
        }
    }
    Ok(())
}

pub async fn inventory(s: &ServerArgs, out: OutputFormat) -> Result<()> {
    let v: Vec<Inventory> = s.get("/api/v1/inventory").await?;
    if matches!(out, OutputFormat::Json) {
        print_json(&v);
        return Ok(());
    }
    for site in &v {
        println!("site {}  ({})", site.site, site.folder.display());
        let c = &site.content;
        println!("hosts:");
        let rows: Vec<_> = c
            .hosts
            .iter()
            .map(|h| vec![h.name.clone(), h.edition.clone(), h.licence.clone(), h.tools.join("; ")])
            .collect();
        table(&["name", "edition", "licence", "tools"], &rows);
        println!("datastores:");
        let rows: Vec<_> = c
            .datastores
            .iter()
            .map(|d| {
                vec![
                    d.name.clone(),
                    d.kind.clone(),
                    d.access.clone(),
                    d.hosts.join("; "),
                    opt(&d.accessible),
                    opt(&d.free_bytes),
                ]
            })
            .collect();
        table(&["name", "kind", "access", "hosts", "accessible", "free_bytes"], &rows);
        println!("machines:");
        let rows: Vec<_> = c
            .machines
            .iter()
            .map(|m| {
                let disks: Vec<String> = m.disks.iter().map(|d| d.name.clone()).collect();
                vec![
                    m.name.clone(),
                    m.os_family.clone(),
                    m.host.clone(),
                    m.power.clone(),
                    m.controller.clone(),
                    disks.join("; "),
                ]
            })
            .collect();
        table(&["name", "os_family", "host", "power", "controller", "disks"], &rows);
        println!("master targets:");
        let rows: Vec<_> = c
            .master_targets
            .iter()
            .map(|m| {
                let vols: Vec<String> = m.retention_volumes.iter().map(|v| v.display().to_string()).collect();
                vec![
                    m.name.clone(),
                    m.os_family.clone(),
                    m.attached_disks.to_string(),
                    m.enable_uuid.to_string(),
                    vols.join("; "),
                ]
            })
            .collect();
        table(&["name", "os_family", "attached_disks", "enable_uuid", "retention_volumes"], &rows);
        println!("process servers:");
        let rows: Vec<_> = c
            .process_servers
            .iter()
            .map(|p| vec![p.name.clone(), p.cache.display().to_string(), opt(&p.cache_free_percent)])
            .collect();
        table(&["name", "cache", "cache_free_percent"], &rows);
        for w in &site.warnings {
            println!("WARNING: {w}");
        }
    }
    Ok(())
}

pub async fn jobs(a: JobAction, s: &ServerArgs, out: OutputFormat) -> Result<()> {
    match a {
        JobAction::List => show(&s.get::<Vec<Job>>("/api/v1/jobs").await?, out),
        JobAction::Show { id } => {
            let v: Job = s.get(&format!("/api/v1/jobs/{}", enc(&id))).await?;
            match out {
                OutputFormat::Json => print_json(&v),
                OutputFormat::Table => print_job(&v),
            }
        }
        JobAction::Watch { id } => watch(&id, s, out).await?,
        JobAction::Confirm { id, step } => {
            let step = match step {
                Some(s) => s,
                None => {
                    let j: Job = s.get(&format!("/api/v1/jobs/{}", enc(&id))).await?;
                    if let Some(p) = &j.input_prompt {
                        eprintln!("confirming: {p}");
                    }
                    j.current_step
                }
            };
            let path = format!("/api/v1/jobs/{}/confirm", enc(&id));
            let v: Confirmed = s.call(Method::Post, &path, Some(&Confirm { step: Some(step) })).await?;
            show_one(&v, out);
        }
        JobAction::Cancel { id } => {
            let path = format!("/api/v1/jobs/{}/cancel", enc(&id));
            show_one(&s.call::<Cancelling>(Method::Post, &path, None::<&()>).await?, out)
        }
    }
    Ok(())
}

fn print_job(v: &Job) {
    println!(
        "job {}  {} of {}  state {}  {:.0}%{}",
        v.id,
        v.kind,
        v.target,
        v.state.as_str(),
        v.progress_percent,
        v.eta_secs.map(|e| format!("  ETA {e:.0} s")).unwrap_or_default()
    );
    for (i, st) in v.steps.iter().enumerate() {
        let state = serde_json::to_value(st.state).ok().and_then(|s| s.as_str().map(str::to_owned)).unwrap_or_default();
        println!(
            "  {:>2}. [{state}] {}{}",
            i + 1,
            st.name,
            st.message.as_ref().map(|m| format!(" — {m}")).unwrap_or_default()
        );
    }
    if let Some(p) = &v.input_prompt {
        println!("WAITING FOR INPUT: {p}");
    }
    if let Some(e) = &v.error {
        println!("ERROR {}: {} (remedy: {})", e.code, e.message, e.remedy);
    }
}

/// Follow a job until it finishes (or waits for input); exit status says how it ended.
pub async fn watch(id: &str, s: &ServerArgs, out: OutputFormat) -> Result<()> {
    let bar = indicatif::ProgressBar::new(1000);
    if matches!(out, OutputFormat::Table) {
        bar.set_style(
            indicatif::ProgressStyle::with_template("{bar:40} {percent:>3}% {msg}")
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let v = loop {
        let v: Job = s.get(&format!("/api/v1/jobs/{}", enc(id))).await?;
        bar.set_position((v.progress_percent * 10.0) as u64);
        let step = v.steps.get(v.current_step).map(|s| s.name.as_str()).unwrap_or("");
        let bytes = if v.bytes_total > 0 {
            let eta = v.eta_secs.map(|e| format!(", ETA {e:.0} s")).unwrap_or_default();
            format!(" ({:.1}/{:.1} MiB{eta})", v.bytes_done as f64 / 1048576.0, v.bytes_total as f64 / 1048576.0)
        } else {
            String::new()
        };
        bar.set_message(format!("{} {step}{bytes}", v.state.as_str()));
        if v.state.finished() || v.state == JobState::WaitingForInput {
            break v;
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    };
    bar.finish_and_clear();
    match out {
        OutputFormat::Json => print_json(&v),
        OutputFormat::Table => print_job(&v),
    }
    match v.state {
        JobState::Succeeded | JobState::WaitingForInput => Ok(()),
        st => bail!("job {id} {}: {}", st.as_str(), v.error.as_ref().map(|e| e.message.as_str()).unwrap_or("-")),
    }
}

pub async fn tokens(a: TokenAction, s: &ServerArgs, out: OutputFormat) -> Result<()> {
    match a {
        TokenAction::List => show(&s.get::<Vec<TokenInfo>>("/api/v1/tokens").await?, out),
        TokenAction::Create { name, role } => {
            let v: TokenCreated = s.call(Method::Post, "/api/v1/tokens", Some(&NewToken { name, role })).await?;
            show_one(&v, out);
        }
        TokenAction::Revoke { id } => {
            let path = format!("/api/v1/tokens/{}", enc(&id));
            show_one(&s.call::<Deleted>(Method::Delete, &path, None::<&()>).await?, out)
        }
    }
    Ok(())
}

/// `ferry certificates`.
pub async fn certificates(a: CertificateAction, s: &ServerArgs, out: OutputFormat) -> Result<()> {
    match a {
        CertificateAction::Revoked => {
            show(&s.get::<Vec<RevokedCertificate>>("/api/v1/certificates/revoked").await?, out)
        }
        CertificateAction::Revoke { serial, reason } => {
            let path = format!("/api/v1/certificates/{}/revoke", enc(&serial));
            show_one(
                &s.call::<RevokedCertificate>(Method::Post, &path, Some(&RevokeCertificate { reason })).await?,
                out,
            )
        }
    }
    Ok(())
}

/// `ferry events`.
pub async fn events(s: &ServerArgs, out: OutputFormat) -> Result<()> {
    show(&s.get::<Vec<EventInfo>>("/api/v1/events").await?, out);
    Ok(())
}

/// `ferry components`.
pub async fn components(s: &ServerArgs, out: OutputFormat) -> Result<()> {
    show(&s.get::<Vec<ComponentHealth>>("/api/v1/components").await?, out);
    Ok(())
}

/// `ferry backup`: start a backup job and follow it.
pub async fn backup(s: &ServerArgs, out: OutputFormat) -> Result<()> {
    let job: Job = s.call(Method::Post, "/api/v1/backups", None::<&()>).await?;
    watch(&job.id, s, out).await
}

/// Register a data-path component: key and CSR made here, certificate signed by the server.
#[allow(clippy::too_many_arguments)]
pub async fn register(
    server: &str,
    fingerprint: &str,
    passphrase: &str,
    kind: &str,
    name: &str,
    hosts: &[String],
    site: Option<&str>,
    dir: &std::path::Path,
    out: OutputFormat,
) -> Result<()> {
    let kind = ComponentKind::parse(kind)
        .with_context(|| format!("--kind {kind:?} is not agent, process-server or master-target"))?;
    let who = ferry_status::server_client::Registrant { kind, name, hosts, site };
    let summary = ferry_status::server_client::register_component(server, fingerprint, passphrase, &who, dir).await?;
    match out {
        OutputFormat::Json => print_json(&summary),
        OutputFormat::Table => println!(
            "registered {kind} {name}: certificate {} (key stayed here), token in {}",
            summary.cert.display(),
            summary.token_file.display()
        ),
    }
    Ok(())
}
#[derive(Args)]
pub struct ProtectArgs {
    /// Machines to protect (none with --group: every machine of the group).
    pub machines: Vec<String>,
    /// Protect a replication group's machines together (multi-machine points).
    #[arg(long)]
    pub group: Option<String>,
    #[arg(long)]
    pub policy: String,
    #[arg(long)]
    pub process_server: String,
    #[arg(long)]
    pub master_target: String,
    /// Recovery datastore (of the master target's site) for the replica disks.
    #[arg(long)]
    pub datastore: String,
    /// How long the job waits for the machines' mobility services to register.
    #[arg(long, default_value_t = 900)]
    pub wait_secs: u64,
    /// The job fails when the initial sync makes no progress for this long.
    #[arg(long, default_value_t = 600)]
    pub stall_secs: u64,
    /// Return once the job is started instead of following it.
    #[arg(long)]
    pub no_wait: bool,
}

/// `ferry protect`: enable replication and follow the job (initial sync with bytes, %, ETA).
pub async fn protect(a: ProtectArgs, s: &ServerArgs, out: OutputFormat) -> Result<()> {
    let req = ProtectRequest {
        machine: None,
        machines: a.machines,
        group: a.group,
        policy: a.policy,
        process_server: a.process_server,
        master_target: a.master_target,
        datastore: a.datastore,
        wait_secs: a.wait_secs,
        stall_secs: a.stall_secs,
    };
    let job: Job = s.call(Method::Post, "/api/v1/protections", Some(&req)).await?;
    if a.no_wait {
        show_one(&job, out);
        return Ok(());
    }
    watch(&job.id, s, out).await
}

#[derive(Subcommand)]
pub enum FailoverAction {
    /// Fail a protected machine over: --planned (primary healthy, nothing lost) or --unplanned
    /// (primary lost: to --point, default `latest`).
    Start {
        machine: String,
        #[arg(long, conflicts_with = "unplanned", required_unless_present = "unplanned")]
        planned: bool,
        #[arg(long)]
        unplanned: bool,
        /// Unplanned: an RC-1 selector (latest, latest-processed, latest-app, latest-multi,
        /// latest-multi-app), a point ID or a seq.
        #[arg(long, conflicts_with = "planned")]
        point: Option<String>,
        #[arg(long)]
        reason: Option<String>,
        /// Planned: how long to wait for the recovery site to hold every write.
        #[arg(long, default_value_t = 300)]
        drain_secs: u64,
        /// Leave the machine at the recovery site powered off (power it on when ready).
        #[arg(long)]
        no_start: bool,
        /// Return once the job is started instead of following it.
        #[arg(long)]
        no_wait: bool,
    },
    /// Put a failed-over machine's disks at another point (before commit).
    ChangePoint {
        machine: String,
        #[arg(long)]
        point: String,
        #[arg(long)]
        no_wait: bool,
    },
    /// Commit a failover: its point cannot change any more.
    Commit {
        machine: String,
        #[arg(long)]
        no_wait: bool,
    },
    /// Cancel a failover before commit: the machine at the recovery site is removed and its
    /// writes discarded (reported), the replica is put back at the primary's last write and
    /// unfenced, and the primary starts again and replicates.
    Cancel {
        machine: String,
        /// Leave the primary powered off (its quiesce is lifted all the same).
        #[arg(long)]
        no_start: bool,
        #[arg(long)]
        no_wait: bool,
    },
}

/// `ferry failover …`: start the job, then follow it (steps, progress, ETA).
impl Rows for ferry_api::config_server::AuthorityStatus {
    const HEADERS: &'static [&'static str] = &["server", "role", "epoch", "authoritative", "note"];
    fn cells(&self) -> Vec<String> {
        let role = match self.role {
            ferry_api::config_server::ServerRole::Active => "active",
            ferry_api::config_server::ServerRole::Standby => "standby",
            ferry_api::config_server::ServerRole::Stale => "stale",
        };
        let note = match (&self.superseded_by, &self.standby) {
            (Some(h), _) => format!("{} was promoted (epoch {})", h.server, h.epoch),
            (None, Some(st)) => format!(
                "copies {} ({} copies{}{})",
                st.primary,
                st.copies,
                st.last_copy_ms.map(|ms| format!(", last at {ms}")).unwrap_or_default(),
                st.error.as_ref().map(|e| format!("; last attempt failed: {e}")).unwrap_or_default()
            ),
            _ => String::new(),
        };
        vec![
            self.server.clone(),
            role.into(),
            self.authority.as_ref().map(|a| a.epoch.to_string()).unwrap_or_default(),
            self.authority.as_ref().map(|a| a.server.clone()).unwrap_or_default(),
            note,
        ]
    }
}

/// `ferry config-server authority|promote` (`promote`: Some(force)).
pub async fn authority(s: &ServerArgs, promote: Option<bool>, out: OutputFormat) -> Result<()> {
    let v: ferry_api::config_server::AuthorityStatus = match promote {
        Some(force) => {
            let req = ferry_api::config_server::PromoteRequest { force };
            s.call(Method::Post, "/api/v1/authority/promote", Some(&req)).await?
        }
        None => s.call(Method::Get, "/api/v1/authority", None::<&()>).await?,
    };
    show_one(&v, out);
    Ok(())
}

/// `ferry disable-protection M [--remove] [--force]`: start the job, then follow it.
pub async fn disable_protection(
    machine: &str,
    remove: bool,
    force: bool,
    no_wait: bool,
    s: &ServerArgs,
    out: OutputFormat,
) -> Result<()> {
    let path = format!("/api/v1/machines/{}/disable-protection", enc(machine));
    let req = ferry_api::config_server::DisableProtectionRequest { remove, force };
    let job: Job = s.call(Method::Post, &path, Some(&req)).await?;
    if no_wait {
        show_one(&job, out);
        return Ok(());
    }
    watch(&job.id, s, out).await
}

/// `ferry reprotect MACHINE`: the dry run prints every check; a real run watches the job.
pub async fn reprotect(
    machine: &str,
    req: &ferry_api::config_server::ReprotectRequest,
    dry_run: bool,
    no_wait: bool,
    s: &ServerArgs,
    out: OutputFormat,
) -> Result<()> {
    if dry_run {
        let path = format!("/api/v1/machines/{}/reprotect/dry-run", enc(machine));
        let plan: ferry_api::config_server::ReprotectPlan = s.call(Method::Post, &path, Some(req)).await?;
        match out {
            OutputFormat::Json => print_json(&plan),
            OutputFormat::Table => print_reprotect_plan(&plan),
        }
        if !plan.ready {
            anyhow::bail!("reprotect of {machine} would be refused: see the failed checks");
        }
        return Ok(());
    }
    let path = format!("/api/v1/machines/{}/reprotect", enc(machine));
    let job: Job = s.call(Method::Post, &path, Some(req)).await?;
    if no_wait {
        show_one(&job, out);
        return Ok(());
    }
    watch(&job.id, s, out).await
}

/// `--machine M=MT,PS,DS` values of a plan reprotect, each machine once.
fn machine_values(
    args: &[String],
) -> Result<std::collections::BTreeMap<String, ferry_api::config_server::ReprotectTargets>> {
    let mut per = std::collections::BTreeMap::new();
    for m in args {
        let parsed = m.split_once('=').and_then(|(name, v)| match v.split(',').collect::<Vec<_>>()[..] {
            [mt, ps, ds] if !name.is_empty() && !mt.is_empty() && !ps.is_empty() && !ds.is_empty() => Some((
                name.to_owned(),
                ferry_api::config_server::ReprotectTargets {
                    master_target: mt.to_owned(),
                    process_server: ps.to_owned(),
                    datastore: ds.to_owned(),
                },
            )),
            _ => None,
        });
        let Some((name, t)) = parsed else {
            bail!("--machine {m:?}: write MACHINE=MASTER_TARGET,PROCESS_SERVER,DATASTORE");
        };
        if per.insert(name.clone(), t).is_some() {
            bail!("--machine names {name} twice");
        }
    }
    Ok(per)
}

fn print_reprotect_plan(plan: &ferry_api::config_server::ReprotectPlan) {
    println!(
        "reprotect {} as {} ({}, {} location, policy {}): {}",
        plan.machine,
        plan.recovery_machine.as_deref().unwrap_or("-"),
        plan.direction,
        plan.location,
        plan.policy.as_deref().unwrap_or("-"),
        if plan.ready { "every check passed" } else { "refused" }
    );
    check_table(&plan.checks);
}

fn check_table(checks: &[ferry_api::config_server::ReprotectCheck]) {
    let rows: Vec<Vec<String>> = checks
        .iter()
        .map(|c| {
            vec![
                c.id.clone(),
                if c.passed { "pass".into() } else { "FAIL".into() },
                c.code.map(|x| x.to_string()).unwrap_or_default(),
                c.message.clone(),
                c.remedy.clone().unwrap_or_default(),
            ]
        })
        .collect();
    table(&["CHECK", "RESULT", "CODE", "MESSAGE", "REMEDY"], &rows);
}

/// `ferry failback MACHINE`: fail its reverse protection over (named by the machine's
/// `reprotected_by`, or given directly).
#[allow(clippy::too_many_arguments)]
pub async fn failback(
    machine: &str,
    planned: bool,
    point: Option<String>,
    drain_secs: u64,
    no_start: bool,
    no_wait: bool,
    s: &ServerArgs,
    out: OutputFormat,
) -> Result<()> {
    let v: Vec<MachineView> = s.get("/api/v1/machines").await?;
    // A machine deleted at its site (alternate-location recovery) is known by its reverse
    // protection only.
    let by_reverse = || v.iter().find(|x| x.reprotect.as_ref().is_some_and(|r| r.of == machine));
    let Some(m) = v.iter().find(|x| x.machine == machine).or_else(by_reverse) else {
        bail!("no machine {machine} (see `ferry machines`)");
    };
    let reverse = match (&m.reprotected_by, &m.reprotect) {
        (Some(r), _) => r.clone(),
        (None, Some(_)) => m.machine.clone(),
        (None, None) => {
            bail!("{machine} is not reprotected: reprotect it first (`ferry reprotect {machine} …`), then fail it back")
        }
    };
    let a = FailoverAction::Start {
        machine: reverse,
        planned,
        unplanned: !planned,
        point,
        reason: Some(format!("failback of {machine}")),
        drain_secs,
        no_start,
        no_wait,
    };
    failover(a, s, out).await
}

pub async fn failover(a: FailoverAction, s: &ServerArgs, out: OutputFormat) -> Result<()> {
    use ferry_api::config_server::{ChangePointRequest, FailoverKind, FailoverRequest};
    let (job, no_wait): (Job, bool) = match a {
        FailoverAction::Start { machine, planned, unplanned: _, point, reason, drain_secs, no_start, no_wait } => {
            let kind = if planned { FailoverKind::Planned } else { FailoverKind::Unplanned };
            let req = FailoverRequest { machine, kind, point, reason, drain_secs, no_start };
            (s.call(Method::Post, "/api/v1/failovers", Some(&req)).await?, no_wait)
        }
        FailoverAction::ChangePoint { machine, point, no_wait } => {
            let path = format!("/api/v1/machines/{machine}/failover/change-point");
            (s.call(Method::Post, &path, Some(&ChangePointRequest { point })).await?, no_wait)
        }
        FailoverAction::Commit { machine, no_wait } => {
            let path = format!("/api/v1/machines/{machine}/failover/commit");
            (s.call(Method::Post, &path, None::<&()>).await?, no_wait)
        }
        FailoverAction::Cancel { machine, no_start, no_wait } => {
            let path = format!("/api/v1/machines/{machine}/failover/cancel");
            let req = ferry_api::config_server::CancelFailoverRequest { no_start };
            (s.call(Method::Post, &path, Some(&req)).await?, no_wait)
        }
    };
    if no_wait {
        show_one(&job, out);
        return Ok(());
    }
    watch(&job.id, s, out).await
}

#[derive(Debug, clap::Subcommand)]
pub enum TestFailoverAction {
    /// Drill a protected machine at a point (default `latest-processed`): a test machine runs in
    /// an isolated test network on a writable export of the point; replication goes on.
    Start {
        machine: String,
        /// An RC-1 selector (latest, latest-processed, latest-app, latest-multi,
        /// latest-multi-app), a point ID or a seq.
        #[arg(long)]
        point: Option<String>,
        /// Export the point but start no test machine (attach the export yourself).
        #[arg(long)]
        no_start: bool,
        #[arg(long)]
        no_wait: bool,
    },
    /// End a machine's drill: the test machine and the export removed, the point released, the
    /// drill recorded with its result.
    Cleanup {
        machine: String,
        #[arg(long, value_parser = ["passed", "failed"])]
        result: Option<String>,
        #[arg(long)]
        notes: Option<String>,
        #[arg(long)]
        no_wait: bool,
    },
}

/// `ferry test-failover …`.
pub async fn test_failover(a: TestFailoverAction, s: &ServerArgs, out: OutputFormat) -> Result<()> {
    use ferry_api::config_server::{CleanupTestFailoverRequest, DrillResult, TestFailoverRequest};
    let (job, no_wait): (Job, bool) = match a {
        TestFailoverAction::Start { machine, point, no_start, no_wait } => {
            let req = TestFailoverRequest { machine, point, no_start };
            (s.call(Method::Post, "/api/v1/test-failovers", Some(&req)).await?, no_wait)
        }
        TestFailoverAction::Cleanup { machine, result, notes, no_wait } => {
            let result = match result.as_deref() {
                Some("passed") => Some(DrillResult::Passed),
                Some(_) => Some(DrillResult::Failed),
                None => None,
            };
            let path = format!("/api/v1/machines/{}/test-failover/cleanup", enc(&machine));
            (s.call(Method::Post, &path, Some(&CleanupTestFailoverRequest { result, notes })).await?, no_wait)
        }
    };
    if no_wait {
        show_one(&job, out);
        return Ok(());
    }
    watch(&job.id, s, out).await
}

impl Rows for ferry_api::config_server::Drill {
    const HEADERS: &'static [&'static str] =
        &["id", "machine", "state", "point", "started", "by", "test_machine", "result", "cleaned_up"];
    fn cells(&self) -> Vec<String> {
        use ferry_api::config_server::DrillResult;
        vec![
            self.id.clone(),
            self.machine.clone(),
            serde_json::to_value(self.state).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default(),
            self.point.as_ref().map(|p| p.id.clone()).unwrap_or_else(|| self.point_requested.clone()),
            ferry_sys::time::utc(self.started_ms),
            self.started_by.clone(),
            opt(&self.test_machine),
            match self.result {
                Some(DrillResult::Passed) => "passed".into(),
                Some(DrillResult::Failed) => "failed".into(),
                None => "-".into(),
            },
            self.cleaned_up_ms.map(ferry_sys::time::utc).unwrap_or_else(|| "-".into()),
        ]
    }
}

/// `ferry drills`: test failovers, running and past.
pub async fn drills(s: &ServerArgs, out: OutputFormat) -> Result<()> {
    show(&s.get::<Vec<ferry_api::config_server::Drill>>("/api/v1/drills").await?, out);
    Ok(())
}

pub fn print_machines(v: &[MachineView]) {
    println!(
        "{:<10} {:<10} {:<8} {:<5} {:<26} {:<14} {:<9} {:<14} {:<12} POINTS (crash/app)",
        "MACHINE", "SITE", "OS", "POWER", "REPLICATION", "HEALTH", "RPO", "MASTER TARGET", "GROUP"
    );
    for m in v {
        let rpo = m.rpo_secs.map(|r| format!("{r:.1} s")).unwrap_or_else(|| "-".into());
        let sync = m.initial_sync.as_ref().map(|r| format!(" {:.0}%", r.percent)).unwrap_or_default();
        let points =
            m.points.as_ref().map(|p| format!("{}/{}", p.crash_tags, p.app_tags)).unwrap_or_else(|| "-".into());
        println!(
            "{:<10} {:<10} {:<8} {:<5} {:<26} {:<14} {:<9} {:<14} {:<12} {}",
            m.machine,
            m.site,
            m.os_family,
            m.power,
            format!("{}{sync}", m.replication),
            m.health.map(|h| h.as_str()).unwrap_or("not registered"),
            rpo,
            m.master_target.as_deref().unwrap_or("-"),
            m.group.as_deref().unwrap_or("-"),
            points
        );
        for r in &m.reasons {
            println!("    {} {}", r.code, r.message);
        }
    }
}

/// `ferry machines`.
pub async fn machines(s: &ServerArgs, out: OutputFormat) -> Result<()> {
    let v: Vec<MachineView> = s.get("/api/v1/machines").await?;
    match out {
        OutputFormat::Json => print_json(&v),
        OutputFormat::Table => print_machines(&v),
    }
    Ok(())
}

/// `ferry recovery-points MACHINE`.
pub async fn recovery_points(machine: &str, s: &ServerArgs, out: OutputFormat) -> Result<()> {
    let v: MachineRecoveryPoints = s.get(&format!("/api/v1/machines/{}/recovery-points", enc(machine))).await?;
    match out {
        OutputFormat::Json => print_json(&v),
        OutputFormat::Table => {
            println!("recovery points of {machine} on master target {}:", v.master_target);
            println!("{:<20} {:<16} {:<8} {:<8} {:<12} SEQ", "ID", "AGE", "KIND", "SCOPE", "GROUP");
            let now = ferry_sys::time::now_ms();
            for p in &v.points.points {
                let age = now.saturating_sub(p.time_ms) as f64 / 1000.0;
                println!(
                    "{:<20} {:<16} {:<8} {:<8} {:<12} {}",
                    p.id,
                    format!("{age:.0} s ago"),
                    if p.is_app() { "app" } else { "crash" },
                    if p.is_multi() { "multi" } else { "single" },
                    p.group.as_deref().unwrap_or("-"),
                    p.seq
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn machine_values_take_three_names_per_machine_once() {
        let v = |a: &[&str]| super::machine_values(&a.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        let ok = v(&["web1=mt-p,ps-r,vmfs-p", "win1=mt-pw,ps-r,vsan-p"]).unwrap();
        assert_eq!(ok["win1"].master_target, "mt-pw");
        assert_eq!(ok["web1"].datastore, "vmfs-p");
        for bad in ["web1", "web1=mt-p,ps-r", "=mt,ps,ds", "web1=mt,,ds", "web1=a,b,c,d"] {
            let e = v(&[bad]).unwrap_err().to_string();
            assert!(e.contains("MACHINE=MASTER_TARGET"), "{bad}: {e}");
        }
        let e = v(&["web1=a,b,c", "web1=d,e,f"]).unwrap_err().to_string();
        assert!(e.contains("twice"), "{e}");
    }
}

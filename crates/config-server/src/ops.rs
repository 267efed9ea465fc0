//! The work behind each job kind: discovery of a site, a recovery-plan drill (its groups' pre-
//! and post-actions in order), and configuration backups.

use std::sync::Arc;
use std::time::Duration;

use ferry_store::Store;

use crate::discovery::SiteOperation;
use crate::errors;
use crate::jobs::{Job, JobControl, JobError, Outcome, Runner};
use crate::model::{Action, RecoveryPlan};
use crate::provider;

pub use crate::inventory::{Site, INVENTORY, SITE};

/// Every job kind with its typed parameters. A job is stored as `kind` plus `params` (the job
/// engine knows neither); this is the one place that gives them a type, so a runner never looks
/// a parameter up by name.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", content = "params", rename_all = "kebab-case", deny_unknown_fields)]
pub enum JobWork {
    /// Read a site's description and files, then store its inventory.
    Discovery {},
    /// A recovery plan's actions in order (`None`: a group's own step).
    PlanDrill { plan: String, actions: Vec<Option<Action>> },
    /// An encrypted backup of the configuration database.
    Backup {},
    /// A provider operation, then a rediscovery of the site.
    SiteOperation { operation: SiteOperation },
    /// Enable replication of machines (see `protection`).
    Protect { protections: Vec<crate::protection::Protection>, wait_secs: u64, stall_secs: u64 },
    /// Start a test failover (see `test_failover`).
    TestFailover { machine: String, drill: String, point: String, no_start: bool },
    /// End a test failover and record it.
    TestFailoverCleanup {
        machine: String,
        drill: String,
        result: Option<ferry_api::config_server::DrillResult>,
        notes: Option<String>,
        by: String,
    },
    /// Fail a recovery plan over (see `plan_failover`).
    PlanFailover {
        plan: String,
        kind: ferry_api::config_server::FailoverKind,
        point: String,
        reason: String,
        drain_secs: u64,
        no_start: bool,
        steps: Vec<crate::plan_failover::PlanStep>,
    },
    /// Test failover of a recovery plan (see `plan_test_failover`).
    PlanTestFailover {
        plan: String,
        point: String,
        no_start: bool,
        steps: Vec<crate::plan_failover::PlanStep>,
        /// Machine → its drill.
        drills: std::collections::BTreeMap<String, String>,
    },
    /// End every drill of a plan's test failover, one step per machine.
    PlanTestFailoverCleanup {
        plan: String,
        drills: Vec<(String, String)>,
        result: Option<ferry_api::config_server::DrillResult>,
        notes: Option<String>,
        by: String,
    },
    /// Fail a machine over (see `failover`).
    Failover {
        machine: String,
        kind: ferry_api::config_server::FailoverKind,
        point: String,
        reason: String,
        drain_secs: u64,
        #[serde(default)]
        no_start: bool,
    },
    /// Put a failed-over machine's disks at another point.
    FailoverChangePoint { machine: String, point: String },
    /// Commit a machine's failover.
    FailoverCommit { machine: String },
    /// Cancel a machine's failover before commit (`by`: who asked).
    FailoverCancel { machine: String, no_start: bool, by: String },
    /// Disable (or, source unreachable, remove) a machine's protection (see `disable`).
    DisableProtection { machine: String, remove: bool },
    /// Reprotect a failed-over machine: its machine at the recovery site replicates back (see
    /// `reprotect`).
    Reprotect { machine: String, recovery_machine: String, stall_secs: u64 },
    /// Reprotect every machine of a recovery plan together (see `plan_reprotect`): (machine,
    /// recovery machine) pairs.
    PlanReprotect { plan: String, machines: Vec<(String, String)>, stall_secs: u64 },
}

impl JobWork {
    /// The kind name and parameters the job engine stores.
    pub fn split(&self) -> Result<(&'static str, serde_json::Value), crate::errors::ApiError> {
        let kind = match self {
            JobWork::Discovery {} => "discovery",
            JobWork::PlanDrill { .. } => "plan-drill",
            JobWork::Backup {} => "backup",
            JobWork::SiteOperation { .. } => "site-operation",
            JobWork::Protect { .. } => "protect",
            JobWork::Failover { .. } => "failover",
            JobWork::FailoverChangePoint { .. } => "failover-change-point",
            JobWork::FailoverCommit { .. } => "failover-commit",
            JobWork::FailoverCancel { .. } => "failover-cancel",
            JobWork::DisableProtection { .. } => "disable-protection",
            JobWork::Reprotect { .. } => "reprotect",
            JobWork::PlanReprotect { .. } => "plan-reprotect",
            JobWork::TestFailover { .. } => "test-failover",
            JobWork::PlanFailover { .. } => "plan-failover",
            JobWork::PlanTestFailover { .. } => "plan-test-failover",
            JobWork::PlanTestFailoverCleanup { .. } => "plan-test-failover-cleanup",
            JobWork::TestFailoverCleanup { .. } => "test-failover-cleanup",
        };
        let internal = |what: String| {
            crate::errors::ApiError::new(axum::http::StatusCode::INTERNAL_SERVER_ERROR, errors::INTERNAL, what)
        };
        let mut v = serde_json::to_value(self).map_err(|e| internal(format!("cannot encode the {kind} job: {e}")))?;
        let params = v.get_mut("params").map(serde_json::Value::take).unwrap_or_else(|| serde_json::json!({}));
        Ok((kind, params))
    }

    /// A stored job's work, or why it cannot be read (a job from another version).
    pub fn of(job: &Job) -> Result<JobWork, JobError> {
        let v = serde_json::json!({ "kind": job.kind, "params": job.params });
        serde_json::from_value(v).map_err(|e| {
            JobError::new(errors::JOB_STATE, format!("job {} ({}) has unreadable parameters: {e}", job.id, job.kind))
        })
    }
}

pub struct Ops {
    pub store: Store,
    pub backup: crate::backup::BackupConfig,
    /// The commands sites' power-on may run (`power_programs`).
    pub power_programs: Vec<Vec<String>>,
}

impl Ops {
    pub fn discovery_steps(site: &str) -> Vec<(String, bool)> {
        vec![
            (format!("read the description and files of site {site}"), true),
            (format!("store the inventory of site {site}"), true),
        ]
    }

    /// One step per action and one per group, in plan order.
    pub fn drill_steps(plan: &RecoveryPlan) -> (Vec<(String, bool)>, JobWork) {
        let mut steps = Vec::new();
        let mut actions = Vec::new();
        for (i, g) in plan.groups.iter().enumerate() {
            let n = i + 1;
            for a in &g.pre_actions {
                steps.push(action_step(n, "pre", a));
                actions.push(Some(a.clone()));
            }
            let machines = g.machines.len();
            steps.push((
                format!(
                    "group {n}: {machines} machine(s), {} replication group(s) (a drill runs the actions only: failover of machines is not implemented yet, nothing is changed)",
                    g.replication_groups.len()
                ),
                true,
            ));
            actions.push(None);
            for a in &g.post_actions {
                steps.push(action_step(n, "post", a));
                actions.push(Some(a.clone()));
            }
        }
        (steps, JobWork::PlanDrill { plan: plan.name.clone(), actions })
    }

    async fn discover(&self, job: &Job, store_it: bool) -> Outcome {
        let site: Option<ferry_store::Doc<Site>> = match self.store.get(SITE, &job.target).await {
            Ok(s) => s,
            Err(e) => return Outcome::Failed(JobError::new(errors::STORE, e.to_string())),
        };
        let Some(site) = site else {
            return Outcome::Failed(JobError::new(errors::NOT_FOUND, format!("site {} was deleted", job.target)));
        };
        let provider = provider::for_site(&site.body.name, &site.body.path, &self.power_programs);
        let inv = match provider.discover().await {
            Ok(inv) => inv,
            Err(e) => return Outcome::Failed(JobError::new(ferry_types::HasErrorCode::error_code(&e), e.to_string())),
        };
        let summary = format!(
            "{} host(s), {} datastore(s), {} network(s), {} machine(s), {} master target(s), {} process server(s); {} warning(s)",
            inv.content.hosts.len(),
            inv.content.datastores.len(),
            inv.content.networks.len(),
            inv.content.machines.len(),
            inv.content.master_targets.len(),
            inv.content.process_servers.len(),
            inv.warnings.len()
        );
        if store_it {
            if let Err(e) = self.store.put(INVENTORY, &inv.site, &inv, None).await {
                return Outcome::Failed(JobError::new(errors::STORE, e.to_string()));
            }
            for w in &inv.warnings {
                let _ = self
                    .store
                    .add_event(errors::DISCOVERY_FAILED.code as i64, "warning", &format!("site/{}", inv.site), w)
                    .await;
            }
        }
        Outcome::Done(Some(summary))
    }

    async fn operate(&self, job: &Job, op: SiteOperation) -> Outcome {
        let site: Option<ferry_store::Doc<Site>> = match self.store.get(SITE, &job.target).await {
            Ok(s) => s,
            Err(e) => return Outcome::Failed(JobError::new(errors::STORE, e.to_string())),
        };
        let Some(site) = site else {
            return Outcome::Failed(JobError::new(errors::NOT_FOUND, format!("site {} was deleted", job.target)));
        };
        let provider = provider::for_site(&site.body.name, &site.body.path, &self.power_programs);
        match provider.operate(op).await {
            Ok(msg) => Outcome::Done(Some(msg)),
            Err(e) => Outcome::Failed(JobError::new(ferry_types::HasErrorCode::error_code(&e), e.to_string())),
        }
    }

    async fn drill(&self, job: &Job, actions: &[Option<Action>], step: usize, ctl: &JobControl) -> Outcome {
        match actions.get(step).cloned().flatten() {
            None => Outcome::Done(Some("no data-path operation in a drill".into())),
            Some(a) => self.run_action(job, &a, ctl).await,
        }
    }

    /// Run a plan's action: a manual one waits for input; a script runs (`sh -c`), its output
    /// (the last 4000 characters of stdout and stderr) kept in the step's message.
    pub(crate) async fn run_action(&self, job: &Job, action: &Action, ctl: &JobControl) -> Outcome {
        match action {
            Action::Manual { name, instruction } => {
                Outcome::WaitForInput(format!("{name}: {instruction} (confirm with `ferry jobs confirm {}`)", job.id))
            }
            Action::Script { name, command, timeout_secs } => {
                let child = match tokio::process::Command::new("sh")
                    .arg("-c")
                    .arg(command)
                    .stdin(std::process::Stdio::null())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .kill_on_drop(true)
                    .spawn()
                {
                    Ok(c) => c,
                    Err(e) => {
                        return Outcome::Failed(JobError::new(
                            errors::JOB_STATE,
                            format!("script action {name:?} could not start: {e}"),
                        ))
                    }
                };
                let timeout_secs = *timeout_secs;
                let wait = tokio::time::timeout(Duration::from_secs(timeout_secs.max(1)), child.wait_with_output());
                tokio::select! {
                    r = wait => match r {
                        Ok(Ok(o)) => {
                            let mut out = String::from_utf8_lossy(&o.stdout).trim().to_owned();
                            let err = String::from_utf8_lossy(&o.stderr).trim().to_owned();
                            if !err.is_empty() {
                                out.push_str(&format!("{}stderr: {err}", if out.is_empty() { "" } else { "\n" }));
                            }
                            let n = out.chars().count();
                            if n > 4000 {
                                out = format!("…{}", out.chars().skip(n - 4000).collect::<String>());
                            }
                            let shown = if out.is_empty() { String::new() } else { format!(": {out}") };
                            if o.status.success() {
                                Outcome::Done(Some(format!("script {name:?} succeeded{shown}")))
                            } else {
                                Outcome::Failed(JobError::new(errors::JOB_STATE, format!("script action {name:?} failed ({}){shown}", o.status)))
                            }
                        }
                        Ok(Err(e)) => Outcome::Failed(JobError::new(errors::JOB_STATE, format!("script action {name:?}: {e}"))),
                        Err(_) => Outcome::Failed(JobError::new(errors::JOB_STATE, format!("script action {name:?} did not finish within {timeout_secs} s and was killed"))),
                    },
                    _ = ctl.cancel.cancelled() => Outcome::Failed(JobError::new(errors::JOB_STATE, format!("script action {name:?} was killed: the job was cancelled"))),
                }
            }
        }
    }
}

pub(crate) fn action_step(group: usize, when: &str, a: &Action) -> (String, bool) {
    match a {
        Action::Script { name, command, .. } => {
            (format!("group {group}: {when}-action script {name:?} ({command})"), false)
        }
        Action::Manual { name, .. } => (format!("group {group}: {when}-action manual {name:?}"), true),
    }
}

impl Runner for Ops {
    async fn job_ended(&self, job: &Job) {
        let Ok(work) = JobWork::of(job) else { return };
        let why = || {
            JobError::new(
                errors::JOB_STATE,
                format!("job {} ended at step {} without finishing", job.id, job.current_step),
            )
        };
        match work {
            JobWork::Failover { machine, kind, point, reason, drain_secs, no_start } => {
                let fj = crate::failover::FailoverJob {
                    job,
                    machine: &machine,
                    kind,
                    point: &point,
                    reason: &reason,
                    drain_secs,
                    no_start,
                };
                let e = self.failover_failed(&fj, job.current_step, why()).await;
                tracing::info!(job = %job.id, outcome = %e.message, "failover job ended early");
            }
            JobWork::PlanFailover { kind, point, reason, drain_secs, no_start, steps, .. } => {
                let pj =
                    crate::plan_failover::PlanJob { job, kind, point: &point, reason: &reason, drain_secs, no_start };
                self.plan_failover_failed(&pj, &steps).await;
            }
            JobWork::TestFailover { drill, .. } => {
                self.test_failover_failed(&drill, why()).await;
            }
            _ => {}
        }
    }

    async fn run_step(&self, job: &Job, step: usize, ctl: &JobControl) -> Outcome {
        let work = match JobWork::of(job) {
            Ok(w) => w,
            Err(e) => return Outcome::Failed(e),
        };
        match work {
            JobWork::Discovery {} => self.discover(job, step == 1).await,
            JobWork::PlanDrill { actions, .. } => self.drill(job, &actions, step, ctl).await,
            JobWork::SiteOperation { operation } if step == 0 => self.operate(job, operation).await,
            JobWork::SiteOperation { .. } => self.discover(job, true).await,
            JobWork::Protect { protections, wait_secs, stall_secs } => {
                let p = crate::protection::ProtectJob { job, protections: &protections, wait_secs, stall_secs };
                match crate::protection::run_step(&self.store, &p, step, ctl).await {
                    Outcome::Failed(e) => {
                        crate::protection::mark_failed(&self.store, &p).await;
                        Outcome::Failed(e)
                    }
                    o => o,
                }
            }
            JobWork::Failover { machine, kind, point, reason, drain_secs, no_start } => {
                let fj = crate::failover::FailoverJob {
                    job,
                    machine: &machine,
                    kind,
                    point: &point,
                    reason: &reason,
                    drain_secs,
                    no_start,
                };
                match self.failover_step(&fj, step, ctl).await {
                    Outcome::Failed(e) => Outcome::Failed(self.failover_failed(&fj, step, e).await),
                    o => o,
                }
            }
            JobWork::FailoverChangePoint { machine, point } => {
                self.change_point_step(job, &machine, &point, step, ctl).await
            }
            JobWork::FailoverCommit { machine } => self.commit_step(job, &machine, step, ctl).await,
            JobWork::FailoverCancel { machine, no_start, by } => {
                self.cancel_step(job, &machine, no_start, &by, step, ctl).await
            }
            JobWork::DisableProtection { machine, remove } => self.disable_step(job, &machine, remove, step, ctl).await,
            JobWork::Reprotect { machine, recovery_machine, stall_secs } => {
                match self.reprotect_step(job, &machine, &recovery_machine, stall_secs, step, ctl).await {
                    Outcome::Failed(e) => {
                        crate::reprotect::mark_failed(&self.store, job, &recovery_machine).await;
                        Outcome::Failed(e)
                    }
                    o => o,
                }
            }
            JobWork::PlanReprotect { machines, stall_secs, .. } => {
                match self.plan_reprotect_step(job, &machines, stall_secs, step, ctl).await {
                    Outcome::Failed(e) => {
                        for (_, rm) in &machines {
                            crate::reprotect::mark_failed(&self.store, job, rm).await;
                        }
                        Outcome::Failed(e)
                    }
                    o => o,
                }
            }
            JobWork::TestFailover { machine, drill, point, no_start } => {
                match self.test_failover_step(&machine, &drill, &point, no_start, step, ctl).await {
                    Outcome::Failed(e) => Outcome::Failed(self.test_failover_failed(&drill, e).await),
                    o => o,
                }
            }
            JobWork::PlanFailover { kind, point, reason, drain_secs, no_start, steps, .. } => {
                let pj =
                    crate::plan_failover::PlanJob { job, kind, point: &point, reason: &reason, drain_secs, no_start };
                match self.plan_failover_step(&pj, &steps, step, ctl).await {
                    Outcome::Failed(e) => {
                        self.plan_failover_failed(&pj, &steps).await;
                        Outcome::Failed(e)
                    }
                    o => o,
                }
            }
            JobWork::PlanTestFailover { point, no_start, steps, drills, .. } => {
                self.plan_test_failover_step(job, &point, no_start, &steps, &drills, step, ctl).await
            }
            JobWork::PlanTestFailoverCleanup { drills, result, notes, by, .. } => {
                self.plan_test_failover_cleanup_step(job, &drills, result, notes, &by, step, ctl).await
            }
            JobWork::TestFailoverCleanup { machine, drill, result, notes, by } => {
                self.test_failover_cleanup_step(job, &machine, &drill, (result, notes, &by), step, ctl).await
            }
            JobWork::Backup {} => match crate::backup::write_backup(&self.store, &self.backup, ctl).await {
                Ok(path) => Outcome::Done(Some(format!("backup written to {}", path.display()))),
                Err(e) => Outcome::Failed(JobError::new(errors::BACKUP_FAILED, e)),
            },
        }
    }
}

pub const JOB_KINDS: &[&str] = &[
    "discovery",
    "plan-drill",
    "backup",
    "site-operation",
    "protect",
    "failover",
    "failover-change-point",
    "failover-commit",
    "failover-cancel",
    "disable-protection",
    "reprotect",
    "plan-reprotect",
    "test-failover",
    "test-failover-cleanup",
    "plan-failover",
    "plan-test-failover",
    "plan-test-failover-cleanup",
];

pub fn arc(store: Store, backup: crate::backup::BackupConfig, power_programs: Vec<Vec<String>>) -> Arc<Ops> {
    Arc::new(Ops { store, backup, power_programs })
}

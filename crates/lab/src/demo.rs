//! `ferry demo`: Ferry's main job on its embedded defaults, end to end on one machine. It brings a
//! two-site lab up (a temp folder), creates a policy, protects every machine (a replication group's
//! machines together, the others alone; Windows machines to a Windows master target when the
//! recovery site has one), lets the guests' workloads run, takes an app-consistent point per
//! machine and a multi-machine point per group, materializes each machine's app-consistent point
//! as raw images on its master target and checks them with `ferry lab verify` (exactly the records
//! up to the seq the workload paused at), then the group point (a consistent prefix on every
//! member); then runs the whole cycle through a recovery plan (its replication groups in its
//! first group, the other machines in its second; a machine on NFS is left out, as DS-1 would
//! refuse its reprotect): the primary site lost (its machines crash), an unplanned plan failover
//! to the latest multi-machine app-consistent point of each group and the latest app-consistent
//! point of each other machine, commit, the plan reprotected to the primaries' own disks, failed
//! back planned, reprotected forward — and compares both sites' disks byte for byte with the
//! workloads paused; prints a summary (a row per phase: time, bytes sent, bytes changed from the
//! workload logs) and tears the lab down (`--keep` leaves it running).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_api::agent::{AgentStatus, GroupPointRequest, GroupReport, TagTaken};
use ferry_api::config_server::{
    Job, JobState, MachineRecoveryPoints, PlanGroup, Policy, PolicyCreated, ProtectRequest, RecoveryPlan,
};
use ferry_api::control::ComponentStatus;
use ferry_api::master_target::{ImageFormat, Materialization, MaterializationKind, MaterializeRequest, MaterializedAs};
use ferry_api::Method;

use crate::site::{self as lab_site, LabSpec, LabState};
use ferry_status::server_client::ServerClient;

/// What `ferry demo` is asked to do.
#[derive(Debug, Clone)]
pub struct DemoArgs {
    /// Leave the lab running (and its folder) at the end.
    pub keep: bool,
    /// Lab folder (default: a new temp folder).
    pub dir: Option<PathBuf>,
    /// A lab description instead of the built-in one.
    pub config: Option<PathBuf>,
    /// Seconds the workloads run after protection before the points are taken.
    pub workload_secs: f64,
}

/// Where the demo reports progress: `step` for a finished step (a line), `status` for what it
/// is waiting on now (replaced by the next), `done` before the summary.
pub trait Progress: Send + Sync {
    fn step(&self, msg: &str);
    fn status(&self, msg: &str);
    fn done(&self);
}

/// What the demo found: a row per machine, the full cycle of one machine, and whether every
/// point verified and the cycle ended byte-exact.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DemoReport {
    pub lab: PathBuf,
    pub machines: Vec<DemoMachine>,
    #[serde(default)]
    pub cycle: Option<DemoCycle>,
    pub verified: bool,
}

/// Failover → reprotect → failback → reprotect of a recovery plan, a row per phase.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DemoCycle {
    /// The recovery plan the cycle runs through, and its machines.
    pub plan: String,
    pub machines: Vec<String>,
    pub phases: Vec<DemoPhase>,
    /// Both sites' disks compared byte for byte at the end (workload paused, all applied).
    pub byte_exact: bool,
    /// A machine on an NFS datastore, not cycled (DS-1 would refuse its reprotect).
    pub refused: Option<String>,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DemoPhase {
    pub phase: String,
    pub secs: f64,
    /// Bytes the resync sent (reprotects).
    pub bytes_sent: Option<u64>,
    /// Bytes of the blocks that could differ (the running copy's tracked writes).
    pub bytes_changed: Option<u64>,
}

/// One protected machine of the demo: what was replicated and what the verifications said.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DemoMachine {
    pub machine: String,
    pub master_target: String,
    pub bytes_replicated: u64,
    pub rpo_secs: f64,
    pub points: usize,
    pub app_point: String,
    /// The workload record the app-consistent point must end at.
    pub app_point_record: Option<u64>,
    /// `PASS` or `FAIL: why`.
    pub verify_app_point: String,
    /// `PASS (…)`, `FAIL: why`, or `-` (not in a group).
    pub verify_group_point: String,
    pub workload_records: u64,
}

/// The guest's agent status (its own status endpoint).
async fn agent_status(st: &LabState, machine: &str) -> Result<AgentStatus> {
    let ends = st.guest_endpoints(machine)?;
    match ferry_status::status_of(&ends.status).await? {
        ComponentStatus::Agent(a) => Ok(a),
        other => bail!("{} answers for a {}, not {machine}'s agent", ends.status, other.kind()),
    }
}

fn last_line_seq(path: &Path) -> Option<u64> {
    std::fs::read_to_string(path).ok()?.lines().rev().find_map(|l| l.trim().parse().ok())
}

fn records(path: &Path) -> u64 {
    std::fs::read_to_string(path).map(|t| t.lines().count() as u64).unwrap_or(0)
}

/// Run the demo; the report, or why it could not run. A failed verification is a report with
/// `verified: false` (the lab's files are then kept).
pub async fn run(args: DemoArgs, p: &dyn Progress) -> Result<DemoReport> {
    let dir = match &args.dir {
        Some(d) => d.clone(),
        None => std::env::temp_dir().join(format!("ferry-demo-{:08x}", rand::random::<u32>())),
    };
    p.step(&format!("bringing up a two-site lab in {}", dir.display()));
    let st = match lab_site::up(&dir, args.config.as_deref(), &|_| {}).await {
        Ok(st) => st,
        Err(e) => {
            p.done();
            return Err(e);
        }
    };
    let result = demo(&st, &args, p).await;
    p.done();
    if args.keep {
        p.step(&format!("the lab keeps running: `ferry lab status {0}`, `ferry lab down {0}`", st.dir.display()));
    } else {
        let remove = result.as_ref().is_ok_and(|r| r.verified);
        lab_site::down(&st.dir, remove).await.context("tearing the lab down")?;
        if !remove {
            p.step(&format!("files and logs kept in {}", st.dir.display()));
        }
    }
    result
}

async fn wait_for<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f().await? {
            return Ok(v);
        }
        if Instant::now() >= deadline {
            bail!("{what}: not done within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// The demo proper; Ok(false) when a verification failed.
async fn demo(st: &LabState, args: &DemoArgs, p: &dyn Progress) -> Result<DemoReport> {
    let spec: LabSpec = toml::from_str(&std::fs::read_to_string(st.dir.join("lab.toml"))?)?;
    let server = st.server();
    let policy = Policy {
        name: "demo".into(),
        rpo_threshold_secs: 120,
        retention_secs: 3600,
        app_consistent_secs: 3600,
        crash_consistent_secs: 10,
        failback_of: None,
        read_only: false,
        associated: true,
    };
    let _: PolicyCreated = server.call(Method::Post, "/api/v1/policies", Some(&policy)).await?;
    p.step(
        "policy demo: crash-consistent points every 10 s, app-consistent every hour, 1 h retention, RPO alert at 2 min",
    );

    // Where each machine goes: a master target of another site (Windows machines to a Windows
    // one when there is one), datastores of that site in turn.
    let mut requests = Vec::new();
    let mut grouped = std::collections::HashSet::new();
    let plan = |machines: Vec<(String, String, String)>, group: Option<String>, k: usize| -> Result<ProtectRequest> {
        let (_, site, os) = machines[0].clone();
        let other =
            spec.sites.iter().filter(|s| s.name != site && s.master_targets.iter().any(|m| m.run)).collect::<Vec<_>>();
        let rs =
            other.first().with_context(|| format!("no site with a master target to protect {site}'s machines to"))?;
        let mt = rs
            .master_targets
            .iter()
            .filter(|m| m.run)
            .find(|m| m.os_family == os)
            .or_else(|| rs.master_targets.iter().find(|m| m.run))
            .context("no master target")?;
        // Not NFS when there is another: a replica on NFS could not be reprotected forward
        // again after a failback (DS-1), and the demo runs that cycle.
        let writable: Vec<_> = rs.datastores.iter().filter(|d| d.accessible && d.access == "read-write").collect();
        let not_nfs: Vec<_> = writable.iter().copied().filter(|d| d.kind != "nfs").collect();
        let usable = if not_nfs.is_empty() { writable } else { not_nfs };
        let ds = usable
            .get(k % usable.len().max(1))
            .with_context(|| format!("site {} has no accessible, writable datastore for the replicas", rs.name))?;
        let ps = spec
            .sites
            .iter()
            .find(|s| s.name == site)
            .and_then(|s| s.process_server.clone())
            .context("the machine's site has no process server")?;
        Ok(ProtectRequest {
            machine: None,
            machines: machines.iter().map(|m| m.0.clone()).collect(),
            group,
            policy: "demo".into(),
            process_server: ps.name,
            master_target: mt.name.clone(),
            datastore: ds.name.clone(),
            wait_secs: 900,
            stall_secs: 600,
        })
    };
    let find = |name: &str| -> Option<(String, String, String)> {
        spec.sites.iter().find_map(|s| {
            s.machines
                .iter()
                .find(|m| m.name == name && m.power == "on")
                .map(|m| (m.name.clone(), s.name.clone(), m.os_family.clone()))
        })
    };
    let mut k = 0;
    for g in &spec.groups {
        let ms: Vec<_> = g.machines.iter().filter_map(|m| find(m)).collect();
        if ms.is_empty() || ms.len() != g.machines.len() {
            continue;
        }
        for m in &ms {
            grouped.insert(m.0.clone());
        }
        requests.push(plan(ms, Some(g.name.clone()), k)?);
        k += 1;
    }
    for s in &spec.sites {
        for m in s.machines.iter().filter(|m| m.power == "on" && !grouped.contains(&m.name)) {
            if let Some(x) = find(&m.name) {
                requests.push(plan(vec![x], None, k)?);
                k += 1;
            }
        }
    }
    let mut jobs = Vec::new();
    for r in &requests {
        let job: Job = server.call(Method::Post, "/api/v1/protections", Some(r)).await?;
        p.step(&format!(
            "protect {} → {} on {} (datastore {}), job {}",
            r.machines.join(", "),
            r.master_target,
            r.process_server,
            r.datastore,
            job.id
        ));
        jobs.push(job.id);
    }
    // Follow the jobs: initial sync bytes, %, ETA.
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let mut done = 0;
        let mut parts = Vec::new();
        for id in &jobs {
            let v: Job = server.call(Method::Get, &format!("/api/v1/jobs/{id}"), None::<&()>).await?;
            match v.state {
                JobState::Succeeded => done += 1,
                JobState::Failed | JobState::Cancelled => bail!(
                    "protect job {id} failed: {} (remedy: {})",
                    v.error.as_ref().map(|e| e.message.as_str()).unwrap_or("-"),
                    v.error.as_ref().map(|e| e.remedy.as_str()).unwrap_or("-")
                ),
                _ => {}
            }
            parts.push(format!(
                "{} {:.0}%{}",
                v.target,
                v.progress_percent,
                v.eta_secs.map(|e| format!(" ETA {e:.0}s")).unwrap_or_default()
            ));
        }
        p.status(&format!("initial sync: {}", parts.join(" · ")));
        if done == jobs.len() {
            break;
        }
        if Instant::now() >= deadline {
            bail!("protection did not finish within 10 min");
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let machines: Vec<String> = requests.iter().flat_map(|r| r.machines.iter().cloned()).collect();
    p.step(&format!("{} machine(s) Protected; workloads running for {:.0} s", machines.len(), args.workload_secs));
    let guest_dir = |m: &str| -> Result<PathBuf> { Ok(st.machine_site(m)?.1.join("guests").join(m)) };
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs_f64(args.workload_secs) {
        let mut parts = Vec::new();
        for m in &machines {
            parts.push(format!("{m}: {} records", records(&guest_dir(m)?.join("records.log"))));
        }
        p.status(&format!("workloads: {}", parts.join(" · ")));
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    let mut at_points = BTreeMap::new();
    for m in &machines {
        at_points.insert(m.clone(), records(&guest_dir(m)?.join("records.log")) as usize);
    }
    // An app-consistent point per machine (the freeze pauses its workload and notes the seq).
    let mut app_seq: BTreeMap<String, Option<u64>> = BTreeMap::new();
    let mut app_time: BTreeMap<String, u64> = BTreeMap::new();
    for m in &machines {
        let ends = st.guest_endpoints(m)?;
        let before = crate::site::now_ms();
        let _: TagTaken = ferry_status::call_control(&ends.status, Method::Post, "/points/app", None::<&()>)
            .await
            .with_context(|| format!("app-consistent point of {m}"))?;
        let seq = last_line_seq(&guest_dir(m)?.join("app-consistent.log"));
        p.step(&format!(
            "{m}: app-consistent point taken (workload paused at record {})",
            seq.map(|s| s.to_string()).unwrap_or("-".into())
        ));
        app_seq.insert(m.clone(), seq);
        app_time.insert(m.clone(), before);
    }
    // A multi-machine (crash-consistent) point per replication group, from its coordinator.
    let mut group_of: BTreeMap<String, String> = BTreeMap::new();
    for r in &requests {
        let (Some(group), Some(first)) = (&r.group, r.machines.first()) else { continue };
        let ends = st.guest_endpoints(first)?;
        let _: GroupReport = ferry_status::call_control(
            &ends.status,
            Method::Post,
            "/group/point",
            // App-consistent: the plan failover below goes to the latest such group point.
            Some(&GroupPointRequest { app: true }),
        )
        .await
        .with_context(|| format!("multi-machine point of group {group}"))?;
        for m in &r.machines {
            group_of.insert(m.clone(), group.clone());
        }
        p.step(&format!("group {group}: multi-machine app-consistent point across {}", r.machines.join(", ")));
    }

    // Materialize and verify.
    let mut rows = Vec::new();
    let mut all_ok = true;
    let work = st.dir.join("demo");
    for m in &machines {
        let gdir = guest_dir(m)?;
        let seed = spec
            .sites
            .iter()
            .flat_map(|s| s.machines.iter())
            .find(|x| &x.name == m)
            .and_then(|x| x.workload.as_ref())
            .map(|w| w.seed)
            .unwrap_or(1);
        let since = app_time[m];
        let points =
            wait_for(&format!("{m}'s app-consistent point at its master target"), Duration::from_secs(120), || {
                let server = server.clone();
                let m = m.clone();
                async move {
                    let path = format!("/api/v1/machines/{m}/recovery-points");
                    let v: MachineRecoveryPoints = server.call(Method::Get, &path, None::<&()>).await?;
                    let has = v.points.points.iter().any(|p| p.is_app() && !p.is_multi() && p.time_ms >= since);
                    Ok(has.then_some(v))
                }
            })
            .await?;
        let list = &points.points.points;
        let app = list
            .iter()
            .filter(|p| p.is_app() && !p.is_multi() && p.time_ms >= since)
            .max_by_key(|p| p.seq)
            .cloned()
            .with_context(|| format!("{m}'s app-consistent point went away"))?;
        let mt = points.master_target.clone();
        let mt_status = st
            .process(&mt)
            .and_then(|p| p.status.clone())
            .with_context(|| format!("master target {mt} is not in the lab"))?;
        let materialize = |point: String, dir: PathBuf| {
            let mt_status = mt_status.clone();
            let m = m.clone();
            async move {
                let req = MaterializeRequest {
                    point: point.clone(),
                    kind: MaterializationKind::Image,
                    format: Some(ImageFormat::Raw),
                    dir: Some(dir),
                    writable: false,
                    order: None,
                };
                let v: Materialization = ferry_status::call_control(
                    &mt_status,
                    Method::Post,
                    &format!("/machines/{m}/materializations"),
                    Some(&req),
                )
                .await
                .with_context(|| format!("materializing {point} of {m}"))?;
                let files = match v.what {
                    MaterializedAs::Image { files, .. } => files,
                    MaterializedAs::Export { .. } => bail!("{mt_status} made an export of {point}, not images"),
                };
                Ok::<_, anyhow::Error>((v.id, files))
            }
        };
        let id = app.id.clone();
        let (app_mat, files) = materialize(id.clone(), work.join(format!("{m}-app"))).await?;
        let log = gdir.join("records.log");
        let exact = app_seq[m];
        let verdict = {
            let (log, files) = (log.clone(), files.clone());
            tokio::task::spawn_blocking(move || crate::workload::verify(&log, &files, seed, exact)).await??
        };
        all_ok &= verdict.consistent;
        p.step(&format!(
            "{m}: point {id} materialized ({} raw image(s)); lab verify: {}",
            files.len(),
            if verdict.consistent {
                format!("PASS (exactly records 1..{})", verdict.prefix_seq)
            } else {
                format!("FAIL: {}", verdict.problem.clone().unwrap_or_default())
            }
        ));
        let mut group_result = "-".to_owned();
        if let Some(g) = group_of.get(m) {
            let (group_mat, gfiles) = materialize("latest-multi".into(), work.join(format!("{m}-group"))).await?;
            let v = tokio::task::spawn_blocking({
                let log = log.clone();
                move || crate::workload::verify(&log, &gfiles, seed, None)
            })
            .await??;
            discard(&mt_status, &group_mat).await?;
            all_ok &= v.consistent;
            group_result = if v.consistent {
                format!("PASS ({g} @ record {})", v.prefix_seq)
            } else {
                format!("FAIL: {}", v.problem.unwrap_or_default())
            };
        }
        // Verified: the images go (a materialized point pins the replica's history).
        discard(&mt_status, &app_mat).await?;
        let agent = agent_status(st, m).await.ok();
        rows.push(DemoMachine {
            machine: m.clone(),
            master_target: mt,
            bytes_replicated: agent.as_ref().map(|a| a.shipped_bytes).unwrap_or(0),
            rpo_secs: agent.as_ref().map(|a| a.lag_seconds).unwrap_or(0.0),
            points: list.len(),
            app_point: id,
            app_point_record: exact,
            verify_app_point: if verdict.consistent {
                "PASS".to_owned()
            } else {
                format!("FAIL: {}", verdict.problem.unwrap_or_default())
            },
            verify_group_point: group_result,
            workload_records: records(&log),
        });
    }
    // The whole cycle through one recovery plan: the replication groups in its first group,
    // the other machines in its second — every machine whose disks are not on NFS on either
    // side (DS-1 would refuse its reprotect).
    let kind_of = |site: &str, ds: &str| {
        spec.sites
            .iter()
            .find(|s| s.name == site)
            .and_then(|s| s.datastores.iter().find(|d| d.name == ds))
            .map(|d| d.kind.clone())
    };
    let mut legs = Vec::new();
    let mut refused = Vec::new();
    let (mut plan_groups, mut plan_machines) = (Vec::new(), Vec::new());
    'requests: for r in &requests {
        let mut these = Vec::new();
        for m in &r.machines {
            let Some((psite, pm)) =
                spec.sites.iter().find_map(|s| s.machines.iter().find(|x| &x.name == m).map(|x| (s, x)))
            else {
                continue 'requests;
            };
            let Some(rsite) = spec.sites.iter().find(|s| s.master_targets.iter().any(|t| t.name == r.master_target))
            else {
                continue 'requests;
            };
            if kind_of(&psite.name, &pm.datastore).as_deref() == Some("nfs")
                || kind_of(&rsite.name, &r.datastore).as_deref() == Some("nfs")
            {
                refused.push(format!(
                    "{m} lives on NFS datastore {}: its original-location failback would be refused by DS-1, so the demo does not cycle {}",
                    pm.datastore,
                    r.group.as_ref().map(|g| format!("its group {g}")).unwrap_or_else(|| "it".into())
                ));
                continue 'requests;
            }
            let Some(pmt) = psite.master_targets.iter().find(|t| t.run && t.os_family == pm.os_family) else {
                continue 'requests;
            };
            let Some(rps) = rsite.process_server.as_ref() else { continue 'requests };
            these.push(CycleLegs {
                machine: m.clone(),
                psite: psite.name.clone(),
                rsite: rsite.name.clone(),
                pdatastore: pm.datastore.clone(),
                rdatastore: r.datastore.clone(),
                pmt: pmt.name.clone(),
                rmt: r.master_target.clone(),
                pps: r.process_server.clone(),
                rps: rps.name.clone(),
                disks: pm.disks.iter().map(|d| d.name.clone()).collect(),
            });
        }
        match &r.group {
            Some(g) => plan_groups.push(g.clone()),
            None => plan_machines.extend(r.machines.iter().cloned()),
        }
        legs.extend(these);
    }
    let mut cycle = None;
    if !legs.is_empty() {
        let mut groups = Vec::new();
        if !plan_groups.is_empty() {
            groups.push(PlanGroup { replication_groups: plan_groups, ..Default::default() });
        }
        if !plan_machines.is_empty() {
            groups.push(PlanGroup { machines: plan_machines, ..Default::default() });
        }
        let plan = RecoveryPlan { name: "demo".into(), groups };
        let _: RecoveryPlan = server.call(Method::Post, "/api/v1/recovery-plans", Some(&plan)).await?;
        p.step(&format!(
            "recovery plan demo: {}",
            plan.groups
                .iter()
                .enumerate()
                .map(|(i, g)| format!(
                    "group {}: {}",
                    i + 1,
                    g.replication_groups
                        .iter()
                        .map(|x| format!("replication group {x}"))
                        .chain(g.machines.iter().cloned())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
                .collect::<Vec<_>>()
                .join("; ")
        ));
        let mut c = run_cycle(st, &server, &legs, &at_points, p).await?;
        c.refused = (!refused.is_empty()).then(|| refused.join("; "));
        all_ok &= c.byte_exact;
        cycle = Some(c);
    }
    Ok(DemoReport { lab: st.dir.clone(), machines: rows, cycle, verified: all_ok })
}

/// Discard a materialization the demo made (its images are verified).
async fn discard(mt_status: &str, id: &str) -> Result<()> {
    let _: ferry_api::master_target::Discarded =
        ferry_status::call_control(mt_status, Method::Delete, &format!("/materializations/{id}"), None::<&()>)
            .await
            .with_context(|| format!("discarding materialization {id}"))?;
    Ok(())
}

/// The 4 KiB blocks the records of a workload log touch, after its first `skip` lines.
fn log_blocks(path: &Path, skip: usize) -> std::collections::BTreeSet<u64> {
    let mut set = std::collections::BTreeSet::new();
    for line in std::fs::read_to_string(path).unwrap_or_default().lines().skip(skip) {
        let v: Vec<u64> = line.split_whitespace().filter_map(|x| x.parse().ok()).collect();
        if v.len() >= 4 {
            set.extend((0..v[3]).map(|i| v[2] / 4096 + i));
        }
    }
    set
}

/// Where one machine's cycle goes.
struct CycleLegs {
    machine: String,
    psite: String,
    rsite: String,
    pdatastore: String,
    rdatastore: String,
    pmt: String,
    rmt: String,
    pps: String,
    rps: String,
    disks: Vec<String>,
}

/// Through the plan: the primary site lost (its machines crash) → unplanned failover to the
/// latest (multi-machine) app-consistent points → commit → reprotect → failback (planned) →
/// commit → reprotect forward; then both sites' disks compared with the workloads paused.
/// `at_points`: each machine's workload records before its points were taken (what it wrote
/// after them is at most the failover's loss).
async fn run_cycle(
    st: &LabState,
    server: &ServerClient,
    legs: &[CycleLegs],
    at_points: &BTreeMap<String, usize>,
    p: &dyn Progress,
) -> Result<DemoCycle> {
    use ferry_api::config_server::{
        FailoverKind, MachineView, PlanFailbackRequest, PlanFailoverRequest, PlanReprotectRequest, ReprotectTargets,
        SiteOperation,
    };
    let limit = Duration::from_secs(900);
    let mut phases = Vec::new();
    let names: Vec<&str> = legs.iter().map(|l| l.machine.as_str()).collect();
    let all = names.join(", ");
    let rm_of = |l: &CycleLegs| format!("{}.{}", l.machine, l.rsite);
    let job_of = |job: Job| async move { lab_site::wait_job(server, &job, limit).await };
    let commit = |machine: String| async move {
        let job: Job =
            server.call(Method::Post, &format!("/api/v1/machines/{machine}/failover/commit"), None::<&()>).await?;
        job_of(job).await
    };
    let reprotect = |values: BTreeMap<String, ReprotectTargets>| async move {
        let req = PlanReprotectRequest {
            defaults: None,
            machines: values,
            stall_secs: 600,
            discard_primary_changes: false,
            clock_skew_secs: 5,
        };
        let job: Job = server.call(Method::Post, "/api/v1/recovery-plans/demo/reprotect", Some(&req)).await?;
        job_of(job).await
    };
    let resynced = |machines: Vec<String>| async move {
        let v: Vec<MachineView> = server.call(Method::Get, "/api/v1/machines", None::<&()>).await?;
        let mut sum = 0;
        for m in &machines {
            let x = v.iter().find(|x| &x.machine == m).with_context(|| format!("no machine {m}"))?;
            sum += x
                .reprotect
                .as_ref()
                .and_then(|r| r.resynced_bytes)
                .with_context(|| format!("{m} is Protected but its record names no resynced bytes"))?;
        }
        anyhow::Ok(sum)
    };
    let guest = |m: &str| -> Result<PathBuf> { Ok(st.machine_site(m)?.1.join("guests").join(m)) };
    let mut phase = |name: String, t: Instant, sent: Option<u64>, changed: Option<u64>| {
        let secs = t.elapsed().as_secs_f64();
        p.step(&format!(
            "{name}: {secs:.1} s{}",
            sent.map(|b| format!(", {b} bytes sent for {} changed", changed.unwrap_or(0))).unwrap_or_default()
        ));
        phases.push(DemoPhase { phase: name, secs, bytes_sent: sent, bytes_changed: changed });
    };

    // The primary site is lost: its machines crash. Their agents' write leases (1 s) and the
    // reprotect's clock-skew margin (5 s) pass before the failover starts, so what they wrote
    // last is the failover's expected loss, not a split brain.
    p.status(&format!("the primary site is lost: {all} crash"));
    for l in legs {
        let op = SiteOperation::Crash { machine: l.machine.clone() };
        let job: Job = server.call(Method::Post, &format!("/api/v1/sites/{}/operations", l.psite), Some(&op)).await?;
        job_of(job).await?;
    }
    p.step(&format!("primary site lost: {all} crashed"));
    tokio::time::sleep(Duration::from_secs(7)).await;

    p.status("plan demo: unplanned failover");
    let t = Instant::now();
    let req = PlanFailoverRequest {
        kind: FailoverKind::Unplanned,
        point: Some("latest-multi-app".into()),
        reason: Some("ferry demo: the primary site is lost".into()),
        drain_secs: 300,
        no_start: false,
    };
    let job: Job = server.call(Method::Post, "/api/v1/recovery-plans/demo/failover", Some(&req)).await?;
    job_of(job).await?;
    for m in &names {
        commit((*m).to_owned()).await?;
    }
    phase("plan demo: unplanned failover to the latest (multi-machine) app points".into(), t, None, None);
    tokio::time::sleep(Duration::from_secs(3)).await;

    p.status("plan demo: reprotect to the primaries' own disks");
    let t = Instant::now();
    let back = legs
        .iter()
        .map(|l| {
            let v = ReprotectTargets {
                master_target: l.pmt.clone(),
                process_server: l.rps.clone(),
                datastore: l.pdatastore.clone(),
            };
            (l.machine.clone(), v)
        })
        .collect();
    reprotect(back).await?;
    let sent = resynced(legs.iter().map(rm_of).collect()).await?;
    // Changed: what the recovery machines wrote, and at most what the primaries wrote after
    // their points (the failover's loss).
    let mut changed = 0;
    for l in legs {
        let rlog = st.dir.join(format!("sites/{}/guests/{}/records.log", l.rsite, rm_of(l)));
        let mut blocks = log_blocks(&rlog, 0);
        blocks.extend(log_blocks(
            &guest(&l.machine)?.join("records.log"),
            at_points.get(&l.machine).copied().unwrap_or(0),
        ));
        changed += blocks.len() as u64 * 4096;
    }
    phase("plan demo: reprotect to the primaries' own disks".into(), t, Some(sent), Some(changed));
    tokio::time::sleep(Duration::from_secs(3)).await;

    p.status("plan demo: planned failback");
    let t = Instant::now();
    let mut before = BTreeMap::new();
    for m in &names {
        before.insert((*m).to_owned(), records(&guest(m)?.join("records.log")) as usize);
    }
    let req = PlanFailbackRequest {
        planned: true,
        point: None,
        reason: Some("ferry demo: failback".into()),
        drain_secs: 300,
        no_start: false,
    };
    let job: Job = server.call(Method::Post, "/api/v1/recovery-plans/demo/failback", Some(&req)).await?;
    job_of(job).await?;
    for l in legs {
        commit(rm_of(l)).await?;
    }
    phase("plan demo: planned failback (primaries boot on their own disks)".into(), t, None, None);
    tokio::time::sleep(Duration::from_secs(3)).await;

    p.status("plan demo: reprotect forward");
    let t = Instant::now();
    let forward = legs
        .iter()
        .map(|l| {
            let v = ReprotectTargets {
                master_target: l.rmt.clone(),
                process_server: l.pps.clone(),
                datastore: l.rdatastore.clone(),
            };
            (l.machine.clone(), v)
        })
        .collect();
    reprotect(forward).await?;
    let sent = resynced(names.iter().map(|m| (*m).to_owned()).collect()).await?;
    let mut changed = 0;
    for m in &names {
        changed += log_blocks(&guest(m)?.join("records.log"), before[*m]).len() as u64 * 4096;
    }
    phase("plan demo: reprotect forward (protected as at the start)".into(), t, Some(sent), Some(changed));

    // Byte-exact: the workloads paused and flushed, everything applied at the recovery site.
    let mut byte_exact = true;
    for l in legs {
        let m = l.machine.as_str();
        let g = guest(m)?;
        std::fs::write(g.join("pause"), b"")?;
        let settled = wait_for(&format!("{m}'s workload paused and applied"), Duration::from_secs(120), || async {
            let a = agent_status(st, m).await?;
            Ok((g.join("pause.paused").exists() && a.caught_up && a.applied_seq >= a.last_seq).then_some(()))
        })
        .await;
        let mut same_all = settled.is_ok();
        for d in &l.disks {
            let a = st.dir.join(format!("sites/{}/datastores/{}/{m}/{d}.img", l.psite, l.pdatastore));
            let b = st.dir.join(format!("sites/{}/datastores/{}/{m}/{d}.img", l.rsite, l.rdatastore));
            let same =
                tokio::task::spawn_blocking(move || -> Result<bool> { Ok(std::fs::read(&a)? == std::fs::read(&b)?) })
                    .await??;
            same_all &= same;
        }
        let _ = std::fs::remove_file(g.join("pause"));
        same_all &= !l.disks.is_empty();
        p.step(&format!(
            "{m}: both sites' disks {} (workload paused, everything applied)",
            match (&settled, same_all) {
                (Err(e), _) => format!("NOT COMPARED: {e:#}"),
                (Ok(()), true) => "byte-identical".into(),
                (Ok(()), false) => "DIFFER".into(),
            }
        ));
        byte_exact &= same_all;
    }
    Ok(DemoCycle {
        plan: "demo".into(),
        machines: names.iter().map(|m| (*m).to_owned()).collect(),
        phases,
        byte_exact,
        refused: None,
    })
}

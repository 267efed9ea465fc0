//! `ferry demo`: Ferry's main job on its embedded defaults, end to end on one machine. It brings a
//! two-site lab up (a temp folder), creates a policy, protects every machine (a replication group's
//! machines together, the others alone; Windows machines to a Windows master target when the
//! recovery site has one), lets the guests' workloads run, takes an app-consistent point per
//! machine and a multi-machine point per group, materializes each machine's app-consistent point
//! as raw images on its master target and checks them with `ferry lab verify` (exactly the records
//! up to the seq the workload paused at), then the group point (a consistent prefix on every
//! member), prints a summary and tears the lab down (`--keep` leaves it running).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use ferry_api::agent::{AgentStatus, GroupPointRequest, GroupReport, TagTaken};
use ferry_api::config_server::{Job, JobState, MachineRecoveryPoints, Policy, PolicyCreated, ProtectRequest};
use ferry_api::control::ComponentStatus;
use ferry_api::master_target::{ImageFormat, Materialization, MaterializationKind, MaterializeRequest, MaterializedAs};
use ferry_api::Method;

use crate::site::{self as lab_site, LabSpec, LabState};

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

/// What the demo found: a row per machine, and whether every point verified.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct DemoReport {
    pub lab: PathBuf,
    pub machines: Vec<DemoMachine>,
    pub verified: bool,
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
        let usable: Vec<_> = rs.datastores.iter().filter(|d| d.accessible && d.access == "read-write").collect();
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
            Some(&GroupPointRequest { app: false }),
        )
        .await
        .with_context(|| format!("multi-machine point of group {group}"))?;
        for m in &r.machines {
            group_of.insert(m.clone(), group.clone());
        }
        p.step(&format!("group {group}: multi-machine point across {}", r.machines.join(", ")));
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
        let (_, files) = materialize(id.clone(), work.join(format!("{m}-app"))).await?;
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
            let (_, gfiles) = materialize("latest-multi".into(), work.join(format!("{m}-group"))).await?;
            let v = tokio::task::spawn_blocking({
                let log = log.clone();
                move || crate::workload::verify(&log, &gfiles, seed, None)
            })
            .await??;
            all_ok &= v.consistent;
            group_result = if v.consistent {
                format!("PASS ({g} @ record {})", v.prefix_seq)
            } else {
                format!("FAIL: {}", v.problem.unwrap_or_default())
            };
        }
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
    Ok(DemoReport { lab: st.dir.clone(), machines: rows, verified: all_ok })
}

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
use serde_json::{json, Value};

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
#[derive(Debug, Clone, serde::Serialize)]
pub struct DemoReport {
    pub lab: PathBuf,
    pub machines: Vec<Value>,
    pub verified: bool,
}

/// The guest's agent status (its own status endpoint).
async fn agent_status(st: &LabState, machine: &str) -> Result<Value> {
    let ends = st.guest_endpoints(machine)?;
    let (code, v) = ferry_status::request(&ends.status, "GET", "/status", None).await?;
    if code != 200 {
        bail!("{machine}'s agent answered {code}: {v}");
    }
    Ok(v)
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

async fn wait_for<F, Fut>(what: &str, limit: Duration, mut f: F) -> Result<Value>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<Value>>>,
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
    server
        .call(
            "POST",
            "/api/v1/policies",
            Some(json!({"name": "demo", "rpo_threshold_secs": 120, "retention_secs": 3600, "app_consistent_secs": 3600, "crash_consistent_secs": 10})),
        )
        .await?;
    p.step(
        "policy demo: crash-consistent points every 10 s, app-consistent every hour, 1 h retention, RPO alert at 2 min",
    );

    // Where each machine goes: a master target of another site (Windows machines to a Windows
    // one when there is one), datastores of that site in turn.
    let mut requests = Vec::new();
    let mut grouped = std::collections::HashSet::new();
    let plan = |machines: Vec<(String, String, String)>, group: Option<String>, k: usize| -> Result<Value> {
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
        Ok(json!({
            "machines": machines.iter().map(|m| m.0.clone()).collect::<Vec<_>>(),
            "group": group, "policy": "demo", "process_server": ps.name, "master_target": mt.name, "datastore": ds.name,
        }))
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
        let job = server.call("POST", "/api/v1/protections", Some(r.clone())).await?;
        p.step(&format!(
            "protect {} → {} on {} (datastore {}), job {}",
            r["machines"]
                .as_array()
                .map(|a| a.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(", "))
                .unwrap_or_default(),
            r["master_target"].as_str().unwrap_or(""),
            r["process_server"].as_str().unwrap_or(""),
            r["datastore"].as_str().unwrap_or(""),
            job["id"].as_str().unwrap_or("")
        ));
        jobs.push(job["id"].as_str().unwrap_or("").to_owned());
    }
    // Follow the jobs: initial sync bytes, %, ETA.
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let mut done = 0;
        let mut parts = Vec::new();
        for id in &jobs {
            let v = server.call("GET", &format!("/api/v1/jobs/{id}"), None).await?;
            match v["state"].as_str() {
                Some("succeeded") => done += 1,
                Some("failed" | "cancelled") => bail!(
                    "protect job {id} failed: {} (remedy: {})",
                    v["error"]["message"].as_str().unwrap_or("-"),
                    v["error"]["remedy"].as_str().unwrap_or("-")
                ),
                _ => {}
            }
            parts.push(format!(
                "{} {:.0}%{}",
                v["target"].as_str().unwrap_or(""),
                v["progress_percent"].as_f64().unwrap_or(0.0),
                v["eta_secs"].as_f64().map(|e| format!(" ETA {e:.0}s")).unwrap_or_default()
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
    let machines: Vec<String> = requests
        .iter()
        .flat_map(|r| r["machines"].as_array().cloned().unwrap_or_default())
        .filter_map(|m| m.as_str().map(str::to_owned))
        .collect();
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
        let (code, v) = ferry_status::request(&ends.status, "POST", "/points/app", None).await?;
        if code != 200 {
            bail!("app-consistent point of {m} refused ({code}): {v}");
        }
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
    for r in requests.iter().filter(|r| r["group"].is_string()) {
        let members: Vec<String> =
            r["machines"].as_array().into_iter().flatten().filter_map(|m| m.as_str().map(str::to_owned)).collect();
        let ends = st.guest_endpoints(&members[0])?;
        let (code, v) =
            ferry_status::request(&ends.status, "POST", "/group/point", Some(&json!({"app": false}))).await?;
        if code != 200 {
            bail!("multi-machine point of group {} refused ({code}): {v}", r["group"]);
        }
        for m in &members {
            group_of.insert(m.clone(), r["group"].as_str().unwrap_or("").to_owned());
        }
        p.step(&format!(
            "group {}: multi-machine point across {}",
            r["group"].as_str().unwrap_or(""),
            members.join(", ")
        ));
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
                    let v = server.call("GET", &format!("/api/v1/machines/{m}/recovery-points"), None).await?;
                    let has = v["points"].as_array().into_iter().flatten().any(|p| {
                        p["kind"] == "app" && p["scope"] == "single" && p["time_ms"].as_u64().unwrap_or(0) >= since
                    });
                    Ok(has.then_some(v))
                }
            })
            .await?;
        let list = points["points"].as_array().cloned().unwrap_or_default();
        let app = list
            .iter()
            .filter(|p| p["kind"] == "app" && p["scope"] == "single" && p["time_ms"].as_u64().unwrap_or(0) >= since)
            .max_by_key(|p| p["seq"].as_u64().unwrap_or(0))
            .cloned()
            .unwrap_or_default();
        let mt = points["master_target"].as_str().unwrap_or("").to_owned();
        let mt_status = st
            .process(&mt)
            .and_then(|p| p.status.clone())
            .with_context(|| format!("master target {mt} is not in the lab"))?;
        let materialize = |point: String, dir: PathBuf| {
            let mt_status = mt_status.clone();
            let m = m.clone();
            async move {
                let (code, v) = ferry_status::request(
                    &mt_status,
                    "POST",
                    &format!("/machines/{m}/materializations"),
                    Some(&json!({"point": point, "kind": "image", "format": "raw", "dir": dir})),
                )
                .await?;
                if code != 201 {
                    bail!("materializing {point} of {m} failed ({code}): {v}");
                }
                let files: Vec<PathBuf> =
                    v["files"].as_array().into_iter().flatten().filter_map(|f| f.as_str().map(PathBuf::from)).collect();
                Ok::<_, anyhow::Error>((v["id"].as_str().unwrap_or("").to_owned(), files))
            }
        };
        let id = app["id"].as_str().unwrap_or("").to_owned();
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
        let agent = agent_status(st, m).await.unwrap_or_default();
        rows.push(json!({
            "machine": m,
            "master_target": mt,
            "bytes_replicated": agent["shipped_bytes"],
            "rpo_secs": agent["lag_seconds"],
            "points": list.len(),
            "app_point": id,
            "app_point_record": exact,
            "verify_app_point": if verdict.consistent { "PASS".to_owned() } else { format!("FAIL: {}", verdict.problem.unwrap_or_default()) },
            "verify_group_point": group_result,
            "workload_records": records(&log),
        }));
    }
    Ok(DemoReport { lab: st.dir.clone(), machines: rows, verified: all_ok })
}

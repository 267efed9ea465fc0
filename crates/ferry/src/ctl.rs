//! Operator commands over the configuration server's API (`--server`, `--token`, `--ca`, or
//! FERRY_SERVER / FERRY_TOKEN / FERRY_CA): tables for people, `--output json` for scripts.
//!
//! Size: the configuration server's operator commands, one short handler per API object; they share the client and the table printer.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

use crate::output::OutputFormat;

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

    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        Ok(self.client().call(method, path, body).await?)
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

fn columns(v: &Value, cols: &[&str]) {
    let rows: Vec<&Value> = match v {
        Value::Array(a) => a.iter().collect(),
        other => vec![other],
    };
    let cell = |r: &Value, c: &str| -> String {
        let mut x = r;
        for part in c.split('.') {
            x = &x[part];
        }
        match x {
            Value::String(s) => s.clone(),
            Value::Null => "-".into(),
            Value::Array(a) => a
                .iter()
                .map(|e| {
                    e.as_str().or_else(|| e["message"].as_str()).map(str::to_owned).unwrap_or_else(|| e.to_string())
                })
                .collect::<Vec<_>>()
                .join("; "),
            other => other.to_string(),
        }
    };
    let widths: Vec<usize> = cols
        .iter()
        .map(|c| rows.iter().map(|r| cell(r, c).len()).chain([c.len()]).max().unwrap_or(4).min(60))
        .collect();
    println!(
        "{}",
        cols.iter()
            .zip(&widths)
            .map(|(c, w)| format!("{:<w$}", c.to_uppercase(), w = *w))
            .collect::<Vec<_>>()
            .join("  ")
    );
    for r in rows {
        println!(
            "{}",
            cols.iter().zip(&widths).map(|(c, w)| format!("{:<w$}", cell(r, c), w = *w)).collect::<Vec<_>>().join("  ")
        );
    }
}

pub fn show(v: &Value, out: OutputFormat, cols: &[&str]) {
    match out {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
        OutputFormat::Table => columns(v, cols),
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

const POLICY_COLS: &[&str] = &[
    "name",
    "rpo_threshold_secs",
    "retention_secs",
    "app_consistent_secs",
    "crash_consistent_secs",
    "read_only",
    "failback_of",
];
const JOB_COLS: &[&str] = &["id", "kind", "target", "state", "progress_percent", "input_prompt", "error.message"];

pub async fn policies(a: PolicyAction, s: &ServerArgs, out: OutputFormat) -> Result<()> {
    match a {
        PolicyAction::List => show(&s.call("GET", "/api/v1/policies", None).await?, out, POLICY_COLS),
        PolicyAction::Show { name } => {
            show(&s.call("GET", &format!("/api/v1/policies/{}", enc(&name)), None).await?, out, POLICY_COLS)
        }
        PolicyAction::Create {
            name,
            rpo_threshold_secs,
            retention_secs,
            app_consistent_secs,
            crash_consistent_secs,
        } => {
            let v = s
                .call(
                    "POST",
                    "/api/v1/policies",
                    Some(json!({"name": name, "rpo_threshold_secs": rpo_threshold_secs, "retention_secs": retention_secs, "app_consistent_secs": app_consistent_secs, "crash_consistent_secs": crash_consistent_secs})),
                )
                .await?;
            match out {
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&v)?),
                OutputFormat::Table => columns(&json!([v["policy"], v["failback_policy"]]), POLICY_COLS),
            }
        }
        PolicyAction::Delete { name } => {
            show(&s.call("DELETE", &format!("/api/v1/policies/{}", enc(&name)), None).await?, out, &["deleted"])
        }
    }
    Ok(())
}

pub async fn groups(a: GroupAction, s: &ServerArgs, out: OutputFormat) -> Result<()> {
    let cols = &["name", "machines", "policy"];
    match a {
        GroupAction::List => show(&s.call("GET", "/api/v1/replication-groups", None).await?, out, cols),
        GroupAction::Show { name } => {
            show(&s.call("GET", &format!("/api/v1/replication-groups/{}", enc(&name)), None).await?, out, cols)
        }
        GroupAction::Create { name, machines, policy } => show(
            &s.call(
                "POST",
                "/api/v1/replication-groups",
                Some(json!({"name": name, "machines": machines, "policy": policy})),
            )
            .await?,
            out,
            cols,
        ),
        GroupAction::Delete { name } => show(
            &s.call("DELETE", &format!("/api/v1/replication-groups/{}", enc(&name)), None).await?,
            out,
            &["deleted"],
        ),
    }
    Ok(())
}

pub async fn plans(a: PlanAction, s: &ServerArgs, out: OutputFormat) -> Result<()> {
    let cols = &["name", "groups"];
    match a {
        PlanAction::List => {
            let v = s.call("GET", "/api/v1/recovery-plans", None).await?;
            let rows: Vec<Value> = v
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| json!({"name": p["name"], "groups": p["groups"].as_array().map(|g| g.len()).unwrap_or(0)}))
                .collect();
            match out {
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&v)?),
                OutputFormat::Table => columns(&Value::Array(rows), cols),
            }
        }
        PlanAction::Show { name } => {
            let v = s.call("GET", &format!("/api/v1/recovery-plans/{}", enc(&name)), None).await?;
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        PlanAction::Create { file } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("cannot read {}", file.display()))?;
            let plan: Value =
                serde_json::from_str(&text).with_context(|| format!("{} is not valid JSON", file.display()))?;
            let v = s.call("POST", "/api/v1/recovery-plans", Some(plan)).await?;
            show(
                &json!({"name": v["name"], "groups": v["groups"].as_array().map(|g| g.len()).unwrap_or(0)}),
                out,
                cols,
            );
        }
        PlanAction::Delete { name } => {
            show(&s.call("DELETE", &format!("/api/v1/recovery-plans/{}", enc(&name)), None).await?, out, &["deleted"])
        }
        PlanAction::Drill { name } => {
            show(&s.call("POST", &format!("/api/v1/recovery-plans/{}/drill", enc(&name)), None).await?, out, JOB_COLS)
        }
    }
    Ok(())
}

pub async fn sites(a: SiteAction, s: &ServerArgs, out: OutputFormat) -> Result<()> {
    match a {
        SiteAction::List => show(&s.call("GET", "/api/v1/sites", None).await?, out, &["name", "provider", "path"]),
        SiteAction::Add { name, path } => {
            let path = std::path::absolute(&path).with_context(|| format!("bad path {}", path.display()))?;
            let v = s.call("POST", "/api/v1/sites", Some(json!({"name": name, "path": path}))).await?;
            show(&v["job"], out, JOB_COLS);
        }
        SiteAction::Discover { name } => {
            show(&s.call("POST", &format!("/api/v1/sites/{}/discover", enc(&name)), None).await?, out, JOB_COLS)
        }
        SiteAction::Remove { name } => {
            show(&s.call("DELETE", &format!("/api/v1/sites/{}", enc(&name)), None).await?, out, &["deleted"])
        }
    }
    Ok(())
}

pub async fn inventory(s: &ServerArgs, out: OutputFormat) -> Result<()> {
    let v = s.call("GET", "/api/v1/inventory", None).await?;
    if matches!(out, OutputFormat::Json) {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    for site in v.as_array().into_iter().flatten() {
        println!("site {}  ({})", site["site"].as_str().unwrap_or("?"), site["folder"].as_str().unwrap_or("?"));
        let c = &site["content"];
        println!("hosts:");
        columns(&c["hosts"], &["name", "edition", "licence", "tools"]);
        println!("datastores:");
        columns(&c["datastores"], &["name", "kind", "access", "hosts", "accessible", "free_bytes"]);
        println!("machines:");
        columns(&c["machines"], &["name", "os_family", "host", "power", "controller", "disks"]);
        println!("master targets:");
        columns(&c["master_targets"], &["name", "os_family", "attached_disks", "enable_uuid", "retention_volumes"]);
        println!("process servers:");
        columns(&c["process_servers"], &["name", "cache", "cache_free_percent"]);
        for w in site["warnings"].as_array().into_iter().flatten() {
            println!("WARNING: {}", w.as_str().unwrap_or(""));
        }
    }
    Ok(())
}

pub async fn jobs(a: JobAction, s: &ServerArgs, out: OutputFormat) -> Result<()> {
    match a {
        JobAction::List => show(&s.call("GET", "/api/v1/jobs", None).await?, out, JOB_COLS),
        JobAction::Show { id } => {
            let v = s.call("GET", &format!("/api/v1/jobs/{}", enc(&id)), None).await?;
            match out {
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&v)?),
                OutputFormat::Table => print_job(&v),
            }
        }
        JobAction::Watch { id } => watch(&id, s, out).await?,
        JobAction::Confirm { id, step } => {
            let step = match step {
                Some(s) => s,
                None => {
                    let j = s.call("GET", &format!("/api/v1/jobs/{}", enc(&id)), None).await?;
                    if let Some(p) = j["input_prompt"].as_str() {
                        eprintln!("confirming: {p}");
                    }
                    j["current_step"].as_u64().unwrap_or(0) as usize
                }
            };
            let v =
                s.call("POST", &format!("/api/v1/jobs/{}/confirm", enc(&id)), Some(json!({ "step": step }))).await?;
            show(&v, out, &["confirmed", "step"]);
        }
        JobAction::Cancel { id } => {
            show(&s.call("POST", &format!("/api/v1/jobs/{}/cancel", enc(&id)), None).await?, out, &["cancelling"])
        }
    }
    Ok(())
}

fn print_job(v: &Value) {
    println!(
        "job {}  {} of {}  state {}  {:.0}%{}",
        v["id"].as_str().unwrap_or("?"),
        v["kind"].as_str().unwrap_or("?"),
        v["target"].as_str().unwrap_or("?"),
        v["state"].as_str().unwrap_or("?"),
        v["progress_percent"].as_f64().unwrap_or(0.0),
        v["eta_secs"].as_f64().map(|e| format!("  ETA {e:.0} s")).unwrap_or_default()
    );
    for (i, st) in v["steps"].as_array().into_iter().flatten().enumerate() {
        println!(
            "  {:>2}. [{}] {}{}",
            i + 1,
            st["state"].as_str().unwrap_or("?"),
            st["name"].as_str().unwrap_or("?"),
            st["message"].as_str().map(|m| format!(" — {m}")).unwrap_or_default()
        );
    }
    if let Some(p) = v["input_prompt"].as_str() {
        println!("WAITING FOR INPUT: {p}");
    }
    if !v["error"].is_null() {
        println!(
            "ERROR {}: {} (remedy: {})",
            v["error"]["code"],
            v["error"]["message"].as_str().unwrap_or(""),
            v["error"]["remedy"].as_str().unwrap_or("")
        );
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
        let v = s.call("GET", &format!("/api/v1/jobs/{}", enc(id)), None).await?;
        let pct = v["progress_percent"].as_f64().unwrap_or(0.0);
        bar.set_position((pct * 10.0) as u64);
        let step = v["steps"]
            .get(v["current_step"].as_u64().unwrap_or(0) as usize)
            .and_then(|s| s["name"].as_str())
            .unwrap_or("");
        let bytes = match (v["bytes_done"].as_u64(), v["bytes_total"].as_u64()) {
            (Some(d), Some(t)) if t > 0 => {
                let eta = v["eta_secs"].as_f64().map(|e| format!(", ETA {e:.0} s")).unwrap_or_default();
                format!(" ({:.1}/{:.1} MiB{eta})", d as f64 / 1048576.0, t as f64 / 1048576.0)
            }
            _ => String::new(),
        };
        bar.set_message(format!("{} {step}{bytes}", v["state"].as_str().unwrap_or("")));
        if matches!(v["state"].as_str(), Some("succeeded" | "failed" | "cancelled" | "waiting-for-input")) {
            break v;
        }
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    };
    bar.finish_and_clear();
    match out {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&v)?),
        OutputFormat::Table => print_job(&v),
    }
    match v["state"].as_str() {
        Some("succeeded") => Ok(()),
        Some("waiting-for-input") => Ok(()),
        Some(st) => bail!("job {id} {st}: {}", v["error"]["message"].as_str().unwrap_or("-")),
        None => bail!("job {id}: no state"),
    }
}

pub async fn tokens(a: TokenAction, s: &ServerArgs, out: OutputFormat) -> Result<()> {
    let cols = &["id", "name", "role", "created_ms"];
    match a {
        TokenAction::List => show(&s.call("GET", "/api/v1/tokens", None).await?, out, cols),
        TokenAction::Create { name, role } => {
            let v = s.call("POST", "/api/v1/tokens", Some(json!({"name": name, "role": role}))).await?;
            show(&v, out, &["id", "name", "role", "token"]);
        }
        TokenAction::Revoke { id } => {
            show(&s.call("DELETE", &format!("/api/v1/tokens/{}", enc(&id)), None).await?, out, &["deleted"])
        }
    }
    Ok(())
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
    dir: &std::path::Path,
    out: OutputFormat,
) -> Result<()> {
    let summary =
        ferry_status::server_client::register_component(server, fingerprint, passphrase, kind, name, hosts, dir)
            .await?;
    match out {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&summary)?),
        OutputFormat::Table => println!(
            "registered {kind} {name}: certificate {} (key stayed here), token in {}",
            summary["cert"], summary["token_file"]
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
    let body = json!({
        "machines": a.machines, "group": a.group, "policy": a.policy, "process_server": a.process_server,
        "master_target": a.master_target, "datastore": a.datastore, "wait_secs": a.wait_secs,
        "stall_secs": a.stall_secs,
    });
    let job = s.call("POST", "/api/v1/protections", Some(body)).await?;
    let id = job["id"].as_str().context("the server answered without a job id")?.to_owned();
    if a.no_wait {
        show(&job, out, &["id", "kind", "target", "state"]);
        return Ok(());
    }
    watch(&id, s, out).await
}

pub fn print_machines(v: &Value) {
    println!(
        "{:<10} {:<10} {:<8} {:<5} {:<22} {:<10} {:<9} {:<14} {:<12} POINTS (crash/app)",
        "MACHINE", "SITE", "OS", "POWER", "REPLICATION", "HEALTH", "RPO", "MASTER TARGET", "GROUP"
    );
    for m in v.as_array().into_iter().flatten() {
        let rpo = m["rpo_secs"].as_f64().map(|r| format!("{r:.1} s")).unwrap_or_else(|| "-".into());
        let sync = m["initial_sync"]["percent"].as_f64().map(|p| format!(" {p:.0}%")).unwrap_or_default();
        let points = if m["points"].is_object() {
            format!(
                "{}/{}",
                m["points"]["crash_tags"].as_u64().unwrap_or(0),
                m["points"]["app_tags"].as_u64().unwrap_or(0)
            )
        } else {
            "-".into()
        };
        println!(
            "{:<10} {:<10} {:<8} {:<5} {:<22} {:<10} {:<9} {:<14} {:<12} {}",
            m["machine"].as_str().unwrap_or(""),
            m["site"].as_str().unwrap_or(""),
            m["os_family"].as_str().unwrap_or(""),
            m["power"].as_str().unwrap_or(""),
            format!("{}{sync}", m["replication"].as_str().unwrap_or("")),
            m["health"].as_str().unwrap_or(""),
            rpo,
            m["master_target"].as_str().unwrap_or("-"),
            m["group"].as_str().unwrap_or("-"),
            points
        );
        for r in m["reasons"].as_array().into_iter().flatten() {
            println!("    {} {}", r["code"], r["message"].as_str().unwrap_or(""));
        }
    }
}

/// `ferry machines`.
pub async fn machines(s: &ServerArgs, out: OutputFormat) -> Result<()> {
    let v = s.call("GET", "/api/v1/machines", None).await?;
    match out {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&v)?),
        OutputFormat::Table => print_machines(&v),
    }
    Ok(())
}

/// `ferry recovery-points MACHINE`.
pub async fn recovery_points(machine: &str, s: &ServerArgs, out: OutputFormat) -> Result<()> {
    let v = s.call("GET", &format!("/api/v1/machines/{}/recovery-points", enc(machine)), None).await?;
    match out {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&v)?),
        OutputFormat::Table => {
            println!("recovery points of {machine} on master target {}:", v["master_target"].as_str().unwrap_or("?"));
            println!("{:<20} {:<16} {:<8} {:<8} {:<12} SEQ", "ID", "AGE", "KIND", "SCOPE", "GROUP");
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            for p in v["points"].as_array().into_iter().flatten() {
                let age = now.saturating_sub(p["time_ms"].as_u64().unwrap_or(0)) as f64 / 1000.0;
                println!(
                    "{:<20} {:<16} {:<8} {:<8} {:<12} {}",
                    p["id"].as_str().unwrap_or(""),
                    format!("{age:.0} s ago"),
                    p["kind"].as_str().unwrap_or(""),
                    p["scope"].as_str().unwrap_or(""),
                    p["group"].as_str().unwrap_or("-"),
                    p["seq"]
                );
            }
        }
    }
    Ok(())
}

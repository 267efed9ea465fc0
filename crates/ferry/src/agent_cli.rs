//! `ferry agent status|verify|crash-point|app-point|group-point`: the agent's status listener.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use crate::daemons::AgentRunArgs;
use crate::output::{print_status, OutputFormat};

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct AgentCmd {
    #[command(subcommand)]
    pub(crate) action: Option<AgentAction>,
    #[command(flatten)]
    pub(crate) run: AgentRunArgs,
}

#[derive(Subcommand)]
pub(crate) enum AgentAction {
    /// Show replication status per machine and disk.
    Status(StatusArgs),
    /// Compare block hashes of a disk's source and target without stopping replication.
    Verify(VerifyArgs),
    /// Take a crash-consistent recovery point now.
    CrashPoint(StatusArgs),
    /// Take an app-consistent recovery point now (runs the freeze/thaw hooks).
    AppPoint(StatusArgs),
    /// Take a multi-machine point of this agent's replication group now (coordinator only).
    GroupPoint(GroupPointArgs),
}

#[derive(Args)]
pub(crate) struct GroupPointArgs {
    /// App-consistent (every member runs its freeze/thaw hooks).
    #[arg(long)]
    pub(crate) app: bool,
    #[command(flatten)]
    pub(crate) status: StatusArgs,
}

#[derive(Args)]
pub(crate) struct StatusArgs {
    /// The component's TOML configuration (to find its status address).
    #[arg(long, short)]
    pub(crate) config: Option<PathBuf>,
    /// Status address (overrides the configuration's status_listen).
    #[arg(long)]
    pub(crate) status_addr: Option<String>,
}

#[derive(Args)]
pub(crate) struct VerifyArgs {
    /// Disk name.
    pub(crate) disk: String,
    /// Resync the blocks found different.
    #[arg(long)]
    pub(crate) repair: bool,
    #[command(flatten)]
    pub(crate) status: StatusArgs,
}

pub(crate) fn status_addr(component: &str, s: &StatusArgs) -> Result<String> {
    if let Some(a) = &s.status_addr {
        return Ok(a.clone());
    }
    let Some(path) = &s.config else { bail!("give --status-addr HOST:PORT or --config FILE of the {component}") };
    let text = std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let table: toml::Table = toml::from_str(&text).with_context(|| format!("{} is not valid TOML", path.display()))?;
    match table.get("status_listen").and_then(|v| v.as_str()) {
        Some(a) => Ok(a.to_owned()),
        None => bail!("{} has no status_listen: the {component} serves no status endpoint", path.display()),
    }
}

pub(crate) async fn status(component: &str, s: &StatusArgs, out: OutputFormat) -> Result<()> {
    let addr = status_addr(component, s)?;
    let (code, v) = ferry_status::request(&addr, "GET", "/status", None).await?;
    if code != 200 {
        bail!("status endpoint {addr} answered HTTP {code}: {v}");
    }
    print_status(&v, out);
    Ok(())
}

pub(crate) async fn verify(v: VerifyArgs, out: OutputFormat) -> Result<()> {
    let addr = status_addr("agent", &v.status)?;
    let body = serde_json::json!({ "disk": v.disk, "repair": v.repair });
    let (code, resp) = ferry_status::request(&addr, "POST", "/verify", Some(&body)).await?;
    if code != 202 {
        bail!(
            "{} (remedy: {})",
            resp["message"].as_str().unwrap_or("verify refused"),
            resp["remedy"].as_str().unwrap_or("-")
        );
    }
    let id = resp["verify_id"].as_u64().context("agent returned no verify_id")?;
    let mut progress = (0u64, 0u64);
    let mut last_progress = std::time::Instant::now();
    let session = loop {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let (code, s) = ferry_status::request(&addr, "GET", &format!("/verify/{id}"), None).await?;
        if code != 200 {
            bail!("verify session {id} vanished: {s}");
        }
        if s["state"] != "running" {
            break s;
        }
        let now = (s["bytes_hashed"].as_u64().unwrap_or(0), s["blocks_compared"].as_u64().unwrap_or(0));
        if now != progress {
            progress = now;
            last_progress = std::time::Instant::now();
        } else if last_progress.elapsed() > std::time::Duration::from_secs(120) {
            bail!(
                "verify of {} made no progress for 2 minutes (hashed {} bytes, {} blocks compared): is the master target reachable? check `ferry agent status`, then run verify again",
                v.disk, now.0, now.1
            );
        }
        if matches!(out, OutputFormat::Table) {
            let done = s["bytes_hashed"].as_u64().unwrap_or(0);
            let size = s["disk_size"].as_u64().unwrap_or(1).max(1);
            eprint!("\rverifying {}: {:.0}%", v.disk, done as f64 * 100.0 / size as f64);
        }
    };
    match out {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&session)?),
        OutputFormat::Table => {
            eprintln!();
            let differing = session["differing_offsets"].as_array().map(|a| a.len()).unwrap_or(0);
            println!(
                "disk {}: {} blocks of {} bytes compared, {} differ",
                v.disk, session["blocks_compared"], session["block_size"], differing
            );
            if let Some(offs) = session["differing_offsets"].as_array() {
                for o in offs.iter().take(50) {
                    println!("  differs at offset {o}");
                }
            }
            if session["repair_started"] == true {
                println!("repair: a resync of the differing blocks was started");
            }
            if session["state"] == "failed" {
                bail!("verify failed: {}", session["error"]);
            }
        }
    }
    if session["state"] == "failed" {
        bail!("verify failed: {}", session["error"]);
    }
    Ok(())
}

/// Call a component's JSON API; a non-2xx answer becomes an error with its message and remedy.
pub(crate) async fn api(
    component: &str,
    s: &StatusArgs,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<serde_json::Value> {
    let addr = status_addr(component, s)?;
    let (code, v) = ferry_status::request(&addr, method, path, body)
        .await
        .with_context(|| format!("cannot reach the {component} at {addr}"))?;
    if !(200..300).contains(&code) {
        bail!(
            "{} (code {}; remedy: {})",
            v["message"].as_str().unwrap_or("request refused"),
            v["code"],
            v["remedy"].as_str().unwrap_or("-")
        );
    }
    Ok(v)
}

pub(crate) fn print_result(v: &serde_json::Value, out: OutputFormat, line: &str) {
    match out {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
        OutputFormat::Table => println!("{line}"),
    }
}

/// `ferry agent …`: run the agent, or one of its status-listener commands.
pub(crate) async fn run(cmd: AgentCmd, out: OutputFormat) -> Result<()> {
    match cmd.action {
        Some(AgentAction::Status(s)) => status("agent", &s, out).await,
        Some(AgentAction::Verify(v)) => verify(v, out).await,
        Some(AgentAction::CrashPoint(s)) => {
            let v = api("agent", &s, "POST", "/points/crash", None).await?;
            print_result(&v, out, &format!("crash-consistent tag at seq {}", v["seq"]));
            Ok(())
        }
        Some(AgentAction::AppPoint(s)) => {
            let v = api("agent", &s, "POST", "/points/app", None).await?;
            print_result(&v, out, &format!("app-consistent tag at seq {}", v["seq"]));
            Ok(())
        }
        Some(AgentAction::GroupPoint(g)) => {
            let body = serde_json::json!({ "app": g.app });
            let v = api("agent", &g.status, "POST", "/group/point", Some(&body)).await?;
            print_result(&v, out, &format!("group tag {} committed by {}", v["tag"], v["members"]));
            Ok(())
        }
        None => crate::daemons::run_agent(cmd.run).await,
    }
}

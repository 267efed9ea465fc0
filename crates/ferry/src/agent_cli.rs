//! `ferry agent status|verify|crash-point|app-point|group-point`: the agent's status listener;
//! `ferry agent changes`: its state read offline.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use crate::daemons::AgentRunArgs;
use crate::output::{print_json, print_status, OutputFormat};
use ferry_api::agent::{
    GroupPointRequest, GroupReport, TagTaken, VerifyRequest, VerifySession, VerifyStarted, VerifyState,
};
use ferry_api::Method;

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
    /// With the agent stopped (a powered-off or lost primary): the regions its own state says
    /// may not be durable at the master target — what a failover would leave behind.
    Changes(ChangesArgs),
}

#[derive(Args)]
pub(crate) struct ChangesArgs {
    /// The agent's TOML configuration (its state_dir, disks and al_extent_bytes).
    #[arg(long, short)]
    pub(crate) config: PathBuf,
    /// Also the 4 KiB block hashes of each region (reads the disks, not their holes).
    #[arg(long)]
    pub(crate) hashes: bool,
    /// Also the 4 KiB block hashes of each whole disk (a hash fallback; reads no holes).
    #[arg(long)]
    pub(crate) whole_disks: bool,
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
    let v = ferry_status::status_of(&addr).await.with_context(|| format!("the {component}'s status at {addr}"))?;
    print_status(&v, out);
    Ok(())
}

pub(crate) async fn verify(v: VerifyArgs, out: OutputFormat) -> Result<()> {
    let addr = status_addr("agent", &v.status)?;
    let body = VerifyRequest { disk: v.disk.clone(), repair: v.repair };
    let started: VerifyStarted = ferry_status::call_control(&addr, Method::Post, "/verify", Some(&body)).await?;
    let id = started.verify_id;
    let mut progress = (0u64, 0u64);
    let mut last_progress = std::time::Instant::now();
    let session = loop {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let s: VerifySession = ferry_status::call(&addr, Method::Get, &format!("/verify/{id}"), None::<&()>)
            .await
            .with_context(|| format!("verify session {id}"))?;
        if s.state != VerifyState::Running {
            break s;
        }
        let now = (s.bytes_hashed, s.blocks_compared);
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
            eprint!("\rverifying {}: {:.0}%", v.disk, s.bytes_hashed as f64 * 100.0 / s.disk_size.max(1) as f64);
        }
    };
    match out {
        OutputFormat::Json => print_json(&session),
        OutputFormat::Table => {
            eprintln!();
            println!(
                "disk {}: {} blocks of {} bytes compared, {} differ",
                v.disk,
                session.blocks_compared,
                session.block_size,
                session.differing_offsets.len()
            );
            for o in session.differing_offsets.iter().take(50) {
                println!("  differs at offset {o}");
            }
            if session.repair_started {
                println!("repair: a resync of the differing blocks was started");
            }
        }
    }
    if session.state == VerifyState::Failed {
        bail!("verify failed: {}", session.error.as_deref().unwrap_or("no reason given"));
    }
    Ok(())
}

/// Call a component's JSON API; a refusal becomes an error with its message and remedy.
pub(crate) async fn api<T: serde::de::DeserializeOwned>(
    component: &str,
    s: &StatusArgs,
    method: Method,
    path: &str,
    body: Option<&(impl serde::Serialize + ?Sized)>,
) -> Result<T> {
    let addr = status_addr(component, s)?;
    // What changes state needs the daemon's control token (read from the file its status names).
    let answer = if method == Method::Get {
        ferry_status::call(&addr, method, path, body).await
    } else {
        ferry_status::call_control(&addr, method, path, body).await
    };
    match answer {
        Ok(v) => Ok(v),
        Err(ferry_status::StatusError::Refused { error, .. }) => bail!("{error}"),
        Err(e) => Err(e).with_context(|| format!("cannot reach the {component} at {addr}")),
    }
}

pub(crate) fn print_result<T: serde::Serialize>(v: &T, out: OutputFormat, line: &str) {
    match out {
        OutputFormat::Json => print_json(v),
        OutputFormat::Table => println!("{line}"),
    }
}

/// `ferry agent …`: run the agent, or one of its status-listener commands.
pub(crate) async fn run(cmd: AgentCmd, out: OutputFormat) -> Result<()> {
    match cmd.action {
        Some(AgentAction::Status(s)) => status("agent", &s, out).await,
        Some(AgentAction::Verify(v)) => verify(v, out).await,
        Some(AgentAction::CrashPoint(s)) => {
            let v: TagTaken = api("agent", &s, Method::Post, "/points/crash", None::<&()>).await?;
            print_result(&v, out, &format!("crash-consistent tag at seq {}", v.seq));
            Ok(())
        }
        Some(AgentAction::AppPoint(s)) => {
            let v: TagTaken = api("agent", &s, Method::Post, "/points/app", None::<&()>).await?;
            print_result(&v, out, &format!("app-consistent tag at seq {}", v.seq));
            Ok(())
        }
        Some(AgentAction::GroupPoint(g)) => {
            let body = GroupPointRequest { app: g.app };
            let v: GroupReport = api("agent", &g.status, Method::Post, "/group/point", Some(&body)).await?;
            print_result(&v, out, &format!("group tag {} committed by {}", v.tag, v.members.join(", ")));
            Ok(())
        }
        Some(AgentAction::Changes(a)) => changes(&a, out),
        None => crate::daemons::run_agent(cmd.run).await,
    }
}

/// `ferry agent changes --config FILE`.
fn changes(a: &ChangesArgs, out: OutputFormat) -> Result<()> {
    let config: ferry_agent::AgentConfig =
        crate::cli_config::load_config(Some(&a.config), crate::cli_config::Overrides::default(), "agent")?;
    let mut v = ferry_agent::offline::unconfirmed_changes(&config).with_context(|| {
        format!("cannot read the state of agent {} in {}", config.machine, config.state_dir.display())
    })?;
    if a.hashes {
        ferry_agent::offline::add_block_hashes(&config, &mut v)
            .with_context(|| format!("cannot hash the disks of agent {}", config.machine))?;
    }
    if a.whole_disks {
        ferry_agent::offline::add_whole_disk_hashes(&config, &mut v)
            .with_context(|| format!("cannot hash the disks of agent {}", config.machine))?;
    }
    match out {
        OutputFormat::Json => print_json(&v),
        OutputFormat::Table => {
            println!("{}: {} bytes may not be at the master target", v.machine, v.bytes);
            if let Some(why) = &v.whole_disks {
                println!("  whole disks: {why}");
            }
            if let Some(seq) = v.open_resync_seq {
                println!("  a resync run was open from seq {seq}: its regions may be missing from the master target's consistent state too");
            }
            for d in &v.disks {
                println!("  {} ({} bytes): {} bytes in {} runs", d.name, d.size, d.bytes, d.extents.len());
                for (off, len) in d.extents.iter().take(20) {
                    println!("    {off} +{len}");
                }
                if d.extents.len() > 20 {
                    println!("    … {} more (--output json lists all)", d.extents.len() - 20);
                }
            }
        }
    }
    Ok(())
}

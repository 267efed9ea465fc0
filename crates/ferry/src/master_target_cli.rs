//! `ferry process-server status` and `ferry master-target points|select|materialize|export|
//! materializations|discard|changes`: the master target's point API.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use crate::agent_cli::{api, print_result, status, StatusArgs};
use crate::daemons::{MasterTargetRunArgs, ProcessServerRunArgs};
use crate::output::{self, OutputFormat};

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct ProcessServerCmd {
    #[command(subcommand)]
    pub(crate) action: Option<SimpleAction>,
    #[command(flatten)]
    pub(crate) run: ProcessServerRunArgs,
}

#[derive(Subcommand)]
pub(crate) enum SimpleAction {
    /// Show status.
    Status(StatusArgs),
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct MasterTargetCmd {
    #[command(subcommand)]
    pub(crate) action: Option<MasterTargetAction>,
    #[command(flatten)]
    pub(crate) run: MasterTargetRunArgs,
}

#[derive(Subcommand)]
pub(crate) enum MasterTargetAction {
    /// Show status.
    Status(StatusArgs),
    /// List recovery points of a machine or of a replication group.
    Points(PointsArgs),
    /// Resolve a selector to a point (`latest` takes a point at everything received).
    Select(SelectArgs),
    /// Write image files of a point (raw, qcow2 overlay on the frozen base, vmdk, fixed vhd).
    Materialize(MaterializeArgs),
    /// Serve a point over NBD, read-only or writable through a throwaway overlay (test failover).
    Export(ExportArgs),
    /// List images and exports (each pins its point against pruning).
    Materializations(StatusArgs),
    /// Delete an image or export and release its pin.
    Discard(DiscardArgs),
    /// Extents changed between a point and the head, or between two points.
    Changes(ChangesArgs),
}

#[derive(Args)]
pub(crate) struct PointsArgs {
    #[arg(long, required_unless_present = "group")]
    pub(crate) machine: Option<String>,
    #[arg(long, conflicts_with = "machine")]
    pub(crate) group: Option<String>,
    #[command(flatten)]
    pub(crate) status: StatusArgs,
}

#[derive(Args)]
pub(crate) struct SelectArgs {
    #[arg(long)]
    pub(crate) machine: String,
    /// latest, latest-processed, latest-app, latest-multi, latest-multi-app, or a point ID.
    #[arg(long, default_value = "latest-processed")]
    pub(crate) point: String,
    #[command(flatten)]
    pub(crate) status: StatusArgs,
}

#[derive(Args)]
pub(crate) struct MaterializeArgs {
    #[arg(long)]
    pub(crate) machine: String,
    /// A point ID (vm1@1234), a seq, or a selector (latest, latest-processed, latest-app, ...).
    #[arg(long, default_value = "latest-processed")]
    pub(crate) point: String,
    /// raw, qcow2, vmdk or vhd.
    #[arg(long, default_value = "raw")]
    pub(crate) format: String,
    /// Folder for the image files (default DATASTORE/MACHINE/images/ID).
    #[arg(long)]
    pub(crate) dir: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) status: StatusArgs,
}

#[derive(Args)]
pub(crate) struct ExportArgs {
    #[arg(long)]
    pub(crate) machine: String,
    #[arg(long, default_value = "latest-processed")]
    pub(crate) point: String,
    /// Writable through a throwaway copy-on-write overlay (discarded at cleanup).
    #[arg(long)]
    pub(crate) writable: bool,
    #[command(flatten)]
    pub(crate) status: StatusArgs,
}

#[derive(Args)]
pub(crate) struct DiscardArgs {
    /// Materialization ID.
    pub(crate) id: String,
    #[command(flatten)]
    pub(crate) status: StatusArgs,
}

#[derive(Args)]
pub(crate) struct ChangesArgs {
    #[arg(long)]
    pub(crate) machine: String,
    #[arg(long)]
    pub(crate) from: String,
    /// A later point (default: the head).
    #[arg(long)]
    pub(crate) to: Option<String>,
    #[command(flatten)]
    pub(crate) status: StatusArgs,
}

pub(crate) fn url_part(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

pub(crate) async fn post_materialization(
    status: &StatusArgs,
    machine: &str,
    body: &serde_json::Value,
) -> Result<serde_json::Value> {
    api("master-target", status, "POST", &format!("/machines/{}/materializations", url_part(machine)), Some(body)).await
}

pub(crate) fn print_materialization(v: &serde_json::Value, out: OutputFormat, lines: &[&str]) {
    let id = v["id"].as_str().unwrap_or("?");
    let point = v["point"]["id"].as_str().unwrap_or("?");
    print_result(v, out, &format!("{id}  point {point}\n  {}", lines.join("\n  ")));
}

pub(crate) async fn master_target_action(action: MasterTargetAction, out: OutputFormat) -> Result<()> {
    const MT: &str = "master-target";
    match action {
        MasterTargetAction::Status(s) => status(MT, &s, out).await,
        MasterTargetAction::Points(p) => {
            let path = match (&p.machine, &p.group) {
                (_, Some(g)) => format!("/groups/{}/points", url_part(g)),
                (Some(m), None) => format!("/machines/{}/points", url_part(m)),
                (None, None) => bail!("give --machine or --group"),
            };
            let v = api(MT, &p.status, "GET", &path, None).await?;
            output::print_points(&v, out);
            Ok(())
        }
        MasterTargetAction::Select(a) => {
            let body = serde_json::json!({ "selector": a.point });
            let v =
                api(MT, &a.status, "POST", &format!("/machines/{}/points", url_part(&a.machine)), Some(&body)).await?;
            print_result(
                &v,
                out,
                &format!("{}  seq {}  {} {}", v["id"].as_str().unwrap_or("?"), v["seq"], v["kind"], v["scope"]),
            );
            Ok(())
        }
        MasterTargetAction::Materialize(a) => {
            let mut body = serde_json::json!({ "point": a.point, "kind": "image", "format": a.format });
            if let Some(d) = &a.dir {
                let d = std::path::absolute(d).with_context(|| format!("bad folder {}", d.display()))?;
                body["dir"] = serde_json::json!(d);
            }
            let v = post_materialization(&a.status, &a.machine, &body).await?;
            let files: Vec<_> = v["files"].as_array().into_iter().flatten().filter_map(|f| f.as_str()).collect();
            print_materialization(&v, out, &files);
            Ok(())
        }
        MasterTargetAction::Export(a) => {
            let body = serde_json::json!({ "point": a.point, "kind": "export", "writable": a.writable });
            let v = post_materialization(&a.status, &a.machine, &body).await?;
            let urls: Vec<_> = v["nbd_urls"]
                .as_array()
                .into_iter()
                .flatten()
                .flat_map(|u| u.as_array().cloned().unwrap_or_default())
                .filter_map(|u| u.as_str().map(str::to_owned))
                .collect();
            let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
            print_materialization(&v, out, &urls);
            Ok(())
        }
        MasterTargetAction::Materializations(s) => {
            let v = api(MT, &s, "GET", "/materializations", None).await?;
            match out {
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&v)?),
                OutputFormat::Table => {
                    for m in v["materializations"].as_array().into_iter().flatten() {
                        println!(
                            "{}  {}  point {}{}",
                            m["id"].as_str().unwrap_or("?"),
                            m["kind"].as_str().unwrap_or("?"),
                            m["point"]["id"].as_str().unwrap_or("?"),
                            m["problem"].as_str().map(|p| format!("  PROBLEM: {p}")).unwrap_or_default()
                        );
                    }
                }
            }
            Ok(())
        }
        MasterTargetAction::Discard(d) => {
            let v = api(MT, &d.status, "DELETE", &format!("/materializations/{}", url_part(&d.id)), None).await?;
            print_result(&v, out, &format!("discarded {}", d.id));
            Ok(())
        }
        MasterTargetAction::Changes(c) => {
            let mut path = format!("/machines/{}/changes?from={}", url_part(&c.machine), url_part(&c.from));
            if let Some(t) = &c.to {
                path.push_str(&format!("&to={}", url_part(t)));
            }
            let v = api(MT, &c.status, "GET", &path, None).await?;
            match out {
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&v)?),
                OutputFormat::Table => {
                    println!(
                        "changes of {} from seq {} to seq {}{}",
                        v["machine"].as_str().unwrap_or("?"),
                        v["from_seq"],
                        v["to_seq"],
                        if v["full_resync"] == true { " (whole disks: an initial sync ran in between)" } else { "" }
                    );
                    for d in v["disks"].as_array().into_iter().flatten() {
                        println!(
                            "  {}: {} bytes in {} extents",
                            d["disk"].as_str().unwrap_or("?"),
                            d["bytes"],
                            d["extents"].as_array().map(|e| e.len()).unwrap_or(0)
                        );
                    }
                }
            }
            Ok(())
        }
    }
}

/// `ferry process-server [status]`.
pub(crate) async fn run_process_server_cmd(cmd: ProcessServerCmd, out: OutputFormat) -> Result<()> {
    match cmd.action {
        Some(SimpleAction::Status(s)) => status("process-server", &s, out).await,
        None => crate::daemons::run_process_server(cmd.run).await,
    }
}

/// `ferry master-target …`: run it, or one of its point-API commands.
pub(crate) async fn run(cmd: MasterTargetCmd, out: OutputFormat) -> Result<()> {
    match cmd.action {
        Some(MasterTargetAction::Status(s)) => status("master-target", &s, out).await,
        Some(action) => master_target_action(action, out).await,
        None => crate::daemons::run_master_target(cmd.run).await,
    }
}

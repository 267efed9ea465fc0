//! `ferry process-server status` and `ferry master-target points|select|materialize|export|
//! materializations|discard|changes`: the master target's point API.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};

use crate::agent_cli::{api, print_result, status, StatusArgs};
use crate::daemons::{MasterTargetRunArgs, ProcessServerRunArgs};
use crate::output::{self, print_json, OutputFormat};
use ferry_api::master_target::{
    Changes, Discarded, GroupPoints, ImageFormat, Materialization, MaterializationKind, MaterializationList,
    MaterializeRequest, MaterializedAs, Point, PointList, SelectPoint,
};
use ferry_api::master_target::{Failover, FailoverPhase, FailoverRequest};
use ferry_api::Method;

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
    /// Close a machine's replica to its source for good (what a failover does): no stream is
    /// taken any more, the journal is applied to its head, then the target disks are left alone.
    Fence(FenceArgs),
    /// Fail a machine over on this master target: fence its replica, then put the target disks
    /// at a recovery point (in time proportional to the writes after it). Again before commit
    /// to change the point.
    Failover(FailoverArgs),
    /// Commit a machine's failover: its recovery point cannot change any more.
    CommitFailover(MachineArgs),
}

#[derive(Args)]
pub(crate) struct FailoverArgs {
    #[arg(long)]
    pub(crate) machine: String,
    /// latest, latest-processed, latest-app, latest-multi, latest-multi-app, or a point ID.
    #[arg(long, default_value = "latest-processed")]
    pub(crate) point: String,
    /// Why (kept with the fence and shown in the status).
    #[arg(long)]
    pub(crate) reason: String,
    /// Changing the point after the machine ran at the recovery site: a JSON file listing the
    /// extents it wrote (`[{"disk": "disk0", "offset": 0, "length": 4096}, …]`).
    #[arg(long)]
    pub(crate) recovery_writes: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) status: StatusArgs,
}

#[derive(Args)]
pub(crate) struct MachineArgs {
    #[arg(long)]
    pub(crate) machine: String,
    #[command(flatten)]
    pub(crate) status: StatusArgs,
}

#[derive(Args)]
pub(crate) struct FenceArgs {
    #[arg(long)]
    pub(crate) machine: String,
    /// Why (kept with the fence and shown in the status).
    #[arg(long)]
    pub(crate) reason: String,
    #[command(flatten)]
    pub(crate) status: StatusArgs,
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

async fn post_materialization(
    status: &StatusArgs,
    machine: &str,
    body: &MaterializeRequest,
) -> Result<Materialization> {
    let path = format!("/machines/{}/materializations", url_part(machine));
    api("master-target", status, Method::Post, &path, Some(body)).await
}

fn print_materialization(v: &Materialization, out: OutputFormat, lines: &[String]) {
    print_result(v, out, &format!("{}  point {}\n  {}", v.id, v.point.id, lines.join("\n  ")));
}

fn image_format(s: &str) -> Result<ImageFormat> {
    serde_json::from_value(serde_json::Value::String(s.to_owned()))
        .map_err(|_| anyhow::anyhow!("--format {s:?} is not one of raw, qcow2, vmdk, vhd"))
}

pub(crate) async fn master_target_action(action: MasterTargetAction, out: OutputFormat) -> Result<()> {
    const MT: &str = "master-target";
    match action {
        MasterTargetAction::Status(s) => status(MT, &s, out).await,
        MasterTargetAction::Points(p) => {
            match (&p.machine, &p.group) {
                (_, Some(g)) => {
                    let path = format!("/groups/{}/points", url_part(g));
                    let v: GroupPoints = api(MT, &p.status, Method::Get, &path, None::<&()>).await?;
                    output::print_group_points(&v, out);
                }
                (Some(m), None) => {
                    let path = format!("/machines/{}/points", url_part(m));
                    let v: PointList = api(MT, &p.status, Method::Get, &path, None::<&()>).await?;
                    output::print_points(&v, out);
                }
                (None, None) => bail!("give --machine or --group"),
            }
            Ok(())
        }
        MasterTargetAction::Select(a) => {
            let body = SelectPoint { selector: a.point.clone() };
            let path = format!("/machines/{}/points", url_part(&a.machine));
            let v: Point = api(MT, &a.status, Method::Post, &path, Some(&body)).await?;
            let scope = if v.is_multi() { "multi" } else { "single" };
            let kind = if v.is_app() { "app" } else { "crash" };
            print_result(&v, out, &format!("{}  seq {}  {kind} {scope}", v.id, v.seq));
            Ok(())
        }
        MasterTargetAction::Materialize(a) => {
            let dir = match &a.dir {
                Some(d) => Some(std::path::absolute(d).with_context(|| format!("bad folder {}", d.display()))?),
                None => None,
            };
            let body = MaterializeRequest {
                point: a.point.clone(),
                kind: MaterializationKind::Image,
                format: Some(image_format(&a.format)?),
                dir,
                writable: false,
                order: None,
            };
            let v = post_materialization(&a.status, &a.machine, &body).await?;
            let files: Vec<String> = match &v.what {
                MaterializedAs::Image { files, .. } => files.iter().map(|f| f.display().to_string()).collect(),
                MaterializedAs::Export { .. } => Vec::new(),
            };
            print_materialization(&v, out, &files);
            Ok(())
        }
        MasterTargetAction::Export(a) => {
            let body = MaterializeRequest {
                point: a.point.clone(),
                kind: MaterializationKind::Export,
                format: None,
                dir: None,
                writable: a.writable,
                order: None,
            };
            let v = post_materialization(&a.status, &a.machine, &body).await?;
            let urls: Vec<String> = v.nbd_urls.iter().flatten().cloned().collect();
            print_materialization(&v, out, &urls);
            Ok(())
        }
        MasterTargetAction::Materializations(s) => {
            let v: MaterializationList = api(MT, &s, Method::Get, "/materializations", None::<&()>).await?;
            match out {
                OutputFormat::Json => print_json(&v),
                OutputFormat::Table => {
                    for m in &v.materializations {
                        let kind = match m.what {
                            MaterializedAs::Image { .. } => "image",
                            MaterializedAs::Export { .. } => "export",
                        };
                        println!(
                            "{}  {kind}  point {}{}",
                            m.id,
                            m.point.id,
                            m.problem.as_ref().map(|p| format!("  PROBLEM: {p}")).unwrap_or_default()
                        );
                    }
                }
            }
            Ok(())
        }
        MasterTargetAction::Discard(d) => {
            let path = format!("/materializations/{}", url_part(&d.id));
            let v: Discarded = api(MT, &d.status, Method::Delete, &path, None::<&()>).await?;
            print_result(&v, out, &format!("discarded {}", d.id));
            Ok(())
        }
        MasterTargetAction::Fence(f) => {
            let path = format!("/machines/{}/fence", url_part(&f.machine));
            let body = ferry_api::master_target::FenceRequest { reason: f.reason.clone() };
            let v: ferry_api::master_target::Fence = api(MT, &f.status, Method::Post, &path, Some(&body)).await?;
            print_result(&v, out, &format!("{} fenced at seq {}: {}", f.machine, v.at_seq, v.reason));
            Ok(())
        }
        MasterTargetAction::Failover(f) => {
            let recovery_writes = match &f.recovery_writes {
                Some(p) => {
                    let data = std::fs::read(p).with_context(|| format!("cannot read {}", p.display()))?;
                    serde_json::from_slice(&data).with_context(|| {
                        format!("{} is not a JSON list of {{disk, offset, length}} extents", p.display())
                    })?
                }
                None => Vec::new(),
            };
            let path = format!("/machines/{}/failover", url_part(&f.machine));
            let body = FailoverRequest { point: f.point.clone(), reason: f.reason.clone(), recovery_writes };
            let v: Failover = api(MT, &f.status, Method::Post, &path, Some(&body)).await?;
            print_result(&v, out, &failover_summary(&f.machine, &v));
            Ok(())
        }
        MasterTargetAction::CommitFailover(c) => {
            let path = format!("/machines/{}/failover/commit", url_part(&c.machine));
            let v: Failover = api(MT, &c.status, Method::Post, &path, None::<&()>).await?;
            print_result(&v, out, &failover_summary(&c.machine, &v));
            Ok(())
        }
        MasterTargetAction::Changes(c) => {
            let mut path = format!("/machines/{}/changes?from={}", url_part(&c.machine), url_part(&c.from));
            if let Some(t) = &c.to {
                path.push_str(&format!("&to={}", url_part(t)));
            }
            let v: Changes = api(MT, &c.status, Method::Get, &path, None::<&()>).await?;
            match out {
                OutputFormat::Json => print_json(&v),
                OutputFormat::Table => {
                    println!(
                        "changes of {} from seq {} to seq {}{}",
                        v.machine,
                        v.from_seq,
                        v.to_seq.map(|s| s.to_string()).unwrap_or_else(|| "head".into()),
                        if v.full_resync { " (whole disks: an initial sync ran in between)" } else { "" }
                    );
                    for d in &v.disks {
                        println!("  {}: {} bytes in {} extents", d.disk, d.bytes, d.extents.len());
                    }
                }
            }
            Ok(())
        }
    }
}

fn failover_summary(machine: &str, f: &Failover) -> String {
    let phase = match f.phase {
        FailoverPhase::Restoring => "being put at",
        FailoverPhase::AtPoint => "failed over (uncommitted) to",
        FailoverPhase::Committed => "failed over (committed) to",
    };
    format!("{machine} {phase} {} ({} bytes put back)\n{}", f.point.id, f.restored_bytes, f.discarded.note)
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

//! `ferry lab …` and `ferry demo`: thin wrappers that call `ferry_lab` and render its answers.

use std::path::Path;

use std::path::PathBuf;

use anyhow::{bail, Result};
use clap::{Args, Subcommand};
use ferry_api::config_server::SiteOperation;
use ferry_lab::site::{self, LabState};
use ferry_lab::{guest as lab_guest, link as lab_link, workload as lab};

use crate::daemons::shutdown_on_signal;
use crate::output::{print_json, OutputFormat};

/// Progress lines of `lab up` go to stderr in table mode (JSON output stays machine-readable).
pub async fn up(dir: &Path, config: Option<&Path>, out: OutputFormat) -> Result<()> {
    let table = matches!(out, OutputFormat::Table);
    let say = move |msg: &str| {
        if table {
            eprintln!("{msg}");
        }
    };
    let st = site::up(dir, config, &say).await?;
    print_up(&st, out)
}

fn print_up(state: &LabState, out: OutputFormat) -> Result<()> {
    match out {
        OutputFormat::Json => {
            // The admin token stays in lab.json (mode 0600); the operator token is enough to use the lab.
            let mut shown = state.clone();
            shown.admin_token = String::new();
            print_json(&shown);
        }
        OutputFormat::Table => {
            println!("lab up in {}", state.dir.display());
            println!("{:<28} {:<16} {:<10} {:<22} {:<22} PID", "NAME", "KIND", "SITE", "ADDRESS", "STATUS/CONTROL");
            for p in &state.processes {
                println!(
                    "{:<28} {:<16} {:<10} {:<22} {:<22} {}",
                    p.name,
                    p.kind,
                    p.site.as_deref().unwrap_or("-"),
                    p.address,
                    p.status.as_deref().unwrap_or("-"),
                    p.pid
                );
            }
            println!(
                "\nlogs: {}/logs (guests: {}/sites/SITE/guests/MACHINE/)",
                state.dir.display(),
                state.dir.display()
            );
            println!("operator token: {}", state.operator_token);
            println!("\nto use it:");
            println!(
                "  export FERRY_LAB={} FERRY_SERVER={} FERRY_CA={} FERRY_TOKEN={}",
                state.dir.display(),
                state.config_server,
                state.ca.display(),
                state.operator_token
            );
            println!("  ferry machines; ferry policies create gold; ferry protect db1 --policy gold --process-server ps-primary --master-target mt-linux-r --datastore vsan-r");
        }
    }
    Ok(())
}

pub async fn status(dir: &Path, out: OutputFormat) -> Result<()> {
    let v = site::status(dir).await?;
    if matches!(out, OutputFormat::Json) {
        print_json(&v);
        return Ok(());
    }
    println!("lab {} — configuration server {}", v.dir.display(), v.config_server);
    println!("\n{:<28} {:<16} {:<8} {:<8} ADDRESS", "PROCESS", "KIND", "PID", "RUNNING");
    for p in &v.processes {
        println!("{:<28} {:<16} {:<8} {:<8} {}", p.name, p.kind, p.pid, p.running, p.address);
    }
    println!("\n{:<26} {:<22} {:<10} TO", "LINK", "LISTEN", "STATE");
    for l in &v.links {
        let state = match &l.state {
            Some(s) if s.cut => "cut",
            Some(_) => "up",
            None => "down",
        };
        println!("{:<26} {:<22} {:<10} {}", l.link.name, l.link.listen, state, l.link.to);
    }
    println!("\n{:<28} {:<10} REASONS", "COMPONENT", "HEALTH");
    for c in v.components.iter().flatten() {
        let reasons: Vec<&str> = c.reasons.iter().map(|r| r.message.as_str()).collect();
        println!(
            "{:<28} {:<10} {}",
            format!("{}/{}", c.component.kind, c.component.name),
            c.health.as_str(),
            reasons.join("; ")
        );
    }
    if v.components.is_none() {
        println!("(the configuration server does not answer)");
    }
    println!();
    crate::ctl::print_machines(v.machines.as_deref().unwrap_or_default());
    Ok(())
}

pub async fn down(dir: &Path, remove: bool, out: OutputFormat) -> Result<()> {
    let v = site::down(dir, remove).await?;
    match out {
        OutputFormat::Json => print_json(&v),
        OutputFormat::Table => println!(
            "lab down: {} guest(s) shut down, {} process(es) stopped{}",
            v.stopped_guests,
            v.stopped_processes,
            if v.removed {
                format!(", {} removed", v.dir.display())
            } else {
                format!("; files kept in {}", v.dir.display())
            }
        ),
    }
    Ok(())
}

pub async fn restart(dir: &Path, name: &str, kill: bool, out: OutputFormat) -> Result<()> {
    let p = site::restart(dir, name, kill).await?;
    match out {
        OutputFormat::Json => print_json(&p),
        OutputFormat::Table => println!("{name} restarted (pid {})", p.pid),
    }
    Ok(())
}

pub async fn machine_op(dir: &Path, machine: &str, op: SiteOperation, out: OutputFormat) -> Result<()> {
    let v = site::machine_op(dir, machine, op).await?;
    match out {
        OutputFormat::Json => print_json(&v),
        OutputFormat::Table => {
            println!("{}", v.steps.first().and_then(|s| s.message.as_deref()).unwrap_or("done"))
        }
    }
    Ok(())
}

pub async fn link_control(
    dir: &Path,
    names: &[String],
    action: &str,
    body: Option<ferry_lab::link::Slow>,
    out: OutputFormat,
) -> Result<()> {
    let results = site::link_control(dir, names, action, body).await?;
    match out {
        OutputFormat::Json => print_json(&results),
        OutputFormat::Table => {
            for r in &results {
                println!("{}: {action}", r.link);
            }
        }
    }
    Ok(())
}

/// `ferry demo`'s arguments.
#[derive(clap::Args, Clone)]
pub struct DemoArgs {
    /// Leave the lab running (and its folder) at the end.
    #[arg(long)]
    pub keep: bool,
    /// Lab folder (default: a new temp folder).
    #[arg(long)]
    pub dir: Option<std::path::PathBuf>,
    /// A lab description instead of the built-in one.
    #[arg(long)]
    pub config: Option<std::path::PathBuf>,
    /// Seconds the workloads run after protection before the points are taken.
    #[arg(long, default_value_t = 15.0)]
    pub workload_secs: f64,
}

/// The demo's steps as lines with their time, and a spinner naming what it waits on (terminal
/// and table output only; otherwise plain lines on stderr).
struct Spinner {
    bar: indicatif::ProgressBar,
    started: std::time::Instant,
}

impl Spinner {
    fn new(out: OutputFormat) -> Spinner {
        let bar = indicatif::ProgressBar::new_spinner();
        if matches!(out, OutputFormat::Table) {
            bar.set_style(
                indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(std::time::Duration::from_millis(120));
        } else {
            bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        Spinner { bar, started: std::time::Instant::now() }
    }
}

impl ferry_lab::demo::Progress for Spinner {
    fn step(&self, msg: &str) {
        let line = format!("[{:>5.1} s] {msg}", self.started.elapsed().as_secs_f64());
        if self.bar.is_hidden() {
            // Not a terminal (or JSON output): the steps still go to stderr, as plain lines.
            eprintln!("{line}");
        } else {
            self.bar.println(line);
        }
        self.bar.set_message(msg.to_owned());
    }
    fn status(&self, msg: &str) {
        self.bar.set_message(msg.to_owned());
    }
    fn done(&self) {
        self.bar.finish_and_clear();
    }
}

pub async fn demo(args: DemoArgs, out: OutputFormat) -> Result<()> {
    let spinner = Spinner::new(out);
    let opts = ferry_lab::demo::DemoArgs {
        keep: args.keep,
        dir: args.dir,
        config: args.config,
        workload_secs: args.workload_secs,
    };
    let report = ferry_lab::demo::run(opts, &spinner).await?;
    match out {
        OutputFormat::Json => print_json(&report),
        OutputFormat::Table => {
            println!();
            println!(
                "{:<8} {:<13} {:>12} {:>8} {:>7} {:>9} {:<28} GROUP POINT (verify)",
                "MACHINE", "MASTER TARGET", "REPLICATED", "RPO", "POINTS", "RECORDS", "APP POINT (verify)"
            );
            for r in &report.machines {
                println!(
                    "{:<8} {:<13} {:>9.1} MiB {:>6.1} s {:>7} {:>9} {:<28} {}",
                    r.machine,
                    r.master_target,
                    r.bytes_replicated as f64 / 1048576.0,
                    r.rpo_secs,
                    r.points,
                    r.workload_records,
                    format!("{} {}", r.app_point, r.verify_app_point),
                    r.verify_group_point
                );
            }
            if let Some(c) = &report.cycle {
                println!("\nfull cycle of recovery plan {} ({}):", c.plan, c.machines.join(", "));
                println!("{:<72} {:>8} {:>14} {:>14}", "PHASE", "TIME", "BYTES SENT", "CHANGED");
                for ph in &c.phases {
                    let n = |b: Option<u64>| b.map(|b| b.to_string()).unwrap_or_else(|| "-".into());
                    println!(
                        "{:<72} {:>6.1} s {:>14} {:>14}",
                        ph.phase,
                        ph.secs,
                        n(ph.bytes_sent),
                        n(ph.bytes_changed)
                    );
                }
                println!("both sites byte-identical at the end: {}", if c.byte_exact { "yes" } else { "NO" });
                if let Some(r) = &c.refused {
                    println!("{r}");
                }
            }
            println!(
                "\n{}",
                if report.verified {
                    "every point verified: the replicas hold exactly what the machines wrote"
                } else {
                    "VERIFICATION FAILED"
                }
            );
        }
    }
    if !report.verified {
        bail!("verification failed (see the table above)");
    }
    Ok(())
}

#[derive(Subcommand)]
pub(crate) enum LabAction {
    /// Write verifiable records (seq, checksums, random offsets and sizes) through NBD exports.
    Workload {
        /// An NBD export HOST:PORT/EXPORT or unix:SOCKET:EXPORT per disk (repeatable; disk index = order).
        #[arg(long = "disk", required = true)]
        disks: Vec<String>,
        /// The record log (appended before each write; `lab verify` reads it).
        #[arg(long)]
        record_log: PathBuf,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Records per second (0 = as fast as possible).
        #[arg(long, default_value_t = 0.0)]
        rate: f64,
        #[arg(long)]
        records: Option<u64>,
        #[arg(long)]
        duration_secs: Option<f64>,
        /// Largest record, in 4 KiB blocks.
        #[arg(long, default_value_t = 16)]
        max_blocks: u32,
        /// Pause-and-flush while this file exists (writes FILE.paused with the last seq): the
        /// freeze hook of an app-consistent point creates it, the thaw hook removes it.
        #[arg(long)]
        pause_file: Option<PathBuf>,
        /// The first record's seq when the log is empty: a failed-over machine's workload forks
        /// its log here, so its records are never mistaken for the primary's lost tail.
        #[arg(long)]
        first_seq: Option<u64>,
    },
    /// A controllable link between sites: a TCP proxy whose control endpoint cuts, restores or
    /// slows it. `ferry lab link --listen --to --control` runs one; `ferry lab link cut|restore|slow
    /// [NAME...]` controls a lab's links (all when none is named).
    Link(LinkCmd),
    /// Build and start a two-site lab in DIR (the built-in description, or --config FILE).
    Up {
        dir: PathBuf,
        /// A lab description (TOML; see `crates/lab/default-lab.toml`).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Processes, links, components and machines of a lab.
    Status {
        #[arg(env = "FERRY_LAB", default_value = "ferry-lab")]
        dir: PathBuf,
    },
    /// Stop a lab (guests shut down cleanly first) and check no process is left.
    Down {
        #[arg(env = "FERRY_LAB", default_value = "ferry-lab")]
        dir: PathBuf,
        /// Also delete the lab's folder.
        #[arg(long)]
        remove: bool,
    },
    /// Kill a lab machine's guest (SIGKILL), like pulling its power.
    Crash {
        machine: String,
        #[arg(long, env = "FERRY_LAB", default_value = "ferry-lab")]
        lab: PathBuf,
    },
    /// Power a lab machine on (its guest boots and its mobility service registers).
    PowerOn {
        machine: String,
        /// Also when the machine failed over from this site (the old primary, fenced).
        #[arg(long)]
        allow_failed_over: bool,
        #[arg(long, env = "FERRY_LAB", default_value = "ferry-lab")]
        lab: PathBuf,
    },
    /// Power a lab machine off cleanly (its agent drains first).
    PowerOff {
        machine: String,
        #[arg(long, env = "FERRY_LAB", default_value = "ferry-lab")]
        lab: PathBuf,
    },
    /// Stop one of the lab's daemons and start it again (`--kill`: SIGKILL first, a crash).
    Restart {
        name: String,
        #[arg(long)]
        kill: bool,
        #[arg(long, env = "FERRY_LAB", default_value = "ferry-lab")]
        lab: PathBuf,
    },
    /// The guest of a powered-on lab machine (started by power-on; not run by hand).
    #[command(hide = true)]
    Guest {
        #[arg(long)]
        dir: PathBuf,
    },
    /// Check that disk images hold a consistent prefix of a workload's records.
    Verify {
        /// The workload's record log.
        #[arg(long)]
        record_log: PathBuf,
        /// A raw image per disk, in the workload's disk order (repeatable).
        #[arg(long = "disk", required = true)]
        disks: Vec<PathBuf>,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// The prefix must be exactly this seq (an app-consistent point's paused seq).
        #[arg(long)]
        exact_seq: Option<u64>,
    },
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct LinkCmd {
    #[command(subcommand)]
    pub(crate) action: Option<LinkAction>,
    /// Where the near side connects.
    #[arg(long)]
    pub(crate) listen: Option<String>,
    /// The far side's address.
    #[arg(long)]
    pub(crate) to: Option<String>,
    /// Control endpoint (HTTP, loopback).
    #[arg(long)]
    pub(crate) control: Option<String>,
}

#[derive(Subcommand)]
pub(crate) enum LinkAction {
    /// Drop open connections and refuse new ones.
    Cut {
        names: Vec<String>,
        #[arg(long, env = "FERRY_LAB", default_value = "ferry-lab")]
        lab: PathBuf,
    },
    /// Carry traffic again, at full speed.
    Restore {
        names: Vec<String>,
        #[arg(long, env = "FERRY_LAB", default_value = "ferry-lab")]
        lab: PathBuf,
    },
    /// Add latency and a bandwidth limit.
    Slow {
        names: Vec<String>,
        #[arg(long, env = "FERRY_LAB", default_value = "ferry-lab")]
        lab: PathBuf,
        #[arg(long, default_value_t = 0)]
        latency_ms: u64,
        /// Bytes per second (0 = unlimited).
        #[arg(long, default_value_t = 0)]
        bandwidth_bytes_per_sec: u64,
    },
}

pub(crate) async fn run_lab(action: LabAction, out: OutputFormat) -> Result<()> {
    match action {
        LabAction::Workload {
            disks,
            record_log,
            seed,
            rate,
            records,
            duration_secs,
            max_blocks,
            pause_file,
            first_seq,
        } => {
            let args = lab::WorkloadArgs {
                disks,
                log: record_log,
                seed,
                rate,
                records,
                duration: duration_secs.map(std::time::Duration::from_secs_f64),
                max_blocks,
                pause_file,
                first_seq,
            };
            let last = tokio::task::spawn_blocking(move || lab::workload(&args)).await??;
            match out {
                OutputFormat::Json => println!("{}", serde_json::json!({ "last_seq": last })),
                OutputFormat::Table => println!("workload done: last record seq {last}"),
            }
            Ok(())
        }
        LabAction::Link(cmd) => match cmd.action {
            None => {
                let (Some(listen), Some(to), Some(control)) = (cmd.listen, cmd.to, cmd.control) else {
                    bail!("`ferry lab link` runs a link with --listen, --to and --control, or controls a lab's links: `ferry lab link cut|restore|slow [NAME...]`");
                };
                lab_link::run(&listen, to, &control, shutdown_on_signal()).await
            }
            Some(LinkAction::Cut { names, lab }) => link_control(&lab, &names, "cut", None, out).await,
            Some(LinkAction::Restore { names, lab }) => link_control(&lab, &names, "restore", None, out).await,
            Some(LinkAction::Slow { names, lab, latency_ms, bandwidth_bytes_per_sec }) => {
                let body = ferry_lab::link::Slow { latency_ms, bandwidth_bytes_per_sec };
                link_control(&lab, &names, "slow", Some(body), out).await
            }
        },
        LabAction::Up { dir, config } => up(&dir, config.as_deref(), out).await,
        LabAction::Status { dir } => status(&dir, out).await,
        LabAction::Down { dir, remove } => down(&dir, remove, out).await,
        LabAction::Crash { machine, lab } => {
            machine_op(&lab, &machine.clone(), SiteOperation::Crash { machine }, out).await
        }
        LabAction::PowerOn { machine, allow_failed_over, lab } => {
            machine_op(&lab, &machine.clone(), SiteOperation::PowerOn { machine, allow_failed_over }, out).await
        }
        LabAction::PowerOff { machine, lab } => {
            machine_op(&lab, &machine.clone(), SiteOperation::PowerOff { machine }, out).await
        }
        LabAction::Restart { name, kill, lab } => restart(&lab, &name, kill, out).await,
        LabAction::Guest { dir } => lab_guest::run(dir, shutdown_on_signal()).await,
        LabAction::Verify { record_log, disks, seed, exact_seq } => {
            let v = tokio::task::spawn_blocking(move || lab::verify(&record_log, &disks, seed, exact_seq)).await??;
            match out {
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&v)?),
                OutputFormat::Table => println!(
                    "{}: prefix up to record {} ({} records in the log, {} blocks checked){}",
                    if v.consistent { "CONSISTENT" } else { "NOT CONSISTENT" },
                    v.prefix_seq,
                    v.records_in_log,
                    v.blocks_checked,
                    v.problem.as_ref().map(|p| format!(": {p}")).unwrap_or_default()
                ),
            }
            if !v.consistent {
                bail!("verification failed: {}", v.problem.unwrap_or_default());
            }
            Ok(())
        }
    }
}

//! `ferry`: the single binary of Ferry's components and operator commands.

mod cli_config;
mod ctl;
mod lab_cli;
mod output;

use ferry_lab::{guest as lab_guest, link as lab_link, workload as lab};

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use cli_config::{load_config, Overrides};
use output::{print_status, OutputFormat};

#[derive(Parser)]
#[command(
    name = "ferry",
    version,
    about = "Ferry site recovery: replicate machines' disks to a recovery site, fail over, reprotect, fail back"
)]
struct Cli {
    /// Output format of commands that show something.
    #[arg(long, global = true, value_enum, default_value_t = OutputFormat::Table)]
    output: OutputFormat,
    /// Log filter (tracing env-filter syntax), also from FERRY_LOG.
    #[arg(long, global = true, env = "FERRY_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the agent (mobility service) of a machine, or query it.
    Agent(AgentCmd),
    /// Run a process server, or query it.
    ProcessServer(ProcessServerCmd),
    /// Run a master target, or query it.
    MasterTarget(MasterTargetCmd),
    /// Create a CA and component certificates for TLS between Ferry processes.
    Certs(CertsArgs),
    /// Run the configuration server (control plane), or restore its database from a backup.
    ConfigServer(ConfigServerCmd),
    /// Replication policies (a read-only -failback policy comes with each, POL-2).
    Policies {
        #[command(subcommand)]
        action: ctl::PolicyAction,
        #[command(flatten)]
        server: ctl::ServerArgs,
    },
    /// Replication groups.
    Groups {
        #[command(subcommand)]
        action: ctl::GroupAction,
        #[command(flatten)]
        server: ctl::ServerArgs,
    },
    /// Recovery plans.
    Plans {
        #[command(subcommand)]
        action: ctl::PlanAction,
        #[command(flatten)]
        server: ctl::ServerArgs,
    },
    /// Sites (inventory providers).
    Sites {
        #[command(subcommand)]
        action: ctl::SiteAction,
        #[command(flatten)]
        server: ctl::ServerArgs,
    },
    /// The discovered inventory.
    Inventory {
        #[command(flatten)]
        server: ctl::ServerArgs,
    },
    /// Jobs: list, show, watch with a progress bar, confirm a manual action, cancel.
    Jobs {
        #[command(subcommand)]
        action: ctl::JobAction,
        #[command(flatten)]
        server: ctl::ServerArgs,
    },
    /// API tokens (admin).
    Tokens {
        #[command(subcommand)]
        action: ctl::TokenAction,
        #[command(flatten)]
        server: ctl::ServerArgs,
    },
    /// Recent events.
    Events {
        #[command(flatten)]
        server: ctl::ServerArgs,
    },
    /// Components with their health.
    Components {
        #[command(flatten)]
        server: ctl::ServerArgs,
    },
    /// Back up the configuration database now (encrypted) and follow the job.
    Backup {
        #[command(flatten)]
        server: ctl::ServerArgs,
    },
    /// Register this host's component with a configuration server (key and CSR made here).
    Register(RegisterArgs),
    /// Enable replication of machines (or a replication group): a job with the initial sync's progress.
    Protect {
        #[command(flatten)]
        args: ctl::ProtectArgs,
        #[command(flatten)]
        server: ctl::ServerArgs,
    },
    /// Discovered machines: protection, health, RPO, points.
    Machines {
        #[command(flatten)]
        server: ctl::ServerArgs,
    },
    /// Recovery points of a protected machine.
    RecoveryPoints {
        machine: String,
        #[command(flatten)]
        server: ctl::ServerArgs,
    },
    /// Bring up a two-site lab, protect its machines, take and verify points, print a summary.
    Demo(lab_cli::DemoArgs),
    /// Lab: a two-site Ferry on this machine (up, status, down), its machines and links, verifiable workloads.
    Lab {
        #[command(subcommand)]
        action: LabAction,
    },
}

#[derive(Subcommand)]
enum LabAction {
    /// Write verifiable records (seq, checksums, random offsets and sizes) through NBD exports.
    Workload {
        /// An NBD export HOST:PORT/EXPORT per disk (repeatable; disk index = order).
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
struct LinkCmd {
    #[command(subcommand)]
    action: Option<LinkAction>,
    /// Where the near side connects.
    #[arg(long)]
    listen: Option<String>,
    /// The far side's address.
    #[arg(long)]
    to: Option<String>,
    /// Control endpoint (HTTP, loopback).
    #[arg(long)]
    control: Option<String>,
}

#[derive(Subcommand)]
enum LinkAction {
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

#[derive(Args)]
struct RegisterArgs {
    #[arg(long, env = "FERRY_SERVER")]
    server: String,
    /// SHA-256 fingerprint of the server's CA (`GET /api/v1/server` on the server, or its first-start output).
    #[arg(long)]
    ca_fingerprint: String,
    #[arg(long, env = "FERRY_REGISTRATION_PASSPHRASE", hide_env_values = true)]
    passphrase: String,
    /// agent, process-server or master-target.
    #[arg(long)]
    kind: String,
    #[arg(long)]
    name: String,
    /// Where to put ca.pem, KIND.pem, KIND.key and the component token.
    #[arg(long)]
    dir: PathBuf,
    /// Host names or addresses peers reach this component at (repeatable; in its certificate).
    #[arg(long = "host")]
    hosts: Vec<String>,
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct ConfigServerCmd {
    #[command(subcommand)]
    action: Option<ConfigServerAction>,
    #[command(flatten)]
    run: ConfigServerRunArgs,
}

#[derive(Subcommand)]
enum ConfigServerAction {
    /// Restore the database (and CA) from an encrypted backup; run with the server stopped.
    Restore {
        #[arg(long, short)]
        config: Option<PathBuf>,
        #[arg(long)]
        state_dir: Option<PathBuf>,
        #[arg(long)]
        database: Option<String>,
        /// The backup file.
        #[arg(long)]
        from: PathBuf,
        /// The backup key (default <state_dir>/backup.key).
        #[arg(long)]
        key_file: Option<PathBuf>,
    },
}

#[derive(Args, Default)]
struct ConfigServerRunArgs {
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[arg(long)]
    listen: Option<String>,
    #[arg(long)]
    state_dir: Option<PathBuf>,
    /// A file path (SQLite) or postgres:// URL.
    #[arg(long)]
    database: Option<String>,
    /// Adopt the CA `ferry certs` made in this folder.
    #[arg(long)]
    certs: Option<PathBuf>,
    /// Override any configuration key: KEY=VALUE (TOML value; repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct AgentCmd {
    #[command(subcommand)]
    action: Option<AgentAction>,
    #[command(flatten)]
    run: AgentRunArgs,
}

#[derive(Subcommand)]
enum AgentAction {
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
struct GroupPointArgs {
    /// App-consistent (every member runs its freeze/thaw hooks).
    #[arg(long)]
    app: bool,
    #[command(flatten)]
    status: StatusArgs,
}

#[derive(Args, Default)]
struct AgentRunArgs {
    /// TOML configuration file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[arg(long)]
    machine: Option<String>,
    #[arg(long)]
    state_dir: Option<PathBuf>,
    #[arg(long)]
    process_server: Option<String>,
    #[arg(long)]
    nbd_listen: Option<String>,
    #[arg(long)]
    nbd_socket: Option<PathBuf>,
    #[arg(long)]
    status_listen: Option<String>,
    /// Folder with ca.pem, agent.pem, agent.key (as written by `ferry certs`).
    #[arg(long)]
    certs: Option<PathBuf>,
    /// A protected disk as NAME=PATH (repeatable; replaces the file's disks).
    #[arg(long = "disk", value_name = "NAME=PATH")]
    disks: Vec<String>,
    #[arg(long)]
    log_limit_bytes: Option<u64>,
    /// Hold shipping (writes are still logged and tracked).
    #[arg(long)]
    shipping_paused: bool,
    /// Override any configuration key: KEY=VALUE (TOML value; repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

#[derive(Args)]
struct StatusArgs {
    /// The component's TOML configuration (to find its status address).
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Status address (overrides the configuration's status_listen).
    #[arg(long)]
    status_addr: Option<String>,
}

#[derive(Args)]
struct VerifyArgs {
    /// Disk name.
    disk: String,
    /// Resync the blocks found different.
    #[arg(long)]
    repair: bool,
    #[command(flatten)]
    status: StatusArgs,
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct ProcessServerCmd {
    #[command(subcommand)]
    action: Option<SimpleAction>,
    #[command(flatten)]
    run: ProcessServerRunArgs,
}

#[derive(Subcommand)]
enum SimpleAction {
    /// Show status.
    Status(StatusArgs),
}

#[derive(Args, Default)]
struct ProcessServerRunArgs {
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[arg(long)]
    cache_dir: Option<PathBuf>,
    #[arg(long)]
    cache_capacity_bytes: Option<u64>,
    #[arg(long)]
    listen: Option<String>,
    #[arg(long)]
    status_listen: Option<String>,
    #[arg(long)]
    master_target: Option<String>,
    #[arg(long)]
    certs: Option<PathBuf>,
    /// Override any configuration key: KEY=VALUE (TOML value; repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
struct MasterTargetCmd {
    #[command(subcommand)]
    action: Option<MasterTargetAction>,
    #[command(flatten)]
    run: MasterTargetRunArgs,
}

#[derive(Subcommand)]
enum MasterTargetAction {
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
struct PointsArgs {
    #[arg(long, required_unless_present = "group")]
    machine: Option<String>,
    #[arg(long, conflicts_with = "machine")]
    group: Option<String>,
    #[command(flatten)]
    status: StatusArgs,
}

#[derive(Args)]
struct SelectArgs {
    #[arg(long)]
    machine: String,
    /// latest, latest-processed, latest-app, latest-multi, latest-multi-app, or a point ID.
    #[arg(long, default_value = "latest-processed")]
    point: String,
    #[command(flatten)]
    status: StatusArgs,
}

#[derive(Args)]
struct MaterializeArgs {
    #[arg(long)]
    machine: String,
    /// A point ID (vm1@1234), a seq, or a selector (latest, latest-processed, latest-app, ...).
    #[arg(long, default_value = "latest-processed")]
    point: String,
    /// raw, qcow2, vmdk or vhd.
    #[arg(long, default_value = "raw")]
    format: String,
    /// Folder for the image files (default DATASTORE/MACHINE/images/ID).
    #[arg(long)]
    dir: Option<PathBuf>,
    #[command(flatten)]
    status: StatusArgs,
}

#[derive(Args)]
struct ExportArgs {
    #[arg(long)]
    machine: String,
    #[arg(long, default_value = "latest-processed")]
    point: String,
    /// Writable through a throwaway copy-on-write overlay (discarded at cleanup).
    #[arg(long)]
    writable: bool,
    #[command(flatten)]
    status: StatusArgs,
}

#[derive(Args)]
struct DiscardArgs {
    /// Materialization ID.
    id: String,
    #[command(flatten)]
    status: StatusArgs,
}

#[derive(Args)]
struct ChangesArgs {
    #[arg(long)]
    machine: String,
    #[arg(long)]
    from: String,
    /// A later point (default: the head).
    #[arg(long)]
    to: Option<String>,
    #[command(flatten)]
    status: StatusArgs,
}

#[derive(Args, Default)]
struct MasterTargetRunArgs {
    #[arg(long, short)]
    config: Option<PathBuf>,
    #[arg(long)]
    datastore: Option<PathBuf>,
    #[arg(long)]
    retention: Option<PathBuf>,
    #[arg(long)]
    listen: Option<String>,
    #[arg(long)]
    status_listen: Option<String>,
    #[arg(long)]
    certs: Option<PathBuf>,
    /// Override any configuration key: KEY=VALUE (TOML value; repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    set: Vec<String>,
}

#[derive(Args)]
struct CertsArgs {
    /// Folder for ca.pem/ca.key and COMPONENT.pem/.key (an existing CA there is reused).
    #[arg(long)]
    dir: PathBuf,
    /// Components to issue certificates for.
    #[arg(long = "component", default_values_t = vec!["agent".to_string(), "process-server".to_string(), "master-target".to_string()])]
    components: Vec<String>,
    /// Extra DNS names or IP addresses for the certificates (localhost and 127.0.0.1 are always included).
    #[arg(long = "host")]
    hosts: Vec<String>,
}

fn main() -> std::process::ExitCode {
    // Listeners handed down by whoever started us (the lab, the test harness), taken while the
    // process is still single-threaded.
    if let Err(e) = ferry_sys::listen::adopt() {
        eprintln!("error: {e}");
        return std::process::ExitCode::FAILURE;
    }
    let cli = Cli::parse();
    let filter =
        tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: logs that go to files stay greppable.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .with_ansi(ansi)
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, leaving out causes the message already quotes.
fn error_chain(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if !msg.contains(&text) {
            if !msg.is_empty() {
                msg.push_str(": ");
            }
            msg.push_str(&text);
        }
    }
    msg
}

fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(error = %e, "cannot install SIGTERM handler");
                return;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
        t.cancel();
    });
    token
}

/// The listener for configuration key `key` (e.g. `status_listen`): the socket our parent handed
/// down under that name, or a new one bound to `addr` (port 0 lets the kernel choose; the bound
/// address is published in the ready file).
fn listen(key: &str, addr: &str, what: &str) -> Result<tokio::net::TcpListener> {
    let l = ferry_sys::listen::listener(key, addr).with_context(|| format!("cannot listen on {addr} for {what}"))?;
    tokio::net::TcpListener::from_std(l).with_context(|| format!("cannot listen on {addr} for {what}"))
}

fn bind(key: &str, addr: &Option<String>, what: &str) -> Result<Option<tokio::net::TcpListener>> {
    addr.as_deref().map(|a| listen(key, a, what)).transpose()
}

/// Publish the addresses a daemon listens on (`ferry_sys::listen::publish`).
fn publish_ready(listeners: &[(&str, Option<&tokio::net::TcpListener>)]) -> Result<()> {
    let mut bound = Vec::new();
    for (key, l) in listeners {
        if let Some(l) = l {
            bound.push((*key, l.local_addr()?));
        }
    }
    ferry_sys::listen::publish(&bound).context("cannot write the ready file (FERRY_READY_FILE)")
}

async fn run(cli: Cli) -> Result<()> {
    let out = cli.output;
    match cli.command {
        Command::Certs(a) => {
            let generated = ferry_tls::generate(&a.dir, &a.components, &a.hosts)
                .with_context(|| format!("creating certificates in {}", a.dir.display()))?;
            match out {
                OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&generated)?),
                OutputFormat::Table => {
                    println!("CA          {}", generated.ca.display());
                    for c in &generated.components {
                        println!("certificate {}  key {}", c.cert.display(), c.key.display());
                    }
                }
            }
            Ok(())
        }
        Command::Agent(cmd) => match cmd.action {
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
            None => run_agent(cmd.run).await,
        },
        Command::ProcessServer(cmd) => match cmd.action {
            Some(SimpleAction::Status(s)) => status("process-server", &s, out).await,
            None => run_process_server(cmd.run).await,
        },
        Command::ConfigServer(cmd) => match cmd.action {
            Some(ConfigServerAction::Restore { config, state_dir, database, from, key_file }) => {
                restore_config_server(config, state_dir, database, from, key_file, out).await
            }
            None => run_config_server(cmd.run, out).await,
        },
        Command::Policies { action, server } => ctl::policies(action, &server, out).await,
        Command::Groups { action, server } => ctl::groups(action, &server, out).await,
        Command::Plans { action, server } => ctl::plans(action, &server, out).await,
        Command::Sites { action, server } => ctl::sites(action, &server, out).await,
        Command::Inventory { server } => ctl::inventory(&server, out).await,
        Command::Jobs { action, server } => ctl::jobs(action, &server, out).await,
        Command::Tokens { action, server } => ctl::tokens(action, &server, out).await,
        Command::Events { server } => {
            let v = server.call("GET", "/api/v1/events", None).await?;
            ctl::show(&v, out, &["seq", "time_ms", "severity", "code", "object", "message"]);
            Ok(())
        }
        Command::Components { server } => {
            let v = server.call("GET", "/api/v1/components", None).await?;
            ctl::show(&v, out, &["kind", "name", "health", "last_seen_ms", "reasons"]);
            Ok(())
        }
        Command::Backup { server } => {
            let job = server.call("POST", "/api/v1/backups", None).await?;
            ctl::watch(job["id"].as_str().unwrap_or(""), &server, out).await
        }
        Command::Lab { action } => run_lab(action, out).await,
        Command::Protect { args, server } => ctl::protect(args, &server, out).await,
        Command::Machines { server } => ctl::machines(&server, out).await,
        Command::RecoveryPoints { machine, server } => ctl::recovery_points(&machine, &server, out).await,
        Command::Demo(args) => lab_cli::demo(args, out).await,
        Command::Register(r) => {
            ctl::register(&r.server, &r.ca_fingerprint, &r.passphrase, &r.kind, &r.name, &r.hosts, &r.dir, out).await
        }
        Command::MasterTarget(cmd) => match cmd.action {
            Some(MasterTargetAction::Status(s)) => status("master-target", &s, out).await,
            Some(action) => master_target_action(action, out).await,
            None => run_master_target(cmd.run).await,
        },
    }
}

async fn run_agent(a: AgentRunArgs) -> Result<()> {
    let mut o = Overrides::default();
    o.string("machine", a.machine);
    o.path("state_dir", a.state_dir);
    o.string("process_server", a.process_server);
    o.string("nbd_listen", a.nbd_listen);
    o.path("nbd_socket", a.nbd_socket);
    o.string("status_listen", a.status_listen);
    o.certs(a.certs, "agent");
    o.int("log_limit_bytes", a.log_limit_bytes);
    if a.shipping_paused {
        o.bool("shipping_paused", true);
    }
    if !a.disks.is_empty() {
        let mut disks = Vec::new();
        for d in &a.disks {
            let Some((name, path)) = d.split_once('=') else { bail!("--disk {d:?} must be NAME=PATH") };
            let mut t = toml::Table::new();
            t.insert("name".into(), name.into());
            t.insert("path".into(), path.into());
            disks.push(toml::Value::Table(t));
        }
        o.set("disks", toml::Value::Array(disks));
    }
    o.assignments(&a.set)?;
    let config: ferry_agent::AgentConfig = cli_config::load_config_with_server(a.config.as_deref(), o, "agent", |t| {
        t.get("machine").and_then(|m| m.as_str()).unwrap_or("agent").to_owned()
    })
    .await?;
    if config.nbd_listen.is_none() && config.nbd_socket.is_none() {
        bail!("the agent needs nbd_listen (e.g. 127.0.0.1:10809) or nbd_socket: it is the machine's disk interface");
    }
    let nbd_unix = match &config.nbd_socket {
        Some(p) => {
            let _ = std::fs::remove_file(p);
            Some(
                tokio::net::UnixListener::bind(p)
                    .with_context(|| format!("cannot listen on unix socket {}", p.display()))?,
            )
        }
        None => None,
    };
    let listeners = ferry_agent::AgentListeners {
        nbd_tcp: bind("nbd_listen", &config.nbd_listen, "NBD")?,
        nbd_unix,
        status: bind("status_listen", &config.status_listen, "status")?,
    };
    publish_ready(&[("nbd_listen", listeners.nbd_tcp.as_ref()), ("status_listen", listeners.status.as_ref())])?;
    let machine = config.machine.clone();
    ferry_agent::serve(config, listeners, shutdown_on_signal())
        .await
        .with_context(|| format!("agent of machine {machine}"))
}

async fn run_process_server(a: ProcessServerRunArgs) -> Result<()> {
    let mut o = Overrides::default();
    o.path("cache_dir", a.cache_dir);
    o.int("cache_capacity_bytes", a.cache_capacity_bytes);
    o.string("listen", a.listen);
    o.string("status_listen", a.status_listen);
    o.string("master_target", a.master_target);
    o.certs(a.certs, "process-server");
    o.assignments(&a.set)?;
    let config: ferry_process_server::ProcessServerConfig =
        cli_config::load_config_with_server(a.config.as_deref(), o, "process-server", |_| "process-server".into())
            .await?;
    let listener = listen("listen", &config.listen, "agents")?;
    let status = bind("status_listen", &config.status_listen, "status")?;
    publish_ready(&[("listen", Some(&listener)), ("status_listen", status.as_ref())])?;
    ferry_process_server::serve(config, listener, status, shutdown_on_signal()).await.context("process server")
}

async fn run_master_target(a: MasterTargetRunArgs) -> Result<()> {
    let mut o = Overrides::default();
    o.path("datastore", a.datastore);
    o.path("retention", a.retention);
    o.string("listen", a.listen);
    o.string("status_listen", a.status_listen);
    o.certs(a.certs, "master-target");
    o.assignments(&a.set)?;
    let config: ferry_master_target::MasterTargetConfig =
        cli_config::load_config_with_server(a.config.as_deref(), o, "master-target", |t| {
            t.get("name").and_then(|m| m.as_str()).unwrap_or("master-target").to_owned()
        })
        .await?;
    let listener = listen("listen", &config.listen, "process servers")?;
    let status = bind("status_listen", &config.status_listen, "status")?;
    publish_ready(&[("listen", Some(&listener)), ("status_listen", status.as_ref())])?;
    ferry_master_target::serve(config, listener, status, shutdown_on_signal()).await.context("master target")
}

fn status_addr(component: &str, s: &StatusArgs) -> Result<String> {
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

async fn status(component: &str, s: &StatusArgs, out: OutputFormat) -> Result<()> {
    let addr = status_addr(component, s)?;
    let (code, v) = ferry_status::request(&addr, "GET", "/status", None).await?;
    if code != 200 {
        bail!("status endpoint {addr} answered HTTP {code}: {v}");
    }
    print_status(&v, out);
    Ok(())
}

async fn verify(v: VerifyArgs, out: OutputFormat) -> Result<()> {
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
async fn api(
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

fn print_result(v: &serde_json::Value, out: OutputFormat, line: &str) {
    match out {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
        OutputFormat::Table => println!("{line}"),
    }
}

fn url_part(s: &str) -> String {
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
    body: &serde_json::Value,
) -> Result<serde_json::Value> {
    api("master-target", status, "POST", &format!("/machines/{}/materializations", url_part(machine)), Some(body)).await
}

fn print_materialization(v: &serde_json::Value, out: OutputFormat, lines: &[&str]) {
    let id = v["id"].as_str().unwrap_or("?");
    let point = v["point"]["id"].as_str().unwrap_or("?");
    print_result(v, out, &format!("{id}  point {point}\n  {}", lines.join("\n  ")));
}

async fn master_target_action(action: MasterTargetAction, out: OutputFormat) -> Result<()> {
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

fn config_server_config(a: ConfigServerRunArgs) -> Result<ferry_config_server::ConfigServerConfig> {
    let mut o = Overrides::default();
    o.string("listen", a.listen);
    o.path("state_dir", a.state_dir);
    o.string("database", a.database);
    o.path("certs", a.certs);
    o.assignments(&a.set)?;
    load_config(a.config.as_deref(), o, "config-server")
}

async fn run_config_server(a: ConfigServerRunArgs, out: OutputFormat) -> Result<()> {
    let config = config_server_config(a)?;
    let listener = listen("listen", &config.listen, "the API")?;
    publish_ready(&[("listen", Some(&listener))])?;
    let prepared = ferry_config_server::prepare(&config).await.context("configuration server setup")?;
    let fingerprint = ferry_tls::fingerprint(&prepared.2)?;
    let first = &prepared.1;
    let shown = serde_json::json!({
        "listen": config.listen,
        "database": prepared.0.backend(),
        "ca": config.tls_dir().join("ca.pem"),
        "ca_fingerprint": fingerprint,
        "admin_token": first.admin_token,
        "registration_passphrase": first.registration_passphrase,
    });
    match out {
        OutputFormat::Json => println!("{}", serde_json::to_string(&shown)?),
        OutputFormat::Table => {
            println!("configuration server on https://{}  database {:?}", config.listen, prepared.0.backend());
            println!("CA {}  fingerprint {fingerprint}", config.tls_dir().join("ca.pem").display());
            if let Some(t) = &first.admin_token {
                println!("first admin token (shown once, keep it safe): {t}");
            }
            if let Some(p) = &first.registration_passphrase {
                println!("registration passphrase (shown once): {p}");
            }
        }
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    ferry_config_server::serve(config, listener, prepared, shutdown_on_signal()).await.context("configuration server")
}

async fn restore_config_server(
    config: Option<PathBuf>,
    state_dir: Option<PathBuf>,
    database: Option<String>,
    from: PathBuf,
    key_file: Option<PathBuf>,
    out: OutputFormat,
) -> Result<()> {
    let mut o = Overrides::default();
    o.path("state_dir", state_dir);
    o.string("database", database);
    if config.is_none() {
        o.string("listen", Some("127.0.0.1:0".into()));
    }
    let config: ferry_config_server::ConfigServerConfig = load_config(config.as_deref(), o, "config-server")?;
    let key_path = key_file.unwrap_or_else(|| config.backup_config().key_file);
    let key_hex = std::fs::read_to_string(&key_path)
        .with_context(|| format!("cannot read the backup key {}", key_path.display()))?;
    let key = ferry_config_server::backup::parse_key(key_hex.trim())
        .with_context(|| format!("{} is not a backup key (64 hex digits)", key_path.display()))?;
    let snapshot = ferry_config_server::backup::read_backup(&from, &key).map_err(anyhow::Error::msg)?;
    // Never under a running server: it would overwrite the restored rows.
    std::fs::create_dir_all(&config.state_dir)
        .with_context(|| format!("cannot create {}", config.state_dir.display()))?;
    let _lock = ferry_config_server::lock_state(&config.state_dir)?;
    let store = ferry_store::Store::open(&config.database_location()).await.context("opening the database")?;
    std::fs::create_dir_all(config.tls_dir())
        .with_context(|| format!("cannot create {}", config.tls_dir().display()))?;
    ferry_config_server::backup::restore(&store, &snapshot, &config.tls_dir()).await.map_err(anyhow::Error::msg)?;
    store.close().await;
    let v = serde_json::json!({ "restored_from": from, "backup_ms": snapshot["backup_ms"], "database": config.database_location() });
    match out {
        OutputFormat::Json => println!("{}", serde_json::to_string_pretty(&v)?),
        OutputFormat::Table => println!(
            "restored {} (backup of {}) into {}; start the server: components re-report their state, differences show as events",
            from.display(),
            snapshot["backup_ms"],
            config.database_location()
        ),
    }
    Ok(())
}

async fn run_lab(action: LabAction, out: OutputFormat) -> Result<()> {
    match action {
        LabAction::Workload { disks, record_log, seed, rate, records, duration_secs, max_blocks, pause_file } => {
            let args = lab::WorkloadArgs {
                disks,
                log: record_log,
                seed,
                rate,
                records,
                duration: duration_secs.map(std::time::Duration::from_secs_f64),
                max_blocks,
                pause_file,
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
            Some(LinkAction::Cut { names, lab }) => lab_cli::link_control(&lab, &names, "cut", None, out).await,
            Some(LinkAction::Restore { names, lab }) => lab_cli::link_control(&lab, &names, "restore", None, out).await,
            Some(LinkAction::Slow { names, lab, latency_ms, bandwidth_bytes_per_sec }) => {
                let body =
                    serde_json::json!({"latency_ms": latency_ms, "bandwidth_bytes_per_sec": bandwidth_bytes_per_sec});
                lab_cli::link_control(&lab, &names, "slow", Some(body), out).await
            }
        },
        LabAction::Up { dir, config } => lab_cli::up(&dir, config.as_deref(), out).await,
        LabAction::Status { dir } => lab_cli::status(&dir, out).await,
        LabAction::Down { dir, remove } => lab_cli::down(&dir, remove, out).await,
        LabAction::Crash { machine, lab } => lab_cli::machine_op(&lab, &machine, "crash", out).await,
        LabAction::PowerOn { machine, lab } => lab_cli::machine_op(&lab, &machine, "power-on", out).await,
        LabAction::PowerOff { machine, lab } => lab_cli::machine_op(&lab, &machine, "power-off", out).await,
        LabAction::Restart { name, kill, lab } => lab_cli::restart(&lab, &name, kill, out).await,
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

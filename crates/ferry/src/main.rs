//! `ferry`: the single binary of Ferry's components and operator commands.

mod agent_cli;
mod cli_config;
mod ctl;
mod daemons;
mod lab_cli;
mod master_target_cli;
mod output;

use agent_cli::AgentCmd;
use daemons::ConfigServerCmd;
use lab_cli::LabAction;
use master_target_cli::{MasterTargetCmd, ProcessServerCmd};

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::{Args, Parser, Subcommand};

use output::OutputFormat;

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
    /// Make a replication group's coordinator key pair, for a `[group]` written by hand
    /// (protection through the configuration server makes one itself).
    GroupKey,
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
    /// Data-path certificates: the revoked ones, revoke one (admin).
    Certificates {
        #[command(subcommand)]
        action: ctl::CertificateAction,
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
    /// Disable protection of a machine (a job): its agent stops shipping (the machine keeps
    /// running), its spool and replica with every recovery point are deleted.
    DisableProtection {
        machine: String,
        /// The primary site is unreachable: do not wait for its agent and process server (they
        /// clean up when they are back); the recovery side is cleaned up all the same.
        #[arg(long)]
        remove: bool,
        /// Also for a failed-over machine: its recovery points go and reprotect and failback are
        /// then impossible; the machine at the recovery site keeps running on its disks.
        #[arg(long)]
        force: bool,
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        server: ctl::ServerArgs,
    },
    /// Reprotect a failed-over machine (a job): its machine at the recovery site replicates back
    /// to the primary's own disks, sending only what differs, with the failback policy.
    Reprotect {
        machine: String,
        /// A master target of the primary site (its retention volume keeps the reverse points).
        #[arg(long)]
        master_target: String,
        /// The process server the failed-over machine streams through.
        #[arg(long)]
        process_server: String,
        /// A datastore of the primary site (used only for new disks; required all the same).
        #[arg(long)]
        datastore: String,
        /// List every precondition with pass/fail, code and remedy; change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Fail the resync when it makes no progress for this long.
        #[arg(long, default_value_t = 600)]
        stall_secs: u64,
        /// A split brain (the old primary wrote after the failover): overwrite what it wrote
        /// with the recovery site's version. Without it such a reprotect stops and says what.
        #[arg(long)]
        discard_primary_changes: bool,
        /// How far the old primary's clock may be off, in seconds.
        #[arg(long, default_value_t = 5)]
        clock_skew_secs: u64,
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        server: ctl::ServerArgs,
    },
    /// Fail a reprotected machine back (FB-1): the failover of its reverse protection, which
    /// boots the original machine on its own disks. Commit with `ferry failover commit`.
    Failback {
        /// The original machine (`web1`) or its reverse protection (`web1.recovery`).
        machine: String,
        /// Zero data loss: the running copy is quiesced, drained and shut down first.
        #[arg(long, conflicts_with = "point")]
        planned: bool,
        /// Otherwise: an RC-1 selector (latest, latest-app, …), a point ID or a seq.
        #[arg(long)]
        point: Option<String>,
        /// Planned: how long to wait for the primary site to hold every write.
        #[arg(long, default_value_t = 300)]
        drain_secs: u64,
        /// Leave the original machine powered off.
        #[arg(long)]
        no_start: bool,
        #[arg(long)]
        no_wait: bool,
        #[command(flatten)]
        server: ctl::ServerArgs,
    },
    /// Fail a protected machine over, change its point, commit (jobs with steps and progress).
    Failover {
        #[command(subcommand)]
        action: ctl::FailoverAction,
        #[command(flatten)]
        server: ctl::ServerArgs,
    },
    /// Test failover (a drill) of a protected machine, and its cleanup (jobs).
    TestFailover {
        #[command(subcommand)]
        action: ctl::TestFailoverAction,
        #[command(flatten)]
        server: ctl::ServerArgs,
    },
    /// Test failovers (drills), running and past: when, which point, result, who.
    Drills {
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
    /// The site this component runs at (its identity is KIND/NAME@SITE; an agent's site is its
    /// machine's, from the server's inventory).
    #[arg(long)]
    site: Option<String>,
}

#[derive(Args)]
struct CertsArgs {
    /// Folder for ca.pem/ca.key and COMPONENT.pem/.key (an existing CA there is reused).
    #[arg(long)]
    dir: PathBuf,
    /// Identities to issue certificates for: `process-server`, `master-target`, `agent/MACHINE`,
    /// `nbd-client/MACHINE`, each optionally `@SITE` (files: `process-server.pem`,
    /// `agent-MACHINE.pem`, ...). Data-path peers accept an agent's stream only for the machine its
    /// certificate names.
    #[arg(long = "component", default_values_t = vec!["process-server".to_string(), "master-target".to_string()])]
    components: Vec<String>,
    /// Extra DNS names or IP addresses for the certificates (localhost and 127.0.0.1 are always included).
    #[arg(long = "host")]
    hosts: Vec<String>,
}

fn main() -> std::process::ExitCode {
    // Nothing Ferry creates is readable by other local users (replicas, points, keys, database).
    ferry_sys::proc::private_umask();
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
        Command::GroupKey => {
            let (private, public) = ferry_status::control::new_group_key_pair().map_err(anyhow::Error::msg)?;
            match out {
                OutputFormat::Json => {
                    println!("{}", serde_json::json!({ "coordinator_key": private, "coordinator_public_key": public }))
                }
                OutputFormat::Table => {
                    println!("# the coordinator's [group] only (keep it private):");
                    println!("coordinator_key = \"{private}\"");
                    println!("# every member's [group], the coordinator's too:");
                    println!("coordinator_public_key = \"{public}\"");
                }
            }
            Ok(())
        }
        Command::Agent(cmd) => agent_cli::run(cmd, out).await,
        Command::ProcessServer(cmd) => master_target_cli::run_process_server_cmd(cmd, out).await,
        Command::ConfigServer(cmd) => daemons::run_config_server_cmd(cmd, out).await,
        Command::Policies { action, server } => ctl::policies(action, &server, out).await,
        Command::Groups { action, server } => ctl::groups(action, &server, out).await,
        Command::Plans { action, server } => ctl::plans(action, &server, out).await,
        Command::Sites { action, server } => ctl::sites(action, &server, out).await,
        Command::Inventory { server } => ctl::inventory(&server, out).await,
        Command::Jobs { action, server } => ctl::jobs(action, &server, out).await,
        Command::Tokens { action, server } => ctl::tokens(action, &server, out).await,
        Command::Certificates { action, server } => ctl::certificates(action, &server, out).await,
        Command::Events { server } => ctl::events(&server, out).await,
        Command::Components { server } => ctl::components(&server, out).await,
        Command::Backup { server } => ctl::backup(&server, out).await,
        Command::Lab { action } => lab_cli::run_lab(action, out).await,
        Command::Protect { args, server } => ctl::protect(args, &server, out).await,
        Command::Reprotect {
            machine,
            master_target,
            process_server,
            datastore,
            dry_run,
            stall_secs,
            discard_primary_changes,
            clock_skew_secs,
            no_wait,
            server,
        } => {
            let req = ferry_api::config_server::ReprotectRequest {
                master_target,
                process_server,
                datastore,
                stall_secs,
                discard_primary_changes,
                clock_skew_secs,
            };
            ctl::reprotect(&machine, &req, dry_run, no_wait, &server, out).await
        }
        Command::Failback { machine, planned, point, drain_secs, no_start, no_wait, server } => {
            ctl::failback(&machine, planned, point, drain_secs, no_start, no_wait, &server, out).await
        }
        Command::DisableProtection { machine, remove, force, no_wait, server } => {
            ctl::disable_protection(&machine, remove, force, no_wait, &server, out).await
        }
        Command::Failover { action, server } => ctl::failover(action, &server, out).await,
        Command::TestFailover { action, server } => ctl::test_failover(action, &server, out).await,
        Command::Drills { server } => ctl::drills(&server, out).await,
        Command::Machines { server } => ctl::machines(&server, out).await,
        Command::RecoveryPoints { machine, server } => ctl::recovery_points(&machine, &server, out).await,
        Command::Demo(args) => lab_cli::demo(args, out).await,
        Command::Register(r) => {
            ctl::register(
                &r.server,
                &r.ca_fingerprint,
                &r.passphrase,
                &r.kind,
                &r.name,
                &r.hosts,
                r.site.as_deref(),
                &r.dir,
                out,
            )
            .await
        }
        Command::MasterTarget(cmd) => master_target_cli::run(cmd, out).await,
    }
}

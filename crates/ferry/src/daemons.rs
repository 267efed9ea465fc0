//! The daemons: `ferry agent|process-server|master-target|config-server` on their configuration
//! (TOML, flags override), with the listeners handed down by whoever started them.

use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Args, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::cli_config::{self, load_config, Overrides};
use crate::output::OutputFormat;

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub(crate) struct ConfigServerCmd {
    #[command(subcommand)]
    pub(crate) action: Option<ConfigServerAction>,
    #[command(flatten)]
    pub(crate) run: ConfigServerRunArgs,
}

#[derive(Subcommand)]
pub(crate) enum ConfigServerAction {
    /// Which server is authoritative (epoch), and what this one is: active, standby, stale.
    Authority {
        #[command(flatten)]
        server: crate::ctl::ServerArgs,
    },
    /// Promote a standby (`--server` names it): it takes the next epoch, stops copying,
    /// resumes the jobs it copied and takes changes. An explicit decision: the old server, if
    /// it comes back, refuses every change.
    Promote {
        /// Also while the server it copies from still answers as active (only when that server
        /// is cut off from its components too).
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        server: crate::ctl::ServerArgs,
    },
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
pub(crate) struct ConfigServerRunArgs {
    #[arg(long, short)]
    pub(crate) config: Option<PathBuf>,
    #[arg(long)]
    pub(crate) listen: Option<String>,
    #[arg(long)]
    pub(crate) state_dir: Option<PathBuf>,
    /// A file path (SQLite) or postgres:// URL.
    #[arg(long)]
    pub(crate) database: Option<String>,
    /// Adopt the CA `ferry certs` made in this folder.
    #[arg(long)]
    pub(crate) certs: Option<PathBuf>,
    /// Override any configuration key: KEY=VALUE (TOML value; repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub(crate) set: Vec<String>,
}

#[derive(Args, Default)]
pub(crate) struct AgentRunArgs {
    /// TOML configuration file.
    #[arg(long, short)]
    pub(crate) config: Option<PathBuf>,
    #[arg(long)]
    pub(crate) machine: Option<String>,
    #[arg(long)]
    pub(crate) state_dir: Option<PathBuf>,
    #[arg(long)]
    pub(crate) process_server: Option<String>,
    #[arg(long)]
    pub(crate) nbd_listen: Option<String>,
    #[arg(long)]
    pub(crate) nbd_socket: Option<PathBuf>,
    #[arg(long)]
    pub(crate) status_listen: Option<String>,
    /// Folder with ca.pem, agent-MACHINE.pem, agent-MACHINE.key (`ferry certs --component agent/MACHINE`).
    #[arg(long)]
    pub(crate) certs: Option<PathBuf>,
    /// A protected disk as NAME=PATH (repeatable; replaces the file's disks).
    #[arg(long = "disk", value_name = "NAME=PATH")]
    pub(crate) disks: Vec<String>,
    #[arg(long)]
    pub(crate) log_limit_bytes: Option<u64>,
    /// Hold shipping (writes are still logged and tracked).
    #[arg(long)]
    pub(crate) shipping_paused: bool,
    /// Override any configuration key: KEY=VALUE (TOML value; repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub(crate) set: Vec<String>,
}

#[derive(Args, Default)]
pub(crate) struct ProcessServerRunArgs {
    #[arg(long, short)]
    pub(crate) config: Option<PathBuf>,
    #[arg(long)]
    pub(crate) cache_dir: Option<PathBuf>,
    #[arg(long)]
    pub(crate) cache_capacity_bytes: Option<u64>,
    #[arg(long)]
    pub(crate) listen: Option<String>,
    #[arg(long)]
    pub(crate) status_listen: Option<String>,
    #[arg(long)]
    pub(crate) master_target: Option<String>,
    #[arg(long)]
    pub(crate) certs: Option<PathBuf>,
    /// Override any configuration key: KEY=VALUE (TOML value; repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub(crate) set: Vec<String>,
}

#[derive(Args, Default)]
pub(crate) struct MasterTargetRunArgs {
    #[arg(long, short)]
    pub(crate) config: Option<PathBuf>,
    #[arg(long)]
    pub(crate) datastore: Option<PathBuf>,
    #[arg(long)]
    pub(crate) retention: Option<PathBuf>,
    #[arg(long)]
    pub(crate) listen: Option<String>,
    #[arg(long)]
    pub(crate) status_listen: Option<String>,
    #[arg(long)]
    pub(crate) certs: Option<PathBuf>,
    /// Override any configuration key: KEY=VALUE (TOML value; repeatable).
    #[arg(long = "set", value_name = "KEY=VALUE")]
    pub(crate) set: Vec<String>,
}

pub(crate) fn shutdown_on_signal() -> CancellationToken {
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
pub(crate) fn listen(key: &str, addr: &str, what: &str) -> Result<tokio::net::TcpListener> {
    let l = ferry_sys::listen::listener(key, addr).with_context(|| format!("cannot listen on {addr} for {what}"))?;
    tokio::net::TcpListener::from_std(l).with_context(|| format!("cannot listen on {addr} for {what}"))
}

pub(crate) fn bind(key: &str, addr: &Option<String>, what: &str) -> Result<Option<tokio::net::TcpListener>> {
    addr.as_deref().map(|a| listen(key, a, what)).transpose()
}

/// Publish the addresses a daemon listens on (`ferry_sys::listen::publish`).
pub(crate) fn publish_ready(listeners: &[(&str, Option<&tokio::net::TcpListener>)]) -> Result<()> {
    let mut bound = Vec::new();
    for (key, l) in listeners {
        if let Some(l) = l {
            bound.push((*key, l.local_addr()?));
        }
    }
    ferry_sys::listen::publish(&bound).context("cannot write the ready file (FERRY_READY_FILE)")
}

pub(crate) async fn run_agent(a: AgentRunArgs) -> Result<()> {
    let mut o = Overrides::default();
    // `ferry certs --component agent/MACHINE` writes agent-MACHINE.pem.
    let stem = a.machine.as_deref().map_or_else(|| "agent".to_owned(), |m| format!("agent-{m}"));
    o.string("machine", a.machine);
    o.path("state_dir", a.state_dir);
    o.string("process_server", a.process_server);
    o.string("nbd_listen", a.nbd_listen);
    o.path("nbd_socket", a.nbd_socket);
    o.string("status_listen", a.status_listen);
    o.certs(a.certs, &stem);
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
    let nbd_unix = match config.nbd_socket_path() {
        Some(p) => {
            if let Some(dir) = p.parent().filter(|_| config.nbd_socket.is_none()) {
                ferry_sys::fs::private_dir(dir).with_context(|| format!("cannot create {}", dir.display()))?;
            }
            // A stale socket of an earlier run; never anything else (a file planted there is
            // refused rather than deleted).
            if std::fs::symlink_metadata(&p).is_ok_and(|m| std::os::unix::fs::FileTypeExt::is_socket(&m.file_type())) {
                let _ = std::fs::remove_file(&p);
            }
            let l = tokio::net::UnixListener::bind(&p)
                .with_context(|| format!("cannot listen on unix socket {}", p.display()))?;
            // Owner-only: the socket is the machine's disk (the umask made it so; say it).
            std::fs::set_permissions(&p, std::os::unix::fs::PermissionsExt::from_mode(0o600))
                .with_context(|| format!("cannot make {} owner-only", p.display()))?;
            Some(l)
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

pub(crate) async fn run_process_server(a: ProcessServerRunArgs) -> Result<()> {
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

pub(crate) async fn run_master_target(a: MasterTargetRunArgs) -> Result<()> {
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

pub(crate) fn config_server_config(a: ConfigServerRunArgs) -> Result<ferry_config_server::ConfigServerConfig> {
    let mut o = Overrides::default();
    o.string("listen", a.listen);
    o.path("state_dir", a.state_dir);
    o.string("database", a.database);
    o.path("certs", a.certs);
    o.assignments(&a.set)?;
    load_config(a.config.as_deref(), o, "config-server")
}

pub(crate) async fn run_config_server(a: ConfigServerRunArgs, out: OutputFormat) -> Result<()> {
    let config = config_server_config(a)?;
    let listener = listen("listen", &config.listen, "the API")?;
    publish_ready(&[("listen", Some(&listener))])?;
    let prepared = ferry_config_server::prepare(&config).await.context("configuration server setup")?;
    let fingerprint = ferry_tls::fingerprint(&prepared.2)?;
    let first = &prepared.1;
    let shown = ferry_api::config_server::Started {
        listen: config.listen.clone(),
        database: format!("{:?}", prepared.0.backend()).to_lowercase(),
        ca: config.tls_dir().join("ca.pem"),
        ca_fingerprint: fingerprint.clone(),
        admin_token: first.admin_token.clone(),
        registration_passphrase: first.registration_passphrase.clone(),
    };
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

pub(crate) async fn restore_config_server(
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

/// `ferry config-server [restore]`.
pub(crate) async fn run_config_server_cmd(cmd: ConfigServerCmd, out: OutputFormat) -> Result<()> {
    match cmd.action {
        Some(ConfigServerAction::Restore { config, state_dir, database, from, key_file }) => {
            restore_config_server(config, state_dir, database, from, key_file, out).await
        }
        Some(ConfigServerAction::Authority { server }) => crate::ctl::authority(&server, None, out).await,
        Some(ConfigServerAction::Promote { force, server }) => crate::ctl::authority(&server, Some(force), out).await,
        None => run_config_server(cmd.run, out).await,
    }
}

//! Human tables and `--output json`.

use clap::ValueEnum;
use ferry_api::agent::AgentStatus;
use ferry_api::control::ComponentStatus;
use ferry_api::master_target::{GroupPoints, MasterTargetStatus, Point, PointKind, PointList};
use ferry_api::process_server::ProcessServerStatus;

#[derive(Clone, Copy, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

pub fn human_bytes(n: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n;
    let mut u = 0;
    while v >= 1024.0 && u < units.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", units[u])
}

/// Print `v` as JSON (for `--output json`).
pub fn print_json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

pub fn print_status(v: &ComponentStatus, out: OutputFormat) {
    if matches!(out, OutputFormat::Json) {
        print_json(v);
        return;
    }
    match v {
        ComponentStatus::Agent(a) => print_agent(a),
        ComponentStatus::MobilityService(m) => {
            println!("machine {}: mobility service without a running agent (not protected)", m.machine)
        }
        ComponentStatus::ProcessServer(p) => print_process_server(p),
        ComponentStatus::MasterTarget(m) => print_master_target(m),
    }
}

fn opt<T: std::fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map(|x| x.to_string()).unwrap_or_else(|| "-".into())
}

fn print_agent(a: &AgentStatus) {
    println!(
        "machine {}  mode {}  caught up {}  connected {}  throttled {}",
        a.machine,
        a.mode.as_str(),
        a.caught_up,
        a.connected,
        a.throttled
    );
    println!(
        "seq: last {}  sent {}  process-server durable {}  master-target durable {}  applied {}",
        a.last_seq, a.sent_seq, a.process_server_durable_seq, a.master_target_durable_seq, a.applied_seq
    );
    println!(
        "pending {} in {} records, resync pending {}, lag {:.1}s, writes {}/s, shipping {}/s",
        human_bytes(a.pending_log_bytes as f64),
        a.pending_log_records,
        human_bytes(a.resync_pending_bytes as f64),
        a.lag_seconds,
        human_bytes(a.write_bytes_per_sec),
        human_bytes(a.ship_bytes_per_sec),
    );
    if let Some(r) = &a.resync {
        println!("resync {}: {:.1}% of {}", r.reason, r.percent, human_bytes(r.bytes_total as f64));
    }
    println!("{:<12} {:>14} {:>16}  PATH", "DISK", "SIZE", "RESYNC PENDING");
    for d in &a.disks {
        println!(
            "{:<12} {:>14} {:>16}  {}",
            d.name,
            human_bytes(d.size as f64),
            human_bytes(d.resync_pending_bytes as f64),
            d.path.display()
        );
    }
    if let Some(e) = &a.link_error {
        println!("link: {e}");
    }
    let p = &a.points;
    println!(
        "tags: crash {} (last seq {})  app {} (last seq {}, {} failed)  group {} committed, {} aborted",
        p.crash_tags,
        opt(&p.last_crash_tag_seq),
        p.app_tags,
        opt(&p.last_app_tag_seq),
        p.app_failures,
        p.group_commits,
        p.group_aborts
    );
    for e in a.events.iter().rev().take(5) {
        println!("event {}: {}", e.kind, e.message);
    }
}

fn print_process_server(p: &ProcessServerStatus) {
    println!(
        "cache {} of {} used, {}% free, throttling {}",
        human_bytes(p.spool_bytes as f64),
        human_bytes(p.cache_capacity_bytes as f64),
        p.free_percent,
        p.throttling
    );
    println!(
        "{:<16} {:>6} {:>6} {:>10} {:>10} {:>10} {:>10} {:>12} {:>8}",
        "MACHINE", "AGENT", "MT", "SPOOLED", "FORWARDED", "MT-DURABLE", "APPLIED", "SPOOL", "LAG"
    );
    for m in &p.machines {
        println!(
            "{:<16} {:>6} {:>6} {:>10} {:>10} {:>10} {:>10} {:>12} {:>7.1}s",
            m.machine,
            m.agent_connected,
            m.master_target_connected,
            m.spooled_seq,
            m.forwarded_seq,
            m.target_durable_seq,
            m.applied_seq,
            human_bytes(m.spool_bytes as f64),
            m.lag_seconds
        );
    }
}

fn print_master_target(mt: &MasterTargetStatus) {
    println!(
        "{:<16} {:>10} {:>10} {:>11} {:>12} {:>8}  MODE",
        "MACHINE", "JOURNALED", "APPLIED", "CONSISTENT", "JOURNAL", "LAG"
    );
    for m in &mt.machines {
        println!(
            "{:<16} {:>10} {:>10} {:>11} {:>12} {:>7.1}s  {}",
            m.machine,
            m.journaled_seq,
            m.applied_seq,
            m.consistent,
            human_bytes(m.journal_bytes as f64),
            m.lag_seconds,
            m.mode
        );
        for d in &m.disks {
            println!("  disk {:<10} {:>12}  {}", d.name, human_bytes(d.size as f64), d.target.display());
        }
        let r = &m.retention;
        println!(
            "  recovery points {}  newest {}  history from seq {}  window {}s  base {}  volume free {}",
            m.points,
            m.newest_point.as_ref().map(|p| p.id.as_str()).unwrap_or("none"),
            opt(&r.base_seq),
            r.window_secs,
            human_bytes(r.base_bytes as f64),
            human_bytes(r.volume_free_bytes as f64),
        );
        if let Some(p) = &r.pruning_paused {
            println!("  {p}");
        }
        if let Some(e) = &m.error {
            println!("  ERROR: {e}");
        }
        for e in m.events.iter().rev().take(3) {
            println!("  event {}: {}", e.kind, e.message);
        }
    }
}

fn time_of(ms: u64) -> String {
    // UTC to the second: the table has no room for milliseconds.
    let t = ferry_sys::time::utc(ms);
    format!("{} {}Z", t.get(..10).unwrap_or(&t), t.get(11..19).unwrap_or_default())
}

fn kind_name(k: PointKind) -> &'static str {
    match k {
        PointKind::Crash => "crash",
        PointKind::App => "app",
    }
}

/// A machine's recovery points as a table.
pub fn print_points(v: &PointList, out: OutputFormat) {
    if matches!(out, OutputFormat::Json) {
        print_json(v);
        return;
    }
    print_point_rows(&v.points);
    let s = &v.selectors;
    for (k, id) in [
        ("latest-processed", &s.latest_processed),
        ("latest-app", &s.latest_app),
        ("latest-multi", &s.latest_multi),
        ("latest-multi-app", &s.latest_multi_app),
    ] {
        println!("{k:<18} {}", id.as_deref().unwrap_or("none"));
    }
    for p in &v.problems {
        println!("PROBLEM: {p}");
    }
}

/// Point rows (ID, time, kind, scope, seq, generation, origin).
pub fn print_point_rows(points: &[Point]) {
    println!(
        "{:<28} {:<21} {:<6} {:<7} {:>12} {:>16}  ORIGIN",
        "ID", "TIME (UTC)", "KIND", "SCOPE", "SEQ", "GENERATION"
    );
    for p in points {
        println!(
            "{:<28} {:<21} {:<6} {:<7} {:>12} {:>16}  {}{}",
            p.id,
            time_of(p.time_ms),
            kind_name(p.kind),
            if p.is_multi() { "multi" } else { "single" },
            p.seq,
            format!("{:016x}", p.generation),
            serde_json::to_value(p.origin).ok().and_then(|v| v.as_str().map(str::to_owned)).unwrap_or_default(),
            p.group_tag.as_ref().map(|t| format!(" ({t})")).unwrap_or_default(),
        );
    }
}

/// A group's multi-machine points as a table.
pub fn print_group_points(v: &GroupPoints, out: OutputFormat) {
    if matches!(out, OutputFormat::Json) {
        print_json(v);
        return;
    }
    println!("group {}: {} multi-machine point(s)", v.group, v.points.len());
    for p in &v.points {
        let members: Vec<String> = p.members.iter().map(|(m, s)| format!("{m}@{s}")).collect();
        println!("  {}  {}  {}  {}", p.id, time_of(p.time_ms), kind_name(p.kind), members.join(" "));
    }
    for t in &v.incomplete_tags {
        println!(
            "  incomplete {}: committed by {}, missing {}",
            t.tag,
            t.committed_by.join(", "),
            t.missing.join(", ")
        );
    }
    for p in &v.problems {
        println!("PROBLEM: {p}");
    }
}

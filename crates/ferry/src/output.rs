//! Human tables and `--output json`.

use clap::ValueEnum;

#[derive(Clone, Copy, ValueEnum)]
pub enum OutputFormat {
    Table,
    Json,
}

fn human_bytes(n: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n;
    let mut u = 0;
    while v >= 1024.0 && u < units.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    format!("{v:.1} {}", units[u])
}

pub fn print_status(v: &serde_json::Value, out: OutputFormat) {
    if matches!(out, OutputFormat::Json) {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        return;
    }
    let f = |k: &str| v.get(k).map(|x| x.to_string().trim_matches('"').to_owned()).unwrap_or_default();
    match v["component"].as_str() {
        Some("agent") => {
            println!(
                "machine {}  mode {}  caught up {}  connected {}  throttled {}",
                f("machine"),
                f("mode"),
                f("caught_up"),
                f("connected"),
                f("throttled")
            );
            println!(
                "seq: last {}  sent {}  process-server durable {}  master-target durable {}  applied {}",
                f("last_seq"),
                f("sent_seq"),
                f("process_server_durable_seq"),
                f("master_target_durable_seq"),
                f("applied_seq")
            );
            println!(
                "pending {} in {} records, resync pending {}, lag {:.1}s, writes {}/s, shipping {}/s",
                human_bytes(v["pending_log_bytes"].as_f64().unwrap_or(0.0)),
                f("pending_log_records"),
                human_bytes(v["resync_pending_bytes"].as_f64().unwrap_or(0.0)),
                v["lag_seconds"].as_f64().unwrap_or(0.0),
                human_bytes(v["write_bytes_per_sec"].as_f64().unwrap_or(0.0)),
                human_bytes(v["ship_bytes_per_sec"].as_f64().unwrap_or(0.0)),
            );
            if let Some(r) = v.get("resync").filter(|r| !r.is_null()) {
                println!(
                    "resync {}: {:.1}% of {}",
                    r["reason"],
                    r["percent"].as_f64().unwrap_or(0.0),
                    human_bytes(r["bytes_total"].as_f64().unwrap_or(0.0))
                );
            }
            println!("{:<12} {:>14} {:>16}  PATH", "DISK", "SIZE", "RESYNC PENDING");
            for d in v["disks"].as_array().into_iter().flatten() {
                println!(
                    "{:<12} {:>14} {:>16}  {}",
                    d["name"].as_str().unwrap_or(""),
                    human_bytes(d["size"].as_f64().unwrap_or(0.0)),
                    human_bytes(d["resync_pending_bytes"].as_f64().unwrap_or(0.0)),
                    d["path"].as_str().unwrap_or("")
                );
            }
            if let Some(e) = v["link_error"].as_str() {
                println!("link: {e}");
            }
            let p = &v["points"];
            println!(
                "tags: crash {} (last seq {})  app {} (last seq {}, {} failed)  group {} committed, {} aborted",
                p["crash_tags"],
                p["last_crash_tag_seq"],
                p["app_tags"],
                p["last_app_tag_seq"],
                p["app_failures"],
                p["group_commits"],
                p["group_aborts"]
            );
            for e in v["events"].as_array().into_iter().flatten().rev().take(5) {
                println!("event {}: {}", e["kind"].as_str().unwrap_or(""), e["message"].as_str().unwrap_or(""));
            }
        }
        Some("process-server") => {
            println!(
                "cache {} of {} used, {}% free, throttling {}",
                human_bytes(v["spool_bytes"].as_f64().unwrap_or(0.0)),
                human_bytes(v["cache_capacity_bytes"].as_f64().unwrap_or(0.0)),
                f("free_percent"),
                f("throttling")
            );
            println!(
                "{:<16} {:>6} {:>6} {:>10} {:>10} {:>10} {:>10} {:>12} {:>8}",
                "MACHINE", "AGENT", "MT", "SPOOLED", "FORWARDED", "MT-DURABLE", "APPLIED", "SPOOL", "LAG"
            );
            for m in v["machines"].as_array().into_iter().flatten() {
                println!(
                    "{:<16} {:>6} {:>6} {:>10} {:>10} {:>10} {:>10} {:>12} {:>7.1}s",
                    m["machine"].as_str().unwrap_or(""),
                    m["agent_connected"].to_string(),
                    m["master_target_connected"].to_string(),
                    m["spooled_seq"].to_string(),
                    m["forwarded_seq"].to_string(),
                    m["target_durable_seq"].to_string(),
                    m["applied_seq"].to_string(),
                    human_bytes(m["spool_bytes"].as_f64().unwrap_or(0.0)),
                    m["lag_seconds"].as_f64().unwrap_or(0.0)
                );
            }
        }
        Some("master-target") => {
            println!(
                "{:<16} {:>10} {:>10} {:>11} {:>12} {:>8}  MODE",
                "MACHINE", "JOURNALED", "APPLIED", "CONSISTENT", "JOURNAL", "LAG"
            );
            for m in v["machines"].as_array().into_iter().flatten() {
                println!(
                    "{:<16} {:>10} {:>10} {:>11} {:>12} {:>7.1}s  {}",
                    m["machine"].as_str().unwrap_or(""),
                    m["journaled_seq"].to_string(),
                    m["applied_seq"].to_string(),
                    m["consistent"].to_string(),
                    human_bytes(m["journal_bytes"].as_f64().unwrap_or(0.0)),
                    m["lag_seconds"].as_f64().unwrap_or(0.0),
                    m["mode"].as_str().unwrap_or("")
                );
                for d in m["disks"].as_array().into_iter().flatten() {
                    println!(
                        "  disk {:<10} {:>12}  {}",
                        d["name"].as_str().unwrap_or(""),
                        human_bytes(d["size"].as_f64().unwrap_or(0.0)),
                        d["target"].as_str().unwrap_or("")
                    );
                }
                let r = &m["retention"];
                println!(
                    "  recovery points {}  newest {}  history from seq {}  window {}s  base {}  volume free {}",
                    m["points"],
                    m["newest_point"]["id"].as_str().unwrap_or("none"),
                    r["base_seq"],
                    r["window_secs"],
                    human_bytes(r["base_bytes"].as_f64().unwrap_or(0.0)),
                    human_bytes(r["volume_free_bytes"].as_f64().unwrap_or(0.0)),
                );
                if let Some(p) = r["pruning_paused"].as_str() {
                    println!("  {p}");
                }
                if let Some(e) = m["error"].as_str() {
                    println!("  ERROR: {e}");
                }
                for e in m["events"].as_array().into_iter().flatten().rev().take(3) {
                    println!("  event {}: {}", e["kind"].as_str().unwrap_or(""), e["message"].as_str().unwrap_or(""));
                }
            }
        }
        _ => println!("{}", serde_json::to_string_pretty(v).unwrap_or_default()),
    }
}

fn time_of(ms: u64) -> String {
    // UTC, seconds precision, without a date library: days since the epoch to a civil date.
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}Z", rem / 3600, rem % 3600 / 60, rem % 60)
}

/// Recovery points of a machine (or of a group) as a table.
pub fn print_points(v: &serde_json::Value, out: OutputFormat) {
    if matches!(out, OutputFormat::Json) {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        return;
    }
    if let Some(g) = v["group"].as_str() {
        println!("group {g}: {} multi-machine point(s)", v["points"].as_array().map(|a| a.len()).unwrap_or(0));
        for p in v["points"].as_array().into_iter().flatten() {
            println!(
                "  {}  {}  {}  {}",
                p["id"].as_str().unwrap_or("?"),
                time_of(p["time_ms"].as_u64().unwrap_or(0)),
                p["kind"].as_str().unwrap_or("?"),
                p["members"]
            );
        }
    } else {
        println!(
            "{:<28} {:<21} {:<6} {:<7} {:>12} {:>16}  ORIGIN",
            "ID", "TIME (UTC)", "KIND", "SCOPE", "SEQ", "GENERATION"
        );
        for p in v["points"].as_array().into_iter().flatten() {
            println!(
                "{:<28} {:<21} {:<6} {:<7} {:>12} {:>16}  {}{}",
                p["id"].as_str().unwrap_or("?"),
                time_of(p["time_ms"].as_u64().unwrap_or(0)),
                p["kind"].as_str().unwrap_or("?"),
                p["scope"].as_str().unwrap_or("?"),
                p["seq"].to_string(),
                format!("{:016x}", p["generation"].as_u64().unwrap_or(0)),
                p["origin"].as_str().unwrap_or("?"),
                p["group_tag"].as_str().map(|t| format!(" ({t})")).unwrap_or_default(),
            );
        }
        if let Some(sel) = v["selectors"].as_object() {
            for (k, id) in sel {
                if k != "latest" {
                    println!("{k:<18} {}", id.as_str().unwrap_or("none"));
                }
            }
        }
    }
    for p in v["problems"].as_array().into_iter().flatten() {
        println!("PROBLEM: {}", p.as_str().unwrap_or(""));
    }
}

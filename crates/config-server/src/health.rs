//! Heartbeats and health. Components post their status; health is Healthy / Warning / Critical
//! with reasons: a heartbeat missing longer than the threshold raises 806 (process server),
//! 78174 (source machine's agent) or 78022 (master target); a process-server cache below 25 %
//! free is critical; an agent's replication lag above its policy's RPO threshold is a warning
//! (POL-1: an alert only). Transitions are recorded as events.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;
use serde::Deserialize;

use crate::errors::{self, ApiError};
use crate::http::{Body, Caller, Role};
use crate::model::{self, Policy};
use crate::registration::{check_kind, Component, COMPONENT};
use crate::AppState;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    pub kind: String,
    pub name: String,
    #[serde(default)]
    pub status: serde_json::Value,
    #[serde(default)]
    pub policy: Option<String>,
}

pub async fn heartbeat(
    State(s): State<Arc<AppState>>,
    c: Caller,
    Body(h): Body<Heartbeat>,
) -> Result<Json<serde_json::Value>, ApiError> {
    if c.role == Role::Component && c.token_name != format!("{}/{}", h.kind, h.name) {
        return Err(ApiError::new(
            axum::http::StatusCode::FORBIDDEN,
            errors::FORBIDDEN,
            format!("token {:?} may only send heartbeats for itself, not {}/{}", c.token_name, h.kind, h.name),
        ));
    }
    if c.role == Role::Reader {
        return Err(ApiError::new(
            axum::http::StatusCode::FORBIDDEN,
            errors::FORBIDDEN,
            "a reader token cannot send heartbeats",
        ));
    }
    check_kind(&h.kind)?;
    model::check_name("component", &h.name)?;
    let key = format!("{}/{}", h.kind, h.name);
    let old = s.store.get::<Component>(COMPONENT, &key).await?;
    let restored = s.store.setting("restored_from_backup_ms").await?;
    // Each restore is reconciled once per component: its first heartbeat after the restore.
    let fresh = restored.is_some() && old.as_ref().is_none_or(|d| d.body.reconciled_restore != restored);
    if fresh {
        // After a restore, what components report is the truth: say where the records differ.
        match &old {
            None => {
                s.store
                    .add_event(
                        0,
                        "warning",
                        &key,
                        &format!(
                            "{key} reports in but is not in the restored configuration: it was added after the backup"
                        ),
                    )
                    .await?;
            }
            Some(d)
                if d.body.last_seen_ms.is_some()
                    && d.body.status.get("applied_seq") != h.status.get("applied_seq")
                    && h.status.get("applied_seq").is_some() =>
            {
                s.store
                    .add_event(
                        0,
                        "info",
                        &key,
                        &format!(
                            "{key} moved on since the backup (applied seq {} → {})",
                            d.body.status["applied_seq"], h.status["applied_seq"]
                        ),
                    )
                    .await?;
            }
            _ => {}
        }
    }
    let mut comp = old.map(|d| d.body).unwrap_or(Component {
        kind: h.kind.clone(),
        name: h.name.clone(),
        registered_ms: None,
        last_seen_ms: None,
        status: serde_json::Value::Null,
        policy: None,
        reconciled_restore: None,
    });
    comp.reconciled_restore = restored;
    comp.last_seen_ms = Some(crate::jobs::now_ms());
    comp.status = h.status;
    if h.policy.is_some() {
        comp.policy = h.policy;
    }
    s.store.put(COMPONENT, &key, &comp, None).await?;
    Ok(Json(serde_json::json!({ "ok": true })))
}

/// Health of one component now.
pub async fn health_of(s: &AppState, c: &Component) -> (String, Vec<serde_json::Value>) {
    let mut reasons = Vec::new();
    let mut level = 0; // 0 healthy, 1 warning, 2 critical
    let now = crate::jobs::now_ms();
    let timeout_ms = (s.config.heartbeat_timeout_secs * 1000.0) as u64;
    match c.last_seen_ms {
        Some(t) if now.saturating_sub(t) <= timeout_ms => {}
        seen => {
            let code = match c.kind.as_str() {
                "process-server" => errors::PS_HEARTBEAT_LOST,
                "master-target" => errors::MT_HEARTBEAT_LOST,
                _ => errors::SOURCE_HEARTBEAT_LOST,
            };
            let age = seen
                .map(|t| format!("{:.0} s ago", now.saturating_sub(t) as f64 / 1000.0))
                .unwrap_or_else(|| "never".into());
            reasons.push(serde_json::json!({ "code": code.code, "message": format!("{}: last heartbeat {age}", code.meaning), "remedy": code.remedy }));
            level = 2;
        }
    }
    if c.kind == "process-server" {
        let free = c.status.get("cache_free_percent").or_else(|| c.status.get("free_percent")).and_then(|v| v.as_f64());
        if let Some(free) = free {
            if free < 25.0 {
                reasons.push(serde_json::json!({ "code": errors::CHURN_BEYOND_LIMITS.code, "message": format!("process-server cache is {free:.0}% free (below 25%)"), "remedy": "add cache space or process-server capacity; replication is throttled below 20%" }));
                level = 2;
            }
        }
        // A machine whose changes cannot reach its master target (link cut, target down).
        for m in c.status["machines"].as_array().into_iter().flatten() {
            if m["master_target_connected"] == false && m["spool_bytes"].as_u64().unwrap_or(0) > 0 {
                let why = m["master_target_error"].as_str().unwrap_or("not connected");
                reasons.push(serde_json::json!({ "code": 0, "message": format!("changes of {} wait in the cache: the master target is unreachable ({why})", m["machine"].as_str().unwrap_or("?")), "remedy": "check the link between the sites and that the master target runs" }));
                level = level.max(1);
            }
        }
    }
    if c.kind == "agent" {
        if let Some(lag) = c.status.get("lag_seconds").and_then(|v| v.as_f64()) {
            // The policy from the heartbeat, else the one protection set in the agent's settings.
            let name = match &c.policy {
                Some(p) => Some(p.clone()),
                None => s
                    .store
                    .get::<serde_json::Map<String, serde_json::Value>>(
                        crate::settings::SETTINGS,
                        &format!("agent/{}", c.name),
                    )
                    .await
                    .ok()
                    .flatten()
                    .and_then(|d| d.body.get("policy").and_then(|p| p.as_str()).map(str::to_owned)),
            };
            let policy = match &name {
                Some(p) => s.store.get::<Policy>(model::POLICY, p).await.ok().flatten().map(|d| d.body),
                None => None,
            };
            let rpo = policy.map(|p| p.rpo_threshold_secs as f64).unwrap_or(s.config.default_rpo_threshold_secs);
            if lag > rpo {
                reasons.push(serde_json::json!({ "code": 0, "message": format!("replication lag {lag:.0} s is above the RPO threshold of {rpo:.0} s (an alert only: replication is unchanged)"), "remedy": "check the link to the process server and the churn" }));
                level = level.max(1);
            }
        }
    }
    let name = ["healthy", "warning", "critical"][level].to_owned();
    (name, reasons)
}

pub async fn components(State(s): State<Arc<AppState>>, c: Caller) -> Result<Json<Vec<serde_json::Value>>, ApiError> {
    if c.role < Role::Reader {
        return Err(ApiError::new(
            axum::http::StatusCode::FORBIDDEN,
            errors::FORBIDDEN,
            "component tokens cannot list components",
        ));
    }
    let mut out = Vec::new();
    for d in s.store.list::<Component>(COMPONENT).await? {
        let (health, reasons) = health_of(&s, &d.body).await;
        let mut v = serde_json::to_value(&d.body).unwrap_or_default();
        v["health"] = health.into();
        v["reasons"] = reasons.into();
        out.push(v);
    }
    Ok(Json(out))
}

/// Health transitions become events (checked every `health_interval_secs`).
pub async fn watch(s: Arc<AppState>, shutdown: tokio_util::sync::CancellationToken) {
    let mut last: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs_f64(s.config.health_interval_secs.max(0.1))) => {}
        }
        let Ok(comps) = s.store.list::<Component>(COMPONENT).await else { continue };
        for d in comps {
            let (health, reasons) = health_of(&s, &d.body).await;
            let prev = last.insert(d.id.clone(), health.clone());
            if prev.as_deref() != Some(health.as_str()) && (prev.is_some() || health != "healthy") {
                let code = reasons.first().and_then(|r| r["code"].as_i64()).unwrap_or(0);
                let why: Vec<_> = reasons.iter().filter_map(|r| r["message"].as_str()).collect();
                let msg = format!(
                    "{} is {health}{}",
                    d.id,
                    if why.is_empty() { String::new() } else { format!(": {}", why.join("; ")) }
                );
                let _ = s.store.add_event(code, &health, &d.id, &msg).await;
            }
        }
    }
}

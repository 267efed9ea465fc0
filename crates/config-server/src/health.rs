//! Heartbeats and health. Components post their status; health is Healthy / Warning / Critical
//! with reasons: a heartbeat missing longer than the threshold raises 806 (process server),
//! 78174 (source machine's agent) or 78022 (master target); a process-server cache below 25 %
//! free is critical; an agent's replication lag above its policy's RPO threshold is a warning
//! (POL-1: an alert only). Transitions are recorded as events.

use std::sync::Arc;

use axum::extract::State;
use axum::Json;

use crate::errors::{self, ApiError};
use crate::http::{Body, Caller, Role};
use crate::model::{self, Policy};
use crate::registration::{Component, COMPONENT};
use crate::AppState;
use ferry_api::control::{
    ComponentHealth, ComponentKind, ComponentSettings, ComponentStatus, Health, HealthReason, HeartbeatAck,
};

pub use ferry_api::control::Heartbeat;

pub async fn heartbeat(
    State(s): State<Arc<AppState>>,
    c: Caller,
    Body(h): Body<Heartbeat>,
) -> Result<Json<HeartbeatAck>, ApiError> {
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
    model::check_name("component", &h.name)?;
    if let Some(st) = &h.status {
        if st.kind() != h.kind {
            return Err(ApiError::bad(format!(
                "a heartbeat of kind {} carries the status of a {}: send the component's own status",
                h.kind,
                st.kind()
            )));
        }
    }
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
                    && applied_seq(d.body.status.as_ref()) != applied_seq(h.status.as_ref())
                    && applied_seq(h.status.as_ref()).is_some() =>
            {
                s.store
                    .add_event(
                        0,
                        "info",
                        &key,
                        &format!(
                            "{key} moved on since the backup (applied seq {} → {})",
                            applied_seq(d.body.status.as_ref()).unwrap_or(0),
                            applied_seq(h.status.as_ref()).unwrap_or(0)
                        ),
                    )
                    .await?;
            }
            _ => {}
        }
    }
    update_component(&s, h.kind, &h.name, |comp| {
        comp.reconciled_restore = restored.clone();
        let now = crate::jobs::now_ms();
        comp.last_seen_ms = Some(now);
        if let Some(clock) = h.status.as_ref().and_then(|s| s.agent()).map(|a| a.clock_ms).filter(|c| *c > 0) {
            comp.clock_offset_ms = Some(clock as i64 - now as i64);
        }
        comp.status = h.status.clone();
        if h.policy.is_some() {
            comp.policy = h.policy.clone();
        }
    })
    .await?;
    let authority_epoch = crate::authority::load(&s.store, crate::authority::AUTHORITY).await?.map(|a| a.epoch);
    Ok(Json(HeartbeatAck { ok: true, authority_epoch }))
}

/// Read, change and write a component's record (created when absent) compare-and-set, retried:
/// a heartbeat and a registration at once must not undo each other (a heartbeat writing back an
/// older certificate serial would keep the newer certificate out of the next revocation).
/// Returns the record as it was before `change`.
pub(crate) async fn update_component(
    s: &AppState,
    kind: ComponentKind,
    name: &str,
    mut change: impl FnMut(&mut Component),
) -> Result<Option<Component>, ApiError> {
    let key = format!("{kind}/{name}");
    for _ in 0..16 {
        let old = s.store.get::<Component>(COMPONENT, &key).await?;
        let revision = old.as_ref().map_or(0, |d| d.revision);
        let before = old.map(|d| d.body);
        let mut comp = before.clone().unwrap_or_else(|| Component::new(kind, name));
        change(&mut comp);
        match s.store.put(COMPONENT, &key, &comp, Some(revision)).await {
            Ok(_) => return Ok(before),
            Err(ferry_store::StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::conflict(format!("{key} is being changed by many requests at once: try again")))
}

/// What a component reports as applied (agents: at the master target; master targets: the
/// highest of their replicas).
fn applied_seq(st: Option<&ComponentStatus>) -> Option<u64> {
    match st? {
        ComponentStatus::Agent(a) => Some(a.applied_seq),
        ComponentStatus::MasterTarget(m) => m.machines.iter().map(|r| r.applied_seq).max(),
        ComponentStatus::ProcessServer(p) => p.machines.iter().map(|m| m.applied_seq).max(),
        ComponentStatus::MobilityService(_) => None,
    }
}

/// Health of one component now.
pub async fn health_of(s: &AppState, c: &Component) -> (Health, Vec<HealthReason>) {
    let mut reasons = Vec::new();
    let mut level = Health::Healthy;
    let now = crate::jobs::now_ms();
    let timeout_ms = (s.config.heartbeat_timeout_secs * 1000.0) as u64;
    match c.last_seen_ms {
        Some(t) if now.saturating_sub(t) <= timeout_ms => {}
        seen => {
            let code = match c.kind {
                ComponentKind::ProcessServer => errors::PS_HEARTBEAT_LOST,
                ComponentKind::MasterTarget => errors::MT_HEARTBEAT_LOST,
                ComponentKind::Agent => errors::SOURCE_HEARTBEAT_LOST,
            };
            let age = seen
                .map(|t| format!("{:.0} s ago", now.saturating_sub(t) as f64 / 1000.0))
                .unwrap_or_else(|| "never".into());
            reasons.push(HealthReason {
                code: code.code,
                message: format!("{}: last heartbeat {age}", code.meaning),
                remedy: code.remedy.into(),
            });
            level = Health::Critical;
        }
    }
    if let Some(ps) = c.status.as_ref().and_then(|st| st.process_server()) {
        if ps.free_percent < 25 {
            reasons.push(HealthReason {
                code: errors::CHURN_BEYOND_LIMITS.code,
                message: format!("process-server cache is {}% free (below 25%)", ps.free_percent),
                remedy: "add cache space or process-server capacity; replication is throttled below 20%".into(),
            });
            level = Health::Critical;
        }
        // A machine whose changes cannot reach its master target (link cut, target down).
        for m in &ps.machines {
            if !m.master_target_connected && m.spool_bytes > 0 {
                let why = m.master_target_error.as_deref().unwrap_or("not connected");
                reasons.push(HealthReason {
                    code: 0,
                    message: format!(
                        "changes of {} wait in the cache: the master target is unreachable ({why})",
                        m.machine
                    ),
                    remedy: "check the link between the sites and that the master target runs".into(),
                });
                level = level.max(Health::Warning);
            }
        }
    }
    // A disabled protection has no lag to alert on: nothing ships by design.
    let agent = c.status.as_ref().and_then(|st| st.agent()).filter(|a| a.mode != ferry_api::agent::Mode::Disabled);
    if let Some(agent) = agent {
        let lag = agent.lag_seconds;
        // The policy from the heartbeat, else the one protection set in the agent's settings.
        let name = match &c.policy {
            Some(p) => Some(p.clone()),
            None => s
                .store
                .get::<ComponentSettings>(crate::settings::SETTINGS, &format!("agent/{}", c.name))
                .await
                .ok()
                .flatten()
                .and_then(|d| d.body.policy),
        };
        let policy = match &name {
            Some(p) => s.store.get::<Policy>(model::POLICY, p).await.ok().flatten().map(|d| d.body),
            None => None,
        };
        let rpo = policy.map(|p| p.rpo_threshold_secs as f64).unwrap_or(s.config.default_rpo_threshold_secs);
        if lag > rpo {
            reasons.push(HealthReason {
                code: 0,
                message: format!(
                    "replication lag {lag:.0} s is above the RPO threshold of {rpo:.0} s (an alert only: replication is unchanged)"
                ),
                remedy: "check the link to the process server and the churn".into(),
            });
            level = level.max(Health::Warning);
        }
    }
    (level, reasons)
}

pub async fn components(State(s): State<Arc<AppState>>, c: Caller) -> Result<Json<Vec<ComponentHealth>>, ApiError> {
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
        out.push(ComponentHealth { component: d.body, health, reasons });
    }
    Ok(Json(out))
}

/// Health transitions become events (checked every `health_interval_secs`).
pub async fn watch(s: Arc<AppState>, shutdown: tokio_util::sync::CancellationToken) {
    let mut last: std::collections::HashMap<String, Health> = std::collections::HashMap::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(std::time::Duration::from_secs_f64(s.config.health_interval_secs.max(0.1))) => {}
        }
        let Ok(comps) = s.store.list::<Component>(COMPONENT).await else { continue };
        for d in comps {
            let (health, reasons) = health_of(&s, &d.body).await;
            let prev = last.insert(d.id.clone(), health);
            if prev != Some(health) && (prev.is_some() || health != Health::Healthy) {
                let code = reasons.first().map(|r| i64::from(r.code)).unwrap_or(0);
                let why: Vec<_> = reasons.iter().map(|r| r.message.as_str()).collect();
                let msg = format!(
                    "{} is {}{}",
                    d.id,
                    health.as_str(),
                    if why.is_empty() { String::new() } else { format!(": {}", why.join("; ")) }
                );
                let _ = s.store.add_event(code, health.as_str(), &d.id, &msg).await;
            }
        }
    }
}

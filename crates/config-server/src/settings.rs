//! Component settings: what the server stores for each component (`PUT`), and what a component
//! gets (`GET`): the stored keys plus those the server derives (policy intervals, retention
//! windows, routes).

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;

use crate::errors::{self, ApiError};
use crate::http::{ok, ApiResult, Body, Caller, Role};
use crate::model::{self, Policy};
use crate::AppState;

pub const SETTINGS: &str = "component-settings";

/// Keys the server derives and a component may not be given directly.
fn effective_settings(
    kind: &str,
    name: &str,
    stored: &serde_json::Map<String, serde_json::Value>,
    policies: &std::collections::HashMap<String, Policy>,
    all: &[(String, serde_json::Map<String, serde_json::Value>)],
) -> serde_json::Value {
    let mut out = stored.clone();
    out.remove("policy");
    if kind == "agent" {
        if let Some(p) = stored.get("policy").and_then(|p| p.as_str()).and_then(|p| policies.get(p)) {
            out.entry("crash_point_interval_secs").or_insert(p.crash_consistent_secs.into());
            out.entry("app_point_interval_secs").or_insert(p.app_consistent_secs.into());
        }
    }
    if kind == "master-target" {
        // Each machine's retention window comes from its agent's policy.
        let mut windows = serde_json::Map::new();
        for (id, agent) in all.iter().filter(|(id, _)| id.starts_with("agent/")) {
            let machine = agent.get("machine").and_then(|m| m.as_str()).unwrap_or(&id["agent/".len()..]).to_owned();
            if let Some(p) = agent.get("policy").and_then(|p| p.as_str()).and_then(|p| policies.get(p)) {
                windows.insert(machine, (p.retention_secs as f64).into());
            }
        }
        // Set explicitly (protection writes each machine's) wins over what policies imply.
        if let Some(serde_json::Value::Object(set)) = stored.get("machine_retention_secs") {
            windows.extend(set.clone());
        }
        if !windows.is_empty() {
            out.insert("machine_retention_secs".into(), serde_json::Value::Object(windows));
        }
    }
    let _ = name;
    serde_json::Value::Object(out)
}

pub(crate) async fn get_settings(
    State(s): State<Arc<AppState>>,
    c: Caller,
    Path((kind, name)): Path<(String, String)>,
) -> ApiResult {
    crate::registration::check_kind(&kind)?;
    model::check_name("component", &name)?;
    let own = c.role == Role::Component && c.token_name == format!("{kind}/{name}");
    if !own && c.role < Role::Reader {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            errors::FORBIDDEN,
            format!("token {:?} may read only its own settings", c.token_name),
        ));
    }
    let all: Vec<(String, serde_json::Map<String, serde_json::Value>)> = s
        .store
        .list::<serde_json::Map<String, serde_json::Value>>(SETTINGS)
        .await?
        .into_iter()
        .map(|d| (d.id, d.body))
        .collect();
    let policies: std::collections::HashMap<String, Policy> =
        s.store.list::<Policy>(model::POLICY).await?.into_iter().map(|d| (d.id, d.body)).collect();
    let key = format!("{kind}/{name}");
    let stored = all.iter().find(|(id, _)| *id == key).map(|(_, b)| b.clone()).unwrap_or_default();
    ok(effective_settings(&kind, &name, &stored, &policies, &all))
}

pub(crate) async fn put_settings(
    State(s): State<Arc<AppState>>,
    c: Caller,
    Path((kind, name)): Path<(String, String)>,
    Body(v): Body<serde_json::Map<String, serde_json::Value>>,
) -> ApiResult {
    c.need(Role::Operator)?;
    crate::registration::check_kind(&kind)?;
    model::check_name("component", &name)?;
    for k in ["tls", "config_server", "state_dir", "cache_dir", "datastore", "retention"] {
        if v.contains_key(k) {
            return Err(ApiError::bad(format!(
                "{k} is local to the component's host and stays in its own file (the server sets peers, disks and policies)"
            )));
        }
    }
    if let Some(p) = v.get("policy") {
        let p = p.as_str().ok_or_else(|| ApiError::bad("policy must be a policy name"))?;
        if s.store.get::<Policy>(model::POLICY, p).await?.is_none() {
            return Err(ApiError::bad(format!("policy {p} does not exist")));
        }
    }
    s.store.put(SETTINGS, &format!("{kind}/{name}"), &v, None).await?;
    ok(serde_json::Value::Object(v))
}

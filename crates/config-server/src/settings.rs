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
use ferry_api::control::{setting_access, ComponentKind, ComponentSettings, SettingAccess};

pub const SETTINGS: &str = "component-settings";

/// What a component gets: its stored settings, minus the policy name, plus what the server derives
/// (an agent's tag intervals from its policy; a master target's retention window per machine from
/// each machine's agent policy, unless protection set one).
fn effective_settings(
    kind: ComponentKind,
    stored: &ComponentSettings,
    policies: &std::collections::HashMap<String, Policy>,
    all: &[(String, ComponentSettings)],
) -> ComponentSettings {
    let mut out = stored.clone();
    out.policy = None;
    if kind == ComponentKind::Agent {
        if let Some(p) = stored.policy.as_ref().and_then(|p| policies.get(p)) {
            out.crash_point_interval_secs.get_or_insert(p.crash_consistent_secs as f64);
            out.app_point_interval_secs.get_or_insert(p.app_consistent_secs as f64);
            // A replication group's coordinator takes its multi-machine tags as often as the
            // policy takes a machine's points (unless protection set otherwise).
            if let Some(g) = out.group.as_mut().filter(|g| g.coordinator) {
                g.crash_interval_secs.get_or_insert(p.crash_consistent_secs as f64);
                g.app_interval_secs.get_or_insert(p.app_consistent_secs as f64);
            }
        }
    }
    if kind == ComponentKind::MasterTarget {
        // Each machine's retention window comes from its agent's policy.
        let mut windows = std::collections::BTreeMap::new();
        for (id, agent) in all {
            let Some(machine) = id.strip_prefix("agent/") else { continue };
            if let Some(p) = agent.policy.as_ref().and_then(|p| policies.get(p)) {
                windows.insert(machine.to_owned(), p.retention_secs as f64);
            }
        }
        // Set explicitly (protection writes each machine's) wins over what policies imply.
        if let Some(set) = &stored.machine_retention_secs {
            windows.extend(set.clone());
        }
        if !windows.is_empty() {
            out.machine_retention_secs = Some(windows);
        }
    }
    out
}

pub(crate) async fn get_settings(
    State(s): State<Arc<AppState>>,
    c: Caller,
    Path((kind, name)): Path<(String, String)>,
) -> ApiResult {
    let kind = crate::registration::check_kind(&kind)?;
    model::check_name("component", &name)?;
    let own = c.role == Role::Component && c.token_name == format!("{kind}/{name}");
    if !own && c.role < Role::Reader {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            errors::FORBIDDEN,
            format!("token {:?} may read only its own settings", c.token_name),
        ));
    }
    let all: Vec<(String, ComponentSettings)> =
        s.store.list::<ComponentSettings>(SETTINGS).await?.into_iter().map(|d| (d.id, d.body)).collect();
    let policies: std::collections::HashMap<String, Policy> =
        s.store.list::<Policy>(model::POLICY).await?.into_iter().map(|d| (d.id, d.body)).collect();
    let key = format!("{kind}/{name}");
    let stored = all.iter().find(|(id, _)| *id == key).map(|(_, b)| b.clone()).unwrap_or_default();
    let mut effective = effective_settings(kind, &stored, &policies, &all);
    let revoked = crate::revocation::revoked_serials(&s).await?;
    effective.revoked_certificates = (!revoked.is_empty()).then_some(revoked);
    // The coordinator's key is its own: readers and operators see that one is set, not what it is.
    effective.authority_epoch = crate::authority::load(&s.store, crate::authority::AUTHORITY).await?.map(|a| a.epoch);
    ok(if own { effective } else { effective.without_secrets() })
}

pub(crate) async fn put_settings(
    State(s): State<Arc<AppState>>,
    c: Caller,
    Path((kind, name)): Path<(String, String)>,
    Body(v): Body<ComponentSettings>,
) -> ApiResult {
    let kind = crate::registration::check_kind(&kind)?;
    model::check_name("component", &name)?;
    // An allow-list per kind and role: no token makes a component run a command of its choosing,
    // or read or write files, ports or peers other than those its host or the server's own jobs
    // gave it.
    for k in v.keys() {
        match setting_access(kind, k) {
            None => {
                return Err(ApiError::bad(format!(
                    "a {kind} has no setting {k:?} that may be set through the API (see docs/operator.md)"
                )))
            }
            Some(SettingAccess::Never) => {
                return Err(ApiError::bad(format!(
                    "{k} is never taken from a settings request: it is a path, address, peer or identity that stays in the component's own file or that the server derives from inventory in its own jobs (protect, failover)"
                )))
            }
            Some(SettingAccess::Admin) if c.role != Role::Admin => {
                return Err(ApiError::new(
                    StatusCode::FORBIDDEN,
                    errors::FORBIDDEN,
                    format!("{k} makes the {kind} run a command: only an admin may set it"),
                ))
            }
            Some(_) => {}
        }
    }
    // Keys passed through are range-checked here too: the component would refuse them at its
    // next start.
    for (k, value) in &v.other {
        let n = value.as_f64();
        let bad = if k.ends_with("_secs") {
            n.map(ferry_types::bounds::check_secs).map(|r| r.err())
        } else if k.ends_with("_percent") {
            n.map(ferry_types::bounds::check_percent).map(|r| r.err())
        } else if k == "batch_bytes" || k == "forward_batch_bytes" {
            let (min, max) = ferry_types::bounds::BATCH_BYTES;
            value.as_u64().map(|b| ferry_types::bounds::check_range(k, b, min, max).err())
        } else {
            Some(None)
        };
        match bad {
            None => return Err(ApiError::bad(format!("{k} must be a number"))),
            Some(Some(why)) => return Err(ApiError::bad(format!("{k}: {why}"))),
            Some(None) => {}
        }
    }
    if let Some(p) = &v.policy {
        if s.store.get::<Policy>(model::POLICY, p).await?.is_none() {
            return Err(ApiError::bad(format!("policy {p} does not exist")));
        }
    }
    // Read-modify-write under compare-and-set: the keys the server's own jobs wrote stay.
    let key = format!("{kind}/{name}");
    for _ in 0..20 {
        let cur = s.store.get::<ComponentSettings>(SETTINGS, &key).await?;
        let (stored, rev) = cur.map(|d| (d.body, d.revision)).unwrap_or_default();
        let new = v.clone().keeping_server_keys(kind, &stored);
        match s.store.put(SETTINGS, &key, &new, Some(rev)).await {
            Ok(_) => return ok(new.without_secrets()),
            Err(ferry_store::StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.into()),
        }
    }
    Err(ApiError::conflict(format!("the settings of {key} kept changing: retry")))
}

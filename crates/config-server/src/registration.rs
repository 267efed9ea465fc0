//! Registration of data-path components: the component makes its key and a certificate request
//! locally, proves it knows the registration passphrase, and receives a certificate signed by the
//! server's CA plus a `component` token for heartbeats. Private keys never leave their host.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};

use crate::api::{hash_token, new_token, Body};
use crate::errors::{self, ApiError};
use crate::AppState;

pub const COMPONENT: &str = "component";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    /// `agent`, `process-server` or `master-target`.
    pub kind: String,
    pub name: String,
    pub passphrase: String,
    /// PEM certificate request.
    pub csr: String,
}

/// What the server knows of a component (registration, then heartbeats).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Component {
    pub kind: String,
    pub name: String,
    pub registered_ms: Option<u64>,
    pub last_seen_ms: Option<u64>,
    #[serde(default)]
    pub status: serde_json::Value,
    /// Replication policy the component runs with (agents), for RPO alerts.
    #[serde(default)]
    pub policy: Option<String>,
}

pub fn check_kind(kind: &str) -> Result<(), ApiError> {
    if matches!(kind, "agent" | "process-server" | "master-target") {
        Ok(())
    } else {
        Err(ApiError::bad(format!("kind {kind:?} is not agent, process-server or master-target")))
    }
}

pub async fn register(
    State(s): State<Arc<AppState>>,
    Body(r): Body<RegisterRequest>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    check_kind(&r.kind)?;
    crate::model::check_name("component", &r.name)?;
    let refused = |m: &str| ApiError::new(StatusCode::FORBIDDEN, errors::REGISTRATION_REFUSED, m.to_owned());
    let expected = s.store.setting("registration_passphrase_hash").await?;
    // Compare hashes (fixed length) rather than the secrets themselves.
    if expected.as_deref() != Some(hash_token(&r.passphrase).as_str()) {
        return Err(refused("wrong registration passphrase"));
    }
    let tls = s.tls_dir.clone();
    let csr = r.csr.clone();
    let cert = tokio::task::spawn_blocking(move || ferry_tls::sign_csr(&tls, &csr))
        .await
        .map_err(|e| refused(&e.to_string()))?
        .map_err(|e| refused(&format!("the certificate request is invalid: {e}")))?;
    let token = new_token();
    let id = format!("tok-{:08x}", rand::random::<u32>());
    s.store.add_token(&id, &hash_token(&token), &format!("{}/{}", r.kind, r.name), "component").await?;
    let key = format!("{}/{}", r.kind, r.name);
    let mut comp = s.store.get::<Component>(COMPONENT, &key).await?.map(|d| d.body).unwrap_or(Component {
        kind: r.kind.clone(),
        name: r.name.clone(),
        registered_ms: None,
        last_seen_ms: None,
        status: serde_json::Value::Null,
        policy: None,
    });
    comp.registered_ms = Some(crate::jobs::now_ms());
    s.store.put(COMPONENT, &key, &comp, None).await?;
    s.store.add_event(0, "info", &key, &format!("{} {} registered", r.kind, r.name)).await?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({ "certificate": cert, "ca": s.ca_pem, "token": token, "token_id": id })),
    ))
}

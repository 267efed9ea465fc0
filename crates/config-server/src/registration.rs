//! Registration of data-path components: the component makes its key and a certificate request
//! locally, proves it knows the registration passphrase, and receives a certificate signed by the
//! server's CA plus a `component` token for heartbeats. Private keys never leave their host.

use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::Json;

use crate::errors::{self, ApiError};
use crate::http::{hash_token, new_token, Body};
use crate::AppState;
use ferry_api::control::ComponentKind;

pub const COMPONENT: &str = "component";

pub use ferry_api::config_server::RegisterRequest;

/// Registered certificates are valid this long; registering again renews.
pub const CERT_DAYS: u32 = 825;

pub use ferry_api::control::Component;

/// A component kind from a URL or a body.
pub fn check_kind(kind: &str) -> Result<ComponentKind, ApiError> {
    ComponentKind::parse(kind)
        .ok_or_else(|| ApiError::bad(format!("kind {kind:?} is not agent, process-server or master-target")))
}

pub async fn register(
    State(s): State<Arc<AppState>>,
    Body(r): Body<RegisterRequest>,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    crate::model::check_name("component", &r.name)?;
    for h in &r.hosts {
        let valid =
            !h.is_empty() && h.len() <= 253 && h.chars().all(|c| c.is_ascii_alphanumeric() || ".-:".contains(c));
        if !valid || h == "config-server" {
            return Err(ApiError::bad(format!("host {h:?} is not a host name or address")));
        }
    }
    let refused = |m: &str| ApiError::new(StatusCode::FORBIDDEN, errors::REGISTRATION_REFUSED, m.to_owned());
    // Guessing is throttled: after 10 failures within a minute, attempts are refused until the
    // oldest of them is a minute old (a sliding window).
    let now = crate::jobs::now_ms();
    {
        let mut f = s.registration_failures.lock().unwrap_or_else(|p| p.into_inner());
        while f.front().is_some_and(|t| now.saturating_sub(*t) > 60_000) {
            f.pop_front();
        }
        if f.len() >= 10 {
            return Err(ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                errors::REGISTRATION_REFUSED,
                "too many failed registrations: wait a minute",
            ));
        }
    }
    let expected = s.store.setting("registration_passphrase_hash").await?;
    // Compare hashes (fixed length) rather than the secrets themselves.
    if expected.as_deref() != Some(hash_token(&r.passphrase).as_str()) {
        s.registration_failures.lock().unwrap_or_else(|p| p.into_inner()).push_back(now);
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        return Err(refused("wrong registration passphrase"));
    }
    let tls = s.tls_dir.clone();
    let csr = r.csr.clone();
    let cn = format!("{}/{}", r.kind, r.name);
    let mut sans = vec![r.name.clone(), "localhost".to_owned(), "127.0.0.1".to_owned()];
    sans.extend(r.hosts.iter().cloned());
    sans.dedup();
    let cert = tokio::task::spawn_blocking(move || ferry_tls::sign_csr(&tls, &csr, &cn, &sans, CERT_DAYS))
        .await
        .map_err(|e| refused(&e.to_string()))?
        .map_err(|e| refused(&format!("the certificate request is invalid: {e}")))?;
    let token = new_token();
    let id = format!("tok-{:08x}", rand::random::<u32>());
    let token_name = format!("{}/{}", r.kind, r.name);
    // Registering again (a reinstalled host) replaces the component's earlier tokens.
    let mut replaced = 0;
    for t in s.store.tokens().await? {
        if t.role == "component" && t.name == token_name {
            s.store.delete_token(&t.id).await?;
            replaced += 1;
        }
    }
    if replaced > 0 {
        let msg = format!("{token_name} registered again: its {replaced} earlier token(s) were revoked");
        s.store.add_event(0, "warning", &token_name, &msg).await?;
    }
    s.store.add_token(&id, &hash_token(&token), &token_name, "component").await?;
    let key = format!("{}/{}", r.kind, r.name);
    let mut comp = s.store.get::<Component>(COMPONENT, &key).await?.map(|d| d.body).unwrap_or(Component {
        kind: r.kind,
        name: r.name.clone(),
        registered_ms: None,
        last_seen_ms: None,
        status: None,
        policy: None,
        reconciled_restore: None,
    });
    comp.registered_ms = Some(crate::jobs::now_ms());
    s.store.put(COMPONENT, &key, &comp, None).await?;
    s.store.add_event(0, "info", &key, &format!("{} {} registered", r.kind, r.name)).await?;
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({ "certificate": cert, "ca": s.ca_pem, "token": token, "token_id": id })),
    ))
}

//! Certificate revocation: registering a component again revokes its earlier certificate (a
//! reinstalled host, a stolen key). The serials are kept in the store (`revoked-certificate/<serial>`)
//! and handed to every linked component with its settings (`revoked_certificates`); each keeps
//! them in a file and refuses a revoked certificate on every data-path connection.

//!
//! An admin may also revoke any certificate by serial (`POST /api/v1/certificates/{serial}/revoke`):
//! a stolen key is shut out without waiting for its host to be reinstalled. The revoked component
//! is locked out until it registers again (with a new key and a new certificate).

use std::sync::Arc;

use axum::extract::{Path, State};
use ferry_api::config_server::{RevokeCertificate, RevokedCertificate};

use crate::errors::ApiError;
use crate::http::{ok, ApiResult, Caller};
use crate::AppState;

pub const REVOKED: &str = "revoked-certificate";

/// Longest reason kept with a revocation.
const MAX_REASON: usize = 200;

/// Revoke the certificate with `serial` (idempotent: the first revocation and its reason stand),
/// with an event saying why.
pub async fn revoke(store: &ferry_store::Store, serial: &str, reason: &str) -> Result<RevokedCertificate, ApiError> {
    if let Some(d) = store.get::<RevokedCertificate>(REVOKED, serial).await? {
        return Ok(d.body);
    }
    let r =
        RevokedCertificate { serial: serial.to_owned(), reason: reason.to_owned(), revoked_ms: crate::jobs::now_ms() };
    store.put(REVOKED, serial, &r, None).await?;
    store.add_event(0, "warning", "certificates", &format!("certificate {serial} revoked: {reason}")).await?;
    Ok(r)
}

/// A serial as an operator may paste it (`openssl x509 -serial` prints uppercase, some tools
/// separate bytes with colons), normalised to the lowercase hex the components compare.
pub fn normalise_serial(raw: &str) -> Result<String, ApiError> {
    let hex: String = raw.trim().chars().filter(|c| *c != ':').collect::<String>().to_ascii_lowercase();
    let hex = hex.strip_prefix("serial=").unwrap_or(&hex).to_owned();
    if hex.is_empty() || hex.len() > 64 || !hex.len().is_multiple_of(2) || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(ApiError::bad(format!(
            "{raw:?} is not a certificate serial: give its hex bytes (2 to 64 hex digits, as `ferry components` or `openssl x509 -noout -serial` shows)"
        )));
    }
    Ok(hex)
}

/// `GET /api/v1/certificates/revoked`
pub async fn list(State(s): State<Arc<AppState>>) -> ApiResult {
    let mut v: Vec<RevokedCertificate> =
        s.store.list::<RevokedCertificate>(REVOKED).await?.into_iter().map(|d| d.body).collect();
    v.sort_by_key(|r| (r.revoked_ms, r.serial.clone()));
    ok(v)
}

/// `POST /api/v1/certificates/{serial}/revoke` (admin): the body `{"reason": ".."}` is optional.
pub async fn revoke_route(
    State(s): State<Arc<AppState>>,
    caller: Caller,
    Path(serial): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult {
    let serial = normalise_serial(&serial)?;
    let req: RevokeCertificate = if body.is_empty() {
        RevokeCertificate::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad(format!("bad revocation: {e}; send {{\"reason\": \"..\"}} or nothing")))?
    };
    let reason = match req.reason.map(|r| r.trim().to_owned()).filter(|r| !r.is_empty()) {
        Some(r) if r.chars().count() > MAX_REASON || r.chars().any(char::is_control) => {
            return Err(ApiError::bad(format!(
                "the reason must be one line of at most {MAX_REASON} characters; shorten it"
            )))
        }
        Some(r) => format!("{r} (revoked by token {:?})", caller.token_name),
        None => format!("revoked by token {:?}", caller.token_name),
    };
    // Say whose certificate it was: a serial no registered component holds now may be a typo
    // (or an earlier certificate); the operator reads it in the answer and the event log.
    let holder = s
        .store
        .list::<crate::registration::Component>(crate::registration::COMPONENT)
        .await?
        .into_iter()
        .find(|d| d.body.certificate_serial.as_deref() == Some(serial.as_str()))
        .map(|d| format!("{}/{}", d.body.kind, d.body.name));
    let reason = match holder {
        Some(h) => format!("{reason}; the current certificate of {h}, which must register again"),
        None => format!("{reason}; no registered component holds it now"),
    };
    ok(revoke(&s.store, &serial, &reason).await?)
}

/// Every revoked serial, sorted.
pub async fn revoked_serials(s: &AppState) -> Result<Vec<String>, ApiError> {
    let mut v: Vec<String> =
        s.store.list::<RevokedCertificate>(REVOKED).await?.into_iter().map(|d| d.body.serial).collect();
    v.sort();
    Ok(v)
}

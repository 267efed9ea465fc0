//! Certificate revocation: registering a component again revokes its earlier certificate (a
//! reinstalled host, a stolen key). The serials are kept in the store (`revoked-certificate/<serial>`)
//! and handed to every linked component with its settings (`revoked_certificates`); each keeps
//! them in a file and refuses a revoked certificate on every data-path connection.

use serde::{Deserialize, Serialize};

use crate::errors::ApiError;
use crate::AppState;

pub const REVOKED: &str = "revoked-certificate";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RevokedCertificate {
    pub serial: String,
    pub reason: String,
    pub revoked_ms: u64,
}

/// Revoke the certificate with `serial` (idempotent), with an event saying why.
pub async fn revoke(s: &AppState, serial: &str, reason: &str) -> Result<(), ApiError> {
    if s.store.get::<RevokedCertificate>(REVOKED, serial).await?.is_some() {
        return Ok(());
    }
    let r =
        RevokedCertificate { serial: serial.to_owned(), reason: reason.to_owned(), revoked_ms: crate::jobs::now_ms() };
    s.store.put(REVOKED, serial, &r, None).await?;
    s.store.add_event(0, "warning", "certificates", &format!("certificate {serial} revoked: {reason}")).await?;
    Ok(())
}

/// Every revoked serial, sorted.
pub async fn revoked_serials(s: &AppState) -> Result<Vec<String>, ApiError> {
    let mut v: Vec<String> =
        s.store.list::<RevokedCertificate>(REVOKED).await?.into_iter().map(|d| d.body.serial).collect();
    v.sort();
    Ok(v)
}

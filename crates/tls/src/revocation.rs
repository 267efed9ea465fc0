//! Revoked certificates: the serials the configuration server revoked (registering a component
//! again revokes its earlier certificate), handed to every linked component with its settings
//! and kept in a file beside the component's state, so a restart while the server is unreachable
//! keeps refusing them. Checked on every data-path connection, both ways: a listener refuses a
//! revoked client certificate, a client refuses a revoked server certificate.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use crate::Identity;

/// Why a peer's certificate cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PeerError {
    #[error("the peer's certificate (serial {serial}) was revoked")]
    Revoked { serial: String },
    #[error("{0}")]
    NoIdentity(String),
}

impl PeerError {
    /// The registry code a data-path listener refuses such a peer with.
    pub fn code(&self) -> ferry_types::ErrorCode {
        match self {
            PeerError::Revoked { .. } => ferry_types::codes::CERTIFICATE_REVOKED,
            PeerError::NoIdentity(_) => ferry_types::codes::WRONG_IDENTITY,
        }
    }
}

/// The serial (lowercase hex) of a certificate (DER).
pub fn serial_of(der: &[u8]) -> Result<String, String> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| format!("the certificate cannot be parsed: {e}"))?;
    Ok(cert.raw_serial().iter().map(|b| format!("{b:02x}")).collect())
}

/// The set of revoked serials a component refuses, optionally kept in a file.
#[derive(Debug, Default)]
pub struct Revoked {
    serials: RwLock<BTreeSet<String>>,
    file: Option<PathBuf>,
}

/// At most this many serials are taken (a list is small: one entry per re-registration).
pub const MAX_REVOKED: usize = 100_000;

impl Revoked {
    /// Nothing revoked, nothing kept (a component without a configuration server).
    pub fn none() -> Revoked {
        Revoked::default()
    }

    /// The list kept in `file` (none yet: empty). A file that cannot be read is an error: a
    /// component must not forget what was revoked because its file was damaged.
    pub fn load(file: &Path) -> Result<Revoked, String> {
        let serials = match std::fs::read(file) {
            Ok(d) => serde_json::from_slice::<Vec<String>>(&d)
                .map_err(|e| format!("{} is not a list of revoked certificate serials: {e}", file.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(format!("cannot read {}: {e}", file.display())),
        };
        Ok(Revoked { serials: RwLock::new(serials.into_iter().collect()), file: Some(file.to_owned()) })
    }

    /// Take the list the configuration server sent (it only grows there; entries are never
    /// dropped here, so a stale answer cannot un-revoke), and keep it in the file.
    pub fn extend(&self, serials: &[String]) -> Result<(), String> {
        let valid = |s: &String| !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
        let saved = {
            let mut set = self.serials.write().unwrap_or_else(|p| p.into_inner());
            let before = set.len();
            for s in serials.iter().filter(|s| valid(s)) {
                if set.len() >= MAX_REVOKED {
                    break;
                }
                set.insert(s.to_ascii_lowercase());
            }
            if set.len() == before {
                return Ok(());
            }
            set.iter().cloned().collect::<Vec<_>>()
        };
        if let Some(f) = &self.file {
            let data = serde_json::to_vec(&saved).map_err(|e| e.to_string())?;
            ferry_sys::fs::write_atomic(f, &data).map_err(|e| format!("cannot write {}: {e}", f.display()))?;
        }
        Ok(())
    }

    pub fn contains(&self, serial: &str) -> bool {
        self.serials.read().unwrap_or_else(|p| p.into_inner()).contains(serial)
    }

    /// The identity of a TLS peer whose certificate is not revoked.
    pub fn peer_identity(&self, conn: &rustls::CommonState) -> Result<Identity, PeerError> {
        let cert = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .ok_or_else(|| PeerError::NoIdentity("the peer presented no certificate".into()))?;
        let serial = serial_of(cert.as_ref()).map_err(PeerError::NoIdentity)?;
        if self.contains(&serial) {
            return Err(PeerError::Revoked { serial });
        }
        Identity::from_cert_der(cert.as_ref()).map_err(PeerError::NoIdentity)
    }

    /// For a client: the server it reached is a `role` whose certificate is not revoked (a
    /// certificate of another kind of component that happens to carry the host name is not
    /// that server).
    pub fn check_server(&self, conn: &rustls::CommonState, role: crate::CertRole) -> Result<Identity, String> {
        let id = self.peer_identity(conn).map_err(|e| e.to_string())?;
        if id.role != role {
            return Err(format!("the server's certificate is {id}'s, not a {role}'s"));
        }
        Ok(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revoked_list_only_grows_survives_a_restart_and_refuses_a_damaged_file() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("revoked.json");
        let r = Revoked::load(&f).unwrap();
        r.extend(&["4aBC".into(), "not hex".into(), String::new()]).unwrap();
        assert!(r.contains("4abc"));
        r.extend(&[]).unwrap();
        let again = Revoked::load(&f).unwrap();
        assert!(again.contains("4abc"), "kept across a restart; a shorter answer does not un-revoke");
        assert!(!again.contains("not hex"));
        std::fs::write(&f, b"{").unwrap();
        assert!(Revoked::load(&f).unwrap_err().contains("revoked.json"));
    }
}

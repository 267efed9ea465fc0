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
#[derive(Debug)]
pub struct Revoked {
    serials: RwLock<BTreeSet<String>>,
    file: Option<PathBuf>,
    /// Bumped whenever the set grows: established connections of a newly revoked certificate
    /// are cut (see [`Revoked::revoked_now`]).
    grown: tokio::sync::watch::Sender<u64>,
}

impl Default for Revoked {
    fn default() -> Self {
        Revoked { serials: RwLock::default(), file: None, grown: tokio::sync::watch::Sender::new(0) }
    }
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
        Ok(Revoked {
            serials: RwLock::new(serials.into_iter().collect()),
            file: Some(file.to_owned()),
            ..Revoked::default()
        })
    }

    /// How many serials are held.
    pub fn len(&self) -> usize {
        self.serials.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Take the list the configuration server sent (it only grows there; entries are never
    /// dropped here, so a stale answer cannot un-revoke), and keep it in the file.
    pub fn extend(&self, serials: &[String]) -> Result<(), String> {
        let valid = |s: &String| !s.is_empty() && s.len() <= 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
        // A full list must be loud: a revocation silently not taken would let a stolen key in.
        let full = |dropped: usize| {
            match dropped {
            0 => Ok(()),
            n => Err(format!(
                "the revocation list is full ({MAX_REVOKED} serials): {n} revocation(s) were not taken; re-issue the CA (`ferry certs`) and register every component again"
            )),
        }
        };
        let mut dropped = 0;
        let saved = {
            let mut set = self.serials.write().unwrap_or_else(|p| p.into_inner());
            let before = set.len();
            for s in serials.iter().filter(|s| valid(s)) {
                if set.len() >= MAX_REVOKED && !set.contains(&s.to_ascii_lowercase()) {
                    dropped += 1;
                    continue;
                }
                set.insert(s.to_ascii_lowercase());
            }
            if set.len() == before {
                return full(dropped);
            }
            set.iter().cloned().collect::<Vec<_>>()
        };
        self.grown.send_modify(|n| *n += 1);
        if let Some(f) = &self.file {
            let data = serde_json::to_vec(&saved).map_err(|e| e.to_string())?;
            ferry_sys::fs::write_atomic(f, &data).map_err(|e| format!("cannot write {}: {e}", f.display()))?;
        }
        full(dropped)
    }

    /// Resolves once `serial` is revoked (at once if it already is): a listener drops an
    /// established connection then, so a revoked certificate stops streaming without a restart.
    pub async fn revoked_now(&self, serial: &str) {
        let mut rx = self.grown.subscribe();
        loop {
            if self.contains(serial) {
                return;
            }
            if rx.changed().await.is_err() {
                // The list is gone with its component: never resolves.
                std::future::pending::<()>().await;
            }
        }
    }

    /// The serial of a TLS peer's certificate, if it presented one.
    pub fn peer_serial(conn: &rustls::CommonState) -> Option<String> {
        conn.peer_certificates().and_then(|c| c.first()).and_then(|c| serial_of(c.as_ref()).ok())
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

    #[tokio::test]
    async fn a_connection_learns_its_certificate_was_revoked() {
        let r = std::sync::Arc::new(Revoked::none());
        let r2 = r.clone();
        let wait = tokio::spawn(async move { r2.revoked_now("ab").await });
        tokio::task::yield_now().await;
        r.extend(&["cd".into()]).unwrap();
        tokio::task::yield_now().await;
        assert!(!wait.is_finished(), "another serial's revocation does not cut it");
        r.extend(&["AB".into()]).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(10), wait).await.unwrap().unwrap();
    }

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

//! Who a certificate belongs to: the role and name of a Ferry component and the site it runs at,
//! carried in the certificate as a URI subject-alternative name `ferry:ROLE/NAME[@SITE]`
//! (`ferry:agent/db1@primary`). The signer (the configuration server, or `ferry certs` for a CA
//! the operator holds) chooses it, never the requester; every data-path listener reads it from
//! the peer's verified certificate and checks it against what the stream claims.
//!
//! Site-qualified, because after a failover the machine at the other site is its own identity
//! (`agent/db1@recovery`) streaming the same protected item back.

use std::fmt;

/// The role a certificate grants: what its holder may say Hello as.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CertRole {
    Agent,
    ProcessServer,
    MasterTarget,
    /// A hypervisor's NBD client attaching a machine's disks over TLS (`nbd_tls`).
    NbdClient,
    ConfigServer,
}

impl CertRole {
    pub const ALL: [CertRole; 5] =
        [CertRole::Agent, CertRole::ProcessServer, CertRole::MasterTarget, CertRole::NbdClient, CertRole::ConfigServer];

    pub fn as_str(self) -> &'static str {
        match self {
            CertRole::Agent => "agent",
            CertRole::ProcessServer => "process-server",
            CertRole::MasterTarget => "master-target",
            CertRole::NbdClient => "nbd-client",
            CertRole::ConfigServer => "config-server",
        }
    }

    pub fn parse(s: &str) -> Option<CertRole> {
        CertRole::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

impl fmt::Display for CertRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A component's identity: `role/name[@site]`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Identity {
    pub role: CertRole,
    pub name: String,
    /// The site the component runs at, when the signer knew it.
    pub site: Option<String>,
}

const URI_PREFIX: &str = "ferry:";

impl Identity {
    pub fn new(role: CertRole, name: &str, site: Option<&str>) -> Result<Identity, String> {
        ferry_types::validate_name("component", name)?;
        if let Some(s) = site {
            ferry_types::validate_name("site", s)?;
        }
        Ok(Identity { role, name: name.to_owned(), site: site.map(str::to_owned) })
    }

    /// `role/name[@site]`; a bare `role` means the role's own default name
    /// (`process-server` = `process-server/process-server`).
    pub fn parse(s: &str) -> Result<Identity, String> {
        let (who, site) = match s.split_once('@') {
            Some((w, site)) => (w, Some(site)),
            None => (s, None),
        };
        let (role, name) = who.split_once('/').unwrap_or((who, who));
        let role = CertRole::parse(role).ok_or_else(|| {
            format!(
                "{s:?}: the role must be one of {}",
                CertRole::ALL.iter().map(|r| r.as_str()).collect::<Vec<_>>().join(", ")
            )
        })?;
        Identity::new(role, name, site).map_err(|e| format!("{s:?}: {e}"))
    }

    /// The URI subject-alternative name that carries it.
    pub fn uri(&self) -> String {
        format!("{URI_PREFIX}{self}")
    }

    /// The identity a certificate (DER) carries, if it carries exactly one.
    pub fn from_cert_der(der: &[u8]) -> Result<Identity, String> {
        let (_, cert) =
            x509_parser::parse_x509_certificate(der).map_err(|e| format!("the certificate cannot be parsed: {e}"))?;
        let san = cert
            .subject_alternative_name()
            .map_err(|e| format!("the certificate's names cannot be parsed: {e}"))?
            .ok_or("the certificate carries no Ferry identity (no subject alternative names)")?;
        let mut found = san.value.general_names.iter().filter_map(|n| match n {
            x509_parser::extensions::GeneralName::URI(u) => u.strip_prefix(URI_PREFIX),
            _ => None,
        });
        let first = found.next().ok_or("the certificate carries no Ferry identity (no ferry: URI name)")?;
        if found.next().is_some() {
            return Err("the certificate carries more than one Ferry identity".into());
        }
        Identity::parse(first)
    }

    /// The verified peer certificate's identity of a TLS connection.
    pub fn of_peer(conn: &rustls::CommonState) -> Result<Identity, String> {
        let cert = conn.peer_certificates().and_then(|c| c.first()).ok_or("the peer presented no certificate")?;
        Identity::from_cert_der(cert.as_ref())
    }

    /// The name `ferry certs` gives this identity's files in its folder: `ROLE` for a role's
    /// default name, `ROLE-NAME` otherwise (`agent-vm1.pem`).
    pub fn file_stem(&self) -> String {
        if self.name == self.role.as_str() {
            self.name.clone()
        } else {
            format!("{}-{}", self.role, self.name)
        }
    }
}

impl fmt::Display for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.role, self.name)?;
        if let Some(s) = &self.site {
            write!(f, "@{s}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_parse_print_and_refuse_what_is_not_one() {
        let i = Identity::parse("agent/db1@primary").unwrap();
        assert_eq!((i.role, i.name.as_str(), i.site.as_deref()), (CertRole::Agent, "db1", Some("primary")));
        assert_eq!(i.to_string(), "agent/db1@primary");
        assert_eq!(i.uri(), "ferry:agent/db1@primary");
        assert_eq!(i.file_stem(), "agent-db1");
        let d = Identity::parse("process-server").unwrap();
        assert_eq!(d.to_string(), "process-server/process-server");
        assert_eq!(d.file_stem(), "process-server");
        for bad in ["", "agent/", "agent/a b", "wizard/x", "agent/db1@", "agent/x/y", "agent/db1@a@b", "/db1"] {
            assert!(Identity::parse(bad).is_err(), "{bad:?}");
        }
    }
}
